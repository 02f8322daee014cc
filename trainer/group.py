"""The trainer as the driver sees it: N data-parallel ranks in Ray actors.

    group = TrainerGroup(model_path, trainer_cfg, algorithm_cfg, num_ranks=2)
    metrics = group.train_step(trajectories)      # all updates of one RL step
    plan = group.weight_sync_plan(bucket_mb=64)   # then, with the rollout side:
    ray.get([group.init_weight_sync(host, port, world_size), *rollout_inits])
    ray.get([*group.broadcast_weights(plan), *rollout_receives])
    group.save_checkpoint(dir); group.export_hf(dir); group.shutdown()

One RL step (`train_step`): optionally recompute pi_old on the whole batch, then for
each epoch and each mini-batch one optimizer update, its sequences dealt to the ranks
and packed into token-budget micro-batches (trainer.packing). The loss of every token is
normalised by the update's global count (cispo.aggregation), so the update's gradient
is that of the whole mini-batch however it is split.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from cispo.aggregation import count_loss_seqs
from cispo.batch import PackedBatch, Trajectory, pack
from cispo.config import AlgorithmConfig, LoraConfig, TrainerConfig
from cispo.metrics import finalize_stats, merge_stats, mismatch_metrics
from cispo.offpolicy import BehaviourIS, behaviour_weights
from cispo.weight_sync import ParamMeta, unflatten_bucket
from trainer import checkpoint as ckpt
from trainer.minimax import moe_metrics
from trainer.packing import minibatches, plan_micro_batches, token_index
from trainer.worker import TrainerWorker

_REPO_ROOT = str(Path(__file__).resolve().parents[1])


def _as_dataclass(cls, value):
    """A `cls` from a `cls`, another dataclass, an OmegaConf node (Hydra) or a mapping."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value):
        return cls(**dataclasses.asdict(value))
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:
        pass
    return cls(**dict(value))


class TrainerGroup:
    def __init__(
        self,
        model_path: str,
        trainer_cfg: TrainerConfig | None = None,
        algorithm_cfg: AlgorithmConfig | None = None,
        num_ranks: int | None = None,
        temperature: float = 1.0,
        seed: int = 0,
        num_cpus_per_rank: float = 1,
        num_gpus_per_rank: float = 0,
        attn_implementation: str | None = None,
        dist_backend: str | None = None,
        scheduling: list | None = None,
        lora: LoraConfig | None = None,
    ):
        """scheduling: one Ray scheduling strategy per rank (launch.placement pins the
        ranks into its own placement group); None = the group packs its ranks itself.
        The ranks use CUDA exactly when num_gpus_per_rank > 0."""
        import os

        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = _as_dataclass(TrainerConfig, trainer_cfg)
        self.algorithm_cfg = _as_dataclass(AlgorithmConfig, algorithm_cfg)
        self.lora = _as_dataclass(LoraConfig, lora)  # rank 0: full weights (trainer/lora.py)
        self.num_ranks = int(num_ranks or self.cfg.num_ranks)
        self.model_path = model_path
        self.step = 0  # RL steps done (train_step calls)
        self.device = "cuda" if num_gpus_per_rank else "cpu"

        self._pg = None
        if scheduling is None:
            bundle = {"CPU": num_cpus_per_rank, **({"GPU": num_gpus_per_rank} if num_gpus_per_rank else {})}
            self._pg = placement_group([dict(bundle) for _ in range(self.num_ranks)], strategy="PACK")
            ray.get(self._pg.ready())
            scheduling = [PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r)
                          for r in range(self.num_ranks)]
        pythonpath = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        actor_cls = ray.remote(TrainerWorker)
        # All actors are created before any is waited on: setup() blocks in
        # init_distributed until every rank has joined.
        self.workers = [
            actor_cls.options(
                num_cpus=num_cpus_per_rank, num_gpus=num_gpus_per_rank,
                scheduling_strategy=scheduling[r],
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            ).remote(r, self.num_ranks, model_path, dataclasses.asdict(self.cfg),
                     dataclasses.asdict(self.algorithm_cfg), temperature, seed, attn_implementation,
                     dataclasses.asdict(self.lora))
            for r in range(self.num_ranks)
        ]
        try:
            host, port = ray.get(self.workers[0].address.remote())
            infos = ray.get([w.setup.remote(host, port, dist_backend, self.device) for w in self.workers])
        except BaseException:
            # one rank failing leaves the others blocked in init: take all of them down
            for w in self.workers:
                ray.kill(w)
            if self._pg is not None:
                remove_placement_group(self._pg)
            self.workers = []
            raise
        self.num_params = infos[0]["num_params"]  # what a weight sync sends (LoRA: the adapters)
        self.trainable_params = int(infos[0]["trainable_params"])
        self.total_params = int(infos[0]["total_params"])

    def _all(self, method: str, *per_rank_args, same=()):
        """Call `method` on every rank at once and wait; per_rank_args are lists indexed by rank."""
        import ray

        refs = [getattr(w, method).remote(*(a[r] for a in per_rank_args), *same) for r, w in enumerate(self.workers)]
        return ray.get(refs)

    # ---- training -----------------------------------------------------------------------

    def train_step(self, trajectories: list[Trajectory] | PackedBatch) -> dict[str, float]:
        """All optimizer updates of one RL step; returns metrics keyed `train/...`."""
        t0 = time.perf_counter()
        batch = trajectories if isinstance(trajectories, PackedBatch) else pack(trajectories)
        metrics: dict[str, float] = {}
        if self.cfg.old_logprobs == "recompute":
            # pi_old becomes the proximal policy (these weights); the rollout's log-probs stay
            # the behaviour policy's, whose ratio to pi_old weights each token (cispo.offpolicy)
            current = self._forward_logprobs(batch)
            metrics.update({f"train/mismatch_{k}": v for k, v in
                            mismatch_metrics(current, batch.old_logprobs, batch.loss_mask).items()})
            a = self.algorithm_cfg
            correction = BehaviourIS(a.behaviour_is, a.behaviour_is_level, a.behaviour_is_cap, a.behaviour_is_floor)
            weights, is_stats = behaviour_weights(current, batch.old_logprobs, batch.loss_mask, batch.seq_index, correction)
            metrics.update({f"train/{k}": v for k, v in is_stats.items()})
            batch = dataclasses.replace(batch, old_logprobs=current,
                                        behaviour_weights=weights if correction.mode != "off" else None)
        stats: dict[str, float] = {}
        grad_norms, lr, updates, losses, skipped = [], 0.0, 0, 0.0, 0
        first = True  # the first update of the step: pi_theta is still the rollout's policy (on-policy)
        for epoch in range(self.cfg.epochs):
            for seq_ids in minibatches(batch.num_seqs, self.cfg.mini_batch_size):
                idx = token_index(batch, seq_ids)
                mask = batch.loss_mask[idx]
                num_tokens = int(mask.sum())
                if num_tokens == 0:
                    continue  # nothing to learn from: no update (Adam would still move)
                num_seqs = count_loss_seqs(mask, batch.seq_index[idx])
                plans, _ = plan_micro_batches(batch, seq_ids, self.num_ranks, self.cfg.micro_batch_tokens)
                # pi_theta on the first update is the rollout's policy (when on-policy): the
                # moment to measure the train/rollout mismatch
                want_lp = first and self.cfg.old_logprobs == "rollout"
                first = False
                results = self._all("train_micro_batches", plans, same=(num_tokens, num_seqs, want_lp))
                if want_lp:  # measured before the step, so a skipped update still shows it
                    t = torch.cat([r["train_logprobs"] for r in results])
                    o = torch.cat([r["old_logprobs"] for r in results])
                    metrics.update({f"train/mismatch_{k}": v for k, v in
                                    mismatch_metrics(t, o, torch.ones_like(t, dtype=torch.bool)).items()})
                if results[0]["skipped"]:
                    # a non-finite loss or gradient: nothing was applied on any rank (counted,
                    # kept out of the means so the other updates' numbers stay readable)
                    skipped += 1
                    continue
                update_stats: dict[str, float] = {}
                for res in results:
                    merge_stats(update_stats, res["stats"])
                merge_stats(stats, update_stats)
                losses += update_stats["loss"]
                grad_norms.append(results[0]["grad_norm"])
                lr = results[0]["lr"]
                updates += 1
        self.step += 1
        metrics.update({f"train/{k}": v for k, v in finalize_stats(stats).items()})
        metrics.update(moe_metrics(stats, updates))
        # changes with every update: a run whose weights stand still shows it here
        metrics["train/param_norm"] = self._all("param_norm")[0]
        metrics.update({
            "train/loss": losses / max(updates, 1),
            "train/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "train/grad_norm_max": max(grad_norms, default=0.0),
            "train/lr": lr,
            "train/updates": float(updates),
            "train/nonfinite_updates": float(skipped),
            "train/loss_tokens": float(batch.num_loss_tokens),
            "train/tokens": float(batch.num_tokens),
            "train/step_time_s": time.perf_counter() - t0,
        })
        return metrics

    def _forward_logprobs(self, batch: PackedBatch) -> torch.Tensor:
        """[T] log-probs of batch.targets where batch.loss_mask (0 elsewhere), current weights."""
        plans, ids = plan_micro_batches(batch, list(range(batch.num_seqs)), self.num_ranks,
                                        self.cfg.micro_batch_tokens)
        results = self._all("compute_logprobs", plans)
        out = torch.zeros(batch.num_tokens, dtype=torch.float32)
        for rank_out, rank_ids in zip(results, ids):
            for lp, seq_ids in zip(rank_out, rank_ids):
                if seq_ids:  # fillers carry nothing
                    out[token_index(batch, seq_ids)] = lp
        return out

    def compute_logprobs(self, trajectories: list[Trajectory]) -> list[torch.Tensor]:
        """Per trajectory, the current policy's fp32 log-probs of its response tokens
        (temperature applied, every response token, response_mask ignored)."""
        unmasked = [dataclasses.replace(t, response_mask=None) for t in trajectories]
        batch = pack(unmasked)
        full = self._forward_logprobs(batch)
        cu = batch.cu_seqlens.tolist()
        return [full[cu[i] + len(t.prompt_ids) - 1: cu[i] + len(t.prompt_ids) - 1 + len(t.response_ids)]
                for i, t in enumerate(unmasked)]

    # ---- checkpoints --------------------------------------------------------------------

    def save_checkpoint(self, root: str) -> str:
        """Full state (weights, optimizer, scheduler, RNG, step) as `root/step_XXXXXXXX`
        (trainer.checkpoint.CheckpointDir); keeps the newest `keep_checkpoints`."""
        folders = ckpt.CheckpointDir(root, keep=self.cfg.keep_checkpoints)
        tmp = folders.begin(self.step)
        self.save_into(str(tmp))
        return str(folders.commit(tmp))

    def save_into(self, folder: str) -> None:
        """Every rank's state into `folder`, unpublished: for a caller that adds its own
        files to the same checkpoint before `CheckpointDir.commit` (the driver)."""
        self._all("save_checkpoint", same=(str(folder), {"step": self.step}))

    def maybe_save_checkpoint(self, root: str, last: bool = False) -> str | None:
        """Save when `trainer.save_every` divides the step count (0: only when `last`)."""
        every = self.cfg.save_every
        if last or (every and self.step % every == 0):
            return self.save_checkpoint(root)
        return None

    def load_checkpoint(self, root: str, folder: str | None = None) -> int | None:
        """Resume from `folder` (default: the newest complete checkpoint under `root`);
        returns its step, or None when there is none."""
        if folder is None:
            latest = ckpt.CheckpointDir(root).latest()
            if latest is None:
                return None
            folder = str(latest)
        states = self._all("load_checkpoint", same=(str(folder),))
        self.step = int(states[0]["step"])
        return self.step

    def scale_lr(self, factor: float) -> float:
        """Scale the learning rate from now on (the schedule's base and the current rate);
        checkpoints taken afterwards keep the scaled rate. Returns the new base rate."""
        return self._all("scale_lr", same=(float(factor),))[0]

    def export_hf(self, out_dir: str, bucket_mb: float = 512) -> str:
        """A Hugging Face folder (safetensors, config, tokenizer) of the current policy."""
        self._all("export_hf", same=(str(out_dir), bucket_mb))
        return str(out_dir)

    # ---- weights out --------------------------------------------------------------------

    def weight_sync_plan(self, bucket_mb: float = 64) -> list[list[ParamMeta]]:
        import ray

        return ray.get(self.workers[0].weight_sync_plan.remote(bucket_mb))

    def sync_address(self) -> tuple[str, int]:
        """rank 0's node IP and a free port there: rank 0 hosts the sync group's store."""
        import ray

        return ray.get(self.workers[0].address.remote())

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str = "gloo"):
        """Non-blocking: returns the ObjectRef of rank 0 joining the sync group as rank 0;
        ray.get it together with the rollout actors' init_weight_sync."""
        return self.workers[0].init_weight_sync.remote(host, port, world_size, backend)

    def broadcast_weights(self, plan: list[list[ParamMeta]], timed: bool = False) -> list:
        """Non-blocking: ObjectRefs of every rank walking the plan (rank 0 broadcasts each
        bucket, the others help gather it under ZeRO-3); ray.get them together with the
        rollout actors' receive_weights. Rank 0's result is the number of bytes sent.
        timed: also split rank 0's time into gather and send (slower; measurements)."""
        return [w.broadcast_weights.remote(plan, timed) for w in self.workers]

    def last_sync_stats(self) -> dict:
        """Rank 0's split of the last weight send (gather_s, send_s, total_s, bytes)."""
        import ray

        return ray.get(self.workers[0].last_sync_stats.remote())

    # ---- colocated engines --------------------------------------------------------------

    def share_weights(self, plan: list[list[ParamMeta]]) -> list[list]:
        """Per rank, [(bucket, CUDA IPC handle), ...] of its gathered weights (all ranks
        gather together under ZeRO-3); call `release_shared` once the engines loaded them."""
        return self._all("share_weights", same=(plan,))

    def release_shared(self) -> None:
        self._all("release_shared")

    def offload_states(self) -> list[dict]:
        """Optimizer state to CPU on every rank (colocated engines get the memory)."""
        return self._all("offload_states")

    def reload_states(self) -> float:
        return max(self._all("reload_states"), default=0.0)

    def empty_cache(self) -> None:
        self._all("empty_cache")

    def memory(self) -> list[dict]:
        return self._all("memory")

    def get_weights_ref(self, plan: list[list[ParamMeta]]):
        """Object-store path: an ObjectRef to rank 0's [(bucket, flat CPU tensor), ...]
        (pass it to rollout actors as is; the driver need not fetch it)."""
        import ray

        refs = [w.get_weights.remote(plan) for w in self.workers]
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        return refs[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on the driver (tests, debugging): HF parameter names -> CPU tensors."""
        import ray

        buckets = ray.get(self.get_weights_ref(self.weight_sync_plan(1024)))
        return {name: t.clone() for bucket, flat in buckets for name, t in unflatten_bucket(flat, bucket)}

    # ---- exit ---------------------------------------------------------------------------

    def shutdown(self, job_ending: bool = False) -> None:
        """Each rank's own shutdown, then its exit (each waited for at most 60 s); whatever
        is left is killed. job_ending: the job's every process, Ray's too, is being stopped
        (Slurm preemption): kill at once and wait for nothing, not even the placement
        group's removal (the GCS may be gone; the group ends with the job that made it)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if not self.workers:
            return
        try:
            if not job_ending:
                # bounded: after a failure a rank may be dead, and the others' barrier in
                # shutdown() would wait for it until the process group's timeout
                refs = [w.shutdown.remote() for w in self.workers]
                _, stuck = ray.wait(refs, num_returns=len(refs), timeout=60)
                if not stuck:
                    # a graceful actor exit (atexit handlers run) rather than ray.kill's SIGKILL
                    ray.wait([w.__ray_terminate__.remote() for w in self.workers],
                             num_returns=len(self.workers), timeout=60)
        finally:
            for w in self.workers:  # whatever did not exit above
                try:
                    ray.kill(w)
                except Exception:  # already gone
                    pass
            if self._pg is not None and not job_ending:
                remove_placement_group(self._pg)
            self.workers = []
