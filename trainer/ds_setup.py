"""DeepSpeed configuration, optimizer and LR schedule from `cispo.config.TrainerConfig`.

Gradient accumulation is driven by the trainer, not by DeepSpeed's counter: the number
of micro-batches changes from update to update (it depends on sequence lengths), so the
config says gradient_accumulation_steps=1 and the worker marks the last micro-batch as
the boundary with `engine.set_gradient_accumulation_boundary`, and calls
`engine.backward(loss, scale_wrt_gas=False)`: the loss already carries the step's
global normaliser (cispo.aggregation), so nothing may divide it again.
"""

from __future__ import annotations

import torch

from cispo.config import TrainerConfig

_DTYPE_KEYS = {"bfloat16": "bf16", "float16": "fp16"}


def deepspeed_config(cfg: TrainerConfig, world_size: int) -> dict:
    zero: dict = {"stage": int(cfg.zero_stage)}
    if cfg.zero_stage == 3:
        # Gather everything on use and release right after: small models and tests
        # must not depend on prefetch heuristics.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0,
                    stage3_max_live_parameters=int(1e9), stage3_max_reuse_distance=0)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": float(cfg.grad_clip) if cfg.grad_clip and cfg.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        # our optimizer is torch's AdamW (see build_optimizer), which ZeRO marks "untested"
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.dtype in _DTYPE_KEYS:
        ds[_DTYPE_KEYS[cfg.dtype]] = {"enabled": True}
    if cfg.dtype == "float16":
        ds["fp16"].update(loss_scale=0, initial_scale_power=16)
    return ds


def build_optimizer(params, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """torch's AdamW with M1's settings (beta=(0.9, 0.95), eps=1e-15 by default).

    torch's, not DeepSpeed's FusedAdam: it runs on every accelerator (CPU included)
    and is the exact algorithm the float64 reference test re-implements.
    """
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, foreach=False,
    )


def warmup_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier for optimizer update `step` (0-based): linear warm-up to 1 over
    `warmup_steps` updates, then constant (M1 does not publish a decay)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig):
    warmup = int(cfg.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup))
