"""HTTP reward server client (reward name "remote").

Protocol: ``POST <reward.url>`` with JSON ``{"prompt", "response", "answer", "metadata"}``;
the server answers 200 with JSON ``{"reward": <float>}``.

Each attempt has a timeout of ``reward.timeout_s``; connection errors, timeouts and
5xx/429 answers are retried up to ``reward.max_retries`` times with exponential backoff
(0.25 s, 0.5 s, 1 s ... plus jitter); other 4xx answers and malformed bodies fail at
once. At most ``reward.max_concurrency`` requests are in flight per process (a
semaphore shared by every client with the same url). After the last attempt the
function raises, which the scorer records as a failure with reward 0.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any, Optional

from rewards.registry import register

BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 8.0
RETRY_STATUS = {429, 500, 502, 503, 504}

_SEMAPHORES: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_SEMAPHORES_LOCK = threading.Lock()


def _semaphore(url: str, limit: int) -> threading.BoundedSemaphore:
    with _SEMAPHORES_LOCK:
        key = (url, limit)
        if key not in _SEMAPHORES:
            _SEMAPHORES[key] = threading.BoundedSemaphore(limit)
        return _SEMAPHORES[key]


class RemoteRewardError(RuntimeError):
    pass


class RemoteReward:
    """A callable with the registry signature that asks an HTTP reward server."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 10.0,
        max_retries: int = 2,
        max_concurrency: int = 16,
        backoff_base_s: float = BACKOFF_BASE_S,
    ):
        if not url:
            raise ValueError("remote reward needs reward.url (the reward server's address), got none")
        import requests

        self.url = url
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.semaphore = _semaphore(url, max(1, int(max_concurrency)))
        self._local = threading.local()  # one requests.Session per thread
        self._requests = requests

    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = self._requests.Session()
        return s

    def __call__(self, prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
        payload = {"prompt": prompt, "response": response, "answer": answer, "metadata": metadata}
        errors: list[str] = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(BACKOFF_MAX_S, self.backoff_base_s * 2 ** (attempt - 1))
                time.sleep(delay * (1 + 0.1 * random.random()))
            retry, error, value = self._attempt(payload)
            if error is None:
                return value
            errors.append(error)
            if not retry:
                break
        raise RemoteRewardError(
            f"reward server {self.url} failed after {len(errors)} attempt(s): " + "; ".join(errors)
        )

    def _attempt(self, payload: dict[str, Any]) -> tuple[bool, Optional[str], float]:
        """(retry?, error or None, reward)."""
        rq = self._requests
        with self.semaphore:
            try:
                r = self._session().post(self.url, json=payload, timeout=self.timeout_s)
            except rq.Timeout:
                return True, f"timeout after {self.timeout_s:g}s", 0.0
            except rq.ConnectionError as e:
                return True, f"connection error ({type(e).__name__})", 0.0
        if r.status_code in RETRY_STATUS:
            return True, f"HTTP {r.status_code}", 0.0
        if r.status_code != 200:
            return False, f"HTTP {r.status_code}: {r.text[:200]!r}", 0.0
        try:
            value = float(r.json()["reward"])
        except Exception:
            return False, f"malformed answer {r.text[:200]!r} (expected JSON {{\"reward\": float}})", 0.0
        if not math.isfinite(value):
            return False, f"non-finite reward {value!r}", 0.0
        return False, None, value


@register("remote", factory=True, io_bound=True)
def make_remote_reward(cfg: Any) -> RemoteReward:
    """Factory: a `RemoteReward` from a `RewardConfig` (url, timeout_s, max_retries, max_concurrency)."""
    return RemoteReward(cfg.url, cfg.timeout_s, cfg.max_retries, cfg.max_concurrency)
