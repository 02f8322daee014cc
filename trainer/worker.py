"""One data-parallel trainer rank: a DeepSpeed engine around the policy.

A plain class: `trainer.group.TrainerGroup` runs one per Ray actor, and tests or
scripts may run it in-process. Every method that touches the model is collective —
the group calls it on all ranks at once (ZeRO-3 gathers parameters in forward,
backward, checkpointing and weight export).
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, is_dataclass

import torch

from cispo.aggregation import token_weights
from cispo.batch import PackedBatch
from cispo.config import AlgorithmConfig, LoraConfig, TrainerConfig
from cispo.metrics import merge_stats
from cispo.objectives import policy_loss, resolve_algorithm
from cispo.weight_sync import ParamMeta, broadcast_bucket, create_sync_group, unflatten_bucket
from trainer import checkpoint as ckpt
from trainer.lora import apply_lora, is_adapter, merge_lora_state, trainable_summary
from trainer.ds_setup import build_optimizer, build_scheduler, deepspeed_config
from trainer.policy import PolicyModel, load_hf_causal_lm, loss_positions
from trainer.weights_out import cpu_buckets, iter_flat_buckets, sync_plan


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
        self.attn_implementation = attn_implementation
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

    def setup(self, master_addr: str, master_port: int, dist_backend: str | None = None) -> dict:
        import deepspeed

        use_cuda = torch.cuda.is_available()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size),
                          # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so its GPU is device 0
                          LOCAL_RANK="0" if use_cuda else str(self.rank))
        if use_cuda:
            torch.cuda.set_device(0)
        deepspeed.init_distributed(dist_backend=dist_backend or ("nccl" if use_cuda else "gloo"))
        torch.manual_seed(self.seed + self.rank)
        if not use_cuda:  # Ray's OMP_NUM_THREADS is the actor's CPU count, 1 by default
            torch.set_num_threads(self.cfg.cpu_threads or max(1, (os.cpu_count() or 1) // self.world_size))

        self.hf = load_hf_causal_lm(self.model_path, self.attn_implementation)
        if self.lora.rank:
            apply_lora(self.hf, self.lora)  # in place: only the adapters keep requires_grad
        sizes = trainable_summary(self.hf)
        self.policy = PolicyModel(self.hf, self.cfg.logprob_chunk_tokens, self.cfg.lm_head_mode)
        if self.policy.moe is None and (self.cfg.routing_replay or self.cfg.moe_aux_loss_coef):
            key = "trainer.routing_replay" if self.cfg.routing_replay else "trainer.moe_aux_loss_coef"
            raise ValueError(f"{key} is set but {self.model_path} has no MoE routers (trainer.minimax knows MiniMax's)")
        optimizer = build_optimizer([p for p in self.policy.parameters() if p.requires_grad], self.cfg)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.policy, optimizer=optimizer, config=deepspeed_config(self.cfg, self.world_size),
            lr_scheduler=lambda opt: build_scheduler(opt, self.cfg), dist_init_required=False,
        )
        self.device = self.engine.device
        self.updates = 0  # optimizer updates taken
        return {"rank": self.rank, "device": str(self.device), **sizes,
                "num_params": sum(int(m.numel) for bucket in self.weight_sync_plan(1e9) for m in bucket)}

    # ---- forward / train ------------------------------------------------------------

    def _logprobs(self, mb: PackedBatch, with_entropy: bool):
        positions = loss_positions(mb.loss_mask)
        routed = None
        if self.cfg.routing_replay:
            if mb.routed_experts is None:
                raise ValueError("trainer.routing_replay is on but the batch carries no routing "
                                 "(Trajectory.routed_experts): is rollout.record_routing on?")
            routed = mb.routed_experts
        lp, ent = self.engine(mb.input_ids, mb.position_ids, positions, mb.targets[positions],
                              temperature=self.temperature, with_entropy=with_entropy, routed_experts=routed)
        return positions, lp, ent

    def train_micro_batches(self, micro_batches: list[PackedBatch], num_loss_tokens: int, num_loss_seqs: int,
                            return_logprobs: bool = False) -> dict:
        """One optimizer update from this rank's micro-batches of the update.

        The loss of each micro-batch uses the update's *global* counts, so the sum over
        all micro-batches and ranks is the full update's loss. DeepSpeed averages
        gradients over the data-parallel ranks; multiplying by world_size turns that
        mean back into the sum, i.e. the exact full-batch gradient.
        """
        self.engine.train()
        stats: dict[str, float] = {}
        train_lp, old_lp = [], []
        for i, mb in enumerate(micro_batches):
            mb = mb.to(self.device)
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            pos, lp, ent = self._logprobs(mb, with_entropy=True)
            mask = mb.loss_mask[pos]
            weights = token_weights(mb.loss_mask, mb.seq_index, self.algorithm.loss_agg,
                                    num_loss_tokens, num_loss_seqs)[pos]
            out = policy_loss(self.algorithm, lp, mb.old_logprobs[pos], mb.advantages[pos], weights, mask)
            loss = out.loss + self._moe_terms(stats, int(mask.sum()), num_loss_tokens)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            merge_stats(stats, out.stats)
            merge_stats(stats, {"loss": out.loss.detach(), "entropy_sum": torch.where(mask, ent, 0.0).sum()})
            if return_logprobs:
                train_lp.append(lp.detach()[mask].cpu())
                old_lp.append(mb.old_logprobs[pos][mask].cpu())
        lr = self.engine.get_lr()[0]  # the rate this update uses (the scheduler steps inside step())
        self.engine.step()
        self.updates += 1
        grad_norm = self.engine.get_global_grad_norm()
        out = {"stats": stats, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "lr": lr}
        if return_logprobs:
            out["train_logprobs"], out["old_logprobs"] = torch.cat(train_lp), torch.cat(old_lp)
        return out

    def _moe_terms(self, stats: dict, mb_loss_tokens: int, num_loss_tokens: int):
        """The load-balancing loss of the micro-batch just run (weighted by its share of the
        update's loss tokens, so the update's terms sum to a token-weighted mean) and the
        replay statistics; 0 for dense models."""
        moe = self.policy.moe
        if moe is None:
            return 0.0
        merge_stats(stats, moe.replay_stats())
        if not self.cfg.moe_aux_loss_coef:
            return 0.0
        aux = moe.aux_loss() * (mb_loss_tokens / max(num_loss_tokens, 1))
        merge_stats(stats, {"moe_aux_loss": aux.detach()})
        return self.cfg.moe_aux_loss_coef * aux

    @torch.no_grad()
    def compute_logprobs(self, micro_batches: list[PackedBatch]) -> list[torch.Tensor]:
        """Per micro-batch, a [T] fp32 tensor: log pi(targets[t]) where loss_mask[t], else 0."""
        self.engine.eval()
        out = []
        for mb in micro_batches:
            mb = mb.to(self.device)
            pos, lp, _ = self._logprobs(mb, with_entropy=False)
            full = torch.zeros(mb.num_tokens, dtype=torch.float32, device=self.device)
            full[pos] = torch.where(mb.loss_mask[pos], lp, 0.0)
            out.append(full.cpu())
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

    def save_checkpoint(self, root: str, tag: str, client_state: dict) -> str:
        import torch.distributed as dist

        self.engine.save_checkpoint(root, tag=tag, client_state={**client_state, "updates": self.updates})
        torch.save(ckpt.rng_state(), ckpt.rng_path(root, tag, self.rank))
        dist.barrier()
        if self.rank == 0:
            ckpt.mark_complete(root, tag)
            ckpt.prune(root, self.cfg.keep_checkpoints)
        dist.barrier()
        return os.path.join(root, tag)

    def load_checkpoint(self, root: str, tag: str) -> dict:
        path, client_state = self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {root}")
        ckpt.set_rng_state(torch.load(ckpt.rng_path(root, tag, self.rank), weights_only=False))
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

    def broadcast_weights(self, plan: list[list[ParamMeta]]) -> int:
        """Every rank gathers each bucket (ZeRO-3); rank 0 broadcasts it. Returns bytes sent."""
        if self.rank == 0 and self._sync_group is None:
            raise RuntimeError("broadcast_weights before init_weight_sync")
        device = self.device if (self.rank == 0 and self._sync_backend == "nccl") else "cpu"
        sent = 0
        for flat in iter_flat_buckets(self.hf, plan, device):
            if self.rank == 0:
                broadcast_bucket(self._sync_group, flat)
                sent += flat.numel() * flat.element_size()
        return sent

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
