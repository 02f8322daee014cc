"""Checkpoint helpers: tags, RNG state, pruning, Hugging Face export.

Full training state goes through DeepSpeed's save_checkpoint/load_checkpoint (weights,
optimizer, LR scheduler, its step counters; sharded under ZeRO) plus, per rank, the
RNG states (DeepSpeed keeps none) and our own step counter in `client_state`.
The HF export is separate: a plain folder `transformers` and vLLM load.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import torch

_TAG = re.compile(r"^step_(\d+)$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def list_tags(root: str | Path) -> list[str]:
    """Complete checkpoints under `root`, oldest first (by step number)."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and (p / "trainer_done").exists()]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def mark_complete(root: str | Path, tag: str) -> None:
    """Written last, by rank 0 after every rank saved: a crash mid-save leaves no marker."""
    (Path(root) / tag / "trainer_done").write_text("ok\n")


def prune(root: str | Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0: keep all)."""
    if keep <= 0:
        return []
    old = list_tags(root)[:-keep]
    for tag in old:
        shutil.rmtree(Path(root) / tag, ignore_errors=True)
    return old


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_path(root: str | Path, tag: str, rank: int) -> Path:
    return Path(root) / tag / f"rng_rank{rank}.pt"


def write_hf_folder(hf_model, state_dict: dict[str, torch.Tensor], source_path: str, out: str | Path) -> Path:
    """safetensors + config.json (+ generation config) + the source model's tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in state_dict.values()}
    if len(dtypes) == 1:
        hf_model.config.dtype = next(iter(dtypes))
    hf_model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source_path).save_pretrained(out)
    except Exception as e:  # a model folder without a tokenizer still exports
        (out / "TOKENIZER_MISSING").write_text(f"tokenizer not copied from {source_path}: {e}\n")
    return out
