"""The running parts of one RL job, wired together: rollout engines, reward scorer,
trainer ranks and the weight-sync channel between them."""

from __future__ import annotations

import logging
from pathlib import Path

from cispo.batch import Trajectory
from cispo.config import Config
from launch.data import PromptItem
from launch.weight_channel import WeightChannel
from rewards.scorer import RewardScorer
from rollout.group import RolloutGroup
from trainer.group import TrainerGroup

log = logging.getLogger("cispo")


class RLSystem:
    def __init__(self, conf: Config, model_path: str):
        import torch
        from transformers import AutoTokenizer

        self.conf = conf
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        on_gpu = torch.cuda.is_available()
        self.scorer = self.trainer = self.rollout = None
        self._restarts_reported = 0
        try:
            self.scorer = RewardScorer(conf.reward)
            log.info("starting %d trainer rank(s) and %d rollout engine(s)", conf.trainer.num_ranks, conf.rollout.num_engines)
            self.trainer = TrainerGroup(
                model_path, conf.trainer, conf.algorithm, num_ranks=conf.trainer.num_ranks,
                temperature=conf.rollout.temperature, seed=conf.seed, num_gpus_per_rank=1 if on_gpu else 0,
            )
            self.rollout = RolloutGroup(model_path, conf.rollout, dtype=conf.model.dtype)
            self.weights = WeightChannel(self.trainer, self.rollout, conf.rollout, "nccl" if on_gpu else "gloo")
        except BaseException:
            self.shutdown()  # a part that failed to start must not leave the others running
            raise

    # ---- one step's parts ----------------------------------------------------------------

    def generate(self, items: list[PromptItem], group_ids: list[int], n: int) -> list[Trajectory]:
        trajs = self.rollout.generate([it.prompt_ids for it in items], group_ids, n)
        by_group = dict(zip(group_ids, items))
        for t in trajs:
            item = by_group[t.group_id]
            t.metadata.update(prompt_index=item.index, answer=item.answer)
        return trajs

    def score(self, trajs: list[Trajectory], items: list[PromptItem]) -> int:
        """Fill `reward` in place; returns how many reward calls failed (scored 0)."""
        by_index = {it.index: it for it in items}
        samples = []
        for t in trajs:
            item = by_index[t.metadata["prompt_index"]]
            samples.append({
                "prompt": item.prompt_text,
                "response": self.tokenizer.decode(t.response_ids, skip_special_tokens=True),
                "answer": item.answer,
                "metadata": item.metadata,
            })
        result = self.scorer.score(samples)
        for t, r in zip(trajs, result.rewards):
            t.reward = float(r)
        return len(result.failures)

    def train(self, batch: list[Trajectory]) -> dict[str, float]:
        with self.weights.lock:  # a replaced engine's weights are fetched between steps, not during one
            return self.trainer.train_step(batch)

    def sync_weights(self, version: int) -> int:
        """Trainer weights into every engine; returns the policy version the engines serve
        (what the next trajectories will carry)."""
        return self.weights.sync(version)

    def take_engine_restarts(self) -> int:
        """Rollout engines restarted since the last call (dead mid-run or failed at start-up)."""
        total = self.rollout.restarts_total
        new, self._restarts_reported = total - self._restarts_reported, total
        return new

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self, folder: Path, step: int) -> None:
        with self.weights.lock:
            self.trainer.step = step
            self.trainer.save_into(str(folder))

    def restore(self, folder: Path, step: int) -> int:
        with self.weights.lock:
            loaded = self.trainer.load_checkpoint(str(folder.parent), str(folder))
            if loaded != step:
                raise RuntimeError(f"checkpoint {folder} holds trainer step {loaded}, its loop state says {step}")
        self.sync_weights(version=step)
        return step

    def shutdown(self) -> None:
        for part in (self.rollout, self.trainer, self.scorer):
            if part is None:
                continue
            try:
                part.shutdown() if hasattr(part, "shutdown") else part.close()
            except Exception as err:  # shutting down: report, keep closing the rest
                log.warning("shutdown of %s failed: %s", type(part).__name__, err)
