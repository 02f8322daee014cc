"""A stand-in for `cispo-train` inside the Slurm job: it follows the driver's contract
(docs/slurm_launch.md) in a second instead of minutes, so the job script's own logic —
Ray start-up, signal forwarding, the self-requeue after the time-limit warning, resume —
is tested quickly. Takes Hydra-style `key=value` arguments like the real app.

Contract followed: attach to Ray at cluster.address; one line per step in
<output_dir>/metrics.jsonl; a checkpoint folder checkpoints/step_N after each step; with
resume=true start after the latest checkpoint and log `resumed from checkpoint step N`;
on SIGTERM finish/save the current step, exit 143.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
out = Path(args["output_dir"].strip("'"))
steps = int(args.get("steps", 3))
step_s = float(os.environ.get("STAND_IN_STEP_S", "1"))
stop = False


def on_term(signum, frame):
    global stop
    stop = True  # idempotent: a second SIGTERM changes nothing


import ray  # noqa: E402

ray.init(address=args["cluster.address"].strip("'"), logging_level="ERROR", log_to_driver=False)
# After ray.init: Ray's core worker installs its own SIGTERM handler (it logs
# "*** SIGTERM received ***" and exits 15); installing ours afterwards replaces it.
signal.signal(signal.SIGTERM, on_term)
print("stand-in driver attached; nodes:", len([n for n in ray.nodes() if n["Alive"]]), flush=True)
(out / "argv.jsonl").open("a").write(json.dumps(sys.argv[1:]) + "\n")

start = 0
ckpts = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
if args.get("resume", "true") == "true" and ckpts:
    start = ckpts[-1]
    print(f"resumed from checkpoint step {start}", flush=True)
for step in range(start + 1, steps + 1):
    time.sleep(step_s)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "attempt": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
    (out / "checkpoints" / f"step_{step}").mkdir(parents=True, exist_ok=True)
    if stop:
        print(f"SIGTERM: saved checkpoint step {step}, exiting 143", flush=True)
        sys.exit(143)
print("done", flush=True)
