"""Fused GPU kernels for cispo. Importing this package never imports triton (CPU-safe)."""
from .lm_head import MODES, lm_head_logprobs
from .lm_head_reference import lm_head_logprobs_naive, lm_head_logprobs_reference

__all__ = ["MODES", "lm_head_logprobs", "lm_head_logprobs_reference", "lm_head_logprobs_naive"]
