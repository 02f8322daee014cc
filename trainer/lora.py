"""LoRA through peft: low-rank adapters on the body's linear layers, the rest frozen.

`apply_lora` injects peft's LoRA layers into the Hugging Face model in place (so
`trainer.policy.PolicyModel` and the FP32 head work on it unchanged: the LM head is not
adapted and stays the model's full FP32 weight) and freezes everything but the adapters;
the optimizer sees only `requires_grad` parameters. Only the adapters go to the rollout
engines (rollout/lora.py loads them with vLLM's LoRA support); the Hugging Face export
merges them: W' = W + (alpha / rank) B A.

Names inside the trainer are the injected model's: `...q_proj.base_layer.weight`,
`...q_proj.lora_A.default.weight`, `...q_proj.lora_B.default.weight`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cispo.config import LoraConfig

_BASE = ".base_layer."


def apply_lora(hf_model: nn.Module, cfg: LoraConfig):
    """Inject LoRA layers into `hf_model` (in place); returns the PeftModel around it."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_model = get_peft_model(hf_model, PeftLoraConfig(**cfg.peft_kwargs()))
    for module in hf_model.modules():  # the factor merges use: peft's own, checked once here
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            assert abs(module.scaling["default"] - cfg.scaling) < 1e-12, (module.scaling, cfg.scaling)
    return peft_model


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Plain Hugging Face names and merged weights from a state dict of an injected model."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_adapter(name):
            continue
        if _BASE not in name:
            out[name] = tensor
            continue
        prefix, leaf = name.split(_BASE, 1)
        if leaf == "weight" and f"{prefix}.lora_A.default.weight" in state:
            a = state[f"{prefix}.lora_A.default.weight"].double()
            b = state[f"{prefix}.lora_B.default.weight"].double()
            tensor = (tensor.double() + scaling * (b @ a)).to(tensor.dtype)
        out[f"{prefix}.{leaf}"] = tensor
    return out


def trainable_summary(model: nn.Module) -> dict[str, float]:
    def numel(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 keeps the full size here

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return {"trainable_params": float(trainable), "total_params": float(total)}
