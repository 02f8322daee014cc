"""Reward shaping around the objective: DAPO's soft overlong penalty."""

from __future__ import annotations

import torch


def overlong_ramp(buffer: int | None, max_new_tokens: int) -> int:
    """The penalty's ramp length: `buffer`, or by default a fifth of the generation budget
    (DAPO's 4096 of 20480), so the ramp always sits inside the budget."""
    return buffer if buffer is not None else max_new_tokens // 5


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """0 up to max_len - buffer, then falling linearly to -penalty at max_len (DAPO eq. 13).

    A soft ramp rather than a cliff, so that a response one token short of the limit is
    not scored very differently from one that hits it.
    """
    if buffer <= 0:
        return torch.where(lengths >= max_len, -penalty, 0.0).to(torch.float32)
    start = max_len - buffer
    over = (lengths.to(torch.float64) - start).clamp(min=0.0, max=float(buffer))
    return (-penalty * over / buffer).to(torch.float32)
