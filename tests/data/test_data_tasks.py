"""Built-in tasks: deterministic generation, exact verification, warm-up examples."""

import pytest

from launch.tasks import TASKS, format_warmup_examples, get_task
from launch.tiny_model import build_char_tokenizer
from rewards import get_reward_fn


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_generate_is_deterministic_and_verifiable(name, difficulty):
    task = get_task(name)
    rows = task.generate(50, difficulty, seed=3)
    assert rows == task.generate(50, difficulty, seed=3)
    assert rows != task.generate(50, difficulty, seed=4)
    assert rows != task.generate(50, difficulty, seed=3, split="warmup")
    builtin = get_reward_fn("builtin")
    for r in rows:
        assert r["prompt"].endswith("=") and r["answer"]
        assert r["metadata"] == {"task": name, "difficulty": difficulty}
        assert task.verify(r["answer"], r["answer"]) == 1.0
        assert task.verify(f" {r['answer']}<eos>", r["answer"]) == 1.0
        assert task.verify(f"\\boxed{{{r['answer']}}}", r["answer"]) == 1.0
        assert task.verify(r["answer"] + "0", r["answer"]) == 0.0
        # the "builtin" reward function is exactly the task's verifier
        for resp in (r["answer"], r["answer"] + "1", ""):
            assert builtin(r["prompt"], resp, r["answer"], r["metadata"]) == task.verify(resp, r["answer"])


def test_arithmetic_answers_are_correct():
    for r in get_task("arithmetic").generate(200, 4, seed=0):
        assert int(r["answer"]) == eval(r["prompt"][:-1])  # noqa: S307 - our own digits and +/-
    for r in get_task("counting").generate(100, 2):
        assert r["prompt"].split(" in ")[1][:-1].count(r["prompt"][0]) == int(r["answer"])
    assert all(r["answer"] == "".join(sorted(r["prompt"][5:-1])) for r in get_task("sorting").generate(100, 3))


def test_difficulty_one_is_tiny_and_regular():
    rows = get_task("arithmetic").generate(500, 1, seed=0)
    assert all(len(r["prompt"]) == 4 and r["prompt"][1] == "+" for r in rows)  # "3+4="
    assert all(len(r["answer"]) == 1 for r in rows)  # sums stay single-digit
    assert len({r["prompt"] for r in rows}) == 55  # all 55 such sums appear
    counts = [sum(r["answer"] == str(s) for r in rows) for s in range(10)]
    assert max(counts) < 0.15 * len(rows)  # no answer is a shortcut: each about 10%
    assert len({r["prompt"] for r in get_task("arithmetic").generate(500, 2, seed=0)}) > 90
    assert max(len(r["prompt"]) for r in get_task("arithmetic").generate(100, 3)) > 4


def test_verify_rejects_wrong_answers():
    task = get_task("arithmetic")
    for resp in ["8", "", "77", "<eos>", "seven", "\\boxed{8}"]:
        assert task.verify(resp, "7") == 0.0, resp
    for resp in ["7", "7 because", "7.", "7<eos>8"]:
        assert task.verify(resp, "7") == 1.0, resp


def test_format_warmup_examples():
    ex = format_warmup_examples("arithmetic", 20, seed=1)
    assert ex == format_warmup_examples("builtin:arithmetic", 20, seed=1)
    task = get_task("arithmetic")
    for prompt, completion in ex:
        assert completion.endswith("<eos>")
        assert task.verify(completion, str(eval(prompt[:-1]))) == 1.0  # noqa: S307
    shuffled = format_warmup_examples("arithmetic", 20, seed=1, shuffle_answers=True)
    assert [p for p, _ in shuffled] == [p for p, _ in ex]
    assert sorted(c for _, c in shuffled) == sorted(c for _, c in ex)
    tok = build_char_tokenizer()
    ids = tok(ex[0][1], add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id and len(ids) <= 3  # "7<eos>" is 2-3 tokens


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown built-in task 'nope'; available: arithmetic"):
        get_task("nope")
    with pytest.raises(ValueError, match="difficulty must be >= 1"):
        get_task("sorting").generate(1, 0)
