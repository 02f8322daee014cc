import pytest
import torch

from cispo.advantages import group_advantages, zero_variance_groups
from cispo.shaping import overlong_penalty


def test_group_advantages_match_float64_reference():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    groups = torch.arange(5).repeat_interleave(8)[torch.randperm(40, generator=g)]
    rewards = torch.rand(40, generator=g)
    adv = group_advantages(rewards, groups)
    for k in range(5):
        r = rewards[groups == k].double()
        ref = (r - r.mean()) / r.std()
        torch.testing.assert_close(adv[groups == k].double(), ref, rtol=1e-5, atol=1e-6)
    no_std = group_advantages(rewards, groups, normalize_std=False)
    for k in range(5):
        r = rewards[groups == k].double()
        torch.testing.assert_close(no_std[groups == k].double(), r - r.mean(), rtol=1e-5, atol=1e-6)


def test_zero_spread_group_gives_zero_not_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    for normalize in (True, False):
        adv = group_advantages(rewards, groups, normalize_std=normalize)
        assert torch.isfinite(adv).all()
        assert adv[[0, 1, 2, 5, 6, 7]].abs().max() == 0  # flat groups and a lone sample
        assert adv[3] < 0 < adv[4]
    assert zero_variance_groups(rewards, groups).tolist() == [True, True, True, False, False, True, True, True]


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def test_overlong_penalty_ramp():
    lengths = torch.tensor([10, 90, 95, 100])
    pen = overlong_penalty(lengths, max_len=100, buffer=10, penalty=1.0)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 100, 0), torch.tensor([0.0, 0.0, 0.0, -1.0]))
