"""The copy plan (rollout/copy_plan.py): received checkpoint-named tensors land in vLLM's
live layout exactly as vLLM's own loaders put them (q/k/v and gate/up stacked along dim 0,
the vocabulary's padding rows left alone), bucket by bucket; anything it cannot place is
refused with the tensor named, and `load_weights_inplace` then uses vLLM's loaders."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cispo import weight_sync
from rollout import vllm_compat as compat
from rollout.copy_plan import CopyLoader, CopyPlanError, plan_slots

SEED = 1234


def hf_state(seed: int) -> dict[str, torch.Tensor]:
    """A real Qwen2 checkpoint's names and shapes (two layers, GQA, biases on q/k/v)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return {n: p.detach().clone() for n, p in Qwen2ForCausalLM(cfg).named_parameters()}


class LiveModel(torch.nn.Module):
    """Stands for vLLM's model: parameters under vLLM's (fused, dotted) names."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._live = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in tensors.items()}
        self.lm_head = SimpleNamespace(weight=self._live["lm_head.weight"])

    def named_parameters(self, *args, **kwargs):  # noqa: D401 - the nn.Module signature
        return iter(self._live.items())

    def load_weights(self, weights):  # what the "direct" path would call
        self.direct_calls = getattr(self, "direct_calls", 0) + 1
        for _ in weights:
            pass


def vllm_live(state: dict[str, torch.Tensor], pad_to: int = 128) -> dict[str, torch.Tensor]:
    """vLLM's layout of a checkpoint, with the vocabulary rows padded (as vLLM pads them)."""
    live = compat.checkpoint_to_vllm_layout(state)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = live[name]
        live[name] = torch.cat([w, torch.full((pad_to - w.shape[0], w.shape[1]), 7.0)])
    return live


def send(state: dict[str, torch.Tensor], bucket_bytes: int):
    """(plan, named tensors) as a receiver sees them: views of one flat tensor per bucket."""
    plan = weight_sync.plan_buckets([weight_sync.meta_of(n, t) for n, t in state.items()], bucket_bytes)
    flats = [weight_sync.flatten_bucket([state[m.name] for m in b]) for b in plan]
    return plan, [item for b, f in zip(plan, flats) for item in weight_sync.unflatten_bucket(f, b)]


@pytest.mark.parametrize("bucket_bytes", [1 << 12, 1 << 30])  # many buckets / one
def test_copies_land_where_vllms_layout_puts_them(bucket_bytes):
    print(f"seed {SEED}")
    old, new = hf_state(SEED), hf_state(SEED + 1)
    model = LiveModel(vllm_live(old))
    plan, named = send(new, bucket_bytes)
    metas = [m for b in plan for m in b]
    loader = CopyLoader(model, plan_slots(metas, {n: tuple(p.shape) for n, p in model.named_parameters()}))
    assert loader.load(named) == len(new)

    want = compat.checkpoint_to_vllm_layout(new)
    live = dict(model.named_parameters())
    assert set(live) == set(want)
    for name, w in want.items():
        rows = w.shape[0]
        assert torch.equal(live[name][:rows], w), name
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # padding rows untouched
        assert torch.all(live[name][100:] == 7.0)
    # and the copies changed something: the old weights differ from the new
    assert not torch.equal(compat.checkpoint_to_vllm_layout(old)["model.layers.0.self_attn.qkv_proj.weight"],
                           want["model.layers.0.self_attn.qkv_proj.weight"])


def test_dtype_is_converted_like_copy_():
    state = hf_state(SEED)
    model = LiveModel({n: t.to(torch.bfloat16) for n, t in vllm_live(state).items()})
    plan, named = send(state, 1 << 14)  # fp32 in, bf16 live
    CopyLoader(model, plan_slots([m for b in plan for m in b], {n: tuple(p.shape) for n, p in model.named_parameters()})).load(named)
    live = dict(model.named_parameters())
    qkv = compat.checkpoint_to_vllm_layout(state)["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(live["model.layers.1.self_attn.qkv_proj.weight"], qkv.to(torch.bfloat16))


def metas_of(state):
    return [weight_sync.meta_of(n, t) for n, t in state.items()]


def test_refuses_what_it_cannot_place_exactly():
    state = hf_state(SEED)
    live = {n: tuple(t.shape) for n, t in vllm_live(state).items()}
    qkv = "model.layers.0.self_attn.qkv_proj.weight"

    sharded = dict(live, **{qkv: (live[qkv][0] // 2, live[qkv][1])})  # tensor-parallel size 2
    with pytest.raises(CopyPlanError, match="qkv_proj.weight.*not its parts"):
        plan_slots(metas_of(state), sharded)

    only_q = {n: t for n, t in state.items() if ".k_proj.weight" not in n}
    with pytest.raises(CopyPlanError, match="k_proj.weight"):
        plan_slots(metas_of(only_q), live)

    with pytest.raises(CopyPlanError, match="model.extra.weight: no live tensor"):
        plan_slots(metas_of(dict(state, **{"model.extra.weight": torch.zeros(2)})), live)

    bigger_vocab = dict(state, **{"lm_head.weight": torch.zeros(200, 64)})  # more rows than live
    with pytest.raises(CopyPlanError, match="lm_head.weight: incoming shape"):
        plan_slots(metas_of(bigger_vocab), live)

    norm = "model.layers.0.input_layernorm.weight"  # only the vocabulary may be padded
    with pytest.raises(CopyPlanError, match="input_layernorm"):
        plan_slots(metas_of(state), dict(live, **{norm: (live[norm][0] + 1,)}))


def fake_worker(model_name: str, device: str, monkeypatch):
    cls = type(model_name, (LiveModel,), {})
    model = cls(vllm_live(hf_state(SEED)))
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=model), device=device,
                             vllm_config=SimpleNamespace(model_config=SimpleNamespace(quantization=None)),
                             reload_calls=0)

    def reload_weights(weights_iterator, is_checkpoint_format):
        worker.reload_calls += 1
        for _ in weights_iterator:
            pass

    worker.reload_weights = reload_weights
    monkeypatch.setattr(compat, "tp_rank_and_size", lambda: (0, 1))
    return worker, model


def test_auto_picks_copy_for_plain_models_and_falls_back_otherwise(monkeypatch):
    new = hf_state(SEED + 1)
    plan, named = send(new, 1 << 14)
    metas = [m for b in plan for m in b]

    # worker_device says cuda (the tensors stay on CPU: the copies are device-agnostic)
    worker, model = fake_worker("Qwen2ForCausalLM", "cuda", monkeypatch)
    assert compat.load_weights_inplace(worker, iter(named), "auto", metas) == "copy"
    qkv = "model.layers.1.mlp.gate_up_proj.weight"
    assert torch.equal(dict(model.named_parameters())[qkv], compat.checkpoint_to_vllm_layout(new)[qkv])
    assert compat.load_weights_inplace(worker, iter(named), "auto", None) == "direct"  # no plan sent

    worker, model = fake_worker("MiniMaxForCausalLM", "cuda", monkeypatch)  # loaders do more than copy
    assert compat.load_weights_inplace(worker, iter(named), "auto", metas) == "direct"
    assert model.direct_calls == 1

    worker, _ = fake_worker("Qwen2ForCausalLM", "cpu", monkeypatch)  # prepacked CPU weights
    assert compat.load_weights_inplace(worker, iter(named), "auto", metas) == "reload"
    assert worker.reload_calls == 1


def test_explicit_copy_names_the_tensor_it_cannot_place(monkeypatch):
    worker, _ = fake_worker("Qwen2ForCausalLM", "cuda", monkeypatch)
    extra = dict(hf_state(SEED), **{"model.extra.weight": torch.zeros(3)})
    plan, named = send(extra, 1 << 14)
    with pytest.raises(ValueError, match="rollout.weight_load=copy: model.extra.weight"):
        compat.load_weights_inplace(worker, iter(named), "copy", [m for b in plan for m in b])
    with pytest.raises(ValueError, match="needs the sync plan"):
        compat.load_weights_inplace(worker, iter(named), "copy", None)
    # auto with the same unplaceable plan quietly takes vLLM's loaders
    assert compat.load_weights_inplace(worker, iter(named), "auto", [m for b in plan for m in b]) == "direct"


def test_a_parameter_whose_storage_moved_still_gets_the_weights():
    """A model that swaps a parameter's tensor between loads (a re-allocation) must not
    leave the plan copying into the old storage."""
    old, new = hf_state(SEED), hf_state(SEED + 1)
    model = LiveModel(vllm_live(old))
    plan, named = send(new, 1 << 14)
    metas = [m for b in plan for m in b]
    loader = CopyLoader(model, plan_slots(metas, {n: tuple(p.shape) for n, p in model.named_parameters()}))
    loader.load(named)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    model._live[qkv].data = torch.zeros_like(model._live[qkv])  # new storage under the same parameter
    loader.load(named)
    assert torch.equal(model._live[qkv], compat.checkpoint_to_vllm_layout(new)[qkv])
