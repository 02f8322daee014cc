"""The real thing: `cispo-train cluster=slurm ...` submits the embedded default run to a
local Slurm; the job starts Ray, runs the driver attached to it and ends COMPLETED; each
requeue (the script's own after the time-limit warning, then Slurm's preemption-style one)
resumes from the latest checkpoint in the same output_dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


STEPS = 8  # of the requeued run


def _cispo_train(cluster, out: Path, *extra: str) -> str:
    """Submit through the project's own entry point; return the Slurm job id."""
    exe = Path(sys.executable).with_name("cispo-train")
    cmd = [str(exe)] if exe.exists() else ([shutil.which("cispo-train")] if shutil.which("cispo-train")
                                           else [sys.executable, "-m", "launch.main"])
    args = [
        "cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=0", f"cluster.cpus_per_node={cluster.cpus}",
        f"cluster.partition={cluster.partition}", "cluster.time_minutes=30",
        # small settings: no warm-start stage, a small batch
        "warmup.steps=0", "data.rollout_batch_size=16", f"output_dir={out}", *extra,
        # eager engines: no vLLM compile at start-up (tests/launch/test_loop_e2e.py SMALL)
        "rollout.enforce_eager=true",
    ]
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, cwd=out.parent, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"submitted Slurm job (\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert (out / "slurm_job.sh").exists()
    return m.group(1)


def _metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [int(row["step"]) for row in map(json.loads, path.read_text().splitlines()) if "step" in row]


def _checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.is_dir()) if root.exists() else []


def _log(out: Path, job: str) -> str:
    path = out / "logs" / f"slurm-{job}.out"
    return path.read_text() if path.exists() else "(no job log)"


def _wait_while_live(slurm_cluster, job: str, out: Path, done, what: str, poll: float) -> None:
    """Poll until done() is truthy; fail if the job leaves the live states or 10 minutes pass."""
    deadline = time.time() + 600
    while not done():
        info = slurm_cluster.job(job)
        assert info.get("JobState") in {"PENDING", "RUNNING", "CONFIGURING"}, (info, Tail(_log(out, job)))
        assert time.time() < deadline, f"no {what} within 10 minutes"
        time.sleep(poll)


class Tail(str):
    """A job log that shows only its end in an assertion message."""

    def __repr__(self) -> str:
        return "...\n" + str(self)[-4000:]


def test_requeued_cispo_train_job_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    """One job, three attempts (one job instead of two in CI: each attempt starts Ray, the
    trainer and an engine):

    1. The driver's SIGTERM contract (docs/slurm_launch.md): Slurm's warning before the time
       limit (SIGUSR1 to the batch shell, as --signal=B:USR1@s sends it) -> the script sends
       SIGTERM to the driver -> the driver checkpoints the step it is in and exits 143 -> the
       script requeues the job. No periodic checkpoints (save_every=0): the only checkpoint is
       the one the signal made.
    2. The second attempt resumes from that step; then `scontrol requeue`, as preemption does:
       SIGTERM to every process of the job now (Ray's workers too, so the driver cannot
       checkpoint), SIGKILL after KillWait. The driver replaces no engine then and exits
       143 as soon as its step fails.
    3. The third attempt resumes from the latest checkpoint and completes the run: every step
       logged exactly once, in order."""
    out = tmp_path / "run"
    # 8 steps: each attempt is stopped a step or two in, so the last one runs ~6 steps (~4 s each)
    job = _cispo_train(slurm_cluster, out, f"steps={STEPS}", "trainer.save_every=0")
    _wait_while_live(slurm_cluster, job, out, lambda: _metrics_steps(out), "step", poll=0.3)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    slurm_cluster.release_requeued(job, restarts=1, timeout=300)
    saved = _checkpoints(out)
    steps_before = _metrics_steps(out)
    log = Tail(_log(out, job))
    assert "driver exited with 143" in log and saved, (
        "the driver did not checkpoint and exit 143 on SIGTERM (install its handler after ray.init: docs/slurm_launch.md)",
        saved, log)
    first_saved = max(saved)

    # attempt 1: resumed, then preempted once it has logged a step past the checkpoint
    def resumed_and_stepping():
        return f"resumed from checkpoint step {first_saved}" in _log(out, job) and \
            len(_metrics_steps(out)) > first_saved
    _wait_while_live(slurm_cluster, job, out, resumed_and_stepping, "resumed step", poll=0.3)
    slurm_cluster.run("scontrol", "requeue", job)  # SIGTERM now, SIGKILL after KillWait
    slurm_cluster.release_requeued(job, restarts=2)
    # the ending attempt's driver may still have saved the step it was in before SIGKILL, so
    # this is a lower bound of where the third attempt resumes
    saved = max(_checkpoints(out))
    steps_before = _metrics_steps(out)

    info = slurm_cluster.wait_state(job, DONE, timeout=600, poll=5)
    log = Tail(_log(out, job))
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log
    resumed = [int(m) for m in re.findall(r"resumed from checkpoint step (\d+)", log)]
    assert len(resumed) == 2 and resumed[0] == first_saved, log
    assert saved <= resumed[1] <= len(steps_before) + 1, (saved, resumed, steps_before, log)
    # every step exactly once, in order: none lost, and the rows an attempt logged past the
    # checkpoint it is resumed from were redone, not doubled
    steps = _metrics_steps(out)
    base = steps[0]  # the number of the first step (0 or 1)
    assert steps == list(range(base, base + STEPS)), (steps_before, steps, first_saved, log)
    assert max(_checkpoints(out)) == STEPS  # the final checkpoint
    assert log.count("SIGTERM from Slurm") >= 1 and "requeueing job" in log  # both kinds of requeue
    # the preempted attempt's driver exits 143 itself (its engines die with the job: not
    # replaced, the step fails, exit), not killed at KillWait: both attempts say so
    assert log.count("driver exited with 143") == 2, log
    assert "Ray cluster ready: 1 node(s)" in log and "attaching to the Ray cluster at" in log, log
    for attempt in (0, 1, 2):
        assert (out / "logs" / f"{job}.{attempt}" / f"ray-{slurm_cluster.node}" / "raylet.out").exists()
    assert not list(Path("/tmp").glob(f"cispo_ray_{job}_*"))
