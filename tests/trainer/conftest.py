"""Fixtures shared by the trainer tests: one tiny model folder and one local Ray cluster."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from launch.tiny_model import make_tiny_qwen2

    return str(make_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2", seed=0))


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # 2 cores here; logical CPUs above that let two 2-rank groups exist at once
    # (a module's group is shut down before the next module's starts anyway).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tied_tiny_model_path(tiny_model_path, tmp_path_factory) -> str:
    """The tiny model with tie_word_embeddings=True, as Qwen2-0.5B/1.5B ship: the LM head
    is the embedding (one Parameter shared by two modules, which ZeRO-3 must handle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-qwen2-tied"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(out)
    return str(out)
