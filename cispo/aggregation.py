"""How per-token losses are summed into one number for a whole step.

Every mode is written as a per-token weight whose normaliser counts the *whole
step's* batch (all micro-batches on all data-parallel ranks). The loss of a shard
is then sum(weight * per_token_loss) over that shard's tokens, and adding the shard
losses gives exactly the full-batch loss — and the full-batch gradient — however the
batch was split. (Averaging per-micro-batch means instead would weight a token by
the size of the micro-batch it happened to land in.)
"""

from __future__ import annotations

import torch

from cispo.config import LOSS_AGG_MODES


def token_weights(
    loss_mask: torch.Tensor,
    seq_index: torch.Tensor,
    mode: str,
    global_num_tokens: int,
    global_num_seqs: int,
) -> torch.Tensor:
    """Weight of each token in the step's loss.

    token_mean:           1 / (response tokens in the step)          (CISPO, DAPO)
    seq_mean_token_mean:  1 / (|o_i| * sequences in the step)       (GRPO as published)

    `seq_index` must index sequences that lie whole inside this shard (the trainer
    never splits one sequence across micro-batches).
    """
    mask = loss_mask.to(torch.float64)
    if mode == "token_mean":
        if global_num_tokens <= 0:
            return torch.zeros_like(mask, dtype=torch.float32)
        return (mask / global_num_tokens).to(torch.float32)
    if mode == "seq_mean_token_mean":
        if global_num_seqs <= 0:
            return torch.zeros_like(mask, dtype=torch.float32)
        n = int(seq_index.max()) + 1 if seq_index.numel() else 0
        lengths = torch.zeros(n, dtype=torch.float64, device=mask.device).index_add_(0, seq_index, mask)
        per_tok_len = lengths[seq_index].clamp_min(1.0)
        return (mask / (per_tok_len * global_num_seqs)).to(torch.float32)
    raise ValueError(f"loss aggregation mode {mode!r} is unknown; allowed: {', '.join(LOSS_AGG_MODES)}")


def count_loss_seqs(loss_mask: torch.Tensor, seq_index: torch.Tensor) -> int:
    """Sequences with at least one trained token (the seq_mean normaliser's count)."""
    if seq_index.numel() == 0:
        return 0
    return int(torch.unique(seq_index[loss_mask]).numel())
