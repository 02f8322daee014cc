"""Reward functions for the loop tests (named by import path in reward.functions)."""


def starts_with_seven(prompt: str, response: str, answer, metadata: dict) -> float:
    """1 when the response begins with "7": one token a tiny model learns to prefer in a few steps."""
    return float(response.lstrip().startswith("7"))


def always_zero(prompt: str, response: str, answer, metadata: dict) -> float:
    """No signal at all: every group is flat (what a collapsed policy looks like to the guard)."""
    return 0.0
