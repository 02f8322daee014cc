"""Profile of a training step and a sweep of the trainer's speed options, on one GPU (issue 13).

One process runs, for each shape (`--presets`, e.g. qwen2-0.5b qwen2-1.5b) and each variant
(`--variants`), the real trainer path of bench/trainer_throughput.py: a fresh
`trainer.worker.TrainerWorker` (DeepSpeed ZeRO-2, bf16, FP32 LM head; `--engine torch`: plain
torch AdamW + bf16 autocast where DeepSpeed is missing) on random packed sequences, warm-up
steps, then timed steps: tokens/s, MFU (989 TFLOP/s dense bf16 peak, H100/H200 SXM), peak
memory. The first variant of each shape also runs one step under torch.profiler: the top ops
by self GPU time, and a breakdown of GPU time into attention, matmuls (GEMM), FP32 head, norms
/ activations / elementwise, optimizer step, ZeRO gradient bookkeeping (AccumulateGrad hooks),
copies, communication and other; with the GPU-busy fraction of the step's wall time.

Variants: names joined by "+": an attention (sdpa, varlen, varlen_fa2, flex, eager; default sdpa), "liger",
"compile", "ac" (activation checkpointing), "mbt16k" (micro_batch_tokens=16384; any "mbt<N>k"),
"seq16k" (16k-token sequences). Example: base varlen varlen+liger varlen+mbt16k+liger.

Runs stop cleanly at `--deadline-s` (a variant starts only if its estimated time fits; a
running one stops between steps), and the JSON (`--out`, with `device`) and markdown table
(`--md`) are rewritten after every variant, so a cut-short run keeps what it measured.

    python bench/trainer_profile.py --presets qwen2-0.5b qwen2-1.5b --variants base varlen+liger \\
        --deadline-s 170 --out $OUT/trainer_profile.json --md $OUT/trainer_profile.md
    python bench/trainer_profile.py --presets tiny --variants base varlen+ac --engine torch --steps 1  # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.trainer_throughput import (PEAK_FLOPS, make_batch, make_model_folder, model_flops,  # noqa: E402
                                      run_deepspeed, run_torch, scratch_dir, trainer_config)
from trainer.attention import VARLEN_NAMES  # noqa: E402

ATTN_ALIASES = {"sdpa": "sdpa", "varlen": "varlen", "varlen_fa2": "varlen_fa2", "flex": "flex_attention",
                "eager": "eager", "fa2": "flash_attention_2"}
CATEGORIES = ["attention", "matmul", "fp32_head", "norm_act_elementwise", "optimizer", "zero_grad_hooks",
              "copies", "communication", "other"]


def parse_variant(name: str, args) -> dict:
    """{"attn", "liger", "compile", "ac", "micro_batch_tokens", "seq_len"} from e.g. "varlen+mbt16k+liger"."""
    v = dict(attn="sdpa", liger=False, compile=False, ac=False, micro_batch_tokens=args.micro_batch_tokens,
             seq_len=args.seq_len)
    for part in name.split("+"):
        if part == "base":
            continue
        if part in ATTN_ALIASES:
            v["attn"] = ATTN_ALIASES[part]
        elif part in ("liger", "compile", "ac"):
            v[part] = True
        elif m := re.fullmatch(r"mbt(\d+)k", part):
            v["micro_batch_tokens"] = int(m.group(1)) * 1024
        elif m := re.fullmatch(r"seq(\d+)k", part):
            v["seq_len"] = int(m.group(1)) * 1024
        else:
            raise SystemExit(f"unknown variant part {part!r} in {name!r}")
    v["micro_batch_tokens"] = max(v["micro_batch_tokens"], v["seq_len"])
    return v


# ---- profile: GPU time per category ------------------------------------------------------

_ATTN_KERNELS = ("flash", "fmha", "attention", "attn", "flex")
_GEMM_KERNELS = ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "cublas")


def _category(chain: list[str], kernel: str) -> str:
    """chain: the CPU op names from the kernel's own op up to the outermost range."""
    joined = " | ".join(chain).lower()
    kernel = kernel.lower()
    if "lmheadlogprobs" in joined or "lm_head" in joined:
        return "fp32_head"
    if "trainer.optimizer_step" in joined or "optimizer.step" in joined:
        return "optimizer"
    if "accumulategrad" in joined:
        return "zero_grad_hooks"
    if "nccl" in joined or "nccl" in kernel or "c10d::" in joined:
        return "communication"
    own = chain[0].lower() if chain else ""
    if any(k in own for k in ("attention", "flash", "flex", "sdpa")) or any(k in kernel for k in _ATTN_KERNELS):
        return "attention"
    if any(k in own for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")) \
            or any(k in kernel for k in _GEMM_KERNELS):
        return "matmul"
    if any(k in own for k in ("copy_", "aten::cat", "aten::index", "aten::to", "aten::fill_", "aten::zero_",
                              "aten::clone", "aten::contiguous")) or "memcpy" in kernel or "memset" in kernel:
        return "copies"
    if own.startswith("aten::") or "liger" in joined or "compiled" in joined or kernel.startswith("triton"):
        return "norm_act_elementwise"
    return "other"


def _kernel_us(k) -> float:
    return float(getattr(k, "device_time", None) or getattr(k, "duration", 0.0) or 0.0)


def breakdown(prof) -> dict:
    """GPU microseconds per category, each kernel charged by its name and the ops that launched it."""
    out = {c: 0.0 for c in CATEGORIES}
    for evt in prof.events():
        kernels = getattr(evt, "kernels", None) or []
        if not kernels:
            continue
        chain, e = [], evt
        while e is not None:
            chain.append(e.name)
            e = e.cpu_parent
        for k in kernels:
            out[_category(chain, getattr(k, "name", ""))] += _kernel_us(k)
    return out


def top_ops(prof, n: int = 20) -> list[dict]:
    rows = []
    for a in prof.key_averages():
        self_dev = getattr(a, "self_device_time_total", None)
        if self_dev is None:
            self_dev = getattr(a, "self_cuda_time_total", 0.0)
        rows.append({"op": a.key, "self_gpu_ms": self_dev / 1e3, "calls": a.count,
                     "cpu_total_ms": a.cpu_time_total / 1e3})
    rows.sort(key=lambda r: -r["self_gpu_ms"])
    return rows[:n]


def profile_step(step, sync, trace: str | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t0
    if trace:  # the whole timeline (chrome://tracing, Perfetto) for reading offline
        prof.export_chrome_trace(trace)
    cats = breakdown(prof)
    busy = sum(cats.values()) / 1e6
    # host syncs: each one drains the GPU's queue before Python can go on launching
    sync_ops = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize",
                "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")
    syncs = {a.key: a.count for a in prof.key_averages() if a.key in sync_ops}
    return {"step_wall_s_profiled": wall, "gpu_busy_s": busy, "gpu_busy_frac": busy / wall if wall else None,
            "breakdown_ms": {k: v / 1e3 for k, v in cats.items()}, "host_sync_calls": syncs,
            "top_ops": top_ops(prof)}


def sync_sites(step, n_top: int = 25) -> list[dict]:
    """Where one step makes the host wait for the GPU: every synchronizing CUDA call
    (torch's sync debug mode: .item(), .nonzero(), copies to the host, stream syncs) and
    every torch.cuda.synchronize(), each counted under the first stack frame outside torch,
    with the first frame in this project's code beside it. The profiler counts these calls;
    this says which lines make them."""
    import traceback
    import warnings

    counts: dict[tuple[str, str, str], int] = {}
    here = str(Path(__file__).resolve().parents[1])

    def record(kind: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "bench/trainer_profile.py" not in f.filename]
        outside = [f for f in frames if "/torch/" not in f.filename and "warnings.py" not in f.filename]
        ours = [f for f in outside if f.filename.startswith(here)]

        def label(fs):
            if not fs:
                return "?"
            f = fs[-1]
            short = f.filename.split("site-packages/")[-1].replace(here + "/", "")
            return f"{short}:{f.lineno} {f.name}"

        key = (kind, label(outside), label(ours))
        counts[key] = counts.get(key, 0) + 1

    real_sync = torch.cuda.synchronize

    def counted_sync(*a, **k):
        record("torch.cuda.synchronize")
        return real_sync(*a, **k)

    def show(message, category, filename, lineno, file=None, line=None):
        record("sync op: " + str(message).split("\n")[0][:60])

    real_sync()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old_show, warnings.showwarning = warnings.showwarning, show
        torch.cuda.synchronize = counted_sync
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            real_sync()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize = real_sync
            warnings.showwarning = old_show
    rows = [{"kind": k, "site": s, "project_frame": o, "count": c} for (k, s, o), c in counts.items()]
    rows.sort(key=lambda r: -r["count"])
    return rows[:n_top]


def check_varlen(device) -> dict:
    """The "varlen" kernel paths against causal sdpa per sequence in fp32, forward and backward,
    bf16 inputs, GQA: torch's flash attention over cu_seqlens (rows of mixed lengths) and the
    dense batch (rows of one length: cuDNN's kernel on Hopper). The GPU half of what
    tests/trainer/test_speed_options.py checks on CPU (where the per-sequence loop runs)."""
    from trainer.attention import _dense_causal, _flash_varlen, _sdpa_per_sequence, dense_kernel_ok

    T, hq, hk, d = 4096, 14, 2, 64
    paths = {"flash_varlen": ([0, 1000, 1001, 3000, T], lambda q, k, v, cu, n: _flash_varlen(q, k, v, cu, n, d ** -0.5)),
             "dense": ([0, 1024, 2048, 3072, T], lambda q, k, v, cu, n: _dense_causal(q, k, v, 4, n, d ** -0.5))}
    report = {}
    for name, (bounds, fn) in paths.items():
        torch.manual_seed(0)
        # [H, T, D] leaves seen as [T, H, D] views: the strides the model's attention passes
        leaves = [torch.randn(h, T, d, device=device, dtype=torch.bfloat16, requires_grad=True) for h in (hq, hk, hk)]
        if name == "dense" and not dense_kernel_ok(leaves[0]):
            continue  # not Hopper: the trainer does not take this path
        go = torch.randn(T, hq, d, device=device)
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        out = fn(*(x.transpose(0, 1) for x in leaves), cu, max(b - a for a, b in zip(bounds, bounds[1:])))
        (out.float() * go).sum().backward()
        q, k, v = (SimpleNamespace(grad=x.grad.transpose(0, 1)) for x in leaves)
        q32, k32, v32 = (x.detach().transpose(0, 1).float().requires_grad_() for x in leaves)
        ref = _sdpa_per_sequence(q32, k32, v32, bounds, d ** -0.5)
        (ref * go).sum().backward()
        report[name] = {n: float((a.float() - b).abs().max() / b.abs().max())
                        for n, a, b in (("out", out, ref), ("grad_q", q.grad, q32.grad), ("grad_k", k.grad, k32.grad),
                                        ("grad_v", v.grad, v32.grad))}
    # bf16 rounding gives ~1e-2 (grad_k sums 7 query heads); a wrong mask or offset gives O(1)
    return {"max_abs_err_rel_to_max": report, "ok": all(x < 5e-2 for r in report.values() for x in r.values())}


# ---- one variant ------------------------------------------------------------------------

def run_variant(args, preset, shape, folder, name, deadline, res: dict, save=lambda: None) -> dict:
    """Fills `res` in place and calls save() at each stage, so a run killed mid-variant
    (an outer timeout) still leaves its set-up and warm-up times in the JSON."""
    v = parse_variant(name, args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bargs = argparse.Namespace(**{**vars(args), "seq_len": v["seq_len"]})
    if v["seq_len"] != args.seq_len:  # same tokens per step
        bargs.seqs_per_step = max(1, args.seqs_per_step * args.seq_len // v["seq_len"])
    batch = make_batch(bargs, shape["vocab"])
    cfg = trainer_config(args, micro_batch_tokens=v["micro_batch_tokens"], attn_implementation=v["attn"],
                         liger=v["liger"], compile=v["compile"], activation_checkpointing=v["ac"])
    res.update({**v, "engine": args.engine, "tokens_per_step": batch.num_tokens, "status": "setup",
                "loss_tokens_per_step": batch.num_loss_tokens, "seqs_per_step": batch.num_seqs})
    save()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    build = run_deepspeed if args.engine == "deepspeed" else run_torch
    step, n_mb, close = build(cfg, folder, batch)
    res["micro_batches_per_step"] = n_mb
    res["setup_s"] = time.perf_counter() - t_start
    res["status"] = "warmup"
    save()
    try:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync()
        res["warmup_s"] = time.perf_counter() - t0
        res["status"] = "timing"
        save()
        times = []
        for _ in range(args.steps):
            if times and time.perf_counter() > deadline:
                res["cut_short"] = True
                break
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
            res["step_times_s"] = sorted(times)
            save()
        times.sort()
        med = times[len(times) // 2]
        flops = model_flops(batch, shape)
        res.update(step_times_s=times, median_step_s=med, tokens_per_s=batch.num_tokens / med,
                   model_tflops_per_step=flops / 1e12, achieved_tflops=flops / med / 1e12,
                   mfu=flops / med / PEAK_FLOPS[device],
                   peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
        if name in args.profile_variants or (args.profile_first and name == args.variants[0]):
            if time.perf_counter() + 2 * med < deadline:
                trace = f"{args.trace}.{preset}.{name}.json" if args.trace else None
                res["profile"] = profile_step(step, sync, trace)
                body = 6.0 * shape["params_body"] * batch.num_tokens
                mm = res["profile"]["breakdown_ms"]["matmul"] / 1e3
                # The model's GEMM floor: body GEMM FLOPs at the peak, against the measured GEMM time.
                res["profile"]["body_gemm_floor_s"] = body / PEAK_FLOPS[device]
                res["profile"]["gemm_achieved_tflops"] = body / mm / 1e12 if mm else None
                if args.sync_sites and device == "cuda":
                    try:
                        res["profile"]["sync_sites"] = sync_sites(step)
                    except Exception as e:  # noqa: BLE001 - keep the profile measured before it
                        res["profile"]["sync_sites_error"] = f"{type(e).__name__}: {e}"
    finally:
        close()
        del step, close
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    res["wall_s"] = time.perf_counter() - t_start
    return res


# ---- report ---------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = [f"# Trainer profile and option sweep: {report['device']}", "",
             f"torch {report['torch']}, engine {report['engine']}, argv: `{' '.join(report['argv'])}`", "",
             "| shape | variant | attn | mbt | µbatches | step s | tokens/s | TFLOP/s | MFU | peak GiB | setup+warmup s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['variant']} | error: {r['error'][:120]} |||||||||")
            continue
        if "median_step_s" not in r:
            why = r.get("skipped") or f"stopped in {r.get('status', '?')} (setup {r.get('setup_s', 0):.0f}s, " \
                f"warm-up {r.get('warmup_s', 0):.0f}s, steps {r.get('step_times_s', [])})"
            lines.append(f"| {r['preset']} | {r['variant']} | {why} |||||||||")
            continue
        pk = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "n/a"
        lines.append(f"| {r['preset']} | {r['variant']} | {r['attn']} | {r['micro_batch_tokens']} | "
                     f"{r['micro_batches_per_step']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['achieved_tflops']:.1f} | {100 * r['mfu']:.1f}% | {pk} | "
                     f"{r['setup_s'] + r.get('warmup_s', 0):.0f} |")
    for r in report["results"]:
        p = r.get("profile")
        if not p:
            continue
        total = sum(p["breakdown_ms"].values())
        lines += ["", f"## Profile: {r['preset']} / {r['variant']} (one step, {p['step_wall_s_profiled']:.3f} s wall "
                  f"under the profiler, GPU busy {p['gpu_busy_s']:.3f} s = {100 * (p['gpu_busy_frac'] or 0):.0f}%)", "",
                  "| category | GPU ms | share |", "|---|---|---|"]
        for c, ms in sorted(p["breakdown_ms"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {c} | {ms:.1f} | {100 * ms / total:.1f}% |" if total else f"| {c} | {ms:.1f} | |")
        lines.append(f"\nHost-sync calls in the step: {p.get('host_sync_calls')}")
        if p.get("gemm_achieved_tflops"):
            lines.append(f"\nBody GEMM floor at peak: {p['body_gemm_floor_s'] * 1e3:.1f} ms; measured GEMM time "
                         f"{p['breakdown_ms']['matmul']:.1f} ms ({p['gemm_achieved_tflops']:.0f} TFLOP/s on the body's GEMMs).")
        if p.get("sync_sites"):
            lines += ["", "| host sync | first frame outside torch | project frame | calls |", "|---|---|---|---|"]
            lines += [f"| {x['kind']} | `{x['site']}` | `{x['project_frame']}` | {x['count']} |" for x in p["sync_sites"]]
        lines += ["", "| op (top 20 by self GPU time) | self GPU ms | calls | CPU total ms |", "|---|---|---|---|"]
        for o in p["top_ops"]:
            lines.append(f"| `{o['op'][:90]}` | {o['self_gpu_ms']:.2f} | {o['calls']} | {o['cpu_total_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def write(report, args) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(report))


def main() -> None:
    from bench.trainer_throughput import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["qwen2-0.5b"], choices=sorted(PRESETS))
    ap.add_argument("--variants", nargs="+", default=["base"],
                    help="per preset, in order; 'PRESET:VARIANT' limits one to a preset")
    ap.add_argument("--order", default="interleave", choices=["interleave", "preset"],
                    help="interleave: variant i of every preset before variant i+1 (a deadline cuts the tail of both)")
    ap.add_argument("--engine", default="deepspeed", choices=["deepspeed", "torch", "auto"])
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--mixed-lengths", action="store_true")
    ap.add_argument("--seqs-per-step", type=int, default=8)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--head-mode", default="auto")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--deadline-s", type=float, default=1e9, help="wall seconds from start for the whole run")
    ap.add_argument("--min-left-s", type=float, default=30.0,
                    help="seconds that must be left to start a shape's first variant")
    ap.add_argument("--compile-s", type=float, default=40.0,
                    help="extra seconds a compile or flex variant is expected to need")
    ap.add_argument("--profile-variants", nargs="*", default=[], help="variants to profile (besides the first)")
    ap.add_argument("--no-profile-first", dest="profile_first", action="store_false")
    ap.add_argument("--sync-sites", action="store_true",
                    help="with the profile, one more step listing the lines that make the host wait for the GPU")
    ap.add_argument("--trace", default=None, metavar="PREFIX",
                    help="write each profiled step's timeline to PREFIX.<shape>.<variant>.json")
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    # flags trainer_throughput.trainer_config reads (set per variant there)
    args.attn, args.liger, args.compile, args.activation_checkpointing = "sdpa", False, False, False
    t_begin = time.perf_counter()
    deadline = t_begin + args.deadline_s
    if args.engine == "auto":
        try:
            import deepspeed  # noqa: F401
            args.engine = "deepspeed"
        except ImportError:
            args.engine = "torch"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "engine": args.engine, "argv": sys.argv, "peak_flops": PEAK_FLOPS[device], "results": []}
    plan = [(p, v) for v in args.variants for p in args.presets] if args.order == "interleave" else \
        [(p, v) for p in args.presets for v in args.variants]
    plan = [(p, v.split(":", 1)[1] if ":" in v else v) for p, v in plan if ":" not in v or v.split(":")[0] == p]
    if device == "cuda" and any(parse_variant(v, args)["attn"] in VARLEN_NAMES for _, v in plan):
        try:
            report["varlen_check"] = check_varlen(device)
        except Exception as e:  # noqa: BLE001
            report["varlen_check"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(f"VARLEN CHECK {report['varlen_check']}", flush=True)
        if not report["varlen_check"]["ok"]:  # measure nothing wrong: its variants are left out
            plan = [(p, v) for p, v in plan if parse_variant(v, args)["attn"] not in VARLEN_NAMES]
    with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
        shapes, last_wall = {}, {}
        for preset, name in plan:
            left = deadline - time.perf_counter()
            # a shape's first variant (model folder, autotune) gets --min-left-s; later ones ~ the last's wall
            need = 0.8 * last_wall[preset] if preset in last_wall else args.min_left_s
            if any(k in name for k in ("compile", "flex")):
                need += args.compile_s  # torch.compile / inductor's first-call compile
            if left < need or left < 5:
                print(f"SKIP {preset} {name}: {left:.0f}s left, ~{need:.0f}s needed", flush=True)
                report["results"].append({"preset": preset, "variant": name, "skipped": f"deadline ({left:.0f}s left)"})
                continue
            if preset not in shapes:
                t0 = time.perf_counter()
                shapes[preset] = make_model_folder(preset, Path(tmp) / preset)
                shapes[preset]["folder_s"] = time.perf_counter() - t0
                report.setdefault("shapes", {})[preset] = shapes[preset]
            print(f"RUN {preset} {name} ({left:.0f}s left)", flush=True)
            try:
                r = {"preset": preset, "variant": name}
                report["results"].append(r)
                run_variant(args, preset, shapes[preset], Path(tmp) / preset, name, deadline, r,
                            lambda: write(report, args))
                r["status"] = "done"
                last_wall[preset] = r["wall_s"]
                print(f"RESULT {preset} {name}: " + (f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, "
                      f"step {r['median_step_s']:.3f}s, peak {r['peak_memory_gib'] or 0:.1f} GiB, wall {r['wall_s']:.0f}s"
                      if "tokens_per_s" in r else "no timed step"), flush=True)
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                import traceback

                traceback.print_exc()
                r["error"] = f"{type(e).__name__}: {e}"
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            report["elapsed_s"] = time.perf_counter() - t_begin
            write(report, args)
    write(report, args)
    print(markdown(report))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
