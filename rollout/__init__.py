"""Rollout: vLLM engines (optionally in Ray actors) with an FP32 LM head, repetition
early stop and live weight updates.

    RolloutEngine   one engine, plain Python (rollout.engine)
    RolloutGroup    N engines in Ray actors with bounded waits (rollout.group)

Submodules import vLLM / Ray only when used, so `import rollout` stays cheap.
"""

from __future__ import annotations

__all__ = ["RolloutEngine", "RolloutGroup", "RolloutEngineError"]


def __getattr__(name: str):
    if name == "RolloutEngine":
        from rollout.engine import RolloutEngine

        return RolloutEngine
    if name in ("RolloutGroup", "RolloutEngineError"):
        from rollout import group

        return getattr(group, name)
    raise AttributeError(name)
