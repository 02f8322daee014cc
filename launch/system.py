"""The running parts of one RL job, wired together: rollout engines, reward scorer,
trainer ranks and the weight-sync channel between them."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cispo.batch import Trajectory
from cispo.config import Config
from launch.data import PromptItem
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
        self.scorer = RewardScorer(conf.reward)
        on_gpu = torch.cuda.is_available()
        log.info("starting %d trainer rank(s) and %d rollout engine(s)", conf.trainer.num_ranks, conf.rollout.num_engines)
        # asynchronous: the engines generate while the trainer steps, so each keeps its own core
        trainer_cfg = dataclasses.replace(conf.trainer, cpu_threads=1) if conf.mode == "async" else conf.trainer
        self.trainer = TrainerGroup(
            model_path, trainer_cfg, conf.algorithm, num_ranks=conf.trainer.num_ranks,
            temperature=conf.rollout.temperature, seed=conf.seed, num_gpus_per_rank=1 if on_gpu else 0,
            lora=conf.model.lora,
        )
        lora = dataclasses.asdict(conf.model.lora) if conf.model.lora.rank else None
        self.rollout = RolloutGroup(model_path, conf.rollout, dtype=conf.model.dtype, lora=lora)
        self.backend = "nccl" if on_gpu else "gloo"
        self.plan = None
        # LoRA adapters (a few MB) always travel through the object store: the engines
        # write them as adapter folders (rollout/lora.py), not into the base weights
        if conf.rollout.weight_sync == "collective" and lora is None:
            host, port = self.trainer.sync_address()
            world = self.rollout.sync_world_size
            self._together(self.trainer.init_weight_sync(host, port, world, self.backend),
                           self.rollout.init_weight_sync(host, port, world, self.backend), "weight-sync set-up")
            self.plan = self.trainer.weight_sync_plan(conf.rollout.sync_bucket_mb)
        plan = self.plan or self.trainer.weight_sync_plan(conf.rollout.sync_bucket_mb)
        # what one sync sends, and the trainable share: the numbers LoRA changes
        self.size_metrics = {
            "model/sync_mb": sum(m.nbytes for bucket in plan for m in bucket) / 2**20,
            "model/trainable_params": float(self.trainer.trainable_params),
            "model/total_params": float(self.trainer.total_params),
            # AdamW keeps two fp32 moments per trainable parameter (plus an fp32 master copy in bf16/fp16)
            "model/optimizer_state_mb": self.trainer.trainable_params * (8 if conf.trainer.dtype == "float32" else 12)
            / 2**20,
        }

    def _together(self, trainer_refs, rollout_refs, what: str) -> list:
        """Wait for both sides of a collective; the rollout side's wait is bounded and names
        a dead engine (a trainer failure surfaces through ray.get)."""
        import ray

        trainer_refs = trainer_refs if isinstance(trainer_refs, list) else [trainer_refs]
        results = self.rollout.wait(rollout_refs, what)
        ray.get(trainer_refs)
        return results

    # ---- one step's parts ----------------------------------------------------------------

    def generate(self, items: list[PromptItem], group_ids: list[int], n: int, **overrides) -> list[Trajectory]:
        """n samples per prompt; overrides: sampling settings for this call (RolloutEngine.generate)."""
        trajs = self.rollout.generate([it.prompt_ids for it in items], group_ids, n, **overrides)
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
        return self.trainer.train_step(batch)

    def sync_weights(self, version: int) -> int:
        """Trainer weights into every engine; returns the lowest policy version the
        engines report afterwards (what the next trajectories will carry)."""
        if self.plan is not None:
            versions = self._together(self.trainer.broadcast_weights(self.plan),
                                      self.rollout.receive_weights(self.plan, version), "weight sync")
            return min(versions)
        plan = self.trainer.weight_sync_plan(self.conf.rollout.sync_bucket_mb)
        return self.rollout.update_weights(self.trainer.get_weights_ref(plan), version)

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self, folder: Path, step: int) -> None:
        self.trainer.step = step
        self.trainer.save_checkpoint(str(folder / "trainer"))

    def load_trainer(self, folder: Path) -> int:
        """The trainer's state from a checkpoint folder (the engines keep theirs)."""
        step = self.trainer.load_checkpoint(str(folder / "trainer"))
        if step is None:
            raise RuntimeError(f"checkpoint {folder} holds no trainer state")
        return step

    def restore(self, folder: Path) -> int:
        step = self.load_trainer(folder)
        self.sync_weights(version=step)
        return step

    def shutdown(self) -> None:
        for part in (self.rollout, self.trainer, self.scorer):
            try:
                part.shutdown() if hasattr(part, "shutdown") else part.close()
            except Exception as err:  # shutting down: report, keep closing the rest
                log.warning("shutdown of %s failed: %s", type(part).__name__, err)
