"""Trainer ranks and rollout engines that share GPUs take turns (placement.mode=colocate).

GPU g holds trainer rank g and engine g (launch.placement pins both into bundle g).
One step:

    generate          engines awake; the trainer's optimizer state is on CPU
    train             engines sleep (level 1: weights to CPU memory, KV cache freed),
                      the trainer reloads its state, steps, offloads it again
    sync              engines wake their weights only; each rank gathers the full
                      weights as flat GPU buckets and hands the engine on its GPU CUDA
                      IPC handles (no copy across processes, no NCCL group: two
                      processes on one GPU cannot form one); then the KV cache wakes

The freed and re-taken memory is measured on the device (all processes), and comes
back as metrics.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("cispo")

GIB = 2**30
SLEEP_LEVEL = 1  # weights kept in CPU memory: a wake without a sync still has the policy


class Colocated:
    def __init__(self, trainer, rollout, offload_optimizer: bool, bucket_mb: float):
        self.trainer = trainer
        self.rollout = rollout
        self.offload = offload_optimizer
        self.plan = trainer.weight_sync_plan(bucket_mb)
        self.asleep = False
        self.last_sync: dict[str, float] = {}
        self.last_memory: dict[str, float] = {}  # GiB freed by sleep, re-taken by each wake (least over GPUs)

    def train(self, batch) -> dict[str, float]:
        """Engines sleep, the trainer steps; returns the trainer's metrics plus the turn's
        costs (`train/colocate_*`)."""
        t0 = time.perf_counter()
        slept = self.rollout.sleep(SLEEP_LEVEL)
        self.asleep = True
        t1 = time.perf_counter()
        reload_s = self.trainer.reload_states() if self.offload else 0.0
        metrics = self.trainer.train_step(batch)
        t2 = time.perf_counter()
        if self.offload:
            self.trainer.offload_states()
        else:
            self.trainer.empty_cache()  # activations' cached blocks would keep the engine from waking
        freed = min(s["freed"] for s in slept)
        self.last_memory = {"sleep_freed_gib": freed / GIB}
        log.info("colocate: engines slept in %.2f s and freed %.1f GiB (least of %d GPU(s)); trainer state "
                 "reloaded in %.2f s", t1 - t0, freed / GIB, len(slept), reload_s)
        metrics.update({
            "train/colocate_sleep_s": t1 - t0,
            "train/colocate_engine_freed_gib": freed / GIB,
            "train/colocate_reload_s": reload_s,
            "train/colocate_offload_s": time.perf_counter() - t2,
        })
        return metrics

    def sync(self, version: int) -> int:
        """The trainer's weights into the engine on each GPU; returns the lowest version."""
        t0 = time.perf_counter()
        if self.asleep:
            woke = self.rollout.wake_up(["weights"])  # the KV cache stays freed while the buckets exist
            self.last_memory["wake_weights_gib"] = min(w["taken"] for w in woke) / GIB
        t1 = time.perf_counter()
        shared = self.trainer.share_weights(self.plan)
        t2 = time.perf_counter()
        try:
            versions = self.rollout.receive_ipc(shared, version)
        finally:
            self.trainer.release_shared()
        t3 = time.perf_counter()
        if self.asleep:
            woke = self.rollout.wake_up(["kv_cache"])
            self.last_memory["wake_kv_gib"] = min(w["taken"] for w in woke) / GIB
            self.asleep = False
        self.last_sync = {"wake_weights_s": t1 - t0, "gather_s": t2 - t1, "load_s": t3 - t2,
                          "wake_kv_s": time.perf_counter() - t3}
        return min(versions)
