"""Group-relative advantages: each sample is scored against the other samples of its prompt."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """A_i = (R_i - mean_group R) / std_group R   (or without the division).

    A group whose rewards have zero spread carries no learning signal: its advantages
    are exactly 0 (never NaN), also with `normalize_std`. The std is the unbiased one
    (as in GRPO); a group of one sample therefore gets advantage 0.
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D shapes")
    r = rewards.to(torch.float64)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, r)
    means = sums / counts
    centred = r - means[inverse]
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, centred**2)
    std = torch.sqrt(sq / (counts - 1).clamp_min(1))
    flat = (std <= eps) | (counts < 2)
    adv = torch.where(flat[inverse], torch.zeros_like(centred), centred)
    if normalize_std:
        adv = torch.where(flat[inverse], adv, adv / std[inverse].clamp_min(eps))
    return adv.to(torch.float32)


def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Bool per sample: True if its group's rewards all equal (DAPO's dynamic sampling drops these)."""
    r = rewards.to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    hi = torch.full((n,), -torch.inf, dtype=torch.float64).scatter_reduce_(0, inverse, r, "amax")
    lo = torch.full((n,), torch.inf, dtype=torch.float64).scatter_reduce_(0, inverse, r, "amin")
    return ((hi - lo) <= eps)[inverse]
