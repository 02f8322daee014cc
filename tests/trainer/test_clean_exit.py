"""In fresh interpreters: a group trains, checkpoints and exits with status 0 and no
abort ('terminate called ...') in its own or its Ray workers' output; a second process
resuming from the checkpoint ends bitwise where the uninterrupted run ended."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("exit_resume_script.py")
ABORT_MARKERS = ("terminate called", "Aborted", "core dumped", "Segmentation fault", "SIGABRT", "SIGSEGV")
# the actors' stdout/stderr, their core-worker logs, and the raylet (which logs workers dying)
LOG_GLOBS = ("session_*/logs/worker-*", "session_*/logs/python-core-worker-*", "session_*/logs/raylet.*")


def _run(model, root, out, mode):
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    proc = subprocess.run([sys.executable, str(SCRIPT), model, str(root), str(out), mode, ray_tmp],
                          capture_output=True, text=True, timeout=300)
    logs = [p for g in LOG_GLOBS for p in Path(ray_tmp).glob(g)]
    assert any(p.name.startswith("worker-") for p in logs), "no actor logs found: the abort check would be blind"
    # Every worker process is one of the job's (a prestarted idle one logs under the nil job
    # id, ffffffff): an abort in one of them could only come from Ray itself, as one did in CI.
    idle = sorted({p.name for p in logs if p.name.startswith("worker-") and "-ffffffff-" in p.name})
    assert not idle, f"idle workers were prestarted (launch/cluster.py turns that off): {idle}"
    worker_logs = "".join(p.read_text(errors="replace") for p in logs)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return proc, worker_logs


def test_clean_exit_and_resume_in_a_new_process(tiny_model_path, tmp_path):
    root = tmp_path / "ckpt"
    results = {}
    for mode in ("uninterrupted", "resume"):
        proc, worker_logs = _run(tiny_model_path, root, tmp_path / f"{mode}.pt", mode)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "EXIT_SCRIPT_DONE" in proc.stdout
        for marker in ABORT_MARKERS:
            assert marker not in proc.stderr, proc.stderr[-4000:]
            assert marker not in worker_logs, marker
        results[mode] = torch.load(tmp_path / f"{mode}.pt")
    a, b = results["uninterrupted"], results["resume"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
