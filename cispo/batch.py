"""The trajectory contract that rollout, rewards, the driver and the trainer exchange.

Rollout produces `Trajectory` objects; rewards fill `reward`; `cispo.advantages`
fills `advantage`; the trainer turns a list of them into one `PackedBatch` (no
padding: sequences are concatenated and positions restart per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

FINISH_REASONS = ("stop", "length", "repetition", "abort")


@dataclass
class Trajectory:
    """One sampled response to one prompt.

    `rollout_logprobs[t]` is the fp32 log-probability of `response_ids[t]` under the
    sampling distribution of the engine that produced it (temperature applied, FP32
    LM head), i.e. log pi_old when the trainer takes pi_old from the rollout.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: str
    policy_version: int
    group_id: int = 0
    reward: float = 0.0
    advantage: float = 0.0
    # Per-token loss mask over the response (e.g. overlong samples masked out);
    # None means every response token is trained on.
    response_mask: list[bool] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # MoE models with routing recorded (rollout.record_routing): the experts each token of
    # prompt + response was routed to, [num_tokens, moe_layers, top_k] int16, -1 where the
    # engine ran no forward for the token (the last sampled one). For routing replay.
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.prompt_ids) == 0:
            raise ValueError("Trajectory.prompt_ids is empty: a trajectory needs at least one prompt token")
        if len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(
                f"Trajectory.rollout_logprobs has {len(self.rollout_logprobs)} entries but "
                f"response_ids has {len(self.response_ids)}: there must be one log-prob per response token"
            )
        if self.response_mask is not None and len(self.response_mask) != len(self.response_ids):
            raise ValueError(
                f"Trajectory.response_mask has {len(self.response_mask)} entries but response_ids "
                f"has {len(self.response_ids)}"
            )
        if self.routed_experts is not None and (
            self.routed_experts.dim() != 3 or self.routed_experts.shape[0] != self.num_tokens
        ):
            raise ValueError(
                f"Trajectory.routed_experts has shape {tuple(self.routed_experts.shape)}; expected "
                f"[{self.num_tokens} (prompt + response tokens), moe_layers, top_k]"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"Trajectory.finish_reason={self.finish_reason!r}; allowed: {', '.join(FINISH_REASONS)}"
            )

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def num_trained_tokens(self) -> int:
        """Response tokens the loss sees (all of them unless `response_mask` says otherwise)."""
        return len(self.response_ids) if self.response_mask is None else sum(self.response_mask)


@dataclass
class PackedBatch:
    """Sequences concatenated along one token axis of length T.

    Position t predicts `targets[t]` (= the next token of the same sequence), so the
    trainer's log-prob at t is compared with `old_logprobs[t]`; `loss_mask[t]` is True
    exactly where `targets[t]` is a trained response token.
    """

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64, restarting at 0 for each sequence
    cu_seqlens: torch.Tensor  # [n+1] int32, sequence boundaries (flash-attn style)
    targets: torch.Tensor  # [T] int64, next token (0 at each sequence's last position)
    loss_mask: torch.Tensor  # [T] bool
    old_logprobs: torch.Tensor  # [T] float32, rollout log-probs aligned with targets
    advantages: torch.Tensor  # [T] float32, the sequence's advantage on its response tokens
    seq_index: torch.Tensor  # [T] int64, which sequence of the batch each token belongs to
    # [T] float32 behaviour-policy correction (cispo.offpolicy) scaling each token's loss; None = 1
    behaviour_weights: Optional[torch.Tensor] = None
    routed_experts: torch.Tensor | None = None  # [T, moe_layers, top_k] int16 (-1: not recorded), or None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def seq_lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(**{k: None if v is None else v.to(device) for k, v in self.__dict__.items()})


def pack(trajectories: Sequence[Trajectory]) -> PackedBatch:
    """Concatenate trajectories into one padding-free batch."""
    if not trajectories:
        raise ValueError("pack() got no trajectories")
    ids, pos, tgt, mask, old, adv, seq = [], [], [], [], [], [], []
    cu = [0]
    for i, tr in enumerate(trajectories):
        p, r = len(tr.prompt_ids), len(tr.response_ids)
        n = p + r
        ids.extend(tr.prompt_ids)
        ids.extend(tr.response_ids)
        pos.extend(range(n))
        tgt.extend(tr.prompt_ids[1:])
        tgt.extend(tr.response_ids)
        tgt.append(0)
        resp_mask = tr.response_mask if tr.response_mask is not None else [True] * r
        # positions p-1 .. p+r-2 predict the response tokens
        mask.extend([False] * (p - 1))
        mask.extend(resp_mask)
        mask.append(False)
        old.extend([0.0] * (p - 1))
        old.extend(tr.rollout_logprobs)
        old.append(0.0)
        adv.extend([0.0] * (p - 1))
        adv.extend([tr.advantage] * r)
        adv.append(0.0)
        seq.extend([i] * n)
        cu.append(cu[-1] + n)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        targets=torch.tensor(tgt, dtype=torch.long),
        loss_mask=torch.tensor(mask, dtype=torch.bool),
        old_logprobs=torch.tensor(old, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        seq_index=torch.tensor(seq, dtype=torch.long),
        routed_experts=_pack_routing(trajectories),
    )


def _pack_routing(trajectories: Sequence[Trajectory]) -> torch.Tensor | None:
    """The trajectories' routing records end to end; None when none has one. A trajectory
    without a record (an aborted request, say) gets -1 rows: the trainer routes it live."""
    shapes = {tuple(t.routed_experts.shape[1:]) for t in trajectories if t.routed_experts is not None}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise ValueError(f"pack(): trajectories' routed_experts disagree in [moe_layers, top_k]: {sorted(shapes)}")
    shape = shapes.pop()
    return torch.cat([
        t.routed_experts.to(torch.int16) if t.routed_experts is not None
        else torch.full((t.num_tokens, *shape), -1, dtype=torch.int16)
        for t in trajectories
    ])
