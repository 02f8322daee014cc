"""The trainer's dense attention rows (trainer.attention._dense_causal: cuDNN's causal kernel on
Hopper) against fp32 causal attention per sequence, at shapes bench/attention_varlen.py does not
time: lengths that are not multiples of 64, GQA at head dims 64 and 128, and one 64k sequence
(forward, on its last rows). Skipped without CUDA, and where the trainer does not take this path
(not Hopper)."""

from __future__ import annotations

import pytest
import torch

from gpu_helpers import CUDA, record
from trainer.attention import _dense_causal, _sdpa_per_sequence, dense_kernel_ok

pytestmark = pytest.mark.skipif(not CUDA, reason="needs CUDA")
SEED = 0


def _leaves(T, hq, hk, d, requires_grad=True):
    """[H, T, D] bf16 leaves, seen by the kernel as [T, H, D] views (the model's strides)."""
    torch.manual_seed(SEED)
    print(f"seed {SEED}")
    return [torch.randn(h, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
            for h in (hq, hk, hk)]


@pytest.mark.parametrize("n,length,hq,hk,d", [(3, 1000, 14, 2, 64), (2, 777, 16, 2, 128), (1, 4097, 12, 2, 128)])
def test_dense_rows_match_fp32_per_sequence(n, length, hq, hk, d):
    T, scale = n * length, d ** -0.5
    leaves = _leaves(T, hq, hk, d)
    if not dense_kernel_ok(leaves[0]):
        pytest.skip("not a GPU the dense path runs on (Hopper with cuDNN)")
    go = torch.randn(T, hq, d, device="cuda")
    out = _dense_causal(*(x.transpose(0, 1) for x in leaves), n, length, scale)
    (out.float() * go).sum().backward()
    ref_in = [x.detach().transpose(0, 1).float().requires_grad_() for x in leaves]
    ref = _sdpa_per_sequence(*ref_in, list(range(0, T + 1, length)), scale)
    (ref * go).sum().backward()
    errs = {"out": (out.float() - ref).abs().max() / ref.abs().max()}
    for name, x, r in zip(("dq", "dk", "dv"), leaves, ref_in):
        errs[name] = (x.grad.transpose(0, 1).float() - r.grad).abs().max() / r.grad.abs().max()
    errs = {k: float(v.detach()) for k, v in errs.items()}
    record(f"dense_attention_{n}x{length}_h{hq}/{hk}_d{d}", **errs)
    # bf16 inputs: ~5e-3 of the largest magnitude; a wrong mask, offset or head mapping gives O(1)
    assert all(e < 2e-2 for e in errs.values()), errs


def test_dense_row_of_one_64k_sequence_forward():
    T, hq, hk, d, rows = 65536, 16, 2, 128, 256
    scale = d ** -0.5
    q, k, v = (x.transpose(0, 1) for x in _leaves(T, hq, hk, d, requires_grad=False))
    if not dense_kernel_ok(q):
        pytest.skip("not a GPU the dense path runs on (Hopper with cuDNN)")
    with torch.no_grad():
        out = _dense_causal(q, k, v, 1, T, scale)[-rows:].float()
        # the last rows attend to every key before them: fp32 scores per kv group
        rep = hq // hk
        ql = q[-rows:].float().transpose(0, 1)  # [hq, rows, d]
        kf, vf = (x.float().transpose(0, 1).repeat_interleave(rep, 0) for x in (k, v))  # [hq, T, d]
        s = ql @ kf.transpose(1, 2) * scale
        s.masked_fill_(torch.arange(T, device="cuda")[None, :] > torch.arange(T - rows, T, device="cuda")[:, None],
                       float("-inf"))
        ref = (s.softmax(-1) @ vf).transpose(0, 1)
    err = float((out - ref).abs().max() / ref.abs().max())
    record("dense_attention_1x65536_last_rows", out=err)
    assert err < 2e-2, err
