"""Plain-torch chunked reference of the fused LM-head log-prob / entropy op (the CPU path).

Same math and same precision modes as the Triton kernels, processed in chunks of tokens so
that at most [chunk, V] logits exist at a time, in forward and in backward (backward
recomputes each chunk's logits instead of keeping them, like the Triton path).

Precision modes are emulated with fp32 matrix products: bf16 values multiply exactly in fp32,
so `bf16` = fp32 product of bf16-rounded operands (= tensor-core math up to summation order),
`bf16x3` = three such products of the hi/lo bf16 parts, `tf32x3` likewise with tf32 parts,
`fp16x2` = products of power-of-two-scaled fp16 parts (see lm_head_triton_fp16x2.py).
"""
import torch

MODES = ("fp32", "bf16", "bf16x3", "tf32x3", "fp16x2")


def _bf16_values(x):
    return x.to(torch.bfloat16).to(torch.float32)


def _split(x):
    x = x.to(torch.float32)
    hi = _bf16_values(x)
    return hi, _bf16_values(x - hi)


def _tf32_values(x):
    """Round fp32 to tf32 (10 mantissa bits, ties away from zero, as cvt.rna.tf32)."""
    u = x.to(torch.float32).contiguous().view(torch.int32)
    return ((u + 0x1000) & -0x2000).view(torch.float32)


TOP_EXP = 14  # fp16x2 operands are scaled into [2^(TOP_EXP-1), 2^TOP_EXP): far from fp16's 65504


def pow2_exponent(amax):
    """Integer k (int32 tensor) with amax * 2^k in [2^13, 2^14); 0-d, stays on the device.

    frexp gives amax = m * 2^e with m in [0.5, 1). Zero gives k = TOP_EXP; clamped so that
    2^k and 2^-k are finite normal fp32 numbers.
    """
    _, e = torch.frexp(amax.float())
    return (TOP_EXP - e).clamp(-100, 100).to(torch.int32)


def _fp16_parts(x, two_parts):
    """fp16 hi (and lo) parts of x * 2^k, as fp32 values, with max |x| * 2^k in [2^13, 2^14)."""
    k = pow2_exponent(x.detach().abs().max())
    xs = torch.ldexp(x.float(), k)
    hi = xs.half().float()
    return [hi, (xs - hi).half().float()] if two_parts else [hi], k


def mode_matmul(a, b, mode, products=3):
    """a @ b in fp32 with operands treated according to `mode`.

    products: for fp16x2, 1 multiplies the hi parts only (what the kernels do for a gradient
    that is returned in 16 bits anyway).
    """
    if mode == "fp16x2":
        # A 16-bit operand is exact in one fp16 part; an fp32 one takes two.
        (a_hi, *a_lo), ka = _fp16_parts(a, a.element_size() > 2 and products > 1)
        (b_hi, *b_lo), kb = _fp16_parts(b, b.element_size() > 2 and products > 1)
        out = a_hi @ b_hi
        for lo in b_lo:
            out = a_hi @ lo + out
        for lo in a_lo:
            out = lo @ b_hi + out
        return torch.ldexp(out, -(ka + kb))
    if mode == "fp32":
        return a.float() @ b.float()
    if mode == "bf16":
        return _bf16_values(a) @ _bf16_values(b)
    if mode == "bf16x3":
        # Same rule as the Triton kernels: an operand stored in bf16 is exact, so the other
        # one is split in three (all 24 bits, exact products); else both hi/lo (~2^-16).
        if b.dtype == torch.bfloat16 or a.dtype == torch.bfloat16:
            exact, other = (b.float(), a) if b.dtype == torch.bfloat16 else (a.float(), b)
            hi = _bf16_values(other)
            mid, lo = _split(other.float() - hi)  # hi + mid + lo == other to ~2^-25
            parts = [lo, mid, hi]
            if b.dtype == torch.bfloat16:
                return sum(p @ exact for p in parts)
            return sum(exact @ p for p in parts)
        a_hi, a_lo = _split(a)
        b_hi, b_lo = _split(b)
        return a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi
    if mode == "tf32x3":
        a, b = a.float(), b.float()
        a_hi, b_hi = _tf32_values(a), _tf32_values(b)
        a_lo, b_lo = _tf32_values(a - a_hi), _tf32_values(b - b_hi)
        return a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi
    raise ValueError(f"unknown mode {mode!r}, expected one of {MODES}")


def _rowwise_dot(a, b, mode):
    """sum(a * b, -1) in fp32 with the operand rounding of `mode` (as mode_matmul)."""
    if mode == "bf16":
        return (_bf16_values(a) * _bf16_values(b)).sum(-1)
    if mode == "bf16x3" and torch.bfloat16 not in (a.dtype, b.dtype):
        (a_hi, a_lo), (b_hi, b_lo) = _split(a), _split(b)
        return (a_lo * b_hi + a_hi * b_lo + a_hi * b_hi).sum(-1)
    return (a.float() * b.float()).sum(-1)  # the fp32-accurate modes: plain fp32


def target_logits(hidden, weight, targets, mode, rows_per_chunk=4096):
    """hidden[t] . weight[targets[t]] for each row, fp32, without any [T, V] tensor."""
    out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    for c0 in range(0, hidden.shape[0], rows_per_chunk):
        c1 = c0 + rows_per_chunk
        rows = weight.index_select(0, targets[c0:c1].long())
        out[c0:c1] = _rowwise_dot(hidden[c0:c1], rows, mode)
    return out


def _chunk_stats(h, weight, inv_temp, mode):
    """z = logits / T for one chunk, its log-sum-exp and softmax."""
    z = mode_matmul(h, weight.t(), mode) * inv_temp
    lse = torch.logsumexp(z, dim=-1)
    return z, lse


class LMHeadLogprobsReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, mode, chunk_tokens):
        T = hidden.shape[0]
        inv_temp = 1.0 / float(temperature)
        logp = torch.empty(T, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for c0 in range(0, T, chunk_tokens):
            c1 = min(c0 + chunk_tokens, T)
            z, l = _chunk_stats(hidden[c0:c1], weight, inv_temp, mode)
            lse[c0:c1] = l
            logp[c0:c1] = z.gather(1, targets[c0:c1, None].long())[:, 0] - l
            if with_entropy:
                p = torch.exp(z - l[:, None])
                ent[c0:c1] = l - (p * z).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse, ent if with_entropy else lse)
        ctx.cfg = (inv_temp, with_entropy, mode, chunk_tokens)
        ctx.set_materialize_grads(False)
        if ent is None:
            ent = logp.new_empty(0)
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_temp, with_entropy, mode, chunk_tokens = ctx.cfg
        if not with_entropy:
            g_ent = None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None, None
        T = hidden.shape[0]
        grad_h = torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        for c0 in range(0, T, chunk_tokens):
            c1 = min(c0 + chunk_tokens, T)
            h = hidden[c0:c1]
            z, _ = _chunk_stats(h, weight, inv_temp, mode)
            logp_all = z - lse[c0:c1, None]
            p = torch.exp(logp_all)
            dz = torch.zeros_like(z)
            if g_logp is not None:
                onehot = torch.zeros_like(z).scatter_(1, targets[c0:c1, None].long(), 1.0)
                dz += g_logp[c0:c1, None].float() * (onehot - p)
            if g_ent is not None:
                # d entropy / dz_j = -p_j (log p_j + entropy)
                dz -= g_ent[c0:c1, None].float() * p * (logp_all + ent[c0:c1, None])
            dl = dz * inv_temp
            if need_h:
                # fp16x2: 1 product when grad_h is returned in 16 bits (see the kernels).
                grad_h[c0:c1] = mode_matmul(dl, weight, mode,
                                            products=1 if hidden.element_size() == 2 else 3)
            if need_w:
                grad_w += mode_matmul(dl.t(), h, mode,
                                      products=1 if weight.element_size() == 2 else 3)
        return (grad_h.to(hidden.dtype) if need_h else None,
                grad_w.to(weight.dtype) if need_w else None, None, None, None, None, None)


def lm_head_logprobs_reference(hidden, weight, targets, temperature=1.0, with_entropy=False,
                               mode="fp32", chunk_tokens=1024):
    """Chunked torch path; same contract as kernels.lm_head_logprobs."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}, expected one of {MODES}")
    logp, ent = LMHeadLogprobsReference.apply(hidden, weight, targets, temperature,
                                              with_entropy, mode, chunk_tokens)
    return logp, (ent if with_entropy else None)


def lm_head_logprobs_naive(hidden, weight, targets, temperature=1.0, with_entropy=False,
                           dtype=torch.float64):
    """Unchunked textbook version (materialises [T, V]); for tests and benchmarks only."""
    z = (hidden.to(dtype) @ weight.to(dtype).t()) / temperature
    logprobs_all = torch.log_softmax(z, dim=-1)
    logp = logprobs_all.gather(1, targets[:, None].long())[:, 0]
    ent = None
    if with_entropy:
        ent = -(logprobs_all.exp() * logprobs_all).sum(-1)
    return logp, ent
