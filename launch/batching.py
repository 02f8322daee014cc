"""From scored rollouts to the training batch: overlong handling, group-relative
advantages and DAPO-style dynamic sampling (drop groups with no reward spread)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from cispo.advantages import group_advantages, zero_variance_groups
from cispo.batch import Trajectory
from cispo.config import AlgorithmConfig
from cispo.shaping import overlong_penalty, overlong_ramp


def shape_rewards(trajs: list[Trajectory], algo: AlgorithmConfig, max_new_tokens: int) -> None:
    """Apply the overlong rule in place: mask truncated responses out of the loss, or
    penalise lengths near the limit (DAPO's soft overlong punishment)."""
    if algo.overlong == "mask":
        for t in trajs:
            if t.finish_reason == "length":
                t.response_mask = [False] * len(t.response_ids)
    elif algo.overlong == "penalty":
        lengths = torch.tensor([len(t.response_ids) for t in trajs])
        pen = overlong_penalty(lengths, max_new_tokens, overlong_ramp(algo.overlong_buffer, max_new_tokens), algo.overlong_penalty)
        for t, p in zip(trajs, pen.tolist()):
            t.reward += p


def assign_advantages(trajs: list[Trajectory], algo: AlgorithmConfig) -> None:
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float64)
    groups = torch.tensor([t.group_id for t in trajs])
    for t, a in zip(trajs, group_advantages(rewards, groups, algo.normalize_std).tolist()):
        t.advantage = a


@dataclass
class GroupFilter:
    kept: list[list[Trajectory]]
    dropped: int  # groups removed for having no reward spread
    flat: int  # groups without reward spread (dropped or not)
    total: int  # groups seen


def split_groups(trajs: list[Trajectory], drop_flat: bool) -> GroupFilter:
    """Trajectories grouped by prompt, with zero-spread groups removed when asked."""
    by_group: dict[int, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by_group[t.group_id].append(t)
    if not trajs:
        return GroupFilter([], 0, 0, 0)
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float64)
    flat = zero_variance_groups(rewards, torch.tensor([t.group_id for t in trajs]))
    flat_ids = {t.group_id for t, f in zip(trajs, flat.tolist()) if f}
    if not drop_flat:
        return GroupFilter(list(by_group.values()), 0, len(flat_ids), len(by_group))
    kept = [g for gid, g in by_group.items() if gid not in flat_ids]
    return GroupFilter(kept, len(flat_ids), len(flat_ids), len(by_group))
