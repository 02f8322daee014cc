"""Score samples with the configured reward functions, off the caller's thread.

    scorer = RewardScorer(cfg.reward)
    result = scorer.score([{"prompt": p, "response": r, "answer": a, "metadata": m}, ...])
    result.rewards        # weighted sum over reward.functions, one float per sample
    result.failures       # [(sample_index, fn_name, reason)], each also logged
    result.per_fn         # {fn_name: [raw reward per sample]}
    fut = scorer.submit(samples)   # concurrent.futures.Future[ScoreResult]; or `await scorer.ascore(samples)`
    scorer.close()

Each (sample, function) pair is one task. CPU-bound functions (everything except
``io_bound`` ones such as "remote") run in ``reward.num_workers`` worker processes that
the scorer owns; a task running longer than ``reward.timeout_s`` is abandoned by killing
its worker (SIGKILL) and starting a fresh one, so a hanging function never blocks
scoring of other samples, nor shutdown. io-bound functions run on up to
``reward.max_concurrency`` threads of this process; they bound their own waits (the
remote client has per-attempt timeouts) and the scorer abandons one that overruns
``timeout_s * (max_retries + 1)`` plus backoff.

A task that raises, times out, returns a non-number or loses its worker gives reward
0 for that function on that sample, an entry in `failures` (to be logged as the
metric ``reward/failures``) and a ``logging.warning`` naming the function, the sample
index and the reason. Scoring goes on.

Workers are fresh interpreters (``python -m rewards._worker``), not forks of
the caller: safe when the caller has threads (Ray, torch), and the caller's main
module is never re-imported. Functions named by import path must be importable there
(the caller's ``sys.path`` is passed on). A worker exits when the caller dies.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import multiprocessing as mp
import socket
import subprocess
import os
import queue
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from typing import Any, Mapping, Optional, Sequence

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


def _call(fn, sample: dict) -> float:
    return _as_reward(fn(sample["prompt"], sample["response"], sample["answer"], sample["metadata"]))


def _worker_main(fd: int) -> None:
    """Worker process: resolve functions lazily, answer (task_id, fn_spec, sample) with (task_id, ok, value)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and kills us
    conn = Connection(fd)
    parent = os.getppid()

    def watchdog() -> None:  # exit if the driver dies, even while a reward function hangs
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    sys_path, cfg_dict = conn.recv()
    for p in reversed(sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    cfg = _to_config(cfg_dict)
    fns: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, spec, sample = msg
        try:
            if spec not in fns:
                fns[spec] = get_reward_fn(spec, cfg)
            reply = (task_id, True, _call(fns[spec], sample))
        except BaseException as e:  # noqa: BLE001 - a reward function may raise anything
            reply = (task_id, False, f"{type(e).__name__}: {str(e)[:500]}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


@dataclass
class _Job:
    samples: list[dict]
    future: Future
    remaining: int
    values: list[list[float]]  # [fn][sample]
    failures: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass
class _Task:
    job: _Job
    sample: int
    fn: int
    started: float = 0.0
    done: bool = False


class _Worker:
    """One worker: ``python -m rewards._worker FD``, talking over a socket pair.

    A fresh interpreter (fork + exec) rather than multiprocessing: nothing of the
    caller's main module or threads is inherited, and killing it is always safe.
    """

    def __init__(self, cfg_dict: dict[str, Any]):
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        paths = [p for p in sys.path if isinstance(p, str) and p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rewards._worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send((paths, cfg_dict))
        self.task: Optional[_Task] = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()


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
        # Resolve every function here so a bad name fails at start-up, in the caller.
        cfg_obj = _to_config(self._cfg)
        entries = [get_entry(n) for n in self.names]
        self._io_fns = {i: get_reward_fn(n, cfg_obj) for i, (n, e) in enumerate(zip(self.names, entries)) if e.io_bound}
        self._needs_procs = len(self._io_fns) < len(self.names)
        self._threads = ThreadPoolExecutor(max(1, int(self._cfg.get("max_concurrency", 16))),
                                           thread_name_prefix="cispo-reward-io") if self._io_fns else None
        self._jobs: "queue.SimpleQueue[_Job]" = queue.SimpleQueue()
        self._io_done: "queue.SimpleQueue[tuple[_Task, bool, Any]]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._wake_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._workers: list[_Worker] = []
        self.restarts = 0  # workers killed and replaced (timeouts, crashes)
        self._loop = threading.Thread(target=self._run, name="cispo-reward-scorer", daemon=True)
        self._loop.start()
        # Runs on close() or at interpreter exit: stop the loop, which kills the workers.
        self._finalizer = weakref.finalize(self, RewardScorer._shutdown, self._loop, self._stop, self._wake_w,
                                           self._wake_lock)

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
        self._jobs.put(job)
        self._wake()
        return fut

    async def ascore(self, samples: Sequence[Mapping[str, Any]]) -> ScoreResult:
        """Async form of `score`."""
        return await asyncio.wrap_future(self.submit(samples))

    def close(self) -> None:
        """Stop the scorer: kill worker processes (hung ones included); pending futures get an error."""
        if self._closed:
            return
        self._closed = True
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

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_w.send_bytes(b"w")
            except (OSError, ValueError):
                pass

    @staticmethod
    def _shutdown(loop: threading.Thread, stop: threading.Event, wake_w, lock: threading.Lock) -> None:
        stop.set()
        with lock:
            try:
                wake_w.send_bytes(b"s")
            except (OSError, ValueError):
                pass
        loop.join(timeout=10)

    def _spawn(self) -> _Worker:
        return _Worker(self._cfg)

    def _finish(self, task: _Task, ok: bool, value: Any) -> None:
        if task.done:
            return
        task.done = True
        job = task.job
        if ok:
            job.values[task.fn][task.sample] = value
        else:
            job.failures.append((task.sample, self.keys[task.fn], str(value)))
        job.remaining -= 1
        if job.remaining == 0:
            result = self._result(job)
            self._log_failures(result)
            if not job.future.done():
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

    def _run_io(self, task: _Task, fn) -> None:
        task.started = time.monotonic()
        try:
            res = (task, True, _call(fn, task.job.samples[task.sample]))
        except BaseException as e:  # noqa: BLE001
            res = (task, False, f"{type(e).__name__}: {str(e)[:500]}")
        self._io_done.put(res)
        self._wake()

    def _run(self) -> None:
        """The scorer's own thread: hands tasks to workers, collects results, enforces timeouts."""
        self._pending: collections.deque[_Task] = collections.deque()
        self._io_running: list[_Task] = []
        err: BaseException = RuntimeError("RewardScorer was closed before scoring finished")
        try:
            if self._needs_procs:
                self._workers = [self._spawn() for _ in range(self.num_workers)]
            while not self._stop.is_set():
                self._take_jobs()
                self._dispatch()
                self._wait_and_collect()
                self._enforce_timeouts()
        except BaseException as e:  # noqa: BLE001 - never leave futures hanging
            logger.exception("reward scorer loop crashed")
            err = e
        finally:
            self._stop_workers()
            for job in self._unfinished_jobs():
                if not job.future.done():
                    job.future.set_exception(err)

    def _take_jobs(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            for i in range(len(job.samples)):
                for j in range(len(self.names)):
                    task = _Task(job, i, j)
                    if j in self._io_fns:
                        self._io_running.append(task)
                        self._threads.submit(self._run_io, task, self._io_fns[j])
                    else:
                        self._pending.append(task)

    def _replace(self, k: int) -> _Worker:
        self._workers[k].kill()
        self._workers[k] = self._spawn()
        self.restarts += 1
        return self._workers[k]

    def _dispatch(self) -> None:
        """Give each idle worker a task (replacing workers that died while idle)."""
        for k, w in enumerate(self._workers):
            if w.task is None and not w.alive():
                w = self._replace(k)
            while w.task is None and self._pending:
                task = self._pending.popleft()
                try:
                    w.conn.send((id(task), self.names[task.fn], task.job.samples[task.sample]))
                except Exception as e:  # noqa: BLE001 - unpicklable sample, broken pipe
                    self._finish(task, False, f"cannot send sample to worker: {type(e).__name__}: {e}")
                    if isinstance(e, OSError):
                        w = self._replace(k)
                    continue
                task.started = time.monotonic()
                w.task = task

    def _wait_and_collect(self) -> None:
        """Block until a worker answers, an io task ends, a job arrives, or the next deadline."""
        deadlines = [w.task.started + self.timeout_s for w in self._workers if w.task is not None]
        deadlines += [t.started + self.io_timeout_s for t in self._io_running if t.started and not t.done]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        busy = {w.conn: w for w in self._workers if w.task is not None}
        for conn in mp_wait(list(busy) + [self._wake_r], timeout):
            if conn is self._wake_r:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
                continue
            w = busy[conn]
            task, w.task = w.task, None
            try:
                _, ok, value = conn.recv()
                self._finish(task, ok, value)
            except (EOFError, OSError):
                try:
                    w.proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
                self._finish(task, False, f"worker process died (exit code {w.proc.returncode})")
        while True:
            try:
                task, ok, value = self._io_done.get_nowait()
            except queue.Empty:
                break
            self._finish(task, ok, value)
        self._io_running = [t for t in self._io_running if not t.done]

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for k, w in enumerate(self._workers):
            if w.task is not None and now - w.task.started > self.timeout_s:
                task, w.task = w.task, None
                self._replace(k)  # SIGKILL: the only way to stop a hung function
                self._finish(task, False, f"timeout after {self.timeout_s:g}s (worker killed)")
        for t in self._io_running:
            if t.started and not t.done and now - t.started > self.io_timeout_s:
                self._finish(t, False, f"timeout after {self.io_timeout_s:g}s (abandoned)")

    def _stop_workers(self) -> None:
        for w in self._workers:
            if w.task is None:
                try:
                    w.conn.send(None)  # ask idle workers to exit
                except Exception:  # noqa: BLE001
                    pass
        deadline = time.monotonic() + 1.0
        for w in self._workers:
            if w.task is None:
                try:
                    w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            w.kill()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    def _unfinished_jobs(self) -> list[_Job]:
        jobs = [t.job for t in self._pending] + [t.job for t in self._io_running]
        jobs += [w.task.job for w in self._workers if w.task is not None]
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                return jobs
