"""Evaluation on held-out prompts: greedy accuracy, pass@k, response length.

The same code serves the training loop (every `eval.every` steps and at the end, on the
rollout engines already running, right after a weight sync) and `cispo-eval` (a
checkpoint or HF folder on engines of its own, launch/eval_main.py).

Per prompt: one greedy response (temperature 0) and `eval.samples` responses at the
rollout temperature. A response is correct when its reward is >= 1 (the verifier's full
score; format bonuses stay below it), as `reward/pass_rate` counts during training.
pass@k is the unbiased estimator of Chen et al. (2021) from n = eval.samples samples
with c correct: 1 - C(n-c, k) / C(n, k), averaged over prompts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from math import comb
from pathlib import Path
from typing import Any, Protocol

from cispo.batch import Trajectory
from cispo.config import Config
from launch.data import PromptDataset, PromptItem

log = logging.getLogger("cispo")


class Generates(Protocol):
    """What evaluation needs of a running system (launch.system.RLSystem has it)."""

    tokenizer: Any

    def generate(self, items: list[PromptItem], group_ids: list[int], n: int, **overrides) -> list[Trajectory]: ...

    def score(self, trajs: list[Trajectory], items: list[PromptItem]) -> int: ...


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c correct, is correct)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def eval_source(conf: Config) -> str | None:
    """Where held-out prompts come from: eval.path, else a built-in training task's eval split."""
    if conf.eval.path:
        return str(conf.eval.path)
    if str(conf.data.path).startswith("builtin:"):
        return str(conf.data.path)
    return None


def load_eval_items(conf: Config, tokenizer: Any) -> list[PromptItem]:
    """The first eval.num_prompts held-out prompts (rendered and filtered as data.* says)."""
    source = eval_source(conf)
    if source is None:
        return []
    data_cfg = dataclasses.replace(conf.data, path=source, shuffle=False)
    ds = PromptDataset(data_cfg, tokenizer, seed=conf.seed, split="eval", builtin_size=conf.eval.num_prompts)
    return ds.next_batch(min(len(ds), conf.eval.num_prompts))


def _correct(t: Trajectory) -> bool:
    return t.reward >= 1.0


def evaluate(system: Generates, items: list[PromptItem], samples: int, max_new_tokens: int,
             temperature: float) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """eval/ metrics, and one record per greedy response (ids and log-probs, for checks)."""
    t0 = time.perf_counter()
    gids = list(range(len(items)))
    greedy = system.generate(items, gids, 1, temperature=0.0, max_new_tokens=max_new_tokens)
    sampled = system.generate(items, gids, samples, temperature=temperature, max_new_tokens=max_new_tokens)
    system.score(greedy, items)
    system.score(sampled, items)
    per_prompt: dict[int, list[Trajectory]] = {g: [] for g in gids}
    for t in sampled:
        per_prompt[t.group_id].append(t)
    lengths = [len(t.response_ids) for t in greedy]
    metrics = {
        "eval/prompts": float(len(items)),
        "eval/greedy_accuracy": statistics.fmean(_correct(t) for t in greedy),
        "eval/greedy_reward_mean": statistics.fmean(t.reward for t in greedy),
        "eval/greedy_len_mean": statistics.fmean(lengths),
        "eval/greedy_truncated_frac": statistics.fmean(t.finish_reason == "length" for t in greedy),
        "eval/sample_reward_mean": statistics.fmean(t.reward for t in sampled),
        "eval/sample_len_mean": statistics.fmean(len(t.response_ids) for t in sampled),
    }
    for k in sorted({1, samples}):
        metrics[f"eval/pass@{k}"] = statistics.fmean(
            pass_at_k(samples, sum(map(_correct, group)), k) for group in per_prompt.values())
    metrics["eval/time_s"] = time.perf_counter() - t0
    records = [{"prompt": items[t.group_id].prompt_text, "answer": items[t.group_id].answer,
                "response": system.tokenizer.decode(t.response_ids, skip_special_tokens=True),
                "reward": t.reward, "prompt_ids": t.prompt_ids, "response_ids": t.response_ids,
                "logprobs": t.rollout_logprobs, "policy_version": t.policy_version} for t in greedy]
    return metrics, records


class Evaluator:
    """In-training evaluation on the run's own engines; `maybe_run` after each weight sync."""

    def __init__(self, conf: Config, system: Generates, output_dir: Path):
        self.conf = conf
        self.system = system
        self.path = Path(output_dir) / "eval_samples.jsonl"
        self.items = load_eval_items(conf, system.tokenizer)
        e = conf.eval
        if not self.items and (e.every or e.at_end):
            log.warning("no held-out prompts for evaluation (data.path=%s is not built-in): set eval.path to a "
                        "file of held-out prompts to get eval/ metrics", conf.data.path)
        elif self.items:
            log.info("evaluation: %d held-out prompts from %s, every %s step(s)%s", len(self.items),
                     eval_source(conf), e.every or "-", " and at the end" if e.at_end else "")

    def due(self, step: int, last: bool) -> bool:
        e = self.conf.eval
        return bool(self.items) and ((e.every and (step + 1) % e.every == 0) or (last and e.at_end))

    def maybe_run(self, step: int, last: bool, max_new_tokens: int) -> dict[str, float]:
        """eval/ metrics of the policy after `step` (version step + 1), or {} when not due."""
        if not self.due(step, last):
            return {}
        e = self.conf.eval
        metrics, records = evaluate(self.system, self.items, e.samples, e.max_new_tokens or max_new_tokens,
                                    self.conf.rollout.temperature)
        with self.path.open("a") as f:
            for r in records:
                f.write(json.dumps({"step": step, **r}) + "\n")
        return metrics
