"""Public entry point: fp32-accurate LM-head log-probs (and entropy) without [T, V] logits."""

from .lm_head_reference import MODES, lm_head_logprobs_reference


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # triton missing or broken on this machine: use the torch path
        return False
    return True


def lm_head_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False,
                     mode="fp32", impl="auto", chunk_tokens=1024):
    """Log-prob of each target under softmax((hidden @ weight.T) / temperature), fp32.

    hidden [..., H] (any float dtype), weight [V, H], targets [...] integer ids in [0, V).
    mode: "fp32" (fp32 operands and math), "bf16" (bf16 operands, fp32 accumulation and
    softmax), "bf16x3" (three bf16 tensor-core products on hi/lo splits: ~2^-16 relative
    products), "tf32x3" (three tf32 tensor-core products: fp32-level accuracy).
    impl: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    chunk_tokens: tokens per chunk in backward (and in the torch path's forward); bounds
    the extra memory at chunk_tokens * V * 4 bytes.
    Returns (logprobs [...] fp32, entropy [...] fp32 in nats or None). Differentiable
    with respect to hidden and weight, through either output.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}, expected one of {MODES}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown impl {impl!r}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    lead = targets.shape
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or hidden.shape[:-1] != lead:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)}, targets {tuple(targets.shape)}")
    hidden2 = hidden.reshape(-1, H)
    targets1 = targets.reshape(-1)
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _triton_available() else "torch"
    if impl == "triton":
        from .lm_head_triton import lm_head_logprobs_triton  # lazy: needs a working triton
        logp, ent = lm_head_logprobs_triton(hidden2, weight, targets1, temperature,
                                            with_entropy, mode, chunk_tokens)
    else:
        logp, ent = lm_head_logprobs_reference(hidden2, weight, targets1, temperature,
                                               with_entropy, mode, chunk_tokens)
    logp = logp.reshape(lead)
    return logp, (ent.reshape(lead) if ent is not None else None)


__all__ = ["lm_head_logprobs", "MODES"]
