"""Prompt datasets: files through Hugging Face `datasets` (imported only for files), or a
built-in task.

``data.path`` is one of
- ``builtin:<task>`` — a pool of `builtin_size` rows of `launch.tasks` at ``data.difficulty``;
- a ``.jsonl`` / ``.json`` file — ``load_dataset("json", data_files=...)``;
- a ``.parquet`` file — ``load_dataset("parquet", data_files=...)``;
- a folder written by ``Dataset.save_to_disk`` — ``load_from_disk`` (a DatasetDict must
  have a "train" split or exactly one split).

Each row needs ``data.prompt_field`` (a non-empty string; with
``data.apply_chat_template`` also a list of ``{"role", "content"}`` messages) and
``data.answer_field`` (any scalar, turned into a string; set ``answer_field`` to ""
for datasets without answers). All other fields go to the item's metadata (e.g.
``tests`` for the code reward). A malformed row raises `DataError` naming the row
(0-based) and the field. Prompts longer than ``data.max_prompt_tokens`` after the chat
template are dropped; the count is in ``num_dropped`` and logged.

`PromptDataset.next_batch(n)` walks the rows in an order reshuffled every epoch from
(seed, epoch), wrapping into the next epoch mid-batch if needed; `state_dict()` /
`load_state_dict()` carry (epoch, position) so a resumed run continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

log = logging.getLogger("cispo.data")

BUILTIN_POOL_SIZE = 4096
_CHUNK = 1024


class DataError(ValueError):
    """A dataset that cannot be used; the message names the source, row and field."""


@dataclass
class PromptItem:
    prompt_text: str  # what the model sees (chat template applied when configured)
    prompt_ids: list[int]
    answer: Optional[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # the row's index in the source dataset


def _data_path(cfg: Any) -> str:
    path = getattr(cfg, "path", None) or getattr(cfg, "source", None)
    if not path:
        raise DataError("data.path is empty; give builtin:<task>, a .jsonl/.parquet file or a datasets folder")
    return str(path)


class BuiltinRows:
    """A built-in task's rows, read the way `PromptDataset` reads a `datasets.Dataset`
    (column names, a row by index, a column-wise slice), so built-in tasks run without
    importing `datasets` (heavy, and absent from some GPU images)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows
        self.column_names = list(dict.fromkeys(k for r in rows for k in r))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return {c: [r.get(c) for r in self.rows[key]] for c in self.column_names}
        return {c: self.rows[key].get(c) for c in self.column_names}


def load_rows(path: str, difficulty: int = 1, seed: int = 0, builtin_size: int = BUILTIN_POOL_SIZE,
              cache_dir: Optional[str] = None, split: str = "train"):
    """The raw rows of `path`: a `datasets.Dataset` for files and folders, `BuiltinRows`
    for a built-in task (`split` picks its independent stream of rows, e.g. "eval" for
    held-out prompts; files have one)."""
    if path.startswith("builtin:"):
        from launch.tasks import get_task

        try:
            task = get_task(path)
        except ValueError as e:
            raise DataError(f"data.path={path!r}: {e}") from None
        rows = task.generate(builtin_size, difficulty, seed=seed, split=split)
        return BuiltinRows([{"prompt": r["prompt"], "answer": r["answer"], **r["metadata"]} for r in rows])

    import datasets

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path!r} does not exist")
    if p.is_dir():
        if not any((p / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
            raise DataError(f"data.path={path!r} is a folder but not one written by datasets' save_to_disk")
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise DataError(f"data.path={path!r} holds splits {list(ds)}; expected 'train' or a single split")
        return ds

    suffix = "".join(p.suffixes[-2:]) if p.suffix in (".gz", ".bz2", ".xz", ".zst") else p.suffix
    if suffix.startswith(".jsonl") or suffix.startswith(".json"):
        builder = "json"
    elif suffix.startswith(".parquet"):
        builder = "parquet"
    else:
        raise DataError(f"data.path={path!r}: unknown file type {p.suffix!r}; use .jsonl, .json or .parquet")
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - turned into a precise error where we can
        if builder == "json":
            _find_bad_json_line(p)
        raise DataError(f"data.path={path!r}: cannot load as {builder}: {type(e).__name__}: {e}") from e


def _find_bad_json_line(p: Path) -> None:
    """Raise a DataError naming the first line of a jsonl file that is not a JSON object."""
    if p.suffix != ".jsonl":
        return
    with open(p, encoding="utf-8") as f:
        for row, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: row {row} (line {row + 1}) is not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}: row {row} (line {row + 1}) is a JSON {type(obj).__name__}, expected an object")


def _answer_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


class PromptDataset:
    """Prompts of one source, tokenized and length-filtered, served in shuffled epochs.

    `tokenizer` is a Hugging Face tokenizer or a model folder to load one from.
    """

    def __init__(self, cfg: Any, tokenizer: Any, seed: int = 0, *, builtin_size: int = BUILTIN_POOL_SIZE,
                 cache_dir: Optional[str] = None, split: str = "train"):
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tokenizer = tokenizer
        self.source = _data_path(cfg)
        self.prompt_field = cfg.prompt_field
        self.answer_field = cfg.answer_field or None
        self.apply_chat_template = bool(cfg.apply_chat_template)
        self.max_prompt_tokens = int(cfg.max_prompt_tokens)
        self.shuffle = bool(cfg.shuffle)
        self.seed = int(seed)
        if self.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise DataError("data.apply_chat_template is true but the tokenizer has no chat template")

        self._rows = load_rows(self.source, int(getattr(cfg, "difficulty", 1)), self.seed, builtin_size, cache_dir,
                               split)
        columns = list(self._rows.column_names)
        for name, role in ((self.prompt_field, "prompt_field"), (self.answer_field, "answer_field")):
            if name is not None and name not in columns:
                raise DataError(
                    f"{self.source}: row 0: missing field {name!r} (data.{role}); the rows have fields {columns}"
                )
        self._meta_fields = [c for c in columns if c not in (self.prompt_field, self.answer_field)]
        self.num_total = len(self._rows)
        kept = self._validate_and_filter()
        self.num_dropped = self.num_total - len(kept)
        if self.num_dropped:
            log.warning("%s: dropped %d of %d prompts longer than data.max_prompt_tokens=%d",
                        self.source, self.num_dropped, self.num_total, self.max_prompt_tokens)
        if not kept:
            raise DataError(f"{self.source}: no usable prompts ({self.num_total} rows, {self.num_dropped} too long "
                            f"for data.max_prompt_tokens={self.max_prompt_tokens})")
        self._kept = np.asarray(kept, dtype=np.int64)
        self.epoch = 0
        self.position = 0
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1
        self._lock = threading.Lock()
        log.info("%s: %d prompts", self.source, len(self._kept))

    # ------------------------------------------------------------------ rows

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def num_rows(self) -> int:
        return len(self._kept)

    def render(self, prompt: Any) -> str:
        """The prompt text the model sees (through the chat template when configured)."""
        if self.apply_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def encode(self, texts: list[str]) -> list[list[int]]:
        # A chat template writes its own special tokens; raw prompts get the tokenizer's usual ones.
        return self.tokenizer(texts, add_special_tokens=not self.apply_chat_template)["input_ids"]

    def _check_prompt(self, row: int, value: Any) -> None:
        f = self.prompt_field
        if value is None:
            raise DataError(f"{self.source}: row {row}: field {f!r} is missing (null)")
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"{self.source}: row {row}: field {f!r} is empty")
            return
        if self.apply_chat_template and isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        ):
            return
        kind = "a string or a list of {role, content} messages" if self.apply_chat_template else "a string"
        raise DataError(f"{self.source}: row {row}: field {f!r} must be {kind}, got {type(value).__name__} "
                        f"{str(value)[:60]!r}")

    def _validate_and_filter(self) -> list[int]:
        kept: list[int] = []
        for start in range(0, self.num_total, _CHUNK):
            chunk = self._rows[start : start + _CHUNK]
            prompts = chunk[self.prompt_field]
            for k, value in enumerate(prompts):
                self._check_prompt(start + k, value)
            if self.answer_field is not None:
                for k, value in enumerate(chunk[self.answer_field]):
                    if value is None:
                        raise DataError(f"{self.source}: row {start + k}: field {self.answer_field!r} is missing "
                                        f"(null); set data.answer_field='' for a dataset without answers")
            lengths = [len(ids) for ids in self.encode([self.render(p) for p in prompts])]
            kept.extend(start + k for k, n in enumerate(lengths) if n <= self.max_prompt_tokens)
        return kept

    def _items(self, rows: list[int]) -> list[PromptItem]:
        records = [self._rows[int(i)] for i in rows]
        texts = [self.render(r[self.prompt_field]) for r in records]
        ids = self.encode(texts)
        return [
            PromptItem(
                prompt_text=text,
                prompt_ids=list(pids),
                answer=None if self.answer_field is None else _answer_str(r[self.answer_field]),
                metadata={k: r[k] for k in self._meta_fields},
                index=int(i),
            )
            for i, r, text, pids in zip(rows, records, texts, ids)
        ]

    # ------------------------------------------------------------------ iteration

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._kept))
                self._order = self._kept[perm]
            else:
                self._order = self._kept
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self, num_prompts: int) -> list[PromptItem]:
        """The next `num_prompts` prompts (crossing into a new, reshuffled epoch when one ends)."""
        if num_prompts < 0:
            raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
        with self._lock:
            rows: list[int] = []
            while len(rows) < num_prompts:
                if self.position >= len(self._kept):
                    self.epoch += 1
                    self.position = 0
                order = self._epoch_order()
                take = min(num_prompts - len(rows), len(order) - self.position)
                rows.extend(order[self.position : self.position + take].tolist())
                self.position += take
        return self._items(rows)

    def batches(self, num_prompts: int) -> Iterator[list[PromptItem]]:
        """An endless iterator of `next_batch(num_prompts)`."""
        while True:
            yield self.next_batch(num_prompts)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                    "num_rows": len(self._kept), "source": self.source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            if state.get("num_rows", len(self._kept)) != len(self._kept) or state.get("source", self.source) != self.source:
                log.warning("data state was saved for %s with %s prompts; now %s with %d: the order of the "
                            "resumed run differs", state.get("source"), state.get("num_rows"), self.source,
                            len(self._kept))
            if "seed" in state and int(state["seed"]) != self.seed:
                log.warning("data state was saved with seed %s, now %d: continuing with the saved seed",
                            state["seed"], self.seed)
                self.seed = int(state["seed"])
            self.epoch = int(state.get("epoch", 0))
            self.position = min(int(state.get("position", 0)), len(self._kept))
            self._order_epoch = -1
