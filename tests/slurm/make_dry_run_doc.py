"""Regenerate docs/slurm_dry_run_4x8.md from the current template (no Slurm needed):

    .venv/bin/python tests/slurm/make_dry_run_doc.py
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CMD = ("cispo-train cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 cluster.cpus_per_node=64 "
       "cluster.partition=gpu cluster.time_minutes=240 model=hf model.path=/models/Qwen2.5-7B data=jsonl "
       "data.path=/shared/data/math.jsonl reward=math rollout=gpu trainer=gpu "
       "placement.rollout_gpus=16 placement.trainer_gpus=16 steps=500 output_dir=/tmp/cispo-dry/qwen7b-cispo cluster.dry_run=true")
HEAD = "# Dry run: 4 nodes × 8 GPUs\n\nProduced on 2026-11-30 from the checkout, installed in the venv (so the job runs the venv's\n`cispo-train`; a checkout that is not installed gets `python -m launch.main` with\n`PYTHONPATH` set instead), working folder `/work/main`:\n\n    {{cmd}}\n\nThe script below is printed verbatim (the last line is the dry-run note); it is also\nsaved as `<output_dir>/slurm_job.sh`, so `sbatch` on that file submits it unchanged.\n`docs/slurm_launch.md` explains the design.\n\n## Review\n\n`#SBATCH` resources:\n\n| line | why |\n|---|---|\n| `--nodes=4` | `cluster.nodes` |\n| `--ntasks-per-node=1` | one Ray node per host; Ray places the GPU actors itself |\n| `--cpus-per-task=64` | `cluster.cpus_per_node`; becomes `ray start --num-cpus` and the sruns' `--cpus-per-task` |\n| `--gpus-per-node=8` | `cluster.gpus_per_node`; becomes `ray start --num-gpus` (from `SLURM_GPUS_PER_NODE`, a type prefix like `h100:8` stripped) |\n| `--partition=gpu` | `cluster.partition` (omitted when null) |\n| `--time=4:00:00` | `cluster.time_minutes=240` (`D-HH:MM:SS` past a day) |\n| `--exclusive`, `--mem=0` | GPU runs take whole nodes and all their memory (vLLM and DeepSpeed offload use host memory); CPU runs (`gpus_per_node=0`) get neither. A `cluster.exclusive` field would make this a choice (see the report) |\n| `--requeue` | Slurm may requeue it (preemption, node failure, `scontrol requeue`, the script's own requeue) |\n| `--signal=B:USR1@300` | SIGUSR1 to the batch shell only, 300 s before the limit: the driver checkpoints while Ray is still up, then the script requeues |\n| `--open-mode=append` | a requeued attempt appends to the same `slurm-<job>.out` instead of truncating it |\n| `--output=.../logs/slurm-%j.out` | the batch script and the driver; `logs/` is created at submission (Slurm does not create it) |\n| `--chdir=/work/main` | the submitting folder, so relative paths in overrides resolve the same |\n\nRay start-up lines (checked against a real 2-node allocation under the test Slurm:\n`tests/slurm/test_slurm_job.py::test_two_node_ray_cluster`):\n\n- head: `srun --nodes=1 --ntasks=1 --overlap --cpus-per-task=64 --gpus-per-node=8 -w $HEAD_NODE ray start --head --node-ip-address=$HEAD_IP --port=$RAY_PORT --include-dashboard=false --ray-client-server-port=... --temp-dir=/tmp/cispo_ray_<job>_<attempt>_<node> --block --num-cpus=64 --num-gpus=8 --node-manager-port ... --object-manager-port ... --min/max-worker-port ... --dashboard-agent-* ... --metrics-export-port ... --runtime-env-agent-port ...`\n- workers (3 here): the same srun on each other node, `ray start --address=$HEAD_IP:$RAY_PORT` with the same per-node arguments;\n- then at most 300 s for all 4 nodes to be alive in Ray, else the job fails with the count and the log folder.\n- driver: `cispo-train cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 cluster.cpus_per_node=64 cluster.partition=gpu cluster.time_minutes=240 model=hf model.path=/models/Qwen2.5-7B data=jsonl data.path=/shared/data/math.jsonl reward=math rollout=gpu trainer=gpu steps=500 cluster.kind=local cluster.address='<head>:<port>' output_dir='/tmp/cispo-dry/qwen7b-cispo'` (`cluster.dry_run=true` and the relative `output_dir` of the command line are dropped).\n\nNot checked here (no GPU Slurm in reach): GPU gres binding of the overlapping Ray steps on\na real GPU cluster, and which interface `HEAD_IP` picks on hosts with several networks\n(`CISPO_RAY_HEAD_IP` overrides it). Note also the run's placement: `placement.rollout_gpus=16 placement.trainer_gpus=16` (16 vLLM\nengines and 16 trainer ranks, split): validation checks its 32 GPUs against `cluster.nodes` ×\n`cluster.gpus_per_node` before anything is submitted, and the driver checks it against the GPUs\nRay reports per node before any actor starts (launch/placement.py).\n\n## The script\n"


def main() -> None:
    shutil.rmtree("/tmp/cispo-dry", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "launch.main", *CMD.split()[1:]], capture_output=True, text=True,
                       env=env, cwd=REPO, check=True)
    shutil.rmtree("/tmp/cispo-dry", ignore_errors=True)
    (REPO / "docs" / "slurm_dry_run_4x8.md").write_text(HEAD.replace("{{cmd}}", CMD) + "\n```bash\n" + r.stdout + "```\n")


if __name__ == "__main__":
    main()
