"""vLLM models the project registers itself (out of tree).

    register()          in-process: before an engine is made (rollout.engine does it)
    register_plugin()   the `vllm.general_plugins` entry point (pyproject): vLLM calls it
                        in every process it starts (engine core, TP workers)

`MiniMaxForCausalLM` (transformers' hybrid lightning-attention MoE architecture, the one
MiniMax-M1 trained) has no model in vLLM since 0.23; `rollout.models.minimax` builds one
from vLLM's own layers.
"""

from __future__ import annotations

ARCHITECTURES = {"MiniMaxForCausalLM": "rollout.models.minimax:MiniMaxForCausalLM"}


def register(lazy: bool = False) -> None:
    """Make vLLM's registry resolve our architectures to our classes. In-process the
    class itself is registered (vLLM inspects it here); `lazy` registers "module:Class"
    (vLLM inspects it in a subprocess, without importing it into this one)."""
    import importlib

    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        if lazy:
            ModelRegistry.register_model(arch, target)
        else:
            module, name = target.split(":")
            ModelRegistry.register_model(arch, getattr(importlib.import_module(module), name))


def register_for(model_path: str) -> bool:
    """Register our classes if the model folder's config names one of our architectures;
    True when it did. (Other models never import our vLLM model code.)"""
    import json
    from pathlib import Path

    config = Path(model_path) / "config.json"
    if not config.is_file():
        return False
    archs = set(json.loads(config.read_text()).get("architectures") or [])
    if not archs & set(ARCHITECTURES):
        return False
    register()
    return True


def register_plugin() -> None:
    register(lazy=True)
