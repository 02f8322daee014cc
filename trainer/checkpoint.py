"""Checkpoints: the folders (`CheckpointDir`), RNG state, Hugging Face export.

Full training state goes through DeepSpeed's save_checkpoint/load_checkpoint (weights,
optimizer, LR scheduler, its step counters; sharded under ZeRO) plus, per rank, the
RNG states (DeepSpeed keeps none) and our own step counter in `client_state`, all in one
checkpoint folder. The HF export is separate: a plain folder `transformers` and vLLM load.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d+)$")


class CheckpointDir:
    """The one truth about what is resumable: `root/step_XXXXXXXX/` (XXXXXXXX = steps done).

    A checkpoint is written into `root/.step_XXXXXXXX.partial/` — the trainer ranks' state
    (DeepSpeed shards, RNG), and whatever the driver adds (its data position) — and only
    `commit` renames it to its final name. Rename is atomic, so a folder with the final
    name is complete, and a run killed mid-save (or mid-prune: old folders are renamed
    away before they are deleted) never resumes from half a checkpoint. The same class
    serves the trainer group on its own and the driver's checkpoints of the whole loop.
    """

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = int(keep)  # <= 0: keep all

    @staticmethod
    def name(step: int) -> str:
        return f"step_{int(step):08d}"

    def completed(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.completed()
        return done[-1][1] if done else None

    def begin(self, step: int) -> Path:
        """An empty folder to write step `step`'s checkpoint into (a leftover of an
        interrupted save of the same step is cleared)."""
        tmp = self.root / f".{self.name(step)}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path) -> Path:
        """Publish a folder from `begin` under its final name; prune to the newest `keep`."""
        final = self.root / tmp.name[1:-len(".partial")]
        if final.exists():
            self._remove(final)
        tmp.rename(final)
        self.prune()
        return final

    def prune(self) -> list[int]:
        """Delete all but the newest `keep` checkpoints (and deletes an earlier run cut short)."""
        for leftover in self.root.glob(".step_*.deleting"):
            shutil.rmtree(leftover, ignore_errors=True)
        if self.keep <= 0:
            return []
        old = self.completed()[: -self.keep]
        for _, path in old:
            self._remove(path)
        return [step for step, _ in old]

    def _remove(self, path: Path) -> None:
        doomed = path.with_name(f".{path.name}.deleting")
        if doomed.exists():  # left by a delete that was cut short
            shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)  # no longer a checkpoint, even if the delete below is cut short
        shutil.rmtree(doomed, ignore_errors=True)


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


def rng_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rng_rank{rank}.pt"


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
