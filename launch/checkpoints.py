"""Checkpoint folders of a run: step_N/, written under a temporary name and renamed when
complete, so a run killed mid-save never resumes from half a checkpoint."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_STEP = re.compile(r"^step_(\d+)$")


class CheckpointDir:
    def __init__(self, root: Path, keep: int = 2):
        self.root = Path(root)
        self.keep = max(int(keep), 1)

    def completed(self) -> list[tuple[int, Path]]:
        if not self.root.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.completed()
        return done[-1][1] if done else None

    def begin(self, step: int) -> Path:
        tmp = self.root / f".step_{step}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path) -> Path:
        step = int(tmp.name.split("_")[1].split(".")[0])
        final = self.root / f"step_{step}"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in self.completed()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final
