"""Reading the code reward's sandbox report (what rewards/sandbox_harness.py writes, one JSON
object a line) into a `Report`: the values of each test's leaves, setup errors, forbidden
actions and faults. Nothing in it is trusted: a value is rebuilt only from the plain tags the
harness encodes, and anything unexpected (a malformed value, a duplicate, a message after
"done", an unknown kind) marks the whole report bad. rewards/code_tests.py judges the tests on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from rewards.code_tests import TestPlan

MAX_DEPTH = 65  # nesting of a value the sandbox reports (its encoder stops at 64)
FLAG_KINDS = frozenset({"network", "escape attempt"})  # what rewards/sandbox_harness.py writes
FAULT_KINDS = frozenset({"syntax error", "solution error", "exit", "memory", "crash"})


class BadReport(Exception):
    """The sandbox's report is not what the harness writes (tampered with, or truncated)."""


def decode(x: Any, depth: int = 0) -> Any:
    """The plain value that `sandbox_harness.encode` encoded; BadReport for anything else."""
    if depth > MAX_DEPTH or type(x) is not list or len(x) != 2 or type(x[0]) is not str:
        raise BadReport("malformed value")
    tag, p = x
    try:
        if tag == "n":
            return None
        if tag == "b" and type(p) is bool:
            return p
        if tag == "i" and type(p) is str:
            return int(p, 16)
        if tag == "f" and type(p) is str:
            return float.fromhex(p)
        if tag == "c" and type(p) is list and len(p) == 2:
            return complex(float.fromhex(p[0]), float.fromhex(p[1]))
        if tag == "s" and type(p) is str:
            return p
        if tag == "y" and type(p) is str:
            return bytes.fromhex(p)
        if tag in ("l", "t", "S", "F") and type(p) is list:
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](decode(e, depth + 1) for e in p)
        if tag == "d" and type(p) is list:
            out = {}
            for pair in p:
                if type(pair) is not list or len(pair) != 2:
                    raise BadReport("malformed dict")
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            return out
    except (TypeError, ValueError, AttributeError) as e:  # unhashable set member, bad hex...
        raise BadReport(f"malformed value ({e})") from None
    raise BadReport(f"malformed value (tag {tag!r})")


@dataclass
class Report:
    values: dict = field(default_factory=dict)  # (test, leaf) -> (True, value) | (False, error)
    setup_errors: dict = field(default_factory=dict)  # test -> error
    flags: list = field(default_factory=list)  # [(kind, detail)]: forbidden actions
    fault: Optional[tuple[str, str]] = None  # (kind, detail) the harness reported
    done: bool = False
    bad: Optional[str] = None  # why the report cannot be trusted


def _int_field(msg: dict, key: str, bound: int) -> int:
    v = msg.get(key)
    if type(v) is not int or not 0 <= v < bound:
        raise BadReport(f"bad {key} {v!r}")
    return v


def _str_field(msg: dict, key: str) -> str:
    v = msg.get(key)
    if type(v) is not str:
        raise BadReport(f"bad {key}")
    return v[:300]


def _kind_field(msg: dict, kinds: frozenset) -> str:
    """A flag's or fault's kind: one the harness writes (never "ok": a run's status is not the sandbox's to set)."""
    v = msg.get("kind")
    if v not in kinds:
        raise BadReport(f"unknown kind {str(v)[:40]!r}")
    return v


def read_report(data: bytes, plans: tuple[TestPlan, ...]) -> Report:
    """Parse the harness's lines; anything unexpected (a duplicate, a message after "done",
    an unknown kind, a malformed value) sets `bad`."""
    rep = Report()
    lines = data.split(b"\n")
    if lines[-1]:
        rep.bad = "the report ends in the middle of a line"
    for line in lines[:-1]:
        try:
            msg = json.loads(line)
            if type(msg) is not dict:
                raise BadReport("not an object")
            kind = msg.get("k")
            if kind == "flag":  # may come from any process of the solution, also after "done"
                rep.flags.append((_kind_field(msg, FLAG_KINDS), _str_field(msg, "e")))
                continue
            if rep.done:
                raise BadReport(f"a {kind!r} message after 'done'")
            if kind == "done":
                rep.done = True
            elif kind == "fault":
                fault = (_kind_field(msg, FAULT_KINDS), _str_field(msg, "e"))
                rep.fault = rep.fault or fault
            elif kind in ("value", "leaf_error"):
                t = _int_field(msg, "t", len(plans))
                j = _int_field(msg, "leaf", len(plans[t].leaves))
                if (t, j) in rep.values:
                    raise BadReport(f"a second value for test {t} leaf {j}")
                rep.values[t, j] = (True, decode(msg.get("v"))) if kind == "value" else (False, _str_field(msg, "e"))
            elif kind == "setup_error":
                t = _int_field(msg, "t", len(plans))
                if t in rep.setup_errors:
                    raise BadReport(f"a second setup error for test {t}")
                rep.setup_errors[t] = _str_field(msg, "e")
            else:
                raise BadReport(f"unknown message kind {kind!r}")
        except (BadReport, ValueError, RecursionError) as e:  # ValueError: JSON
            rep.bad = rep.bad or f"{type(e).__name__}: {str(e)[:200]}"
    return rep
