"""What the GPU test modules share: a system on a named placement, exact weight
comparisons between the trainer and every engine, log-prob agreement, real steps."""

from __future__ import annotations

import contextlib
import json
import os

import torch

from cispo.metrics import mismatch_metrics
from cispo.weight_sync import checksum

# Stated bounds for rollout vs trainer log-probs of the same sampled tokens: bf16 bodies on both
# sides (vLLM's kernels vs transformers' sdpa), the LM head in FP32 on both.
MIN_PEARSON = 0.98  # of token probabilities (M1: 0.997 with an FP32 head on their model)
MAX_MEAN_ABS_DLOGP = 0.05

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
REPORT: dict = {}


def record(section: str, **values) -> None:
    """Keep a measured number for the report (and print it)."""
    REPORT.setdefault(section, {}).update(values)
    print(f"[gpu report] {section}: {json.dumps(values, default=str)}", flush=True)


def write_report() -> None:
    path = os.environ.get("CISPO_GPU_REPORT")
    if path and REPORT:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if CUDA else "cpu", "gpus": GPUS, **REPORT}, f,
                      indent=1, default=str)


PROMPTS = ["12+7=", "3*4=", "hello", "abc", "99-3=", "x", "7+7=", "the"]


def overrides(model_path: str, placement: str, *extra: str) -> list[str]:
    return ["rollout=gpu", "trainer=gpu", f"placement={placement}", f"model.path={model_path}",
            "model.dtype=bfloat16", "rollout.max_new_tokens=32", "rollout.max_model_len=128",
            "rollout.enforce_eager=true", "rollout.gpu_memory_utilization=0.3", "data.max_prompt_tokens=16",
            "data.rollout_batch_size=64", "algorithm.group_size=8", "algorithm.dynamic_sampling=false",
            "algorithm.overlong=none", "trainer.lr=1e-3", "trainer.warmup_steps=0", "trainer.micro_batch_tokens=4096",
            "warmup.steps=0", "logger.backends=[jsonl]", "logger.samples_every=1", "guard.enabled=false", *extra]


@contextlib.contextmanager
def running_system(model_path: str, placement: str, *extra: str):
    """(conf, RLSystem) on a named placement, shut down afterwards."""
    from launch.config import compose_config, to_dataclass
    from launch.system import RLSystem

    conf = to_dataclass(compose_config(overrides(model_path, placement, *extra)))
    system = RLSystem(conf, model_path)
    try:
        yield conf, system
    finally:
        system.shutdown()


def vocab_rows(system) -> tuple[int, dict[str, int]]:
    vocab = len(system.tokenizer)
    return vocab, {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}


def trainer_checksums(system) -> dict[str, int]:
    """The trainer's weights (all ranks' gathers, as the sync sends them) in vLLM's layout."""
    from rollout.vllm_compat import checkpoint_to_vllm_layout

    state = system.trainer.state_dict()
    vocab, _ = vocab_rows(system)
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    out = {n: checksum(t) for n, t in checkpoint_to_vllm_layout(state).items()}
    out["cispo.fp32_head"] = checksum(head[:vocab].float())
    return out


def assert_engines_equal_trainer(system) -> dict[str, int]:
    want = trainer_checksums(system)
    for i, got in enumerate(system.rollout.weight_checksums(vocab_rows(system)[1])):
        assert set(got) == set(want), f"engine {i}: names differ: {sorted(set(got) ^ set(want))[:6]}"
        bad = [n for n in want if got[n] != want[n]]
        assert not bad, f"engine {i}: {len(bad)} of {len(want)} tensors differ from the trainer's, e.g. {bad[:4]}"
    return want


def logprob_agreement(system, n: int = 4) -> dict[str, float]:
    """Sample with the engines, score the same tokens with the trainer."""
    ids = [system.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    trajs = system.rollout.generate(ids, n=n)
    train = system.trainer.compute_logprobs(trajs)
    t = torch.cat(train)
    r = torch.cat([torch.tensor(x.rollout_logprobs, dtype=torch.float32) for x in trajs])
    m = mismatch_metrics(t, r, torch.ones_like(t, dtype=torch.bool))
    m.update(tokens=int(t.numel()), max_abs_logp_diff=float((t - r).abs().max()))
    return m


def check_logprobs(system, section: str) -> dict[str, float]:
    """Record the engine-vs-trainer agreement and hold it to the stated bounds."""
    m = logprob_agreement(system)
    record(section, **m)
    assert m["pearson"] >= MIN_PEARSON and m["abs_logp_diff"] <= MAX_MEAN_ABS_DLOGP, m
    return m


def digit_reward(text: str) -> float:
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def real_steps(system, conf, steps: int, version0: int) -> list[dict[str, float]]:
    """Generate -> reward (share of digits: varies within a group, so advantages are not
    zero) -> train -> sync, `steps` times. Returns the trainer's metrics per step."""
    from launch.batching import assign_advantages

    out = []
    ids = [system.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    for k in range(steps):
        trajs = system.rollout.generate(ids, list(range(len(ids))), conf.algorithm.group_size)
        for t in trajs:
            t.reward = digit_reward(system.tokenizer.decode(t.response_ids))
        assign_advantages(trajs, conf.algorithm)
        metrics = system.train(trajs)
        assert system.sync_weights(version0 + k + 1) == version0 + k + 1
        out.append(metrics)
    return out
