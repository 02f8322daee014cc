"""Answer verifiers: math (math-verify), exact match, numeric match, format, built-in tasks.

All follow the registry signature ``fn(prompt, response, answer, metadata) -> float``
and return 1.0 / 0.0 (no partial credit).
"""

from __future__ import annotations

import math as _math
import re
import threading
from typing import Optional

from rewards.registry import register

# Text an engine may leave at the end of a completion when special tokens are not skipped.
EOS_MARKERS = ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<pad>")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in `text`, braces balanced; None if none."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            best = text[m.end() : i - 1]
    return best


def strip_eos(text: str) -> str:
    """Cut `text` at the first end-of-sequence marker."""
    cut = len(text)
    for marker in EOS_MARKERS:
        j = text.find(marker)
        if j != -1:
            cut = min(cut, j)
    return text[:cut]


def builtin_answer(response: str) -> str:
    """The answer a built-in task reads from a response.

    The last ``\\boxed{}`` if there is one, otherwise the first whitespace-delimited
    token of the response (cut at an eos marker), with a trailing '.' removed.
    """
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    head = strip_eos(response).strip()
    token = head.split(None, 1)[0] if head else ""
    return token.rstrip(".")


@register("builtin")
def builtin_reward(prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
    """Exact verifier of the built-in tasks (`launch.tasks`): parsed answer == gold answer."""
    if answer is None:
        raise ValueError("builtin reward needs a gold answer, got None")
    return float(builtin_answer(response) == str(answer).strip())


def _normalize(text: str) -> str:
    text = strip_eos(text).strip()
    if len(text) >= 2 and text[0] == text[-1] == "$":
        text = text[1:-1].strip()
    return " ".join(text.split())


@register("exact_match")
def exact_match(prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
    """1 if the boxed answer (or, without one, the whole response) equals the gold answer.

    Whitespace is collapsed and surrounding ``$`` removed on both sides; case matters
    unless ``metadata["ignore_case"]`` is true.
    """
    if answer is None:
        raise ValueError("exact_match needs a gold answer, got None")
    boxed = last_boxed(response)
    got, want = _normalize(boxed if boxed is not None else response), _normalize(str(answer))
    if metadata.get("ignore_case"):
        got, want = got.lower(), want.lower()
    return float(got == want)


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?%?")


def parse_number(text: str) -> Optional[float]:
    """A float from '1,234.5', '-3', '1/4', '12.5%', '\\frac{1}{4}', '2e-3'; None if not a number."""
    t = text.strip().strip("$").strip()
    t = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", t)
    t = t.replace("\\%", "%").replace("\\!", "").replace("{,}", "").replace(" ", "")
    if not re.fullmatch(_NUMBER, t):
        return None
    percent = t.endswith("%")
    t = t.rstrip("%").replace(",", "")
    try:
        if "/" in t:
            num, den = t.split("/")
            value = float(num) / float(den)
        else:
            value = float(t)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


@register("numeric_match")
def numeric_match(prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
    """1 if the response's number is within tolerance of the gold number.

    The response's number is its boxed answer, or else the last number in it.
    Tolerance: ``|x - y| <= atol + rtol * |y|`` with ``metadata["atol"]`` (default 1e-6)
    and ``metadata["rtol"]`` (default 1e-6).
    """
    if answer is None:
        raise ValueError("numeric_match needs a gold answer, got None")
    want = parse_number(str(answer))
    if want is None:
        raise ValueError(f"numeric_match: gold answer {answer!r} is not a number")
    boxed = last_boxed(response)
    if boxed is not None:
        got = parse_number(boxed)
    else:
        numbers = _NUMBER.findall(strip_eos(response))
        got = parse_number(numbers[-1]) if numbers else None
    if got is None or not _math.isfinite(got):
        return 0.0
    atol, rtol = float(metadata.get("atol", 1e-6)), float(metadata.get("rtol", 1e-6))
    return float(abs(got - want) <= atol + rtol * abs(want))


_FORMAT = re.compile(r"\s*<think>(?:(?!<think>).)*?</think>(?:(?!<think>|</think>).)*$", re.DOTALL)


@register("format")
def format_reward(prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
    """1 if the response is ``<think>...</think>`` followed by a non-empty ``\\boxed{}`` answer, else 0."""
    text = strip_eos(response)
    if not _FORMAT.match(text):
        return 0.0
    after = text.split("</think>", 1)[1]
    boxed = last_boxed(after)
    return float(boxed is not None and boxed.strip() != "")


def _math_verify_timeouts() -> Optional[int]:
    # math-verify's own timeouts use signal.alarm, which only works on the main thread.
    # Off the main thread we disable them; the scorer's per-sample timeout still applies.
    return 5 if threading.current_thread() is threading.main_thread() else None


@register("math")
def math_reward(prompt: str, response: str, answer: Optional[str], metadata: dict) -> float:
    """1 if the response's final answer is mathematically equal to the gold answer (math-verify).

    The model's answer is its last ``\\boxed{}``, or, without one, whatever math-verify
    finds as the final answer of the whole response. Equivalent forms are accepted
    (1/2, 0.5, \\frac{1}{2}; (x+1)^2 vs x^2+2x+1; {1,2} vs {2,1}).
    """
    if answer is None:
        raise ValueError("math reward needs a gold answer, got None")
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    timeout = _math_verify_timeouts()
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_text = str(answer).strip()
    boxed_gold = last_boxed(gold_text)
    if boxed_gold is not None:
        gold_text = boxed_gold
    gold = parse(f"${gold_text}$", extraction_config=configs, parsing_timeout=timeout)
    if not gold:
        gold = parse(gold_text, extraction_config=configs, parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math reward: math-verify cannot parse the gold answer {answer!r}")
    text = strip_eos(response)
    boxed = last_boxed(text)
    pred = parse(f"${boxed}$" if boxed is not None else text, extraction_config=configs, parsing_timeout=timeout)
    if not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=timeout))
