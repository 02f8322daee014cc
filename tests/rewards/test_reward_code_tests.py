"""Splitting the code reward's tests (what runs in the sandbox, what is judged here), judging
them on given values, and reading the sandbox's report -- no sandbox needed."""

import json
import math

import pytest

from rewards.code_report import BadReport, Report, decode, read_report
from rewards.code_tests import TestFormatError, check_tests, judge, plan_test, split_tests


@pytest.mark.parametrize("test, why", [
    ("for i in range(3):\n    assert f(i) == i", "a `For` statement"),
    ("def check(c):\n    assert c(1) == 2\ncheck(f)", "a `FunctionDef` statement"),
    ("assert all(f(i) == i * i for i in range(5))", "a comparison inside code that runs in the sandbox"),
    ("assert check(f(3), lambda v: v == 9)", "a comparison inside code that runs in the sandbox"),
    ("ok = f(3) == 9\nassert ok", "a comparison in a setup statement"),
    ("assert f(2) == f(3)", "more than one side of the comparison is computed in the sandbox"),
    ("i = 3\nassert f(i) == i * i", "more than one side of the comparison is computed in the sandbox"),
    ("expected = [1, 2]\nassert f(3) == expected", "more than one side of the comparison is computed in the sandbox"),
    ("assert f(2) is 5", "`is` only against None, True, False or a type name"),
    ("x = f(3)", "no assert statement"),
    ("assert f(", "is not valid Python"),
])
def test_tests_that_cannot_be_judged_outside_are_refused(test, why):
    with pytest.raises(TestFormatError, match="test 4") as err:
        plan_test(4, test)
    assert why in str(err.value)


def test_check_tests_names_the_first_bad_test():
    check_tests(["assert f(1) == 1", "x = [3, 1]\nf(x)\nassert x == [1, 3]"])
    with pytest.raises(TestFormatError, match="test 1 cannot be checked safely: `f\\(2\\) == f\\(3\\)`"):
        check_tests('["assert f(1) == 1", "assert f(2) == f(3)"]')


def test_expected_values_stay_outside():
    plan = plan_test(0, "assert f(2) == 12345")
    assert plan.leaves == ("f(2)",) and plan.steps == (["eval", "f(2)", 0],)
    plan = plan_test(0, "assert abs(f(x) - 3.14159) < 1e-6 and sorted(g([2, 1])) == sorted([9876, 5432])")
    assert plan.leaves == ("f(x)", "g([2, 1])")
    assert "3.14159" not in json.dumps(plan.steps) and "9876" not in json.dumps(plan.steps)
    plan = plan_test(0, "x = [3, 1]\nsort_in_place(x)\nassert x == [1, 3]\nassert Solution().run(x)[0] is None")
    assert plan.steps == (["exec", "x = [3, 1]"], ["exec", "sort_in_place(x)"], ["eval", "x", 0],
                          ["eval", "Solution().run(x)[0]", 1])
    plan = plan_test(0, "assert isinstance(f(1), (int, float)) and math.isclose(f(2), 0.5, rel_tol=1e-3)")
    assert plan.leaves == ("f(1)", "f(2)")


def judged(test: str, *values) -> str:
    """judge(test) on leaf values given here: a value, or an Exception for a leaf that raised."""
    plan = plan_test(0, test)
    report = Report(values={(0, j): (False, f"raised {v!r}") if isinstance(v, Exception) else (True, v)
                            for j, v in enumerate(values)})
    return judge(plan, 0, report) or "passed"


def test_judging_on_given_values():
    assert judged("assert f(1) == 3", 3) == "passed"
    assert judged("assert f(1) == 3", 3.0) == "passed"  # Python's equality
    assert judged("assert f(1) == 3", 4) == "test 0: `f(1) == 3` is false (`f(1)` = 4)"
    assert judged("assert f(1) == 3", ValueError("x")).startswith("test 0: `f(1)` raised ValueError")
    assert judged("assert abs(f(1) - 0.3) < 1e-9", 0.1 + 0.2) == "passed"
    assert judged("assert math.isclose(f(1), math.pi, rel_tol=1e-6)", 3.1415926) == "passed"
    assert judged("assert f(1) == math.inf or f(2)", math.inf, "unused") == "passed"
    assert judged("assert sorted(f(1)) == [1, 2, 3] and 2 in f(2)", [3, 1, 2], {2}) == "passed"
    assert judged("assert f(1) == {'a': (1, 2), 'b': {3}}", {"a": (1, 2), "b": {3}}) == "passed"
    assert judged("assert isinstance(f(1), (int, float)) and type(f(2)) is str", 2.5, "x") == "passed"
    assert judged("assert len(f(1)) == 2 and f(1)[0] == 'a'", ["a", "b"], "a") == "passed"


def test_truth_values_from_the_sandbox_must_be_bools():
    assert judged("assert f(1)", True) == "passed"
    assert judged("assert f(1)", 1) == "test 0: `f(1)` gave 1, expected True or False"
    assert judged("assert not f(1)", False) == "passed"
    assert judged("assert not f(1)", []) == "test 0: `f(1)` gave [], expected True or False"
    # `or` / `and` short-circuit here: a leaf whose value is not needed may have raised
    assert judged("assert f(1) is None or f(1)[0] == 1", None, TypeError("not subscriptable")) == "passed"
    assert judged("assert f(1) and g(2)", False, TypeError("x")).startswith("test 0: `f(1) and g(2)` is false")


def test_checks_refuse_unbounded_work():
    assert "a power too large" in judged("assert f(1) ** 10 ** 8 == 5", 3)
    assert "a sequence too long" in judged("assert f(1) * 10 ** 9 == []", [0])
    assert "ndigits" in judged("assert round(f(1), -10 ** 9) == 0", 5)
    assert "sum() of non-numbers" in judged("assert sum(f(1), []) == []", [[1]] * 3)
    assert "unsupported operands" in judged("assert f(1) % 5 == ''", "%999999999d")
    assert judged("assert f(1) == 2 ** 5000", 2**5000) == "passed"


def test_decode_plain_values_and_refuse_anything_else():
    assert decode(["l", [["i", "-0x10"], ["f", "nan"], ["f", (-0.0).hex()], ["c", ["0x1p+0", "-0x1p+1"]],
                         ["s", "\udc80"], ["y", "ff00"], ["n", 0], ["b", True]]])[2:] == [
        -0.0, complex(1, -2), "\udc80", b"\xff\x00", None, True]
    assert math.isnan(decode(["f", "nan"]))
    assert decode(["d", [[["t", [["i", "0x1"]]], ["F", [["s", "a"]]]]]]) == {(1,): frozenset({"a"})}
    assert decode(["i", hex(3**40000)]) == 3**40000
    for bad in (["S", [["l", []]]], ["x", 1], ["i", 5], ["l", "abc"], ["d", [[["n", 0]]]], "s", ["b", 1]):
        with pytest.raises(BadReport):
            decode(bad)
    deep = ["n", 0]
    for _ in range(70):
        deep = ["l", [deep]]
    with pytest.raises(BadReport):
        decode(deep)


def test_reports_that_cannot_be_trusted():
    plans = (plan_test(0, "assert f(1) == 1"), plan_test(1, "assert f(2) == 2"))

    def line(**m):
        return json.dumps(m).encode() + b"\n"

    good = line(k="value", t=0, leaf=0, v=["i", "0x1"]) + line(k="leaf_error", t=1, leaf=0, e="raised X")
    rep = read_report(good + line(k="done") + line(k="flag", kind="network", e="late child"), plans)
    assert rep.bad is None and rep.done and rep.values[0, 0] == (True, 1) and rep.flags == [("network", "late child")]
    assert judge(plans[0], 0, rep) is None and judge(plans[1], 1, rep) == "test 1: `f(2)` raised X"
    for tail, why in [(line(k="value", t=0, leaf=0, v=["i", "0x1"]), "a second value"),
                      (line(k="done") + line(k="done"), "after 'done'"),
                      (line(k="value", t=5, leaf=0, v=["n", 0]), "bad t"),
                      (line(k="value", t=1, leaf=3, v=["n", 0]), "bad leaf"),
                      (line(k="pass", t=1), "unknown message kind"),
                      (b'{"k": "value", "t": 1, "le', "ends in the middle of a line"),
                      (b"not json\n", "JSONDecodeError"),
                      (line(k="flag", kind="ok", e="all fine"), "unknown kind 'ok'"),
                      (line(k="fault", kind="ok", e="all fine"), "unknown kind 'ok'")]:
        assert why in read_report(good + tail, plans).bad


def test_split_tests():
    assert split_tests('["assert f()", "assert g()"]') == ["assert f()", "assert g()"]
    assert split_tests("assert a\n\nassert b") == ["assert a", "assert b"]
    assert split_tests("x = 1\nassert f(x)") == ["x = 1\nassert f(x)"]
    assert split_tests(None) == [] and split_tests(("assert a",)) == ["assert a"]
