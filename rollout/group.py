"""N rollout engines in Ray actors, as the driver sees them.

    group = RolloutGroup(model_path, rollout_cfg, dtype="bfloat16")
    trajs = group.generate(prompts, group_ids, n=G)          # split across engines
    group.update_weights(weights_or_ref, version)            # object-store path
    ranks = group.init_weight_sync(host, port, world_size)   # collective path: refs to
    refs = group.receive_weights(plan, version)              #   ray.get together with
                                                             #   the trainer's side
Every wait is bounded: a failing or stuck engine raises `RolloutEngineError` naming
the engine, never a silent hang. An engine that *dies* (its process is gone) is
replaced, up to `config.max_restarts` times per engine slot: at start-up the slot is
simply started again; during `generate` the dead engine's unfinished prompts go to the
healthy engines (per-request seeds make their samples the same wherever they run) while
a replacement starts, and the replacement gets the current weights from `on_replaced`
(set by whoever owns the weights; `launch.weight_channel`) before `generate` returns.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from cispo.batch import Trajectory
from cispo.config import RolloutConfig

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
UNSUPPORTED = "EngineUnsupportedError"  # rollout.engine_support's error, as Ray's messages name it
log = logging.getLogger("cispo.rollout")


class RolloutEngineError(RuntimeError):
    """A rollout engine died, raised, or did not answer in time."""

    def __init__(self, message: str, engine_indices: list[int]):
        super().__init__(message)
        self.engine_indices = engine_indices


def root_cause(message: str) -> str:
    """The line of a Ray error that says what went wrong: the last "SomeError: ..." line of
    the traceback it carries (e.g. vLLM refusing to start for lack of memory), else its
    first line. The engine's own log is in the run folder, but the console must say why."""
    import re

    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln) and "creation task" not in ln]
    return causes[-1] if causes else (lines[0] if lines else "")


def split_evenly(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `count` items over `parts` engines, contiguous, sizes
    differing by at most one."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


class RolloutGroup:
    """`config.num_engines` `RolloutEngine` actors of `config.tensor_parallel_size` each.

    num_cpus / num_gpus: Ray resources per engine (default: 1 CPU; GPUs = TP size when
    CUDA is visible, else 0). scheduling: one Ray scheduling strategy per engine
    (launch.placement's bundles), or None. timeout_s: the default bound on every wait
    (start-up included). engine_kwargs: extra `vllm.LLM` arguments. env: extra environment
    variables for the actors (the repo root is put on their PYTHONPATH). lora: a
    `cispo.config.LoraConfig` as a dict, to serve trained adapters (rollout/lora.py). wait_ready=False
    returns at once (start several groups side by side), then call `wait_ready()`.
    engine_cls: the engine class run in each actor (a `RolloutEngine` subclass).
    """

    def __init__(
        self,
        model_path: str,
        config: RolloutConfig,
        dtype: str = "bfloat16",
        num_cpus: float = 1,
        num_gpus: float | None = None,
        timeout_s: float = 600.0,
        enforce_eager: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        name: str = "rollout",
        wait_ready: bool = True,
        engine_cls: type | None = None,
        scheduling: list | None = None,
        lora: dict[str, Any] | None = None,
    ):
        import ray

        from rollout.engine import RolloutEngine

        self.config = config
        self.timeout_s = timeout_s
        self.tp = config.tensor_parallel_size
        if num_gpus is None:
            import torch

            num_gpus = float(self.tp) if torch.cuda.is_available() else 0.0
        env_vars = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "PYTHONPATH": os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p),
            **(env or {}),
        }
        self._actor_cls = ray.remote(engine_cls or RolloutEngine)
        self._actor_options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                                   runtime_env={"env_vars": env_vars})
        self._engine_args = (model_path, config, dtype)
        self._scheduling = scheduling  # per engine slot (placement bundles), or None
        self._engine_kwargs = dict(enforce_eager=enforce_eager, engine_kwargs=engine_kwargs, lora=lora)
        self._base_names = [f"{name}-{i}" for i in range(config.num_engines)]
        self.names = list(self._base_names)
        self.max_restarts = config.max_restarts
        self.restarts = [0] * config.num_engines  # per engine slot
        self.restarts_total = 0
        # Called with the indices of replaced engines once they are up; must give them the
        # current weights (the group itself does not hold weights).
        self.on_replaced: Callable[[list[int]], None] | None = None
        # Set by the owner when the job is being ended (SIGTERM: Slurm preemption). Engines
        # that die then are not replaced: they die because the node's processes are being
        # stopped, and a replacement would wait for a Ray that is going down.
        self.stopping = False
        self.engines = [self._start(i) for i in range(config.num_engines)]
        self.version = 0
        self.infos: list[dict[str, Any]] = []
        if wait_ready:
            self.wait_ready()

    def _start(self, i: int):
        """A new actor for engine slot i (a restarted slot's actor gets a fresh name)."""
        k = self.restarts[i]
        self.names[i] = self._base_names[i] if k == 0 else f"{self._base_names[i]}.r{k}"
        placed = {"scheduling_strategy": self._scheduling[i]} if self._scheduling else {}
        return self._actor_cls.options(name=self.names[i], **self._actor_options, **placed).remote(
            *self._engine_args, i, **self._engine_kwargs)

    def wait_ready(self, timeout_s: float | None = None, engines: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Block until every engine (or the given ones) has started (bounded); an engine
        that dies or raises at start-up is started again, up to `max_restarts` times (one
        that does not start in time is not: it may be waiting for resources that a new
        one would wait for too). Returns their `info()`. On a final failure every engine
        of the group is shut down."""
        todo = list(range(len(self.engines))) if engines is None else list(engines)
        infos: dict[int, dict[str, Any]] = {}
        try:
            while todo:
                results, failures = self.collect([self.engines[i].info.remote() for i in todo], todo, "start-up", timeout_s)
                infos.update({todo[k]: r for k, r in results.items()})
                failed = {todo[k]: f for k, f in failures.items()}
                late = [i for i, (kind, _) in failed.items() if kind == "timeout"]
                if late:
                    raise RolloutEngineError("; ".join(failed[i][1] for i in late) + " (are there resources for every "
                                             "engine? an engine waiting for a CPU/GPU never starts)", late)
                # the node's install cannot run an engine: a new actor there would fail the same way
                unfit = [i for i, (_, message) in failed.items() if UNSUPPORTED in message]
                if unfit:
                    raise RolloutEngineError("; ".join(failed[i][1] for i in unfit), unfit)
                self.restart(failed)  # raises once a slot has used up its restarts
                todo = sorted(failed)
        except BaseException:
            self.shutdown()
            raise
        if engines is None:
            self.infos = [infos[i] for i in range(len(self.engines))]
        else:
            for i in engines:
                self.infos[i] = infos[i]
        return [infos[i] for i in sorted(infos)]

    def restart(self, failed: dict[int, tuple[str, str]]) -> None:
        """Kill and start again the engines in `failed` ({index: (kind, message)}), or raise
        RolloutEngineError when one of them has used up its restarts or the group is `stopping`."""
        import ray

        if self.stopping and failed:
            raise RolloutEngineError("; ".join(f"{m} (not restarted: the job is being stopped)"
                                               for _, m in (failed[i] for i in sorted(failed))), sorted(failed))
        spent = [i for i in failed if self.restarts[i] >= self.max_restarts]
        if spent:
            raise RolloutEngineError(
                "; ".join(f"{failed[i][1]} (restarted {self.restarts[i]} times already; rollout.max_restarts="
                          f"{self.max_restarts})" for i in spent), spent)
        for i, (_, message) in sorted(failed.items()):
            log.warning("%s: restarting it (%d/%d)", message, self.restarts[i] + 1, self.max_restarts)
            try:
                ray.kill(self.engines[i])
            except Exception:  # already gone
                pass
            self.restarts[i] += 1
            self.restarts_total += 1
            self.engines[i] = self._start(i)

    def _bring_up(self, indices: list[int]) -> None:
        """Wait for replaced engines to start, then have `on_replaced` load the weights the
        others serve (nothing to load while the group still runs the initial model)."""
        self.wait_ready(engines=indices)
        if self.version == 0:
            return
        if self.on_replaced is None:
            raise RolloutEngineError(
                f"rollout engines {indices} were replaced, but the group has no weight source (on_replaced) "
                f"to bring them to policy version {self.version}", indices)
        self.on_replaced(indices)

    # ------------------------------------------------------------------ waiting
    def collect(self, refs: Sequence[Any], engines: Sequence[int], what: str,
                 timeout_s: float | None = None) -> tuple[dict[int, Any], dict[int, tuple[str, str]]]:
        """ray.get with a bound, by position in `refs`: ({position: result}, {position:
        (kind, message)}) with kind "died", "failed" or "timeout"."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        timeout = self.timeout_s if timeout_s is None else timeout_s
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        pending_set = set(pending)
        results, failures = {}, {}
        for k, (i, ref) in enumerate(zip(engines, refs)):
            label = f"rollout engine {i} ({self.names[i]})"
            if ref in pending_set:
                failures[k] = ("timeout", f"{label} did not finish {what} within {timeout:.0f} s")
                continue
            try:
                results[k] = ray.get(ref, timeout=0)
            except RayActorError as e:
                failures[k] = ("died", f"{label} died during {what}: {type(e).__name__}: {root_cause(str(e))}")
            except RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                failures[k] = ("failed", f"{label} failed during {what}: {type(cause).__name__}: {str(cause).splitlines()[-1]}")
            except GetTimeoutError:
                failures[k] = ("timeout", f"{label} did not finish {what} within {timeout:.0f} s")
        return results, failures

    def wait(self, refs: Sequence[Any], what: str, timeout_s: float | None = None, engines: Sequence[int] | None = None) -> list[Any]:
        """ray.get with a bound: results in order, or RolloutEngineError naming every
        engine that died, raised, or had not answered when the time ran out."""
        engines = list(range(len(refs))) if engines is None else list(engines)
        results, failures = self.collect(refs, engines, what, timeout_s)
        if failures:
            raise RolloutEngineError("; ".join(m for _, m in failures.values()), [engines[k] for k in failures])
        return [results[k] for k in range(len(refs))]

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Any],
        group_ids: Sequence[int] | None = None,
        n: int = 1,
        timeout_s: float | None = None,
        **overrides: Any,
    ) -> list[Trajectory]:
        """`RolloutEngine.generate` over all engines: prompts are split into contiguous
        chunks (all n samples of a prompt stay on one engine, so prefix caching shares
        the prompt), results come back in prompt order. A dead engine's chunk is split
        over the healthy engines (or, with none left, waits for its replacement)."""
        if group_ids is None:
            group_ids = list(range(len(prompts)))
        todo = [(i, a, b) for i, (a, b) in enumerate(split_evenly(len(prompts), len(self.engines))) if a < b]
        done: dict[int, list[Trajectory]] = {}
        replaced: set[int] = set()
        while todo:
            refs = [self.engines[i].generate.remote(list(prompts[a:b]), list(group_ids[a:b]), n, **overrides)
                    for i, a, b in todo]
            results, failures = self.collect(refs, [i for i, _, _ in todo], "generate", timeout_s)
            for k, chunk in results.items():
                done[todo[k][1]] = chunk
            if any(kind != "died" for kind, _ in failures.values()):
                raise RolloutEngineError("; ".join(m for _, m in failures.values()), [todo[k][0] for k in failures])
            dead = {todo[k][0]: failures[k] for k in failures}
            self.restart(dead)
            replaced |= set(dead)
            lost = [todo[k][1:] for k in failures]
            # replacements still starting (or not yet given the weights) get no work
            healthy = [i for i in range(len(self.engines)) if i not in replaced]
            if not healthy:
                self._bring_up(sorted(replaced))
                healthy = sorted(replaced)
                replaced.clear()
            todo = [(healthy[j], a + s, a + e) for a, b in lost
                    for j, (s, e) in enumerate(split_evenly(b - a, len(healthy))) if s < e]
        if replaced:
            self._bring_up(sorted(replaced))
        return [t for a in sorted(done) for t in done[a]]

    # ------------------------------------------------------------------ weights
    def update_weights(self, weights: Any, version: int | None = None, timeout_s: float | None = None,
                       engines: Sequence[int] | None = None) -> int:
        """Object-store path: the weights (any form `RolloutEngine.update_weights` takes,
        or an ObjectRef to one, e.g. `TrainerGroup.get_weights_ref`) are put once and read
        by every engine (or the given ones). An engine that dies meanwhile is replaced and
        given the same weights. Returns the new version."""
        import ray

        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        version = self.version + 1 if version is None else version
        todo = list(range(len(self.engines))) if engines is None else list(engines)
        while todo:
            refs = [self.engines[i].update_weights.remote(ref, version) for i in todo]
            _, failures = self.collect(refs, todo, "update_weights", timeout_s)
            if any(kind != "died" for kind, _ in failures.values()):
                raise RolloutEngineError("; ".join(m for _, m in failures.values()), [todo[k] for k in failures])
            dead = {todo[k]: failures[k] for k in failures}
            self.restart(dead)
            if dead:
                self.wait_ready(engines=sorted(dead))
            todo = sorted(dead)
        if engines is None or version > self.version:
            self.version = version
        return version

    @property
    def sync_world_size(self) -> int:
        """Members of the weight-sync group: trainer rank 0 plus one per rollout worker."""
        return 1 + len(self.engines) * self.tp

    def init_weight_sync(self, host: str, port: int, world_size: int | None = None, backend: str | None = None, first_rank: int = 1) -> list[Any]:
        """Non-blocking: refs of every engine joining the sync group (engine i takes
        ranks first_rank + i*TP ...); ray.get / `wait` them together with the trainer's."""
        import torch

        world = self.sync_world_size if world_size is None else world_size
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        return [
            e.init_weight_sync.remote(host, port, first_rank + i * self.tp, world, backend) for i, e in enumerate(self.engines)
        ]

    def receive_weights(self, plan: list, version: int, timed: bool = False) -> list[Any]:
        """Non-blocking: refs of every engine receiving the plan's buckets; wait on them
        together with the trainer's broadcast. Sets the group's version."""
        self.version = version
        return [e.receive_weights.remote(plan, version, timed) for e in self.engines]

    def receive_ipc(self, items_per_engine: list[list], version: int, timeout_s: float | None = None) -> list[int]:
        """Colocated path: engine i loads the CUDA IPC buckets its GPU's trainer rank
        shared (`items_per_engine[i]`); blocks until all have loaded; returns versions."""
        refs = [e.receive_ipc.remote(items, version) for e, items in zip(self.engines, items_per_engine)]
        versions = self.wait(refs, "receive_ipc", timeout_s)
        self.version = version
        return versions

    # ------------------------------------------------------------------ sleep / wake (colocated)
    def sleep(self, level: int = 1, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return self.wait([e.sleep.remote(level) for e in self.engines], "sleep", timeout_s)

    def wake_up(self, tags: list[str] | None = None, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return self.wait([e.wake_up.remote(tags) for e in self.engines], "wake_up", timeout_s)

    # ------------------------------------------------------------------ misc
    def last_load_stats(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        return self.wait([e.last_load_stats.remote() for e in self.engines], "last_load_stats", timeout_s)

    def weight_checksums(self, rows: dict[str, int] | None = None, timeout_s: float = 120.0) -> list[dict[str, int]]:
        return self.wait([e.weight_checksums.remote(rows) for e in self.engines], "weight_checksums", timeout_s)

    def set_fp32_head(self, enabled: bool, timeout_s: float | None = None) -> None:
        self.wait([e.set_fp32_head.remote(enabled) for e in self.engines], "set_fp32_head", timeout_s)

    def ping(self, timeout_s: float = 30.0) -> list[str]:
        return self.wait([e.ping.remote() for e in self.engines], "ping", timeout_s)

    def shutdown(self) -> None:
        import ray

        for e in self.engines:
            try:
                ray.kill(e)
            except Exception:
                pass
        self.engines = []
