"""Forward Triton kernel: per-row log-sum-exp, target logit and entropy of logits/temperature.

Grid: (token block) x (vocabulary split). Each program walks its share of the vocabulary
in BLOCK_V columns, computes each [BLOCK_T, BLOCK_V] logits tile in registers (reduced over H
with `logits_tile`) and folds it into an online log-sum-exp. No [T, V] tensor exists at any
time; each program writes only four fp32 numbers per row (a partial max, partial sum of
exponentials, partial entropy term, partial target logit), combined in `combine_partials`.

Why split the vocabulary: with T=4k and BLOCK_T=128 there are only 32 token blocks, far
fewer than the H100's 132 SMs. Splitting V into ~16 parts gives enough programs at every T.
Programs are launched in groups of GROUP_T token blocks x all splits, so the programs that
run at the same time share hidden rows and weight tiles through L2 instead of re-reading
them from HBM (the weight is 1.2-2.5 GB and does not fit in L2).
"""
import torch
import triton
import triton.language as tl

from .lm_head_triton_common import logits_tile, vocab_axis

# A split boundary is a multiple of this, so any BLOCK_V dividing it never straddles splits.
VSPLIT_ALIGN = 256
NEG_BIG = -1.0e30  # finite "-inf": keeps (m_old - m_new) * s == 0 instead of NaN at the start


@triton.jit
def _lm_head_fwd_kernel(
    h_ptr, w_ptr, tgt_ptr, part_ptr,
    T, V, H, stride_ht, stride_hh, stride_wv, stride_wh,
    inv_temp, v_per_split, n_split,
    MODE: tl.constexpr, VAX: tl.constexpr, WITH_ENT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_T: tl.constexpr, INTERPRET: tl.constexpr,
):
    # Grouped launch order (see module docstring).
    pid = tl.program_id(0)
    n_tb = tl.cdiv(T, BLOCK_T)
    per_group = GROUP_T * n_split
    first_tb = (pid // per_group) * GROUP_T
    group_size = tl.minimum(n_tb - first_tb, GROUP_T)
    tb = first_tb + (pid % per_group) % group_size
    sp = (pid % per_group) // group_size

    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    v_start = sp * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)

    # Logits tiles have the vocabulary on axis VAX (see logits_tile): per-token statistics
    # reduce that axis; per-token vectors broadcast with expand_dims(v, VAX).
    m = tl.full((BLOCK_T,), -1.0e30, tl.float32)  # running max of z (NEG_BIG)
    s = tl.zeros((BLOCK_T,), tl.float32)           # sum exp(z - m)
    s1 = tl.zeros((BLOCK_T,), tl.float32)          # sum exp(z - m) * (z - m)
    zt = tl.zeros((BLOCK_T,), tl.float32)          # z[target] if the target is in this split
    tgt_b = tl.expand_dims(tgt, VAX)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cols_b = tl.expand_dims(cols, 1 - VAX)
        col_ok_b = cols_b < v_end
        acc = logits_tile(h_ptr, w_ptr, rows, cols, T, V, H, stride_ht, stride_hh, stride_wv,
                          stride_wh, MODE, VAX, BLOCK_T, BLOCK_V, BLOCK_H, INTERPRET)
        z = acc * inv_temp
        zt += tl.sum(tl.where(cols_b == tgt_b, z, 0.0), axis=VAX)
        z = tl.where(col_ok_b, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=VAX))
        m_new_b = tl.expand_dims(m_new, VAX)
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new_b)  # 0 on masked columns
        if WITH_ENT:
            # Keep the entropy sum relative to the running max (values stay O(entropy)).
            ez = e * tl.where(col_ok_b, z - m_new_b, 0.0)  # avoid 0 * -inf
            s1 = alpha * (s1 + (m - m_new) * s) + tl.sum(ez, axis=VAX)
        s = alpha * s + tl.sum(e, axis=VAX)
        m = m_new

    out = part_ptr + sp * T + rows
    plane = n_split * T
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, s1, mask=row_ok)
    tl.store(out + 3 * plane, zt, mask=row_ok)


# (BLOCK_T, BLOCK_V, BLOCK_H, num_warps, num_stages). bf16 operands loaded as bf16 take 64-deep
# K steps; operands loaded as fp32 (modes fp32, bf16x3, tf32x3, or bf16 on fp32 inputs) need
# twice the shared memory per K element, so they take 32-deep steps. Two candidates each keeps
# autotuning (which runs once per H and mode) short.
BF16_TILES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]
FP32_TILES = [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3)]


def make_configs(names, tiles):
    return [triton.Config({names[0]: a, names[1]: b, names[2]: c, names[3]: 8},
                          num_warps=nw, num_stages=ns) for a, b, c, nw, ns in tiles]


def make_prune(operand_name, k_name):
    """Keep the tile list that matches the operand dtype: bf16 loads only in mode bf16."""
    def prune(configs, named_args, **kwargs):
        mode = kwargs.get("MODE", named_args.get("MODE"))
        bf16_loads = mode == 1 and named_args[operand_name].element_size() == 2
        keep = [c for c in configs if (c.kwargs[k_name] == 64) == bf16_loads]
        return keep or configs[:1]
    return prune


_FWD_NAMES = ["BLOCK_T", "BLOCK_V", "BLOCK_H", "GROUP_T"]
_lm_head_fwd_tuned = triton.autotune(
    configs=make_configs(_FWD_NAMES, BF16_TILES + FP32_TILES), key=["H", "MODE", "WITH_ENT"],
    prune_configs_by={"early_config_prune": make_prune("h_ptr", "BLOCK_H")},
)(_lm_head_fwd_kernel)


def lm_head_forward_stats(hidden, weight, targets, inv_temp, mode_id, with_entropy,
                          n_split=16, interpret=False):
    """Run the forward kernel; returns (logprobs, lse, entropy-or-None), all fp32 [T]."""
    T, H = hidden.shape
    V = weight.shape[0]
    v_per_split = triton.cdiv(triton.cdiv(V, n_split), VSPLIT_ALIGN) * VSPLIT_ALIGN
    n_split = triton.cdiv(V, v_per_split)
    vax = vocab_axis(mode_id)
    part = torch.full((4, n_split, T), float("nan"), device=hidden.device, dtype=torch.float32)
    args = (hidden, weight, targets, part, T, V, H, hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1), inv_temp, v_per_split, n_split)
    if interpret:
        # Small blocks so that CPU tests cross several blocks in every dimension.
        grid = (triton.cdiv(T, 16) * n_split,)
        _lm_head_fwd_kernel[grid](*args, MODE=mode_id, VAX=vax, WITH_ENT=with_entropy, BLOCK_T=16,
                                  BLOCK_V=64, BLOCK_H=32, GROUP_T=2, INTERPRET=True)
    else:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * n_split,)  # noqa: E731
        _lm_head_fwd_tuned[grid](*args, MODE=mode_id, VAX=vax, WITH_ENT=with_entropy,
                                 INTERPRET=False)
    return combine_partials(part, with_entropy)


def combine_partials(part, with_entropy):
    """Merge per-split (max, sum, entropy term, target logit) into per-row results.

    With M the global max and S = sum_j exp(z_j - M):  lse = M + log S,
    log p(target) = z_target - lse,  entropy = log S - (1/S) sum_j exp(z_j - M) (z_j - M).
    """
    m, s, s1, zt = part[0], part[1], part[2], part[3]
    M = m.max(dim=0).values
    scale = torch.exp(m - M)
    S = (s * scale).sum(dim=0)
    log_s = torch.log(S)
    lse = M + log_s
    logp = zt.sum(dim=0) - lse
    ent = None
    if with_entropy:
        S1 = (scale * (s1 + (m - M) * s)).sum(dim=0)
        ent = log_s - S1 / S
    return logp, lse, ent
