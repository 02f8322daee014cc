"""The reasoning recipe (`+experiment=long_addition`) at toy size, for real: the project's
model pretrained on worked solutions, then RL with several policy updates per rollout
batch, so the importance ratios leave 1 and the clipping acts."""

import json
import os
import subprocess
import sys
from pathlib import Path

from launch.tasks import get_task

REPO = Path(__file__).resolve().parents[2]


def test_worked_solutions_are_long_and_verified():
    task = get_task("long_addition")
    for row in task.generate(20, 5, seed=0):
        sol = task.solution(row["prompt"], row["answer"])
        assert task.verify(sol, row["answer"]) == 1.0
        assert len(sol) >= 9 * 5  # one "a+b+c=ss;" step per digit: tens of tokens
        a, b = row["prompt"][:-1].split("+")
        assert int(row["answer"]) == int(a) + int(b)
        # every column's written sum is right (a wrong carry would show here)
        carry = 0
        for (x, y), step in zip(zip(reversed(a), reversed(b)), sol.split(";")[:-1]):
            assert step == f"{x}+{y}+{carry}={int(x) + int(y) + carry:02d}"
            carry = (int(x) + int(y) + carry) // 10


def test_recipe_pretrains_then_takes_several_updates_per_batch(tmp_path):
    out = tmp_path / "recipe"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CISPO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "launch.main", "+experiment=long_addition", f"output_dir={out}",
           "model.path=builtin:tiny-qwen2", "data.difficulty=2", "data.rollout_batch_size=32", "algorithm.group_size=4",
           "trainer.mini_batch_size=8", "trainer.warmup_steps=1", "warmup.steps=300", "warmup.target_pass_rate=0.25", "warmup.check_every=50",
           "warmup.check_prompts=32", "warmup.examples=2000", "steps=2", "logger.backends=[console,jsonl]",
           "rollout.enforce_eager=true"]  # no vLLM compile at start-up (tests/launch/test_loop_e2e.py SMALL)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        print(proc.stdout[-5000:], proc.stderr[-30000:])
    assert proc.returncode == 0
    warm = [json.loads(line) for line in (out / "warmup.jsonl").read_text().splitlines()]
    checks = [(w["warmup_step"], w["warmup/pass_rate"]) for w in warm if "warmup/pass_rate" in w]
    print("warm-start pass rate checks:", checks)
    assert [step for step, _ in checks] == [49 + 50 * i for i in range(len(checks))]  # on schedule
    assert checks[-1][1] >= 0.25 and all(rate < 0.25 for _, rate in checks[:-1])  # stopped at the target
    assert (out / "warmup_model").is_symlink()  # the cached pretrained model, shared by runs of this seed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["train/updates"] >= 2  # 4 when dynamic sampling filled the batch (mini-batches of 8 samples)
        assert r["rollout/response_len_mean"] > 10  # worked steps, not a one-token answer
        assert r["train/is_weight_max"] > 1.0  # updates 2-4 of a batch are off-policy
        assert 0.0 <= r["train/clip_frac_high"] <= 1.0 and r["train/grad_dropped_frac"] == 0.0  # CISPO drops none
