"""An optional supervised warm-start on the task's *format*, a logged stage of the run.

A randomly initialised model never emits a well-formed answer, so RL would see only
zero rewards. The warm-start teaches the shape of an answer (what a completion looks
like and that it ends with EOS) on examples whose answers are drawn at random, not
computed: the model learns to answer, not the answer. RL then has to learn the task.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("cispo")


def warm_start(
    model_path: str,
    examples: list[tuple[str, str]],
    out_dir: Path,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> str:
    """Fine-tune on (prompt, completion) pairs, loss on completion tokens only; returns
    the folder of the warmed model (reused as is when a previous run already wrote it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = out_dir / "warmup_model"
    if (target / "config.json").exists():
        log.info("warm-start: reusing %s", target)
        return str(target)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    encoded = []
    for prompt, completion in examples:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        encoded.append((p, c))
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
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step:
            on_step(step, float(loss))
    tmp = out_dir / "warmup_model.tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return str(target)
