"""A rollout engine on a node whose vLLM looks like an old release: the real facts of this
node's install, with the version set to 0.10.0 and the `logprobs_mode` engine argument
removed, so the engine's start-up check (rollout.engine_support) refuses it. Used to test
that such an engine fails at once, by name, and is not restarted."""

from __future__ import annotations

import dataclasses

from rollout import vllm_compat
from rollout.engine import RolloutEngine

_real_facts = vllm_compat.engine_facts


def _old_release_facts():
    facts = _real_facts()
    return dataclasses.replace(facts, vllm_version="0.10.0", engine_args=facts.engine_args - {"logprobs_mode"})


class OldVllmEngine(RolloutEngine):
    def __init__(self, *args, **kwargs):
        vllm_compat.engine_facts = _old_release_facts  # this actor's process only
        super().__init__(*args, **kwargs)
