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
        # DeepSpeed's throughput timer calls cuda.synchronize() at every forward and step
        # (the host waits for the GPU to drain, three times a 2-micro-batch update); we time
        # updates ourselves
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.dtype in _DTYPE_KEYS:
        ds[_DTYPE_KEYS[cfg.dtype]] = {"enabled": True}
    if cfg.dtype == "float16":
        ds["fp16"].update(loss_scale=0, initial_scale_power=16)
    return ds


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW whose next step can be vetoed: a vetoed step changes nothing (no
    parameter, no moment, no step count). DeepSpeed's ZeRO wrappers call this step on
    their fp32 partitions; vetoing it there leaves every rank's partition as it was."""

    veto = False

    def step(self, closure=None):
        if self.veto:
            return None
        return super().step(closure)


class GuardedLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that does not advance over a vetoed update (as DeepSpeed's own overflow
    skip does not), so the schedule counts applied updates only."""

    def step(self, *args, **kwargs):
        if getattr(self.optimizer, "veto", False):
            return None
        return super().step(*args, **kwargs)


# DeepSpeed's name for its CPU shared-memory all-reduce op (op_builder/cpu/comm.py)
SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm_build() -> None:
    """Keep `deepspeed.init_distributed` on CPU from JIT-compiling its shared-memory all-reduce
    op: 50-70 s on 2 cores, at a user's first CPU run and again for every new virtual
    environment path (its compiler flags name the path, and the build cache is one folder per
    op name). Only `inference_all_reduce` (tensor-parallel inference) calls it; ZeRO training
    all-reduces through torch.distributed. An op marked incompatible makes DeepSpeed's
    `build_shm_op` return None, and DeepSpeed keeps that dict for the process."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def build_optimizer(params, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """torch's AdamW with M1's settings (beta=(0.9, 0.95), eps=1e-15 by default).

    torch's, not DeepSpeed's FusedAdam: it runs on every accelerator (CPU included)
    and is the exact algorithm the float64 reference test re-implements.
    """
    return GuardedAdamW(
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
    return GuardedLambdaLR(optimizer, lambda step: warmup_factor(step, warmup))


def step_unless_nonfinite(engine, optimizer: GuardedAdamW, loss: torch.Tensor | None) -> bool:
    """engine.step() unless this update's loss or gradient is non-finite on any rank;
    returns whether the update was skipped (every rank returns the same answer).

    Non-finite gradients: ZeRO 1-3 see them in the global gradient norm and skip the step
    themselves (counted in engine.skipped_steps); without ZeRO the gradients are whole and
    identical on every rank after the all-reduce, so they are checked here. A non-finite
    loss vetoes the optimizer's step on every rank. Either way no weight, Adam moment or
    schedule position changes, and the gradients are cleared."""
    import torch.distributed as dist

    # `loss`: this rank's loss of the update, left on the device (None: no loss term); the flag
    # is built there, so the check adds one host sync (reading the all-reduced flag)
    flag = torch.zeros(1, device=engine.device)
    if loss is not None:
        flag = (~torch.isfinite(loss.detach())).to(flag).reshape(1)
    if engine.zero_optimization_stage() == 0 and any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in engine.module.parameters()):
        flag.fill_(1.0)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    optimizer.veto = bool(flag.item())
    skipped_before = engine.skipped_steps
    try:
        engine.step()
    finally:
        vetoed, optimizer.veto = optimizer.veto, False
    return vetoed or engine.skipped_steps > skipped_before
