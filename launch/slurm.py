"""Slurm submission: `cispo-train cluster=slurm ...` writes an sbatch script and submits it.

    cispo-train cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 cluster.partition=gpu
    cispo-train cluster=slurm cluster.dry_run=true ...     # print the script, submit nothing

The script (from launch/templates/slurm_job.sh, saved as <output_dir>/slurm_job.sh) starts a
Ray head on the first node and one Ray worker per other node, waits for all of them, runs
`cispo-train` attached to that cluster with the user's overrides (cluster.kind=local,
cluster.address=<head>, a fixed absolute output_dir), and stops Ray at the end. A
time-limit warning (SIGUSR1) or a Slurm SIGTERM is forwarded to the driver as SIGTERM;
after the warning the script requeues the job, and the requeued job resumes from the
latest checkpoint in the same output_dir. See docs/slurm_launch.md.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

log = logging.getLogger("cispo")

TEMPLATE = Path(__file__).resolve().parent / "templates" / "slurm_job.sh"
REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT_NAME = "slurm_job.sh"

# Port layout; the job script computes the same from SLURM_JOB_ID at run time.
PORT_SLOTS = 50
# 20000-32499: above Ray's default worker ports (10002-19999, used by any other Ray on the
# node) and below Linux's ephemeral range (32768+).
SINGLE_PORT_BASE, SINGLE_PORTS_PER_SLOT = 20000, 10
WORKER_PORT_BASE, WORKER_PORTS_PER_SLOT = 20500, 240

# Overrides the job replaces: it attaches to its own Ray cluster and writes to one fixed folder.
_REPLACED_KEYS = {"cluster.kind", "cluster.address", "cluster.dry_run", "output_dir"}
_UNSAFE_PATH = re.compile(r"[\s'\"\\$`]")


def ray_ports(job_id: int) -> dict[str, Any]:
    """The Ray ports the job script uses for `job_id` (mirror of its shell arithmetic)."""
    slot = job_id % PORT_SLOTS
    base = SINGLE_PORT_BASE + SINGLE_PORTS_PER_SLOT * slot
    names = ("port", "node_manager", "object_manager", "client_server", "dashboard_agent_listen",
             "dashboard_agent_grpc", "metrics_export", "runtime_env_agent")
    ports: dict[str, Any] = {name: base + i for i, name in enumerate(names)}
    low = WORKER_PORT_BASE + WORKER_PORTS_PER_SLOT * slot
    ports["worker_range"] = (low, low + WORKER_PORTS_PER_SLOT - 1)
    return ports


def job_overrides(overrides: Sequence[str]) -> list[str]:
    """The user's overrides as the job's `cispo-train` gets them, before the script appends
    `cluster.kind=local cluster.address=<head> output_dir=<abs>` (and `resume=true` on a
    requeue). `cluster=slurm` itself stays, so the job's config still records the resources
    it was submitted with; only its kind changes."""
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in _REPLACED_KEYS:
            continue
        kept.append(item)
    return kept


def _setting(cfg: Any, key: str, default: Any) -> Any:
    """An optional cluster setting that the schema may not have (yet)."""
    value = OmegaConf.select(cfg, f"cluster.{key}", default=None) if OmegaConf.is_config(cfg) else getattr(cfg.cluster, key, None)
    return default if value is None else value


def _time(minutes: int) -> str:
    days, rest = divmod(int(minutes), 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00" if days else f"{hours}:{mins:02d}:00"


def _train_command() -> tuple[list[str], str]:
    """How the job starts `cispo-train`, and any export it needs for that."""
    beside = Path(sys.executable).parent / "cispo-train"
    found = str(beside) if beside.exists() else shutil.which("cispo-train")
    if found:
        return [found], ""
    # Not pip-installed: run the module from this checkout.
    return [sys.executable, "-m", "launch.main"], f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"


def _ray_command() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def output_dir_of(cfg: Any) -> Path:
    out = Path(os.path.expanduser(str(cfg.output_dir))).resolve()
    if _UNSAFE_PATH.search(str(out)):
        raise ValueError(f"output_dir={out!s} has spaces, quotes or shell characters; Slurm paths need a plain path")
    return out


def render_script(cfg: Any, overrides: Sequence[str], train_cmd: Optional[Sequence[str]] = None) -> str:
    """The sbatch script for this config and these command-line overrides."""
    c = cfg.cluster
    out = output_dir_of(cfg)
    minutes = int(c.time_minutes)
    gpus = int(c.gpus_per_node or 0)
    exclusive = bool(_setting(cfg, "exclusive", gpus > 0))  # GPU runs take whole nodes
    signal_s = int(_setting(cfg, "signal_seconds", max(60, min(300, minutes * 60 // 5))))
    name = str(_setting(cfg, "job_name", "cispo-" + out.name))
    lines = [
        f"--job-name={name}",
        f"--nodes={int(c.nodes)}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={int(c.cpus_per_node)}",
    ]
    if gpus:
        lines.append(f"--gpus-per-node={gpus}")
    if c.partition:
        lines.append(f"--partition={c.partition}")
    lines.append(f"--time={_time(minutes)}")
    if exclusive:
        lines += ["--exclusive", "--mem=0"]
    lines += [
        "--requeue",
        f"--signal=B:USR1@{signal_s}",
        "--open-mode=append",
        f"--output={out}/logs/slurm-%j.out",
        f"--chdir={Path.cwd()}",
    ]
    lines += [str(x) for x in _setting(cfg, "sbatch_args", [])]
    lines += shlex.split(os.environ.get("CISPO_SBATCH_ARGS", ""))
    exports = ""
    if train_cmd is None:
        train_cmd, exports = _train_command()
    values = {
        "sbatch_lines": "\n".join(f"#SBATCH {line}" for line in lines),
        "output_dir": shlex.quote(str(out)),
        "train_cmd": " ".join(shlex.quote(x) for x in train_cmd),
        "overrides": " ".join(shlex.quote(x) for x in job_overrides(overrides)),
        "ray": shlex.quote(_ray_command()),
        "python": shlex.quote(sys.executable),
        "join_timeout_s": str(int(_setting(cfg, "join_timeout_s", 300))),
        "max_requeues": str(int(_setting(cfg, "max_requeues", 20))),
        "exports": exports,
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{\w+\}\}", text)
    assert not leftover, f"unfilled template fields: {leftover}"
    return text


def _active_jobs(out: Path) -> list[str]:
    """Jobs submitted earlier for this run folder that Slurm still knows as pending/running."""
    try:
        ids = [line.split()[0] for line in (out / "slurm_jobs.txt").read_text().splitlines() if line.strip()]
    except OSError:
        return []
    active = []
    for job_id in ids:
        r = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", job_id], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.split()[:1] == [job_id] and not r.stdout.split()[1:2] == ["COMPLETING"]:
            active.append(job_id)
    return active


def submit(cfg: Any, overrides: Sequence[str], train_cmd: Optional[Sequence[str]] = None) -> Optional[str]:
    """Write <output_dir>/slurm_job.sh and submit it with sbatch; return the Slurm job id.

    With `cluster.dry_run=true` print the script (still saved, so `sbatch <path>` submits
    it later) and return None. `train_cmd` replaces the job's `cispo-train` (tests only).
    """
    out = output_dir_of(cfg)
    script = render_script(cfg, overrides, train_cmd)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / SCRIPT_NAME
    path.write_text(script)
    path.chmod(0o755)
    if cfg.cluster.dry_run:
        print(script, end="")
        print(f"# dry run: nothing submitted; saved as {path} (submit it with: sbatch {path})", flush=True)
        return None
    if not shutil.which("sbatch"):
        raise RuntimeError("sbatch not found: submit from a Slurm login node, or use cluster.dry_run=true")
    busy = _active_jobs(out)
    if busy:
        raise RuntimeError(f"{out} already belongs to Slurm job(s) {', '.join(busy)} (pending or running): two jobs "
                           f"would write the same checkpoints; scancel them or choose another output_dir")
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"sbatch {path} failed ({proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    with open(out / "slurm_jobs.txt", "a") as f:
        f.write(f"{job_id} {path}\n")
    print(f"submitted Slurm job {job_id}: script {path}, log {out}/logs/slurm-{job_id}.out, run folder {out}", flush=True)
    log.info("submitted Slurm job %s (%s)", job_id, path)
    return job_id
