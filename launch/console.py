"""A quiet console: the progress bar, the summary and what a user must act on.

Everything else a run says goes to files in `<output_dir>/logs/`:

- `driver.log`: this process's log at INFO (cispo's own lines, Hydra, Ray's driver side);
- `worker-<pid>.log`: stdout and stderr of every Ray worker process (vLLM engines,
  DeepSpeed ranks, reward tasks), redirected at process start by Ray's
  `worker_process_setup_hook` (`redirect_worker_output` below) instead of being
  forwarded to the console by `log_to_driver`.

The console gets WARNING and above, plus INFO records logged with `extra=NOTICE` (events
worth seeing live, e.g. a change of the generation budget). `logger.verbose=true` restores
the old behaviour: every record on the console and Ray forwarding the workers' output.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

NOTICE = {"console": True}  # log.info(..., extra=NOTICE): shown on the quiet console too
LOG_DIR_ENV = "CISPO_LOG_DIR"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm so a log line does not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def _console_filter(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or bool(getattr(record, "console", False))


class _QuietFormatter(logging.Formatter):
    """Notices as plain lines; warnings and errors with their level and source."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno < logging.WARNING:
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_console(output_dir: str | Path, verbose: bool) -> Path:
    """Route this process's logging: all of it to `<output_dir>/logs/driver.log`, the
    console as described above. Returns the log folder (for `worker_runtime_env`)."""
    log_dir = Path(output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's console handler (and any basicConfig)
        root.removeHandler(handler)
    file_handler = logging.FileHandler(log_dir / "driver.log")
    file_handler.setFormatter(logging.Formatter(FORMAT))
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter(FORMAT) if verbose else _QuietFormatter())
    if not verbose:
        console.addFilter(_console_filter)
        # datasets' per-file "Generating train split" bars (prompt and eval sets), without
        # importing it here: built-in tasks never need it; it reads the variable on import
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    root.addHandler(file_handler)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings go through logging (file; console at WARNING)
    return log_dir


def worker_runtime_env(log_dir: Path | None, verbose: bool) -> dict:
    """What `ray.init` needs so worker processes write to `log_dir` (nothing when verbose)."""
    if verbose or log_dir is None:
        return {}
    return {"worker_process_setup_hook": "launch.console.redirect_worker_output",
            "env_vars": {LOG_DIR_ENV: str(Path(log_dir).resolve())}}


def redirect_worker_output() -> None:
    """Ray's worker_process_setup_hook: this process's stdout/stderr (file descriptors 1
    and 2, so C++ and child processes follow) into `$CISPO_LOG_DIR/worker-<pid>.log`."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(os.path.join(log_dir, f"worker-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return  # an unwritable folder: Ray's own worker logs still have the output
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
