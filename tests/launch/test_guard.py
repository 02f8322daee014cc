"""The collapse guard's rules on hand-made step metrics, and its config checks."""

import math

import pytest

from cispo.config import Config, ConfigError, GuardConfig
from cispo.config_checks import validate
from launch.driver import rollback_target
from launch.guard import CollapseGuard
from trainer.checkpoint import CheckpointDir


def step(reward=0.3, flat=0.2, signal=100.0, loss=0.1, grad=1.0, nonfinite=0.0):
    return {"reward/mean": reward, "rollout/flat_group_frac": flat, "rollout/signal_samples": signal,
            "train/loss": loss, "train/grad_norm": grad, "train/grad_norm_max": grad,
            "train/nonfinite_updates": nonfinite}


def feed(guard, rows, start=0):
    trips = []
    for i, m in enumerate(rows):
        _, _, trip = guard.observe(start + i, m)
        if trip:
            trips.append((start + i, trip))
    return trips


def test_collapse_trips_after_window_flat_steps_not_before():
    guard = CollapseGuard(GuardConfig(window=5, flat_group_frac=0.9))
    healthy = [step(reward=0.2 + 0.01 * i) for i in range(10)]
    assert feed(guard, healthy) == []
    collapsed = [step(reward=0.0, flat=1.0, signal=0) for _ in range(5)]
    trips = feed(guard, collapsed, start=10)
    assert len(trips) == 1  # exactly at the 5th flat step
    at, trip = trips[0]
    assert at == 14 and trip.kind == "collapse" and trip.since_step == 10
    assert "100% of groups had zero reward spread for 5 steps" in trip.message


def test_an_interrupted_streak_starts_over():
    guard = CollapseGuard(GuardConfig(window=4))
    rows = [step(flat=1.0, reward=0.0)] * 3 + [step()] + [step(flat=1.0, reward=0.0)] * 3
    assert feed(guard, rows) == []


def test_flat_at_about_the_best_reward_is_converged_not_collapse():
    """A deterministic policy at 0.81 whose best 5-step mean was 0.85 has converged (seen in a
    default run); one that fell to 0.4 from 0.58 has collapsed."""
    guard = CollapseGuard(GuardConfig(window=3, action="rollback"))
    feed(guard, [step(reward=r) for r in (0.6, 0.9, 0.8, 0.9, 0.85, 0.8)])  # best 5-step mean 0.85
    trips = feed(guard, [step(reward=0.81, flat=1.0, signal=0)] * 3, start=6)
    assert trips[0][1].kind == "converged" and "converged" in trips[0][1].message
    assert guard.decide(trips[0][1]) == "stop"  # never a rollback away from a converged policy

    guard = CollapseGuard(GuardConfig(window=5))
    feed(guard, [step(reward=r) for r in (0.5, 0.6, 0.6, 0.55, 0.6, 0.58)])
    trips = feed(guard, [step(reward=0.4, flat=1.0, signal=0)] * 5, start=6)
    assert trips[0][1].kind == "collapse" and "well below the run's best" in trips[0][1].message


def test_no_signal_without_dynamic_sampling():
    # flat groups kept (not dropped) still carry no signal: caught by the signal count
    guard = CollapseGuard(GuardConfig(window=3, flat_group_frac=1.0))
    trips = feed(guard, [step(flat=0.99, signal=0)] * 3)
    assert trips and trips[0][1].kind == "no_signal"


def test_nonfinite_is_warned_each_time_and_trips_after_n_in_a_row():
    guard = CollapseGuard(GuardConfig(max_nonfinite_steps=2))
    metrics, warnings, trip = guard.observe(0, step(loss=math.nan))
    assert trip is None and len(warnings) == 1 and "train/loss" in warnings[0]
    assert metrics["guard/nonfinite_streak"] == 1
    _, warnings, trip = guard.observe(1, step(nonfinite=1.0))
    assert "train/nonfinite_updates=1" in warnings[0]
    assert trip is not None and trip.kind == "nonfinite" and trip.since_step == 0


def test_decisions_follow_the_action_and_the_rollback_budget():
    trip = feed(CollapseGuard(GuardConfig(window=1)), [step(flat=1.0, reward=0.0)])[0][1]
    assert CollapseGuard(GuardConfig(action="warn")).decide(trip) == "warn"
    assert CollapseGuard(GuardConfig(action="stop")).decide(trip) == "stop"
    guard = CollapseGuard(GuardConfig(action="rollback", max_rollbacks=1))
    assert guard.decide(trip) == "rollback"
    guard.rollbacks = 1
    assert guard.decide(trip) == "stop"


def test_rollback_target_is_the_newest_checkpoint_from_before_the_symptoms(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=5)
    for s in (5, 10, 15):
        ckpt.commit(ckpt.begin(s))
    assert rollback_target(ckpt, since_step=12).name == "step_00000010"
    assert rollback_target(ckpt, since_step=10).name == "step_00000010"  # state after 10 steps = before step 10
    assert rollback_target(ckpt, since_step=4) is None


@pytest.mark.parametrize("change, key", [
    (dict(action="rollback"), "guard.action"),  # no trainer.save_every
    (dict(action="explode"), "guard.action"),
    (dict(window=0), "guard.window"),
    (dict(flat_group_frac=0.0), "guard.flat_group_frac"),
    (dict(rollback_lr_factor=2.0), "guard.rollback_lr_factor"),
])
def test_guard_config_errors_name_the_key(change, key):
    cfg = Config()
    for k, v in change.items():
        setattr(cfg.guard, k, v)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key


def test_rollback_needs_enough_kept_checkpoints():
    cfg = Config()
    cfg.guard.action, cfg.guard.window = "rollback", 10
    cfg.trainer.save_every, cfg.trainer.keep_checkpoints = 5, 2
    with pytest.raises(ConfigError, match="keep >= 3") as err:
        validate(cfg)
    assert err.value.key == "trainer.keep_checkpoints"
    cfg.trainer.keep_checkpoints = 3
    validate(cfg)
