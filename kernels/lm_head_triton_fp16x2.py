"""Mode fp16x2: fp32-accurate LM-head log-probs from two fp16 tensor-core products.

Why fp16 parts and not bf16: fp16 keeps 11 significant bits, bf16 8. Two fp16 parts hold 22
bits of an fp32 (~2^-23 relative), two bf16 parts only 16 (~2e-5 in log p at H=4096, over
the 1e-5 target), so bf16 needs a third part and a third product (mode bf16x3). fp16's price
is its range (6e-5 .. 65504): every operand is first multiplied by a power of two chosen
from its largest magnitude, so that it lands in [2^13, 2^14). That is exact, and undone
exactly on the fp32 result. The hi/lo parts then stay normal fp16 numbers for every element
within 2^17 of the largest; smaller elements lose low bits only below 2^-39 of the largest,
far under the rounding of an fp32 sum.

Products per fp32 product:
* forward logits: a bf16/fp16 hidden state is exact in one fp16 part (its 8 or 11 bits fit),
  so logits = h @ W_hi^T + h @ W_lo^T, 2 products (an fp32 hidden adds h_lo @ W_hi^T: 3;
  a bf16 weight, as in a bf16 model with tied embeddings, needs no W_lo: 1).
* backward, per (vocabulary chunk, token chunk): the dlogits kernel recomputes the logits
  the same way and writes dlogits as scaled fp16 hi/lo parts; then cuBLAS (`mm_into`) forms
  grad_W += dl_hi^T @ h + dl_lo^T @ h (2 products: the weight is fp32; one cuBLAS call with
  K doubled, STACK_GRAD_W), and
  grad_h += dl_hi @ W_hi (1 product) when grad_h goes back in bf16/fp16: its error (~2^-12)
  is 8x under the final bf16 rounding; 3 products (+ dl_hi @ W_lo + dl_lo @ W_hi) when fp32.
  The same rule for grad_W: one product dl_hi^T @ h when the weight is bf16.
  The logits (forward and recomputed) sum their hi x hi product in blocks of 16 K steps
  (HI_SUM_STEPS) and the lo products (2^-11 of it) straight in the tensor cores
  (fp16x2_tile, HI_STEPS): log p stays fp32-accurate. The gradient products are summed by
  cuBLAS in the tensor cores: ~6e-6 of the largest element at K=4096 instead of ~4e-7, for
  23% less time (mm_into).

Memory: the weight is split one vocabulary chunk at a time (VOCAB_CHUNK rows x H x 2 parts x 2
bytes: 256 MiB at H=4096 in forward), never all at once. Backward runs token chunks of C <= 4 x
chunk_tokens rows outer (evened out: token_chunk_rows) and vocabulary chunks of BWD_VOCAB_CHUNK
rows (at H=4096; more at smaller H: bwd_vocab_rows) inner, so its working memory is per chunk,
not per T: the chunk's fp16 hidden parts (C x H x 2 bytes each), its fp32 grad_h accumulator (C
x H x 4), two fp16 dlogits buffers (C x BWD_VOCAB_CHUNK x 2 each) and the weight chunk's parts
(BWD_VOCAB_CHUNK x H x 2 each): 288 MiB at C=4096, H=4096 (with an fp32 weight; 32 MiB more for
the stacked hidden rows, STACK_GRAD_W), against the fp32 grad_weight of 2.3 GiB every method
returns. The price is that the weight is split again for every token chunk (T/C extra reads of
it, ~1 ms each on an H100/H200 at V=152k, H=4096) and grad_weight is accumulated T/C times.
"""
import torch
import triton
import triton.language as tl

from .lm_head_reference import pow2_exponent, target_logits
from .lm_head_triton_bwd import launch_dlogits
from .lm_head_triton_common import MODE_FP16X2
from .lm_head_triton_fwd import VSPLIT_ALIGN, combine_partials, launch_forward

VOCAB_CHUNK = 16384   # weight rows split to fp16 at a time (a multiple of VSPLIT_ALIGN)
# The same in backward at H >= BWD_WORK_H: sizes its working memory. 6144 rather than 4096:
# grad_hidden's products get K = 6144 and each token chunk walks 25 chunks, not 38; on an H200
# forward+backward 1.8-2.7 ms faster at T=16k, H=4096 (two calls) for 64 MiB more (9.91% of
# naive's peak; bench/results/gpu_session11_h200.md).
BWD_VOCAB_CHUNK = 6144
BWD_WORK_H = 4096       # below this width backward takes more rows a chunk (bwd_vocab_rows)
BWD_TOKEN_CHUNKS_PER_CHUNK_TOKENS = 4  # backward token chunks: at most this x chunk_tokens rows

# Forward programs per launch to aim for: ~8 waves on 132 SMs. Shorter programs than 2 waves
# (264) end closer together: on an H200 forward+backward 3.6-4.5 ms faster at T=16k, H=4096
# and 1.4 ms at T=28k, H=896 in one call (bench/results/gpu_session11_h200.md; 528 gained half
# that, 2112 and 4224 no more).
SMS_TO_FILL = 1056
# An fp32 grad_weight from a 16-bit hidden takes its two products as one cuBLAS call with K
# doubled, grad_W += [dl_lo; dl_hi]^T @ [h; h]: one read and write of the fp32 accumulator
# instead of two, and a longer K per call (backward_fp16x2). lo rows first, so the small
# terms are summed before the large ones join the chain. Benchmarks switch it off for an A/B.
STACK_GRAD_W = True
# The scales of the gradient products are undone by cuBLAS's alpha (a power of two: exact, the
# same rounding) instead of by a pass over the fp32 results afterwards (grad_weight: 2.3 GiB
# at V=152k, H=4096). The price is one host sync per backward, to read the three exponents.
# On an H200 forward+backward 1.3 ms faster at T=16k, H=4096 (two calls,
# bench/results/gpu_session11_h200.md). Benchmarks switch it off for an A/B.
DESCALE_IN_PRODUCTS = True


def max_abs(x):
    lo, hi = torch.aminmax(x)  # one pass, no |x| temporary (the weight is up to GBs)
    return torch.maximum(-lo, hi).float()


def exp2(k):
    return torch.ldexp(torch.ones_like(k, dtype=torch.float32), k).reshape(1)


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, scale_ptr, R, C, stride_xr, stride_xc, stride_or,
                  TWO_PARTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """hi = fp16(x * s), lo = fp16(x * s - hi): x * s == hi + lo to ~2^-23 relative."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < R) & (c[None, :] < C)
    x = tl.load(x_ptr + r[:, None] * stride_xr + c[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32) * tl.load(scale_ptr)
    hi = x.to(tl.float16)
    out = r[:, None] * stride_or + c[None, :]
    tl.store(hi_ptr + out, hi, mask=mask)
    if TWO_PARTS:
        tl.store(lo_ptr + out, (x - hi.to(tl.float32)).to(tl.float16), mask=mask)


def split_fp16(x, scale, two_parts, hi, lo):
    """Write the scaled fp16 parts of the 2-D tensor x into hi and lo (contiguous, x's shape;
    lo is not touched when two_parts is False)."""
    R, C = x.shape
    grid = (triton.cdiv(R, 32), triton.cdiv(C, 128))
    _split_kernel[grid](x, hi, lo, scale, R, C, x.stride(0), x.stride(1), hi.stride(0),
                        TWO_PARTS=two_parts, BLOCK_R=32, BLOCK_C=128)


def mm_into(c, a, b, accumulate, alpha=1.0):
    """c (+)= alpha a @ b for fp16 a, b and an fp32 c, every sum in fp32. On CUDA one cuBLAS fp16
    product with fp32 output, in place (measured on an H200: 630-670 TFLOP/s at 4096^3, the
    Triton kernel with blocked sums 500). cuBLAS sums a whole K in the tensor cores: 5.7e-6 of
    max |c| at K=4096 (bench/fp16x2_accumulation.py --cublas), ~300x under grad_hidden's bf16
    rounding and ~16x over blocked sums (3.6e-7) for an fp32 grad_weight: the price of 23% less
    time in these products (91.8 against 119.1 ms at T=16k, H=4096, V=152k on an H200).
    Elsewhere (the CPU tests) the same products in fp32: products of fp16 values are exact there."""
    beta = 1 if accumulate else 0  # 0: c's old contents (NaN under the interpreter) ignored
    if c.is_cuda:
        torch.addmm(c, a, b, beta=beta, alpha=alpha, out_dtype=torch.float32, out=c)
    else:
        torch.addmm(c, a.float(), b.float(), beta=beta, alpha=alpha, out=c)


def n_parts(x):
    """fp16 parts that hold x exactly enough: one for bf16/fp16 values (8/11 bits fit in 11)."""
    return 1 if x.element_size() == 2 else 2


class _Operands:
    """Power-of-two scales of hidden and weight (from their largest magnitudes, over all rows)
    and, with split_hidden, the scaled fp16 parts of the whole hidden."""

    def __init__(self, hidden, weight, w_exp=None, split_hidden=True):
        self.h_parts = n_parts(hidden)
        self.w_parts = n_parts(weight)
        self.h_exp = pow2_exponent(max_abs(hidden))
        self.w_exp = pow2_exponent(max_abs(weight)) if w_exp is None else w_exp
        self.h_scale = exp2(self.h_exp)
        self.w_scale = exp2(self.w_exp)
        if split_hidden:
            self.h_hi = torch.empty(hidden.shape, device=hidden.device, dtype=torch.float16)
            self.h_lo = torch.empty_like(self.h_hi) if self.h_parts == 2 else None
            self.split_hidden(hidden, self.h_hi, self.h_lo)

    def split_hidden(self, rows, hi, lo):
        split_fp16(rows, self.h_scale, self.h_parts == 2, hi, hi if lo is None else lo)


def part_buffers(weight, two_parts, vocab_chunk):
    """(w_hi, w_lo): fp16 buffers for one chunk of weight rows (w_lo is w_hi when two_parts
    is False)."""
    n = min(vocab_chunk, weight.shape[0])
    w_hi = torch.empty((n, weight.shape[1]), device=weight.device, dtype=torch.float16)
    return w_hi, (torch.empty_like(w_hi) if two_parts else w_hi)


def vocab_chunks(weight, scale, two_parts, vocab_chunk, buffers=None):
    """Yield (v0, w_hi, w_lo) for each chunk of weight rows, split into reused buffers
    (w_lo is w_hi, unused, when two_parts is False). buffers: part_buffers' pair to split into,
    for a caller that walks the weight several times. Else each walk allocates its own, and
    the previous walk's stay alive as long as its loop variables hold slices of them
    (backward held two pairs at its peak that way: 64 MiB at H=4096).
    Tried and dropped: splitting the next chunk on a side stream into a second pair while
    this chunk's kernels run. On an H200 it gained 0.6 ms of 247 (within the noise) for
    64 MiB more (bench/results/gpu_session11_h200.md): the products fill every SM, so the
    split only runs in their tails."""
    V = weight.shape[0]
    n = min(vocab_chunk, V)
    w_hi, w_lo = buffers or part_buffers(weight, two_parts, vocab_chunk)
    for v0 in range(0, V, n):
        v1 = min(v0 + n, V)
        split_fp16(weight[v0:v1], scale, two_parts, w_hi[:v1 - v0], w_lo[:v1 - v0])
        yield v0, w_hi[:v1 - v0], w_lo[:v1 - v0]


def forward_fp16x2(hidden, weight, targets, inv_temp, with_entropy, interpret):
    """(logprobs, lse, entropy-or-None, w_exp) in mode fp16x2; w_exp is kept for backward."""
    vocab_chunk = VOCAB_CHUNK  # read at call time: tests shrink it to cross chunk edges
    T = hidden.shape[0]
    V = weight.shape[0]
    ops = _Operands(hidden, weight)
    n_vc = min(vocab_chunk, V)
    # Enough programs per launch to fill the GPU: token blocks (of ~128) x splits of the chunk.
    n_split = max(1, min(triton.cdiv(n_vc, VSPLIT_ALIGN), triton.cdiv(SMS_TO_FILL, triton.cdiv(T, 128))))
    v_per_split = triton.cdiv(triton.cdiv(n_vc, n_split), VSPLIT_ALIGN) * VSPLIT_ALIGN
    n_split = triton.cdiv(n_vc, v_per_split)
    n_chunks = triton.cdiv(V, n_vc)
    part = torch.full((3, n_chunks * n_split, T), float("nan"), device=hidden.device,
                      dtype=torch.float32)
    descale = exp2(-(ops.h_exp + ops.w_exp))
    for i, (v0, w_hi, w_lo) in enumerate(vocab_chunks(weight, ops.w_scale, ops.w_parts == 2,
                                                      vocab_chunk)):
        launch_forward(ops.h_hi, ops.h_lo if ops.h_lo is not None else ops.h_hi, w_hi, w_lo,
                       part[:, i * n_split:], descale, inv_temp, v_per_split, n_split,
                       MODE_FP16X2, ops.h_parts, with_entropy, interpret, ops.w_parts)
    z_target = target_logits(hidden, weight, targets, "fp16x2") * inv_temp
    logp, lse, ent = combine_partials(part, z_target, with_entropy)
    return logp, lse, ent, ops.w_exp


def bwd_vocab_rows(H, V):
    """Weight rows per backward vocabulary chunk: BWD_VOCAB_CHUNK at H >= BWD_WORK_H, and
    BWD_WORK_H // H times as many at smaller H (at most VOCAB_CHUNK), so that an inner
    iteration holds about the same GPU work at every width. Why: each iteration costs the
    host a fixed ~0.3 ms (a split, a dlogits launch with four tensor descriptors, three cuBLAS
    calls); at Qwen2-0.5B's H=896 a 4096-row chunk is ~0.1 ms of GPU work, so the host set
    the pace there (bench/results/gpu_session6_h200.md). The dlogits buffers then hold
    C x 16384 fp16 pairs at H=896 (256 MiB at C=4096), four times those at H=4096."""
    return min(VOCAB_CHUNK, V, BWD_VOCAB_CHUNK * max(1, BWD_WORK_H // H))


def token_chunk_rows(T, most):
    """Rows per backward token chunk: at most `most` (at least 16), as few chunks as that
    allows, and those chunks as even as 128-row token blocks make them (16,384 tokens at most
    6,144 a chunk: 3 chunks of 5,504 rows, not 6,144 + 6,144 + 4,096): each chunk costs a walk
    over the weight, and the buffers are sized by the largest."""
    most = min(T, max(16, most))
    even = triton.cdiv(triton.cdiv(T, triton.cdiv(T, most)), 128) * 128
    return min(most, even)


def dlogits_exponent(g_logp, g_ent, ent, inv_temp):
    """Power of two for dlogits: |dlogits| <= (|g_logp| + |g_ent| (1/e + entropy)) / temperature,
    since |onehot - p| <= 1 and p |log p + entropy| <= 1/e + p * entropy."""
    bound = g_logp.abs()
    if g_ent is not None:
        bound = bound + g_ent.abs() * (0.3679 + ent.abs())
    return pow2_exponent(bound.max() * inv_temp)


def backward_fp16x2(hidden, weight, targets, lse, ent, g_logp, g_ent, inv_temp, w_exp,
                    need_grad_hidden, need_grad_weight, chunk_tokens, interpret):
    """(grad_hidden in hidden.dtype or None, grad_weight in weight.dtype or None).
    Token chunks outer, vocabulary chunks inner: see the module docstring (Memory)."""
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    ops = _Operands(hidden, weight, w_exp, split_hidden=False)
    has_gent = g_ent is not None
    if g_logp is None:
        g_logp = torch.zeros(T, device=dev, dtype=torch.float32)
    g_logp = g_logp.float().contiguous()
    g_ent = g_ent.float().contiguous() if has_gent else None
    ent = ent if ent is not None else lse
    dl_exp = dlogits_exponent(g_logp, g_ent, ent, inv_temp)
    dl_scale = exp2(dl_exp)
    # The three products undo: dlogits' logits scale, grad_W's (dl, h) and grad_h's (dl, W).
    descale = exp2(-(ops.h_exp + ops.w_exp))
    if DESCALE_IN_PRODUCTS:  # in cuBLAS's alpha: the exponents on the host (one sync)
        e_dl, e_h, e_w = torch.stack([dl_exp, ops.h_exp, ops.w_exp]).tolist()
        alpha_w, alpha_h = 2.0 ** -(e_dl + e_h), 2.0 ** -(e_dl + e_w)
        post_w = post_h = None
    else:                    # by one pass over each fp32 result
        alpha_w = alpha_h = 1.0
        post_w, post_h = exp2(-(dl_exp + ops.h_exp)), exp2(-(dl_exp + ops.w_exp))
    n_vc = bwd_vocab_rows(H, V)  # reads the constants at call time: tests shrink VOCAB_CHUNK
    C = token_chunk_rows(T, BWD_TOKEN_CHUNKS_PER_CHUNK_TOKENS * chunk_tokens)
    new = (lambda *a, **k: torch.full(*a, float("nan"), **k)) if interpret else torch.empty  # noqa: E731
    # A gradient returned in 16 bits takes the hi parts only: one product, whose ~2^-12
    # error is 8x under the final bf16 rounding. An fp32 gradient takes every product but
    # lo x lo: ~2^-22 in the parts, then cuBLAS's sums (mm_into).
    w_full = weight.element_size() > 2   # grad_weight returned in fp32
    h_full = hidden.element_size() > 2   # grad_hidden returned in fp32
    # Stacked (STACK_GRAD_W): chunk rows [0, n) of dl_buf hold dl_lo, [n, 2n) dl_hi, and
    # rows [n, 2n) of h_buf repeat h_hi, so grad_W's two products are one call over 2n rows.
    stack = STACK_GRAD_W and need_grad_weight and w_full and ops.h_parts == 1
    dl_buf = new((2 * C, n_vc), device=dev, dtype=torch.float16)
    h_buf = new((2 * C if stack else C, H), device=dev, dtype=torch.float16)
    h_lo_buf = new((C, H), device=dev, dtype=torch.float16) if ops.h_parts == 2 else None
    grad_hidden = grad_h32 = None
    if need_grad_hidden:
        grad_hidden = new((T, H), device=dev, dtype=hidden.dtype)
        grad_h32 = new((C, H), device=dev, dtype=torch.float32)  # one token chunk's accumulator
    grad_w32 = new((V, H), device=dev, dtype=torch.float32) if need_grad_weight else None
    w_bufs = part_buffers(weight, ops.w_parts == 2, n_vc)  # one pair for every token chunk's walk
    for t0 in range(0, T, C):
        t1 = min(t0 + C, T)
        n = t1 - t0
        h_hi = h_buf[:n]
        h_lo = h_lo_buf[:n] if h_lo_buf is not None else None
        ops.split_hidden(hidden[t0:t1], h_hi, h_lo)
        if stack:
            h_buf[n:2 * n].copy_(h_hi)
        for v0, w_hi, w_lo in vocab_chunks(weight, ops.w_scale, ops.w_parts == 2, n_vc, w_bufs):
            nv = w_hi.shape[0]
            d_lo, d_hi = dl_buf[:n, :nv], dl_buf[n:2 * n, :nv]  # the same strides: one kernel offset
            launch_dlogits(h_hi, h_lo if h_lo is not None else h_hi, w_hi, w_lo, targets[t0:t1],
                           lse[t0:t1], ent[t0:t1], g_logp[t0:t1],
                           (g_ent if has_gent else g_logp)[t0:t1], d_hi, d_lo, descale,
                           dl_scale, inv_temp, v0, MODE_FP16X2, ops.h_parts, has_gent, True,
                           interpret, ops.w_parts)
            # Sums of scaled parts; the scales are undone by alpha or at the end (powers of two:
            # exact).
            if need_grad_weight:
                gw = grad_w32[v0:v0 + nv]
                if stack:
                    mm_into(gw, dl_buf[:2 * n, :nv].t(), h_buf[:2 * n], t0 > 0, alpha_w)
                else:
                    mm_into(gw, d_hi.t(), h_hi, t0 > 0, alpha_w)
                    if w_full:
                        mm_into(gw, d_lo.t(), h_hi, True, alpha_w)
                        if h_lo is not None:
                            mm_into(gw, d_hi.t(), h_lo, True, alpha_w)
            if need_grad_hidden:
                gh = grad_h32[:n]
                mm_into(gh, d_hi, w_hi, v0 > 0, alpha_h)
                if h_full:
                    mm_into(gh, d_lo, w_hi, True, alpha_h)
                    if ops.w_parts == 2:
                        mm_into(gh, d_hi, w_lo, True, alpha_h)
        if need_grad_hidden:
            gh = grad_h32[:n] if post_h is None else grad_h32[:n].mul_(post_h)
            grad_hidden[t0:t1] = gh  # cast to hidden's dtype
    grad_weight = None
    if need_grad_weight:
        gw = grad_w32 if post_w is None else grad_w32.mul_(post_w)
        grad_weight = gw.to(weight.dtype)  # no copy when the weight is fp32
    return grad_hidden, grad_weight
