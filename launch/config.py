"""Hydra wiring: the typed schema from cispo/config.py registered with ConfigStore,
and the one function that turns YAML + overrides into a validated config."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from cispo.config import Config
from cispo.config_checks import validate

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _builtin_only(value: int, *, _root_: DictConfig) -> int:
    """`value` when the model and the data are both built-in, else 0: the format warm-start
    is for the built-in tiny model on a built-in task (see cispo.config.WarmupConfig)."""
    paths = [OmegaConf.select(_root_, key, default=None, throw_on_missing=False) for key in ("model.path", "data.path")]
    return value if all(str(p).startswith("builtin:") for p in paths) else 0


def register_schema() -> None:
    # conf/config.yaml lists `base_config` first in its defaults, so every group file
    # is merged into (and type-checked against) these dataclasses.
    ConfigStore.instance().store(name="base_config", node=Config)
    # settings that follow from others, so `model=hf data=jsonl` needs no extra keys
    OmegaConf.register_new_resolver("cispo.add", lambda *xs: sum(int(x) for x in xs), replace=True)
    OmegaConf.register_new_resolver("cispo.builtin_only", _builtin_only, replace=True)


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
