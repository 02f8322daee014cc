"""Value checks of the configuration (`validate`): each names the key and what is allowed, at
start-up, before anything starts. The schema they check is `cispo.config`; like it, this module
imports nothing but the standard library."""

from __future__ import annotations

from typing import Any

from cispo.config import (
    ALGORITHMS,
    ATTN_IMPLEMENTATIONS,
    BEHAVIOUR_IS_LEVELS,
    BEHAVIOUR_IS_MODES,
    CLUSTER_KINDS,
    ConfigError,
    DTYPES,
    GUARD_ACTIONS,
    LM_HEAD_MODES,
    LOGGER_BACKENDS,
    LOSS_AGG_MODES,
    OLD_LOGPROB_SOURCES,
    OVERLONG_MODES,
    PLACEMENT_MODES,
    RUN_MODES,
    WARMUP_MODES,
    WEIGHT_LOAD_MODES,
    WEIGHT_SYNC_PATHS,
    placement_gpus,
)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not allowed; allowed values: {', '.join(allowed)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(key, f"{value!r} must be >= {low}")


def _validate_behaviour_is(cfg: Any) -> None:
    a = cfg.algorithm
    _one_of("algorithm.behaviour_is", a.behaviour_is, BEHAVIOUR_IS_MODES)
    _one_of("algorithm.behaviour_is_level", a.behaviour_is_level, BEHAVIOUR_IS_LEVELS)
    _at_least("algorithm.behaviour_is_cap", a.behaviour_is_cap, 1.0)
    if not 0 <= a.behaviour_is_floor < 1:
        raise ConfigError("algorithm.behaviour_is_floor", f"{a.behaviour_is_floor!r} must be in [0, 1)")
    if a.behaviour_is_floor and a.behaviour_is != "mis":
        raise ConfigError("algorithm.behaviour_is_floor", f"is used by behaviour_is=mis only (behaviour_is={a.behaviour_is!r})")
    if cfg.mode == "async" and cfg.trainer.old_logprobs == "recompute" and a.behaviour_is == "off":
        raise ConfigError(
            "algorithm.behaviour_is",
            "'off' with mode=async and trainer.old_logprobs=recompute: pi_old would be the trainer's current "
            "policy and the rollouts' one-version lag would go uncorrected; use tis or mis",
        )


def validate(cfg: Any) -> None:
    """Check values and cross-field rules of a `Config` (or an OmegaConf node of one)."""
    a, r, t, d = cfg.algorithm, cfg.rollout, cfg.trainer, cfg.data
    _one_of("algorithm.name", a.name, ALGORITHMS)
    if a.loss_agg is not None:
        _one_of("algorithm.loss_agg", a.loss_agg, LOSS_AGG_MODES)
    if a.eps_low is not None:
        _at_least("algorithm.eps_low", a.eps_low, 0.0)
    if a.eps_high is not None:
        _at_least("algorithm.eps_high", a.eps_high, 0.0)
    # group-relative advantages need two samples of a prompt: a group of one has advantage 0
    _at_least("algorithm.group_size", a.group_size, 2)
    _at_least("algorithm.max_refills", a.max_refills, 0)
    _one_of("algorithm.overlong", a.overlong, OVERLONG_MODES)
    if a.overlong_buffer is not None:
        _at_least("algorithm.overlong_buffer", a.overlong_buffer, 0)
        if a.overlong == "penalty" and a.overlong_buffer >= r.max_new_tokens:
            raise ConfigError("algorithm.overlong_buffer",
                              f"{a.overlong_buffer} >= rollout.max_new_tokens={r.max_new_tokens}: every response would "
                              "be penalised; keep the ramp inside the generation budget (null = a fifth of it)")
    if a.token_mask and a.name != "cispo":
        raise ConfigError("algorithm.token_mask", f"is CISPO's trust-region mask; {a.name} clips with its own min()")

    _one_of("model.dtype", cfg.model.dtype, DTYPES)
    if not cfg.model.path:
        raise ConfigError("model.path", "is empty; give a Hugging Face model folder or builtin:<name>")

    _validate_placement(cfg)  # first: the engine and rank counts may come from it
    _at_least("rollout.num_engines", r.num_engines, 1)
    _at_least("rollout.tensor_parallel_size", r.tensor_parallel_size, 1)
    if r.temperature <= 0:
        raise ConfigError("rollout.temperature", f"{r.temperature!r} must be > 0 (log-probs are taken under the sampling distribution)")
    if not 0 < r.top_p <= 1:
        raise ConfigError("rollout.top_p", f"{r.top_p!r} must be in (0, 1]")
    if r.top_k == 0 or r.top_k < -1:
        raise ConfigError("rollout.top_k", f"{r.top_k!r} must be -1 (off) or >= 1")
    _at_least("rollout.max_new_tokens", r.max_new_tokens, 1)
    if not 0 < r.gpu_memory_utilization <= 1:
        raise ConfigError("rollout.gpu_memory_utilization", f"{r.gpu_memory_utilization!r} must be in (0, 1]")
    if not 0.5 <= r.repetition_prob < 1:
        # at p >= 0.5 "each token above p" identifies the argmax, which the stop relies on
        raise ConfigError("rollout.repetition_prob", f"{r.repetition_prob!r} must be in [0.5, 1)")
    _at_least("rollout.repetition_window", r.repetition_window, 1)
    _one_of("rollout.weight_sync", r.weight_sync, WEIGHT_SYNC_PATHS)
    _one_of("rollout.weight_load", r.weight_load, WEIGHT_LOAD_MODES)
    if not 0 <= r.sync_port <= 65535:
        raise ConfigError("rollout.sync_port", f"{r.sync_port!r} must be a TCP port (1-65535) or 0 (a free one)")
    _at_least("rollout.sync_bucket_mb", r.sync_bucket_mb, 1)
    _at_least("rollout.max_restarts", r.max_restarts, 0)
    if d.max_prompt_tokens + r.max_new_tokens > r.max_model_len:
        raise ConfigError(
            "rollout.max_model_len",
            f"{r.max_model_len} is smaller than data.max_prompt_tokens + rollout.max_new_tokens = "
            f"{d.max_prompt_tokens + r.max_new_tokens}; raise rollout.max_model_len (rollout=gpu sizes it "
            f"for long responses) or lower data.max_prompt_tokens",
        )
    _validate_length_schedule(r)

    _at_least("trainer.num_ranks", t.num_ranks, 1)
    _one_of("trainer.zero_stage", str(t.zero_stage), ("0", "1", "2", "3"))
    _one_of("trainer.dtype", t.dtype, DTYPES)
    if t.lr <= 0:
        raise ConfigError("trainer.lr", f"{t.lr!r} must be > 0")
    _at_least("trainer.warmup_steps", t.warmup_steps, 0)
    if not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1):
        raise ConfigError("trainer.adam_beta1/adam_beta2", f"({t.adam_beta1}, {t.adam_beta2}) must each be in [0, 1)")
    if t.adam_eps <= 0:
        raise ConfigError("trainer.adam_eps", f"{t.adam_eps!r} must be > 0")
    _at_least("trainer.micro_batch_tokens", t.micro_batch_tokens, 1)
    _at_least("trainer.cpu_threads", t.cpu_threads, 0)
    _at_least("trainer.mini_batch_size", t.mini_batch_size, 0)
    _at_least("trainer.epochs", t.epochs, 1)
    _one_of("trainer.old_logprobs", t.old_logprobs, OLD_LOGPROB_SOURCES)
    _validate_behaviour_is(cfg)
    if (r.top_p < 1 or r.top_k > 0) and t.old_logprobs == "rollout":
        raise ConfigError(
            "trainer.old_logprobs",
            "'rollout' with rollout.top_p < 1 or rollout.top_k > 0: the engine's log-probs are then over the "
            "truncated distribution, not the full one the trainer computes; use trainer.old_logprobs=recompute",
        )
    _at_least("trainer.logprob_chunk_tokens", t.logprob_chunk_tokens, 1)
    _at_least("trainer.moe_aux_loss_coef", t.moe_aux_loss_coef, 0.0)
    if t.routing_replay and not r.record_routing:
        raise ConfigError(
            "trainer.routing_replay",
            "needs the rollout engines to record the routing: set rollout.record_routing=true",
        )
    _one_of("trainer.lm_head_mode", t.lm_head_mode, LM_HEAD_MODES)
    _one_of("trainer.attn_implementation", t.attn_implementation, ATTN_IMPLEMENTATIONS)
    if t.liger and t.compile:
        raise ConfigError("trainer.liger/trainer.compile", "choose one: torch.compile fuses the same norms and "
                          "activations that Liger replaces, and Liger's kernels are not tested under compile")
    if t.micro_batch_tokens < d.max_prompt_tokens + r.max_new_tokens:
        raise ConfigError(
            "trainer.micro_batch_tokens",
            f"{t.micro_batch_tokens} cannot hold one sequence of data.max_prompt_tokens + rollout.max_new_tokens "
            f"= {d.max_prompt_tokens + r.max_new_tokens} tokens",
        )

    _at_least("data.rollout_batch_size", d.rollout_batch_size, 1)
    if d.rollout_batch_size % a.group_size:
        raise ConfigError(
            "data.rollout_batch_size",
            f"{d.rollout_batch_size} is not divisible by algorithm.group_size={a.group_size} "
            f"(each prompt is sampled group_size times)",
        )
    if t.mini_batch_size and d.rollout_batch_size % t.mini_batch_size:
        raise ConfigError(
            "trainer.mini_batch_size",
            f"{t.mini_batch_size} does not divide data.rollout_batch_size={d.rollout_batch_size}",
        )
    _at_least("data.max_prompt_tokens", d.max_prompt_tokens, 1)
    w = cfg.warmup
    _at_least("warmup.steps", w.steps, 0)
    _one_of("warmup.mode", w.mode, WARMUP_MODES)
    if w.steps and not d.path.startswith("builtin:"):
        raise ConfigError("warmup.steps", f"the warm-start needs a built-in task; data.path={d.path!r}: "
                                          "set warmup.steps=0 for your own model and data")
    if w.steps and not str(cfg.model.path).startswith("builtin:"):
        raise ConfigError("warmup.steps", f"the warm-start runs in the driver, for the built-in small models; "
                                          f"model.path={cfg.model.path!r}: set warmup.steps=0")
    if w.target_pass_rate is not None:
        if w.mode != "solve":
            raise ConfigError("warmup.target_pass_rate", "applies to warmup.mode=solve only")
        if not 0 < w.target_pass_rate < 1:
            raise ConfigError("warmup.target_pass_rate", f"{w.target_pass_rate!r} must be in (0, 1)")
    _at_least("warmup.check_every", w.check_every, 1)
    _at_least("warmup.check_prompts", w.check_prompts, 1)
    _validate_lora(cfg.model.lora)
    _validate_eval(cfg)

    if not cfg.reward.functions:
        raise ConfigError("reward.functions", "is empty; name at least one reward function")
    if cfg.reward.weights and len(cfg.reward.weights) != len(cfg.reward.functions):
        raise ConfigError(
            "reward.weights",
            f"has {len(cfg.reward.weights)} entries for {len(cfg.reward.functions)} reward.functions",
        )
    if cfg.reward.timeout_s <= 0:
        raise ConfigError("reward.timeout_s", f"{cfg.reward.timeout_s!r} must be > 0")

    if not getattr(cfg, "export", None) or not str(cfg.export.dir).strip():
        raise ConfigError("export.dir", "is empty; name a folder under output_dir")

    for i, backend in enumerate(cfg.logger.backends):
        _one_of(f"logger.backends[{i}]", backend, LOGGER_BACKENDS)

    _one_of("cluster.kind", cfg.cluster.kind, CLUSTER_KINDS)
    _at_least("cluster.nodes", cfg.cluster.nodes, 1)
    _at_least("cluster.time_minutes", cfg.cluster.time_minutes, 1)
    _at_least("cluster.join_timeout_s", cfg.cluster.join_timeout_s, 1)
    _at_least("cluster.max_requeues", cfg.cluster.max_requeues, 0)
    if cfg.cluster.signal_seconds is not None:
        _at_least("cluster.signal_seconds", cfg.cluster.signal_seconds, 1)

    g = cfg.guard
    _at_least("guard.window", g.window, 1)
    if not 0 < g.flat_group_frac <= 1:
        raise ConfigError("guard.flat_group_frac", f"{g.flat_group_frac!r} must be in (0, 1]")
    _at_least("guard.max_nonfinite_steps", g.max_nonfinite_steps, 1)
    _at_least("guard.converged_margin", g.converged_margin, 0.0)
    _one_of("guard.action", g.action, GUARD_ACTIONS)
    if not 0 < g.rollback_lr_factor <= 1:
        raise ConfigError("guard.rollback_lr_factor", f"{g.rollback_lr_factor!r} must be in (0, 1]")
    _at_least("guard.max_rollbacks", g.max_rollbacks, 0)
    if g.enabled and g.action == "rollback":
        if not t.save_every:
            raise ConfigError("guard.action", "'rollback' needs checkpoints to roll back to: set trainer.save_every > 0")
        # the newest checkpoint from before a window of bad steps must still be kept
        need = -(-g.window // t.save_every) + 1
        if t.keep_checkpoints < need:
            raise ConfigError("trainer.keep_checkpoints", f"{t.keep_checkpoints} is too few for guard.action=rollback "
                              f"with guard.window={g.window} and trainer.save_every={t.save_every}: keep >= {need}")

    _at_least("steps", cfg.steps, 1)
    _one_of("mode", cfg.mode, RUN_MODES)
    _at_least("max_staleness", cfg.max_staleness, 0)
    if cfg.mode == "async" and cfg.max_staleness != 1:
        raise ConfigError("max_staleness", f"{cfg.max_staleness} with mode=async; allowed: 1 (rollouts one step ahead)")


def _validate_length_schedule(r: Any) -> None:
    ls = r.length_schedule
    stages = list(ls.stages)
    for i, n in enumerate(stages):
        _at_least(f"rollout.length_schedule.stages[{i}]", n, 1)
    if any(b <= a for a, b in zip(stages, stages[1:])):
        raise ConfigError("rollout.length_schedule.stages", f"{stages} must increase strictly")
    if stages and stages[-1] > r.max_new_tokens:
        raise ConfigError("rollout.length_schedule.stages",
                          f"the last stage {stages[-1]} exceeds rollout.max_new_tokens={r.max_new_tokens}, which "
                          f"sizes the engines and the trainer's micro-batches for the longest budget")
    if not 0 < ls.p99_frac <= 1:
        raise ConfigError("rollout.length_schedule.p99_frac", f"{ls.p99_frac!r} must be in (0, 1]")
    _at_least("rollout.length_schedule.patience", ls.patience, 1)
    _at_least("rollout.length_schedule.window", ls.window, 2)
    _at_least("rollout.length_schedule.max_slope", ls.max_slope, 0.0)


def _validate_lora(lora: Any) -> None:
    _at_least("model.lora.rank", lora.rank, 0)
    if lora.rank:
        if lora.alpha <= 0:
            raise ConfigError("model.lora.alpha", f"{lora.alpha!r} must be > 0")
        if not 0 <= lora.dropout < 1:
            raise ConfigError("model.lora.dropout", f"{lora.dropout!r} must be in [0, 1)")
        if not lora.target_modules:
            raise ConfigError("model.lora.target_modules", "is empty; name the linear layers to adapt")
        if any("lm_head" in m for m in lora.target_modules):
            raise ConfigError("model.lora.target_modules", "lm_head stays a full FP32 weight; adapt body layers only")


def _validate_eval(cfg: Any) -> None:
    e = cfg.eval
    _at_least("eval.num_prompts", e.num_prompts, 1)
    _at_least("eval.every", e.every, 0)
    _at_least("eval.samples", e.samples, 1)
    if e.max_new_tokens is not None:
        _at_least("eval.max_new_tokens", e.max_new_tokens, 1)
        if e.max_new_tokens > cfg.rollout.max_new_tokens:
            raise ConfigError("eval.max_new_tokens", f"{e.max_new_tokens} exceeds rollout.max_new_tokens="
                                                     f"{cfg.rollout.max_new_tokens} (the engines' budget)")
    if e.path is not None and not str(e.path).strip():
        raise ConfigError("eval.path", "is empty; give a file, a datasets folder, builtin:<task> or null")


PLACEMENT_PRESETS = "placement=colocate_1 (1 GPU), split_1_1 (2 GPUs), colocate_8 or split_4_4 (8 GPUs)"


def _validate_placement(cfg: Any) -> None:
    """The placement against the counts it implies: trainer.num_ranks = trainer GPUs,
    rollout.num_engines x tensor_parallel_size = rollout GPUs (checked, not guessed)."""
    p, r, t = cfg.placement, cfg.rollout, cfg.trainer
    _one_of("placement.mode", p.mode, PLACEMENT_MODES)
    _at_least("placement.rollout_gpus", p.rollout_gpus, 0)
    _at_least("placement.trainer_gpus", p.trainer_gpus, 0)
    if p.cpus_per_actor <= 0:
        raise ConfigError("placement.cpus_per_actor", f"{p.cpus_per_actor!r} must be > 0")
    if p.ready_timeout_s <= 0:
        raise ConfigError("placement.ready_timeout_s", f"{p.ready_timeout_s!r} must be > 0")
    on_gpu = p.rollout_gpus > 0 or p.trainer_gpus > 0
    if not on_gpu:
        if p.mode == "colocate":
            raise ConfigError("placement.mode", "colocate needs GPUs (vLLM sleep mode, CUDA IPC); set "
                              f"placement.trainer_gpus/rollout_gpus or choose a preset: {PLACEMENT_PRESETS}")
        if t.num_ranks < 1 or r.num_engines < 1:
            raise ConfigError("placement", "trainer.num_ranks / rollout.num_engines come from the placement's GPU "
                              f"counts, which are 0 (the CPU placement); choose a GPU placement: {PLACEMENT_PRESETS}")
        return
    if p.rollout_gpus == 0 or p.trainer_gpus == 0:
        raise ConfigError("placement.rollout_gpus", f"rollout_gpus={p.rollout_gpus}, trainer_gpus={p.trainer_gpus}: "
                          "both 0 (everything on CPU) or both > 0")
    if p.mode == "colocate":
        if p.rollout_gpus != p.trainer_gpus:
            raise ConfigError("placement.rollout_gpus", f"colocate shares the same GPUs: rollout_gpus={p.rollout_gpus} "
                              f"must equal trainer_gpus={p.trainer_gpus}")
        if r.tensor_parallel_size != 1:
            raise ConfigError("rollout.tensor_parallel_size", f"{r.tensor_parallel_size} with placement.mode=colocate; "
                              "colocated engines run one per GPU (tensor_parallel_size=1), use placement.mode=split")
        if p.offload_optimizer and str(t.zero_stage) not in ("1", "2"):
            raise ConfigError("trainer.zero_stage", f"{t.zero_stage} with placement.offload_optimizer: DeepSpeed moves "
                              "the state of the trainer's torch AdamW only under ZeRO-1/2 (ZeRO-3 needs its FusedAdam); "
                              "use trainer.zero_stage=2 (the colocate presets do) or placement.offload_optimizer=false")
        if cfg.model.lora.rank:
            raise ConfigError("model.lora.rank", "LoRA adapters travel through the object store, not the colocated "
                              "CUDA IPC path; use placement.mode=split with LoRA")
        if cfg.mode == "async":
            raise ConfigError("mode", "async with placement.mode=colocate: colocated engines sleep while the trainer "
                              "steps, so generation cannot overlap training; use mode=sync or placement.mode=split")
    if t.num_ranks != p.trainer_gpus:
        raise ConfigError("trainer.num_ranks", f"{t.num_ranks} ranks but placement.trainer_gpus={p.trainer_gpus} "
                          "(one rank per GPU): make them equal")
    if r.num_engines * r.tensor_parallel_size != p.rollout_gpus:
        raise ConfigError("rollout.num_engines", f"{r.num_engines} engines x rollout.tensor_parallel_size="
                          f"{r.tensor_parallel_size} = {r.num_engines * r.tensor_parallel_size} GPUs but "
                          f"placement.rollout_gpus={p.rollout_gpus}: set rollout.num_engines="
                          f"{max(p.rollout_gpus // r.tensor_parallel_size, 1)}")
    c = cfg.cluster
    if c.kind == "slurm" and placement_gpus(p) > c.nodes * c.gpus_per_node:
        raise ConfigError("cluster.gpus_per_node", f"the placement needs {placement_gpus(p)} GPUs but cluster.nodes="
                          f"{c.nodes} x cluster.gpus_per_node={c.gpus_per_node} = {c.nodes * c.gpus_per_node}")
