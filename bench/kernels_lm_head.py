"""Benchmark + GPU correctness check of kernels.lm_head_logprobs (issue 4).

For each (H, T) with V = 151,936: forward time, forward+backward time, peak extra memory
(peak allocated during fwd+bwd minus what was allocated before: the inputs), and
max |log p - log p_float64| on a subset of rows, for the fused Triton modes and for
naive torch fp32 / bf16 and Liger-Kernel's fused linear cross entropy (if importable).

Inputs: hidden ~ N(0, 1) rounded to bf16 values (hidden states out of a bf16 model),
weight ~ N(0, (2/sqrt(H))^2) in fp32 (an fp32 LM-head copy) so logits have std ~2,
temperature 1.0, uniform random targets. fp32/tf32x3 and the fp32 baselines get fp32
tensors (hidden upcast); fp16x2 and bf16x3 get the bf16 hidden and fp32 weight (as in
training: the hidden is then exact in one part); bf16 modes get bf16 copies of both. The float64
reference uses the same values, so bf16 errors include the rounding of the weight.

Usage: python bench/kernels_lm_head.py --out results.json [--T 4096 16384 65536] [--H 1536 4096]
"""
import argparse
import collections
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels import lm_head_logprobs  # noqa: E402
from kernels.lm_head_reference import lm_head_logprobs_naive  # noqa: E402
from bench.gpu_breakdown import memory_trace, profile_kernels  # noqa: E402
from bench.lm_head_report import markdown_table, print_table, target_summary  # noqa: E402

V_DEFAULT = 151_936
torch.backends.cuda.matmul.allow_tf32 = False  # naive fp32 must really be fp32
torch.backends.cudnn.allow_tf32 = False


def try_liger():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except Exception as e:  # noqa: BLE001
        print(f"liger-kernel not available: {e!r}")
        return None

    def liger(h, w, t):
        out = LigerFusedLinearCrossEntropyFunction.apply(h, w, t, None, None, -100, 0.0, 0.0, "none")
        loss = out[0] if isinstance(out, tuple) else out
        return -loss.float()
    return liger


def naive(dtype):
    def f(h, w, t):
        z = (h @ w.t()).float()
        return torch.log_softmax(z, dim=-1).gather(1, t[:, None].long())[:, 0]
    return f


def tuned_tiles():
    """{kernel: {autotune key: chosen tile}} of the fused kernels' autotuners, so far."""
    import kernels.lm_head_triton_bwd as bwd
    import kernels.lm_head_triton_fwd as fwd
    out = {}
    for name, tuner, names in (("forward", fwd._lm_head_fwd_tuned, fwd._FWD_NAMES),
                               ("dlogits", bwd._dlogits_tuned, bwd._DL_NAMES)):
        out[name] = {str(k): fwd.tile_of(c, names) for k, c in getattr(tuner, "cache", {}).items()}
    return out


TILE_WALKS = {"flat": "fwd.FLATTEN_TILE_LOOPS", "persist": "bwd.PERSISTENT_DLOGITS",
              "tmastore": "bwd.DLOGITS_TMA_STORE"}


def knob_modules():
    import kernels.lm_head_triton_bwd as bwd
    import kernels.lm_head_triton_fp16x2 as fp16x2
    import kernels.lm_head_triton_fwd as fwd
    return dict(fwd=fwd, bwd=bwd, fp16x2=fp16x2)


def knob_defaults():
    """The kernel modules' switches and sizes as they are now ('mod.NAME' -> value): every
    method puts them back before it sets its own, since they are module globals."""
    return {f"{m}.{k}": v for m, mod in knob_modules().items() for k, v in vars(mod).items()
            if k.isupper() and type(v) in (bool, int)}


KNOB_DEFAULTS = {}  # filled by main() once its global flags (--no-tma) are applied


def fused(mode, vocab_chunk=None, bwd_chunks=None, stack=True, hi_steps=None, walks=None,
          knobs=None):
    """bwd_chunks: (token-chunk multiple of chunk_tokens, backward vocabulary rows) for fp16x2;
    the rows are taken as they are at every H (the default scales them: bwd_vocab_rows).
    stack=False: grad_weight's two fp16x2 products as two cuBLAS calls (STACK_GRAD_W off).
    hi_steps: K steps of hi x hi summed straight per rounded add, 0 for every product summed
    in blocks (kernels' HI_SUM_STEPS; None: its default).
    walks: None for the kernels' defaults, else the subset of TILE_WALKS switched on (the rest
    off): flat = Triton's loop flattening (FLATTEN_TILE_LOOPS: the forward's vocabulary loop,
    persistent dlogits' tile loop), persist = persistent dlogits (PERSISTENT_DLOGITS),
    tmastore = dlogits' parts stored by TMA (DLOGITS_TMA_STORE).
    knobs: any other switches, {'mod.NAME': value} (mod: fwd, bwd, fp16x2; --variant)."""
    own = dict(knobs or {})
    if vocab_chunk:
        own["fp16x2.VOCAB_CHUNK"] = vocab_chunk
    if bwd_chunks:  # BWD_WORK_H=1: no scaling by H
        own.update({"fp16x2.BWD_TOKEN_CHUNKS_PER_CHUNK_TOKENS": bwd_chunks[0],
                    "fp16x2.BWD_VOCAB_CHUNK": bwd_chunks[1], "fp16x2.BWD_WORK_H": 1})
    if hi_steps is not None:
        own["fwd.HI_SUM_STEPS"] = hi_steps
    if not stack:
        own["fp16x2.STACK_GRAD_W"] = False
    if walks is not None:
        own.update({knob: name in walks for name, knob in TILE_WALKS.items()})
    mods = knob_modules()
    unknown = set(own) - set(KNOB_DEFAULTS or knob_defaults())
    assert not unknown, f"unknown kernel switches {sorted(unknown)}"

    def f(h, w, t):
        # left set: backward reads them after this returns; every method sets all of them
        for key, value in {**KNOB_DEFAULTS, **own}.items():
            m, name = key.split(".")
            setattr(mods[m], name, value)
        return lm_head_logprobs(h, w, t, mode=mode, impl="triton")[0]
    return f


def parse_variant(text):
    """'NAME:mod.KNOB=value,mod.KNOB=value' -> (NAME, {knob: int value})."""
    name, _, sets = text.partition(":")
    knobs = {}
    for item in filter(None, sets.split(",")):
        key, _, value = item.partition("=")
        knobs[key] = int(value)
    return name, knobs


def bench_inputs(T, H, V):
    """(fp32 weight, bf16 hidden, targets, loss weights) of one shape, seeded by H: the
    weight ~ N(0, (2/sqrt(H))^2), so logits have std ~2 (see the module docstring)."""
    torch.manual_seed(H)
    w32 = torch.randn(V, H, device="cuda") * (2 / math.sqrt(H))
    h16 = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    t = torch.randint(0, V, (T,), device="cuda")
    g = torch.randn(T, device="cuda")
    return w32, h16, t, g


def cuda_time(fn, budget_s=1.5, max_reps=10, reps_out=None):
    """Median ms of fn() with CUDA events; one warm-up, reps bounded by a time budget.
    reps_out: a list that receives every rep's ms, in order (drift from clocks shows there)."""
    fn()
    torch.cuda.synchronize()
    times = []
    t_start = time.time()
    while len(times) < max_reps:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
        if time.time() - t_start > budget_s:
            break
    if reps_out is not None:
        reps_out.extend(times)
    times.sort()
    return times[len(times) // 2]


def naive_grads(h, w, t, g):
    """(grad_hidden, grad_weight) of naive fp32 at the timed shape: the reference for the
    gradients' errors (fp32 sums of exact inputs; h is bf16-valued, as every method gets)."""
    hg = h.float().detach().requires_grad_()
    wg = w.float().detach().requires_grad_()
    (naive(torch.float32)(hg, wg, t) * g).sum().backward()
    return hg.grad, wg.grad


def rel_max_err(x, ref):
    return ((x.float() - ref).abs().max() / ref.abs().max()).item()


def measure(method, h, w, t, g, ref_rows, ref_logp, do_bwd=True, grad_ref=None):
    """grad_ref: naive_grads' pair; the method's gradients from the peak-memory run are then
    compared with it (max |error| / max |reference|)."""
    res = {}
    try:
        with torch.no_grad():
            logp = method(h, w, t)
        res["max_abs_dlogp"] = (logp[ref_rows].double() - ref_logp).abs().max().item()
        res["nan"] = bool(torch.isnan(logp).any().item())
        del logp
        with torch.no_grad():
            res["fwd_ms"] = cuda_time(lambda: method(h, w, t))
        if do_bwd:
            hg = h.detach().requires_grad_()
            wg = w.detach().requires_grad_()

            def fb():
                hg.grad = None
                wg.grad = None
                (method(hg, wg, t) * g).sum().backward()
            # Time first: its warm-up run also autotunes, whose trial copies must not count.
            res["fwd_bwd_reps_ms"] = []
            res["fwd_bwd_ms"] = cuda_time(fb, reps_out=res["fwd_bwd_reps_ms"])
            hg.grad = None
            wg.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fb()
            torch.cuda.synchronize()
            res["peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            if grad_ref is not None:
                res["grad_h_err"] = rel_max_err(hg.grad, grad_ref[0])
                res["grad_w_err"] = rel_max_err(wg.grad, grad_ref[1])
            hg.grad = None
            wg.grad = None
    except torch.OutOfMemoryError:
        res["oom"] = True
    torch.cuda.empty_cache()
    return res


def gpu_correctness(modes):
    """Small ragged shape, fwd + bwd with entropy and temperature, vs float64 autograd."""
    torch.manual_seed(1234)
    T, V, H, temp = 300, 5003, 200, 0.8
    h = torch.randn(T, H, device="cuda").to(torch.bfloat16).float()  # bf16-valued, as in training
    w = torch.randn(V, H, device="cuda") * (2 / math.sqrt(H))
    t = torch.randint(0, V, (T,), device="cuda")
    gl, ge = torch.randn(T, device="cuda"), torch.randn(T, device="cuda")
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = lm_head_logprobs_naive(hd, wd, t, temp, True)
    (lp_ref * gl + ent_ref * ge).sum().backward()
    out = {}
    for mode in modes:
        # (hidden dtype, weight dtype) pairs; bf16 hidden exercises bf16x3's exact 3-way split.
        dts = {"bf16": [(torch.float32,) * 2, (torch.bfloat16,) * 2],
               "bf16x3": [(torch.float32,) * 2, (torch.bfloat16, torch.float32), (torch.bfloat16,) * 2],
               "fp16x2": [(torch.float32,) * 2, (torch.bfloat16, torch.float32), (torch.bfloat16,) * 2]}.get(
                   mode, [(torch.float32,) * 2])
        for hdt, wdt in dts:
            hm = h.to(hdt).detach().clone().requires_grad_()
            wm = w.to(wdt).detach().clone().requires_grad_()
            # chunk_tokens=32: several token chunks in every mode's backward (fp16x2: 4 x 32)
            lp, ent = lm_head_logprobs(hm, wm, t, temp, True, mode, impl="triton", chunk_tokens=32)
            (lp * gl + ent * ge).sum().backward()
            rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
            key = f"{mode}/h:{str(hdt)[6:]}/w:{str(wdt)[6:]}"
            out[key] = dict(
                logp_max_abs=(lp.double() - lp_ref).abs().max().item(),
                ent_max_abs=(ent.double() - ent_ref).abs().max().item(),
                grad_h_rel=rel(hm.grad, hd.grad), grad_w_rel=rel(wm.grad, wd.grad),
                any_nan=bool(torch.isnan(lp).any() or torch.isnan(ent).any()
                             or torch.isnan(hm.grad).any() or torch.isnan(wm.grad).any()))
            print(f"check {key:32s} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in out[key].items()), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--H", type=int, nargs="+", default=[1536, 4096])
    ap.add_argument("--V", type=int, default=V_DEFAULT)
    ap.add_argument("--modes", nargs="+", default=["bf16", "fp16x2", "bf16x3", "tf32x3", "fp32"])
    ap.add_argument("--fp32-max-T", type=int, default=4096,
                    help="skip timing mode fp32 (FMA units, slow) above this T")
    ap.add_argument("--ref-rows", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kernels_lm_head_h100.json"))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--table", nargs="+", metavar="JSON",
                    help="only print the markdown results table of earlier runs' JSON files")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--bf16-weight-too", action="store_true",
                    help="also time fp16x2 on a bf16 weight (one weight part)")
    ap.add_argument("--vocab-chunk", type=int, nargs="+", default=[],
                    help="fp16x2: weight rows split per chunk; several values add methods")
    ap.add_argument("--bwd-chunks", nargs="+", default=[], metavar="MULT:VOCAB",
                    help="fp16x2 backward: token chunk = MULT x chunk_tokens, vocabulary chunk VOCAB rows at any H; "
                         "each value adds a method (the defaults are always measured)")
    ap.add_argument("--profile", nargs="*", default=[],
                    help="modes whose fwd+bwd is also profiled per kernel (torch.profiler)")
    ap.add_argument("--no-tma", action="store_true",
                    help="fp16x2: pointer loads instead of tensor descriptors (to compare the two)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the fused methods this many times, alternating their order")
    ap.add_argument("--hi-sum-steps", type=int, nargs="+", default=[],
                    help="also time fp16x2 with hi x hi summed straight for N K steps per add")
    ap.add_argument("--unstacked-too", action="store_true",
                    help="also time fp16x2 with grad_weight's two products as two calls")
    ap.add_argument("--tile-walks", nargs="+", default=[], metavar="A+B",
                    help=f"fp16x2: also time with these '+'-joined sets of {list(TILE_WALKS)} on, the rest off "
                         "('none': all off), as fused_fp16x2@A+B")
    ap.add_argument("--variant", nargs="+", default=[], metavar="NAME:mod.KNOB=V,...",
                    help="fp16x2: also time with these kernel switches set (mod: fwd, bwd, fp16x2; "
                         "booleans as 0/1), as fused_fp16x2@NAME, e.g. nolo:fwd.LO_IN_SEGMENTS=0")
    ap.add_argument("--fp16x2-tiles", nargs="+", default=[], metavar="T,V,K,WARPS,STAGES",
                    help="fp16x2: autotune over these tiles only (fewer compiles), e.g. 128,128,64,8,3")
    ap.add_argument("--grad-check", action="store_true",
                    help="gradient errors of every fused method against naive fp32's at each shape")
    ap.add_argument("--blocked-lo-too", action="store_true",
                    help="fp16x2: also time every product summed in blocks (fused_fp16x2@blockedlo)")
    ap.add_argument("--memory-trace", nargs="*", default=[],
                    help="modes whose fwd+bwd peak is broken down into the allocations live at it")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(args.table))
        return

    import triton

    import kernels.lm_head_triton_fwd as fwd
    if args.no_tma:
        fwd.USE_TMA = False
    if args.fp16x2_tiles:
        fwd.FP16X2_TILES = [tuple(int(x) for x in tile.split(",")) for tile in args.fp16x2_tiles]
        unknown = set(fwd.FP16X2_TILES) - set(fwd.ALL_TILES)
        assert not unknown, f"--fp16x2-tiles {unknown}: not among the configs {fwd.ALL_TILES}"
    KNOB_DEFAULTS.update(knob_defaults())
    dev = torch.cuda.get_device_name()
    report = dict(device=dev, torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), V=args.V, argv=sys.argv, tma=not args.no_tma,
                  results=[])
    print(f"{dev} torch {torch.__version__} triton {triton.__version__} "
          f"fp32 matmul precision {torch.get_float32_matmul_precision()}", flush=True)
    if not args.skip_check:
        report["gpu_check"] = gpu_correctness(args.modes)
        if args.check_only:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
            return

    liger = None if args.no_liger else try_liger()
    V = args.V
    # T outer, H inner: the slowest shapes come last, so a run cut short keeps the rest.
    for T in args.T:
        for H in args.H:
            w32, h16, t, g = bench_inputs(T, H, V)
            w16, h32 = w32.to(torch.bfloat16), h16.float()
            rows = torch.randperm(T, device="cuda")[: args.ref_rows]
            ref = lm_head_logprobs_naive(h32[rows].double(), w32.double(), t[rows])[0]
            # what each mode gets: bf16 copies of both, the bf16 hidden with the fp32 weight, or fp32
            mode_inputs = collections.defaultdict(lambda: (h32, w32), bf16=(h16, w16), bf16x3=(h16, w32),
                                                  fp16x2=(h16, w32))
            methods = [("naive_fp32", naive(torch.float32), h32, w32),
                       ("naive_bf16", naive(torch.bfloat16), h16, w16)]
            for mode in args.modes:
                if mode == "fp32" and T > args.fp32_max_T:
                    continue
                hh, ww = mode_inputs[mode]
                if mode == "fp16x2" and args.vocab_chunk:
                    methods += [(f"fused_fp16x2@{vc}" if i else "fused_fp16x2", fused(mode, vc), hh, ww)
                                for i, vc in enumerate(args.vocab_chunk)]
                    continue
                methods.append((f"fused_{mode}", fused(mode), hh, ww))
                if mode == "fp16x2":
                    for bc in args.bwd_chunks:
                        mult, vocab = (int(x) for x in bc.split(":"))
                        methods.append((f"fused_fp16x2@bwd{mult}:{vocab}", fused(mode, bwd_chunks=(mult, vocab)), hh, ww))
                if mode == "fp16x2":
                    methods += [(f"fused_fp16x2@hi{n}", fused(mode, hi_steps=n), hh, ww)
                                for n in args.hi_sum_steps]
                if mode == "fp16x2":
                    for tw in args.tile_walks:
                        on = [] if tw == "none" else tw.split("+")
                        assert set(on) <= set(TILE_WALKS), f"--tile-walks {tw}: not in {list(TILE_WALKS)}"
                        methods.append((f"fused_fp16x2@{tw}", fused(mode, walks=on), hh, ww))
                    for name, knobs in map(parse_variant, args.variant):
                        methods.append((f"fused_fp16x2@{name}", fused(mode, knobs=knobs), hh, ww))
                if mode == "fp16x2" and args.unstacked_too:
                    methods.append(("fused_fp16x2@unstacked", fused(mode, stack=False), hh, ww))
                if mode == "fp16x2" and args.blocked_lo_too:
                    methods.append(("fused_fp16x2@blockedlo", fused(mode, hi_steps=0), hh, ww))
                if mode == "fp16x2" and args.bf16_weight_too:  # a bf16 model's (tied) head
                    methods.append(("fused_fp16x2_w16", fused(mode), h16, w16))
            if liger is not None:
                methods += [("liger_bf16", liger, h16, w16), ("liger_fp32", liger, h32, w32)]
            with torch.no_grad():
                mm_ms = cuda_time(lambda: h16 @ w16.t()) if T * V * 2 < 40 * 2**30 else None
            for mode in args.profile:
                hh, ww = mode_inputs[mode]
                profile_kernels(fused(mode), hh, ww, t, g, f"T={T} H={H} {mode}")
            for mode in args.memory_trace:
                hh, ww = mode_inputs[mode]
                memory_trace(fused(mode), hh, ww, t, g, f"T={T} H={H} {mode}")
            # Later rounds time the fused methods again, in reverse order every other round:
            # a power-capped GPU runs each method at the clocks its predecessors left it.
            fused_methods = [m for m in methods if not m[0].startswith("naive")]
            grad_ref = naive_grads(h32, w32, t, g) if args.grad_check else None
            rounds = [methods] + [fused_methods[::-1] if i % 2 else fused_methods
                                  for i in range(1, args.rounds)]
            failed = set()
            for rnd, (name, fn, hh, ww) in ((i, m) for i, ms in enumerate(rounds) for m in ms):
                if name in failed:
                    continue
                t0 = time.time()
                try:
                    r = dict(name=name, T=T, H=H, **measure(fn, hh, ww, t, g, rows, ref, grad_ref=None if
                                                            name.startswith("naive") else grad_ref))
                except Exception as e:  # a variant that does not compile: reported, the rest go on
                    if "@" not in name:
                        raise
                    failed.add(name)
                    report.setdefault("failed", []).append(dict(name=name, T=T, H=H, error=repr(e)[:2000]))
                    print(f"T={T:6d} H={H:5d} {name:12s} FAILED {e!r}"[:3000], flush=True)
                    continue
                r["bf16_matmul_ms"] = mm_ms
                r["round"] = rnd
                report["results"].append(r)
                print(f"T={T:6d} H={H:5d} {name:12s} " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else
                    f"{k}=[{' '.join(f'{x:.1f}' for x in v)}]" if isinstance(v, list) else f"{k}={v}"
                    for k, v in r.items() if k not in ("name", "T", "H")) + f" ({time.time()-t0:.0f}s)",
                    flush=True)
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
            del w32, w16, h32, h16, t, g, ref, mode_inputs, methods, grad_ref
            torch.cuda.empty_cache()
    report["tuned_tiles"] = tuned_tiles()
    print("tuned tiles:", json.dumps(report["tuned_tiles"]))
    report["targets"] = target_summary(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)
    for row in report["targets"]:
        print("TARGETS " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
