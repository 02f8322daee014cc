"""torch.autograd.Function around the fused Triton LM-head log-prob / entropy kernels.

Forward saves only hidden, weight, targets (references, no copies) and two fp32 numbers per
token (log-sum-exp, entropy); backward recomputes the logits (see lm_head_triton_bwd.py, and
lm_head_triton_fp16x2.py for mode fp16x2, which runs its own chunked forward and backward).
"""
import torch

from .lm_head_triton_bwd import lm_head_backward
from .lm_head_triton_common import MODE_FP16X2, MODES, interpret_mode
from .lm_head_triton_fp16x2 import backward_fp16x2, forward_fp16x2
from .lm_head_triton_fwd import lm_head_forward_stats


class LMHeadLogprobsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, mode, chunk_tokens):
        mode_id = MODES[mode]
        interpret = interpret_mode()
        inv_temp = 1.0 / float(temperature)
        hidden = hidden.contiguous()
        weight = weight.contiguous()
        targets = targets.to(torch.int32).contiguous()
        # Kernels index with int32 offsets (row * stride); 64-bit offsets would cost address
        # arithmetic in the inner loop for shapes no one runs (V=152k, H=8192 is 1.2e9).
        T, H = hidden.shape
        V = weight.shape[0]
        if max(T, V, chunk_tokens) * H >= 2**31 or V * min(chunk_tokens, T) >= 2**31:
            raise ValueError(f"T={T}, V={V}, H={H}: offsets exceed int32; split the tokens "
                             "into several calls or use impl='torch'")
        # The entropy statistics are also needed by backward when entropy gets a gradient.
        if mode_id == MODE_FP16X2:
            logp, lse, ent, w_exp = forward_fp16x2(hidden, weight, targets, inv_temp,
                                                   with_entropy, interpret)
        else:
            logp, lse, ent = lm_head_forward_stats(hidden, weight, targets, inv_temp, mode,
                                                   with_entropy, interpret=interpret)
            w_exp = lse  # unused placeholder
        ctx.save_for_backward(hidden, weight, targets, lse, ent if ent is not None else lse,
                              w_exp)
        ctx.cfg = (inv_temp, mode_id, with_entropy, chunk_tokens, interpret)
        ctx.set_materialize_grads(False)
        if ent is None:
            ent = logp.new_empty(0)
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent, w_exp = ctx.saved_tensors
        inv_temp, mode_id, with_entropy, chunk_tokens, interpret = ctx.cfg
        if not with_entropy:
            g_ent = None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None
        if mode_id == MODE_FP16X2:
            grad_h, grad_w = backward_fp16x2(
                hidden, weight, targets, lse, ent if with_entropy else None, g_logp, g_ent,
                inv_temp, w_exp, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                chunk_tokens, interpret)
            return grad_h, grad_w, None, None, None, None, None
        grad_h, grad_w = lm_head_backward(
            hidden, weight, targets, lse, ent if with_entropy else None, g_logp, g_ent,
            inv_temp, mode_id, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            chunk_tokens=chunk_tokens, interpret=interpret)
        return grad_h, grad_w, None, None, None, None, None


def lm_head_logprobs_triton(hidden, weight, targets, temperature=1.0, with_entropy=False,
                            mode="fp32", chunk_tokens=1024):
    """Fused Triton path; same contract as kernels.lm_head_logprobs."""
    logp, ent = LMHeadLogprobsTriton.apply(hidden, weight, targets, temperature, with_entropy,
                                           mode, chunk_tokens)
    return logp, (ent if with_entropy else None)
