"""Repetition early stop (MiniMax-M1): end a sample once its last K tokens were each
sampled with probability above p (M1: K=3000, p=0.99). Such a run is a degenerate
loop; letting it run to the length limit wastes rollout time and trains on garbage.

It acts during generation as a vLLM v1 logits processor: each step it notes, per
request, the most likely token and its probability under the sampling distribution
(softmax(logits / T), full vocabulary); when the next step shows which token was
sampled, the request's streak grows if that token had probability > p, else resets.
When the streak reaches K the processor forces EOS (every other logit -inf), the engine
ends the request, and `RolloutEngine` strips that forced EOS and reports finish reason
"repetition".

Why argmax is enough: with p >= 0.5 a token with probability > p is necessarily the
most likely one, so (argmax, max prob) per step decides exactly; p < 0.5 is refused.

The per-step statistics are copied to the host without a blocking sync and read one
step later, so the GPU pipeline is not stalled; under vLLM's async scheduling the
sampled token may become visible a step late, and the stop then fires a token late.

Requests opt in through `SamplingParams.extra_args[REQUEST_KEY]` (see `request_args`),
so the processor costs nothing for requests (or engines) that do not use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rollout import vllm_compat as compat

REQUEST_KEY = "cispo_repetition"
# Tags of requests this process's processors stopped. With the in-process engine the
# engine wrapper reads it (and removes its tags); see RolloutEngine._finish_reason.
FIRED: set[str] = set()


def request_args(window: int, prob: float, eos_token_id: int, tag: str) -> dict[str, Any]:
    if not 0.5 <= prob < 1:
        raise ValueError(f"repetition stop probability {prob!r} must be in [0.5, 1)")
    if window < 1:
        raise ValueError(f"repetition stop window {window!r} must be >= 1")
    return {REQUEST_KEY: {"window": int(window), "prob": float(prob), "eos": int(eos_token_id), "tag": tag}}


@dataclass
class RepetitionState:
    """One request's streak bookkeeping (pure Python: unit-testable without vLLM)."""

    window: int
    prob: float
    eos: int
    tag: str
    temperature: float
    out: list[int]  # vLLM's live list of this request's output tokens
    streak: int = 0
    checked: int = 0  # output positions already judged
    pending: dict[int, tuple[int, float]] = field(default_factory=dict)  # position -> (argmax, max prob)

    def note(self, position: int, argmax: int, max_prob: float) -> None:
        self.pending[position] = (argmax, max_prob)

    def advance(self) -> int:
        """Judge newly visible sampled tokens; return the current streak."""
        while self.checked < len(self.out):
            tok = self.out[self.checked]
            if tok < 0:  # async-scheduling placeholder: not sampled yet
                break
            stat = self.pending.pop(self.checked, None)
            hit = stat is not None and tok == stat[0] and stat[1] > self.prob
            self.streak = self.streak + 1 if hit else 0
            self.checked += 1
        return self.streak

    @property
    def fired(self) -> bool:
        return self.streak >= self.window


def step_stats(logits: torch.Tensor, temperatures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, max probability) of softmax(logits / T) per row, without materialising
    the probabilities: max p = 1 / sum(exp(z - max z))."""
    z = logits.float() / temperatures.unsqueeze(1)
    zmax, arg = z.max(dim=-1)
    pmax = torch.exp(z - zmax.unsqueeze(1)).sum(dim=-1).reciprocal()
    return arg, pmax


class RepetitionStopProcessor(compat.logits_processor_base()):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.pin = bool(is_pin_memory) and device.type == "cuda"
        self.rows: dict[int, RepetitionState] = {}
        self._inflight: tuple[list[tuple[RepetitionState, int]], torch.Tensor, torch.Tensor, Any] | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(REQUEST_KEY)
        if spec is not None:
            request_args(spec["window"], spec["prob"], spec["eos"], spec["tag"])

    def is_argmax_invariant(self) -> bool:
        return False  # forcing EOS changes greedy results too

    def update_state(self, batch_update) -> None:
        compat.track_rows(self.rows, batch_update, self._row)

    @staticmethod
    def _row(params, out: list[int]) -> RepetitionState | None:
        spec = (getattr(params, "extra_args", None) or {}).get(REQUEST_KEY)
        if spec is None:
            return None
        t = float(params.temperature)
        t = 1.0 if t < compat.greedy_temperature_eps() else t
        return RepetitionState(spec["window"], spec["prob"], spec["eos"], spec["tag"], t, out)

    def _resolve_inflight(self) -> None:
        if self._inflight is None:
            return
        refs, arg, pmax, event = self._inflight
        self._inflight = None
        if event is not None:
            event.synchronize()
        for (row, pos), a, p in zip(refs, arg.tolist(), pmax.tolist()):
            row.note(pos, a, p)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            self._inflight = None
            return logits
        self._resolve_inflight()
        indices = sorted(self.rows)
        states = [self.rows[i] for i in indices]
        fired = [(i, s) for i, s in zip(indices, states) if s.advance() >= s.window]

        idx = torch.tensor(indices, device=logits.device)
        temps = torch.tensor([s.temperature for s in states], device=logits.device, dtype=torch.float32)
        arg, pmax = step_stats(logits.index_select(0, idx), temps)
        refs = [(s, len(s.out)) for s in states]  # this step samples output position len(out)
        if logits.device.type == "cuda":
            arg_h = torch.empty(arg.shape, dtype=arg.dtype, pin_memory=self.pin)
            pmax_h = torch.empty(pmax.shape, dtype=pmax.dtype, pin_memory=self.pin)
            arg_h.copy_(arg, non_blocking=True)
            pmax_h.copy_(pmax, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._inflight = (refs, arg_h, pmax_h, event)
        else:
            self._inflight = (refs, arg, pmax, None)

        for i, s in fired:
            logits[i] = float("-inf")
            logits[i, s.eos] = 0.0
            FIRED.add(s.tag)
        return logits
