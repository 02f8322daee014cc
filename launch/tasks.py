"""Built-in synthetic tasks with a difficulty knob, verified exactly.

Used as ``data.path: builtin:<task>`` with ``data.difficulty``; scored by the reward
function "builtin" (`rewards.verifiers.builtin_reward`), which is exactly `Task.verify`.

Prompts are short and regular so a tiny random-init char-level model can learn
difficulty 1 from scratch with RL after a short format warm-up:

| task        | difficulty 1          | knob                                                        |
|-------------|-----------------------|-------------------------------------------------------------|
| arithmetic  | "3+4=" -> "7"         | d=1: a+b <= 9; d=2: any single digits; d=3: a+b or a-b, 3 digits; |
|             |                       | d>=4: three operands of d-1 digits with + and -              |
| counting    | "a in abbab=" -> "2"  | string of 3+2d letters over the first d+1 letters            |
| sorting     | "sort 312=" -> "123"  | sort d+2 digits ascending                                    |
| long_addition | "47+85=" -> "132"   | add two d-digit numbers; the worked solution writes each    |
|             |                       | column and its carry: "7+5+0=12;4+8+1=13;\\boxed{132}"    |

The answer is read from a response by `rewards.verifiers.builtin_answer`: the last
``\\boxed{}`` if any, else the first whitespace-delimited token (cut at "<eos>"), so
"7", " 7<eos>", "7 because ..." and "\\boxed{7}" all answer 7.

Tasks with a `worked` solution (long_addition) are reasoning tasks: the answer takes tens
to hundreds of tokens of worked steps (about 9 per digit), exactly verifiable. A model the
project pretrains on worked solutions (`warmup.mode=solve`) starts RL part-way there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Union

from rewards.verifiers import builtin_answer

EOS = "<eos>"


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random, int], tuple[str, str]]  # (rng, difficulty) -> (prompt, answer)
    # (prompt, answer) -> a complete worked solution ending in \boxed{answer}; None: the answer alone
    worked: Callable[[str, str], str] | None = None

    def generate(self, n: int, difficulty: int = 1, seed: int = 0, *, split: str = "train") -> list[dict]:
        """`n` rows ``{"prompt", "answer", "metadata": {"task", "difficulty"}}``, the same for the same seed.

        `split` names an independent stream of rows (e.g. "train", "warmup", "eval").
        """
        if difficulty < 1:
            raise ValueError(f"task {self.name!r}: difficulty must be >= 1, got {difficulty}")
        rng = random.Random(f"cispo-task/{self.name}/{difficulty}/{seed}/{split}")
        rows = []
        for _ in range(n):
            prompt, answer = self.make(rng, difficulty)
            rows.append({"prompt": prompt, "answer": answer, "metadata": {"task": self.name, "difficulty": difficulty}})
        return rows

    def solution(self, prompt: str, answer: str) -> str:
        """What a correct response looks like (the supervised target of `warmup.mode=solve`)."""
        return self.worked(prompt, answer) if self.worked else answer

    def verify(self, response: str, answer: str) -> float:
        """1.0 if the answer parsed from `response` equals `answer` exactly, else 0.0."""
        return float(builtin_answer(response) == str(answer).strip())


def _digits(rng: random.Random, k: int) -> int:
    return rng.randrange(10**k)


def _arithmetic(rng: random.Random, d: int) -> tuple[str, str]:
    if d == 1:
        # The 55 single-digit sums that stay single-digit: small enough for a tiny model
        # to learn from scratch by RL in minutes on a CPU (the embedded default run).
        # The sum is drawn first, uniformly, so no constant answer scores above 0.1:
        # drawing a and b uniformly instead makes "9" right 29% of the time, a shortcut
        # RL finds and never leaves.
        total = rng.randrange(10)
        a = rng.randrange(total + 1)
        return f"{a}+{total - a}=", str(total)
    if d == 2:
        a, b = _digits(rng, 1), _digits(rng, 1)
        return f"{a}+{b}=", str(a + b)
    if d == 3:
        a, b = _digits(rng, 3), _digits(rng, 3)
        op = rng.choice("+-")
        return f"{a}{op}{b}=", str(a + b if op == "+" else a - b)
    terms = [_digits(rng, d - 1) for _ in range(3)]
    ops = [rng.choice("+-") for _ in range(2)]
    value = terms[0]
    for op, t in zip(ops, terms[1:]):
        value = value + t if op == "+" else value - t
    return f"{terms[0]}{ops[0]}{terms[1]}{ops[1]}{terms[2]}=", str(value)


def _counting(rng: random.Random, d: int) -> tuple[str, str]:
    alphabet = "abcdefghijklmnopqrstuvwxyz"[: min(26, d + 1)]
    s = "".join(rng.choice(alphabet) for _ in range(3 + 2 * d))
    letter = rng.choice(alphabet)
    return f"{letter} in {s}=", str(s.count(letter))


def _sorting(rng: random.Random, d: int) -> tuple[str, str]:
    digits = "".join(str(rng.randrange(10)) for _ in range(d + 2))
    return f"sort {digits}=", "".join(sorted(digits))


def _long_addition(rng: random.Random, d: int) -> tuple[str, str]:
    # operands written with d digits (zero-padded), so every column of the worked solution exists
    a, b = _digits(rng, d), _digits(rng, d)
    return f"{a:0{d}d}+{b:0{d}d}=", str(a + b)


def _long_addition_worked(prompt: str, answer: str) -> str:
    """Right to left, one column per step: "a+b+carry=two-digit sum", then the boxed answer."""
    x, y = prompt.rstrip("=").split("+")
    steps, carry = [], 0
    for dx, dy in zip(reversed(x), reversed(y)):
        total = int(dx) + int(dy) + carry
        steps.append(f"{dx}+{dy}+{carry}={total:02d}")
        carry = total // 10
    return ";".join(steps) + f";\\boxed{{{answer}}}"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("arithmetic", "add (and subtract) integers; difficulty = digits / operands", _arithmetic),
        Task("counting", "count a letter in a string; difficulty = string length and alphabet", _counting),
        Task("sorting", "sort digits ascending; difficulty = number of digits", _sorting),
        Task("long_addition", "add two numbers column by column with carries; difficulty = digits",
             _long_addition, _long_addition_worked),
    )
}


def get_task(name: str) -> Task:
    """The built-in task `name` (accepts "builtin:<name>" too)."""
    if name.startswith("builtin:"):
        name = name.split(":", 1)[1]
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


def format_warmup_examples(
    task: Union[str, Task],
    n: int,
    seed: int = 0,
    difficulty: int = 1,
    eos: str = EOS,
    shuffle_answers: bool = False,
) -> list[tuple[str, str]]:
    """(prompt, completion) pairs for a supervised warm-up: completion = answer + eos.

    With ``shuffle_answers`` the answers are permuted across prompts, so a warm-up
    teaches only the *format* (a short answer then eos), leaving the task itself to RL.
    The rows come from the "warmup" stream, independent of the training pool's.
    """
    t = task if isinstance(task, Task) else get_task(task)
    rows = t.generate(n, difficulty, seed=seed, split="warmup")
    answers = [r["answer"] for r in rows]
    if shuffle_answers:
        random.Random(seed).shuffle(answers)
    return [(r["prompt"], f"{a}{eos}") for r, a in zip(rows, answers)]


def solution_examples(task: Union[str, Task], n: int, seed: int = 0, difficulty: int = 1,
                      eos: str = EOS) -> list[tuple[str, str]]:
    """(prompt, completion) pairs whose completion is the task's full correct solution (worked
    steps where the task has them) + eos, from the "warmup" stream: supervised pretraining
    on the task itself (`warmup.mode=solve`)."""
    t = task if isinstance(task, Task) else get_task(task)
    return [(r["prompt"], t.solution(r["prompt"], r["answer"]) + eos)
            for r in t.generate(n, difficulty, seed=seed, split="warmup")]
