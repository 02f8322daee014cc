"""Log-probs (and entropy) of chosen tokens through the LM head, computed in FP32.

Why FP32: MiniMax-M1 found the train/rollout token-probability correlation goes from
0.987 to 0.997 when the LM head runs in FP32 on both sides; the rollout side already
does. Why chunked: a [tokens x vocab] fp32 logits tensor is 4k x 152k x 4 B = 2.5 GB
for one 4k-token sequence, and autograd would keep it for backward. Here the head
runs over `chunk_tokens` rows at a time, keeps only the per-row logsumexp, and the
backward recomputes each chunk's logits — the same plan as the fused kernel in
`kernels/`; `head_logprobs` uses `kernels.lm_head_logprobs` when it imports and keeps
this local path as the fallback (and as a second implementation the tests compare).

Temperature is applied exactly as the rollout samples: log_softmax(logits / T).
"""

from __future__ import annotations

import torch
import torch.nn as nn

try:  # the fused kernel from kernels/ (Triton on GPU, its chunked torch reference elsewhere)
    from kernels import lm_head_logprobs as _kernel_lm_head_logprobs  # type: ignore[attr-defined]
except Exception:  # kernels/ absent or broken here: our own chunked torch path below
    _kernel_lm_head_logprobs = None

# kernels.lm_head_logprobs is differentiable in hidden and weight (fwd+bwd kernels), so
# it is used whenever it imports; False forces the local path (e.g. to compare the two).
USE_KERNEL = _kernel_lm_head_logprobs is not None


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, inv_temp: float) -> torch.Tensor:
    return (h.float() @ w.float().t()) * inv_temp


class _ChunkedFP32HeadLogprobs(torch.autograd.Function):
    """logprobs[t] = log_softmax(h[t] @ W^T / T)[targets[t]], chunk by chunk, fp32.

    The entropy (a statistic, no gradient) comes from the same chunk's logits, so asking
    for it costs no extra pass over the [chunk x vocab] product.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_tokens, with_entropy):
        inv_temp = 1.0 / float(temperature)
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            logits = _chunk_logits(hidden[s:e], weight, inv_temp)
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            logprobs[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
            if with_entropy:  # H = lse - sum_v p_v * logit_v
                entropy[s:e] = lse[s:e] - (torch.exp(logits - lse[s:e, None]) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.inv_temp, ctx.chunk_tokens = inv_temp, chunk_tokens
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        inv_temp, chunk = ctx.inv_temp, ctx.chunk_tokens
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        w32 = weight.float()
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            h32 = hidden[s:e].float()
            logits = (h32 @ w32.t()) * inv_temp
            # d logp / d logits = onehot(target) - softmax; then the 1/T of the scaling
            g = -torch.exp(logits - lse[s:e, None])
            g.scatter_add_(1, targets[s:e, None], torch.ones_like(g[:, :1]))
            g *= (grad_out[s:e].float() * inv_temp)[:, None]
            if grad_h is not None:
                grad_h[s:e] = (g @ w32).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.t(), h32)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = 1024,
    mode: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs [n] fp32 with grad to hidden and weight, entropy [n] fp32 or None).

    hidden [n, H] (any float dtype), weight [V, H], targets [n] int64. `mode` is the
    kernel's product precision: "fp32" (exact, FMA units) or its tensor-core modes with
    fp32-level accuracy ("tf32x3", "bf16x3"); the local path has "fp32" only.
    """
    if USE_KERNEL and _kernel_lm_head_logprobs is not None:
        lp, ent = _kernel_lm_head_logprobs(hidden, weight, targets, temperature=temperature,
                                           with_entropy=with_entropy, mode=mode, chunk_tokens=int(chunk_tokens))
        return lp, (ent.detach() if ent is not None else None)  # entropy is a statistic here
    if mode != "fp32":
        raise ValueError(f"LM-head mode {mode!r} needs kernels.lm_head_logprobs, which did not import")
    logprobs, entropy = _ChunkedFP32HeadLogprobs.apply(hidden, weight, targets, temperature, int(chunk_tokens),
                                                       bool(with_entropy))
    return logprobs, (entropy if with_entropy else None)


class FP32LogprobHead(nn.Linear):
    """Drop-in for the model's `lm_head` (same `weight` Parameter, so state_dict names,
    weight tying and ZeRO-3 partitioning are unchanged).

    Called with hidden states only it is the ordinary head (HF's own forward still
    works); called with `targets` it returns (logprobs, entropy) from the chunked FP32
    path. Going through the module's __call__ matters under ZeRO-3: its hooks gather
    the partitioned weight before forward and again before backward.
    """

    def forward(self, hidden, targets=None, temperature: float = 1.0, with_entropy: bool = False,
                chunk_tokens: int = 1024, mode: str = "fp32"):
        if targets is None:
            return super().forward(hidden)
        return head_logprobs(hidden, self.weight, targets, temperature, with_entropy, chunk_tokens, mode)


def install_fp32_head(hf_model: nn.Module) -> FP32LogprobHead:
    """Replace `hf_model.lm_head` (an nn.Linear without bias) by an FP32LogprobHead
    sharing its weight Parameter."""
    old = hf_model.lm_head
    if isinstance(old, FP32LogprobHead):
        return old
    if getattr(old, "bias", None) is not None:
        raise ValueError("lm_head with a bias is not supported by the FP32 log-prob head")
    head = FP32LogprobHead(old.in_features, old.out_features, bias=False, device="meta")
    head.weight = old.weight  # the same Parameter object: tying and names survive
    hf_model.lm_head = head
    return head
