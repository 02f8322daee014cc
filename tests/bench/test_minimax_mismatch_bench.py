"""bench/minimax_mismatch.py (the train/rollout mismatch of the bf16 hybrid model, FP32 head
and routing replay on and off) runs end to end on CPU at toy size and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# not importorskip: importing vllm here (at collection) would import Triton before the
# kernel tests set TRITON_INTERPRET (tests/kernels/conftest.py); the bench runs in a subprocess
if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vllm", allow_module_level=True)
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_at_toy_size(tmp_path):
    out = tmp_path / "mismatch.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "CISPO_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "bench/minimax_mismatch.py", "--make", "tiny", "--prompts", "2", "--samples", "2",
           "--new-tokens", "8", "--prompt-len", "20", "40", "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["model"]["layer_types"].count("full_attention") == 1
    rows = {(r["head"], r["routing_replay"]): r for r in report["results"]}
    assert set(rows) == {("bf16", False), ("bf16", True), ("fp32", False), ("fp32", True)}
    for (head, replay), r in rows.items():
        assert r["tokens"] == 2 * 2 * 8
        assert -1 <= r["pearson"] <= 1 and math.isfinite(r["abs_logp_diff"]) and r["abs_logp_diff"] > 0
        assert (r["routing_agree"] is None) == replay and (replay or 0 < r["routing_agree"] <= 1)
    assert "pearson(p)" in proc.stdout  # the table
