"""Trainer weights into the rollout engines, by the configured path, surviving engines
that die.

    channel = WeightChannel(trainer, rollout, conf.rollout, backend)   # joins the group
    channel.sync(version)          # every engine now serves the trainer's weights
    rollout.on_replaced = channel.bring_up   # a replaced engine gets the current weights

object_store: trainer rank 0's buckets go into Ray's object store once and every engine
reads them (`RolloutGroup.update_weights` replaces an engine that dies meanwhile).
collective: trainer rank 0 broadcasts each bucket to every engine worker over a process
group of their own (`cispo.weight_sync`). A member that dies mid-broadcast is seen here
within about a second (Ray reports the actor's death); the group's store is told to
abort, so the others stop waiting at once rather than at the group's timeout; the dead
engine is replaced, the group rebuilt with it, and the broadcast repeated.

Trainer calls are serialised by `lock` (the driver holds it while training): a
replacement brought up from the rollout thread waits for the trainer to be idle, and
collective calls on the trainer ranks never interleave.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from cispo.config import RolloutConfig
from cispo.weight_sync import request_abort
from rollout.group import RolloutEngineError, RolloutGroup
from trainer.group import TrainerGroup

log = logging.getLogger("cispo")


class WeightChannel:
    def __init__(self, trainer: TrainerGroup, rollout: RolloutGroup, config: RolloutConfig, backend: str,
                 collective: bool | None = None, timeout_s: float = 600.0, poll_s: float = 0.5):
        self.trainer, self.rollout, self.config = trainer, rollout, config
        self.backend = backend
        # the configured path, unless the caller knows better (LoRA adapters: object store)
        self.collective = config.weight_sync == "collective" if collective is None else collective
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.lock = threading.RLock()
        self.version = 0  # what the engines serve
        self.plan = None
        self.address: tuple[str, int] | None = None
        self.last_abort_after_s: float | None = None  # broadcast start -> abort, the last time one failed
        if self.collective:
            self._join()
        rollout.on_replaced = self.bring_up

    # ---- the collective group -------------------------------------------------------------

    def _join(self) -> None:
        """(Re)build the sync group: trainer rank 0 and every engine worker join a new one."""
        with self.lock:
            host, port = self.trainer.sync_address()
            # rollout.sync_port (a port the firewall lets through) for the first group; a rebuilt
            # group takes a fresh one, the old group's store may still hold the port
            if self.config.sync_port and self.address is None:
                port = self.config.sync_port
            world = self.rollout.sync_world_size
            self._together(self.trainer.init_weight_sync(host, port, world, self.backend),
                           self.rollout.init_weight_sync(host, port, world, self.backend), "weight-sync set-up")
            self.address = (host, port)
            if self.plan is None:
                self.plan = self.trainer.weight_sync_plan(self.config.sync_bucket_mb)

    def _together(self, trainer_refs, rollout_refs, what: str) -> list:
        """Wait for both sides of a collective set-up, failing as soon as either side fails
        (the other is then blocked in it for good); the wait is bounded and names a dead engine."""
        import ray

        trainer_refs = trainer_refs if isinstance(trainer_refs, list) else [trainer_refs]
        engine_of = {ref: i for i, ref in enumerate(rollout_refs)}
        pending = list(trainer_refs) + list(rollout_refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=self.rollout.timeout_s)
            if not done:
                break  # the bounded wait below names whoever is stuck
            if done[0] in engine_of:
                self.rollout.wait(done, what, 0, [engine_of[done[0]]])
                continue
            try:
                ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                cause = err.cause if getattr(err, "cause", None) is not None else err
                raise RuntimeError(f"{what} failed on the trainer side: {type(cause).__name__}: "
                                   f"{str(cause).splitlines()[-1]}") from err
        results = self.rollout.wait(rollout_refs, what)
        ray.get(trainer_refs)
        return results

    def _broadcast(self, version: int) -> list[int]:
        """One broadcast of the plan; returns the engines that died during it (after the
        others were told to give up), [] when every engine received the weights."""
        import ray
        from ray.exceptions import RayTaskError

        trainer_refs = self.trainer.broadcast_weights(self.plan)
        engine_refs = self.rollout.receive_weights(self.plan, version)
        owner = {ref: i for i, ref in enumerate(engine_refs)}
        pending, aborted = set(trainer_refs) | set(engine_refs), False
        began = time.monotonic()
        deadline = began + self.timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=self.poll_s)
            pending -= set(ready)
            if not aborted and any(_failed(ref) for ref in ready):
                # a member failed: the rest would wait out the group's timeout
                self.last_abort_after_s = time.monotonic() - began
                log.warning("weight sync: a member failed %.1f s into the broadcast; aborting the sync group so "
                            "the others stop waiting", self.last_abort_after_s)
                request_abort(*self.address)
                aborted = True
            if pending and time.monotonic() > deadline:
                stuck = sorted(owner[r] for r in pending if r in owner)
                raise RolloutEngineError(f"weight sync did not finish within {self.timeout_s:.0f} s "
                                         f"(engines still receiving: {stuck})", stuck)
        _, failures = self.rollout.collect(engine_refs, list(range(len(engine_refs))), "weight sync", 0)
        dead = [i for i, (kind, _) in failures.items() if kind == "died"]
        if not aborted:
            ray.get(trainer_refs)
            return []
        if not dead:  # a failure with every engine alive: not something a restart mends
            try:
                ray.get(trainer_refs)
            except Exception as err:
                raise RuntimeError(f"weight sync failed with every engine alive: {err}") from err
            raise RolloutEngineError("weight sync failed: " + "; ".join(m for _, m in failures.values()),
                                     sorted(failures))
        for ref in trainer_refs:
            try:
                ray.get(ref)
            except RayTaskError:
                pass  # rank 0 gave up on the broken group (told to abort, or saw the dead peer itself)
            # a trainer rank that died (RayActorError) is not something this can mend: raised
        log.warning("weight sync: engines %s died during it", dead)
        return dead

    # ---- syncing ----------------------------------------------------------------------------

    def sync(self, version: int) -> int:
        """Every engine to the trainer's current weights, tagged `version`; returns the
        version the engines report."""
        with self.lock:
            if not self.collective:
                plan = self.trainer.weight_sync_plan(self.config.sync_bucket_mb)
                self.version = self.rollout.update_weights(self.trainer.get_weights_ref(plan), version)
                return self.version
            while True:
                dead = self._broadcast(version)
                if not dead:
                    self.version = version
                    return version
                self.rollout.restart({i: ("died", f"rollout engine {i} died during weight sync") for i in dead})
                self.rollout.wait_ready(engines=dead)
                self._join()

    def bring_up(self, engines: list[int]) -> None:
        """`RolloutGroup.on_replaced`: the replacement engines get the trainer's weights
        (waiting for a training step in progress to end). On the collective path the group
        is rebuilt with them and every engine receives the weights again."""
        with self.lock:
            version = max(self.version, self.trainer.step, self.rollout.version)
            log.info("bringing replaced rollout engines %s to policy version %d", engines, version)
            if self.collective:
                self._join()
                self.sync(version)
            else:
                plan = self.trainer.weight_sync_plan(self.config.sync_bucket_mb)
                self.rollout.update_weights(self.trainer.get_weights_ref(plan), version, engines=engines)


def _failed(ref: Any) -> bool:
    import ray

    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:
        return True
