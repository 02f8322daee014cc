"""Per-step metrics of what the rollout produced (`reward/`, `rollout/`)."""

from __future__ import annotations

import statistics
from typing import Any

from cispo.batch import Trajectory


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return float(s[min(len(s) - 1, int(q * len(s)))])


def rollout_metrics(stats: dict[str, Any], batch: list[Trajectory], trainer_version: int) -> dict[str, float]:
    gen: list[Trajectory] = stats["generated"]
    rewards = [t.reward for t in gen]
    lengths = [float(len(t.response_ids)) for t in gen]
    n = max(len(gen), 1)
    return {
        "reward/mean": statistics.fmean(rewards) if rewards else 0.0,
        "reward/std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "reward/pass_rate": sum(r >= 1.0 for r in rewards) / n,
        "reward/failures": float(stats["reward_failures"]),
        "reward/dropped_groups": float(stats["dropped_groups"]),
        # zero-spread groups among all generated (dropped or not): the collapse guard's signal
        "rollout/flat_group_frac": stats["flat_groups"] / max(stats["groups"], 1),
        # trained samples that carry a learning signal (a non-zero advantage and a trained token)
        "rollout/signal_samples": float(sum(t.advantage != 0 and t.num_trained_tokens > 0 for t in batch)),
        "rollout/advantage_abs_mean": statistics.fmean(abs(t.advantage) for t in batch) if batch else 0.0,
        "reward/refills": float(stats["refills"]),
        "rollout/samples": float(len(gen)),
        "rollout/trained_samples": float(len(batch)),
        "rollout/response_len_mean": statistics.fmean(lengths) if lengths else 0.0,
        "rollout/response_len_max": max(lengths, default=0.0),
        "rollout/response_len_p99": _quantile(lengths, 0.99),
        "rollout/truncated_frac": sum(t.finish_reason == "length" for t in gen) / n,
        "rollout/repetition_frac": sum(t.finish_reason == "repetition" for t in gen) / n,
        "rollout/staleness_mean": (
            statistics.fmean(trainer_version - t.policy_version for t in batch) if batch else 0.0
        ),
    }


def sample_rows(batch: list[Trajectory], tokenizer, limit: int = 8) -> list[dict[str, Any]]:
    rows = []
    for t in batch[:limit]:
        rows.append({
            "prompt": tokenizer.decode(t.prompt_ids),
            "response": tokenizer.decode(t.response_ids),
            "reward": t.reward,
            "advantage": round(t.advantage, 4),
            "finish": t.finish_reason,
            "version": t.policy_version,
        })
    return rows
