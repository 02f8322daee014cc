"""Liger-Kernel's fused RMSNorm, SwiGLU and rotary on one model instance (trainer.liger).

Liger's own `apply_liger_kernel_to_qwen2` replaces classes and functions of transformers'
modeling module for the whole process (every Qwen2 built afterwards, a reference model in a
test included) and by default swaps the LM head's loss for its fused linear cross entropy,
which the FP32 head (trainer/fp32_head.py) replaces here. So this patches one instance:
* each `*RMSNorm` module (weight, variance_epsilon): Liger's RMSNorm, "llama" casting (the
  mean square in fp32, the weight product in the input dtype: what Qwen2RMSNorm computes);
* each MLP with gate/up/down projections and a SiLU activation: Liger's fused silu(gate)*up;
* the rotary embedding: the modeling module's `apply_rotary_pos_emb` becomes a dispatcher
  that takes Liger's kernel only while one of this model's attention modules runs (forward
  hooks set a context variable; activation checkpointing's recompute runs them again).
Liger's kernels are Triton: CUDA at run time; tests run them in Triton's CPU interpreter.
"""

from __future__ import annotations

import contextvars
import sys
import types

import torch.nn as nn

_LIGER_ROPE = contextvars.ContextVar("cispo_liger_rope", default=False)


def _rms_norm_forward(self, hidden_states):
    from liger_kernel.transformers.functional import liger_rms_norm

    # in_place=False: the backward keeps the incoming gradient intact (safe under any graph)
    return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _swiglu_forward(self, x):
    from liger_kernel.transformers.functional import liger_swiglu

    return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def _rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not _LIGER_ROPE.get():
            return original(q, k, cos, sin, *args, **kwargs)
        from liger_kernel.transformers.functional import liger_rope

        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        return liger_rope(q, k, cos, sin, None, unsqueeze_dim)

    apply_rotary_pos_emb.cispo_original = original
    return apply_rotary_pos_emb


def _rope_on(module, args) -> None:  # hooks must return None (a value would replace inputs/outputs)
    _LIGER_ROPE.set(True)


def _rope_off(module, args, output) -> None:
    _LIGER_ROPE.set(False)


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None


def _is_swiglu_mlp(m: nn.Module) -> bool:
    return (all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(m, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))  # torch's or transformers'


def _is_rotary_attention(m: nn.Module) -> bool:
    mod = sys.modules.get(type(m).__module__)
    return hasattr(m, "q_proj") and mod is not None and callable(getattr(mod, "apply_rotary_pos_emb", None))


def apply_liger(model: nn.Module) -> dict[str, int]:
    """Patch `model` in place; returns how many modules of each kind were patched. Raises
    when liger-kernel is missing or the model has none of the three (not a Llama-like body)."""
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError as e:
        raise RuntimeError("trainer.liger=true needs the liger-kernel package (pip install liger-kernel)") from e
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for m in model.modules():
        if _is_rms_norm(m):
            m.forward = types.MethodType(_rms_norm_forward, m)
            counts["rms_norm"] += 1
        elif _is_swiglu_mlp(m):
            m.forward = types.MethodType(_swiglu_forward, m)
            counts["swiglu"] += 1
        elif _is_rotary_attention(m):
            mod = sys.modules[type(m).__module__]
            if not hasattr(mod.apply_rotary_pos_emb, "cispo_original"):
                mod.apply_rotary_pos_emb = _rope_dispatcher(mod.apply_rotary_pos_emb)
            m.register_forward_pre_hook(_rope_on)
            m.register_forward_hook(_rope_off)
            counts["rope"] += 1
    if not all(counts.values()):
        raise RuntimeError(f"trainer.liger: {type(model).__name__} is not a Llama-like body Liger can patch "
                           f"(found {counts})")
    return counts
