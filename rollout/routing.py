"""Which experts each rollout token was routed to (MoE models), recorded in the engine
for routing replay in the trainer.

A mixture-of-experts layer picks its top-k experts from router scores; the trainer's
forward, in other kernels and precisions, can pick differently for near-tied tokens, and
then the token's log-prob under the trainer differs from the engine's by far more than
rounding. Routing replay (Rollout Routing Replay, "R3") removes that source: the engine
records the experts it used and the trainer routes the same tokens to the same experts.

How the record is taken, with nothing but the project's own model code and vLLM's
batch-level logits-processor API (the same one the repetition stop uses):
- every MoE layer of the model writes the expert ids of the tokens it just routed into a
  buffer of its own; after each forward the model calls `note_step` with those buffers,
  the tokens' positions and the batch's `query_start_loc` (request i owns tokens
  query_start_loc[i] .. query_start_loc[i+1]);
- `RoutingRecorder.apply`, which vLLM calls on that forward's logits (one row per request,
  in the same batch order), files each opted-in request's tokens under its tag, keyed by
  position, so prefill chunks, decode steps and reordering all land in place;
- `take` returns a request's [length, layers, top_k] record (-1 where no token ran
  through the model: the last sampled token, which is never fed back).

Requests opt in through `SamplingParams.extra_args[REQUEST_KEY]` (the tag). The record is
per process: with the in-process engine at TP=1 (the project's setting) the model, the
processor and the engine wrapper share it; the worker extension reads it on every TP rank.
Python runs between layers only when the model runs eagerly (no full CUDA graph), so
recording asks for `enforce_eager` (rollout.engine).
"""

from __future__ import annotations

from typing import Any

import torch

from rollout import vllm_compat as compat

REQUEST_KEY = "cispo_routing"

# The last forward of this process: per MoE layer the [tokens, top_k] ids, the tokens'
# positions and the batch's query_start_loc. Written by the model, read by the processor.
_STEP: dict[str, Any] = {"layers": None, "positions": None, "query_start_loc": None}
# tag -> list of (positions [n], expert ids [n, layers, top_k]) chunks, in arrival order.
_RECORDS: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def note_step(layers: list[torch.Tensor], positions: torch.Tensor, query_start_loc: torch.Tensor | None) -> None:
    """Called by the model after each forward (query_start_loc None: a dummy/profile run)."""
    _STEP.update(layers=layers, positions=positions, query_start_loc=query_start_loc)


def engine_overrides(engine_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """What recording needs from the engine: eager execution (a full CUDA graph would
    replay the forward without the Python that files each step) and no prefix caching
    (cached prompt tokens are not run through the model, so they would go unrecorded)."""
    return {**(engine_kwargs or {}), "enforce_eager": True, "enable_prefix_caching": False}


def request_args(tag: str) -> dict[str, Any]:
    return {REQUEST_KEY: str(tag)}


def take(tag: str, length: int) -> torch.Tensor | None:
    """The record of one request as [length, layers, top_k] int16 (-1 = not recorded),
    removed from the store; None when nothing was recorded (a model without MoE layers)."""
    chunks = _RECORDS.pop(tag, None)
    if not chunks:
        return None
    layers, top_k = chunks[0][1].shape[1:]
    out = torch.full((length, layers, top_k), -1, dtype=torch.int16)
    for pos, ids in chunks:
        keep = pos < length
        out[pos[keep]] = ids[keep].to(torch.int16)
    return out


def discard(tags) -> None:
    for tag in tags:
        _RECORDS.pop(tag, None)


class RoutingRecorder(compat.logits_processor_base()):
    """A logits processor that changes nothing: it files the step's routing per request."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, str] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        tag = (sampling_params.extra_args or {}).get(REQUEST_KEY)
        if tag is not None and not isinstance(tag, str):
            raise ValueError(f"extra_args[{REQUEST_KEY!r}] must be a string tag, got {type(tag).__name__}")

    def is_argmax_invariant(self) -> bool:
        return False  # it must run on greedy steps too

    def update_state(self, batch_update) -> None:
        compat.track_rows(self.rows, batch_update, lambda params, out: (params.extra_args or {}).get(REQUEST_KEY))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        layers, qsl = _STEP["layers"], _STEP["query_start_loc"]
        if not self.rows or not layers or qsl is None:
            return logits
        qsl = qsl.cpu().tolist()
        n = qsl[-1]
        ids = torch.stack([layer[:n] for layer in layers], dim=1).cpu()  # [tokens, layers, top_k]
        pos = _STEP["positions"][:n].cpu().long()
        for row, tag in self.rows.items():
            if row + 1 < len(qsl) and qsl[row + 1] > qsl[row]:
                a, b = qsl[row], qsl[row + 1]
                _RECORDS.setdefault(tag, []).append((pos[a:b].clone(), ids[a:b].clone()))
        _STEP["query_start_loc"] = None  # each forward is filed once
        return logits
