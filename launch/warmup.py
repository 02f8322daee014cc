"""An optional supervised warm-start on a built-in task, a logged stage of the run.

Two modes (`warmup.mode`):

- `format`: a randomly initialised model never emits a well-formed answer, so RL would
  see only zero rewards. This teaches the shape of an answer (what a completion looks
  like and that it ends with EOS) on examples whose answers are drawn at random, not
  computed: the model learns to answer, not the answer. RL then has to learn the task.
- `solve`: pretraining on the task's correct (worked) solutions, stopped as soon as the
  sampled pass rate on held-out prompts reaches `warmup.target_pass_rate` — the project's
  own small model, part-way to solving a reasoning task, for RL to take further.

With `warmup.cache` the warmed model is kept under `$CISPO_CACHE/warm/<key>` (the key
hashes everything that shapes it, seed included), so runs that differ only in what
comes after — the algorithm, say — start from the very same weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Callable

import torch

from launch.tasks import Task

log = logging.getLogger("cispo")


def warm_start(
    model_path: str,
    examples: list[tuple[str, str]],
    target: Path,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[torch.nn.Module, object, int], bool] | None = None,
    check_every: int = 25,
) -> str:
    """Fine-tune on (prompt, completion) pairs, loss on completion tokens only, into the
    folder `target` (reused as is when it already holds a model). `should_stop(model,
    tokenizer, step)` is asked every `check_every` steps and ends the training when true."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        log.info("warm-start: reusing %s", target)
        return str(target)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # one thread: the same sums on any machine (the warmed model, and so the run, repeats
        # exactly), and no spinning OpenMP threads fighting for cores with the rest of the run
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    prompts = tok([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    completions = tok([c for _, c in examples], add_special_tokens=False)["input_ids"]
    encoded = list(zip(prompts, completions))
    for step in range(steps):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            seq = p + c
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(c)
            attn[i, : len(seq)] = 1
        loss = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step:
            on_step(step, float(loss))
        if should_stop and (step + 1) % check_every == 0 and should_stop(model, tok, step):
            log.info("warm-start: stopping after %d of %d steps", step + 1, steps)
            break
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    model.to("cpu").save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the engines about to start measure the GPU's free memory
    return str(target)


@torch.no_grad()
def sampled_pass_rate(model, tok, task: Task, rows: list[dict], temperature: float, max_new_tokens: int) -> float:
    """The fraction of `rows` a sample at `temperature` (full vocabulary, as the engines
    sample in RL) solves, by the task's own verifier."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    width = max(len(p) for p in prompts)
    # left-padded so every row's continuation starts at the same column
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                         temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    solved = sum(task.verify(tok.decode(o[width:], skip_special_tokens=True), r["answer"]) for o, r in zip(out, rows))
    if was_training:
        model.train()
    return solved / len(rows)


def cache_key(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CacheLock:
    """An exclusive file lock: concurrent runs with the same key warm up once, the others wait."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")

    def __enter__(self):
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
