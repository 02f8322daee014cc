"""Every command in README.md and docs/ is accounted for: run by a CPU test (named here,
and the test must exist) or listed as a GPU command; and every `cispo-train` /
`cispo-eval` command composes and validates as written, so a documented command never
fails at start-up. A new command in the docs fails this test until it is given a test."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(cispo-train|cispo-eval|cispo-export|make train|make test)\b")

# command (as written, comment stripped) -> the test that runs it on CPU, or "gpu: ..."
CPU_E2E = "tests/launch/test_loop_e2e.py::test_sync_loop_logs_checkpoints_and_advances_engine_versions"
FIRST_DAY = "tests/launch/test_first_day.py::"
MINIMAX = "tests/launch/test_minimax_loop.py::test_minimax_tiny_trains_with_routing_replay"
SLURM = "tests/slurm/test_cispo_train_slurm.py::test_requeued_cispo_train_job_resumes_from_its_checkpoint"
COVERED = {
    "make train": CPU_E2E,
    "make test": "CI: .ci/run runs it",
    "cispo-train": CPU_E2E,
    "cispo-train algorithm=grpo": FIRST_DAY + "test_lora_with_the_staged_generation_budget",
    "cispo-train model=hf model.path=/models/Qwen2.5-1.5B data=jsonl data.path=/data/math.jsonl reward=math":
        FIRST_DAY + "test_readme_own_model_command_trains_evaluates_and_exports",
    "cispo-train rollout=gpu trainer=gpu placement=colocate_1":
        "gpu: bench/gpu_session.sh stage colocate (bench/gpu_loop.py --run colocate_1:sync); tests/gpu/test_colocate.py",
    "cispo-train rollout=gpu trainer=gpu placement=split_4_4":
        "gpu: not recorded yet (its bundles and fit check: tests/launch/test_placement.py)",
    "cispo-train rollout=gpu trainer=gpu placement=colocate_1 model=hf model.path=/models/qwen2-1.5b":
        "gpu: bench/gpu_session.sh stage colocate15 (the Qwen2-1.5B shape, random init)",
    "cispo-train rollout=gpu trainer=gpu placement=split_1_1 mode=async model=hf model.path=/models/qwen2-0.5b":
        "gpu: bench/gpu_session.sh stage split (the Qwen2-0.5B shape, random init); tests/gpu/test_split.py",
    # MiniMax hybrid (docs/minimax.md): the loop test runs all three settings at once
    "cispo-train model=minimax_tiny": MINIMAX,
    "cispo-train model=minimax_tiny rollout.record_routing=true trainer.routing_replay=true": MINIMAX,
    "cispo-train model=minimax_tiny rollout.record_routing=true trainer.routing_replay=true "
    "trainer.moe_aux_loss_coef=0.01": MINIMAX,
    "cispo-train model=hf model.path=/models/minimax ...":
        "gpu: not recorded yet (a real MiniMax-M1 folder; the model class: tests/rollout/test_minimax_vllm.py)",
    "cispo-train --cfg job": "tests/launch/test_documented_commands.py::test_cfg_job_prints_the_resolved_config",
    "RAY_ADDRESS=head:6379 cispo-train": SLURM,  # the job's driver attaches to the job's Ray cluster
    "cispo-train cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 cluster.partition=gpu": SLURM,
    "cispo-train eval.every=10 eval.path=/data/math_test.jsonl":
        FIRST_DAY + "test_readme_own_model_command_trains_evaluates_and_exports",
    "cispo-eval model.path=runs/my_run/hf_model data=jsonl data.path=/data/math.jsonl "
    "eval.path=/data/math_test.jsonl reward=math": FIRST_DAY + "test_cispo_eval_on_the_export_matches_the_final_in_training_eval",
    "cispo-export runs/my_run": FIRST_DAY + "test_cispo_export_of_the_checkpoint_equals_the_end_of_run_export",
    "cispo-train model=hf model.path=/models/Qwen2.5-1.5B data=jsonl data.path=/data/math.jsonl reward=math "
    "model.lora.rank=16": FIRST_DAY + "test_lora_with_the_staged_generation_budget",
    "cispo-train model=hf model.path=/models/Qwen2.5-7B data=jsonl data.path=/data/math.jsonl reward=math "
    "rollout=gpu trainer=gpu placement=split_4_4 rollout.max_new_tokens=81920 rollout.max_model_len=83968 "
    "trainer.micro_batch_tokens=98304 rollout.length_schedule.stages=[40960,49152,57344,65536,73728,81920]":
        "gpu: not recorded yet (the schedule itself: " + FIRST_DAY + "test_lora_with_the_staged_generation_budget)",
    "cispo-train cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 cluster.cpus_per_node=64 "
    "cluster.partition=gpu cluster.time_minutes=240 model=hf model.path=/models/Qwen2.5-7B data=jsonl "
    "data.path=/shared/data/math.jsonl reward=math rollout=gpu trainer=gpu placement.rollout_gpus=16 "
    "placement.trainer_gpus=16 output_dir=/shared/runs/qwen7b-cispo":
        "gpu: not recorded yet (rendered: test_slurm_docs_command_renders_a_job_script; Slurm itself: " + SLURM + ")",
    "cispo-train cluster=slurm ... cluster.dry_run=true": "tests/slurm/test_slurm_script.py",
    "cispo-train cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 cluster.cpus_per_node=64 cluster.partition=gpu "
    "cluster.time_minutes=240 model=hf model.path=/models/Qwen2.5-7B data=jsonl data.path=/shared/data/math.jsonl "
    "reward=math rollout=gpu trainer=gpu placement.rollout_gpus=16 placement.trainer_gpus=16 steps=500 "
    "output_dir=/tmp/cispo-dry/qwen7b-cispo cluster.dry_run=true":
        "the dry run itself: tests/slurm/make_dry_run_doc.py printed docs/slurm_dry_run_4x8.md",
}


def documented_commands() -> list[str]:
    """Commands in fenced or indented code blocks, continuation lines joined, comments cut."""
    found = []
    for doc in DOCS:
        lines, fenced = [], False
        for line in doc.read_text().splitlines():
            if line.strip().startswith("```"):
                fenced = not fenced
                continue
            if fenced or line.startswith("    "):
                lines.append(line.strip())
        joined = "\n".join(lines).replace("\\\n", " ")
        for cmd in joined.splitlines():
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()
            if ENTRY.match(cmd):
                found.append(" ".join(cmd.split()))
    return found


def test_every_documented_command_has_a_test_or_a_gpu_mark():
    docs = documented_commands()
    assert len(docs) >= 10, docs
    missing = sorted(set(docs) - set(COVERED))
    assert not missing, f"documented commands without a test or GPU mark: {missing}"
    for cmd, how in COVERED.items():
        if "::" in how and not how.startswith("gpu"):
            path, name = how.split("::")
            assert f"def {name}(" in (REPO / path).read_text(), f"{cmd!r}: {how} does not exist"


@pytest.mark.parametrize("cmd", sorted({c for c in COVERED if c.split()[0] in ("cispo-train", "cispo-eval")
                                        and "..." not in c and "--cfg" not in c}))
def test_documented_command_composes_and_validates(cmd):
    from launch.config import compose_config

    overrides = shlex.split(cmd)[1:]
    cfg = compose_config(overrides)
    if "model=hf" in overrides or "data=jsonl" in overrides:
        assert cfg.warmup.steps == 0  # the built-in format warm-start turns itself off
        assert cfg.rollout.max_model_len >= cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens


def test_slurm_docs_command_renders_a_job_script(tmp_path, monkeypatch):
    from launch.config import compose_config
    from launch.slurm import render_script

    cmd = next(c for c in COVERED if c.startswith("cispo-train cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 "
                                                   "cluster.cpus_per_node"))
    overrides = [o.replace("/shared/runs", str(tmp_path)) for o in shlex.split(cmd)[1:]]
    cfg = compose_config(overrides)
    assert cfg.warmup.steps == 0 and cfg.data.path == "/shared/data/math.jsonl"
    script = render_script(cfg, overrides)
    assert "#SBATCH --nodes=4" in script and "data=jsonl" in script and "warmup" not in script


def test_cfg_job_prints_the_resolved_config():
    proc = subprocess.run([sys.executable, "-m", "launch.main", "--cfg", "job"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "algorithm:" in proc.stdout and "length_schedule:" in proc.stdout and "eval:" in proc.stdout


def test_own_model_with_a_setting_that_cannot_work_names_the_key():
    from cispo.config import ConfigError
    from launch.config import compose_config

    with pytest.raises(ConfigError, match="warmup.steps.*set warmup.steps=0"):
        compose_config(["model=hf", "model.path=/m", "data=jsonl", "data.path=/d.jsonl", "warmup.steps=10"])
    with pytest.raises(ConfigError, match="rollout.max_model_len.*raise rollout.max_model_len"):
        compose_config(["model=hf", "model.path=/m", "data=jsonl", "data.path=/d.jsonl", "rollout.max_model_len=64"])
