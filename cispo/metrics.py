"""Training metrics: IS-weight statistics and the train-vs-rollout mismatch.

Statistics are carried as sums (and maxima) so that shards — micro-batches, ranks —
can be merged exactly before the means are taken.
"""

from __future__ import annotations

import math

import torch


def merge_stats(into: dict[str, float], stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Add a shard's summable stats into `into` (keys ending in "_max" take the max)."""
    for key, value in stats.items():
        v = float(value)
        if key.endswith("_max"):
            into[key] = max(into.get(key, -math.inf), v)
        else:
            into[key] = into.get(key, 0.0) + v
    return into


def accumulate_stats(into: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`merge_stats` without leaving the device (no host sync per micro-batch): float64
    tensors, so the sums are the very float64 additions merge_stats makes in Python."""
    for key, value in stats.items():
        v = torch.as_tensor(value).detach().to(torch.float64)
        if key not in into:
            into[key] = v
        elif key.endswith("_max"):
            into[key] = torch.maximum(into[key], v)
        else:
            into[key] = into[key] + v
    return into


def stats_to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """One host transfer for all accumulated stats."""
    keys = list(stats)
    values = torch.stack([stats[k] for k in keys]).cpu().tolist() if keys else []
    return dict(zip(keys, values))


def finalize_stats(stats: dict[str, float]) -> dict[str, float]:
    """Means and fractions from merged sums (keys as logged under `train/`)."""
    n = max(stats.get("token_count", 0.0), 1.0)
    out = {
        "is_weight_mean": stats.get("is_weight_sum", 0.0) / n,
        "is_weight_max": stats.get("is_weight_max", 0.0),
        "clip_frac_high": stats.get("clip_high_count", 0.0) / n,
        "clip_frac_low": stats.get("clip_low_count", 0.0) / n,
        "grad_dropped_frac": stats.get("grad_dropped_count", 0.0) / n,
    }
    if "entropy_sum" in stats:
        out["entropy"] = stats["entropy_sum"] / n
    return out


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float(x[m].double().mean()) if m.any() else 0.0


def mismatch_metrics(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the trainer's token probabilities are from the rollout engine's.

    pearson:      correlation of token probabilities (M1 reports 0.9x with a bf16 head,
                  0.99x with an FP32 head)
    abs_logp_diff: mean |log p_train - log p_rollout|
    kl_k3:        k3 estimator of KL(rollout || train) on rollout samples,
                  r - 1 - log r with r = p_train / p_rollout (unbiased, always >= 0)
    """
    m = mask.bool()
    lt = train_logprobs.detach().double()[m]
    lr = rollout_logprobs.detach().double()[m]
    if lt.numel() == 0:
        return {"pearson": float("nan"), "abs_logp_diff": 0.0, "kl_k3": 0.0}
    pt, pr = lt.exp(), lr.exp()
    if lt.numel() > 1 and pt.std() > 0 and pr.std() > 0:
        pearson = float(torch.corrcoef(torch.stack([pt, pr]))[0, 1])
    else:
        pearson = float("nan")
    log_r = (lt - lr).clamp(-20, 20)
    k3 = log_r.exp() - 1.0 - log_r
    return {"pearson": pearson, "abs_logp_diff": float((lt - lr).abs().mean()), "kl_k3": float(k3.mean())}
