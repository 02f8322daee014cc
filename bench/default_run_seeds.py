"""The embedded default run over several seeds: start and end mean reward, wall time.

    python bench/default_run_seeds.py --seeds 0 1 2 --out bench/results/default_run

Runs `cispo-train seed=S` (the README's main job, nothing else changed) once per seed,
then prints a table, writes <out>.json (the releases used, then per seed) and <out>.png
(reward curves of every seed).
"Start" is the mean reward over the first 5 RL steps, "end" over the last 5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.report import read_metrics, software_versions  # noqa: E402


def window(rows, key, first, k=5):
    vals = [r[key] for r in rows if key in r]
    part = vals[:k] if first else vals[-k:]
    return sum(part) / len(part)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="bench/results/default_run")
    ap.add_argument("--runs-dir", default="runs/default_seeds")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (none for the default run)")
    args = ap.parse_args()

    results = []
    for seed in args.seeds:
        out = Path(args.runs_dir) / f"seed{seed}"
        cmd = [sys.executable, "-m", "launch.main", f"seed={seed}", f"output_dir={out}", "resume=false", *args.overrides]
        t0 = time.time()
        code = subprocess.run(cmd, cwd=REPO, env={**os.environ, "RAY_AUTH_MODE": "disabled"}).returncode
        wall = time.time() - t0
        rows = read_metrics(out / "metrics.jsonl")
        results.append({
            "seed": seed,
            "steps": len(rows),
            "reward_start": window(rows, "reward/mean", True),
            "reward_end": window(rows, "reward/mean", False),
            "pass_rate_end": window(rows, "reward/pass_rate", False),
            "entropy_start": window(rows, "train/entropy", True),
            "entropy_end": window(rows, "train/entropy", False),
            "wall_s": wall,
            "exit_code": code,
            "curve": [(r["step"], r["reward/mean"]) for r in rows],
        })

    print(f"{'seed':>4} {'steps':>5} {'reward start':>12} {'reward end':>10} {'gain':>6} {'wall s':>7}")
    for r in results:
        print(f"{r['seed']:>4} {r['steps']:>5} {r['reward_start']:>12.3f} {r['reward_end']:>10.3f} "
              f"{r['reward_end'] - r['reward_start']:>+6.3f} {r['wall_s']:>7.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"software": software_versions(), "seeds": results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(*zip(*r["curve"]), label=f"seed {r['seed']}", linewidth=1)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward")
    ax.set_title("embedded default run (CISPO, builtin:arithmetic)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=110)


if __name__ == "__main__":
    main()
