"""Full weights out of a (possibly ZeRO-3-partitioned) model, one bucket at a time.

Used by every path that ships weights: the collective sync to rollout engines, the
object-store variant and the Hugging Face export. Names are the HF model's own
`named_parameters()` names — the `state_dict()` names, tied duplicates left out (a
tied `lm_head.weight` is the embedding; vLLM and `from_pretrained` re-tie it).

Under ZeRO-3 each rank holds a shard; `deepspeed.zero.GatheredParameters` rebuilds one
bucket's parameters on every rank, so EVERY rank must walk the same plan in the same
order, even though only rank 0 uses the result. Bucket by bucket keeps the extra memory
at one bucket instead of a full model copy.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from cispo.weight_sync import ParamMeta, flatten_bucket, plan_buckets


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)  # ZeRO-3 keeps the full shape here


def param_metas(model: nn.Module, only: Callable[[str], bool] | None = None) -> list[ParamMeta]:
    return [ParamMeta(name, _full_shape(p), str(p.dtype)) for name, p in model.named_parameters()
            if only is None or only(name)]


def sync_plan(model: nn.Module, bucket_mb: float, only: Callable[[str], bool] | None = None) -> list[list[ParamMeta]]:
    """Buckets of the parameters named `only` accepts (all by default; LoRA: the adapters)."""
    return plan_buckets(param_metas(model, only), int(bucket_mb * 2**20))


def _gathered(params: list[torch.Tensor]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def iter_flat_buckets(model: nn.Module, plan: list[list[ParamMeta]], device: torch.device | str) -> Iterator[torch.Tensor]:
    """One flat tensor per bucket of `plan` (every rank must iterate it fully)."""
    params = dict(model.named_parameters())
    for bucket in plan:
        tensors = [params[m.name] for m in bucket]
        with _gathered(tensors):
            flat = flatten_bucket([t.data for t in tensors]).to(device)  # torch.cat: a copy, never the live weight
        yield flat


def cpu_buckets(model: nn.Module, plan: list[list[ParamMeta]], keep: bool) -> list[tuple[list[ParamMeta], torch.Tensor]]:
    """(bucket plan, flat CPU tensor) pairs; `keep=False` on ranks other than 0 (they
    only take part in the gathers)."""
    out = []
    for bucket, flat in zip(plan, iter_flat_buckets(model, plan, "cpu")):
        if keep:
            out.append((bucket, flat))
    return out
