"""M1's staged generation budget and the evaluation's pass@k, without a cluster."""

from __future__ import annotations

import itertools
import random

import pytest

from cispo.batch import Trajectory
from cispo.config import AlgorithmConfig, ConfigError, LengthScheduleConfig, RolloutConfig
from launch.batching import shape_rewards
from launch.evaluation import pass_at_k
from launch.length_schedule import LengthSchedule, slope


def schedule(**kw) -> LengthSchedule:
    ls = dict(stages=[4, 8, 16], p99_frac=0.75, patience=2, window=3, max_slope=0.05)
    ls.update(kw)
    return LengthSchedule(RolloutConfig(max_new_tokens=16, length_schedule=LengthScheduleConfig(**ls)))


def step(p99: float, reward: float = 0.5, entropy: float = 1.0) -> dict[str, float]:
    return {"rollout/response_len_p99": p99, "reward/mean": reward, "train/entropy": entropy}


def test_pass_at_k_equals_counting_all_k_subsets():
    seed = 7
    rng = random.Random(seed)
    print("seed", seed)
    for _ in range(30):
        n = rng.randint(1, 8)
        outcomes = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            want = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, sum(outcomes), k) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_slope_is_the_least_squares_fit():
    import numpy as np

    ys = [0.3, 0.1, 0.7, 0.4, 0.9]
    assert slope(ys) == pytest.approx(np.polyfit(range(5), ys, 1)[0])
    assert slope([1.0]) == 0.0


def test_stage_moves_only_when_p99_presses_for_patience_steps_and_the_policy_settled():
    s = schedule()
    assert s.limit == 4
    # p99 at the limit but too few steps to judge the slope (window 3): stays
    s.observe(0, step(4))
    s.observe(1, step(4))
    assert s.limit == 4
    out = s.observe(2, step(4))  # 3 flat points, p99 >= 0.75 x 4 for 3 >= 2 steps
    assert out["rollout/max_new_tokens"] == 4 and out["rollout/length_stage_change"] == 1 and s.limit == 8
    # at 8: reward still rising fast -> not settled, however long p99 stays at the limit
    for i, r in enumerate([0.1, 0.3, 0.5, 0.7, 0.9]):
        s.observe(3 + i, step(8, reward=r))
    assert s.limit == 8
    # settled now, but p99 dropped below 0.75 x 8 = 6: the patience count restarts
    s.observe(8, step(5, reward=0.9))
    s.observe(9, step(8, reward=0.9))
    assert s.limit == 8
    s.observe(10, step(8, reward=0.9))
    assert s.limit == 16
    for i in range(5):  # the last stage holds
        assert "rollout/length_stage_change" not in s.observe(11 + i, step(16))
    assert s.limit == 16 and s.stage == 2


def test_entropy_must_settle_too_and_state_round_trips():
    s = schedule()
    for i, e in enumerate([2.0, 1.5, 1.0]):
        s.observe(i, step(4, entropy=e))
    assert s.limit == 4  # entropy falling 0.5 per step
    saved = s.state_dict()
    t = schedule()
    t.load_state_dict(saved)
    assert t.state_dict() == saved
    other = schedule(stages=[4, 16])
    other.load_state_dict(saved)  # saved for other stages: start over, with a warning
    assert other.stage == 0 and other.history == {"reward/mean": [], "train/entropy": []}


def test_no_stages_means_the_fixed_budget():
    s = LengthSchedule(RolloutConfig(max_new_tokens=12))
    for i in range(10):
        s.observe(i, step(12))
    assert s.limit == 12


def test_overlong_mask_at_the_current_stage_limit():
    s = schedule()
    cut = Trajectory([1], [5] * s.limit, [-0.1] * s.limit, "length", policy_version=0, group_id=0, reward=1.0)
    done = Trajectory([1], [5] * 2, [-0.1] * 2, "stop", policy_version=0, group_id=0, reward=1.0)
    shape_rewards([cut, done], AlgorithmConfig(overlong="mask"), s.limit)
    assert cut.response_mask == [False] * 4 and done.response_mask is None
    pen = [Trajectory([1], [5] * 4, [-0.1] * 4, "length", policy_version=0, group_id=0, reward=1.0)]
    shape_rewards(pen, AlgorithmConfig(overlong="penalty", overlong_buffer=2), s.limit)
    assert pen[0].reward == pytest.approx(0.0)  # at the 4-token stage 4 tokens is the full penalty


@pytest.mark.parametrize("override, key", [
    ("rollout.length_schedule.stages=[4,4]", "rollout.length_schedule.stages"),
    ("rollout.length_schedule.stages=[4,64]", "rollout.length_schedule.stages"),
    ("rollout.length_schedule.p99_frac=0", "rollout.length_schedule.p99_frac"),
    ("model.lora.rank=-1", "model.lora.rank"),
    ("model.lora.rank=8 model.lora.target_modules=[q_proj,lm_head]", "model.lora.target_modules"),
    ("eval.samples=0", "eval.samples"),
    ("eval.max_new_tokens=99", "eval.max_new_tokens"),
])
def test_bad_settings_name_their_key(override, key):
    from launch.config import compose_config

    with pytest.raises(ConfigError) as err:
        compose_config([*override.split(), "rollout.max_new_tokens=8"])
    assert err.value.key == key
