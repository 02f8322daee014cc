"""Score samples with the configured reward functions, off the caller's thread.

    scorer = RewardScorer(cfg.reward)
    result = scorer.score([{"prompt": p, "response": r, "answer": a, "metadata": m}, ...])
    result.rewards        # weighted sum over reward.functions, one float per sample
    result.failures       # [(sample_index, fn_name, reason)], each also logged
    result.per_fn         # {fn_name: [raw reward per sample]}
    fut = scorer.submit(samples)   # concurrent.futures.Future[ScoreResult]; or `await scorer.ascore(samples)`
    scorer.close()

Each (sample, function) pair is one task. CPU-bound functions (everything except
``io_bound`` ones such as "remote") run in a `pebble.ProcessPool` of ``reward.num_workers``
worker processes; a task running longer than ``reward.timeout_s`` is stopped by pebble,
which kills its worker (SIGTERM, SIGKILL 3 s later) and starts a fresh one, so a hanging
function never blocks scoring of other samples, nor shutdown. io-bound functions run on up
to ``reward.max_concurrency`` threads of this process; they bound their own waits (the
remote client has per-attempt timeouts) and the scorer abandons one that overruns
``timeout_s * (max_retries + 1)`` plus backoff.

A task that raises, times out, returns a non-number or loses its worker gives reward
0 for that function on that sample, an entry in `failures` (to be logged as the
metric ``reward/failures``) and a ``logging.warning`` naming the function, the sample
index and the reason. Scoring goes on.

Every function is resolved here at start-up, so a bad name (or the code reward without
its sandbox) fails in the caller. Workers are fresh interpreters (multiprocessing's "spawn"),
not forks of the caller: safe when the caller has threads (Ray, torch). As always with
spawn, the caller's main script is imported again in each worker as ``__mp_main__`` (keep
its work under ``if __name__ == "__main__":``), and functions named by import path must be
importable there (the caller's ``sys.path`` is passed on). A worker exits when the caller dies.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import multiprocessing as mp
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Mapping, Optional, Sequence

import pebble

from rewards.registry import RewardFunctionError, get_entry, get_reward_fn
from rewards.remote import BACKOFF_BASE_S

logger = logging.getLogger("cispo.rewards")

REWARD_CONFIG_FIELDS = ("functions", "weights", "timeout_s", "num_workers", "url", "max_retries", "max_concurrency")
MAX_LOGGED_FAILURES = 20  # per score() call; the rest are summarised in one line


@dataclass
class ScoreResult:
    rewards: list[float]
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    per_fn: dict[str, list[float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``reward/failures``, ``reward/mean`` and ``reward/<fn>/mean`` for the logger."""
        n = len(self.rewards)
        out = {"reward/failures": float(len(self.failures)), "reward/mean": sum(self.rewards) / n if n else 0.0}
        for name, values in self.per_fn.items():
            out[f"reward/{name}/mean"] = sum(values) / n if n else 0.0
        return out


def _config_dict(cfg: Any) -> dict[str, Any]:
    if is_dataclass(cfg):
        d = asdict(cfg)
    else:  # an OmegaConf node or any object with the fields
        d = {k: getattr(cfg, k) for k in REWARD_CONFIG_FIELDS if hasattr(cfg, k)}
    d = {k: d[k] for k in REWARD_CONFIG_FIELDS if k in d}
    d["functions"] = [str(f) for f in d.get("functions")]
    d["weights"] = [float(w) for w in (d.get("weights") or [])]
    return d


def _to_config(d: dict[str, Any]):
    from cispo.config import RewardConfig

    return RewardConfig(**d)


def _as_reward(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"returned {type(value).__name__} {str(value)[:80]!r}, expected a float") from None
    if not math.isfinite(x):
        raise ValueError(f"returned non-finite value {x!r}")
    return x


def _call(fn, sample: dict) -> tuple[bool, Any]:
    """(True, reward) or (False, reason): exceptions travel as text (they may not pickle)."""
    try:
        return True, _as_reward(fn(sample["prompt"], sample["response"], sample["answer"], sample["metadata"]))
    except BaseException as e:  # noqa: BLE001 - a reward function may raise anything
        return False, f"{type(e).__name__}: {str(e)[:500]}"


# ---------------------------------------------------------------- worker side

_worker_cfg: Any = None
_worker_fns: dict[str, Any] = {}


def _worker_init(cfg_dict: dict[str, Any], names: list[str]) -> None:
    global _worker_cfg
    _worker_cfg = _to_config(cfg_dict)
    for spec in names:  # imports (sympy for math-verify...) here, not inside a task's timeout
        try:
            _worker_fns[spec] = get_reward_fn(spec, _worker_cfg)
        except Exception:  # noqa: BLE001 - the task reports it
            pass
    parent = os.getppid()

    def watchdog() -> None:  # exit if the caller dies, even while a reward function hangs
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()


def _worker_task(spec: str, sample: dict) -> tuple[bool, Any]:
    try:
        if spec not in _worker_fns:
            _worker_fns[spec] = get_reward_fn(spec, _worker_cfg)
    except BaseException as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {str(e)[:500]}"
    return _call(_worker_fns[spec], sample)


# ---------------------------------------------------------------- caller side


@dataclass(eq=False)
class _Job:
    samples: list[dict]
    future: Future
    remaining: int
    values: list[list[float]]  # [fn][sample]
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    finished: set = field(default_factory=set)  # (sample, fn) pairs with a result
    settled: bool = False  # the future got (or is getting) its result or error
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class _Task:
    job: _Job
    sample: int
    fn: int
    attempts: int = 0  # times it was sent to a pool


def _stop(pools: list, threads: Optional[ThreadPoolExecutor], stopped: Optional[threading.Event] = None) -> None:
    if stopped is not None:
        stopped.set()
    for pool in pools:
        pool.stop()  # kills the workers, hung ones included
        pool.join(timeout=10)
    if threads is not None:
        threads.shutdown(wait=False, cancel_futures=True)


class RewardScorer:
    """Weighted sum of reward functions over samples, scored in parallel with per-task timeouts."""

    def __init__(self, cfg: Any):
        self._cfg = _config_dict(cfg)
        names = self._cfg.get("functions") or []
        if not names:
            raise RewardFunctionError("reward.functions is empty; name at least one reward function")
        weights = self._cfg.get("weights") or [1.0] * len(names)
        if len(weights) != len(names):
            raise RewardFunctionError(f"reward.weights has {len(weights)} entries for {len(names)} reward.functions")
        self.names = list(names)
        self.keys = self._unique_keys(self.names)
        self.weights = [float(w) for w in weights]
        self.timeout_s = float(self._cfg.get("timeout_s", 10.0))
        self.num_workers = max(1, int(self._cfg.get("num_workers", 2)))
        retries = int(self._cfg.get("max_retries", 2))
        self.io_timeout_s = self.timeout_s * (retries + 1) + BACKOFF_BASE_S * (2**retries) * 1.1 + 1.0
        # Resolve every function here so a bad name (or a missing sandbox) fails at start-up, in the caller.
        cfg_obj = _to_config(self._cfg)
        fns = [get_reward_fn(n, cfg_obj) for n in self.names]
        self._io_fns = {j: fn for j, (n, fn) in enumerate(zip(self.names, fns)) if get_entry(n).io_bound}
        self._threads = ThreadPoolExecutor(max(1, int(self._cfg.get("max_concurrency", 16))),
                                           thread_name_prefix="cispo-reward-io") if self._io_fns else None
        self._pools: list[pebble.ProcessPool] = []  # the current one last; one list shared with the finalizer
        self._pool_lock = threading.Lock()
        self._inflight: dict[Future, tuple[pebble.ProcessPool, _Task]] = {}  # pebble's futures not yet handled
        self._jobs: set[_Job] = set()
        self._jobs_lock = threading.Lock()
        self._closed = False
        self._stopped = threading.Event()
        self.restarts = 0  # workers killed and replaced (timeouts, deaths)
        if len(self._io_fns) < len(self.names):
            self._pools.append(self._new_pool())
            threading.Thread(target=self._watch_pool, name="cispo-reward-pool-watch", daemon=True).start()
        self._finalizer = weakref.finalize(self, _stop, self._pools, self._threads, self._stopped)

    # ---------------------------------------------------------------- public API

    def score(self, samples: Sequence[Mapping[str, Any]]) -> ScoreResult:
        """Score `samples` (dicts with prompt, response, answer, metadata); blocks until done."""
        return self.submit(samples).result()

    def submit(self, samples: Sequence[Mapping[str, Any]]) -> "Future[ScoreResult]":
        """Start scoring `samples` and return a future of the `ScoreResult`."""
        if self._closed:
            raise RuntimeError("RewardScorer is closed")
        clean = [self._clean(i, s) for i, s in enumerate(samples)]
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        job = _Job(clean, fut, len(clean) * len(self.names), [[0.0] * len(clean) for _ in self.names])
        if job.remaining == 0:
            fut.set_result(self._result(job))
            return fut
        with self._jobs_lock:
            self._jobs.add(job)
        for i, sample in enumerate(clean):
            for j, name in enumerate(self.names):
                if j in self._io_fns:
                    self._threads.submit(self._run_io, job, i, j)
                else:
                    self._schedule(_Task(job, i, j))
        return fut

    async def ascore(self, samples: Sequence[Mapping[str, Any]]) -> ScoreResult:
        """Async form of `score`."""
        return await asyncio.wrap_future(self.submit(samples))

    def close(self) -> None:
        """Stop the scorer: kill worker processes (hung ones included); pending futures get an error."""
        if self._closed:
            return
        self._closed = True
        with self._jobs_lock:
            jobs, self._jobs = list(self._jobs), set()
        for job in jobs:  # before stopping the pool, whose aborted tasks would otherwise finish the jobs
            with job.lock:
                settle, job.settled = not job.settled, True
            if settle:
                job.future.set_exception(RuntimeError("RewardScorer was closed before scoring finished"))
        self._finalizer()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _unique_keys(names: list[str]) -> list[str]:
        seen: collections.Counter = collections.Counter()
        keys = []
        for n in names:
            seen[n] += 1
            keys.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
        return keys

    @staticmethod
    def _clean(i: int, s: Mapping[str, Any]) -> dict:
        if not isinstance(s, Mapping):
            raise TypeError(f"sample {i} is a {type(s).__name__}; expected a dict with prompt, response, answer, metadata")
        response = s.get("response")
        if not isinstance(response, str):
            raise TypeError(f"sample {i}: 'response' must be a str, got {type(response).__name__}")
        answer = s.get("answer")
        return {
            "prompt": str(s.get("prompt") or ""),
            "response": response,
            "answer": None if answer is None else str(answer),
            "metadata": dict(s.get("metadata") or {}),
        }

    def _new_pool(self) -> pebble.ProcessPool:
        cpu = [n for j, n in enumerate(self.names) if j not in self._io_fns]
        pool = pebble.ProcessPool(self.num_workers, initializer=_worker_init, initargs=(self._cfg, cpu),
                                  context=mp.get_context("spawn"))
        pool.active  # noqa: B018 - starts the workers now rather than at the first task
        return pool

    def _schedule(self, task: _Task) -> None:
        task.attempts += 1
        args = (self.names[task.fn], task.job.samples[task.sample])
        stranded: list[_Task] = []
        with self._pool_lock:
            try:
                fut = self._pools[-1].schedule(_worker_task, args=args, timeout=self.timeout_s)
            except RuntimeError:  # pebble marked the pool broken
                stranded = self._replace_pool()
                fut = self._pools[-1].schedule(_worker_task, args=args, timeout=self.timeout_s)
            self._inflight[fut] = (self._pools[-1], task)
        fut.add_done_callback(self._task_done)  # outside the lock: it may run right here
        for other in stranded:
            self._retry_or_fail(other, "BrokenProcessPool: the worker pool broke")

    def _replace_pool(self) -> list[_Task]:
        """A new pool for a broken one (caller holds the lock); returns the tasks stranded on the old one."""
        logger.warning("reward worker pool broke (a worker died while idle?); starting a new one")
        old = self._pools.pop()
        # stopped from another thread: this may be one of the old pool's own threads
        threading.Thread(target=_stop, args=([old], None), daemon=True).start()
        self._pools.append(self._new_pool())
        stranded = [f for f, (pool, _) in self._inflight.items() if pool is old]
        return [self._inflight.pop(f)[1] for f in stranded]

    def _watch_pool(self) -> None:
        """pebble can break a pool and drop its queued tasks when an idle worker dies from
        outside (e.g. the OOM killer): then start a new pool and send those tasks again."""
        while not self._stopped.wait(0.5):
            with self._pool_lock:
                if self._stopped.is_set() or self._pools[-1].active:
                    continue
                stranded = self._replace_pool()
            for task in stranded:
                self._retry_or_fail(task, "BrokenProcessPool: the worker pool broke")

    def _retry_or_fail(self, task: _Task, reason: str) -> None:
        if task.attempts < 2 and not self._closed:
            self._schedule(task)
        else:
            self._finish(task.job, task.sample, task.fn, False, reason)

    def _task_done(self, fut: Future) -> None:
        with self._pool_lock:
            entry = self._inflight.pop(fut, None)
        if entry is None:  # stranded on a broken pool and sent again
            return
        task = entry[1]
        job, i, j = task.job, task.sample, task.fn
        if fut.cancelled():
            return self._finish(job, i, j, False, "cancelled: the scorer was closed")
        e = fut.exception()
        if e is None:
            return self._finish(job, i, j, *fut.result())
        if isinstance(e, FutureTimeout):
            self.restarts += 1
            reason = f"timeout after {self.timeout_s:g}s (worker killed)"
        elif isinstance(e, pebble.ProcessExpired):
            self.restarts += 1
            reason = f"worker process died (exit code {e.exitcode})"
        elif isinstance(e, BrokenProcessPool):  # the task never ran: once more, on a new pool
            return self._retry_or_fail(task, f"BrokenProcessPool: {str(e)[:500]}")
        else:  # a sample that does not pickle...
            reason = f"{type(e).__name__}: {str(e)[:500]}"
        self._finish(job, i, j, False, reason)

    def _run_io(self, job: _Job, i: int, j: int) -> None:
        timer = threading.Timer(self.io_timeout_s, self._finish,
                                (job, i, j, False, f"timeout after {self.io_timeout_s:g}s (abandoned)"))
        timer.daemon = True
        timer.start()
        try:
            result = _call(self._io_fns[j], job.samples[i])
        finally:
            timer.cancel()
        self._finish(job, i, j, *result)

    def _finish(self, job: _Job, i: int, j: int, ok: bool, value: Any) -> None:
        with job.lock:
            if (i, j) in job.finished or job.settled:
                return
            job.finished.add((i, j))
            if ok:
                job.values[j][i] = value
            else:
                job.failures.append((i, self.keys[j], str(value)))
            job.remaining -= 1
            if job.remaining:
                return
            job.settled = True
        result = self._result(job)
        self._log_failures(result)
        with self._jobs_lock:
            self._jobs.discard(job)
        job.future.set_result(result)

    def _result(self, job: _Job) -> ScoreResult:
        n = len(job.samples)
        rewards = [sum(w * job.values[j][i] for j, w in enumerate(self.weights)) for i in range(n)]
        per_fn = {k: job.values[j] for j, k in enumerate(self.keys)}
        return ScoreResult(rewards, sorted(job.failures), per_fn)

    @staticmethod
    def _log_failures(result: ScoreResult) -> None:
        for idx, name, reason in result.failures[:MAX_LOGGED_FAILURES]:
            logger.warning("reward function %r failed on sample %d: %s (reward 0)", name, idx, reason)
        if len(result.failures) > MAX_LOGGED_FAILURES:
            logger.warning("... and %d more reward failures in this batch", len(result.failures) - MAX_LOGGED_FAILURES)
