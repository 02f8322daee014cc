"""`cispo-train`: the Hydra app. Runs the RL loop here, or submits it to Slurm.

    cispo-train                                   # the embedded default run
    cispo-train algorithm=grpo trainer.zero_stage=3 model.path=/models/qwen
    cispo-train cluster=slurm cluster.nodes=4 cluster.partition=gpu   # submit instead
    cispo-train --cfg job                         # print the resolved config
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from cispo.config import ConfigError
from cispo.config_checks import validate
from launch.config import CONF_DIR, register_schema

log = logging.getLogger("cispo")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigError as err:
        log.error("%s", err)
        sys.exit(2)
    if cfg.cluster.kind == "slurm":
        from hydra.core.hydra_config import HydraConfig

        from launch.slurm import submit

        try:
            submit(cfg, list(HydraConfig.get().overrides.task))
        except RuntimeError as err:  # sbatch refused, a run folder still busy, ...: one line, no traceback
            log.error("Slurm submission failed: %s", err)
            sys.exit(1)
        return
    from launch.driver import JobEnding, run
    from launch.placement import PlacementError

    try:
        run(cfg)
    except JobEnding as ending:
        logging.shutdown()  # flushes the run's log files; the metrics were flushed already
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ending.code)
    except (ConfigError, PlacementError) as err:  # found before or while starting: one line, no traceback
        log.error("%s", err)
        sys.exit(2)


def main() -> None:
    register_schema()
    _app()


if __name__ == "__main__":
    main()
