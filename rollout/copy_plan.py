"""Received weights straight into vLLM's live tensors: one planned copy per tensor.

vLLM's own `model.load_weights` (the "direct" path) walks every incoming tensor through
name matching and its parameter's `weight_loader` in Python: for a 0.5B Qwen2 that is
~15 ms per sync on an H200 for ~1 GB of copies that take ~1 ms, i.e. half the whole sync.
At tensor-parallel size 1, unquantized, on CUDA, those loaders do nothing but copy: the
checkpoint tensor lands whole in the parameter of the same name, or (fused q/k/v and
gate/up) in a block of rows at an offset, or (a vocabulary padded to a multiple of 64) in
its first rows. So the placement of every tensor of a sync plan is computed once, and
each sync is a few batched `torch._foreach_copy_` calls (one per incoming bucket).

Anything the plan cannot place exactly (a sharded parameter, a fused part without its
siblings, a name vLLM does not have, another shape) is refused with the reason, and the
caller falls back to vLLM's loader; `tests/rollout/test_copy_plan.py` checks the placement
against `vllm_compat.checkpoint_to_vllm_layout`, and the GPU tests and
`bench/weight_sync.py` compare every engine tensor with the trainer's after real syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from cispo.weight_sync import ParamMeta

# vLLM's Qwen2/Llama-family fusing of checkpoint tensors (the models' stacked_params_mapping):
# the checkpoint names vLLM stacks along dim 0 under one name, in order.
FUSED = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))

# Only these may be shorter than the live tensor (vLLM pads the vocabulary rows).
_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")


class CopyPlanError(ValueError):
    """The incoming tensors cannot be placed by plain copies (the reason says which)."""


@dataclass(frozen=True)
class Slot:
    param: str  # the live (vLLM) parameter's name
    start: int  # first row of dim 0 it fills
    rows: int


def _fused_part(name: str) -> tuple[str, str, tuple[str, ...]] | None:
    for fused, parts in FUSED:
        for part in parts:
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), part, parts
    return None


def plan_slots(incoming: Iterable[ParamMeta], live: dict[str, tuple[int, ...]]) -> dict[str, Slot]:
    """Where each incoming (checkpoint-named, unsharded) tensor goes among `live`
    (vLLM name -> shape). Raises CopyPlanError for anything not placeable exactly."""
    metas = {m.name: m for m in incoming}
    slots: dict[str, Slot] = {}
    for m in metas.values():
        shape = tuple(m.shape)
        if m.name in live:
            have = tuple(live[m.name])
            padded = m.name.endswith(_VOCAB_ROWS) and len(shape) == 2 and shape[1:] == have[1:] and shape[0] <= have[0]
            if shape != have and not padded:
                raise CopyPlanError(f"{m.name}: incoming shape {list(shape)}, live {list(have)} (sharded or re-laid out)")
            slots[m.name] = Slot(m.name, 0, shape[0] if shape else 1)
            continue
        fused = _fused_part(m.name)
        if fused is None or fused[0] not in live:
            raise CopyPlanError(f"{m.name}: no live tensor of that name or of a fused name")
        target, part, parts = fused
        siblings = [m.name.replace(f".{part}.", f".{p}.") for p in parts]
        missing = [s for s in siblings if s not in metas]
        if missing:
            raise CopyPlanError(f"{m.name}: fused into {target}, but {missing} are not sent with it")
        sib_shapes = [tuple(metas[s].shape) for s in siblings]
        have = tuple(live[target])
        if any(s[1:] != have[1:] for s in sib_shapes) or sum(s[0] for s in sib_shapes) != have[0]:
            raise CopyPlanError(f"{target}: live shape {list(have)} is not its parts {[list(s) for s in sib_shapes]} "
                                "stacked (sharded or re-laid out)")
        start = sum(s[0] for s in sib_shapes[: parts.index(part)])
        slots[m.name] = Slot(target, start, shape[0])
    return slots


class CopyLoader:
    """Copies named tensors into a model's live parameters by a `plan_slots` plan, batched
    per incoming bucket (tensors that are views of one flat buffer)."""

    def __init__(self, model: torch.nn.Module, slots: dict[str, Slot]):
        self.model, self.slots = model, slots
        self.names = sorted({s.param for s in slots.values()})
        self.ptrs: tuple[int, ...] | None = None
        self.views: dict[str, torch.Tensor] = {}

    def _refresh_views(self) -> None:
        """The destination views, rebuilt whenever a parameter's storage moved (a model that
        swapped `param.data`, e.g. on a re-allocation): never a copy into a stale tensor."""
        params = dict(self.model.named_parameters())
        ptrs = tuple(params[n].data_ptr() for n in self.names)
        if ptrs == self.ptrs:
            return
        self.views = {}
        for name, s in self.slots.items():
            p = params[s.param].data
            self.views[name] = p if (s.start == 0 and s.rows == p.shape[0]) or p.dim() == 0 else p.narrow(0, s.start, s.rows)
        self.ptrs = ptrs

    @torch.no_grad()
    def load(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        self._refresh_views()
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        base = None
        count = 0

        def flush() -> None:
            if dst:
                if all(d.device == s.device for d, s in zip(dst, src)):
                    torch._foreach_copy_(dst, src)
                else:
                    for d, s in zip(dst, src):
                        d.copy_(s, non_blocking=True)
                dst.clear()
                src.clear()

        for name, tensor in named:
            view = self.views.get(name)
            if view is None:
                raise CopyPlanError(f"{name}: not in the copy plan (the sync plan changed without a new copy plan)")
            storage = tensor.untyped_storage().data_ptr()
            if storage != base:  # a new incoming bucket: copy out the last one while it is still alive
                flush()
                base = storage
            dst.append(view)
            src.append(tensor.view(view.shape))
            count += 1
        flush()
        return count
