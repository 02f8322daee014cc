"""The code reward's tests, split so that the verdict is computed outside the sandbox.

A test is a snippet of Python: setup statements and ``assert`` statements at its top level.
Each assert's expression is split into *leaves*, the largest sub-expressions that need the
solution (calls of its functions, its names, attribute and index access), which the sandbox
evaluates and sends back as plain data (rewards/sandbox_harness.py), and the *check* around
them, which this process evaluates on those values: literals, comparisons, ``and`` / ``or``
/ ``not``, arithmetic, and a few pure functions (`SAFE_CALLS`: len, sorted, abs, round,
math.isclose, isinstance, ...). For ``assert f(3) == 9`` the sandbox evaluates ``f(3)`` and
the 9 never enters it; an object with its own ``__eq__`` cannot be sent back at all.

A test of a form that cannot be split so is refused with `TestFormatError`, naming the test
and the reason (conservative: nothing is run for it):

- asserts only at the top level (not inside ``for``, ``if``, ``def``, ``with``, ``try``...), and
  at least one; setup statements are simple ones (assignments, calls, imports, del, pass);
- no comparison inside code that runs in the sandbox (a leaf or a setup statement), e.g.
  ``assert all(f(i) == i * i for i in range(5))`` or ``ok = f(3) == 9``: its outcome would be
  computed where the solution can forge it;
- in each comparison at most one side needs the sandbox: ``assert f(2) == f(3)`` is refused,
  one side must be a fixed value;
- ``is`` / ``is not`` only against None, True, False or a built-in type name.

A leaf used as a truth value (a bare ``assert f(x)``, ``not f(x)``, an operand of ``and`` /
``or``) must be exactly True or False. Setup statements and leaves run in the order they
appear, all of them (also a leaf that ``and`` / ``or`` would have skipped; an error there only
fails the test when its value is needed).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import operator
import reprlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

if TYPE_CHECKING:
    from rewards.code_report import Report

MAX_ITEMS = 10**6  # length of a sequence the check builds
MAX_BITS = 200_000  # size of an integer the check computes with (divisions are quadratic)
SETUP_STATEMENTS = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Import, ast.ImportFrom, ast.Delete,
                    ast.Pass)
TYPE_NAMES = {t.__name__: t for t in (int, float, complex, bool, str, bytes, list, tuple, dict, set, frozenset)}
MATH_CONSTANTS = {"math.pi": math.pi, "math.e": math.e, "math.tau": math.tau, "math.inf": math.inf,
                  "math.nan": math.nan}
NUMBERS = (bool, int, float, complex)


class TestFormatError(ValueError):
    """A test the code reward cannot check safely; the message names the test and why."""

    __test__ = False  # not a pytest class


class CheckFailed(Exception):
    """A test's check is false or cannot be computed (the message says which part)."""


# ---------------------------------------------------------------- the pure functions a check may call


def _round(x, ndigits=None):
    if ndigits is None:
        return round(x)
    if type(ndigits) is not int or abs(ndigits) > 100:
        raise ValueError(f"round(): ndigits {ndigits!r} out of range")
    return round(x, ndigits)


def _sum(items, start=0):
    items = list(items)
    if not all(isinstance(v, NUMBERS) for v in items + [start]):
        raise TypeError("sum() of non-numbers")
    return sum(items, start)


def _int(x, *base):
    if isinstance(x, (str, bytes)) and len(x) > 4300:
        raise ValueError("int() of a string longer than 4300 characters")
    return int(x, *base)


SAFE_CALLS: dict[str, tuple[Callable, frozenset]] = {  # name: (function, allowed keywords)
    "abs": (abs, frozenset()), "round": (_round, frozenset({"ndigits"})), "len": (len, frozenset()),
    "sorted": (sorted, frozenset({"reverse"})), "reversed": (lambda x: list(reversed(x)), frozenset()),
    "list": (list, frozenset()), "tuple": (tuple, frozenset()), "set": (set, frozenset()),
    "frozenset": (frozenset, frozenset()), "min": (min, frozenset()), "max": (max, frozenset()),
    "sum": (_sum, frozenset({"start"})), "all": (all, frozenset()), "any": (any, frozenset()),
    "bool": (bool, frozenset()), "int": (_int, frozenset()), "float": (float, frozenset()),
    "str": (str, frozenset()), "type": (type, frozenset()), "isinstance": (isinstance, frozenset()),
    "math.isclose": (math.isclose, frozenset({"rel_tol", "abs_tol"})), "math.sqrt": (math.sqrt, frozenset()),
    "math.floor": (math.floor, frozenset()), "math.ceil": (math.ceil, frozenset()),
    "math.fabs": (math.fabs, frozenset()),
}

BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitOr: operator.or_,
              ast.BitAnd: operator.and_, ast.BitXor: operator.xor}
COMPARE_OPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
               ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
               ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
    """`a op b` on plain data, refusing what could take unbounded time or memory here."""
    kind, fn = type(op), BINARY_OPS.get(type(op))
    if fn is None:
        raise TypeError(f"operator {type(op).__name__} is not supported in a check")
    if isinstance(a, NUMBERS) and isinstance(b, NUMBERS):
        if any(type(x) is int and x.bit_length() > MAX_BITS for x in (a, b)):
            raise ValueError("an integer too large to compute with")
        if kind is ast.Pow and type(a) is int and type(b) is int and abs(a) > 1 and a.bit_length() * abs(b) > MAX_BITS:
            raise ValueError("a power too large to compute")
        if kind is ast.LShift and isinstance(b, int) and b > MAX_BITS:
            raise ValueError("a shift too large to compute")
        return fn(a, b)
    if kind is ast.Add and type(a) is type(b) and isinstance(a, (str, bytes, list, tuple)):
        if len(a) + len(b) > MAX_ITEMS:
            raise ValueError("a sequence too long to build")
        return fn(a, b)
    if kind is ast.Mult and (isinstance(a, (str, bytes, list, tuple)) or isinstance(b, (str, bytes, list, tuple))):
        seq, n = (a, b) if isinstance(b, int) else (b, a)
        if not isinstance(n, int) or not isinstance(seq, (str, bytes, list, tuple)):
            raise TypeError(f"cannot multiply {type(a).__name__} by {type(b).__name__}")
        if len(seq) * max(n, 0) > MAX_ITEMS:
            raise ValueError("a sequence too long to build")
        return fn(a, b)
    if kind in (ast.Sub, ast.BitOr, ast.BitAnd, ast.BitXor) and all(isinstance(x, (set, frozenset)) for x in (a, b)):
        return fn(a, b)
    raise TypeError(f"unsupported operands for {kind.__name__}: {type(a).__name__} and {type(b).__name__}")


# ---------------------------------------------------------------- splitting a test


class LeafRef(ast.expr):
    """Stands in a check for a value the sandbox computes."""

    _fields = ("index",)


@dataclass(frozen=True)
class Check:
    source: str  # the assert's expression, for messages
    tree: ast.expr  # evaluated here, with LeafRef for the sandbox's values
    leaves: tuple[int, ...]


@dataclass(frozen=True)
class TestPlan:
    __test__ = False  # not a pytest class
    source: str
    steps: tuple  # for the sandbox: ["exec", source] | ["eval", source, leaf]
    leaves: tuple[str, ...]  # source of each leaf
    checks: tuple[Check, ...]


def _name(node: ast.expr) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def _is_type_spec(node: ast.expr) -> bool:
    if isinstance(node, ast.Tuple):
        return bool(node.elts) and all(_is_type_spec(e) for e in node.elts)
    return isinstance(node, ast.Name) and node.id in TYPE_NAMES


def _fixed(node: ast.expr) -> bool:
    """A value `is` may compare against."""
    if isinstance(node, ast.Constant):
        return node.value is None or node.value is True or node.value is False
    return isinstance(node, ast.Name) and node.id in TYPE_NAMES


def _has_leaf(node: ast.AST) -> bool:
    return any(isinstance(n, LeafRef) for n in ast.walk(node))


class _Splitter:
    def __init__(self, index: int, source: str):
        self.index, self.source = index, source
        self.leaves: list[str] = []
        self.steps: list[list] = []

    def refuse(self, node: ast.AST, why: str) -> TestFormatError:
        text = ast.unparse(node) if isinstance(node, ast.AST) else str(node)
        text = text if len(text) <= 120 else text[:117] + "..."
        return TestFormatError(f"code reward: test {self.index} cannot be checked safely: `{text}`: {why}")

    def check(self, stmt: ast.Assert) -> Check:
        first = len(self.leaves)
        tree = self.split(stmt.test)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if sum(_has_leaf(o) for o in operands) > 1:
                    raise self.refuse(stmt.test, "more than one side of the comparison is computed in the sandbox "
                                                 "(names the test assigns count too); compare against a fixed value, "
                                                 "e.g. `assert f(3) == 9`")
                for op, a, b in zip(node.ops, operands, operands[1:]):
                    if isinstance(op, (ast.Is, ast.IsNot)) and not (_fixed(a) or _fixed(b)):
                        raise self.refuse(stmt.test, "`is` only against None, True, False or a type name")
        return Check(ast.unparse(stmt.test), tree, tuple(range(first, len(self.leaves))))

    def split(self, node: ast.expr) -> ast.expr:
        if isinstance(node, ast.Constant) or (isinstance(node, ast.Name) and node.id in TYPE_NAMES):
            return node
        if isinstance(node, ast.Attribute) and _name(node) in MATH_CONSTANTS:
            return node
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and not any(isinstance(e, ast.Starred) for e in node.elts):
            return type(node)(elts=[self.split(e) for e in node.elts], ctx=ast.Load())
        if isinstance(node, ast.Dict) and None not in node.keys:
            return ast.Dict(keys=[self.split(k) for k in node.keys], values=[self.split(v) for v in node.values])
        if isinstance(node, ast.UnaryOp):
            return ast.UnaryOp(op=node.op, operand=self.split(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
            return ast.BinOp(left=self.split(node.left), op=node.op, right=self.split(node.right))
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(op=node.op, values=[self.split(v) for v in node.values])
        if isinstance(node, ast.Compare):
            return ast.Compare(left=self.split(node.left), ops=node.ops,
                               comparators=[self.split(c) for c in node.comparators])
        if isinstance(node, ast.Call) and self._safe_call(node):
            args = [self.split(a) for a in node.args]
            if _name(node.func) == "isinstance":
                args[1] = node.args[1]
            return ast.Call(func=node.func, args=args,
                            keywords=[ast.keyword(arg=k.arg, value=self.split(k.value)) for k in node.keywords])
        return self.leaf(node)

    @staticmethod
    def _safe_call(node: ast.Call) -> bool:
        name = _name(node.func)
        if name not in SAFE_CALLS or any(isinstance(a, ast.Starred) for a in node.args):
            return False
        if any(k.arg not in SAFE_CALLS[name][1] for k in node.keywords):
            return False
        return name != "isinstance" or (len(node.args) == 2 and _is_type_spec(node.args[1]))

    def leaf(self, node: ast.expr) -> LeafRef:
        if any(isinstance(n, ast.Compare) for n in ast.walk(node)):
            raise self.refuse(node, "a comparison inside code that runs in the sandbox, where the solution could "
                                    "forge its outcome; compare at the top level of the assert instead")
        j = len(self.leaves)
        source = ast.unparse(node)
        self.leaves.append(source)
        self.steps.append(["eval", source, j])
        return LeafRef(index=j)


def plan_test(index: int, source: str) -> TestPlan:
    """Split one test (see the module docstring); raises `TestFormatError` naming the test."""
    sp = _Splitter(index, source)
    try:
        tree = ast.parse(source, mode="exec")
    except (SyntaxError, ValueError) as e:
        raise TestFormatError(f"code reward: test {index} is not valid Python: {e}") from None
    checks = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assert):
            checks.append(sp.check(stmt))
        elif isinstance(stmt, SETUP_STATEMENTS):
            if any(isinstance(n, ast.Compare) for n in ast.walk(stmt)):
                raise sp.refuse(stmt, "a comparison in a setup statement would run in the sandbox, where the "
                                      "solution could forge its outcome; put comparisons in top-level asserts")
            sp.steps.append(["exec", ast.unparse(stmt)])
        else:
            raise sp.refuse(stmt, f"a `{type(stmt).__name__}` statement; asserts must be at the top level of a test "
                                  "and other statements simple ones (assignments, calls, imports)")
    if not checks:
        raise sp.refuse(source.strip() or "<empty>", "no assert statement")
    return TestPlan(source, tuple(sp.steps), tuple(sp.leaves), tuple(checks))


@functools.lru_cache(maxsize=4096)
def plan_tests(tests: tuple[str, ...]) -> tuple[TestPlan, ...]:
    return tuple(plan_test(i, t) for i, t in enumerate(tests))


def split_tests(tests: Union[str, Sequence[str], None]) -> list[str]:
    """The tests of a row: a list of snippets, a JSON list of them, or a string (one test per
    line when every non-empty line starts with ``assert``, else the whole string is one test)."""
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


def check_tests(tests: Union[str, Sequence[str], None]) -> None:
    """Raise `TestFormatError` for the first test of a row's `tests` that cannot be checked safely
    (for loaders that want to refuse such rows up front)."""
    plan_tests(tuple(split_tests(tests)))


# ---------------------------------------------------------------- evaluating a check


def _short(v: Any) -> str:
    try:
        return reprlib.repr(v)
    except ValueError:  # an int beyond the 4300-digit str limit
        return f"<{type(v).__name__}>"


class _Evaluator:
    def __init__(self, plan: TestPlan, values: Callable[[int], Optional[tuple]]):
        self.plan, self.values = plan, values

    def leaf(self, j: int) -> Any:
        got = self.values(j)
        if got is None:
            raise CheckFailed(f"`{self.plan.leaves[j]}` was not evaluated")
        ok, value = got
        if not ok:
            raise CheckFailed(f"`{self.plan.leaves[j]}` {value}")
        return value

    def truth(self, node: ast.expr, value: Any) -> bool:
        if isinstance(node, LeafRef) and type(value) is not bool:
            raise CheckFailed(f"`{self.plan.leaves[node.index]}` gave {_short(value)}, expected True or False")
        return bool(value)

    def eval(self, node: ast.expr) -> Any:
        if isinstance(node, LeafRef):
            return self.leaf(node.index)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return TYPE_NAMES[node.id]
        if isinstance(node, ast.Attribute):
            return MATH_CONSTANTS[_name(node)]
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [self.eval(e) for e in node.elts]
            return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
        if isinstance(node, ast.Dict):
            return {self.eval(k): self.eval(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.UnaryOp):
            v = self.eval(node.operand)
            if isinstance(node.op, ast.Not):
                return not self.truth(node.operand, v)
            if not isinstance(v, NUMBERS) or (isinstance(node.op, ast.Invert) and not isinstance(v, int)):
                raise TypeError(f"bad operand type for unary {type(node.op).__name__}: {type(v).__name__}")
            return {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}[type(node.op)](v)
        if isinstance(node, ast.BinOp):
            return _binop(node.op, self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.BoolOp):
            value = None
            for operand in node.values:
                value = self.eval(operand)
                if self.truth(operand, value) == isinstance(node.op, ast.Or):
                    return value
            return value
        if isinstance(node, ast.Compare):
            left = self.eval(node.left)
            for op, comparator in zip(node.ops, node.comparators):
                right = self.eval(comparator)
                if not COMPARE_OPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call):
            fn = SAFE_CALLS[_name(node.func)][0]
            args = [self.eval(a) for a in node.args]
            if fn is isinstance:
                args[1] = self._types(node.args[1])
            return fn(*args, **{k.arg: self.eval(k.value) for k in node.keywords})
        raise TypeError(f"cannot evaluate a {type(node).__name__} in a check")  # _Splitter never makes one

    @staticmethod
    def _types(node: ast.expr):
        return tuple(TYPE_NAMES[e.id] for e in node.elts) if isinstance(node, ast.Tuple) else TYPE_NAMES[node.id]


def judge(plan: TestPlan, t: int, report: Report) -> Optional[str]:
    """None when test `t` passed, else why it failed."""
    if t in report.setup_errors:
        return f"test {t}: a setup statement raised {report.setup_errors[t]}"
    ev = _Evaluator(plan, lambda j: report.values.get((t, j)))
    for check in plan.checks:
        try:
            if ev.truth(check.tree, ev.eval(check.tree)):
                continue
        except CheckFailed as e:
            return f"test {t}: {e}"
        except Exception as e:  # noqa: BLE001 - TypeError, ZeroDivisionError... of the check on these values
            return f"test {t}: `{check.source}`: {type(e).__name__}: {str(e)[:200]}"
        got = ", ".join(f"`{plan.leaves[j]}` = {_short(report.values[t, j][1])}" for j in check.leaves[:3]
                        if report.values.get((t, j), (False,))[0])
        return f"test {t}: `{check.source}` is false" + (f" ({got})" if got else "")
    return None
