"""Forward Triton kernel: per-row log-sum-exp, target logit and entropy of logits/temperature.

Grid: (token block) x (vocabulary split). Each program walks its share of the vocabulary
in BLOCK_V columns, computes each [BLOCK_T, BLOCK_V] logits tile in registers (reduced over H
with `logits_tile`) and folds it into an online log-sum-exp. No [T, V] tensor exists at any
time; each program writes only three fp32 numbers per row (a partial max, partial sum of
exponentials, partial entropy term), combined in `combine_partials`. The target's logit is
one dot product per row (`target_logits`), computed apart: picking it out of every tile
would cost a compare, a select and a sum per logit in the epilogue, which is what limits
this kernel once the products run at tensor-core speed.

Why split the vocabulary: with T=4k and BLOCK_T=128 there are only 32 token blocks, far
fewer than the H100's 132 SMs. Splitting V into ~16 parts gives enough programs at every T.
Programs are launched in groups of GROUP_T token blocks x all splits, so the programs that
run at the same time share hidden rows and weight tiles through L2 instead of re-reading
them from HBM (the weight is 1.2-2.5 GB and does not fit in L2).
"""
import torch
import triton
import triton.language as tl

from .lm_head_reference import target_logits
from .lm_head_triton_common import MODE_BF16, MODE_FP16X2, MODES, grouped_tile, logits_tile, vocab_axis

# A split boundary is a multiple of this, so any BLOCK_V dividing it never straddles splits.
VSPLIT_ALIGN = 256
NEG_BIG = tl.constexpr(-1.0e30)  # finite "-inf": (m_old - m_new) * s == 0, not NaN, at the start
LN2 = 0.6931471805599453
# The same constants for kernels (module globals read inside a kernel must be constexpr).
LN2_IN_KERNELS = tl.constexpr(LN2)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _lm_head_fwd_kernel(
    h_ptr, hl_ptr, w_ptr, wl_ptr, part_ptr, scale_ptr,
    T, V, H, stride_ht, stride_hh, stride_wv, stride_wh,
    inv_temp, v_per_split, n_split, stride_plane,
    MODE: tl.constexpr, VAX: tl.constexpr, H_PARTS: tl.constexpr, W_PARTS: tl.constexpr, WITH_ENT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_T: tl.constexpr, TMA: tl.constexpr, HI_STEPS: tl.constexpr, FLATTEN: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Partial log-sum-exp statistics over the V vocabulary rows held by w_ptr (a chunk of the
    vocabulary in mode fp16x2, all of it otherwise), in base-2 units:
    y = logits * inv_temp * scale_ptr[0] * log2(e) (scale_ptr: the powers of two the fp16x2
    operands were scaled by; 1 in the other modes)."""
    tb, sp = grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), n_split, GROUP_T)

    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    # log2(e) folded in: exp2 then needs no multiply per element.
    c = inv_temp * tl.load(scale_ptr) * LOG2E
    v_start = sp * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)

    # Logits tiles have the vocabulary on axis VAX (see logits_tile): per-token statistics
    # reduce that axis; per-token vectors broadcast with expand_dims(v, VAX).
    m = tl.full((BLOCK_T,), NEG_BIG, tl.float32)   # running max of y
    s = tl.zeros((BLOCK_T,), tl.float32)           # sum 2^(y - m)
    s1 = tl.zeros((BLOCK_T,), tl.float32)          # sum 2^(y - m) * (y - m)
    for v0 in tl.range(v_start, v_end, BLOCK_V, flatten=FLATTEN):
        cols = v0 + tl.arange(0, BLOCK_V)
        acc = logits_tile(h_ptr, hl_ptr, w_ptr, wl_ptr, rows, cols, tb * BLOCK_T, v0, T, V, H,
                          stride_ht, stride_hh, stride_wv, stride_wh, MODE, VAX, H_PARTS, W_PARTS,
                          BLOCK_T, BLOCK_V, BLOCK_H, TMA, HI_STEPS, INTERPRET)
        y = acc * c
        if v0 + BLOCK_V > v_end:
            # Only the split's last tile is ragged. NEG_BIG, not -inf: 2^(y - m) is then 0
            # and (y - m) * 0 is 0, not NaN, in the entropy sum (every tile has a valid column).
            y = tl.where(tl.expand_dims(cols, 1 - VAX) < v_end, y, NEG_BIG)
        m_new = tl.maximum(m, tl.max(y, axis=VAX))
        m_new_b = tl.expand_dims(m_new, VAX)
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(y - m_new_b)
        if WITH_ENT:
            # Keep the entropy sum relative to the running max (values stay O(entropy)).
            s1 = alpha * (s1 + (m - m_new) * s) + tl.sum(e * (y - m_new_b), axis=VAX)
        s = alpha * s + tl.sum(e, axis=VAX)
        m = m_new

    out = part_ptr + sp * T + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + stride_plane, s, mask=row_ok)
    tl.store(out + 2 * stride_plane, s1, mask=row_ok)


# (BLOCK_T, BLOCK_V, BLOCK_H, num_warps, num_stages). Three tile families by what is loaded:
# - BF16_TILES: 16-bit operands (mode bf16 on bf16 inputs), 64-deep K steps;
# - FP32_TILES: fp32 loads (modes fp32, bf16x3, tf32x3, bf16 on fp32 inputs) need twice the
#   shared memory per K element, so 32-deep steps;
# - FP16X2_TILES: one fp16 hidden tile and two fp16 weight tiles (hi, lo) per K step; the
#   prune keeps those whose pipeline fits in shared memory (`fp16x2_smem`).
BF16_TILES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4)]
FP32_TILES = [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3)]
# One-warpgroup tiles ((128, 64, 64, 4, 2..4), (64, 128, 64, 4, 3)), which let two programs
# share an SM, were never chosen by the autotuner on an H200 (gpu_session9_h200.md, call 4).
# Forced, with two programs per SM in the persistent dlogits walk (so that one's epilogue
# runs beside the other's products), forward+backward was 8% slower with them in dlogits
# and 13% in both kernels (gpu_session12_h200.md).
FP16X2_TILES = [(128, 128, 64, 8, 2), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                (256, 128, 64, 8, 2), (256, 128, 64, 8, 3), (128, 256, 64, 8, 2)]
ALL_TILES = list(dict.fromkeys(BF16_TILES + FP32_TILES + FP16X2_TILES))
SMEM_BLOCK_MAX = 227 * 1024  # what one block may hold on an H100/H200
SMEM_BUDGET = 200 * 1024  # for a pipeline; the rest for layout conversions
# (dlogits' stores by the tensor-memory accelerator, TMA_STORE, stage its two fp16 output
# tiles in shared memory instead, and need no conversion: budget SMEM_BLOCK_MAX)


def fp16x2_smem(stages, block_k, rows_a, rows_b):
    """Bytes of shared memory for a pipeline of fp16 tiles: rows_a + rows_b rows per K step."""
    return stages * block_k * 2 * (rows_a + rows_b)


def make_configs(names, tiles=ALL_TILES, pre_hook=None):
    return [triton.Config({names[0]: a, names[1]: b, names[2]: c, names[3]: 8},
                          num_warps=nw, num_stages=ns, pre_hook=pre_hook) for a, b, c, nw, ns in tiles]


USE_TMA = True  # benchmarks switch it off to compare with pointer loads
# fp16x2 (fp16x2_tile's HI_STEPS): the lo products summed straight in the tensor cores, and
# hi x hi straight for this many 64-deep K steps per rounded add; 0 sums every product in
# blocks (benchmarks set it to compare). 16 on an H200: forward+backward 2.6 ms (1.1%) faster
# than 8 at T=16k, H=4096 in four calls (gpu_session11_h200.md call 12,
# gpu_session12_h200.md), 0.9 ms at H=896; max |d log p| 6.4e-6 against 4.5e-6 (naive fp32:
# 9.9e-6, the target 1e-5); 8 was 1.6-2.7% faster than 1 (2.0e-6, gpu_session9_h200.md).
HI_SUM_STEPS = 16
# Mode fp16x2: Triton's loop flattening for the loops that walk tiles (the forward's
# vocabulary loop, persistent dlogits' tile loop): the pipeliner then sees one loop and issues
# the next tile's first loads during this tile's epilogue. On an H200 the forward alone
# 1.5-2.4 ms faster at T=16k, H=4096 (bench/results/gpu_session10_h200.md).
FLATTEN_TILE_LOOPS = True
TMA_IN_INTERPRETER = False  # tests set it to run the descriptor path in Triton's CPU interpreter


def tma_operands(mode_id, interpret, h, hl, w, wl):
    """(h, hl, w, wl, use_tma): the fp16x2 operands as tensor descriptors where Hopper's
    tensor-memory accelerator can read them (CUDA capability >= 9, 16-byte aligned base and
    rows, unit column stride), else unchanged. Their block shapes are set per tile by
    `set_block_shapes` (each operand gets its own descriptor: block shapes differ)."""
    ops = (h, hl, w, wl)
    if interpret:
        device_ok = TMA_IN_INTERPRETER
    else:
        device_ok = h.is_cuda and torch.cuda.get_device_capability(h.device)[0] >= 9
    if not (USE_TMA and mode_id == MODE_FP16X2 and device_ok and all(tma_ok(t) for t in ops)):
        return (*ops, False)
    return (*(descriptor(t) for t in ops), True)


def tma_ok(t):
    """Whether the tensor-memory accelerator can address the 2-D tensor t: unit column
    stride, 16-byte aligned base and row stride."""
    return (t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


def descriptor(t):
    """A tensor descriptor of t; its block shape is set per tile config (set_block_shapes)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1])


def set_block_shapes(nargs):
    """Autotune pre-hook: a tile config's block shapes onto the operands' descriptors (and
    onto dlogits' outputs when they are descriptors too: [BLOCK_T, BLOCK_V])."""
    shapes = (("h_ptr", "BLOCK_T", "BLOCK_H"), ("hl_ptr", "BLOCK_T", "BLOCK_H"),
              ("w_ptr", "BLOCK_V", "BLOCK_H"), ("wl_ptr", "BLOCK_V", "BLOCK_H"),
              ("dl_ptr", "BLOCK_T", "BLOCK_V"), ("dll_ptr", "BLOCK_T", "BLOCK_V"))
    for name, rows, cols in shapes:
        if hasattr(nargs.get(name), "block_shape"):  # pointers: nothing to set
            nargs[name].block_shape = [nargs[rows], nargs[cols]]


def make_prune(operand_name, names):
    """Keep the tile family that matches what the kernel will load (see the lists above)."""
    def prune(configs, named_args, **kwargs):
        mode = kwargs.get("MODE", named_args.get("MODE"))
        if mode == MODE_FP16X2:
            # the fp16x2 family, where its pipeline fits in shared memory
            tma_store = kwargs.get("TMA_STORE", False)
            budget = SMEM_BLOCK_MAX if tma_store else SMEM_BUDGET
            keep = [c for c in configs if tile_of(c, names) in FP16X2_TILES and fp16x2_smem(
                c.num_stages, 64, kwargs["H_PARTS"] * c.kwargs[names[0]],
                kwargs["W_PARTS"] * c.kwargs[names[1]])
                + tma_store * 4 * c.kwargs[names[0]] * c.kwargs[names[1]] <= budget]
            return keep or configs[:1]
        elif mode == MODE_BF16 and named_args[operand_name].element_size() == 2:
            family = BF16_TILES
        else:
            family = FP32_TILES
        keep = [c for c in configs if tile_of(c, names) in family]
        return keep or configs[:1]
    return prune


def tile_of(config, names):
    """(BLOCK_a, BLOCK_b, BLOCK_K, num_warps, num_stages) of an autotune config, as in the lists."""
    return (*(config.kwargs[n] for n in names[:3]), config.num_warps, config.num_stages)


_FWD_NAMES = ["BLOCK_T", "BLOCK_V", "BLOCK_H", "GROUP_T"]
_lm_head_fwd_tuned = triton.autotune(
    configs=make_configs(_FWD_NAMES, pre_hook=set_block_shapes),
    key=["H", "MODE", "H_PARTS", "W_PARTS", "WITH_ENT", "TMA", "HI_STEPS", "FLATTEN"],
    prune_configs_by={"early_config_prune": make_prune("h_ptr", _FWD_NAMES)},
)(_lm_head_fwd_kernel)


def launch_forward(h, hl, w, wl, part, scale, inv_temp, v_per_split, n_split,
                   mode_id, h_parts, with_entropy, interpret, w_parts=1):
    """One forward launch over the vocabulary rows held by w (see _lm_head_fwd_kernel);
    part is a [3, >= n_split, T] view whose first n_split columns this launch fills."""
    T, H = h.shape
    strides = (h.stride(0), h.stride(1), w.stride(0), w.stride(1))
    V = w.shape[0]
    h, hl, w, wl, tma = tma_operands(mode_id, interpret, h, hl, w, wl)
    args = (h, hl, w, wl, part, scale, T, V, H, *strides, inv_temp, v_per_split, n_split,
            part.stride(0))
    meta = dict(MODE=mode_id, VAX=vocab_axis(mode_id), H_PARTS=h_parts, W_PARTS=w_parts,
                WITH_ENT=with_entropy, TMA=tma, HI_STEPS=HI_SUM_STEPS,
                FLATTEN=FLATTEN_TILE_LOOPS and mode_id == MODE_FP16X2)
    if interpret:
        # Small blocks so that CPU tests cross several blocks in every dimension.
        grid = (triton.cdiv(T, 16) * n_split,)
        blocks = dict(BLOCK_T=16, BLOCK_V=64, BLOCK_H=32)
        set_block_shapes(dict(h_ptr=h, hl_ptr=hl, w_ptr=w, wl_ptr=wl, **blocks))
        _lm_head_fwd_kernel[grid](*args, **meta, **blocks, GROUP_T=2, INTERPRET=True)
    else:
        grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]) * n_split,)  # noqa: E731
        _lm_head_fwd_tuned[grid](*args, **meta, INTERPRET=False)


def lm_head_forward_stats(hidden, weight, targets, inv_temp, mode, with_entropy,
                          n_split=16, interpret=False):
    """Run the forward kernel; returns (logprobs, lse, entropy-or-None), all fp32 [T]."""
    T, H = hidden.shape
    V = weight.shape[0]
    v_per_split = triton.cdiv(triton.cdiv(V, n_split), VSPLIT_ALIGN) * VSPLIT_ALIGN
    n_split = triton.cdiv(V, v_per_split)
    part = torch.full((3, n_split, T), float("nan"), device=hidden.device, dtype=torch.float32)
    one = torch.ones(1, device=hidden.device, dtype=torch.float32)
    launch_forward(hidden, hidden, weight, weight, part, one, inv_temp, v_per_split, n_split,
                   MODES[mode], 1, with_entropy, interpret)
    zt = target_logits(hidden, weight, targets, mode) * inv_temp
    return combine_partials(part, zt, with_entropy)


def combine_partials(part, z_target, with_entropy):
    """Merge per-split base-2 (max, sum, entropy term) into per-row results.

    With y = z log2(e), M the global max of y and S = sum_j 2^(y_j - M):
    lse = (M + log2 S) ln 2, log p(target) = z_target - lse,
    entropy = ln 2 (log2 S - (1/S) sum_j 2^(y_j - M) (y_j - M)).
    """
    m, s, s1 = part[0], part[1], part[2]
    M = m.max(dim=0).values
    scale = torch.exp2(m - M)
    S = (s * scale).sum(dim=0)
    log2_s = torch.log2(S)
    lse = (M + log2_s) * LN2
    logp = z_target - lse
    ent = None
    if with_entropy:
        S1 = (scale * (s1 + (m - M) * s)).sum(dim=0)
        ent = (log2_s - S1 / S) * LN2
    return logp, lse, ent
