"""Backward Triton kernels: recompute logits per token chunk, then two plain matrix products.

With z = logits / temperature, p = softmax(z), lse and entropy Hent saved by the forward:
    d logp / dz_j    = onehot_j - p_j
    d Hent / dz_j    = -p_j (log p_j + Hent) = -p_j (z_j - lse + Hent)
    dlogits          = (g_logp (onehot - p) - g_ent p (z - lse + Hent)) / temperature
    grad_hidden      = dlogits @ W            grad_weight = dlogits^T @ hidden

Design choice (documented because it trades memory for speed and determinism):
tokens are processed in chunks of C rows (default 1024). For each chunk one kernel recomputes
the logits tile by tile and writes dlogits^T[V, C] (fp32, or bf16 in mode bf16: 0.6/0.3 GB at
V=152k); then two tiled matrix-product kernels compute grad_hidden[chunk] and add
dlogits^T @ hidden[chunk] into an fp32 grad_weight. Backward work is one logits recompute plus
the two gradient products, the minimum, and there are no atomics: every output element is
summed by one program in a fixed order, so a given tile configuration (autotuned once per
process) gives bitwise-identical gradients run to run. The price is that grad_weight (fp32,
V x H) is read and rewritten once per chunk: ~8 V H bytes per chunk, ~15% of the
grad_weight product at C=1024; larger chunks cut it at C * V * 4 bytes of buffer.
The fully fused alternatives either recompute logits once per output H-block (H/BLOCK_H
times more work) or accumulate grad_weight with (T/BLOCK_T) * V * H fp32 atomics
(~3e11 at T=64k, H=4096) and are non-deterministic.
"""
import torch
import triton
import triton.language as tl

from . import lm_head_triton_fwd as fwd
from .lm_head_triton_common import MODE_FP16X2, grouped_tile, logits_tile, mma, vocab_axis
from .lm_head_triton_fwd import (BF16_TILES, FP32_TILES, LN2_IN_KERNELS, LOG2E, descriptor,
                                 make_configs, make_prune, set_block_shapes, tma_ok, tma_operands)

# How mode fp16x2's dlogits kernel walks its tiles (the other modes: one tile a program, not
# measured otherwise). On an H200, with the forward's loop flattened too (FLATTEN_TILE_LOOPS),
# forward+backward 1.1-2.2% faster at T=16k, H=4096 and 3.4-3.9% at T=28k, H=896 than one
# tile a program with pointer stores, three calls (bench/results/gpu_session10_h200.md). The
# TMA stores alone, without the persistent walk, were 4% slower. Benchmarks switch
# them off for an A/B (bench/kernels_lm_head.py --tile-walks).
PERSISTENT_DLOGITS = True  # one program per SM walks the tiles (the loop in _dlogits_kernel)
DLOGITS_TMA_STORE = True    # its fp16 parts stored by the tensor-memory accelerator


@triton.jit
def _row_terms(rows, row_ok, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dl_scale_ptr,
               inv_temp, v_base, HAS_GENT: tl.constexpr):
    """Per-token factors of dlogits, folded so that the per-element work is a few FMAs.
    With y = log2 p = z log2(e) - lse log2(e), k = dl_scale / temperature (dl_scale: the
    power of two of mode fp16x2's output parts, 1 otherwise):
        dlogits k = onehot g k - p (a + b y),  a = (g + g_ent ent) k,  b = g_ent ln(2) k.
    Returns (lse log2(e), target column in this chunk, g k, a, b)."""
    k = inv_temp * tl.load(dl_scale_ptr)
    lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1) - v_base
    gk = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0) * k
    if HAS_GENT:
        ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0) * k
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        a = gk + ge * ent
        b = ge * LN2_IN_KERNELS
    else:
        a = gk
        b = gk  # unused
    return lse2, tgt, gk, a, b


@triton.jit
def _dlogits_tile(
    tile, h_ptr, hl_ptr, w_ptr, wl_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr,
    dl_ptr, dll_ptr, scale_ptr, dl_scale_ptr,
    T, V, H, stride_ht, stride_hh, stride_wv, stride_wh, stride_dt, stride_dv,
    inv_temp, v_base,
    MODE: tl.constexpr, VAX: tl.constexpr, H_PARTS: tl.constexpr, W_PARTS: tl.constexpr, HAS_GENT: tl.constexpr,
    SPLIT_OUT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_T: tl.constexpr, TMA: tl.constexpr, HI_STEPS: tl.constexpr, TMA_STORE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One [BLOCK_T, BLOCK_V] tile of dlogits (see _dlogits_kernel); tile numbers run in
    grouped order: consecutive tiles share a vocabulary block across GROUP_T token blocks."""
    tb, vb = grouped_tile(tile, tl.cdiv(T, BLOCK_T), tl.cdiv(V, BLOCK_V), GROUP_T)

    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    # Vocabulary on axis VAX of the tile (see logits_tile): per-token vectors broadcast
    # with expand_dims(v, VAX), per-column ones with expand_dims(v, 1 - VAX).
    acc = logits_tile(h_ptr, hl_ptr, w_ptr, wl_ptr, rows, cols, tb * BLOCK_T, vb * BLOCK_V, T, V,
                      H, stride_ht, stride_hh, stride_wv, stride_wh, MODE, VAX, H_PARTS, W_PARTS,
                      BLOCK_T, BLOCK_V, BLOCK_H, TMA, HI_STEPS, INTERPRET)
    # Per-token terms after the products: loaded before them, they held registers through
    # the K loop (fp16x2 uses all 255) and forward+backward was 3% slower on an H200
    # (252.6 against 244.2 ms at T=16k, H=4096; bench/results/gpu_session12_h200.md).
    lse2, tgt, gk, a, b = _row_terms(rows, row_ok, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr,
                                     gent_ptr, dl_scale_ptr, inv_temp, v_base, HAS_GENT)
    cols_b = tl.expand_dims(cols, 1 - VAX)
    rows_b = tl.expand_dims(rows, VAX)
    # Per element: an FMA, an exp2, a select and one or two FMAs, every per-token factor
    # folded in _row_terms: the epilogue does not overlap the products, so each op counts
    # (20% fewer epilogue instructions than the formula written out; on an H200 0.8 ms of
    # 245, within the noise, bench/results/gpu_session12_h200.md).
    y = tl.fma(acc, inv_temp * tl.load(scale_ptr) * LOG2E, -tl.expand_dims(lse2, VAX))  # log2 p
    p = tl.exp2(y)
    dl = tl.where(cols_b == tl.expand_dims(tgt, VAX), tl.expand_dims(gk, VAX), 0.0)
    if HAS_GENT:
        dl = tl.fma(-p, tl.fma(y, tl.expand_dims(b, VAX), tl.expand_dims(a, VAX)), dl)
    else:
        dl = tl.fma(-p, tl.expand_dims(a, VAX), dl)
    if SPLIT_OUT:
        hi = dl.to(tl.float16)
        lo = (dl - hi.to(tl.float32)).to(tl.float16)
        if TMA_STORE:
            # Through shared memory by the tensor-memory accelerator, which drops what lies
            # past the views' edges: no masks, no per-element addresses.
            dl_ptr.store([tb * BLOCK_T, vb * BLOCK_V], hi)
            dll_ptr.store([tb * BLOCK_T, vb * BLOCK_V], lo)
        else:
            offs = rows_b * stride_dt + cols_b * stride_dv
            mask = (cols_b < V) & (rows_b < T)
            tl.store(dl_ptr + offs, hi, mask=mask)
            tl.store(dll_ptr + offs, lo, mask=mask)
    else:
        offs = rows_b * stride_dt + cols_b * stride_dv
        mask = (cols_b < V) & (rows_b < T)
        tl.store(dl_ptr + offs, dl.to(dl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dlogits_kernel(
    h_ptr, hl_ptr, w_ptr, wl_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr,
    dl_ptr, dll_ptr, scale_ptr, dl_scale_ptr,
    T, V, H, stride_ht, stride_hh, stride_wv, stride_wh, stride_dt, stride_dv,
    inv_temp, v_base,
    MODE: tl.constexpr, VAX: tl.constexpr, H_PARTS: tl.constexpr, W_PARTS: tl.constexpr, HAS_GENT: tl.constexpr,
    SPLIT_OUT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_T: tl.constexpr, TMA: tl.constexpr, HI_STEPS: tl.constexpr, TMA_STORE: tl.constexpr,
    PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dlogits[t, v] for tokens [0, T) and vocabulary rows [v_base, v_base + V) held by w_ptr,
    stored at dl_ptr + t * stride_dt + v * stride_dv in dl_ptr's dtype; with SPLIT_OUT
    (mode fp16x2) as fp16 hi (dl_ptr) and lo (dll_ptr) parts of dlogits * dl_scale_ptr[0]
    (TMA_STORE: dl_ptr, dll_ptr are tensor descriptors of those [T, V] views).
    PERSISTENT: one program per SM walks the tiles (tile = program, program + grid, ...);
    FLATTEN lets Triton's pipeliner run that walk and the K loop as one loop, so the next
    tile's first loads are issued during this tile's epilogue. Otherwise one tile a program."""
    if PERSISTENT:
        n_tiles = tl.cdiv(T, BLOCK_T) * tl.cdiv(V, BLOCK_V)
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=FLATTEN):
            _dlogits_tile(tile, h_ptr, hl_ptr, w_ptr, wl_ptr, tgt_ptr, lse_ptr, ent_ptr,
                          glogp_ptr, gent_ptr, dl_ptr, dll_ptr, scale_ptr, dl_scale_ptr, T, V, H,
                          stride_ht, stride_hh, stride_wv, stride_wh, stride_dt, stride_dv,
                          inv_temp, v_base, MODE, VAX, H_PARTS, W_PARTS, HAS_GENT, SPLIT_OUT,
                          BLOCK_T, BLOCK_V, BLOCK_H, GROUP_T, TMA, HI_STEPS, TMA_STORE, INTERPRET)
    else:
        _dlogits_tile(tl.program_id(0), h_ptr, hl_ptr, w_ptr, wl_ptr, tgt_ptr, lse_ptr, ent_ptr,
                      glogp_ptr, gent_ptr, dl_ptr, dll_ptr, scale_ptr, dl_scale_ptr, T, V, H,
                      stride_ht, stride_hh, stride_wv, stride_wh, stride_dt, stride_dv,
                      inv_temp, v_base, MODE, VAX, H_PARTS, W_PARTS, HAS_GENT, SPLIT_OUT,
                      BLOCK_T, BLOCK_V, BLOCK_H, GROUP_T, TMA, HI_STEPS, TMA_STORE, INTERPRET)


def launch_dlogits(h, hl, w, wl, targets, lse, ent, g_logp, g_ent, dl, dll, scale, dl_scale,
                   inv_temp, v_base, mode_id, h_parts, has_gent, split_out, interpret, w_parts=1):
    """One dlogits launch: dl (and dll) are [T, V]-shaped views, any strides."""
    T, H = h.shape
    V = w.shape[0]
    dev = h.device
    strides = (h.stride(0), h.stride(1), w.stride(0), w.stride(1))
    dl_strides = (dl.stride(0), dl.stride(1))
    h, hl, w, wl, tma = tma_operands(mode_id, interpret, h, hl, w, wl)
    fp16x2 = mode_id == MODE_FP16X2
    tma_store = split_out and tma and DLOGITS_TMA_STORE and tma_ok(dl) and tma_ok(dll)
    persistent = PERSISTENT_DLOGITS and fp16x2
    if tma_store:
        dl, dll = (descriptor(x) for x in (dl, dll))
    args = (h, hl, w, wl, targets, lse, ent, g_logp, g_ent, dl, dll, scale, dl_scale, T, V, H,
            *strides, *dl_strides, inv_temp, v_base)
    meta = dict(MODE=mode_id, VAX=vocab_axis(mode_id), H_PARTS=h_parts, W_PARTS=w_parts,
                HAS_GENT=has_gent, SPLIT_OUT=split_out, TMA=tma, HI_STEPS=fwd.HI_SUM_STEPS,
                TMA_STORE=tma_store, PERSISTENT=persistent,
                FLATTEN=fwd.FLATTEN_TILE_LOOPS and fp16x2)
    if interpret:
        blocks = dict(BLOCK_T=16, BLOCK_V=64, BLOCK_H=32)
        n_tiles = triton.cdiv(T, 16) * triton.cdiv(V, 64)
        grid = (min(n_tiles, 3) if persistent else n_tiles,)  # 3: programs walk tiles
        set_block_shapes(dict(h_ptr=h, hl_ptr=hl, w_ptr=w, wl_ptr=wl, dl_ptr=dl, dll_ptr=dll, **blocks))
        _dlogits_kernel[grid](*args, **meta, **blocks, GROUP_T=2, INTERPRET=True)
    else:
        n_sms = torch.cuda.get_device_properties(dev).multi_processor_count

        def grid(m):
            n_tiles = triton.cdiv(T, m["BLOCK_T"]) * triton.cdiv(V, m["BLOCK_V"])
            return (min(n_tiles, n_sms) if persistent else n_tiles,)
        _dlogits_tuned[grid](*args, **meta, INTERPRET=False)


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    MODE: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INTERPRET: tl.constexpr,
):
    """c (+)= a @ b in precision MODE; any strides, so transposed operands need no copy.
    (Mode fp16x2 forms its gradient products with cuBLAS: lm_head_triton_fp16x2.mm_into.)"""
    pm, pn = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, MODE, INTERPRET)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


_DL_NAMES = ["BLOCK_T", "BLOCK_V", "BLOCK_H", "GROUP_T"]
# dl_ptr is written in full by the kernel; the tuner's trial runs only overwrite it.
_dlogits_tuned = triton.autotune(
    configs=make_configs(_DL_NAMES, pre_hook=set_block_shapes),
    key=["H", "MODE", "H_PARTS", "W_PARTS", "HAS_GENT", "SPLIT_OUT", "TMA", "HI_STEPS", "TMA_STORE",
         "PERSISTENT", "FLATTEN"],
    prune_configs_by={"early_config_prune": make_prune("h_ptr", _DL_NAMES)},
)(_dlogits_kernel)

MM_NAMES = ["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"]
_matmul_tuned = triton.autotune(
    configs=make_configs(MM_NAMES, BF16_TILES + FP32_TILES),
    key=["N", "MODE", "ACCUMULATE", "stride_am"],
    prune_configs_by={"early_config_prune": make_prune("a_ptr", MM_NAMES)},
    restore_value=["c_ptr"],
)(matmul_kernel)


def _matmul(a, b, c, accumulate, mode_id, interpret):
    """c (+)= a @ b, a [M, K], b [K, N] (views with any strides), c [M, N]."""
    M, K = a.shape
    N = b.shape[1]
    args = (a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1))
    meta = dict(MODE=mode_id, ACCUMULATE=accumulate)
    if interpret:
        grid = (triton.cdiv(M, 64) * triton.cdiv(N, 32),)
        matmul_kernel[grid](*args, **meta, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=2,
                             INTERPRET=True)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _matmul_tuned[grid](*args, **meta, INTERPRET=False)


def lm_head_backward(hidden, weight, targets, lse, ent, g_logp, g_ent, inv_temp, mode_id,
                     need_grad_hidden, need_grad_weight, chunk_tokens=1024, interpret=False):
    """Returns (grad_hidden in hidden.dtype or None, grad_weight in weight.dtype or None)."""
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    has_gent = g_ent is not None
    if g_logp is None:
        g_logp = torch.zeros(T, device=dev, dtype=torch.float32)
    g_logp = g_logp.float().contiguous()
    g_ent = g_ent.float().contiguous() if has_gent else g_logp  # dummy pointer when unused
    ent = ent if ent is not None else lse
    # bf16 mode multiplies bf16 operands anyway, so dlogits can be stored in bf16.
    dl_dtype = torch.bfloat16 if mode_id == 1 else torch.float32
    one = torch.ones(1, device=dev, dtype=torch.float32)
    C = min(chunk_tokens, T)
    # Under the interpreter (CPU tests) buffers start as NaN, so an element no program
    # writes shows up in the test instead of passing as leftover memory.
    new = (lambda *a, **k: torch.full(*a, float("nan"), **k)) if interpret else torch.empty  # noqa: E731
    dlt = new((V, C), device=dev, dtype=dl_dtype)  # dlogits^T of one chunk
    grad_hidden = new(hidden.shape, device=dev, dtype=hidden.dtype) if need_grad_hidden else None
    grad_w32 = new((V, H), device=dev, dtype=torch.float32) if need_grad_weight else None
    for c0 in range(0, T, C):
        c1 = min(c0 + C, T)
        n = c1 - c0
        h = hidden[c0:c1]
        d = dlt[:, :n]
        launch_dlogits(h, h, weight, weight, targets[c0:c1], lse[c0:c1], ent[c0:c1],
                       g_logp[c0:c1], g_ent[c0:c1], d.t(), d.t(), one, one, inv_temp, 0,
                       mode_id, 1, has_gent, False, interpret)
        if need_grad_hidden:
            _matmul(d.t(), weight, grad_hidden[c0:c1], False, mode_id, interpret)
        if need_grad_weight:
            _matmul(d, h, grad_w32, c0 > 0, mode_id, interpret)
    grad_weight = None
    if need_grad_weight:
        grad_weight = grad_w32.to(weight.dtype)  # no copy when the weight is fp32
    return grad_hidden, grad_weight
