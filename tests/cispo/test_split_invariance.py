"""Splitting a step's batch into micro-batches and data-parallel ranks must not change
the loss or the gradient (the normaliser counts the whole step's batch)."""

import random

import pytest
import torch

from cispo.aggregation import count_loss_seqs, token_weights
from cispo.batch import Trajectory, pack
from cispo.objectives import policy_loss, resolve_algorithm

VOCAB = 23


def random_trajectories(rng: random.Random, n: int) -> list[Trajectory]:
    out = []
    for i in range(n):
        p, r = rng.randint(1, 7), rng.randint(0, 12)
        out.append(
            Trajectory(
                prompt_ids=[rng.randrange(VOCAB) for _ in range(p)],
                response_ids=[rng.randrange(VOCAB) for _ in range(r)],
                rollout_logprobs=[-rng.random() * 3 - 0.01 for _ in range(r)],
                finish_reason="stop",
                policy_version=0,
                group_id=i // 4,
                advantage=rng.gauss(0, 1),
                response_mask=[rng.random() > 0.1 for _ in range(r)],
            )
        )
    return out


class BigramPolicy(torch.nn.Module):
    """log pi(next | current token) — enough to give every position a gradient."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g, dtype=torch.float64))

    def forward(self, input_ids, targets):
        return torch.log_softmax(self.table[input_ids], -1).gather(1, targets[:, None]).squeeze(1)


def shard_loss(policy, algo, trajs, n_tokens, n_seqs):
    b = pack(trajs)
    w = token_weights(b.loss_mask, b.seq_index, algo.loss_agg, n_tokens, n_seqs).double()
    lp = policy(b.input_ids, b.targets)
    return policy_loss(algo, lp, b.old_logprobs.double(), b.advantages.double(), w, b.loss_mask).loss


@pytest.mark.parametrize("name", ["cispo", "grpo", "dapo"])
@pytest.mark.parametrize("ranks,micro", [(1, 3), (3, 1), (2, 4)])
def test_loss_and_grad_invariant_to_micro_batches_and_ranks(name, ranks, micro):
    seed = torch.seed() % 2**31
    rng = random.Random(seed)
    trajs = random_trajectories(rng, 24)
    algo = resolve_algorithm(name)
    full = pack(trajs)
    n_tokens, n_seqs = full.num_loss_tokens, count_loss_seqs(full.loss_mask, full.seq_index)

    policy = BigramPolicy(seed)
    full_loss = shard_loss(policy, algo, trajs, n_tokens, n_seqs)
    full_loss.backward()
    full_grad = policy.table.grad.clone()

    # each rank gets a contiguous slice of sequences, cut into uneven micro-batches
    per_rank = [trajs[r::ranks] for r in range(ranks)]
    total_loss, rank_grads = 0.0, []
    for shard in per_rank:
        policy.table.grad = None
        cuts = sorted(rng.sample(range(1, len(shard)), micro - 1)) if micro > 1 else []
        for lo, hi in zip([0] + cuts, cuts + [len(shard)]):
            loss = shard_loss(policy, algo, shard[lo:hi], n_tokens, n_seqs)
            loss.backward()  # gradients accumulate over micro-batches
            total_loss += loss.item()
        rank_grads.append(policy.table.grad.clone())
    all_reduced = torch.stack(rank_grads).sum(0)  # a SUM all-reduce over ranks

    assert total_loss == pytest.approx(full_loss.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(all_reduced, full_grad, rtol=1e-9, atol=1e-12)
    assert full_grad.abs().max() > 0


def test_token_mean_weights_sum_to_one_over_the_step():
    rng = random.Random(0)
    b = pack(random_trajectories(rng, 10))
    for mode in ("token_mean", "seq_mean_token_mean"):
        w = token_weights(b.loss_mask, b.seq_index, mode, b.num_loss_tokens, count_loss_seqs(b.loss_mask, b.seq_index))
        assert w.sum().item() == pytest.approx(1.0, rel=1e-5)
        assert (w[~b.loss_mask] == 0).all()
    with pytest.raises(ValueError, match="allowed: token_mean, seq_mean_token_mean"):
        token_weights(b.loss_mask, b.seq_index, "sum", 1, 1)
