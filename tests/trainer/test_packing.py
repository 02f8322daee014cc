"""Packed micro-batches give the same log-probs, loss and gradient as padded batches and
as each sequence run alone; the planner deals whole sequences with equal counts per rank."""

from __future__ import annotations

import pytest
import torch

from cispo.aggregation import count_loss_seqs, token_weights
from cispo.batch import pack
from cispo.objectives import policy_loss, resolve_algorithm
from tests.trainer.helpers import random_trajectories
from trainer.packing import minibatches, plan_micro_batches, select_sequences
from trainer.policy import PolicyModel, load_hf_causal_lm, loss_positions

TEMPERATURE = 0.8
ALG = resolve_algorithm("cispo")


def _trajs(vocab):
    trajs = random_trajectories(6, vocab=vocab, seed=7)
    g = torch.Generator().manual_seed(3)
    for t in trajs:  # log-probs around a typical value so that IS ratios vary
        t.rollout_logprobs = (-4.0 + torch.randn(len(t.response_ids), generator=g)).tolist()
    return trajs


def _packed_loss(policy, batch, num_tokens, num_seqs):
    """As the trainer calls the policy: with the sequences' bounds (trainer/attention.py)."""
    pos = loss_positions(batch.loss_mask)
    lp, _ = policy(batch.input_ids, batch.position_ids, pos, batch.targets[pos], TEMPERATURE,
                   cu_seqlens=batch.cu_seqlens, max_seqlen=int(batch.seq_lengths().max()))
    w = token_weights(batch.loss_mask, batch.seq_index, ALG.loss_agg, num_tokens, num_seqs)[pos]
    out = policy_loss(ALG, lp, batch.old_logprobs[pos], batch.advantages[pos], w, batch.loss_mask[pos])
    full = torch.zeros(batch.num_tokens)
    full[pos] = lp.detach()
    return out.loss, full


def _alone(policy, batch, num_tokens, num_seqs):
    """Each sequence on its own, losses summed (global normaliser)."""
    total, full = 0.0, torch.zeros(batch.num_tokens)
    cu = batch.cu_seqlens.tolist()
    for s in range(batch.num_seqs):
        loss, lp = _packed_loss(policy, select_sequences(batch, [s]), num_tokens, num_seqs)
        total = total + loss
        full[cu[s]: cu[s + 1]] = lp
    return total, full


def _padded_loss(policy, batch, num_tokens, num_seqs):
    """Right-padded [n, Lmax] batch with an attention mask, the classic layout."""
    lengths = batch.seq_lengths().tolist()
    n, lmax = len(lengths), max(lengths)
    ids = torch.zeros(n, lmax, dtype=torch.long)
    am = torch.zeros(n, lmax, dtype=torch.long)
    cu = batch.cu_seqlens.tolist()
    for i in range(n):
        ids[i, : lengths[i]] = batch.input_ids[cu[i]: cu[i + 1]]
        am[i, : lengths[i]] = 1
    hidden = policy.hf.model(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
    rows = torch.cat([hidden[i, : lengths[i]] for i in range(n)])  # back to the packed order
    pos = loss_positions(batch.loss_mask)
    lp, _ = policy.hf.lm_head(rows[pos], batch.targets[pos], temperature=TEMPERATURE)
    w = token_weights(batch.loss_mask, batch.seq_index, ALG.loss_agg, num_tokens, num_seqs)[pos]
    out = policy_loss(ALG, lp, batch.old_logprobs[pos], batch.advantages[pos], w, batch.loss_mask[pos])
    full = torch.zeros(batch.num_tokens)
    full[pos] = lp.detach()
    return out.loss, full


def _grads(policy, loss_fn):
    policy.zero_grad()
    loss, lp = loss_fn()
    loss.backward()
    return float(loss.detach()), lp, {n: p.grad.clone() for n, p in policy.named_parameters()}


def _assert_grads_close(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded_equals_alone(tiny_model_path, attn):
    policy = PolicyModel(load_hf_causal_lm(tiny_model_path, attn), chunk_tokens=16)
    batch = pack(_trajs(policy.hf.config.vocab_size))
    n_tok, n_seq = batch.num_loss_tokens, count_loss_seqs(batch.loss_mask, batch.seq_index)

    packed = _grads(policy, lambda: _packed_loss(policy, batch, n_tok, n_seq))
    padded = _grads(policy, lambda: _padded_loss(policy, batch, n_tok, n_seq))

    single = _grads(policy, lambda: _alone(policy, batch, n_tok, n_seq))
    for other in (padded, single):
        assert other[0] == pytest.approx(packed[0], rel=1e-5)
        torch.testing.assert_close(other[1], packed[1], rtol=1e-5, atol=2e-5)
        _assert_grads_close(other[2], packed[2])


def test_the_packed_test_can_fail(tiny_model_path):
    """Negative control: with the KV cache on (the HF default), transformers ignores the
    position_ids restarts and attends across sequences; the tests above would see it."""
    policy = PolicyModel(load_hf_causal_lm(tiny_model_path), chunk_tokens=16)
    batch = pack(_trajs(policy.hf.config.vocab_size))
    with torch.no_grad():
        kw = dict(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None])
        isolated = policy.hf.model(**kw, use_cache=False).last_hidden_state
        leaky = policy.hf.model(**kw, use_cache=True).last_hidden_state
    assert (isolated - leaky).abs().max() > 1e-2


def test_micro_batched_gradient_equals_full_batch(tiny_model_path):
    """Summing micro-batch losses normalised by the global count = the full-batch loss."""
    policy = PolicyModel(load_hf_causal_lm(tiny_model_path), chunk_tokens=16)
    batch = pack(_trajs(policy.hf.config.vocab_size))
    n_tok, n_seq = batch.num_loss_tokens, count_loss_seqs(batch.loss_mask, batch.seq_index)
    full = _grads(policy, lambda: _packed_loss(policy, batch, n_tok, n_seq))

    plans, _ = plan_micro_batches(batch, list(range(batch.num_seqs)), num_ranks=2, micro_batch_tokens=32)
    assert sum(len(p) for p in plans) >= 4

    def split():
        total = 0.0
        for rank_mbs in plans:
            for mb in rank_mbs:
                total = total + _packed_loss(policy, mb, n_tok, n_seq)[0]
        return total, torch.zeros(1)

    micro = _grads(policy, split)
    assert micro[0] == pytest.approx(full[0], rel=1e-5)
    _assert_grads_close(micro[2], full[2])


def test_planner_deals_whole_sequences_evenly():
    trajs = random_trajectories(11, vocab=50, seed=5)
    batch = pack(trajs)
    lengths = batch.seq_lengths().tolist()
    budget = max(lengths) + 3
    plans, ids = plan_micro_batches(batch, list(range(11)), num_ranks=3, micro_batch_tokens=budget)
    assert len({len(p) for p in plans}) == 1  # same micro-batch count on every rank
    seen = sorted(s for rank_ids in ids for mb in rank_ids for s in mb)
    assert seen == list(range(11))  # every sequence exactly once
    for rank_mbs, rank_ids in zip(plans, ids):
        for mb, mb_ids in zip(rank_mbs, rank_ids):
            assert mb.num_tokens <= budget
            assert (mb.position_ids[mb.cu_seqlens[:-1].long()] == 0).all()
            if not mb_ids:  # a filler: nothing to train on
                assert not mb.loss_mask.any()
            else:
                assert mb.num_loss_tokens == sum(int(batch.loss_mask[batch.cu_seqlens[s]:batch.cu_seqlens[s + 1]].sum())
                                                 for s in mb_ids)
    loads = [sum(mb.num_tokens for mb, i in zip(p, r) if i) for p, r in zip(plans, ids)]
    assert max(loads) - min(loads) <= max(lengths)
    assert minibatches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert minibatches(3, 0) == [[0, 1, 2]]
