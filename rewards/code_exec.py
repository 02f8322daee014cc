"""Code reward: run the response's Python code and test asserts in a limited subprocess.

Reward names: "code" (fraction of tests passed) and "code_strict" (1 if all pass, else 0).

Tests come from ``metadata["tests"]`` or, without it, from the gold ``answer``: a list of
snippets, or a string (when every non-empty line starts with ``assert`` each line is
one test, otherwise the whole string is one test). Each test runs in the namespace
left by the solution code; a test passes when it runs without raising.

The child is ``python -I`` in a fresh temporary working directory, in its own process
session, with a minimal environment and resource limits set in ``preexec_fn``:
RLIMIT_AS (``memory_mb``, default 512), RLIMIT_CPU (``time_limit_s`` + 1), RLIMIT_FSIZE
(16 MiB), RLIMIT_CORE (0), and on Linux PR_SET_PDEATHSIG so it dies with the reward
worker that started it (e.g. when the scorer kills a worker at its timeout); a wall-clock limit of ``time_limit_s`` (default 5 s) kills the
whole process group. Each test that passes is reported as it finishes, so tests passed
before a later one hangs still count. Both limits can be set per row in metadata (``time_limit_s``,
``memory_mb``); keep ``time_limit_s`` below ``reward.timeout_s``. This bounds accidents
(infinite loops, memory bombs, runaway output), it is not a security sandbox against
hostile code: the child can still use the network and read the file system.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from rewards.registry import register
from rewards.verifiers import strip_eos

DEFAULT_TIME_LIMIT_S = 5.0
DEFAULT_MEMORY_MB = 512
MAX_FILE_BYTES = 16 << 20
MAX_OUTPUT_BYTES = 1 << 20

_HARNESS = r'''
import json, os, sys, traceback
_nonce = os.environ.pop("CISPO_NONCE")
_out = sys.stdout
def _emit(kind, i, info=""):
    _out.write("%s %s %d %s\n" % (_nonce, kind, i, json.dumps(info)))
    _out.flush()
with open("tests.json") as f:
    _tests = json.load(f)
with open("solution.py") as f:
    _code = f.read()
sys.path.insert(0, os.getcwd())
_ns = {"__name__": "solution"}
try:
    exec(compile(_code, "solution.py", "exec"), _ns)
except MemoryError:
    _emit("memory", -1, "MemoryError in solution code")
    sys.exit(0)
except BaseException as e:
    _emit("error", -1, "%s: %s" % (type(e).__name__, str(e)[:300]))
    sys.exit(0)
for _i, _t in enumerate(_tests):
    try:
        exec(compile(_t, "test_%d" % _i, "exec"), _ns)
        _emit("pass", _i)
    except MemoryError:
        _emit("memory", _i, "MemoryError in test %d" % _i)
    except BaseException as e:
        _emit("fail", _i, "%s: %s" % (type(e).__name__, str(e)[:300]))
_emit("done", len(_tests))
'''


@dataclass
class CodeResult:
    passed: int
    total: int
    # "ok" (ran to the end), "error" (the solution raised), "timeout" (wall or CPU limit),
    # "memory" (memory limit), "crash" (died otherwise), "no_tests"
    status: str
    detail: str = ""

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def extract_code(response: str) -> str:
    """The last fenced ```python block of `response` (or the last ``` block, or the whole text)."""
    text = strip_eos(response)
    blocks = re.findall(r"```[ \t]*(python|py|python3)?[ \t]*\n(.*?)```", text, flags=re.DOTALL | re.IGNORECASE)
    if blocks:
        python = [code for lang, code in blocks if lang]
        return (python or [code for _, code in blocks])[-1]
    return text


def split_tests(tests: Union[str, Sequence[str], None]) -> list[str]:
    if tests is None:
        return []
    if isinstance(tests, str):
        s = tests.strip()
        if s.startswith("["):
            try:
                loaded = json.loads(s)
                if isinstance(loaded, list):
                    return [str(t) for t in loaded]
            except json.JSONDecodeError:
                pass
        lines = [ln for ln in s.splitlines() if ln.strip()]
        if lines and all(ln.lstrip().startswith("assert") for ln in lines):
            return [ln.strip() for ln in lines]
        return [s] if s else []
    return [str(t) for t in tests]


def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


def _limits(time_limit_s: float, memory_mb: int):
    import resource

    prctl = _libc_prctl()

    def apply() -> None:
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the reward worker if it is killed
        cpu = int(math.ceil(time_limit_s)) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        mem = int(memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_code_tests(
    code: str,
    tests: Union[str, Sequence[str], None],
    *,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> CodeResult:
    """Run `code` then each test in a limited child process; count the tests that pass."""
    test_list = split_tests(tests)
    if not test_list:
        return CodeResult(0, 0, "no_tests", "no tests given")
    nonce = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="cispo_code_") as tmp:
        with open(os.path.join(tmp, "solution.py"), "w") as f:
            f.write(code)
        with open(os.path.join(tmp, "tests.json"), "w") as f:
            json.dump(test_list, f)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "CISPO_NONCE": nonce, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _HARNESS],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_limits(time_limit_s, memory_mb),
            start_new_session=True,
        )
        timed_out = False
        try:
            out, err = proc.communicate(timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
    return _parse(out[-MAX_OUTPUT_BYTES:], err[-4000:], nonce, len(test_list), proc.returncode, timed_out, time_limit_s)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _parse(out: bytes, err: bytes, nonce: str, total: int, rc: Optional[int], timed_out: bool, limit: float) -> CodeResult:
    passed, status, detail = set(), None, ""
    for line in out.decode("utf-8", "replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[0] != nonce:
            continue
        kind, i = parts[1], int(parts[2])
        info = json.loads(parts[3]) if len(parts) > 3 else ""
        if kind == "pass":
            passed.add(i)
        elif kind == "done":
            status = status or "ok"
        elif kind == "memory":
            status, detail = "memory", info
        elif kind == "error":
            status, detail = "error", info
        elif kind == "fail" and not detail:
            detail = f"test {i}: {info}"
    if timed_out:
        status, detail = "timeout", f"killed after the {limit:g}s wall-clock limit"
    elif rc is not None and rc < 0 and status != "ok":
        sig = -rc
        if sig == signal.SIGXCPU:
            status, detail = "timeout", "killed by the CPU-time limit (SIGXCPU)"
        elif sig in (signal.SIGSEGV, signal.SIGKILL, signal.SIGABRT) and b"MemoryError" in err:
            status, detail = "memory", f"killed by signal {sig} under the memory limit"
        else:
            status, detail = "crash", f"killed by signal {sig}"
    elif status is None:
        tail = err.decode("utf-8", "replace").strip().splitlines()
        if any("MemoryError" in ln or "Cannot allocate memory" in ln for ln in tail):
            status = "memory"
        else:
            status = "crash"
        detail = f"exit code {rc}: {tail[-1] if tail else ''}"
    return CodeResult(len(passed), total, status, detail)


def _run_from_sample(response: str, answer: Optional[str], metadata: dict) -> CodeResult:
    tests = metadata.get("tests", answer)
    return run_code_tests(
        extract_code(response),
        tests,
        time_limit_s=float(metadata.get("time_limit_s", DEFAULT_TIME_LIMIT_S)),
        memory_mb=int(metadata.get("memory_mb", DEFAULT_MEMORY_MB)),
    )


@register("code")
def code_reward(prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
    """Fraction of the tests the response's code passes.

    Tests that passed before a limit was hit (time, memory) or the child crashed still count.
    """
    result = _run_from_sample(response, answer, metadata)
    if result.status == "no_tests":
        raise ValueError("code reward: the sample has no tests (metadata['tests'] or answer)")
    return result.fraction


@register("code_strict")
def code_strict_reward(prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
    """1 if the response's code passes every test, else 0."""
    result = _run_from_sample(response, answer, metadata)
    if result.status == "no_tests":
        raise ValueError("code reward: the sample has no tests (metadata['tests'] or answer)")
    return float(result.total > 0 and result.passed == result.total)
