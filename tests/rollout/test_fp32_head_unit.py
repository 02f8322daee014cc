"""The split-bf16 form of the FP32 head weight (no engine needed)."""

import torch

from rollout.fp32_head import split3


def test_split3_sums_to_fp32_weight():
    torch.manual_seed(0)
    w = torch.randn(300, 64) * 0.05
    w3 = split3(w)
    assert w3.dtype == torch.bfloat16 and w3.shape == (300, 192)
    hi, mid, lo = w3.float().split(64, dim=1)
    assert ((hi + mid + lo) - w).abs().max() <= w.abs().max() * 2**-23


def test_split3_logits_match_fp32_matmul():
    # bf16 hidden states (what a bf16 body emits) against the split weight, accumulated
    # in fp32: what the GPU GEMM with out_dtype=float32 computes.
    torch.manual_seed(1)
    w = torch.randn(1000, 64) * 0.05
    h = torch.randn(8, 64).bfloat16()
    exact = h.float() @ w.t()
    split = torch.cat([h, h, h], 1).float() @ split3(w).float().t()
    bf16_head = (h.float() @ w.bfloat16().float().t())
    assert (split - exact).abs().max() < 1e-5  # fp32 accumulation-order rounding
    assert (bf16_head - exact).abs().max() > 100 * (split - exact).abs().max()
