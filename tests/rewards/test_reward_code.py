"""Code reward: the response's code plus test asserts in a subprocess with time and memory limits."""

import time

from rewards import get_reward_fn
from rewards.code_exec import extract_code, run_code_tests, split_tests

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]


def test_passing_and_failing_code():
    ok = run_code_tests("def add(a, b):\n    return a + b\n", TESTS, time_limit_s=5)
    assert (ok.passed, ok.total, ok.status) == (3, 3, "ok") and ok.fraction == 1.0
    half = run_code_tests("def add(a, b):\n    return a * b + (a == 0)\n", TESTS, time_limit_s=5)
    assert (half.passed, half.status) == (0, "ok")
    partial = run_code_tests("def add(a, b):\n    return abs(a + b)\n", TESTS + ["assert add(-2, 0) == -2"], time_limit_s=5)
    assert (partial.passed, partial.total) == (3, 4) and "test 3" in partial.detail
    broken = run_code_tests("def add(a, b) return a", TESTS, time_limit_s=5)
    assert broken.passed == 0 and broken.status == "error" and "SyntaxError" in broken.detail


def test_infinite_loop_is_killed_by_the_time_limit():
    t0 = time.monotonic()
    r = run_code_tests("while True:\n    pass\n", TESTS, time_limit_s=1.0)
    assert time.monotonic() - t0 < 4.0
    assert (r.passed, r.status) == (0, "timeout")
    # tests that passed before a later test hung still count
    r = run_code_tests("def add(a, b):\n    return a + b\n", [TESTS[0], "while True: pass"], time_limit_s=0.5)
    assert (r.passed, r.total, r.status) == (1, 2, "timeout")


def test_memory_bomb_is_stopped_by_the_memory_limit():
    t0 = time.monotonic()
    r = run_code_tests("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n", TESTS,
                       time_limit_s=5.0, memory_mb=256)
    assert time.monotonic() - t0 < 4.0
    assert (r.passed, r.status) == (0, "memory")
    r = run_code_tests("x = bytearray(4 * 2**30)\n", TESTS, time_limit_s=5.0, memory_mb=256)
    assert (r.passed, r.status) == (0, "memory")


def test_runs_in_a_temporary_directory(tmp_path):
    r = run_code_tests("import os\ncwd = os.getcwd()\nopen('x.txt', 'w').write('hi')\n",
                       ["assert os.path.basename(cwd).startswith('cispo_code_')", f"assert cwd != {str(tmp_path)!r}"])
    assert (r.passed, r.total) == (2, 2)


def test_registered_code_rewards():
    response = "Here you go:\n```python\ndef add(a, b):\n    return a + b if a >= 0 else 99\n```\nDone.<eos>"
    code, strict = get_reward_fn("code"), get_reward_fn("code_strict")
    assert code("", response, None, {"tests": TESTS}) == 2 / 3
    assert strict("", response, None, {"tests": TESTS}) == 0.0
    assert code("", response, "assert add(1, 2) == 3\nassert add(2, 2) == 4", {}) == 1.0  # tests from the answer
    assert strict("", response, "assert add(1, 2) == 3", {}) == 1.0
    assert code("", "```python\nwhile True: pass\n```", None, {"tests": TESTS, "time_limit_s": 0.5}) == 0.0


def test_extract_code_and_split_tests():
    assert extract_code("```\nplain\n```\n```python\nlast_py\n```\n```\nlater_plain\n```") == "last_py\n"
    assert extract_code("```\nonly_plain\n```") == "only_plain\n"
    assert extract_code("x = 1<eos>") == "x = 1"
    assert split_tests('["assert f()", "assert g()"]') == ["assert f()", "assert g()"]
    assert split_tests("assert a\n\nassert b") == ["assert a", "assert b"]
    assert split_tests("for i in range(3):\n    assert f(i)") == ["for i in range(3):\n    assert f(i)"]


def test_scorer_timeout_also_kills_the_code_child(tmp_path):
    import os

    from cispo.config import RewardConfig
    from rewards import RewardScorer

    pid_file = tmp_path / "child.pid"
    code = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    with RewardScorer(RewardConfig(functions=["code"], timeout_s=1.0, num_workers=1)) as scorer:
        res = scorer.score([{"prompt": "", "response": code, "answer": None,
                             "metadata": {"tests": TESTS, "time_limit_s": 60}}])
    assert res.rewards == [0.0] and "timeout after 1s" in res.failures[0][2]
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # dead, waiting to be reaped
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"code child {pid} outlived its killed reward worker")
