"""Ray start-up: attach to a running cluster when one is named, else start a local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("cispo")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Local runs need no token auth; a cluster's own setting wins where one is set.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runtime_env = {"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        log.info("attaching to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)
    log.info("Ray resources: %s", ray.cluster_resources())
