"""The policy as a Hugging Face folder: safetensors, config, tokenizer, generation config.

Two routes to the same folder:

- at the end of a run (`export.at_end`, the default), from the live trainer ranks
  (`TrainerGroup.export_hf`: the weights the engines were last synced with);
- `cispo-export <run folder | checkpoint folder> [--out DIR]`, offline from any saved
  DeepSpeed checkpoint through DeepSpeed's own `zero_to_fp32` (no Ray, no GPU), for a
  step other than the last, or a run that stopped early.

A LoRA run exports the merged weights W + (alpha / rank) B A (trainer/lora.py), so the
folder loads without peft. `generation_config.json` carries the sampling settings the
policy was trained with (temperature, top-p/k) and the final generation budget.
Both `transformers` and vLLM load the folder (tests/launch/test_export.py).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("cispo")

_MODEL_STATES = "*model_states.pt"


def write_generation_config(folder: Path, rollout: Any, max_new_tokens: int) -> None:
    """generation_config.json with the rollout's sampling settings and token ids."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=True, temperature=float(rollout.temperature), top_p=float(rollout.top_p),
        top_k=int(rollout.top_k) if rollout.top_k > 0 else 0, max_new_tokens=int(max_new_tokens),
    )
    gen.save_pretrained(folder)


def _replace(tmp: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def export_run(trainer: Any, output_dir: Path, conf: Any, max_new_tokens: int) -> Path:
    """The live policy into <output_dir>/<export.dir> (written aside, then renamed)."""
    target = Path(output_dir) / conf.export.dir
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    trainer.export_hf(str(tmp))
    write_generation_config(tmp, conf.rollout, max_new_tokens)
    return _replace(tmp, target)


# ---- offline, from a DeepSpeed checkpoint ------------------------------------------------


def _step_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(path)))


def find_deepspeed_checkpoint(path: str | Path) -> Path:
    """The newest DeepSpeed checkpoint folder (one holding *model_states.pt) at or under
    `path`: a run folder, a checkpoints/step_N folder or the DeepSpeed tag folder itself."""
    path = Path(path)
    found = sorted({p.parent for p in path.rglob(_MODEL_STATES)} | ({path} if any(path.glob(_MODEL_STATES)) else set()),
                   key=lambda p: _step_key(p.relative_to(path)) if p != path else ())
    found = [p for p in found if ".partial" not in str(p)]  # a save cut short (launch/checkpoints.py)
    if not found:
        raise FileNotFoundError(f"no DeepSpeed checkpoint (*model_states.pt) at or under {path}")
    return found[-1]


def run_folder_of(path: Path) -> Path | None:
    """The run folder a checkpoint belongs to (the first ancestor with the run's config.yaml)."""
    for parent in [path, *path.parents]:
        if (parent / "config.yaml").exists() and (parent / "checkpoints").exists():
            return parent
    return None


def checkpoint_state_dict(ds_folder: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint, named as the Hugging Face model names them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(ds_folder.glob("*optim_states.pt")):  # ZeRO 1-3: fp32 master weights in the optimizer shards
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_folder.parent), tag=ds_folder.name)
    else:  # ZeRO-0: the module's own state dict
        state = torch.load(next(ds_folder.glob(_MODEL_STATES)), map_location="cpu", weights_only=False)["module"]
    # the trainer's DeepSpeed module is trainer.policy.PolicyModel, which holds the HF model as `hf`
    return {name.removeprefix("hf."): t.float() for name, t in state.items()}


def export_checkpoint(path: str | Path, out: str | Path | None = None) -> Path:
    """A Hugging Face folder from the newest DeepSpeed checkpoint at or under `path`
    (default output: <that checkpoint's step folder>/hf_model)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    from launch.tiny_model import resolve_model_path
    from trainer.checkpoint import write_hf_folder
    from trainer.lora import merge_lora_state

    ds_folder = find_deepspeed_checkpoint(path)
    run = run_folder_of(ds_folder)
    if run is None:
        raise FileNotFoundError(f"{ds_folder} is not inside a cispo run folder (no config.yaml beside checkpoints/): "
                                f"the base model's config and tokenizer come from there")
    cfg = OmegaConf.load(run / "config.yaml")
    source = str(run / "warmup_model") if (run / "warmup_model" / "config.json").exists() else \
        resolve_model_path(str(cfg.model.path))
    state = checkpoint_state_dict(ds_folder)
    lora = OmegaConf.select(cfg, "model.lora", default=None)
    if lora is not None and int(lora.rank):
        state = merge_lora_state(state, float(lora.alpha) / int(lora.rank))
    step_folder = Path(path) if out is None and (Path(path) / "driver_state.json").exists() else None
    target = Path(out) if out is not None else (step_folder or ds_folder) / "hf_model"
    with torch.device("meta"):  # the architecture only: the weights are `state`
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_hf_folder(model, state, source, tmp)
    rollout = OmegaConf.select(cfg, "rollout")
    write_generation_config(tmp, rollout, int(rollout.max_new_tokens))
    log.info("exported %s -> %s", ds_folder, target)
    return _replace(tmp, target)


def main(argv: list[str] | None = None) -> None:
    """`cispo-export RUN_OR_CHECKPOINT [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="cispo-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run folder (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint>/hf_model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        target = export_checkpoint(args.path, args.out)
    except FileNotFoundError as err:
        print(f"cispo-export: {err}", file=sys.stderr)
        raise SystemExit(2)
    print(target)


if __name__ == "__main__":
    main()
