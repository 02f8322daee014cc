"""Metric sinks: console, jsonl, wandb, tensorboard — several at once.

Metric names are namespaced (`reward/`, `rollout/`, `train/`, `mismatch/`, `perf/`) by
the driver; sinks write them as they are.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("cispo")


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class JsonlSink:
    def __init__(self, output_dir: Path):
        self.path = output_dir / "metrics.jsonl"
        self.samples_path = output_dir / "samples.jsonl"
        self.warmup_path = output_dir / "warmup.jsonl"

    def log_warmup(self, step: int, metrics: dict[str, float]) -> None:
        with self.warmup_path.open("a") as f:
            f.write(json.dumps({"warmup_step": step, **metrics}) + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def alert(self, title: str, text: str, level: str) -> None:
        with (self.path.parent / "alerts.jsonl").open("a") as f:
            f.write(json.dumps({"title": title, "text": text, "level": level}) + "\n")

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def finish(self) -> None:
        pass


class WandbSink:
    """Online when an API key is configured, offline otherwise: never prompts, never hangs.

    The run id is kept in the output folder so a resumed or requeued job continues the
    same dashboard run.
    """

    def __init__(self, output_dir: Path, project: str, run_name: str | None, config: dict[str, Any]):
        import wandb

        id_file = output_dir / "wandb_run_id"
        # our own id (wandb's helper moved between releases): 8 base-36 chars, as wandb makes them
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_has_key() else "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=project,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(output_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(init_timeout=90, console="off"),
        )
        self._wandb = wandb
        log.info("wandb run %s (%s mode)", run_id, mode)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_warmup(self, step: int, metrics: dict[str, float]) -> None:
        # wandb's step axis belongs to RL steps (it must only grow); the warm-start's
        # curve lives in warmup.jsonl, its last values in the run summary
        self.run.summary.update(metrics)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        table = self._wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self.run.log({"samples": table}, step=step)

    def alert(self, title: str, text: str, level: str) -> None:
        # shows on the run page and, where configured, by e-mail / Slack (offline runs keep it in the log)
        self.run.alert(title=title, text=text, level=getattr(self._wandb.AlertLevel, level, self._wandb.AlertLevel.WARN))

    def finish(self) -> None:
        self.run.finish()


class TensorboardSink:
    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_warmup(self, step: int, metrics: dict[str, float]) -> None:
        self.log(step, metrics)  # tensorboard keeps a step axis per tag

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        text = "\n\n".join(" | ".join(f"**{k}**: {v}" for k, v in row.items()) for row in rows)
        self.writer.add_text("samples", text, step)

    def finish(self) -> None:
        self.writer.close()


class ConsoleSink:
    """Step lines go to the log (the progress bar shows the live view)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        keys = ("reward/mean", "rollout/response_len_mean", "train/entropy", "mismatch/pearson", "perf/step_time_s",
                "eval/greedy_accuracy", *sorted(k for k in metrics if k.startswith("eval/pass@")))
        shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
        log.info("step %d: %s", step, shown)

    def log_warmup(self, step: int, metrics: dict[str, float]) -> None:
        log.info("warm-start step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        for row in rows[:3]:
            log.info("sample @%d: %s", step, row)

    def finish(self) -> None:
        pass


class MetricLogger:
    def __init__(self, backends: list[str], output_dir: str | Path, project: str = "cispo",
                 run_name: str | None = None, config: dict[str, Any] | None = None):
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.sinks: list[Any] = []
        for name in backends:
            if name == "console":
                self.sinks.append(ConsoleSink())
            elif name == "jsonl":
                self.sinks.append(JsonlSink(out))
            elif name == "wandb":
                self.sinks.append(WandbSink(out, project, run_name, config or {}))
            elif name == "tensorboard":
                self.sinks.append(TensorboardSink(out))
            else:
                raise ValueError(f"logger.backends: unknown backend {name!r}; allowed: console, jsonl, wandb, tensorboard")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def log_warmup(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_warmup(step, metrics)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        for sink in self.sinks:
            sink.log_samples(step, rows)

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        """Something a person must see (level INFO, WARN or ERROR): always on the console
        (the log), as a wandb alert and in `alerts.jsonl` where those sinks are on."""
        log.log({"INFO": logging.INFO, "WARN": logging.WARNING}.get(level, logging.ERROR), "%s: %s", title, text)
        for sink in self.sinks:
            if hasattr(sink, "alert"):
                sink.alert(title, text, level)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()
