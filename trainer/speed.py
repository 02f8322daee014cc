"""The trainer's speed options on a loaded model (trainer.liger / activation_checkpointing /
compile; the attention choice is made at load time, see trainer/attention.py).

Each keeps the trainer's numbers: tests/trainer/test_speed_options.py checks packed = single
with each, and gradients equal to the plain model's (checkpointing: to fp32 rounding).
"""

from __future__ import annotations

import torch.nn as nn


def decoder_layers(hf_model: nn.Module):
    body = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else hf_model.model
    layers = getattr(body, "layers", None)
    if layers is None:
        raise RuntimeError(f"{type(hf_model).__name__}: no decoder layers found (expected get_decoder().layers)")
    return layers


def apply_speed_options(hf_model: nn.Module, cfg) -> dict:
    """cfg: a TrainerConfig. In place, after LoRA and before DeepSpeed wraps the model."""
    applied: dict = {}
    if cfg.liger:
        from trainer.fused_layers import apply_liger

        applied["liger"] = apply_liger(hf_model)
    if cfg.activation_checkpointing:
        # non-reentrant: works with inputs that need no grad, keyword arguments and ZeRO's hooks
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        applied["activation_checkpointing"] = True
    if cfg.compile:
        # Per layer, not the whole body: all layers share one graph (parameters are graph
        # inputs), compile time stays that of one layer, and the FP32 head stays outside.
        for layer in decoder_layers(hf_model):
            layer.compile()
        applied["compile"] = len(decoder_layers(hf_model))
    return applied
