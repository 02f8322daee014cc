"""The whole loop on GPUs (`python -m launch.main`, i.e. `cispo-train`), measured per step.

Each run is a real cispo-train in a subprocess on a named placement and model, with the
setting of the issue's first GPU runs: the built-in arithmetic task, 16 prompts x 16
samples of 64 new tokens (a random model never stops early, so every sample is 64
tokens), dynamic sampling off. From its metrics.jsonl: the per-step breakdown
(generate, reward, train, sync, idle; medians over the steps after the first, whose
training includes one-time compilation), generated tokens/s per GPU, the sync's split,
the colocated turn's costs and the memory sleep freed; async step time against
max(generate, train) and against the sync run of the same setting. nvidia-smi is sampled
every 0.5 s for the peak memory per GPU and per process (trainer rank / vLLM engine,
told apart by Ray's process titles).

    python3 bench/gpu_loop.py --run colocate_1:sync --model qwen2-0.5b-shape --steps 5 --out $OUT/loop_colocate.json
    python3 bench/gpu_loop.py --run split_1_1:sync split_1_1:async --model qwen2-0.5b-shape --out $OUT/loop_split.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLACEMENT_GPUS = {"colocate_1": 1, "colocate_2": 2, "split_1_1": 2, "colocate_8": 8, "split_4_4": 8}
COMMON = ["rollout=gpu", "trainer=gpu", "data=arithmetic", "reward=builtin", "warmup.steps=0",
          "rollout.max_new_tokens=64", "rollout.max_model_len=256",
          "data.rollout_batch_size=256", "algorithm.group_size=16", "algorithm.dynamic_sampling=false",
          "algorithm.overlong=none", "model.dtype=bfloat16", "logger.backends=[console,jsonl]",
          "logger.samples_every=1", "guard.enabled=false"]  # a random model never earns a reward: no collapse to guard


class GpuSampler(threading.Thread):
    """Peak memory.used per GPU and per compute process (MiB), from nvidia-smi."""

    def __init__(self, period_s: float = 0.5):
        super().__init__(daemon=True)
        self.period_s = period_s
        self.per_gpu: dict[str, int] = {}
        self.per_pid: dict[int, dict] = {}
        self.stop = threading.Event()

    @staticmethod
    def _query(args: list[str]) -> list[list[str]]:
        try:
            out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    @staticmethod
    def _title(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            return "?"

    def run(self) -> None:
        while not self.stop.is_set():
            for idx, used in self._query(["--query-gpu=index,memory.used"]):
                self.per_gpu[idx] = max(self.per_gpu.get(idx, 0), int(float(used)))
            for pid, uuid, used in self._query(["--query-compute-apps=pid,gpu_uuid,used_memory"]):
                if not pid.isdigit() or not used.replace(".", "").isdigit():
                    continue
                entry = self.per_pid.setdefault(int(pid), {"gpu": uuid, "title": self._title(int(pid)), "peak_mib": 0})
                entry["peak_mib"] = max(entry["peak_mib"], int(float(used)))
            self.stop.wait(self.period_s)

    def per_actor(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pid, e in self.per_pid.items():
            title = e["title"]
            role = ("trainer" if "TrainerWorker" in title else "engine" if "RolloutEngine" in title
                    else "driver" if "launch.main" in title else "other")
            out[f"{role}:{pid}"] = e["peak_mib"]
        return out


def steady(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows[1:] if key in r] or [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else float("nan")


def summarize(rows: list[dict], gpus: int, mode: str) -> dict:
    keys = sorted({k for r in rows for k in r if k.startswith(("perf/", "train/colocate", "mismatch/"))})
    out = {"steps": len(rows), "step0": {k.split("/", 1)[1]: rows[0][k] for k in ("perf/generate_s", "perf/train_s",
                                                                                  "perf/sync_s", "perf/step_time_s")
                                         if rows and k in rows[0]}}
    out.update({k: steady(rows, k) for k in keys})
    out["tokens_per_s_per_gpu"] = steady(rows, "perf/tokens_per_s") / gpus
    ratios = [r["perf/step_time_s"] / max(r["perf/generate_s"], r["perf/train_s"]) for r in rows[1:]
              if max(r.get("perf/generate_s", 0), r.get("perf/train_s", 0)) > 0]
    out["step_over_max_gen_train"] = statistics.median(ratios) if ratios else float("nan")
    out["versions"] = [r.get("rollout/engine_version") for r in rows]
    out["staleness"] = [r.get("rollout/staleness_mean") for r in rows]
    return out


def run_one(spec: str, args, out_dir: Path) -> dict:
    placement, mode = spec.split(":")
    gpus = PLACEMENT_GPUS[placement]
    name = f"{placement}-{mode}-{args.model}"
    run_dir = out_dir / name
    overrides = [*COMMON, f"placement={placement}", f"mode={mode}", f"model.path=builtin:{args.model}",
                 f"steps={args.steps}", f"output_dir={run_dir}",
                 f"rollout.enforce_eager={'true' if args.eager else 'false'}", *args.override]
    cmd = [sys.executable, "-m", "launch.main", *overrides]
    print(f"### {name}: {' '.join(cmd)}", flush=True)
    sampler = GpuSampler()
    sampler.start()
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    log_path = out_dir / f"{name}.log"
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=args.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join(timeout=5)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    result = {"run": name, "placement": placement, "mode": mode, "model": args.model, "gpus": gpus, "rc": rc,
              "wall_s": wall, "command": " ".join(cmd), "peak_gpu_mib": sampler.per_gpu,
              "peak_process_mib": sampler.per_actor(), **summarize(rows, gpus, mode)}
    if rc != 0:
        result["log_tail"] = log_path.read_text()[-3000:]
    print(json.dumps(result, default=str), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", required=True, help="PLACEMENT:MODE, e.g. colocate_1:sync split_1_1:async")
    ap.add_argument("--model", default="qwen2-0.5b-shape")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--eager", action="store_true", help="rollout.enforce_eager=true (faster start, slower decode)")
    ap.add_argument("--timeout-s", type=float, default=400)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    ap.add_argument("--work", default="/tmp/cispo-loop-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_dir = Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [run_one(spec, args, out_dir) for spec in args.run]
    by = {(r["placement"], r["mode"]): r for r in results}
    for r in results:
        sync = by.get((r["placement"], "sync"))
        if r["mode"] == "async" and sync and "perf/step_time_s" in r and "perf/step_time_s" in sync:
            r["async_over_sync_step"] = r["perf/step_time_s"] / sync["perf/step_time_s"]  # a run cut short has no steps

    cols = ["generate_s", "reward_s", "train_s", "sync_s", "idle_s", "step_time_s"]
    print(f"\n{'run':<34} {'rc':>4} " + " ".join(f"{c[:-2]:>9}" for c in cols) +
          f" {'tok/s/GPU':>9} {'step/max(g,t)':>13}  peak MiB (per GPU; per process)")
    for r in results:
        vals = " ".join(f"{r.get('perf/' + c, float('nan')):>9.3f}" for c in cols)
        print(f"{r['run']:<34} {str(r['rc']):>4} {vals} {r['tokens_per_s_per_gpu']:>9.0f} "
              f"{r['step_over_max_gen_train']:>13.2f}  {r['peak_gpu_mib']}; {r['peak_process_mib']}")
    if args.out:
        device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True).stdout.strip().splitlines()
        doc = {"device": device, "command": " ".join([sys.executable, *sys.argv]),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
