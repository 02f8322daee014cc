"""Code reward: solutions run in the bubblewrap sandbox, the tests are judged in this process."""

import os
import threading
import time

import pytest

from cispo.config import RewardConfig
from rewards import RewardScorer, get_reward_fn
from rewards.code_exec import CodeRunFailed, TestFormatError, extract_code, run_code_tests
from rewards.sandbox import Limits, RunOutput, SandboxUnavailable, _over_limits, sandbox_uid
from sandbox_checks import TOKEN, leftovers, sandbox_processes, sandbox_uids

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]


def test_passing_partial_and_broken_code():
    ok = run_code_tests("def add(a, b):\n    return a + b\n", TESTS, time_limit_s=5)
    assert (ok.passed, ok.total, ok.status) == (3, 3, "ok") and ok.fraction == 1.0
    none = run_code_tests("def add(a, b):\n    return a * b + (a == 0)\n", TESTS, time_limit_s=5)
    assert (none.passed, none.status) == (0, "ok")
    partial = run_code_tests("def add(a, b):\n    return abs(a + b)\n", TESTS + ["assert add(-2, 0) == -2"], time_limit_s=5)
    assert (partial.passed, partial.total) == (3, 4)
    assert partial.detail == "test 3: `add(-2, 0) == -2` is false (`add(-2, 0)` = 2)"
    broken = run_code_tests("def add(a, b) return a", TESTS, time_limit_s=5)
    assert broken.passed == 0 and broken.status == "syntax error" and "SyntaxError" in broken.detail
    raising = run_code_tests("def add(a, b):\n    return [a][b]\n", TESTS, time_limit_s=5)
    assert (raising.passed, raising.status) == (1, "ok") and "IndexError" in raising.detail


def test_infinite_loop_is_killed_by_the_time_limit():
    t0 = time.monotonic()
    r = run_code_tests("while True:\n    pass\n", TESTS, time_limit_s=1.0)
    assert time.monotonic() - t0 < 5.0
    assert (r.passed, r.status) == (0, "timeout")
    # tests that passed before a later one hung are counted, but the run failed
    r = run_code_tests("def add(a, b):\n    while a == 5:\n        pass\n    return a + b\n",
                       [TESTS[0], "assert add(5, 0) == 5"], time_limit_s=2.0)
    assert (r.passed, r.total, r.status) == (1, 2, "timeout")


def test_memory_bomb_is_stopped_by_the_memory_limit():
    """Stopped by the memory limit, long before the time limit."""
    r = run_code_tests("blocks = []\nwhile True:\n    blocks.append(b'x' * 50 * 2**20)\n", TESTS,
                       time_limit_s=30.0, memory_mb=256)
    assert (r.passed, r.status) == (0, "memory")
    r = run_code_tests("x = bytearray(4 * 2**30)\n", TESTS, time_limit_s=30.0, memory_mb=256)
    assert (r.passed, r.status) == (0, "memory")


def test_the_watchdog_counts_only_the_sandboxs_own_tmpfs():
    """Before bwrap has mounted the sandbox's /tmp, /proc/PID/root/tmp is the host's (with its
    many files): that must not count as the sandbox filling its work dir."""
    out = RunOutput(b"", b"", None)
    assert _over_limits(os.getpid(), Limits(memory_mb=100_000, work_dir_files=0), out) is False and out.fault is None


def test_what_the_solution_sees():
    """Its own uid without capabilities, a private /tmp as cwd, no repo, no network, no host /tmp."""
    code = """
import os, socket
def status(key):
    return [ln.split()[1:] for ln in open("/proc/self/status") if ln.startswith(key + ":")][0]
def writable(path):
    try:
        open(path, "w").write("x")
        return True
    except OSError:
        return False
"""
    r = run_code_tests(code, [
        f"assert status('Uid') == [{str(sandbox_uid())!r}] * 4 and status('Groups') == []",
        "assert status('CapEff') == ['0' * 16] and status('CapPrm') == ['0' * 16] and status('CapBnd') == ['0' * 16]",
        "assert status('NoNewPrivs') == ['1']",
        "assert os.getcwd() == '/tmp' and os.environ['HOME'] == '/tmp'",
        "assert writable('x.txt') and sorted(os.listdir('/tmp')) == ['solution.py', 'x.txt']",
        f"assert os.path.exists({os.getcwd()!r}) is False and os.listdir('/etc') == ['ld.so.cache']",
        "assert not {'home', 'work', 'var', 'opt', 'srv', 'mnt', 'boot'} & set(os.listdir('/'))",
        "assert os.getpid() == 2 and os.getppid() == 1",
    ])
    assert (r.passed, r.total, r.status) == (8, 8, "ok"), r.detail


def test_legitimate_programs_are_not_flagged():
    """Standard-library work a solution may do: multiprocessing, threads, temp files, big ints, recursion."""
    code = """
import math, tempfile, threading, multiprocessing as mp, functools, collections, sys
sys.setrecursionlimit(10000)
def par(xs):
    with mp.Pool(2) as p:
        return p.map(abs, xs)
def thread():
    out = []
    t = threading.Thread(target=out.append, args=(1,))
    t.start(); t.join()
    return out
def tmp(s):
    with tempfile.TemporaryDirectory() as d:
        with open(d + "/f", "w") as f:
            f.write(s)
        return open(d + "/f").read()
@functools.lru_cache(None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
def depth(n):
    return 0 if n == 0 else 1 + depth(n - 1)
print("debug output is fine")
"""
    r = run_code_tests(code, [
        "assert par([-1, -2, 3]) == [1, 2, 3]", "assert thread() == [1]", "assert tmp('hi') == 'hi'",
        "assert fib(90) == 2880067194370816120", "assert math.factorial(3000) > 10 ** 9000",
        "assert depth(5000) == 5000", "assert collections.Counter('aab') == {'a': 2, 'b': 1}",
    ], time_limit_s=10)
    assert (r.passed, r.total, r.status) == (7, 7, "ok"), r.detail


def test_registered_code_rewards():
    response = "Here you go:\n```python\ndef add(a, b):\n    return a + b if a >= 0 else 99\n```\nDone.<eos>"
    code, strict = get_reward_fn("code"), get_reward_fn("code_strict")
    assert code("", response, None, {"tests": TESTS}) == 2 / 3
    assert strict("", response, None, {"tests": TESTS}) == 0.0
    assert code("", response, "assert add(1, 2) == 3\nassert add(2, 2) == 4", {}) == 1.0  # tests from the answer
    assert strict("", response, "assert add(1, 2) == 3", {}) == 1.0
    with pytest.raises(CodeRunFailed, match=r"^timeout: "):
        code("", "```python\nwhile True: pass\n```", None, {"tests": TESTS, "time_limit_s": 0.5})
    with pytest.raises(CodeRunFailed, match=r"^syntax error: SyntaxError"):
        strict("", "```python\ndef add(a, b) return a\n```", None, {"tests": TESTS})
    with pytest.raises(ValueError, match="no tests"):
        code("", response, None, {})
    with pytest.raises(TestFormatError, match="test 1 cannot be checked safely"):  # refused, nothing is run
        code("", response, None, {"tests": [TESTS[0], "for i in range(3):\n    assert add(i, 0) == i"]})


def test_extract_code():
    assert extract_code("```\nplain\n```\n```python\nlast_py\n```\n```\nlater_plain\n```") == "last_py\n"
    assert extract_code("```\nonly_plain\n```") == "only_plain\n"
    assert extract_code("x = 1<eos>") == "x = 1"


def test_refuses_to_start_without_bubblewrap(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match=r"`bwrap` \(bubblewrap\).*apt-get install -y bubblewrap"):
        get_reward_fn("code")
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
        run_code_tests("def add(a, b):\n    return a + b\n", TESTS)  # no unsandboxed fallback
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        RewardScorer(RewardConfig(functions=["code_strict"], num_workers=1))
    # installed but unusable (e.g. no user namespaces): refused too, with bwrap's own words
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(SandboxUnavailable, match="cannot start a sandbox here: bwrap: No permissions"):
        get_reward_fn("code")


def test_the_scorer_records_the_reason():
    hostile = "```python\nimport socket\ntry:\n    socket.getaddrinfo('example.com', 80)\nexcept OSError:\n    pass\n" \
              "def add(a, b):\n    return a + b\n```"
    samples = [{"prompt": "", "response": r, "answer": None, "metadata": {"tests": TESTS}}
               for r in (hostile, "```python\ndef add(a, b):\n    return a + b\n```")]
    with RewardScorer(RewardConfig(functions=["code"], timeout_s=60.0, num_workers=2)) as scorer:
        res = scorer.score(samples)
    assert res.rewards == [0.0, 1.0]
    assert [(i, fn) for i, fn, _ in res.failures] == [(0, "code")]
    assert res.failures[0][2].startswith("CodeRunFailed: network: socket.getaddrinfo")
    assert res.metrics()["reward/failures"] == 1.0


def test_the_scorer_timeout_kills_the_sandbox_too():
    sleeper = f"```python\nimport time\ntime.sleep(60)  # {TOKEN}\n```"
    sample = {"prompt": "", "response": sleeper, "answer": None, "metadata": {"tests": TESTS, "time_limit_s": 60}}
    with RewardScorer(RewardConfig(functions=["code"], timeout_s=4.0, num_workers=1)) as scorer:
        import multiprocessing as mp

        uids = sandbox_uids([c.pid for c in mp.active_children()])  # the worker's sandboxes
        seen = []
        done = threading.Event()

        def watch():
            while not done.is_set():
                seen.extend(sandbox_processes(uids))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        res = scorer.score([sample])
        done.set()
        watcher.join()
    assert res.rewards == [0.0] and res.failures[0][2] == "timeout after 4s (worker killed)"
    assert seen, "the watcher never saw the sleeping sandbox"
    deadline = time.monotonic() + 5
    while sandbox_processes(uids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes(uids) == [], "a sandbox outlived its killed reward worker"
    assert leftovers() == []
