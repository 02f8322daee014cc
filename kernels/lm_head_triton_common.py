"""Shared Triton helpers for the fused LM-head kernels: precision modes and matrix products.

Precision modes (the `MODE` constexpr of every kernel):

* ``MODE_FP32``   fp32 operands, fp32 products and sums. ``tl.dot(..., input_precision="ieee")``
  so Triton does not silently use TF32 (its default for fp32 dots on tensor cores);
  this runs on the FMA units, not the tensor cores, so it is the slow, exact mode.
* ``MODE_BF16``   operands rounded to bf16, products on bf16 tensor cores, fp32 accumulation.
* ``MODE_BF16X3`` if one operand is stored in bf16 (the usual case: hidden states of a bf16
  model, multiplied by an fp32 weight), the other is split into three bf16 parts that hold
  all its 24 significant bits, and the three products are exact: fp32 accuracy for three
  tensor-core products. If both are fp32, each is split as x = hi + lo with hi = bf16(x),
  lo = bf16(x - hi), and a·b = hi_a·hi_b + hi_a·lo_b + lo_a·hi_b: hi + lo keeps only 16
  significant bits, so products are ~2^-16 accurate (between bf16 and fp32).
  Either way: 3 tensor-core products instead of one FMA-unit product (the tensor cores are
  ~15x faster than the FMA units on an H100).
* ``MODE_TF32X3`` the same three-product trick with tf32 parts (11 significant bits each,
  22 together): fp32-level accuracy. Tensor-core tf32 runs at half the bf16 rate, so it costs
  about twice bf16x3. On the GPU this is Triton's own ``input_precision="tf32x3"``.
* ``MODE_FP16X2`` fp32 accuracy from two fp16 products: operands are scaled by powers of two
  and split into fp16 hi/lo parts *before* the kernels run (lm_head_triton_fp16x2.py), so the
  kernels only load fp16 tiles and multiply them; `logits_tile` takes the lo parts as extra
  pointers. Only the VAX=1 orientation.

Operands are split in registers right after they are loaded, so no hi/lo copy of the weight
([V, H], 2.5 GB at V=152k, H=4096) is ever stored.

Triton's CPU interpreter (TRITON_INTERPRET=1) multiplies bf16 tensors as raw uint16 bit
patterns and truncates fp32->bf16 instead of rounding, so under ``INTERPRET`` we keep
"bf16" values in fp32 registers (rounded to nearest-even by bit manipulation) and use an
exact fp32 dot: products of bf16 values are exact in fp32, so this computes what the tensor
cores compute, up to the order of the fp32 additions.
"""
import os

import triton
import triton.language as tl

MODE_FP32 = 0
MODE_BF16 = 1
MODE_BF16X3 = 2
MODE_TF32X3 = 3
MODE_FP16X2 = 4
MODES = {"fp32": MODE_FP32, "bf16": MODE_BF16, "bf16x3": MODE_BF16X3, "tf32x3": MODE_TF32X3,
         "fp16x2": MODE_FP16X2}


def interpret_mode() -> bool:
    """True when Triton runs kernels in its numpy interpreter (CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_to_bf16_in_fp32(x):
    """Round fp32 to the nearest bf16 value (ties to even), kept in fp32.

    Integer bit manipulation gives the same result in the interpreter and on the GPU.
    """
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def round_to_tf32_in_fp32(x):
    """Round fp32 to tf32 (10 stored mantissa bits), ties away from zero like cvt.rna.tf32."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x1000) & 0xFFFFE000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def as_bf16(x, INTERPRET: tl.constexpr):
    """Operand for a bf16 tensor-core product (no-op when x is already bf16)."""
    if INTERPRET:
        return round_to_bf16_in_fp32(x.to(tl.float32))
    else:
        return x.to(tl.bfloat16)


@triton.jit
def split_bf16(x, INTERPRET: tl.constexpr):
    """x = hi + lo (+ ~2^-17 |x|) with hi, lo bf16 values."""
    x = x.to(tl.float32)
    if INTERPRET:
        hi = round_to_bf16_in_fp32(x)
        lo = round_to_bf16_in_fp32(x - hi)
    else:
        hi = x.to(tl.bfloat16)
        lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def split3_bf16(x, INTERPRET: tl.constexpr):
    """x = hi + mid + lo (+ ~2^-25 |x|): three bf16 parts hold all 24 bits of an fp32."""
    x = x.to(tl.float32)
    if INTERPRET:
        hi = round_to_bf16_in_fp32(x)
        r = x - hi
        mid = round_to_bf16_in_fp32(r)
        lo = round_to_bf16_in_fp32(r - mid)
    else:
        hi = x.to(tl.bfloat16)
        r = x - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def dot_bf16(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:
        # a, b hold bf16 values in fp32: an exact fp32 product emulates the tensor core.
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dot_fp16(a, b, acc, INTERPRET: tl.constexpr):
    """acc += a @ b for fp16 tiles (fp16 x fp16 products are exact in fp32)."""
    if INTERPRET:
        # numpy would multiply float16 arrays in float16; fp32 holds the products exactly.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def grouped_tile(pid, n_a, n_b, GROUP: tl.constexpr):
    """Program id -> (index along a, index along b), GROUP a-blocks at a time.

    Programs that run together then share the same few b-blocks (and a-blocks) through L2.
    """
    per_group = GROUP * n_b
    first_a = (pid // per_group) * GROUP
    group_size = tl.minimum(n_a - first_a, GROUP)
    ia = first_a + (pid % per_group) % group_size
    ib = (pid % per_group) // group_size
    return ia, ib


@triton.jit
def mma(a, b, acc, MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += a @ b in the given precision mode; a, b are raw loaded tiles (any float dtype).

    In the accurate modes each K step's product is formed in a fresh accumulator and then
    added to acc with one fp32 add (blocked summation): the running sum then takes one
    rounding per K step instead of one per multiply-add, and tensor cores, which do not
    round their internal additions to nearest, only ever add up BLOCK_K products.
    """
    if MODE == 0:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif MODE == 1:
        acc = dot_bf16(as_bf16(a, INTERPRET), as_bf16(b, INTERPRET), acc, INTERPRET)
    elif MODE == 2:
        # Small terms first so they are not absorbed by the large one before being summed.
        if a.dtype == tl.bfloat16 and b.dtype == tl.bfloat16:
            # Both exact in bf16: one product is already exact (all lo parts would be 0).
            part = dot_bf16(as_bf16(a, INTERPRET), as_bf16(b, INTERPRET),
                            tl.zeros(acc.shape, tl.float32), INTERPRET)
        elif b.dtype == tl.bfloat16:
            # b is exact in bf16 (e.g. bf16 hidden states): split a in three and the
            # products are exact, so this is fp32 accuracy at the cost of three products.
            a_hi, a_mid, a_lo = split3_bf16(a, INTERPRET)
            b_x = as_bf16(b, INTERPRET)
            part = dot_bf16(a_lo, b_x, tl.zeros(acc.shape, tl.float32), INTERPRET)
            part = dot_bf16(a_mid, b_x, part, INTERPRET)
            part = dot_bf16(a_hi, b_x, part, INTERPRET)
        elif a.dtype == tl.bfloat16:
            b_hi, b_mid, b_lo = split3_bf16(b, INTERPRET)
            a_x = as_bf16(a, INTERPRET)
            part = dot_bf16(a_x, b_lo, tl.zeros(acc.shape, tl.float32), INTERPRET)
            part = dot_bf16(a_x, b_mid, part, INTERPRET)
            part = dot_bf16(a_x, b_hi, part, INTERPRET)
        else:
            # Both fp32: hi/lo splits, lo*lo dropped: products good to ~2^-16 relative.
            a_hi, a_lo = split_bf16(a, INTERPRET)
            b_hi, b_lo = split_bf16(b, INTERPRET)
            part = dot_bf16(a_lo, b_hi, tl.zeros(acc.shape, tl.float32), INTERPRET)
            part = dot_bf16(a_hi, b_lo, part, INTERPRET)
            part = dot_bf16(a_hi, b_hi, part, INTERPRET)
        acc = add_unfolded(acc, part)
    else:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if INTERPRET:
            # The interpreter ignores input_precision: emulate tf32x3 exactly in fp32.
            a_hi = round_to_tf32_in_fp32(a)
            a_lo = round_to_tf32_in_fp32(a - a_hi)
            b_hi = round_to_tf32_in_fp32(b)
            b_lo = round_to_tf32_in_fp32(b - b_hi)
            part = tl.dot(a_lo, b_hi, input_precision="ieee")
            part = tl.dot(a_hi, b_lo, part, input_precision="ieee")
            part = tl.dot(a_hi, b_hi, part, input_precision="ieee")
            acc = add_unfolded(acc, part)
        else:
            acc = add_unfolded(acc, tl.dot(a, b, input_precision="tf32x3"))
    return acc


@triton.jit
def logits_tile(h_ptr, hl_ptr, w_ptr, wl_ptr, rows, cols, row0, col0, T, V, H,
                stride_ht, stride_hh, stride_wv, stride_wh,
                MODE: tl.constexpr, VAX: tl.constexpr, H_PARTS: tl.constexpr,
                W_PARTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, TMA: tl.constexpr, HI_STEPS: tl.constexpr,
                INTERPRET: tl.constexpr):
    """fp32 tile of hidden[rows] @ weight[cols]^T reduced over all of H; vocabulary on axis VAX.

    VAX=1: [BLOCK_T, BLOCK_V], hidden is the left operand. Per-token reductions then run
    along the fast axis of the accumulator (inside a warp): the cheaper epilogue.
    VAX=0: [BLOCK_V, BLOCK_T], the weight is the left operand, the one a Hopper tensor-core
    instruction (wgmma) can read from registers, which is where bf16x3 splits the fp32
    weight; the bf16 hidden then goes straight from shared memory to the tensor cores.
    MODE_FP16X2 (VAX=1 only): h_ptr/w_ptr hold the fp16 hi parts, hl_ptr/wl_ptr the lo parts
    (read only when H_PARTS / W_PARTS == 2), all with the strides given; the tile is
    [h @ w_lo^T] [+ h_lo @ w^T] + h @ w^T, small terms first.
    Out-of-range rows/cols load zeros: the caller masks them.
    """
    if VAX == 0:
        acc = tl.zeros((BLOCK_V, BLOCK_T), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_H)
    row_ok = rows < T
    col_ok = cols < V
    if MODE == 4:
        # (an else branch, not an early return: Triton compiles what follows a return too)
        acc = fp16x2_tile(h_ptr, hl_ptr, w_ptr, wl_ptr, rows, cols, row_ok, col_ok, row0, col0,
                          H, stride_ht, stride_hh, stride_wv, stride_wh, acc, H_PARTS, W_PARTS,
                          BLOCK_H, TMA, HI_STEPS, INTERPRET)
    else:
        for k0 in range(0, H, BLOCK_H):
            k = k0 + ks
            k_ok = k < H
            if VAX == 0:
                w = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :] * stride_wh,
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                # hidden is [T, H] row-major; loading it as [BLOCK_H, BLOCK_T] gives hidden^T.
                h = tl.load(h_ptr + rows[None, :] * stride_ht + k[:, None] * stride_hh,
                            mask=row_ok[None, :] & k_ok[:, None], other=0.0)
                acc = mma(w, h, acc, MODE, INTERPRET)
            else:
                h = tl.load(h_ptr + rows[:, None] * stride_ht + k[None, :] * stride_hh,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptr + cols[None, :] * stride_wv + k[:, None] * stride_wh,
                            mask=col_ok[None, :] & k_ok[:, None], other=0.0)
                acc = mma(h, w, acc, MODE, INTERPRET)
    return acc


@triton.jit
def add_unfolded(acc, part):
    """acc + part (one rounded fp32 add), where part is a fresh tl.dot. Written as an fma
    with 1 because Triton folds addf(dot(a, b, 0), acc) into dot(a, b, acc), which would
    sum part in the tensor cores again (measured: 2.2e-5 max |d log p| at V=152k, H=4096)."""
    return tl.fma(part, 1.0, acc)


@triton.jit
def fp16x2_tile(h_ptr, hl_ptr, w_ptr, wl_ptr, rows, cols, row_ok, col_ok, row0, col0, H,
                stride_ht, stride_hh, stride_wv, stride_wh, acc,
                H_PARTS: tl.constexpr, W_PARTS: tl.constexpr, BLOCK_H: tl.constexpr,
                TMA: tl.constexpr, HI_STEPS: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + [h @ w_lo^T] [+ h_lo @ w^T] + h @ w^T over all of H, fp16 parts (see logits_tile).

    Blocked summation: each K step's products go to a fresh accumulator, added to acc with
    one rounded fp32 add. The tensor cores truncate the additions of an MMA chain: summing
    all of K=4096 in them gave 9e-5 max |d log p| at V=152k on an H100, this 2.2e-6. It
    costs ~13% of the product time (bench/fp16x2_accumulation.py: each add waits for its
    products); summing 2 steps per add needs twice the shared memory per pipeline stage
    and was slower still, 4 or 8 steps per add in a nested loop no faster.
    TMA: tiles come by the tensor-memory accelerator (no address arithmetic or address
    registers per thread, zeros past the edges): 552 against 500 TFLOP/s for these sums
    on an H200 (bench/fp16x2_accumulation.py, tma_blocked against blocked).
    HI_STEPS > 0: only the hi x hi product is summed in blocks; the lo products (2^-11 of it)
    go straight into their own accumulator, whose tensor-core sum error (~1e-5 of the lo
    terms) is ~1e-8 of the tile. Measured in the head on an H200: forward+backward 4% faster
    at H=4096, 2% at H=896, the same log p error (bench/results/gpu_session7_h200.md); the
    products alone are not faster, so the gain is in how the loop fits the kernels' tiles.
    HI_STEPS = n > 1: hi x hi is summed straight in the tensor cores for n K steps, then
    added with one rounded add: 1/n of the adds, and the error of an n-step chain. One flat
    loop with the add under an `if` (nested loops, segN in bench/fp16x2_accumulation.py, broke
    Triton's pipelining). n=8 on an H200: the head 1.6-2.7% faster than n=1 at H=4096, max
    |d log p| 4.9e-6 against 2.0e-6; n=4 no faster than 1 (gpu_session9_h200.md); n=16 1.1%
    faster than 8, 6.4e-6 (gpu_session12_h200.md). Each add waits for its chain of products,
    so fewer adds leave fewer gaps between them.
    HI_STEPS = 0: every product summed in blocks.
    Tried and dropped: the lo products summed into hi x hi's segment chain, which saves one
    accumulator tile of registers, made forward+backward 11% slower on an H200 (274 against
    248 ms at T=16k, H=4096): products chained on one accumulator wait for each other, two
    chains interleave (bench/results/gpu_session11_h200.md).
    """
    ks = tl.arange(0, BLOCK_H)
    lo = tl.zeros(acc.shape, tl.float32)  # the lo products' direct sum (HI_STEPS > 0)
    hi = tl.zeros(acc.shape, tl.float32)  # hi x hi's direct sum within a segment (HI_STEPS > 1)
    for k0 in range(0, H, BLOCK_H):
        if TMA:
            h = h_ptr.load([row0, k0])
            w = w_ptr.load([col0, k0]).T
        else:
            k = k0 + ks
            k_ok = k < H
            h_off = rows[:, None] * stride_ht + k[None, :] * stride_hh
            h_mask = row_ok[:, None] & k_ok[None, :]
            w_off = cols[None, :] * stride_wv + k[:, None] * stride_wh
            w_mask = col_ok[None, :] & k_ok[:, None]
            h = tl.load(h_ptr + h_off, mask=h_mask, other=0.0)
            w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
        if W_PARTS == 2:
            if TMA:
                w_lo = wl_ptr.load([col0, k0]).T
            else:
                w_lo = tl.load(wl_ptr + w_off, mask=w_mask, other=0.0)
        if H_PARTS == 2:
            if TMA:
                h_lo = hl_ptr.load([row0, k0])
            else:
                h_lo = tl.load(hl_ptr + h_off, mask=h_mask, other=0.0)
        if HI_STEPS == 1:
            part = dot_fp16(h, w, tl.zeros(acc.shape, tl.float32), INTERPRET)
        elif HI_STEPS > 1:
            hi = dot_fp16(h, w, hi, INTERPRET)
        if HI_STEPS > 0:
            if W_PARTS == 2:
                lo = dot_fp16(h, w_lo, lo, INTERPRET)
            if H_PARTS == 2:
                lo = dot_fp16(h_lo, w, lo, INTERPRET)
            if HI_STEPS == 1:
                acc = add_unfolded(acc, part)
            elif (k0 // BLOCK_H) % HI_STEPS == HI_STEPS - 1:
                acc = add_unfolded(acc, hi)
                hi = tl.zeros(acc.shape, tl.float32)
        else:
            part = tl.zeros(acc.shape, tl.float32)
            if W_PARTS == 2:
                part = dot_fp16(h, w_lo, part, INTERPRET)
            if H_PARTS == 2:
                part = dot_fp16(h_lo, w, part, INTERPRET)
            acc = add_unfolded(acc, dot_fp16(h, w, part, INTERPRET))  # part is 0 with one part each
    if HI_STEPS > 1:
        acc = add_unfolded(acc, hi)  # the last segment, shorter when HI_STEPS does not divide the steps
    if HI_STEPS > 0 and H_PARTS + W_PARTS > 2:
        acc += lo
    return acc


def vocab_axis(mode_id: int) -> int:
    """Tile orientation per mode (see logits_tile): weight-as-left-operand only for bf16x3."""
    return 0 if mode_id == MODE_BF16X3 else 1
