"""The quiet console: what reaches the terminal, what goes to <run>/logs/."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.console import LOG_DIR_ENV, NOTICE, setup_console, worker_runtime_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.mark.parametrize("verbose", [False, True])
def test_console_shows_warnings_and_notices_and_the_file_gets_everything(tmp_path, capsys, restore_logging, verbose):
    log_dir = setup_console(tmp_path, verbose)
    log = logging.getLogger("vllm.some.module")
    log.info("engine detail")
    log.warning("act on this")
    logging.getLogger("cispo").info("budget raised", extra=NOTICE)
    err = capsys.readouterr().err
    assert "act on this" in err and "budget raised" in err
    assert ("engine detail" in err) == verbose
    text = (log_dir / "driver.log").read_text()
    assert all(s in text for s in ("engine detail", "act on this", "budget raised"))
    assert worker_runtime_env(log_dir, verbose) == ({} if verbose else {
        "worker_process_setup_hook": "launch.console.redirect_worker_output",
        "env_vars": {LOG_DIR_ENV: str(log_dir.resolve())}})


def test_worker_hook_sends_both_streams_and_child_processes_to_the_log_folder(tmp_path):
    code = ("import os, sys; from launch.console import redirect_worker_output; redirect_worker_output(); "
            "print('from python'); sys.stderr.write('to stderr\\n'); sys.stdout.flush(); "
            "os.system('echo from a child process')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), LOG_DIR_ENV: str(tmp_path / "logs")})
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    (log,) = (tmp_path / "logs").glob("worker-*.log")
    text = log.read_text()
    assert "from python" in text and "to stderr" in text and "from a child process" in text
