"""Reward functions behind one registry, and the parallel scorer.

Signature of every reward function (see `rewards.registry`)::

    fn(prompt: str, response: str, answer: str | None, metadata: dict) -> float

Built-ins: "math", "exact_match", "numeric_match", "format", "builtin", "remote",
"code", "code_strict". User functions: "pkg.module:func" in ``reward.functions``.
"""

from rewards.registry import RewardFn, RewardFunctionError, available, get_reward_fn, register
from rewards.scorer import RewardScorer, ScoreResult

__all__ = [
    "RewardFn",
    "RewardFunctionError",
    "RewardScorer",
    "ScoreResult",
    "available",
    "get_reward_fn",
    "register",
]
