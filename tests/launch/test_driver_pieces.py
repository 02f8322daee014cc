"""The driver's own pieces: batch building, checkpoint folders, metric sinks, report."""

import json

import pytest
import torch

from cispo.batch import Trajectory
from cispo.config import AlgorithmConfig
from launch.batching import assign_advantages, shape_rewards, split_groups
from launch.loggers import MetricLogger
from launch.report import plot_curves, read_metrics, summary_table
from trainer.checkpoint import CheckpointDir


def traj(group, reward, n=3, finish="stop"):
    return Trajectory([1, 2], list(range(n)), [-0.1] * n, finish, policy_version=0, group_id=group, reward=reward)


def test_dynamic_sampling_drops_flat_groups_and_advantages_are_group_relative():
    trajs = [traj(0, 1.0), traj(0, 1.0), traj(1, 0.0), traj(1, 1.0), traj(2, 0.0), traj(2, 0.0)]
    f = split_groups(trajs, drop_flat=True)
    assert f.dropped == 2 and [t.group_id for g in f.kept for t in g] == [1, 1]
    kept = [t for g in f.kept for t in g]
    assign_advantages(kept, AlgorithmConfig())
    assert kept[0].advantage < 0 < kept[1].advantage
    assert split_groups(trajs, drop_flat=False).dropped == 0


def test_overlong_mask_and_penalty():
    a = [traj(0, 1.0, n=8, finish="length"), traj(0, 1.0, n=2)]
    shape_rewards(a, AlgorithmConfig(overlong="mask"), max_new_tokens=8)
    assert a[0].response_mask == [False] * 8 and a[1].response_mask is None
    b = [traj(0, 1.0, n=8, finish="length"), traj(0, 1.0, n=7), traj(0, 1.0, n=2)]
    shape_rewards(b, AlgorithmConfig(overlong="penalty", overlong_buffer=2, overlong_penalty=1.0), max_new_tokens=8)
    assert [t.reward for t in b] == pytest.approx([0.0, 0.5, 1.0])


def test_checkpoint_dir_commits_atomically_and_keeps_the_newest(tmp_path):
    ck = CheckpointDir(tmp_path / "ck", keep=2)
    assert ck.latest() is None
    for step in (1, 2, 3):
        f = ck.begin(step)
        (f / "x").write_text(str(step))
        ck.commit(f)
    ck.begin(4)  # a save interrupted before commit is never taken as a checkpoint
    (tmp_path / "ck" / ".step_00000001.deleting").mkdir()  # a prune cut short: not a checkpoint either
    assert [s for s, _ in ck.completed()] == [2, 3]
    assert ck.latest().name == "step_00000003" and (ck.latest() / "x").read_text() == "3"
    f = ck.begin(4)
    ck.commit(f)
    assert [s for s, _ in ck.completed()] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_00000003", "step_00000004"]
    assert CheckpointDir(tmp_path / "ck", keep=0).prune() == []  # keep <= 0: keep all


def test_metric_logger_writes_jsonl_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: offline, never a login prompt
    lg = MetricLogger(["console", "jsonl", "tensorboard", "wandb"], tmp_path / "run", config={"a": 1})
    for step in range(3):
        lg.log(step, {"reward/mean": 0.1 * step, "train/entropy": 1.0, "rollout/response_len_mean": 3.0,
                      "mismatch/abs_logp_diff": 0.01})
    lg.log_samples(0, [{"prompt": "1+1=", "response": "2", "reward": 1.0}])
    lg.finish()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["reward/mean"] == pytest.approx(0.2)
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    assert (tmp_path / "run" / "wandb_run_id").read_text()
    assert any((tmp_path / "run" / "wandb").glob("offline-run-*"))
    # a resumed run keeps the wandb id
    first_id = (tmp_path / "run" / "wandb_run_id").read_text()
    MetricLogger(["wandb"], tmp_path / "run").finish()
    assert (tmp_path / "run" / "wandb_run_id").read_text() == first_id
    png = plot_curves(rows, tmp_path / "c.png")
    assert png.stat().st_size > 1000
    assert summary_table(rows).row_count >= 3


def test_stop_flag_runs_its_hooks_once_at_the_first_sigterm():
    """The SIGTERM handler sets the flag and runs the hooks (RLSystem.stop_replacing) once;
    a hook added after the signal runs at once."""
    import os
    import signal

    from launch.driver import StopFlag

    before = signal.getsignal(signal.SIGTERM)
    try:
        calls = []
        stop = StopFlag()
        stop.when_requested(lambda: calls.append("early"))
        assert not stop.requested and calls == []
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the handler runs in this thread
        assert stop.requested and calls == ["early"]
        os.kill(os.getpid(), signal.SIGTERM)  # Slurm's and the job script's: the second changes nothing
        assert calls == ["early"]
        stop.when_requested(lambda: calls.append("late"))
        assert calls == ["early", "late"]
    finally:
        signal.signal(signal.SIGTERM, before)
