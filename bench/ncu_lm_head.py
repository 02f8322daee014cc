"""One forward+backward of the fused LM head under Nsight Compute: autotunes and warms up
outside the profiled range, then runs once between cudaProfilerStart/Stop, so that
`ncu --profile-from-start off` sees only the kernels of a tuned run (its stall reasons and
pipe use are what bench/kernels_lm_head.py's times cannot show). Example (one H200):

    ncu --profile-from-start off -k regex:'_dlogits_kernel|_lm_head_fwd_kernel' -c 11 \
        --set full -o head python3 bench/ncu_lm_head.py --T 16384 --H 4096
    ncu -i head.ncu-rep --page details
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.kernels_lm_head import KNOB_DEFAULTS, fused, knob_defaults, parse_variant  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--knobs", default="", help="kernel switches, as --variant's 'mod.KNOB=V,...'")
    args = ap.parse_args()
    KNOB_DEFAULTS.update(knob_defaults())
    knobs = parse_variant(f"x:{args.knobs}")[1] if args.knobs else {}
    torch.manual_seed(args.H)  # the inputs of bench/kernels_lm_head.py at this shape
    w = torch.randn(args.V, args.H, device="cuda") * (2 / math.sqrt(args.H))
    h = torch.randn(args.T, args.H, device="cuda").to(torch.bfloat16)
    t = torch.randint(0, args.V, (args.T,), device="cuda")
    g = torch.randn(args.T, device="cuda")
    method = fused("fp16x2", knobs=knobs)
    hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()
    for _ in range(2):  # autotune, then a warm run
        (method(hg, wg, t) * g).sum().backward()
        hg.grad = wg.grad = None
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    (method(hg, wg, t) * g).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled one forward+backward", dict(T=args.T, H=args.H, V=args.V, **knobs))


if __name__ == "__main__":
    main()
