"""Correcting for the behaviour policy: truncated and masked importance sampling.

With `trainer.old_logprobs=recompute` the trainer's pi_old is a *proximal* policy (its
own weights before the step's first update), not the policy that sampled the tokens.
The samples came from the behaviour policy mu: the rollout engine, one version behind
in async mode, and numerically different from the trainer (other kernels, bf16 body)
even when in sync. The decoupled objective (Hilton et al. 2021, "Batch size-invariance
for policy optimization"; AReaL) keeps the clip about pi_old and weights each token's
loss by the behaviour ratio

    w_t = pi_old(o_t) / mu(o_t)        (mu's log-probs: the rollout engine's)

so the one-version lag and the train/inference mismatch are both corrected. w is
unbounded; two published ways to bound its variance:

    tis (truncated IS, Yao et al. 2025):   w <- min(w, cap)
    mis (masked IS, Liu et al. 2025):      w <- w where floor <= w <= cap, else 0
                                           (the token, or sequence, leaves the loss)

level "token" bounds each token's own ratio; level "sequence" uses the response's ratio
prod_t w_t (the IS weight of the whole sampled sequence) for every token of it.
The weight multiplies the token's aggregation weight (`cispo.aggregation`), so it
enters every objective of `cispo.objectives` the same way: a CISPO or PPO-clip loss of
a token scaled by a constant w >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cispo.objectives import MAX_LOG_RATIO

MODES = ("off", "tis", "mis")
LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class BehaviourIS:
    mode: str = "tis"
    level: str = "token"
    cap: float = 2.0
    floor: float = 0.0  # mis only: weights below it are masked too

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"behaviour IS mode {self.mode!r} is unknown; allowed: {', '.join(MODES)}")
        if self.level not in LEVELS:
            raise ValueError(f"behaviour IS level {self.level!r} is unknown; allowed: {', '.join(LEVELS)}")


def behaviour_log_ratio(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                        seq_index: torch.Tensor, level: str) -> torch.Tensor:
    """[T] float64 log w: per token, or the sum over the token's sequence's trained tokens
    (clamped like the objectives' ratios so exp() stays finite)."""
    m = mask.bool()
    diff = torch.where(m, proximal_logprobs.double() - behaviour_logprobs.double(), 0.0)
    if level == "sequence":
        n = int(seq_index.max()) + 1 if seq_index.numel() else 0
        per_seq = torch.zeros(n, dtype=torch.float64, device=diff.device).index_add_(0, seq_index, diff)
        diff = per_seq[seq_index]
    return diff.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def behaviour_weights(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                      seq_index: torch.Tensor, config: BehaviourIS) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-token behaviour correction ([T] float32, 1 outside `mask`) and its metrics:

    behaviour_is_weight_mean      mean applied weight over trained tokens
    behaviour_is_raw_weight_mean  mean ratio before truncation / masking
    behaviour_is_truncated_frac   (tis) fraction of trained tokens whose weight was capped
    behaviour_is_masked_frac      (mis) fraction of trained tokens masked out
    """
    m = mask.bool()
    if config.mode == "off":
        return torch.ones(mask.shape, dtype=torch.float32, device=mask.device), {}
    raw = behaviour_log_ratio(proximal_logprobs, behaviour_logprobs, m, seq_index, config.level).exp()
    if config.mode == "tis":
        hit = raw > config.cap
        w = raw.clamp(max=config.cap)
        frac_key = "behaviour_is_truncated_frac"
    else:
        hit = (raw > config.cap) | (raw < config.floor)
        w = torch.where(hit, 0.0, raw)
        frac_key = "behaviour_is_masked_frac"
    w = torch.where(m, w, 1.0)
    n = max(int(m.sum()), 1)
    stats = {
        "behaviour_is_weight_mean": float(w[m].sum()) / n,
        "behaviour_is_raw_weight_mean": float(raw[m].sum()) / n,
        frac_key: float((hit & m).sum()) / n,
    }
    return w.float(), stats
