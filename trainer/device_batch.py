"""A micro-batch laid out on the device before an update's loop, with everything that needs
the host (which positions carry a loss, the token weights, the longest sequence) computed
from the CPU copy. The loop then issues no host sync: the GPU runs while Python queues the
next micro-batch (a copy from pageable host memory, a `.nonzero()` or a `float()` in the
loop would each wait for the GPU to drain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cispo.aggregation import token_weights
from cispo.batch import PackedBatch
from trainer.policy import loss_positions


@dataclass
class DeviceMicroBatch:
    input_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [T]
    cu_seqlens: torch.Tensor  # [n+1] int32
    max_seqlen: int
    positions: torch.Tensor  # [m] where log-probs are taken (see trainer.policy.loss_positions)
    targets: torch.Tensor  # [m]
    old_logprobs: torch.Tensor  # [m]
    advantages: torch.Tensor  # [m]
    mask: torch.Tensor  # [m] bool: trained positions among `positions`
    weights: torch.Tensor | None  # [m] the update's token weights (None when not training)
    mask_cpu: torch.Tensor  # [m] bool, the same on the host
    positions_cpu: torch.Tensor  # [m]
    num_tokens: int
    num_loss_tokens: int  # trained positions (a host int)
    routed_experts: torch.Tensor | None = None  # [T, moe_layers, top_k]: the rollout's routing (MoE replay)

    def model_inputs(self) -> tuple:
        return self.input_ids, self.position_ids, self.positions, self.targets


def to_device(mb: PackedBatch, device, loss_agg: str | None = None, num_loss_tokens: int = 0,
              num_loss_seqs: int = 0) -> DeviceMicroBatch:
    """`mb` on the host; with `loss_agg`, also the token weights of the update's loss."""
    mb = mb.to("cpu")
    pos = loss_positions(mb.loss_mask)
    weights = None
    if loss_agg is not None:
        weights = token_weights(mb.loss_mask, mb.seq_index, loss_agg, num_loss_tokens, num_loss_seqs)[pos]
        if mb.behaviour_weights is not None:  # the behaviour-policy correction (cispo.offpolicy) scales each token
            weights = weights * mb.behaviour_weights[pos]
        weights = weights.to(device)
    mask = mb.loss_mask[pos]
    return DeviceMicroBatch(
        input_ids=mb.input_ids.to(device), position_ids=mb.position_ids.to(device),
        cu_seqlens=mb.cu_seqlens.to(device=device, dtype=torch.int32),
        max_seqlen=int(mb.seq_lengths().max()), positions=pos.to(device), targets=mb.targets[pos].to(device),
        old_logprobs=mb.old_logprobs[pos].to(device), advantages=mb.advantages[pos].to(device),
        mask=mask.to(device), weights=weights, mask_cpu=mask, positions_cpu=pos, num_tokens=mb.num_tokens,
        num_loss_tokens=int(mask.sum()),
        routed_experts=None if mb.routed_experts is None else mb.routed_experts.to(device),
    )
