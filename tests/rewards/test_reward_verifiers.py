"""Verifiers called directly (no scorer): math via math-verify, exact, numeric, format, builtin; the registry."""

import pytest

from rewards import RewardFunctionError, available, get_reward_fn, register
from rewards.verifiers import builtin_answer, last_boxed, parse_number

math_fn = get_reward_fn("math")


@pytest.mark.parametrize(
    "gold, response",
    [
        ("1/2", "so the answer is \\boxed{0.5}"),
        ("\\frac{1}{2}", "\\boxed{1/2}"),
        ("0.5", "<think>half</think> \\boxed{\\frac{1}{2}}"),
        ("x^2+2x+1", "expanding, \\boxed{(x+1)^2}"),
        ("\\sqrt{2}", "\\boxed{2^{1/2}}"),
        ("\\{1,2\\}", "\\boxed{\\{2,1\\}}"),
        ("10%", "\\boxed{0.1}"),
        ("7", "The final answer is 7."),
        ("\\boxed{3}", "first \\boxed{2}, no wait: \\boxed{3}<eos>"),  # the last box counts
    ],
)
def test_math_accepts_equivalent_forms(gold, response):
    assert math_fn("", response, gold, {}) == 1.0


@pytest.mark.parametrize(
    "gold, response",
    [
        ("1/2", "\\boxed{0.49}"),
        ("3", "\\boxed{4}"),
        ("\\pi", "\\boxed{3.14159}"),
        ("x^2+2x+1", "\\boxed{(x-1)^2}"),
        ("3", "first \\boxed{3}, then \\boxed{5}"),  # only the last box counts
        ("3", "I do not know"),
    ],
)
def test_math_rejects_wrong_answers(gold, response):
    assert math_fn("", response, gold, {}) == 0.0


def test_math_unparseable_gold_raises():
    with pytest.raises(ValueError, match="gold answer"):
        math_fn("", "\\boxed{1}", "  ", {})


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None


def test_exact_and_numeric():
    exact = get_reward_fn("exact_match")
    assert exact("", "  Paris <eos>", "Paris", {}) == 1.0
    assert exact("", "\\boxed{Paris}", "Paris", {}) == 1.0
    assert exact("", "paris", "Paris", {}) == 0.0
    assert exact("", "paris", "Paris", {"ignore_case": True}) == 1.0
    num = get_reward_fn("numeric_match")
    assert num("", "it is 3.0000001", "3", {}) == 1.0
    assert num("", "\\boxed{1,000}", "1000", {}) == 1.0
    assert num("", "about 3.1", "3.14", {}) == 0.0
    assert num("", "about 3.1", "3.14", {"atol": 0.05}) == 1.0
    assert num("", "no number", "3", {}) == 0.0
    assert parse_number("\\frac{1}{4}") == 0.25 and parse_number("12.5%") == 0.125 and parse_number("x") is None


def test_format():
    fmt = get_reward_fn("format")
    assert fmt("", "<think>add them</think> so \\boxed{7}", None, {}) == 1.0
    assert fmt("", "<think>a</think>\\boxed{7}<eos>", None, {}) == 1.0
    assert fmt("", "\\boxed{7}", None, {}) == 0.0  # no think block
    assert fmt("", "<think>a</think> 7", None, {}) == 0.0  # no box
    assert fmt("", "<think>a \\boxed{7}</think>", None, {}) == 0.0  # box inside the thinking
    assert fmt("", "<think>a</think><think>b</think>\\boxed{7}", None, {}) == 0.0
    assert fmt("", "<think>a</think>\\boxed{}", None, {}) == 0.0


def test_builtin_answer_parsing():
    f = get_reward_fn("builtin")
    for resp in ["7", " 7<eos>", "7 because 3+4", "7.", "\\boxed{7}", "7<eos>junk"]:
        assert f("3+4=", resp, "7", {}) == 1.0, resp
    for resp in ["8", "", "77", "<eos>7", "seven"]:
        assert f("3+4=", resp, "7", {}) == 0.0, resp
    assert builtin_answer("-12 is it") == "-12"


def test_registry_and_import_paths():
    assert {"math", "exact_match", "numeric_match", "format", "builtin", "remote", "code"} <= set(available())
    assert get_reward_fn("reward_helpers:length")("", "abc", None, {}) == 3.0

    @register("test_registry_double")
    def double(prompt, response, answer, metadata):
        return 2.0

    assert get_reward_fn("test_registry_double") is double
    with pytest.raises(RewardFunctionError, match="unknown reward function 'nope'"):
        get_reward_fn("nope")
    with pytest.raises(RewardFunctionError, match="no_such_module_xyz:f"):
        get_reward_fn("no_such_module_xyz:f")
    with pytest.raises(RewardFunctionError, match="has no attribute 'missing'"):
        get_reward_fn("reward_helpers:missing")
    with pytest.raises(RewardFunctionError, match="'reward_helpers:NOT_CALLABLE' is not callable"):
        get_reward_fn("reward_helpers:NOT_CALLABLE")
