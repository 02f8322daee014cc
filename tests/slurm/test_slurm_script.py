"""The sbatch script generation, without Slurm: resources, overrides, ports, dry run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import compose_config
from launch.slurm import job_overrides, ray_ports, render_script

REPO = Path(__file__).resolve().parents[2]
FOUR_BY_EIGHT = ["cluster=slurm", "cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.partition=gpu", "steps=100"]


def _script(overrides: list[str], out: Path) -> str:
    overrides = overrides + [f"output_dir={out}"]
    return render_script(compose_config(overrides), overrides)


def _bash(script_text: str, code: str, env: dict | None = None) -> str:
    return subprocess.run(["bash", "-c", code], input=script_text, capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})}).stdout


def test_sbatch_resources_for_4_nodes_x_8_gpus(tmp_path):
    text = _script(FOUR_BY_EIGHT, tmp_path / "run")
    sbatch = re.findall(r"^#SBATCH (\S+)$", text, flags=re.M)
    for line in ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64", "--partition=gpu",
                 "--time=4:00:00", "--exclusive", "--mem=0", "--requeue", "--signal=B:USR1@300", "--open-mode=append",
                 f"--output={tmp_path}/run/logs/slurm-%j.out", f"--chdir={Path.cwd()}"]:
        assert line in sbatch, (line, sbatch)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_cpu_job_has_no_gpu_or_exclusive_lines(tmp_path):
    text = _script(["cluster=slurm", "cluster.gpus_per_node=0", "cluster.cpus_per_node=2", "cluster.time_minutes=30"],
                   tmp_path / "run")
    sbatch = "\n".join(re.findall(r"^#SBATCH .*$", text, flags=re.M))
    assert "--gpus-per-node" not in sbatch and "--exclusive" not in sbatch and "--partition" not in sbatch
    assert "#SBATCH --time=0:30:00" in text and "#SBATCH --signal=B:USR1@300" in text


def test_overrides_are_rewritten_for_the_job():
    user = ["cluster=slurm", "cluster.nodes=4", "cluster.dry_run=true", "cluster.kind=slurm", "cluster.address=x:1",
            "output_dir=runs/a", "++output_dir=runs/b", "steps=2", "algorithm=grpo", "logger.run_name='my run $HOME'"]
    assert job_overrides(user) == ["cluster=slurm", "cluster.nodes=4", "steps=2", "algorithm=grpo",
                                   "logger.run_name='my run $HOME'"]


def test_script_passes_each_override_as_one_argument(tmp_path):
    user = FOUR_BY_EIGHT + ["logger.run_name='my run $HOME'", "algorithm=grpo"]
    text = _script(user, tmp_path / "run")
    got = _bash(text, 'eval "$(grep -E "^(OVERRIDES|TRAIN|OUTPUT_DIR)=" /dev/stdin)"; '
                      'printf "%s\\n" "${OVERRIDES[@]}" "--" "${TRAIN[@]}" "--" "$OUTPUT_DIR"').splitlines()
    assert got[: len(user) + 1] == user + ["--"]  # output_dir= is dropped; the script appends its own
    train = got[len(user) + 1: got.index("--", len(user) + 1)]
    assert train[-1].endswith("cispo-train") or train[-2:] == ["-m", "launch.main"]
    assert got[-1] == str(tmp_path / "run")
    # the job's fixed additions
    assert "cluster.kind=local \"cluster.address='$RAY_ADDRESS'\" \"output_dir='$OUTPUT_DIR'\"" in text
    assert "RESUME=(resume=true)" in text


def test_relative_output_dir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = _script(["cluster=slurm"], Path("runs/x"))
    assert f"OUTPUT_DIR={tmp_path}/runs/x " in text


def test_unsafe_output_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        _script(["cluster=slurm"], tmp_path / "a b")


@pytest.mark.parametrize("job_id", [1, 49, 50, 12345, 9999999])
def test_ports_from_the_job_id_match_the_script(tmp_path, job_id):
    text = _script(FOUR_BY_EIGHT, tmp_path / "run")
    block = text[text.index("SLOT=$(("): text.index("RAY_TMP=")]
    got = _bash(block, 'eval "$(cat)"; echo $RAY_PORT $NODE_MANAGER_PORT $OBJECT_MANAGER_PORT $CLIENT_SERVER_PORT '
                       '$DASHBOARD_AGENT_LISTEN_PORT $DASHBOARD_AGENT_GRPC_PORT $METRICS_EXPORT_PORT '
                       '$RUNTIME_ENV_AGENT_PORT $MIN_WORKER_PORT $MAX_WORKER_PORT',
                env={"SLURM_JOB_ID": str(job_id)}).split()
    p = ray_ports(job_id)
    want = [p["port"], p["node_manager"], p["object_manager"], p["client_server"], p["dashboard_agent_listen"],
            p["dashboard_agent_grpc"], p["metrics_export"], p["runtime_env_agent"], *p["worker_range"]]
    assert [int(x) for x in got] == want


def test_ports_differ_between_jobs_and_never_overlap():
    def used(job_id):
        p = ray_ports(job_id)
        lo, hi = p.pop("worker_range")
        return set(p.values()) | set(range(lo, hi + 1))

    assert ray_ports(1000)["port"] != ray_ports(1001)["port"]
    sets = [used(j) for j in range(7000, 7050)]  # 50 consecutive job ids: pairwise disjoint
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    assert max(max(s) for s in sets) < 32768  # below Linux's ephemeral port range
    assert min(min(s) for s in sets) >= 20000  # above Ray's default worker ports (10002-19999)


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `cispo-train` with a fake sbatch first on PATH that records its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "sbatch"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/sbatch_calls\necho 4242\n")
    fake.chmod(0o755)
    squeue = bindir / "squeue"  # job 4242 counts as running while the file `running` exists
    squeue.write_text(f"#!/bin/sh\n[ -e {tmp_path}/running ] && echo '4242 RUNNING'\nexit 0\n")
    squeue.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "launch.main", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


def test_dry_run_prints_and_does_not_submit(tmp_path):
    r = _cli(FOUR_BY_EIGHT + ["cluster.dry_run=true", "output_dir=runs/dry"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=4" in r.stdout and '"$RAY" start --head' in r.stdout
    assert not (tmp_path / "sbatch_calls").exists()
    saved = tmp_path / "runs" / "dry" / "slurm_job.sh"
    assert saved.read_text() in r.stdout


def test_submit_calls_sbatch_with_the_saved_script(tmp_path):
    r = _cli(FOUR_BY_EIGHT + ["output_dir=runs/sub"], tmp_path)
    assert r.returncode == 0, r.stderr
    script = tmp_path / "runs" / "sub" / "slurm_job.sh"
    assert (tmp_path / "sbatch_calls").read_text().split() == ["--parsable", str(script)]
    assert "submitted Slurm job 4242" in r.stdout
    assert (tmp_path / "runs" / "sub" / "logs").is_dir()  # sbatch --output needs it before the job starts
    assert (tmp_path / "runs" / "sub" / "slurm_jobs.txt").read_text().startswith("4242 ")


def test_second_submission_to_a_run_with_a_live_job_is_refused(tmp_path):
    assert _cli(FOUR_BY_EIGHT + ["output_dir=runs/sub"], tmp_path).returncode == 0
    (tmp_path / "running").touch()
    r = _cli(FOUR_BY_EIGHT + ["output_dir=runs/sub"], tmp_path)
    assert r.returncode != 0 and "already belongs to Slurm job(s) 4242" in r.stdout + r.stderr
    (tmp_path / "running").unlink()
    assert _cli(FOUR_BY_EIGHT + ["output_dir=runs/sub"], tmp_path).returncode == 0  # finished: resubmit resumes


@pytest.mark.parametrize("minutes,limit,warn", [(5, "0:05:00", 60), (30, "0:30:00", 300), (1500, "1-01:00:00", 300)])
def test_time_limit_and_warning(tmp_path, minutes, limit, warn):
    text = _script(["cluster=slurm", f"cluster.time_minutes={minutes}"], tmp_path / "run")
    assert f"#SBATCH --time={limit}\n" in text and f"#SBATCH --signal=B:USR1@{warn}\n" in text
