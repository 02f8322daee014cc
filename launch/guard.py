"""The collapse guard: notices when a run has stopped learning and says so.

RL on a small policy can fall into an absorbing state: every sample of every prompt gets
the same reward (all empty answers, say), every group has zero reward spread, dynamic
sampling drops them all and no step trains again — while the run goes on and prints a
summary as if nothing had happened. Non-finite losses or gradients are the other silent
failure. The guard watches the step metrics the driver already logs and trips when

- flat groups (zero reward spread) are at least `flat_group_frac` of the generated groups
  for `window` consecutive steps,
- no sample with a learning signal (non-zero advantage) trained for `window` steps, or
- the loss or gradient was non-finite (or the trainer skipped a non-finite update) for
  `max_nonfinite_steps` consecutive steps (every single occurrence is alerted).

A trip is logged on the console, counted under `guard/`, sent as a wandb alert, and then
acted on as `guard.action` says: `stop` (non-zero exit), `rollback` (to the newest
checkpoint from before the symptoms began, with the learning rate scaled by
`rollback_lr_factor`, at most `max_rollbacks` times, then stop) or `warn` (go on).

Flat groups are a collapse only when the reward fell: a policy that answers every prompt
the same way at (about) the best reward of the run has converged — nothing is left to
learn from its own samples — and the run stops cleanly (exit 0, checkpoint and export)
unless the action is `warn`. "About" compares 5-step means: the run's best against now,
within `converged_margin`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from cispo.config import GuardConfig


MEAN_STEPS = 5  # the reward is compared as a mean over this many steps (one step's is noisy)


@dataclass
class Trip:
    kind: str  # "collapse" | "no_signal" | "nonfinite" | "converged"
    message: str
    since_step: int  # first step of the window that tripped


class GuardStop(Exception):
    """The guard ended the run; `exit_code` is what the process should exit with."""

    def __init__(self, trip: Trip, exit_code: int):
        super().__init__(trip.message)
        self.trip = trip
        self.exit_code = exit_code


def _finite(metrics: dict[str, float], key: str) -> bool:
    value = metrics.get(key)
    return value is None or math.isfinite(value)


class CollapseGuard:
    def __init__(self, cfg: GuardConfig, rollbacks: int = 0):
        self.cfg = cfg
        self.rollbacks = rollbacks
        self.flat_streak = 0
        self.no_signal_streak = 0
        self.nonfinite_streak = 0
        self.recent: deque[float] = deque(maxlen=MEAN_STEPS)
        self.best_mean = -math.inf
        self.trips = 0

    def reset(self) -> None:
        """After a rollback: the symptoms of the abandoned steps no longer count."""
        self.flat_streak = self.no_signal_streak = self.nonfinite_streak = 0

    def observe(self, step: int, metrics: dict[str, float]) -> tuple[dict[str, float], list[str], Trip | None]:
        """Fold in one step's metrics. Returns the `guard/` metrics to log, warnings to
        alert now, and a Trip when a symptom has lasted long enough."""
        c = self.cfg
        warnings: list[str] = []
        reward = metrics.get("reward/mean", 0.0)
        flat = metrics.get("rollout/flat_group_frac", 0.0)
        self.flat_streak = self.flat_streak + 1 if flat >= c.flat_group_frac else 0
        signal = metrics.get("rollout/signal_samples", 1.0)
        self.no_signal_streak = self.no_signal_streak + 1 if signal == 0 else 0
        bad = [k for k in ("train/loss", "train/grad_norm", "train/grad_norm_max") if not _finite(metrics, k)]
        if metrics.get("train/nonfinite_updates", 0.0) > 0:
            bad.append(f"train/nonfinite_updates={metrics['train/nonfinite_updates']:g}")
        if bad:
            self.nonfinite_streak += 1
            warnings.append(f"step {step}: non-finite training values ({', '.join(bad)}); "
                            f"{self.nonfinite_streak} step(s) in a row")
        else:
            self.nonfinite_streak = 0
        self.recent.append(reward)
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) == MEAN_STEPS:
            self.best_mean = max(self.best_mean, mean)

        trip = None
        if self.nonfinite_streak >= c.max_nonfinite_steps:
            trip = Trip("nonfinite", f"the loss or gradient was non-finite for {self.nonfinite_streak} steps in a row "
                                     f"({', '.join(bad)})", step - self.nonfinite_streak + 1)
        elif self.flat_streak >= c.window:
            converged = mean > 0 and mean >= self.best_mean - c.converged_margin
            what = (f"the policy has converged: it answers each prompt one way, at about its best reward "
                    f"({self.best_mean:.3f}), and learns nothing more from its own samples" if converged else
                    f"the policy collapsed: every sample of a prompt gets the same reward, well below the "
                    f"run's best ({self.best_mean:.3f})")
            trip = Trip("converged" if converged else "collapse",
                        f"{flat:.0%} of groups had zero reward spread for {self.flat_streak} steps "
                        f"(mean reward {mean:.3f} over the last {len(self.recent)} steps): {what}",
                        step - self.flat_streak + 1)
        elif self.no_signal_streak >= c.window:
            trip = Trip("no_signal", f"no sample with a non-zero advantage trained for {self.no_signal_streak} steps "
                                     f"(mean reward {reward:.3f})", step - self.no_signal_streak + 1)
        if trip is not None:
            self.trips += 1
        out = {
            "guard/flat_streak": float(self.flat_streak),
            "guard/no_signal_streak": float(self.no_signal_streak),
            "guard/nonfinite_streak": float(self.nonfinite_streak),
            "guard/trips": float(self.trips),
            "guard/rollbacks": float(self.rollbacks),
        }
        return out, warnings, trip

    def decide(self, trip: Trip) -> str:
        """What to do about a trip: "stop", "rollback" or "warn"."""
        if self.cfg.action == "warn":
            return "warn"
        if trip.kind == "converged":
            return "stop"
        if self.cfg.action == "rollback" and self.rollbacks < self.cfg.max_rollbacks:
            return "rollback"
        return "stop"
