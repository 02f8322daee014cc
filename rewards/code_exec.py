"""Code reward: run the response's Python code against a row's tests in a bubblewrap sandbox.

Reward names: "code" (fraction of tests passed) and "code_strict" (1 if all pass, else 0).

Tests come from ``metadata["tests"]`` or, without it, from the gold ``answer``: a list of
snippets, or a string (one test per line when every non-empty line starts with ``assert``,
otherwise the whole string is one test). A test passes when its setup statements run and
each of its asserts holds.

Security model (hostile code, as a policy under RL pressure writes it):

- The solution runs in a sandbox (rewards/sandbox.py): no network, the system read-only and
  most of it absent (no repo, no datasets, no host /tmp), one private writable work dir, a
  PID namespace that is killed after every call so no process outlives it, a non-root uid,
  and CPU, memory, file-size, file-count, process-count and output limits.
- The verdict is computed here, never inside: each assert is split (rewards/code_tests.py)
  into the values the solution must produce, which the sandbox evaluates and sends back as
  plain data, and the check around them, which this process evaluates. The expected values
  never enter the sandbox; an object with its own ``__eq__`` cannot be sent back; printed
  "passed" lines, patched builtins or frames, exit tricks change nothing here. A test that
  cannot be split so (a comparison inside a loop, a helper that compares) is refused with
  `TestFormatError` naming it.
- A run that does not end cleanly scores 0 through the scorer's failure path: the reward
  function raises `CodeRunFailed` with a reason string ("timeout: ...", "memory: ...",
  "output limit: ...", "disk: ...", "network: ...", "escape attempt: ...",
  "syntax error: ...", "solution error: ...", "exit: ...", "crash: ...", "bad report: ...")
  that the scorer records in ``reward/failures`` and logs. This includes runs where some
  tests passed before the limit was hit, any attempt at a forbidden action (network,
  writing outside the work dir, reading outside the system folders, killing processes it
  did not start, running external programs, ctypes, gc / frame-table introspection,
  replacing builtins), which is also blocked, and processes left running after the tests.
  A wrong value or an exception in a test is no failure: that test just does not pass.
- Without a usable ``bwrap`` the reward refuses to start (`SandboxUnavailable`, saying what
  to install); it never runs code unsandboxed.

Limits per row from metadata: ``time_limit_s`` (default 5, wall clock for the whole run)
and ``memory_mb`` (default 512); keep ``time_limit_s`` below ``reward.timeout_s``. Solutions
get the standard library of the trainer's Python version, no third-party packages.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from rewards.code_report import read_report
from rewards.code_tests import TestFormatError, check_tests, judge, plan_tests, split_tests
from rewards.registry import register
from rewards.sandbox import Limits, RunOutput, SandboxUnavailable, require_sandbox, run_python
from rewards.verifiers import strip_eos

__all__ = ["CodeResult", "CodeRunFailed", "SandboxUnavailable", "TestFormatError", "check_tests", "extract_code",
           "run_code_tests", "split_tests"]

DEFAULT_TIME_LIMIT_S = 5.0
DEFAULT_MEMORY_MB = 512
HARNESS = (Path(__file__).parent / "sandbox_harness.py").read_text()
DONE_LINE = json.dumps({"k": "done"}).encode()  # the harness's last line


class CodeRunFailed(RuntimeError):
    """The solution's run did not end cleanly; the message starts with the reason ("timeout: ...")."""


@dataclass
class CodeResult:
    passed: int
    total: int
    # "ok" (every test was checked), "no_tests", or why the run failed: "timeout", "memory",
    # "output limit", "disk", "network", "escape attempt", "syntax error", "solution error",
    # "exit", "crash", "bad report"
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


def run_code_tests(
    code: str,
    tests: Union[str, Sequence[str], None],
    *,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> CodeResult:
    """Run `code` and `tests` in the sandbox; count the tests that pass (judged here, not inside).

    Raises `TestFormatError` for a test that cannot be checked safely and `SandboxUnavailable`
    without bubblewrap.
    """
    test_list = split_tests(tests)
    if not test_list:
        return CodeResult(0, 0, "no_tests", "no tests given")
    plans = plan_tests(tuple(test_list))
    payload = json.dumps({"code": code, "tests": [list(p.steps) for p in plans]}).encode()
    limits = Limits(time_s=float(time_limit_s), memory_mb=int(memory_mb))
    run = run_python(HARNESS, payload, limits, end_line=DONE_LINE)
    report = read_report(run.results, plans)
    verdicts = [judge(p, t, report) for t, p in enumerate(plans)]
    passed = sum(v is None for v in verdicts)
    status, detail = _status(run, report)
    if status == "ok":
        detail = next((v for v in verdicts if v is not None), "")
    return CodeResult(passed, len(plans), status, detail)


def _status(run: RunOutput, report) -> tuple[str, str]:
    """Why the run failed, most telling first: a forbidden action, a limit the parent enforced,
    what the harness reported, a report that cannot be trusted, an early end."""
    if report.flags:
        return report.flags[0]
    if run.fault:
        return run.fault, run.detail
    if report.fault:
        return report.fault
    if report.bad:
        return "bad report", report.bad
    if report.done:
        return "ok", ""
    tail = run.output.decode("utf-8", "replace").strip().splitlines()
    last = tail[-1][:200] if tail else ""
    code = run.exit_code
    if code is not None and code > 128:
        sig = code - 128
        if sig == signal.SIGXCPU:
            return "timeout", "killed by the CPU-time limit (SIGXCPU)"
        if any("MemoryError" in ln or "Cannot allocate memory" in ln for ln in tail):
            return "memory", f"killed by signal {sig} under the memory limit"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return "crash", f"killed by {name}" + (f": {last}" if last else "")
    return "exit", f"the program ended before the tests finished (exit code {code})" + (f": {last}" if last else "")


def _run_from_sample(response: str, answer: Optional[str], metadata: dict) -> CodeResult:
    tests = metadata.get("tests", answer)
    result = run_code_tests(
        extract_code(response),
        tests,
        time_limit_s=float(metadata.get("time_limit_s", DEFAULT_TIME_LIMIT_S)),
        memory_mb=int(metadata.get("memory_mb", DEFAULT_MEMORY_MB)),
    )
    if result.status == "no_tests":
        raise ValueError("code reward: the sample has no tests (metadata['tests'] or answer)")
    if result.status != "ok":
        raise CodeRunFailed(f"{result.status}: {result.detail}")
    return result


def code_reward(prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
    """Fraction of the tests the response's code passes (a failed run raises `CodeRunFailed`: reward 0)."""
    return _run_from_sample(response, answer, metadata).fraction


def code_strict_reward(prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
    """1 if the response's code passes every test, else 0."""
    result = _run_from_sample(response, answer, metadata)
    return float(result.total > 0 and result.passed == result.total)


# Factories, so that resolving the reward (the scorer does it at start-up) checks the sandbox.
@register("code", factory=True)
def make_code_reward(cfg=None):
    require_sandbox()
    return code_reward


@register("code_strict", factory=True)
def make_code_strict_reward(cfg=None):
    require_sandbox()
    return code_strict_reward
