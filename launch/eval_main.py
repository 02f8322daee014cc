"""`cispo-eval`: the training loop's evaluation (launch/evaluation.py) on a model alone.

    cispo-eval model.path=runs/x/hf_model                       # an exported HF folder
    cispo-eval model.path=runs/x                                # a run: its newest checkpoint
    cispo-eval model=hf model.path=/models/m data=jsonl data.path=train.jsonl eval.path=test.jsonl reward=math

Same config as `cispo-train` (the eval, data, reward and rollout groups apply). A run or
checkpoint folder is exported to a Hugging Face folder first (launch/export.py). Prints a
table; writes `<output_dir>/eval.json` and the greedy responses to `eval_samples.jsonl`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cispo.config import ConfigError
from cispo.config_checks import validate
from launch.config import CONF_DIR, register_schema, to_dataclass
from launch.system import RLSystem

log = logging.getLogger("cispo")


class EvalSystem:
    """Rollout engines, reward scorer and tokenizer: the part of launch.system.RLSystem
    evaluation uses (its generate/score, so prompts and rewards are handled the same way)."""

    def __init__(self, conf, model_path: str):
        from transformers import AutoTokenizer

        from rewards.scorer import RewardScorer
        from rollout.group import RolloutGroup

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.scorer = RewardScorer(conf.reward)
        self.rollout = RolloutGroup(model_path, conf.rollout, dtype=conf.model.dtype)

    generate = RLSystem.generate
    score = RLSystem.score

    def shutdown(self) -> None:
        self.rollout.shutdown()
        self.scorer.close()


def model_folder(path: str) -> str:
    """A Hugging Face folder for `path`: itself, a built-in model, or a checkpoint exported."""
    from launch.export import export_checkpoint
    from launch.tiny_model import resolve_model_path

    if path.startswith("builtin:") or (Path(path) / "config.json").exists():
        return resolve_model_path(path)
    return str(export_checkpoint(path))


def run_eval(cfg: DictConfig) -> dict[str, float]:
    from rich.console import Console
    from rich.table import Table

    from launch.cluster import init_ray
    from launch.console import setup_console
    from launch.evaluation import eval_source, evaluate, load_eval_items

    conf = to_dataclass(cfg)
    out = Path(conf.output_dir).resolve()
    log_dir = setup_console(out, conf.logger.verbose)
    model_path = model_folder(conf.model.path)
    from transformers import AutoTokenizer

    items = load_eval_items(conf, AutoTokenizer.from_pretrained(model_path))
    if not items:
        raise ConfigError("eval.path", f"no held-out prompts: data.path={conf.data.path!r} is not built-in; "
                                       f"give eval.path (a .jsonl/.parquet file or builtin:<task>)")
    init_ray(conf.cluster.address, log_dir=log_dir, verbose=conf.logger.verbose)
    system = EvalSystem(conf, model_path)
    try:
        e = conf.eval
        metrics, records = evaluate(system, items, e.samples, e.max_new_tokens or conf.rollout.max_new_tokens,
                                    conf.rollout.temperature)
    finally:
        system.shutdown()
    (out / "eval.json").write_text(json.dumps({"model": model_path, "prompts": eval_source(conf), **metrics}, indent=1))
    with (out / "eval_samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    table = Table(title=f"cispo-eval: {model_path} on {eval_source(conf)}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4g}")
    Console().print(table)
    print(f"written: {out / 'eval.json'}")
    return metrics


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    try:
        validate(cfg)
        run_eval(cfg)
    except (ConfigError, FileNotFoundError) as err:
        log.error("%s", err)
        sys.exit(2)


def main() -> None:
    register_schema()
    _app()


if __name__ == "__main__":
    main()
