"""Attention over packed sequences on one GPU: torch's flash attention 2 (what
`trainer.attn_implementation=varlen` runs for rows of mixed lengths) against cuDNN's ragged
attention (the `cum_seq` form of `aten._cudnn_attention_forward`, Hopper wgmma kernels),
cuDNN's dense causal kernel called once per sequence (`cudnn_per_seq`, `_rep`: kv heads
repeated) and once per row of one length (`cudnn_batched` through sdpa, `trainer_dense`: the
trainer's direct call), forward and backward, at the trainer's shapes (issue 13: attention is the largest cost after the GEMMs
at 4k sequences, and the largest at 16k).

Per shape and method: the median ms of forward and of forward+backward (CUDA events), and
the largest error of the output and of dq, dk, dv against causal attention per sequence in
fp32, relative to the largest magnitude of each (bf16 inputs: ~1e-2 is rounding; a wrong
mask or offset gives O(1)). A method that fails says why in its row. Prints a table, writes
JSON with `device`.

    python3 bench/attention_varlen.py --out $OUT/attention_varlen.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels_lm_head import cuda_time  # noqa: E402

# (name, tokens per micro-batch, sequence lengths (None: ragged), q heads, kv heads, head dim)
SHAPES = [
    ("0.5b-4k", 32768, 4096, 14, 2, 64),
    ("0.5b-16k", 32768, 16384, 14, 2, 64),
    ("0.5b-ragged", 32768, None, 14, 2, 64),
    ("3b-4k", 16384, 4096, 16, 2, 128),
    ("3b-16k", 16384, 16384, 16, 2, 128),
    ("3b-ragged", 16384, None, 16, 2, 128),
]


def lengths(total: int, seq: int | None, gen: torch.Generator) -> list[int]:
    if seq is not None:
        return [seq] * (total // seq)
    out = []
    while sum(out) < total:  # RL-like: a 512-token prompt and a response of 64..3584 tokens
        out.append(512 + int(torch.randint(64, 3584, (1,), generator=gen)))
    out[-1] -= sum(out) - total
    return out


def fa2(q, k, v, cu, max_len, scale):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
                                                   scale=scale)[0]


def cudnn_ragged(q, k, v, cu, max_len, scale):
    """[T, H, D] views, as the trainer passes them; kv heads repeated when cuDNN refuses GQA."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True,
                                                   False, scale=scale)[0]


def cudnn_ragged_gqa(q, k, v, cu, max_len, scale):
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True,
                                                   False, scale=scale)[0]


def cudnn_per_sequence(q, k, v, cu, max_len, scale, repeat_kv=False):
    """Dense causal sdpa forced onto cuDNN, one call per sequence ([1, H, n, D] views of the
    packed rows): the Hopper kernels without the ragged path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if repeat_kv and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
    bounds = cu.tolist()
    outs = []
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for s, e in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                               enable_gqa=ks.shape[1] != qs.shape[1])
            outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def cudnn_per_sequence_rep(q, k, v, cu, max_len, scale):
    return cudnn_per_sequence(q, k, v, cu, max_len, scale, repeat_kv=True)


def cudnn_batched(q, k, v, cu, max_len, scale):
    """Sequences of one length as a dense [B, H, n, D] batch: one cuDNN call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    T = q.shape[0]
    if T % max_len:
        raise ValueError("cudnn_batched needs sequences of one length")
    b = T // max_len
    qs, ks, vs = (x.unflatten(0, (b, max_len)).transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                           enable_gqa=ks.shape[1] != qs.shape[1])
    return o.transpose(1, 2).flatten(0, 1)


def trainer_dense(q, k, v, cu, max_len, scale):
    """What `trainer.attn_implementation=varlen` runs for a row of one length: cuDNN's op called
    directly (trainer.attention._dense_causal)."""
    from trainer.attention import _dense_causal
    if q.shape[0] % max_len:
        raise ValueError("the dense batch needs sequences of one length")
    return _dense_causal(q, k, v, q.shape[0] // max_len, max_len, scale)


def reference(q, k, v, bounds, scale):
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None].float() for x in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                   enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(outs)


def run_shape(name, total, seq, hq, hk, d, methods, check_rows: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    lens = lengths(total, seq, gen)
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    dev = "cuda"
    cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
    max_len = max(lens)
    scale = d ** -0.5
    torch.manual_seed(0)
    # [H, T, D] leaves seen as [T, H, D]: the strides the model's attention passes
    leaves = [torch.randn(h, total, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for h in (hq, hk, hk)]
    go = torch.randn(total, hq, d, device=dev, dtype=torch.bfloat16)
    # reference on the first sequences only (its fp32 math is slow at 16k)
    n_ref = 1
    while n_ref < len(lens) and bounds[n_ref] < check_rows:
        n_ref += 1
    rows = bounds[n_ref]
    ref_in = [x.detach().transpose(0, 1)[:rows].float().requires_grad_() for x in leaves]
    ref = reference(*ref_in, bounds[:n_ref + 1], scale)
    (ref * go[:rows].float()).sum().backward()
    out = []
    for mname, fn in methods.items():
        r = {"shape": name, "method": mname, "tokens": total, "seqs": len(lens), "max_len": max_len,
             "hq": hq, "hk": hk, "d": d}
        try:
            for x in leaves:
                x.grad = None
            q, k, v = (x.transpose(0, 1) for x in leaves)
            o = fn(q, k, v, cu, max_len, scale)
            (o * go).sum().backward()
            errs = {"out": (o[:rows].float() - ref).abs().max() / ref.abs().max()}
            for gname, x, xr in zip(("dq", "dk", "dv"), leaves, ref_in):
                g = x.grad.transpose(0, 1)[:rows].float()
                errs[gname] = (g - xr.grad).abs().max() / xr.grad.abs().max()
            r["max_err_rel"] = {kk: float(vv) for kk, vv in errs.items()}
            r["ok"] = all(e < 5e-2 for e in r["max_err_rel"].values())

            def fwd():
                with torch.no_grad():
                    fn(q, k, v, cu, max_len, scale)

            def fwd_bwd():
                o = fn(q, k, v, cu, max_len, scale)
                torch.autograd.backward(o, go)

            r["fwd_ms"] = cuda_time(fwd, max_reps=10)
            r["fwd_bwd_ms"] = cuda_time(fwd_bwd, max_reps=10)
            # causal FLOPs: 4 * sum(n^2 / 2) * hq * d forward, 2.5x that backward
            f = 2.0 * sum(n * n for n in lens) * hq * d
            r["fwd_bwd_tflops"] = 3.5 * f / (r["fwd_bwd_ms"] * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001 - a method the build lacks is a row, not a crash
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out.append(r)
        print(row_text(r), flush=True)
    return out


def row_text(r: dict) -> str:
    if "error" in r:
        return f"{r['shape']:12s} {r['method']:18s} error: {r['error'][:140]}"
    e = r["max_err_rel"]
    return (f"{r['shape']:12s} {r['method']:18s} fwd {r['fwd_ms']:7.2f} ms  fwd+bwd {r['fwd_bwd_ms']:7.2f} ms  "
            f"{r['fwd_bwd_tflops']:6.1f} TFLOP/s  err out {e['out']:.1e} dq {e['dq']:.1e} dk {e['dk']:.1e} "
            f"dv {e['dv']:.1e} {'ok' if r['ok'] else 'WRONG'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    ap.add_argument("--methods", nargs="+", default=["fa2_varlen", "cudnn_ragged_gqa", "cudnn_ragged_rep"],
                    help="cuDNN's ragged path hit an illegal address at 16k on torch 2.11 (H200), which ends "
                         "the process: leave it out to time the other shapes")
    ap.add_argument("--check-rows", type=int, default=8192, help="rows compared with the fp32 reference")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_varlen: needs a CUDA GPU")
    every = {"fa2_varlen": fa2, "cudnn_ragged_gqa": cudnn_ragged_gqa, "cudnn_ragged_rep": cudnn_ragged,
             "cudnn_per_seq": cudnn_per_sequence, "cudnn_per_seq_rep": cudnn_per_sequence_rep,
             "cudnn_batched": cudnn_batched, "trainer_dense": trainer_dense}
    methods = {m: every[m] for m in args.methods}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "argv": sys.argv,
              "date": time.strftime("%Y-%m-%d"), "results": []}
    for s in SHAPES:
        if s[0] in args.shapes:
            report["results"] += run_shape(*s, methods, args.check_rows)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
