"""Shared Triton helpers for the fused LM-head kernels: precision modes and matrix products.

Precision modes (the `MODE` constexpr of every kernel):

* ``MODE_FP32``   fp32 operands, fp32 products and sums. ``tl.dot(..., input_precision="ieee")``
  so Triton does not silently use TF32 (its default for fp32 dots on tensor cores);
  this runs on the FMA units, not the tensor cores, so it is the slow, exact mode.
* ``MODE_BF16``   operands rounded to bf16, products on bf16 tensor cores, fp32 accumulation.
* ``MODE_BF16X3`` each fp32 operand x is split as x = hi + lo with hi = bf16(x) and
  lo = bf16(x - hi); a·b is computed as hi_a·hi_b + hi_a·lo_b + lo_a·hi_b on bf16 tensor
  cores with fp32 accumulation. The dropped lo·lo term and the split residual are ~2^-16..2^-17
  relative per product, i.e. close to fp32 accuracy, at 3 tensor-core products instead of
  one FMA-unit product (tensor cores are ~15x faster than the FMA units on an H100).
  hi + lo keeps 16 significant bits, so products are ~2^-16 accurate, not fp32's 2^-24.
* ``MODE_TF32X3`` the same three-product trick with tf32 parts (11 significant bits each,
  22 together): fp32-level accuracy. Tensor-core tf32 runs at half the bf16 rate, so it costs
  about twice bf16x3. On the GPU this is Triton's own ``input_precision="tf32x3"``.

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
MODES = {"fp32": MODE_FP32, "bf16": MODE_BF16, "bf16x3": MODE_BF16X3, "tf32x3": MODE_TF32X3}


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
def dot_bf16(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:
        # a, b hold bf16 values in fp32: an exact fp32 product emulates the tensor core.
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def mma(a, b, acc, MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += a @ b in the given precision mode; a, b are raw loaded tiles (any float dtype)."""
    if MODE == 0:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif MODE == 1:
        acc = dot_bf16(as_bf16(a, INTERPRET), as_bf16(b, INTERPRET), acc, INTERPRET)
    elif MODE == 2:
        a_hi, a_lo = split_bf16(a, INTERPRET)
        b_hi, b_lo = split_bf16(b, INTERPRET)
        # Small terms first so they are not absorbed by the large one before being summed.
        acc = dot_bf16(a_lo, b_hi, acc, INTERPRET)
        acc = dot_bf16(a_hi, b_lo, acc, INTERPRET)
        acc = dot_bf16(a_hi, b_hi, acc, INTERPRET)
    else:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if INTERPRET:
            # The interpreter ignores input_precision: emulate tf32x3 exactly in fp32.
            a_hi = round_to_tf32_in_fp32(a)
            a_lo = round_to_tf32_in_fp32(a - a_hi)
            b_hi = round_to_tf32_in_fp32(b)
            b_lo = round_to_tf32_in_fp32(b - b_hi)
            acc = tl.dot(a_lo, b_hi, acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_lo, acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
    return acc


@triton.jit
def logits_tile(h_ptr, w_ptr, rows, cols, T, V, H, stride_ht, stride_hh, stride_wv, stride_wh,
                MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 [BLOCK_T, BLOCK_V] tile of hidden[rows] @ weight[cols]^T, reduced over all of H.

    Out-of-range rows/cols load zeros, so their logits are 0 and must be masked by the caller.
    """
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_H)
    row_ok = rows < T
    col_ok = cols < V
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        k_ok = k < H
        h = tl.load(h_ptr + rows[:, None] * stride_ht + k[None, :] * stride_hh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # W is [V, H] row-major; loading it as [BLOCK_H, BLOCK_V] gives W^T without a copy.
        w = tl.load(w_ptr + cols[None, :] * stride_wv + k[:, None] * stride_wh,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = mma(h, w, acc, MODE, INTERPRET)
    return acc
