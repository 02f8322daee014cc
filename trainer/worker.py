"""One data-parallel trainer rank: a DeepSpeed engine around the policy.

A plain class: `trainer.group.TrainerGroup` runs one per Ray actor, and tests or
scripts may run it in-process. Every method that touches the model is collective —
the group calls it on all ranks at once (ZeRO-3 gathers parameters in forward,
backward, checkpointing and weight export).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from cispo.batch import PackedBatch
from cispo.config import AlgorithmConfig, LoraConfig, TrainerConfig
from cispo.metrics import accumulate_stats, stats_to_floats
from cispo.objectives import policy_loss, resolve_algorithm
from cispo.weight_sync import ParamMeta, create_sync_group, share_bucket, unflatten_bucket
from trainer import checkpoint as ckpt
from trainer.ds_setup import (build_optimizer, build_scheduler, deepspeed_config, skip_cpu_shm_comm_build,
                              step_unless_nonfinite)
from trainer.lora import apply_lora, is_adapter, merge_lora_state, trainable_summary
from trainer.device_batch import DeviceMicroBatch, to_device
from trainer.policy import PolicyModel, load_hf_causal_lm
from trainer.speed import apply_speed_options
from trainer.weights_out import broadcast_plan, cpu_buckets, iter_flat_buckets, sync_plan


def _as_cfg(cls, value):
    if value is None:
        return cls()
    if is_dataclass(value):
        return cls(**asdict(value))
    return cls(**value)


class TrainerWorker:
    def __init__(self, rank: int, world_size: int, model_path: str, trainer_cfg, algorithm_cfg,
                 temperature: float = 1.0, seed: int = 0, attn_implementation: str | None = None, lora=None):
        # Cheap on purpose: the group creates every actor before any of them blocks
        # in init_distributed (which waits until all ranks have joined).
        self.rank, self.world_size = rank, world_size
        self.model_path = model_path
        self.cfg = _as_cfg(TrainerConfig, trainer_cfg)
        alg = _as_cfg(AlgorithmConfig, algorithm_cfg)
        self.algorithm = resolve_algorithm(alg.name, alg.eps_low, alg.eps_high, alg.token_mask, alg.loss_agg)
        self.temperature = float(temperature)
        self.seed = seed
        self.attn_implementation = attn_implementation or self.cfg.attn_implementation
        self.lora = _as_cfg(LoraConfig, lora)  # rank 0 = full-weight training
        self.engine = None
        self._sync_group = None
        self._sync_backend = "gloo"

    # ---- set-up -------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host torch.distributed."""
        try:
            import ray

            host = ray.util.get_node_ip_address()
        except Exception:
            host = "127.0.0.1"
        with socket.socket() as s:
            s.bind(("", 0))
            return host, s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int, dist_backend: str | None = None,
              device: str | None = None) -> dict:
        """device: "cuda" or "cpu" as the placement decided (None: CUDA when visible)."""
        import deepspeed

        use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise RuntimeError(f"trainer rank {self.rank} was placed on a GPU but sees none "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
                               f"torch {torch.__version__} CUDA build: {torch.version.cuda is not None})")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size),
                          # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so its GPU is device 0
                          LOCAL_RANK="0" if use_cuda else str(self.rank))
        if use_cuda:
            torch.cuda.set_device(0)
        else:
            skip_cpu_shm_comm_build()
        deepspeed.init_distributed(dist_backend=dist_backend or ("nccl" if use_cuda else "gloo"))
        torch.manual_seed(self.seed + self.rank)
        if not use_cuda:  # Ray's OMP_NUM_THREADS is the actor's CPU count, 1 by default
            torch.set_num_threads(self.cfg.cpu_threads or max(1, (os.cpu_count() or 1) // self.world_size))

        self.hf = load_hf_causal_lm(self.model_path, self.attn_implementation)
        if self.lora.rank:
            apply_lora(self.hf, self.lora)  # in place: only the adapters keep requires_grad
        sizes = trainable_summary(self.hf)
        self.speed_options = apply_speed_options(self.hf, self.cfg)
        self.policy = PolicyModel(self.hf, self.cfg.logprob_chunk_tokens, self.cfg.lm_head_mode)
        if self.policy.moe is None and (self.cfg.routing_replay or self.cfg.moe_aux_loss_coef):
            key = "trainer.routing_replay" if self.cfg.routing_replay else "trainer.moe_aux_loss_coef"
            raise ValueError(f"{key} is set but {self.model_path} has no MoE routers (trainer.minimax knows MiniMax's)")
        self.optimizer = optimizer = build_optimizer([p for p in self.policy.parameters() if p.requires_grad], self.cfg)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.policy, optimizer=optimizer, config=deepspeed_config(self.cfg, self.world_size),
            lr_scheduler=lambda opt: build_scheduler(opt, self.cfg), dist_init_required=False,
        )
        self.device = self.engine.device
        self.updates = 0  # optimizer updates applied
        return {"rank": self.rank, "device": str(self.device), **sizes,
                "num_params": sum(int(m.numel) for bucket in self.weight_sync_plan(1e9) for m in bucket)}

    # ---- forward / train ------------------------------------------------------------

    def _logprobs(self, mb: DeviceMicroBatch, with_entropy: bool):
        routed = None
        if self.cfg.routing_replay:
            if mb.routed_experts is None:
                raise ValueError("trainer.routing_replay is on but the batch carries no routing "
                                 "(Trajectory.routed_experts): is rollout.record_routing on?")
            routed = mb.routed_experts
        return self.engine(*mb.model_inputs(), temperature=self.temperature, with_entropy=with_entropy,
                           cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen, routed_experts=routed)

    def train_micro_batches(self, micro_batches: list[PackedBatch], num_loss_tokens: int, num_loss_seqs: int,
                            return_logprobs: bool = False) -> dict:
        """One optimizer update from this rank's micro-batches of the update.

        The loss of each micro-batch uses the update's *global* counts, so the sum over
        all micro-batches and ranks is the full update's loss. DeepSpeed averages
        gradients over the data-parallel ranks; multiplying by world_size turns that
        mean back into the sum, i.e. the exact full-batch gradient.
        All inputs go to the device first and the statistics stay there until the end:
        the loop itself never waits for the GPU (trainer/device_batch.py).
        """
        self.engine.train()
        agg = self.algorithm.loss_agg
        batches = [to_device(mb, self.device, agg, num_loss_tokens, num_loss_seqs) for mb in micro_batches]
        stats: dict[str, torch.Tensor] = {}
        train_lp = []
        for i, mb in enumerate(batches):
            self.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
            lp, ent = self._logprobs(mb, with_entropy=True)
            out = policy_loss(self.algorithm, lp, mb.old_logprobs, mb.advantages, mb.weights, mb.mask)
            loss = out.loss + self._moe_terms(stats, mb.num_loss_tokens, num_loss_tokens)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            accumulate_stats(stats, out.stats)
            accumulate_stats(stats, {"loss": out.loss, "entropy_sum": torch.where(mb.mask, ent, 0.0).sum()})
            if return_logprobs:
                train_lp.append(lp.detach())
        lr = self.engine.get_lr()[0]  # the rate this update uses (the scheduler steps inside step())
        with torch.profiler.record_function("trainer.optimizer_step"):  # a named range in profiles
            # a non-finite loss on any rank vetoes the step everywhere
            skipped = step_unless_nonfinite(self.engine, self.optimizer, stats.get("loss"))
        self.updates += 0 if skipped else 1
        grad_norm = self.engine.get_global_grad_norm()
        out = {"stats": stats_to_floats(stats), "lr": lr, "skipped": skipped,
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        if return_logprobs:
            out["train_logprobs"] = torch.cat(train_lp).cpu()[torch.cat([mb.mask_cpu for mb in batches])]
            out["old_logprobs"] = torch.cat([mb.old_logprobs for mb in batches]).cpu()[
                torch.cat([mb.mask_cpu for mb in batches])]
        return out

    def _moe_terms(self, stats: dict, mb_loss_tokens: int, num_loss_tokens: int):
        """The load-balancing loss of the micro-batch just run (weighted by its share of the
        update's loss tokens, so the update's terms sum to a token-weighted mean) and the
        replay statistics; 0 for dense models."""
        moe = self.policy.moe
        if moe is None:
            return 0.0
        accumulate_stats(stats, {k: torch.tensor(v, device=self.device) for k, v in moe.replay_stats().items()})
        if not self.cfg.moe_aux_loss_coef:
            return 0.0
        aux = moe.aux_loss() * (mb_loss_tokens / max(num_loss_tokens, 1))
        accumulate_stats(stats, {"moe_aux_loss": aux})
        return self.cfg.moe_aux_loss_coef * aux

    @torch.no_grad()
    def compute_logprobs(self, micro_batches: list[PackedBatch]) -> list[torch.Tensor]:
        """Per micro-batch, a [T] fp32 tensor: log pi(targets[t]) where loss_mask[t], else 0."""
        self.engine.eval()
        batches = [to_device(mb, self.device) for mb in micro_batches]
        lps = [self._logprobs(mb, with_entropy=False)[0] for mb in batches]
        out = []
        for mb, lp in zip(batches, torch.cat(lps).cpu().split([mb.positions_cpu.numel() for mb in batches])):
            full = torch.zeros(mb.num_tokens, dtype=torch.float32)
            full[mb.positions_cpu] = torch.where(mb.mask_cpu, lp, 0.0)
            out.append(full)
        return out

    @torch.no_grad()
    def param_norm(self) -> float:
        """L2 norm of all weights (under ZeRO-3 each rank sums its own shard)."""
        import torch.distributed as dist

        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.hf.parameters():
            shard = getattr(p, "ds_tensor", None)  # ZeRO-3 partition; the full tensor otherwise
            sq += (p.data if shard is None else shard).double().pow(2).sum()
        if self.cfg.zero_stage == 3 and dist.is_initialized():
            dist.all_reduce(sq)
        return float(sq.sqrt())

    def scale_lr(self, factor: float) -> float:
        sched = self.engine.lr_scheduler
        sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        for group in self.engine.optimizer.param_groups:  # the rate the next update uses
            group["lr"] *= factor
        return sched.base_lrs[0]

    # ---- checkpoints ------------------------------------------------------------------

    def save_checkpoint(self, folder: str, client_state: dict) -> str:
        """This rank's state into `folder` (the group makes the folder and publishes it)."""
        import torch.distributed as dist

        path = Path(folder)
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False,
                                    client_state={**client_state, "updates": self.updates})
        torch.save(ckpt.rng_state(), ckpt.rng_path(path, self.rank))
        dist.barrier()
        return folder

    def load_checkpoint(self, folder: str) -> dict:
        path = Path(folder)
        loaded, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")
        ckpt.set_rng_state(torch.load(ckpt.rng_path(path, self.rank), weights_only=False))
        self.updates = int(client_state.get("updates", 0))
        return client_state

    def export_hf(self, out_dir: str, bucket_mb: float = 512) -> str | None:
        """Write a Hugging Face folder (rank 0); all ranks take part in the gathers."""
        import torch.distributed as dist

        plan = sync_plan(self.hf, bucket_mb)
        buckets = cpu_buckets(self.hf, plan, keep=self.rank == 0)
        if self.rank == 0:
            state = {name: t.clone() for bucket, flat in buckets for name, t in unflatten_bucket(flat, bucket)}
            if self.lora.rank:
                state = merge_lora_state(state, self.lora.scaling)
            ckpt.write_hf_folder(self.hf, state, self.model_path, out_dir)
        dist.barrier()
        return out_dir if self.rank == 0 else None

    # ---- weights out ------------------------------------------------------------------

    def weight_sync_plan(self, bucket_mb: float) -> list[list[ParamMeta]]:
        """What the engines receive: every weight, or with LoRA only the adapters."""
        return sync_plan(self.hf, bucket_mb, is_adapter if self.lora.rank else None)

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str = "gloo") -> None:
        """Rank 0 joins the trainer->rollout group as its rank 0 (blocks until all join)."""
        if self.rank == 0:
            self._sync_group = create_sync_group(backend, host, port, 0, world_size)
            self._sync_backend = backend

    def broadcast_weights(self, plan: list[list[ParamMeta]], timed: bool = False) -> int:
        """Every rank gathers each bucket (ZeRO-3); rank 0 broadcasts it. Returns bytes sent.
        timed: split the time into gather and send (see weights_out.broadcast_plan). If the
        sync group fails (a receiver died, an abort), rank 0 stops broadcasting but keeps
        walking the plan, so the other ranks' gathers are not left waiting for it, and raises
        at the end."""
        if self.rank == 0 and self._sync_group is None:
            raise RuntimeError("broadcast_weights before init_weight_sync")
        device = self.device if (self.rank == 0 and self._sync_backend == "nccl") else "cpu"
        try:
            self._sync_stats = broadcast_plan(self.hf, plan, device, self._sync_group if self.rank == 0 else None, timed)
        except Exception:
            self._sync_group = None  # unusable: the next sync rebuilds it
            raise
        return self._sync_stats["bytes"]

    def _device_sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def last_sync_stats(self) -> dict:
        """Where the last weight send spent its time (seconds): total_s, and with timed
        sends gather_s (ZeRO-3 all-gather + flatten) and send_s."""
        return dict(getattr(self, "_sync_stats", {}))

    # ---- colocated engines (same GPU) ------------------------------------------------

    def share_weights(self, plan: list[list[ParamMeta]]) -> list[tuple[list[ParamMeta], tuple]]:
        """Every rank gathers the full weights as flat GPU buckets and returns their CUDA
        IPC handles, for the engine on its own GPU; the buckets stay alive until
        `release_shared`. (No NCCL: two processes on one GPU cannot form an NCCL group.)"""
        t0 = time.perf_counter()
        self._shared = list(iter_flat_buckets(self.hf, plan, self.device))
        self._device_sync()
        items = [(bucket, share_bucket(flat)) for bucket, flat in zip(plan, self._shared)]
        self._sync_stats = {"gather_s": time.perf_counter() - t0, "buckets": len(plan),
                            "bytes": sum(f.numel() * f.element_size() for f in self._shared)}
        return items

    def release_shared(self) -> None:
        self._shared = None
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()  # blocks the receivers held are freed once they let go
            torch.cuda.empty_cache()

    def offload_states(self) -> dict:
        """Optimizer state, fp32 master weights and gradient buffers to (pinned) CPU
        memory while a colocated engine generates; the bf16 weights stay for the sync.
        Returns the GPU bytes this process holds afterwards. No-op on CPU."""
        if self.device.type != "cuda":
            return {}
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as S

        t0, before = time.perf_counter(), torch.cuda.memory_reserved()
        if hasattr(self.engine.optimizer, "offload_states"):
            self.engine.offload_states(include=[S.optim_states, S.hp_params, S.lp_grads, S.contiguous_grad_buffer])
        torch.cuda.empty_cache()
        return {"reserved_before": before, "reserved_after": torch.cuda.memory_reserved(),
                "offload_s": time.perf_counter() - t0}

    def reload_states(self) -> float:
        """Back to the GPU before training; returns the seconds taken."""
        t0 = time.perf_counter()
        if self.device.type == "cuda" and getattr(self.engine.optimizer, "offloaded_states", None):
            self.engine.reload_states()
        return time.perf_counter() - t0

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory(self) -> dict:
        """This rank's GPU memory (bytes): held by torch now, its peak, and the device's free."""
        if self.device.type != "cuda":
            return {}
        free, total = torch.cuda.mem_get_info()
        return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
                "peak_allocated": torch.cuda.max_memory_allocated(), "device_free": free, "device_total": total,
                "pid": os.getpid()}

    def get_weights(self, plan: list[list[ParamMeta]]) -> list[tuple[list[ParamMeta], torch.Tensor]] | None:
        """Object-store path: rank 0 returns (bucket, flat CPU tensor) pairs, others None."""
        buckets = cpu_buckets(self.hf, plan, keep=self.rank == 0)
        return buckets if self.rank == 0 else None

    # ---- exit -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Leave the process groups in order; without this an abort at interpreter
        exit ('terminate called without an active exception') was seen."""
        import torch.distributed as dist

        self._sync_group = None
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
