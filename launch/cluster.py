"""Ray start-up: attach to a running cluster when one is named, else start a local one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from launch.console import NOTICE, worker_runtime_env

log = logging.getLogger("cispo")
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def no_idle_workers() -> None:
    """Before a local Ray starts (its raylet inherits this environment): no idle workers
    prestarted for the first driver, one per CPU. Every actor here has a runtime env of its
    own, so none of them is ever used; they only cost start-up CPU, and one of them crashing
    inside Ray (absl "Mutex corrupt", seen once in CI) is noise in the run's output.
    slurm_job.sh does the same for `ray start`; the tests call this for their own clusters."""
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


def init_ray(address: str | None = None, num_cpus: int | None = None, log_dir: Path | None = None,
             verbose: bool = True) -> None:
    """verbose=False (with a log_dir): workers' output goes to files there (launch/console.py)
    instead of being forwarded to this console, and Ray's driver-side INFO lines are off."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Local runs need no token auth; a cluster's own setting wins where one is set.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    no_idle_workers()
    quiet = worker_runtime_env(log_dir, verbose)
    env_vars = {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "TOKENIZERS_PARALLELISM": "false",
                **quiet.get("env_vars", {})}
    if quiet:  # the setup hook imports launch.console in every worker process
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {**quiet, "env_vars": env_vars}
    common = dict(runtime_env=runtime_env, log_to_driver=not quiet,
                  logging_level=logging.WARNING if quiet else logging.INFO)
    if address:
        log.info("attaching to the Ray cluster at %s", address, extra=NOTICE)
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **common)
    log.info("Ray resources: %s", ray.cluster_resources())
