"""A rollout engine whose process dies (SIGKILL, by its own hand) as it starts: on the first
start of each engine slot, or on every start with CISPO_CRASH_ALWAYS=1. Markers of the
starts so far live in the folder named by CISPO_CRASH_DIR. Used to test start-up retries
(rollout.max_restarts) with a real dead process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from rollout.engine import RolloutEngine


class CrashingEngine(RolloutEngine):
    def __init__(self, model_path, config=None, dtype="bfloat16", engine_index=0, *args, **kwargs):
        marker = Path(os.environ["CISPO_CRASH_DIR"]) / f"started-{engine_index}"
        crash = os.environ.get("CISPO_CRASH_ALWAYS") == "1" or not marker.exists()
        marker.touch()
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)
        super().__init__(model_path, config, dtype, engine_index, *args, **kwargs)
