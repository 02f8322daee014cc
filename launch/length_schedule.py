"""MiniMax-M1's staged generation budget: 40K -> 48K -> ... -> 80K tokens.

M1 grows the response budget in stages, each time once the policy has settled at the
current one and the longest responses are pressing against it (the 99th-percentile
length near the limit). Here `rollout.length_schedule.stages` lists the budgets; the run
starts with the first and moves on when, for `patience` consecutive steps,

    p99(response length) >= p99_frac x limit       (responses press against the budget)

and, over the last `window` steps at this stage, the least-squares slope per step of the
mean reward and of the entropy are both below `max_slope` in magnitude (the policy has
settled: M1 waits for its perplexity to converge). The overlong rule
(`algorithm.overlong`, launch/batching.shape_rewards) is applied against the current
stage's limit, so a response cut at 40K is masked (or penalised) at the 40K stage.

The state (stage index and the history since the last change) is saved with every
checkpoint, so a resumed run keeps its stage.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from cispo.config import RolloutConfig
from launch.console import NOTICE

log = logging.getLogger("cispo")

P99_KEY = "rollout/response_len_p99"
SETTLE_KEYS = ("reward/mean", "train/entropy")


def slope(values: list[float]) -> float:
    """Least-squares slope of `values` against 0, 1, 2, ... (0 for fewer than 2 points)."""
    n = len(values)
    if n < 2:
        return 0.0
    x_mean = (n - 1) / 2
    y_mean = statistics.fmean(values)
    num = sum((i - x_mean) * (v - y_mean) for i, v in enumerate(values))
    den = sum((i - x_mean) ** 2 for i in range(n))
    return num / den


@dataclass
class LengthSchedule:
    """The current generation budget and the rule that moves it to the next stage."""

    cfg: RolloutConfig
    stage: int = 0
    near_limit: int = 0  # consecutive steps with p99 >= p99_frac x limit
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SETTLE_KEYS})

    @property
    def stages(self) -> list[int]:
        return list(self.cfg.length_schedule.stages) or [self.cfg.max_new_tokens]

    @property
    def limit(self) -> int:
        """max_new_tokens for the rollouts of the next step (and their overlong rule)."""
        return self.stages[self.stage]

    def settled(self) -> bool:
        s = self.cfg.length_schedule
        recent = {k: v[-s.window:] for k, v in self.history.items()}
        if any(len(v) < s.window for v in recent.values()):
            return False
        return all(abs(slope(v)) < s.max_slope for v in recent.values())

    def observe(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Take one step's metrics; maybe move to the next stage. Returns the schedule's
        own metrics for the step (`rollout/max_new_tokens`, `rollout/length_stage`)."""
        s = self.cfg.length_schedule
        out = {"rollout/max_new_tokens": float(self.limit), "rollout/length_stage": float(self.stage)}
        for key in SETTLE_KEYS:
            if key in metrics:
                self.history[key].append(float(metrics[key]))
            elif self.history[key]:
                # a step without an optimizer update (no loss tokens: e.g. every group's
                # rewards equal) reports no train/ metrics; the policy did not move
                self.history[key].append(self.history[key][-1])
        self.near_limit = self.near_limit + 1 if metrics.get(P99_KEY, 0.0) >= s.p99_frac * self.limit else 0
        if self.stage + 1 < len(self.stages) and self.near_limit >= s.patience and self.settled():
            old = self.limit
            self.stage += 1
            self.near_limit = 0
            self.history = {k: [] for k in SETTLE_KEYS}
            log.info("step %d: generation budget %d -> %d tokens (stage %d of %d): p99 response length %.0f "
                        "stayed >= %.2f x %d for %d steps and reward/entropy settled",
                        step, old, self.limit, self.stage + 1, len(self.stages), metrics.get(P99_KEY, 0.0),
                        s.p99_frac, old, s.patience, extra=NOTICE)
            out["rollout/length_stage_change"] = 1.0
        return out

    # ---- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "near_limit": self.near_limit, "history": self.history,
                "stages": self.stages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("stages") != self.stages:
            log.warning("length schedule: the checkpoint's stages %s differ from %s; restarting at stage 1",
                        state.get("stages"), self.stages)
            return
        self.stage = int(state["stage"])
        self.near_limit = int(state["near_limit"])
        self.history = {k: list(state["history"].get(k, [])) for k in SETTLE_KEYS}
