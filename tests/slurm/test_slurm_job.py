"""The generated job script under a real (local, single-node) Slurm, with a stand-in driver
that follows the driver's contract in seconds (tests/slurm/stand_in_driver.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.config import compose_config
from launch.slurm import submit

pytestmark = pytest.mark.slurm
STAND_IN = [sys.executable, str(Path(__file__).with_name("stand_in_driver.py"))]


def _overrides(cluster, out: Path, steps: int, nodes: int = 1) -> list[str]:
    return [
        "cluster=slurm", f"cluster.nodes={nodes}", "cluster.gpus_per_node=0", f"cluster.cpus_per_node={cluster.cpus}",
        f"cluster.partition={cluster.partition if nodes == 1 else cluster.pair_partition}", "cluster.time_minutes=15",
        f"steps={steps}", f"output_dir={out}",
    ]


def _submit(cluster, out: Path, steps: int, nodes: int = 1) -> str:
    overrides = _overrides(cluster, out, steps, nodes)
    return submit(compose_config(overrides), overrides, train_cmd=STAND_IN)


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ray_leftovers(job_id: str) -> str:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return "\n".join(line for line in ps.splitlines() if f"cispo_ray_{job_id}_" in line)


def _slurm_log(out: Path, job_id: str) -> str:
    return (out / "logs" / f"slurm-{job_id}.out").read_text()


def test_two_node_ray_cluster(slurm_cluster, tmp_path, monkeypatch):
    """A 2-node allocation (two slurmd on this machine): Ray head on the first node, a Ray
    worker started by srun on the second, both joined before the driver runs; both nodes'
    Ray logs end up in the job's log folder."""
    import socket

    def free() -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    # Both "nodes" are one machine here, so the worker's node-local ports must differ from
    # the head's (on real nodes the same numbers are fine): the documented override knob.
    monkeypatch.setenv("CISPO_RAY_WORKER_START_ARGS", " ".join([
        "--node-manager-port=0", "--object-manager-port=0", f"--dashboard-agent-listen-port={free()}",
        f"--dashboard-agent-grpc-port={free()}", f"--metrics-export-port={free()}",
        f"--runtime-env-agent-port={free()}", "--min-worker-port=32500", "--max-worker-port=32739"]))
    monkeypatch.setenv("STAND_IN_STEP_S", "0.2")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # the script's default: token auth, a per-job token
    out = tmp_path / "run"
    job = _submit(slurm_cluster, out, steps=2, nodes=2)
    info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=240)
    log = _slurm_log(out, job)
    assert info["JobState"] == "COMPLETED", log
    assert "Ray cluster ready: 2 node(s)" in log and "stand-in driver attached; nodes: 2" in log, log
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    argv = json.loads((out / "argv.jsonl").read_text().splitlines()[0])
    assert argv[:2] == ["cluster=slurm", "cluster.nodes=2"] and "cluster.kind=local" in argv and f"output_dir='{out}'" in argv
    token = out / "logs" / f".ray_auth_token_{job}"
    assert token.stat().st_mode & 0o077 == 0
    job_logs = out / "logs" / f"{job}.0"
    names = sorted(p.name for p in job_logs.iterdir())
    assert f"ray-head-{slurm_cluster.node}.out" in names and f"ray-worker-{slurm_cluster.node2}.out" in names, names
    assert (job_logs / f"ray-{slurm_cluster.node}" / "raylet.out").exists(), names
    assert (job_logs / f"ray-{slurm_cluster.node2}" / "raylet.out").exists(), names
    time.sleep(1)
    assert _ray_leftovers(job) == ""
    assert not list(Path("/tmp").glob(f"cispo_ray_{job}_*"))


# The time-limit contract with the real driver (SIGUSR1 -> SIGTERM -> checkpoint, exit 143 ->
# requeue -> resume): tests/slurm/test_cispo_train_slurm.py::test_requeued_cispo_train_job_resumes_from_its_checkpoint

