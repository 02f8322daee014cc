"""TrainerGroup takes its config as the dataclass, a Hydra/OmegaConf node or a dict."""

from __future__ import annotations

import pytest

from cispo.config import AlgorithmConfig, TrainerConfig
from trainer.ds_setup import deepspeed_config, warmup_factor
from trainer.group import _as_dataclass


def test_config_forms():
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.structured(TrainerConfig(zero_stage=3, lr=3e-6))
    assert _as_dataclass(TrainerConfig, node) == TrainerConfig(zero_stage=3, lr=3e-6)
    assert _as_dataclass(AlgorithmConfig, {"name": "grpo"}).name == "grpo"
    assert _as_dataclass(TrainerConfig, None) == TrainerConfig()


def test_deepspeed_config_never_rescales_the_loss():
    """gradient_accumulation_steps stays 1 whatever the micro-batch count: the worker marks
    the boundary itself and its loss already carries the global normaliser."""
    ds = deepspeed_config(TrainerConfig(zero_stage=2, dtype="bfloat16", grad_clip=0.5), world_size=4)
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 4
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5
    assert [warmup_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
