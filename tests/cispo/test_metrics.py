import math

import pytest
import torch

from cispo.metrics import accumulate_stats, finalize_stats, merge_stats, mismatch_metrics, stats_to_floats


def test_mismatch_metrics_match_float64_formulas():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    roll = -torch.rand(200, generator=g, dtype=torch.float64) * 3
    train = roll + torch.randn(200, generator=g, dtype=torch.float64) * 0.05
    mask = torch.rand(200, generator=g) > 0.3
    m = mismatch_metrics(train, roll, mask)
    t, r = train[mask], roll[mask]
    pt, pr = t.exp().numpy(), r.exp().numpy()
    mt, mr = pt.mean(), pr.mean()
    pearson = ((pt - mt) * (pr - mr)).sum() / math.sqrt(((pt - mt) ** 2).sum() * ((pr - mr) ** 2).sum())
    k3 = [math.exp(a - b) - 1 - (a - b) for a, b in zip(t.tolist(), r.tolist())]
    assert m["pearson"] == pytest.approx(pearson, rel=1e-9)
    assert m["abs_logp_diff"] == pytest.approx((t - r).abs().mean().item(), rel=1e-9)
    assert m["kl_k3"] == pytest.approx(sum(k3) / len(k3), rel=1e-9)
    assert m["kl_k3"] >= 0


def test_identical_policies_have_no_mismatch():
    lp = -torch.rand(50) * 2
    m = mismatch_metrics(lp, lp.clone(), torch.ones(50, dtype=torch.bool))
    assert m["pearson"] == pytest.approx(1.0) and m["abs_logp_diff"] == 0 and m["kl_k3"] == 0


def test_merged_shard_stats_equal_whole_batch_stats():
    acc = {}
    merge_stats(acc, {"token_count": 3, "is_weight_sum": 3.3, "is_weight_max": 1.5, "clip_high_count": 1, "clip_low_count": 0,
                      "grad_dropped_count": 1})
    merge_stats(acc, {"token_count": 1, "is_weight_sum": 0.7, "is_weight_max": 0.7, "clip_high_count": 0, "clip_low_count": 1,
                      "grad_dropped_count": 0})
    out = finalize_stats(acc)
    assert out == pytest.approx({"is_weight_mean": 1.0, "is_weight_max": 1.5, "clip_frac_high": 0.25, "clip_frac_low": 0.25,
                                 "grad_dropped_frac": 0.25})


def test_stats_accumulated_on_device_equal_merged_floats():
    """The trainer accumulates per-micro-batch stats as tensors (no host sync per micro-batch);
    the result must be the very floats merge_stats gives (same float64 additions, same max)."""
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    floats, tensors = {}, {}
    for _ in range(7):
        shard = {"token_count": torch.rand((), generator=g) * 100, "is_weight_sum": torch.rand((), generator=g) * 37,
                 "is_weight_max": torch.rand((), generator=g) * 3, "loss": torch.randn((), generator=g) / 3}
        merge_stats(floats, shard)
        accumulate_stats(tensors, shard)
    assert stats_to_floats(tensors) == floats, f"seed {seed}"
