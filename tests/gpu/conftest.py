"""GPU tests: the whole stack (Ray, vLLM, DeepSpeed, weight sync) on real GPUs, placed by
the project's own placements. Skipped without CUDA. On a GPU machine with the gpu-stack
environment (`. /tmp/site/env.sh`, see docs/gpu.md), from the repo root:

    PYTHONPATH=$PWD:$PYTHONPATH python3 -m pytest -q -s tests/gpu

Tests needing two GPUs skip on one. Every measured number (memory freed by sleep,
log-prob agreement, ...) is printed, and written as JSON to $CISPO_GPU_REPORT when set.
"""

from __future__ import annotations

import pytest
from gpu_helpers import CUDA, write_report


def pytest_sessionfinish(session, exitstatus):
    write_report()


@pytest.fixture(scope="session")
def ray_gpus():
    if not CUDA:
        pytest.skip("needs CUDA")
    import ray

    from launch.cluster import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def gpu_model(tmp_path_factory) -> str:
    """small-qwen2 with a wider initialisation: peaked next-token distributions, so
    probability correlations and policy changes mean something (a 0.02 init is near uniform)."""
    from launch.tiny_model import make_tiny_qwen2

    return str(make_tiny_qwen2(tmp_path_factory.mktemp("gpu-model") / "small", "small-qwen2", seed=0,
                               initializer_range=0.1))
