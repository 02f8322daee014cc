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
import time
from typing import Callable, Iterator

import torch
import torch.nn as nn

from cispo.weight_sync import ParamMeta, broadcast_bucket, flatten_bucket, plan_buckets


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


def broadcast_plan(model: nn.Module, plan: list[list[ParamMeta]], device: torch.device | str, group=None,
                   timed: bool = False) -> dict:
    """Walk `plan` (every rank must: ZeRO-3 gathers are collective); where `group` is given
    (the sync group's rank 0) broadcast each bucket; a failed broadcast is raised once the
    walk is done. Returns bytes sent and the seconds
    spent. timed=True waits for the GPU after each gather and each send, so gather_s and
    send_s split the total (costs the overlap, for measurements); otherwise only total_s."""
    on_cuda = torch.device(device).type == "cuda"

    def settle() -> None:
        if timed and on_cuda:
            torch.cuda.synchronize()

    sent, gather_s, send_s, t0 = 0, 0.0, 0.0, time.perf_counter()
    failure = None
    buckets = iter_flat_buckets(model, plan, device)
    while True:
        t = time.perf_counter()
        flat = next(buckets, None)
        settle()
        gather_s += time.perf_counter() - t
        if flat is None:
            break
        if group is not None and failure is None:
            t = time.perf_counter()
            try:
                broadcast_bucket(group, flat)
            except Exception as err:  # noqa: BLE001 - raised after the walk
                # a receiver died or the group was told to abort: stop sending, but keep walking
                # the plan so the other ranks' ZeRO-3 gathers are not left waiting for this one
                failure = err
                group.abort()
                continue
            settle()
            send_s += time.perf_counter() - t
            sent += flat.numel() * flat.element_size()
    if failure is not None:
        raise failure
    if on_cuda:
        torch.cuda.synchronize()
    stats = {"bytes": sent, "buckets": len(plan), "total_s": time.perf_counter() - t0}
    if timed:
        stats.update(gather_s=gather_s, send_s=send_s)
    return stats
