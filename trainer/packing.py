"""Cutting a rollout batch into ranks x micro-batches of whole sequences.

The step's batch arrives as one `cispo.batch.PackedBatch`. Every update takes a set
of sequences (a mini-batch), deals them to the data-parallel ranks so each gets about
the same number of tokens, and packs each rank's share into micro-batches of at most
`micro_batch_tokens` tokens (no padding: one packed row per micro-batch). A sequence
is never split, so `cispo.aggregation.token_weights` sees whole sequences.

All ranks must run the same number of micro-batches: under ZeRO-3 every forward
gathers parameters collectively, and ZeRO-2 reduces gradients in the backward. A rank
with fewer gets fillers: a real sequence with an all-False loss mask, whose loss and
gradient are exactly zero.
"""

from __future__ import annotations

import torch

from cispo.batch import PackedBatch


def token_index(batch: PackedBatch, seq_ids: list[int]) -> torch.Tensor:
    """Token positions (in `batch`) of the given sequences, in the given order."""
    cu = batch.cu_seqlens.tolist()
    if not seq_ids:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(cu[s], cu[s + 1]) for s in seq_ids])


def select_sequences(batch: PackedBatch, seq_ids: list[int]) -> PackedBatch:
    """A new packed batch holding the given sequences (renumbered 0..n-1)."""
    idx = token_index(batch, seq_ids)
    lengths = batch.seq_lengths()[torch.tensor(seq_ids, dtype=torch.long)]
    cu = torch.zeros(len(seq_ids) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return PackedBatch(
        input_ids=batch.input_ids[idx],
        position_ids=batch.position_ids[idx],
        cu_seqlens=cu,
        targets=batch.targets[idx],
        loss_mask=batch.loss_mask[idx],
        old_logprobs=batch.old_logprobs[idx],
        advantages=batch.advantages[idx],
        seq_index=torch.repeat_interleave(torch.arange(len(seq_ids)), lengths),
        behaviour_weights=None if batch.behaviour_weights is None else batch.behaviour_weights[idx],
        routed_experts=batch.routed_experts[idx] if batch.routed_experts is not None else None,
    )


def filler_micro_batch(batch: PackedBatch, seq_id: int) -> PackedBatch:
    """One real sequence with nothing to train on: zero loss, zero gradient."""
    mb = select_sequences(batch, [seq_id])
    mb.loss_mask = torch.zeros_like(mb.loss_mask)
    return mb


def split_across_ranks(lengths: list[int], seq_ids: list[int], num_ranks: int) -> list[list[int]]:
    """Longest-first onto the rank with the fewest tokens (balanced compute); each
    rank's list is kept in batch order so the result does not depend on ties' order."""
    loads = [0] * num_ranks
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    for s in sorted(seq_ids, key=lambda s: (-lengths[s], s)):
        r = min(range(num_ranks), key=lambda r: (loads[r], r))
        shares[r].append(s)
        loads[r] += lengths[s]
    return [sorted(share) for share in shares]


def pack_micro_batches(lengths: list[int], seq_ids: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing into bins of at most `budget` tokens (a sequence longer
    than the budget gets a bin of its own)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for s in sorted(seq_ids, key=lambda s: (-lengths[s], s)):
        for b in range(len(bins)):
            if loads[b] + lengths[s] <= budget:
                bins[b].append(s)
                loads[b] += lengths[s]
                break
        else:
            bins.append([s])
            loads.append(lengths[s])
    return [sorted(b) for b in bins]


def plan_micro_batches(
    batch: PackedBatch, seq_ids: list[int], num_ranks: int, micro_batch_tokens: int
) -> tuple[list[list[PackedBatch]], list[list[list[int]]]]:
    """For one pass over `seq_ids`: per rank, its micro-batches (every rank with the
    same count, fillers added), and each micro-batch's sequence ids in `batch` (empty
    for fillers) so per-token results can be put back in place."""
    lengths = batch.seq_lengths().tolist()
    per_rank = [pack_micro_batches(lengths, share, micro_batch_tokens)
                for share in split_across_ranks(lengths, seq_ids, num_ranks)]
    count = max(1, max(len(mbs) for mbs in per_rank))
    shortest = min(seq_ids, key=lambda s: (lengths[s], s))
    plans, ids = [], []
    for mbs in per_rank:
        plans.append([select_sequences(batch, m) for m in mbs]
                     + [filler_micro_batch(batch, shortest) for _ in range(count - len(mbs))])
        ids.append(mbs + [[] for _ in range(count - len(mbs))])
    return plans, ids


def minibatches(num_seqs: int, mini_batch_size: int) -> list[list[int]]:
    """Consecutive groups of `mini_batch_size` sequences (0 = all in one update)."""
    size = mini_batch_size or num_seqs
    return [list(range(s, min(s + size, num_seqs))) for s in range(0, num_seqs, size)]
