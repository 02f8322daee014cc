"""The running parts of one RL job, wired together: rollout engines, reward scorer,
trainer ranks and the weight-sync channel between them."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from cispo.batch import Trajectory
from cispo.config import Config
from launch import placement
from launch.colocate import Colocated
from launch.data import PromptItem
from launch.weight_channel import WeightChannel
from rewards.scorer import RewardScorer
from rollout.group import RolloutEngineError, RolloutGroup
from trainer.group import TrainerGroup

log = logging.getLogger("cispo")


def _not_on_shared_gpus(engines: list[int]) -> None:
    """`RolloutGroup.on_replaced` for placement.mode=colocate: a replacement engine would
    start beside a trainer rank that holds the GPU, with no way to get the weights in."""
    raise RolloutEngineError(f"rollout engine(s) {engines} died; placement.mode=colocate does not replace engines "
                             "(they share their GPUs with the trainer ranks): the run stops, resume it from its "
                             "last checkpoint", engines)


def _cpus_hold(layout: placement.Layout) -> bool:
    """Whether the Ray cluster's CPUs hold every trainer rank and engine of a CPU layout at once."""
    import ray

    wanted = sum(slot.num_cpus for slot in layout.trainer + layout.rollout)
    return wanted <= ray.cluster_resources().get("CPU", 0)


class RLSystem:
    def __init__(self, conf: Config, model_path: str):
        self.conf = conf
        self.scorer = self.trainer = self.rollout = self.colocated = self.weights = None
        self._restarts_reported = 0
        # GPUs or not is the placement's call, checked against the cluster before any actor
        # starts (launch.placement); a CPU placement reserves nothing, as before.
        layout = self.layout = placement.plan(conf.placement, conf.trainer.num_ranks, conf.rollout.num_engines,
                                              conf.rollout.tensor_parallel_size)
        self.reservation = placement.reserve(layout, conf.placement.ready_timeout_s) if layout.on_gpu else None
        try:
            self._start(conf, model_path, layout)
        except BaseException:
            self.shutdown()  # nothing half-started stays behind (actors, placement group)
            raise

    def _start(self, conf: Config, model_path: str, layout: placement.Layout) -> None:
        from transformers import AutoTokenizer

        res = self.reservation
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.scorer = RewardScorer(conf.reward)
        log.info("starting %d trainer rank(s) and %d rollout engine(s): %s", conf.trainer.num_ranks,
                 conf.rollout.num_engines, layout.describe())
        # asynchronous: the engines generate while the trainer steps, so each keeps its own core
        trainer_cfg = dataclasses.replace(conf.trainer, cpu_threads=1) if conf.mode == "async" else conf.trainer
        lora = dataclasses.asdict(conf.model.lora) if conf.model.lora.rank else None

        def start_rollout(wait_ready: bool) -> RolloutGroup:
            return RolloutGroup(
                model_path, conf.rollout, dtype=conf.model.dtype, num_cpus=layout.rollout[0].num_cpus,
                num_gpus=layout.rollout[0].num_gpus,
                engine_kwargs={"enable_sleep_mode": True} if layout.colocated else None,
                scheduling=res.rollout_strategies() if res else None, lora=lora, wait_ready=wait_ready,
            )

        # The engines start while the trainer ranks do (each start is seconds to minutes of
        # imports and set-up) when both have resources of their own. Not colocated (the engines
        # measure the GPU memory the ranks leave free), nor when the CPUs do not hold every actor
        # at once: an engine waiting for a CPU then fails with a clear start-up error, where a
        # trainer rank waiting for one would wait for ever.
        side_by_side = not layout.colocated and (layout.on_gpu or _cpus_hold(layout))
        if side_by_side:
            self.rollout = start_rollout(wait_ready=False)  # assigned first: a failed start shuts it down
        self.trainer = TrainerGroup(
            model_path, trainer_cfg, conf.algorithm, num_ranks=conf.trainer.num_ranks,
            temperature=conf.rollout.temperature, seed=conf.seed, num_cpus_per_rank=layout.trainer[0].num_cpus,
            num_gpus_per_rank=layout.trainer[0].num_gpus, scheduling=res.trainer_strategies() if res else None,
            lora=conf.model.lora,
        )
        if side_by_side:
            self.rollout.wait_ready()
        else:
            if layout.colocated and conf.placement.offload_optimizer:
                self.trainer.offload_states()  # the engines measure free memory at start-up
            self.rollout = start_rollout(wait_ready=True)
        if layout.colocated:
            self.colocated = Colocated(self.trainer, self.rollout, conf.placement.offload_optimizer,
                                       conf.rollout.sync_bucket_mb)
            self.rollout.on_replaced = _not_on_shared_gpus
            self.lock = threading.RLock()
        else:
            # LoRA adapters (a few MB) always travel through the object store: the engines
            # write them as adapter folders (rollout/lora.py), not into the base weights
            self.weights = WeightChannel(self.trainer, self.rollout, conf.rollout, "nccl" if layout.on_gpu else "gloo",
                                         collective=conf.rollout.weight_sync == "collective" and lora is None)
            self.lock = self.weights.lock  # trainer calls never interleave with a replaced engine's sync
        # the plan the sync path made already (collective, colocated), else made here for the metrics
        plan = (self.colocated or self.weights).plan or self.trainer.weight_sync_plan(conf.rollout.sync_bucket_mb)
        # what one sync sends, and the trainable share: the numbers LoRA changes
        self.size_metrics = {
            "model/sync_mb": sum(m.nbytes for bucket in plan for m in bucket) / 2**20,
            "model/trainable_params": float(self.trainer.trainable_params),
            "model/total_params": float(self.trainer.total_params),
            # AdamW keeps two fp32 moments per trainable parameter (plus an fp32 master copy in bf16/fp16)
            "model/optimizer_state_mb": self.trainer.trainable_params * (8 if conf.trainer.dtype == "float32" else 12)
            / 2**20,
        }

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
        with self.lock:  # a replaced engine's weights are fetched between steps, not during one
            if self.colocated is not None:
                return self.colocated.train(batch)
            return self.trainer.train_step(batch)

    def sync_weights(self, version: int) -> int:
        """Trainer weights into every engine; returns the policy version the engines serve
        (what the next trajectories will carry)."""
        if self.colocated is not None:
            return self.colocated.sync(version)
        return self.weights.sync(version)

    def take_engine_restarts(self) -> int:
        """Rollout engines restarted since the last call (dead mid-run or failed at start-up)."""
        total = self.rollout.restarts_total
        new, self._restarts_reported = total - self._restarts_reported, total
        return new

    def sync_stats(self) -> dict[str, float]:
        """Where the last weight sync spent its time (seconds; GPU placements only, two
        small RPCs): engine 0's load (with the waits for incoming buckets) and FP32-head
        refresh, trainer rank 0's send, or the colocated turn's phases."""
        if not self.layout.on_gpu:
            return {}
        out = {f"engine_{k}": float(v) for k, v in self.rollout.last_load_stats()[0].items() if k.endswith("_s")}
        if self.colocated is not None:
            return {**out, **self.colocated.last_sync}
        if self.weights.plan is not None:
            out.update({f"trainer_{k}": float(v) for k, v in self.trainer.last_sync_stats().items() if k.endswith("_s")})
        return out

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self, folder: Path, step: int) -> None:
        with self.lock:
            self.trainer.step = step
            offloaded = self.colocated is not None and self.colocated.offload
            if offloaded:
                self.trainer.reload_states()  # DeepSpeed saves (and later loads) the state where it trains
            self.trainer.save_into(str(folder))
            if offloaded:
                self.trainer.offload_states()

    def load_trainer(self, folder: Path) -> int:
        """The trainer's state from a checkpoint folder (the engines keep theirs)."""
        with self.lock:
            offloaded = self.colocated is not None and self.colocated.offload
            if offloaded:
                self.trainer.reload_states()
            step = self.trainer.load_checkpoint(str(folder.parent), str(folder))
            if offloaded:
                self.trainer.offload_states()
            return step

    def restore(self, folder: Path, step: int) -> int:
        loaded = self.load_trainer(folder)
        if loaded != step:
            raise RuntimeError(f"checkpoint {folder} holds trainer step {loaded}, its loop state says {step}")
        self.sync_weights(version=step)
        return step

    def stop_replacing(self) -> None:
        """The job is being stopped (SIGTERM): engines that die from now on are not replaced
        (a flag only: safe to call from a signal handler)."""
        if self.rollout is not None:
            self.rollout.stopping = True

    def shutdown(self, job_ending: bool = False) -> None:
        """job_ending: the job is being ended (Slurm preemption: Ray's processes are being
        stopped too): the actors are killed and nothing is waited for (TrainerGroup.shutdown);
        the placement groups end with the job."""
        # also after a failed start: only the parts that exist
        names = ("rollout", "trainer", "scorer") + (() if job_ending else ("reservation",))
        parts = [getattr(self, name, None) for name in names]
        for part in (p for p in parts if p is not None):
            try:
                if part is self.trainer:
                    part.shutdown(job_ending)
                elif hasattr(part, "shutdown"):
                    part.shutdown()
                elif hasattr(part, "release"):
                    part.release()
                else:
                    part.close()
            except Exception as err:  # shutting down: report, keep closing the rest
                log.warning("shutdown of %s failed: %s", type(part).__name__, err)
