"""Hydra wiring: the typed schema from cispo/config.py registered with ConfigStore,
and the one function that turns YAML + overrides into a validated config."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from cispo.config import Config, validate

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def register_schema() -> None:
    # conf/config.yaml lists `base_config` first in its defaults, so every group file
    # is merged into (and type-checked against) these dataclasses.
    ConfigStore.instance().store(name="base_config", node=Config)


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config a `cispo-train` run with these overrides would see (for tests, tools)."""
    from hydra import compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)
    validate(cfg)
    return cfg


def to_dataclass(cfg: DictConfig) -> Config:
    """A plain `Config` object (what Ray actors receive: no OmegaConf inside)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
