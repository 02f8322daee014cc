"""Policy-gradient objectives: CISPO and the baselines it is compared with.

All objectives share one interface: given the current log-probs (with grad), the
behaviour policy's log-probs, per-token advantages, per-token aggregation weights
(see `cispo.aggregation`) and the trained-token mask, return a scalar loss to
*minimise* and summable statistics. Summing the losses of the shards of a step gives
the step's loss, so micro-batching and data parallelism do not change the gradient.

CISPO (MiniMax-M1, eq. 4-5):
    J = 1/sum|o_i| * sum_i sum_t sg(clip(r_it, 1-eps_low, 1+eps_high)) * A_it * log pi(o_it)
The IS weight is clipped and detached, but the token's gradient is never dropped —
unlike PPO-clip, whose min() zeroes the gradient of tokens outside the trust region.
The unified form multiplies by a mask M_it that is 0 where PPO would drop the token
(A>0 and r>1+eps_high, or A<0 and r<1-eps_low), recovering a PPO-style trust region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# exp() of a log-ratio beyond this is inf in fp32; values this large are clipped anyway.
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class ClipRange:
    eps_low: float
    eps_high: float
    token_mask: bool = False  # CISPO's unified form: drop tokens outside the trust region


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, to minimise
    stats: dict[str, torch.Tensor]  # summable over shards; keys ending in "_max" reduce by max


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() rather than multiply: a padded position may hold inf/nan log-probs.
    return torch.where(mask, x, torch.zeros_like(x)).sum()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # bf16 log-probs would make r = exp(diff) coarse; float64 inputs (tests) stay float64
    return x if x.dtype == torch.float64 else x.float()


def importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = (_at_least_fp32(logprobs) - _at_least_fp32(old_logprobs)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio)


def outside_trust_region(ratio: torch.Tensor, advantages: torch.Tensor, clip: ClipRange) -> torch.Tensor:
    """Tokens PPO-clip gives no gradient: pushed further in the advantage's direction than the
    clip range allows (A > 0 and r > 1+eps_high, or A < 0 and r < 1-eps_low)."""
    return ((advantages > 0) & (ratio > 1.0 + clip.eps_high)) | ((advantages < 0) & (ratio < 1.0 - clip.eps_low))


def _clip_stats(ratio: torch.Tensor, mask: torch.Tensor, clip: ClipRange, dropped: torch.Tensor) -> dict[str, torch.Tensor]:
    """`dropped`: tokens whose gradient the objective zeroes (PPO-clip's trust region;
    CISPO only with its token mask) — the gradient signal CISPO keeps and PPO loses."""
    r = ratio.detach()
    m = mask.to(r.dtype)
    return {
        "token_count": m.sum(),
        "is_weight_sum": (r * m).sum(),
        "is_weight_max": torch.where(mask, r, torch.zeros_like(r)).max() if r.numel() else r.new_zeros(()),
        "clip_high_count": ((r > 1.0 + clip.eps_high) & mask).to(r.dtype).sum(),
        "clip_low_count": ((r < 1.0 - clip.eps_low) & mask).to(r.dtype).sum(),
        "grad_dropped_count": (dropped & mask).to(r.dtype).sum(),
    }


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    clip: ClipRange,
) -> LossOutput:
    ratio = importance_ratio(logprobs, old_logprobs)
    is_weight = ratio.clamp(1.0 - clip.eps_low, 1.0 + clip.eps_high).detach()
    per_token = -is_weight * advantages * _at_least_fp32(logprobs)
    dropped = outside_trust_region(ratio.detach(), advantages, clip) if clip.token_mask else torch.zeros_like(mask)
    if clip.token_mask:
        per_token = per_token * (~dropped).to(per_token.dtype)
    loss = _masked_sum(per_token * weights, mask)
    return LossOutput(loss=loss, stats=_clip_stats(ratio, mask, clip, dropped))


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    clip: ClipRange,
) -> LossOutput:
    """PPO's clipped surrogate: GRPO (symmetric eps) and DAPO (clip-higher)."""
    ratio = importance_ratio(logprobs, old_logprobs)
    surr = ratio * advantages
    surr_clipped = ratio.clamp(1.0 - clip.eps_low, 1.0 + clip.eps_high) * advantages
    per_token = -torch.minimum(surr, surr_clipped)
    loss = _masked_sum(per_token * weights, mask)
    return LossOutput(loss=loss, stats=_clip_stats(ratio, mask, clip, outside_trust_region(ratio.detach(), advantages, clip)))


@dataclass(frozen=True)
class Algorithm:
    loss_fn: Callable[..., LossOutput]
    clip: ClipRange
    loss_agg: str


# Published defaults. M1 sets no effective lower bound for CISPO (eps_low=1 makes the
# lower clip 0, and r >= 0 always) and tunes eps_high without publishing it; 0.28 is
# DAPO's clip-higher value and a common starting point.
ALGORITHM_DEFAULTS: dict[str, Algorithm] = {
    "cispo": Algorithm(cispo_loss, ClipRange(eps_low=1.0, eps_high=0.28), "token_mean"),
    "grpo": Algorithm(ppo_clip_loss, ClipRange(eps_low=0.2, eps_high=0.2), "seq_mean_token_mean"),
    "dapo": Algorithm(ppo_clip_loss, ClipRange(eps_low=0.2, eps_high=0.28), "token_mean"),
}


def resolve_algorithm(
    name: str,
    eps_low: float | None = None,
    eps_high: float | None = None,
    token_mask: bool = False,
    loss_agg: str | None = None,
) -> Algorithm:
    """The named algorithm with any explicitly configured value replacing its default."""
    if name not in ALGORITHM_DEFAULTS:
        raise ValueError(f"algorithm.name={name!r} is unknown; allowed: {', '.join(ALGORITHM_DEFAULTS)}")
    base = ALGORITHM_DEFAULTS[name]
    clip = ClipRange(
        eps_low=base.clip.eps_low if eps_low is None else eps_low,
        eps_high=base.clip.eps_high if eps_high is None else eps_high,
        token_mask=token_mask,
    )
    return Algorithm(base.loss_fn, clip, loss_agg or base.loss_agg)


def policy_loss(
    algorithm: Algorithm,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
) -> LossOutput:
    return algorithm.loss_fn(logprobs, old_logprobs, advantages, weights, mask.bool(), algorithm.clip)
