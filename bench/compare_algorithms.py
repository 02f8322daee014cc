"""CISPO against DAPO and GRPO (and any other rows), everything else equal, several seeds.

    python bench/compare_algorithms.py --experiment long_addition_gpu --seeds 0 1 2 \\
        --devices 0 1 --parallel 12 --out bench/results/compare_h200 \\
        --row cispo:algorithm=cispo --row dapo:algorithm=dapo --row grpo:algorithm=grpo \\
        --row "cispo_bf16_head:algorithm=cispo rollout.lm_head_fp32=false trainer.lm_head_mode=bf16"

Each (row, seed) is one `cispo-train +experiment=E seed=S <row overrides> <common overrides>`
run; runs go side by side (`--parallel`), each pinned to one of `--devices` (GPUs, by
CUDA_VISIBLE_DEVICES; none = CPU). The experiment's warm-start is cached, so every row of
a seed starts from the same pretrained weights. Rows differ only in their overrides: the
recipe holds group size, sampling, data and schedule equal.

Writes <out>.json (every run's curves and exit code, the command, device, date), <out>.md
(the tables) and <out>.png (reward, entropy, clipping, length against steps), and prints
the tables: final reward (mean of the last 10 steps) per seed and row, and the steps each
row needs to reach the reference row's final reward (5-step moving average; M1: CISPO
needs half of DAPO's), the train/rollout mismatch (Pearson of token probabilities, mean
|Δ log p|) and clip fractions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = time.time()
sys.path.insert(0, str(REPO))

from launch.report import read_metrics, software_versions  # noqa: E402

CURVES = ["reward/mean", "train/entropy", "train/clip_frac_high", "train/clip_frac_low", "train/grad_dropped_frac",
          "train/is_weight_mean", "rollout/response_len_mean", "mismatch/pearson", "mismatch/abs_logp_diff",
          "perf/step_time_s"]


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def run_one(job: dict, args) -> dict:
    out = Path(args.runs_dir) / f"{job['row']}_s{job['seed']}"
    cmd = [sys.executable, "-m", "launch.main", f"+experiment={args.experiment}", f"seed={job['seed']}",
           f"output_dir={out}", f"resume={str(args.resume).lower()}", *job["overrides"], *args.overrides]
    # the repo first, and whatever the environment brings (a GPU machine's packages live there)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if job["device"] is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(job["device"])
    # many runs side by side: keep each Ray's object store small (it defaults to 30% of RAM)
    env.setdefault("RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES", str(2 * 10**9))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with (out / "console.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=max(args.deadline_s - (time.time() - START), 1))
        except subprocess.TimeoutExpired:
            # out of time: SIGTERM ends the run after its current step (checkpoint, exit 143);
            # the steps it made are in its metrics
            proc.terminate()
            try:
                code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    rows = read_metrics(out / "metrics.jsonl")
    print(f"  {job['row']:>16} seed {job['seed']}: exit {code}, {len(rows)} steps, {time.time() - t0:.0f} s", flush=True)
    return {**job, "exit_code": code, "wall_s": time.time() - t0, "steps": len(rows),
            "curves": {k: [r.get(k) for r in rows] for k in CURVES}}


def parse_row(spec: str, all_seeds: list[int]) -> tuple[str, list[int], list[str]]:
    """`name:overrides` runs on every seed; `name@0,2:overrides` only on seeds 0 and 2 (an ablation
    row that costs less than a full one)."""
    head, _, over = spec.partition(":")
    name, _, only = head.partition("@")
    seeds = [int(x) for x in only.split(",")] if only else list(all_seeds)
    unknown = sorted(set(seeds) - set(all_seeds))
    if unknown:
        raise SystemExit(f"--row {spec!r}: seeds {unknown} are not in --seeds {all_seeds}")
    return name, seeds, over.split()


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def steps_to_reach(curve: list[float], level: float, k: int = 5) -> int | None:
    for i in range(k - 1, len(curve)):
        if mean(curve[i - k + 1: i + 1]) >= level:
            return i + 1
    return None


def truncate(results: list[dict]) -> int:
    """Cut every run's curves to the steps all runs made (a deadline can stop runs unevenly):
    rows are compared over the same steps. Returns that step count."""
    common = min((x["steps"] for x in results if x["steps"]), default=0)
    for x in results:
        x["curves"] = {k: v[:common] for k, v in x["curves"].items()}
    return common


def summarise(results: list[dict], rows: list[str], reference: str) -> tuple[str, dict]:
    by_row = {r: [x for x in results if x["row"] == r] for r in rows}
    final = {r: {x["seed"]: mean(x["curves"]["reward/mean"][-10:]) for x in runs} for r, runs in by_row.items()}
    start = {r: {x["seed"]: mean(x["curves"]["reward/mean"][:5]) for x in runs} for r, runs in by_row.items()}
    ref_level = mean(final.get(reference, {}).values())
    reach = {r: {x["seed"]: steps_to_reach(x["curves"]["reward/mean"], ref_level) for x in runs} for r, runs in by_row.items()}
    seeds = sorted({x["seed"] for x in results})
    lines = ["| row | " + " | ".join(f"seed {s}: first 5 → last 10" for s in seeds) + " | mean final |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for r in rows:
        cells = [f"{start[r].get(s, float('nan')):.3f} → {final[r].get(s, float('nan')):.3f}" for s in seeds]
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {mean(final[r].values()):.3f} |")
    lines += ["", f"Steps to reach {reference}'s final reward ({ref_level:.3f}, 5-step moving average; — = never):", "",
              "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (seeds that reached it) |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for r in rows:
        got = [reach[r].get(s) for s in seeds]
        cells = ["—" if g is None else str(g) for g in got]
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {mean(got):.1f} |")
    lines += ["", "Means over all steps and seeds:", "",
              "| row | entropy first→last 10 | clip frac high | clip frac low | grad dropped frac | IS weight mean "
              "| mismatch pearson | mismatch mean abs Δlogp | length | step s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = by_row[r]

        def allv(key, runs=runs):
            return mean([v for x in runs for v in x["curves"][key]])

        ent = (mean([mean(x["curves"]["train/entropy"][:10]) for x in runs]),
               mean([mean(x["curves"]["train/entropy"][-10:]) for x in runs]))
        lines.append(f"| {r} | {ent[0]:.3f} → {ent[1]:.3f} | {allv('train/clip_frac_high'):.4f} | "
                     f"{allv('train/clip_frac_low'):.4f} | {allv('train/grad_dropped_frac'):.4f} | "
                     f"{allv('train/is_weight_mean'):.4f} | {allv('mismatch/pearson'):.5f} | "
                     f"{allv('mismatch/abs_logp_diff'):.2e} | {allv('rollout/response_len_mean'):.1f} | "
                     f"{allv('perf/step_time_s'):.2f} |")
    failed = [f"{x['row']} seed {x['seed']} (exit {x['exit_code']}, {x['steps']} steps)" for x in results if x["exit_code"]]
    if failed:
        lines += ["", "Runs that did not finish cleanly: " + "; ".join(failed)]
    return "\n".join(lines), {"final": final, "start": start, "steps_to_reference": reach, "reference_level": ref_level}


def plot(results: list[dict], rows: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward/mean", "mean reward"), ("train/entropy", "entropy (nats/token)"),
            ("train/clip_frac_high", "IS ratio above 1+eps_high (fraction)"),
            ("train/grad_dropped_frac", "tokens with no gradient (fraction)"),
            ("rollout/response_len_mean", "response length"), ("mismatch/abs_logp_diff", "train/rollout mean |Δ log p|")]
    fig, axes = plt.subplots(3, 2, figsize=(12, 11))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, keys):
        for i, r in enumerate(rows):
            for x in (x for x in results if x["row"] == r):
                ys = x["curves"][key]
                ax.plot(range(len(ys)), [float("nan") if y is None else y for y in ys], color=colors[i % len(colors)],
                        linewidth=1, alpha=0.8, label=r if x["seed"] == min(y["seed"] for y in results) else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="long_addition")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--row", action="append", default=[],
                    help="name:override override ... (repeatable); name@0,1:... runs that row on seeds 0 and 1 only")
    ap.add_argument("--reference", default="dapo", help="the row whose final reward the others must reach")
    ap.add_argument("--devices", nargs="*", default=[], help="GPU indices to spread the runs over (none: CPU)")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--deadline-s", type=float, default=3600, help="wall-clock budget of the whole comparison")
    ap.add_argument("--out", default="bench/results/compare")
    ap.add_argument("--runs-dir", default="runs/compare")
    ap.add_argument("--resume", action="store_true",
                    help="continue each run from its latest checkpoint in --runs-dir (a comparison over several "
                         "sessions or device calls; keep --runs-dir where it survives between them)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_args()
    specs = args.row or ["cispo:algorithm=cispo", "dapo:algorithm=dapo", "grpo:algorithm=grpo"]
    parsed = [parse_row(s, args.seeds) for s in specs]
    rows = [name for name, _, _ in parsed]
    jobs = []
    for seed in args.seeds:  # seed-major: the runs of one seed start together and share its warm-start
        for name, seeds, over in parsed:
            if seed in seeds:
                jobs.append({"row": name, "seed": seed, "overrides": over,
                             "device": args.devices[len(jobs) % len(args.devices)] if args.devices else None})
    where = f"CUDA_VISIBLE_DEVICES {args.devices}" if args.devices else "the devices each run's placement asks for"
    print(f"{len(jobs)} runs, {args.parallel} at a time, on {where}", flush=True)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda j: run_one(j, args), jobs))
    common = truncate(results)
    table, numbers = summarise(results, rows, args.reference)
    table = f"All rows over their first {common} steps (the fewest any run made).\n\n{table}"
    print(table)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": device_name(), "steps": common,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "software": software_versions(),
              "wall_s": time.time() - t0, "rows": dict(zip(rows, specs)), **numbers, "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
    versions = ", ".join(f"{k} {v}" for k, v in report["software"].items())
    Path(f"{args.out}.md").write_text(f"`{report['command']}`\n\ndevice: {report['device']}, {report['date']}; {versions}"
                                      f"\n\n{table}\n")
    plot(results, rows, f"{args.out}.png")


if __name__ == "__main__":
    main()
