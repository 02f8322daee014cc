"""`cispo-train` with faults injected, for tests/launch/test_loop_e2e.py.

    python -m tests.launch.fault_driver FAULTS override [override ...]

FAULTS is "none" or a comma list of
    crash_train@K      training step K raises (an exception in the driver's loop)
    kill_generate@K    SIGKILL of rollout engine 1's process right after step K's prompts
                       were sent to the engines (its requests are in flight)
    kill_sync@K        SIGKILL of rollout engine 1's process right after the weight sync
                       that follows step K was sent (a dead peer in the sync group)
Kills are real: os.kill(pid, SIGKILL) with the pid from the engine's info().

After the run fails, the script checks that it left nothing running in Ray (every CPU
of the cluster free again: no actor, no placement group) and prints LEAK_CHECK ok or
what is left, then exits 3.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _install(faults: set[tuple[str, int]]) -> None:
    from launch.system import RLSystem
    from rollout.group import RolloutGroup

    calls = {"train": 0, "generate": 0}
    armed = {"generate": False, "sync": False}

    def kill_engine(group, i: int, why: str) -> None:
        pid = group.infos[i]["pid"]
        print(f"FAULT: SIGKILL rollout engine {i} (pid {pid}) {why}", flush=True)
        os.kill(pid, signal.SIGKILL)

    train, generate, collect, receive = RLSystem.train, RLSystem.generate, RolloutGroup.collect, RolloutGroup.receive_weights

    def patched_train(self, batch):
        k = calls["train"]
        calls["train"] += 1
        if ("crash_train", k) in faults:
            raise RuntimeError(f"injected failure in training step {k}")
        out = train(self, batch)
        armed["sync"] = ("kill_sync", k) in faults
        return out

    def patched_generate(self, items, group_ids, n, **overrides):
        armed["generate"] = ("kill_generate", calls["generate"]) in faults
        calls["generate"] += 1
        return generate(self, items, group_ids, n, **overrides)

    def patched_collect(self, refs, engines, what, timeout_s=None):
        if what == "generate" and armed["generate"]:
            armed["generate"] = False
            kill_engine(self, 1, "with its generate request in flight")
        return collect(self, refs, engines, what, timeout_s)

    def patched_receive(self, plan, version):
        refs = receive(self, plan, version)
        if armed["sync"]:
            armed["sync"] = False
            kill_engine(self, 1, "during the weight sync")
        return refs

    RLSystem.train, RLSystem.generate = patched_train, patched_generate
    RolloutGroup.collect, RolloutGroup.receive_weights = patched_collect, patched_receive


def _leak_check() -> str:
    import ray

    if not ray.is_initialized():
        return "ray is not running"
    total = ray.cluster_resources().get("CPU", 0.0)
    for _ in range(30):  # the GCS takes a moment to return what dead actors held
        free = ray.available_resources().get("CPU", 0.0)
        if free == total:
            return "ok"
        time.sleep(1)
    return f"{total - free} of {total} CPUs still held"


def main() -> None:
    spec, overrides = sys.argv[1], sys.argv[2:]
    faults = set()
    if spec != "none":
        for item in spec.split(","):
            kind, k = item.split("@")
            faults.add((kind, int(k)))
    _install(faults)
    from launch.cluster import init_ray
    from launch.config import compose_config
    from launch.driver import run

    init_ray(num_cpus=4)  # logical CPUs: a trainer rank and two engines on a 2-core machine

    try:
        run(compose_config(overrides))
    except Exception as err:  # noqa: BLE001 - the point is what the failure left behind
        print(f"RUN_FAILED {type(err).__name__}: {err}", flush=True)
        print(f"LEAK_CHECK {_leak_check()}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
