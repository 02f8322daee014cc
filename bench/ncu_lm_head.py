"""One forward+backward of the fused LM head under Nsight Compute: autotunes and warms up
outside the profiled range, then runs once between cudaProfilerStart/Stop, so that
`ncu --profile-from-start off` sees only the kernels of a tuned run (its stall reasons and
pipe use are what bench/kernels_lm_head.py's times cannot show). Example (one H200):

    ncu --profile-from-start off -k regex:'_dlogits_kernel|_lm_head_fwd_kernel' -c 11 \
        --set full -o head python3 bench/ncu_lm_head.py --T 16384 --H 4096
    ncu -i head.ncu-rep --page details
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.gpu_breakdown import warmed_up  # noqa: E402
from bench.kernels_lm_head import (KNOB_DEFAULTS, bench_inputs, fused, knob_defaults,  # noqa: E402
                                   parse_variant)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--knobs", default="", help="kernel switches, as --variant's 'mod.KNOB=V,...'")
    args = ap.parse_args()
    KNOB_DEFAULTS.update(knob_defaults())
    knobs = parse_variant(f"x:{args.knobs}")[1] if args.knobs else {}
    w, h, t, g = bench_inputs(args.T, args.H, args.V)  # bench/kernels_lm_head.py's at this shape
    method = fused("fp16x2", knobs=knobs)
    hg, wg = warmed_up(method, h, w, t, g)  # autotuned outside the profiled range
    torch.cuda.profiler.start()
    (method(hg, wg, t) * g).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled one forward+backward", dict(T=args.T, H=args.H, V=args.V, **knobs))


if __name__ == "__main__":
    main()
