"""The HTTP reward path against a local server: success, retry after a transient 500,
per-attempt timeout, no retry on 4xx, the concurrency limit, and through the scorer."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cispo.config import RewardConfig
from rewards import RewardScorer, get_reward_fn
from rewards.remote import RemoteReward, RemoteRewardError


class Server:
    def __init__(self):
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    key = f"{self.path}|{body['prompt']}"
                    server.calls[key] = server.calls.get(key, 0) + 1
                    n = server.calls[key]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.path == "/flaky" and n == 1:
                        return self.reply(500, {"error": "transient"})
                    if self.path == "/slow":
                        time.sleep(0.8)
                    if self.path == "/busy":
                        time.sleep(0.1)
                    if self.path == "/bad":
                        return self.reply(400, {"error": "bad request"})
                    if self.path == "/garbage":
                        return self.reply(200, {"score": 1})
                    self.reply(200, {"reward": float(body["response"] == body["answer"])})
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def count(self, path, prompt):
        return self.calls.get(f"{path}|{prompt}", 0)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_remote_reward_round_trip(server):
    fn = RemoteReward(server.url + "/ok", timeout_s=2.0, max_retries=0)
    assert fn("p-ok", "7", "7", {"k": 1}) == 1.0
    assert fn("p-ok2", "8", "7", {}) == 0.0
    assert {"prompt": "p-ok", "response": "7", "answer": "7", "metadata": {"k": 1}} in server.bodies


def test_retry_after_transient_500(server):
    fn = RemoteReward(server.url + "/flaky", timeout_s=2.0, max_retries=2, backoff_base_s=0.01)
    assert fn("p-flaky", "7", "7", {}) == 1.0
    assert server.count("/flaky", "p-flaky") == 2  # one 500, then success


def test_timeout_then_failure_names_reason(server):
    fn = RemoteReward(server.url + "/slow", timeout_s=0.2, max_retries=1, backoff_base_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(RemoteRewardError, match=r"2 attempt\(s\): timeout after 0.2s; timeout after 0.2s"):
        fn("p-slow", "7", "7", {})
    assert time.monotonic() - t0 < 1.5


def test_client_errors_are_not_retried(server):
    fn = RemoteReward(server.url + "/bad", timeout_s=2.0, max_retries=3, backoff_base_s=0.01)
    with pytest.raises(RemoteRewardError, match="HTTP 400"):
        fn("p-bad", "7", "7", {})
    assert server.count("/bad", "p-bad") == 1
    with pytest.raises(RemoteRewardError, match="malformed answer"):
        RemoteReward(server.url + "/garbage", max_retries=0)("p-g", "7", "7", {})
    with pytest.raises(RemoteRewardError, match="connection error"):
        RemoteReward("http://127.0.0.1:9/none", timeout_s=0.5, max_retries=0)("p", "7", "7", {})


def test_concurrency_limit(server):
    deadline = time.monotonic() + 3
    while server.in_flight and time.monotonic() < deadline:  # abandoned /slow requests still sleeping
        time.sleep(0.05)
    server.max_in_flight = 0
    fn = RemoteReward(server.url + "/busy", timeout_s=5.0, max_retries=0, max_concurrency=2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: fn(f"p-busy{i}", "7", "7", {}), range(8)))
    assert results == [1.0] * 8
    assert server.max_in_flight == 2


def test_remote_through_scorer(server):
    cfg = RewardConfig(functions=["remote", "builtin"], url=server.url + "/flaky", timeout_s=0.5, max_retries=1)
    assert get_reward_fn("remote", cfg).url == cfg.url
    samples = [{"prompt": f"s{i}", "response": "7", "answer": "7" if i % 2 else "8"} for i in range(6)]
    with RewardScorer(cfg) as scorer:
        res = scorer.score(samples)
    # every sample got one 500 then an answer (one retry allowed)
    assert res.per_fn["remote"] == [0.0, 1.0] * 3
    assert res.failures == []
    cfg.url = server.url + "/slow"
    with RewardScorer(cfg) as scorer:
        t0 = time.monotonic()
        res = scorer.score(samples[:2])
        assert time.monotonic() - t0 < 4.0
    assert [(i, fn) for i, fn, _ in res.failures] == [(0, "remote"), (1, "remote")]
    assert all("timeout after 0.5s" in r for _, _, r in res.failures)
    assert res.per_fn["builtin"] == [0.0, 1.0]
