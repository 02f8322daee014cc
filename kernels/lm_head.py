"""Public entry point: fp32-accurate LM-head log-probs (and entropy) without [T, V] logits."""

from .lm_head_reference import MODES, lm_head_logprobs_reference


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # triton missing or broken on this machine: use the torch path
        return False
    return True


def lm_head_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False,
                     mode="auto", impl="auto", chunk_tokens=1024):
    """Log-prob of each target under softmax((hidden @ weight.T) / temperature), fp32.

    hidden [..., H] (any float dtype), weight [V, H], targets [...] integer ids in [0, V).
    Modes (products; softmax, log-sum-exp and entropy are always fp32):
      "auto"    "fp16x2" on the Triton path, "fp32" on the torch path.
      "fp16x2"  recommended on GPUs: fp32 accuracy from two fp16 tensor-core products per
                product (power-of-two-scaled hi/lo fp16 parts, 22 bits; the weight is split
                one vocabulary chunk at a time). Pass hidden in bf16 as the model produces
                it: then it is exact in one part. See kernels/lm_head_triton_fp16x2.py.
      "bf16x3"  pass hidden in bf16 (do not upcast) and the fp32 LM-head weight: the
                weight is split into three bf16 parts in registers and the products are
                exact: fp32 accuracy (max |d log p| <= 3e-6 vs float64 on an H100 at
                V=152k) at 2.3x the forward speed of a torch fp32 head, one product more
                than fp16x2. bf16 hidden and bf16 weight: one exact product per tile.
                Both operands fp32: hi/lo splits of both, 16-bit products (~1e-5..1e-4).
      "bf16"    operands rounded to bf16, fp32 accumulation (exact when both inputs are
                already bf16, since bf16 x bf16 products are exact in fp32).
      "tf32x3"  fp32 operands, Triton's 3xTF32 products: fp32 accuracy, slower than bf16x3.
      "fp32"    fp32 operands and FMA-unit math, no TF32: the slow exact reference.
    Gradients come back in the dtypes of hidden and weight.
    impl: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    chunk_tokens: tokens per chunk in backward (and in the torch path's forward); bounds
    the extra memory at chunk_tokens * V * 4 bytes.
    Returns (logprobs [...] fp32, entropy [...] fp32 in nats or None). Differentiable
    with respect to hidden and weight, through either output.
    """
    if mode not in MODES and mode != "auto":
        raise ValueError(f"unknown mode {mode!r}, expected 'auto' or one of {MODES}")
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
    if targets1.numel() == 0:
        impl = "torch"  # nothing to launch; the torch path returns empty tensors
    if mode == "auto":
        mode = "fp16x2" if impl == "triton" else "fp32"
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
