"""N rollout engines in Ray actors, as the driver sees them.

    group = RolloutGroup(model_path, rollout_cfg, dtype="bfloat16")
    trajs = group.generate(prompts, group_ids, n=G)          # split across engines
    group.update_weights(weights_or_ref, version)            # object-store path
    ranks = group.init_weight_sync(host, port, world_size)   # collective path: refs to
    refs = group.receive_weights(plan, version)              #   ray.get together with
                                                             #   the trainer's side
Every wait is bounded: a dead, failing or stuck engine raises `RolloutEngineError`
naming the engine, never a silent hang.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from cispo.batch import Trajectory
from cispo.config import RolloutConfig

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)


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
    CUDA is visible, else 0). timeout_s: the default bound on every wait (start-up
    included). engine_kwargs: extra `vllm.LLM` arguments. env: extra environment
    variables for the actors (the repo root is put on their PYTHONPATH). lora: a
    `cispo.config.LoraConfig` as a dict, to serve trained adapters (rollout/lora.py). wait_ready=False
    returns at once (start several groups side by side), then call `wait_ready()`.
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
        actor_cls = ray.remote(RolloutEngine)
        self.names = [f"{name}-{i}" for i in range(config.num_engines)]
        self.engines = [
            actor_cls.options(
                name=self.names[i],
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=0,
                runtime_env={"env_vars": env_vars},
            ).remote(model_path, config, dtype, i, enforce_eager, engine_kwargs, lora=lora)
            for i in range(config.num_engines)
        ]
        self.version = 0
        self.infos: list[dict[str, Any]] = []
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Block until every engine has started (bounded); returns their `info()`."""
        self.infos = self.wait([e.info.remote() for e in self.engines], "start-up", timeout_s)
        return self.infos

    # ------------------------------------------------------------------ waiting
    def wait(self, refs: Sequence[Any], what: str, timeout_s: float | None = None, engines: Sequence[int] | None = None) -> list[Any]:
        """ray.get with a bound: results in order, or RolloutEngineError naming every
        engine that died, raised, or had not answered when the time ran out."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        engines = list(range(len(refs))) if engines is None else list(engines)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        pending_set = set(pending)
        results, problems, bad = [], [], []
        for i, ref in zip(engines, refs):
            label = f"rollout engine {i} ({self.names[i]})"
            if ref in pending_set:
                problems.append(f"{label} did not finish {what} within {timeout:.0f} s")
                bad.append(i)
                results.append(None)
                continue
            try:
                results.append(ray.get(ref, timeout=0))
            except RayActorError as e:
                problems.append(f"{label} died during {what}: {type(e).__name__}: {root_cause(str(e))}")
                bad.append(i)
            except RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                problems.append(f"{label} failed during {what}: {type(cause).__name__}: {str(cause).splitlines()[-1]}")
                bad.append(i)
            except GetTimeoutError:
                problems.append(f"{label} did not finish {what} within {timeout:.0f} s")
                bad.append(i)
        if problems:
            raise RolloutEngineError("; ".join(problems), bad)
        return results

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
        the prompt), results come back in prompt order."""
        if group_ids is None:
            group_ids = list(range(len(prompts)))
        refs, used = [], []
        for i, (a, b) in enumerate(split_evenly(len(prompts), len(self.engines))):
            if a == b:
                continue
            refs.append(self.engines[i].generate.remote(list(prompts[a:b]), list(group_ids[a:b]), n, **overrides))
            used.append(i)
        chunks = self.wait(refs, "generate", timeout_s, used)
        return [t for chunk in chunks for t in chunk]

    # ------------------------------------------------------------------ weights
    def update_weights(self, weights: Any, version: int | None = None, timeout_s: float | None = None) -> int:
        """Object-store path: the weights (any form `RolloutEngine.update_weights` takes,
        or an ObjectRef to one, e.g. `TrainerGroup.get_weights_ref`) are put once and read
        by every engine. Returns the new version."""
        import ray

        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        version = self.version + 1 if version is None else version
        self.wait([e.update_weights.remote(ref, version) for e in self.engines], "update_weights", timeout_s)
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

    def receive_weights(self, plan: list, version: int) -> list[Any]:
        """Non-blocking: refs of every engine receiving the plan's buckets; wait on them
        together with the trainer's broadcast. Sets the group's version."""
        self.version = version
        return [e.receive_weights.remote(plan, version) for e in self.engines]

    # ------------------------------------------------------------------ misc
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
