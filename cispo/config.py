"""Typed configuration schema, one dataclass per Hydra group under `conf/`.

Hydra/OmegaConf check types when the YAML is composed (launch/ registers these
classes with Hydra's ConfigStore); `validate()` then checks values and their
relations, and fails at start-up with a message naming the key and what is allowed.
This module imports nothing but the standard library so the schema is usable
everywhere (rollout and trainer actors, tests, tools).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

ALGORITHMS = ("cispo", "grpo", "dapo")
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean")
DTYPES = ("float32", "bfloat16", "float16")
OVERLONG_MODES = ("none", "mask", "penalty")
OLD_LOGPROB_SOURCES = ("rollout", "recompute")
BEHAVIOUR_IS_MODES = ("off", "tis", "mis")  # cispo.offpolicy.MODES (tests/cispo checks they agree)
BEHAVIOUR_IS_LEVELS = ("token", "sequence")
# kernels.lm_head_logprobs modes (tests/cispo checks this list against kernels.MODES).
LM_HEAD_MODES = ("auto", "fp16x2", "bf16x3", "tf32x3", "fp32", "bf16")
# Attention of the trainer's body on packed micro-batches (trainer/attention.py says which
# build a dense [T, T] mask and which do not).
ATTN_IMPLEMENTATIONS = ("sdpa", "varlen", "flex_attention", "eager", "flash_attention_2")
WEIGHT_SYNC_PATHS = ("collective", "object_store")
WEIGHT_LOAD_MODES = ("auto", "direct", "reload")
RUN_MODES = ("sync", "async")
LOGGER_BACKENDS = ("console", "jsonl", "wandb", "tensorboard")
CLUSTER_KINDS = ("local", "slurm")
GUARD_ACTIONS = ("stop", "rollback", "warn")
WARMUP_MODES = ("format", "solve")
PLACEMENT_MODES = ("split", "colocate")


@dataclass
class LoraConfig:
    # LoRA through peft (trainer/lora.py): only the adapters train and only they go to the
    # engines (vLLM's LoRA support); the LM head stays a full FP32 weight. rank 0 = off.
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])

    def peft_kwargs(self) -> dict[str, Any]:
        """Arguments of `peft.LoraConfig` (the trainer's model and the engines' adapter folders)."""
        return {"r": int(self.rank), "lora_alpha": float(self.alpha), "lora_dropout": float(self.dropout),
                "target_modules": list(self.target_modules), "bias": "none"}

    @property
    def scaling(self) -> float:
        """peft's factor on B A (without rslora): alpha / rank."""
        return float(self.alpha) / int(self.rank)


@dataclass
class ModelConfig:
    # A Hugging Face model folder, or "builtin:<name>" for a tiny model made and cached locally.
    path: str = "builtin:tiny-qwen2"
    dtype: str = "float32"
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class AlgorithmConfig:
    name: str = "cispo"
    # None takes the algorithm's published default (cispo.objectives.ALGORITHM_DEFAULTS).
    eps_low: Optional[float] = None
    eps_high: Optional[float] = None
    token_mask: bool = False  # CISPO's unified form with the trust-region mask M_it
    loss_agg: Optional[str] = None
    group_size: int = 8  # G samples per prompt
    normalize_std: bool = True
    dynamic_sampling: bool = True  # drop groups whose rewards have zero spread, then refill
    max_refills: int = 3
    overlong: str = "mask"  # what happens to responses that hit the length limit
    # soft penalty ramp length (tokens) for overlong="penalty"; None = a fifth of rollout.max_new_tokens
    overlong_buffer: Optional[int] = None
    overlong_penalty: float = 1.0
    # Behaviour-policy correction (cispo.offpolicy) when trainer.old_logprobs=recompute: each
    # token's loss is weighted by pi_old/pi_rollout, truncated ("tis") or masked ("mis") at the
    # cap, per token or per sequence. It corrects async staleness and train/inference mismatch.
    behaviour_is: str = "tis"
    behaviour_is_level: str = "token"
    behaviour_is_cap: float = 2.0
    behaviour_is_floor: float = 0.0  # mis: weights below it are masked too


@dataclass
class LengthScheduleConfig:
    # M1's staged generation budget (launch/length_schedule.py): generate with stages[0]
    # tokens, move to the next stage once the 99th-percentile response length has stayed
    # >= p99_frac x the limit for `patience` steps and the policy has settled (|slope| of
    # reward and of entropy per step, over the last `window` steps, below max_slope).
    # Empty = a fixed budget of rollout.max_new_tokens (which bounds every stage).
    stages: list[int] = field(default_factory=list)
    p99_frac: float = 0.9
    patience: int = 3
    window: int = 10
    max_slope: float = 0.01


@dataclass
class RolloutConfig:
    num_engines: int = 1
    tensor_parallel_size: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    max_model_len: int = 512
    gpu_memory_utilization: float = 0.2
    lm_head_fp32: bool = True
    repetition_stop: bool = True
    repetition_window: int = 3000  # M1: stop after this many consecutive tokens ...
    repetition_prob: float = 0.99  # ... each sampled with probability above this
    stop: list[str] = field(default_factory=list)
    weight_sync: str = "collective"
    sync_bucket_mb: int = 64
    sync_port: int = 0  # the weight-sync group's TCP port on trainer rank 0's node; 0 = a free one
    enforce_eager: Optional[bool] = None  # vLLM: True skips torch.compile / CUDA graphs (faster start)
    # How received weights enter vLLM: "direct" (each parameter's loader copies in place: CUDA,
    # unquantized), "reload" (vLLM's layerwise reload: re-processes every layer; CPU, quantized),
    # "auto" = direct where it is valid.
    weight_load: str = "auto"
    seed: int = 0  # the run's `seed` (conf/config.yaml interpolates it)
    # One generator per request, seeded by (seed, group, sample): samples do not depend on
    # batching, so runs and resumed runs repeat exactly (a per-request cost in vLLM's sampler).
    seeded_requests: bool = True
    # Times one engine slot is started again after its engine died (mid-run) or failed to
    # start, before the run stops with an error naming it.
    max_restarts: int = 3
    # Any other `vllm.LLM` argument, passed as is: e.g. {max_num_seqs: 1024, enforce_eager: true,
    # kv_cache_memory_bytes: 4e9 (a fixed KV cache, no memory profiling: engines sharing a GPU)}.
    engine_args: dict[str, Any] = field(default_factory=dict)
    length_schedule: LengthScheduleConfig = field(default_factory=LengthScheduleConfig)
    # MoE models: record the experts each token was routed to and return them with the
    # trajectory (for trainer.routing_replay); runs the engine eagerly, without prefix caching.
    record_routing: bool = False


@dataclass
class TrainerConfig:
    num_ranks: int = 1
    zero_stage: int = 2
    dtype: str = "float32"
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9  # M1: beta = (0.9, 0.95), eps = 1e-15
    adam_beta2: float = 0.95
    adam_eps: float = 1e-15
    grad_clip: float = 1.0
    micro_batch_tokens: int = 4096
    mini_batch_size: int = 0  # samples per optimizer update; 0 = the whole rollout batch
    epochs: int = 1
    old_logprobs: str = "rollout"  # pi_old from the rollout engine, or recomputed before the first update
    logprob_chunk_tokens: int = 1024
    # Precision of the FP32 LM head's products (kernels.lm_head_logprobs): "auto" = fp16x2 on
    # GPUs (fp32-accurate, tensor cores), exact fp32 on CPU.
    lm_head_mode: str = "auto"
    # Speed options (trainer/speed.py, bench/trainer_profile.py). "varlen" = flash attention over
    # the packed sequences' boundaries, no [T, T] mask (sdpa builds one when a micro-batch holds
    # several sequences); "flex_attention" = torch FlexAttention with a document block mask.
    attn_implementation: str = "sdpa"
    liger: bool = False  # Liger-Kernel's fused RMSNorm, SwiGLU and rotary (not its cross entropy)
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (non-reentrant)
    compile: bool = False  # torch.compile each decoder layer
    # torch threads of each rank on a CPU machine; 0 = the host's cores shared by the ranks
    # (sync mode: the engines idle while the trainer steps; async mode uses 1, leaving them theirs)
    cpu_threads: int = 0
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    # MoE models: route each token to the experts the rollout engine used (needs
    # rollout.record_routing); the routing weights still come from the live router.
    routing_replay: bool = False
    # MoE models: weight of the load-balancing auxiliary loss (Switch Transformer's); 0 = off.
    moe_aux_loss_coef: float = 0.0


@dataclass
class DataConfig:
    # "builtin:<task>" or a jsonl/parquet file or a datasets folder.
    path: str = "builtin:arithmetic"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    difficulty: int = 1
    max_prompt_tokens: int = 256
    rollout_batch_size: int = 64  # samples per step = prompts per step x algorithm.group_size
    apply_chat_template: bool = False
    shuffle: bool = True


@dataclass
class WarmupConfig:
    """Supervised warm-start on a built-in task before RL (launch/warmup.py). 0 steps = off.

    mode "format": answers shuffled across prompts, so the model learns to answer, not the
    answers. mode "solve": correct (worked) solutions, stopped once the sampled pass rate on
    held-out prompts reaches target_pass_rate (checked every check_every steps).
    """

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 32
    examples: int = 2000
    mode: str = "format"
    target_pass_rate: Optional[float] = None
    check_every: int = 25
    check_prompts: int = 64
    cache: bool = False  # share the warmed model between runs with the same settings (and seed)


@dataclass
class EvalConfig:
    # Held-out prompts (launch/evaluation.py): a .jsonl/.parquet file, a datasets folder or
    # builtin:<task> (its "eval" split, disjoint from training's); null = the built-in
    # training task's eval split (with file data: no evaluation unless a path is given).
    # Fields, chat template and prompt length follow data.*.
    path: Optional[str] = None
    num_prompts: int = 64  # the first n held-out prompts
    every: int = 0  # steps between evaluations; 0 = only at the end
    at_end: bool = True
    samples: int = 4  # samples per prompt at rollout.temperature, for pass@k (k = 1..samples)
    max_new_tokens: Optional[int] = None  # null = the rollout's current budget


@dataclass
class ExportConfig:
    # A Hugging Face folder (safetensors, config, tokenizer, generation config) of the final
    # policy in <output_dir>/<dir> (launch/export.py; `cispo-export` for any checkpoint).
    at_end: bool = True
    dir: str = "hf_model"


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["builtin"])
    weights: list[float] = field(default_factory=list)  # empty = all 1.0
    timeout_s: float = 10.0
    num_workers: int = 2
    url: Optional[str] = None  # for the remote reward server
    max_retries: int = 2
    max_concurrency: int = 16


@dataclass
class LoggerConfig:
    backends: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    project: str = "cispo"
    run_name: Optional[str] = None
    samples_every: int = 10  # steps between tables of sample generations
    # false: vLLM, Ray and DeepSpeed output goes to <output_dir>/logs/, the console shows the
    # progress bar, the summary and warnings (launch/console.py); true: everything on the console
    verbose: bool = False


@dataclass
class ClusterConfig:
    kind: str = "local"
    address: Optional[str] = None  # attach to an existing Ray cluster (RAY_ADDRESS also works)
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 2
    partition: Optional[str] = None
    time_minutes: int = 60
    dry_run: bool = False
    exclusive: Optional[bool] = None  # whole nodes; None = only when GPUs are asked for
    signal_seconds: Optional[int] = None  # time-limit warning lead; None = min(300, time/5), >= 60
    join_timeout_s: int = 300  # bound on waiting for every node to join the Ray cluster
    max_requeues: int = 20  # the job's own requeues after time-limit warnings
    sbatch_args: list[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. ["--account=rl"]
    job_name: Optional[str] = None


@dataclass
class GuardConfig:
    """The collapse guard (launch/guard.py): when a run stops learning, say so and act."""

    enabled: bool = True
    window: int = 10  # K: consecutive steps a symptom must last
    flat_group_frac: float = 0.95  # a step is flat when at least this fraction of groups has zero reward spread
    converged_margin: float = 0.1  # flat within this of the run's best (5-step mean) reward: converged, not collapsed
    max_nonfinite_steps: int = 3  # consecutive steps with a non-finite loss/gradient (each one is alerted)
    action: str = "stop"  # stop (non-zero exit) | rollback (to the last good checkpoint, lower lr) | warn
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 2  # then stop


@dataclass
class PlacementConfig:
    """Where rollout engines and trainer ranks run (launch/placement.py). The counts are
    GPUs; 0 and 0 = everything on CPU (the default: CI, laptops)."""

    # split: engines and ranks on GPUs of their own, weights over NCCL.
    # colocate: each GPU holds one trainer rank and one engine; vLLM sleeps while the
    # trainer steps, weights go to the engine by CUDA IPC.
    mode: str = "split"
    rollout_gpus: int = 0  # = rollout.num_engines x rollout.tensor_parallel_size
    trainer_gpus: int = 0  # = trainer.num_ranks (one rank per GPU)
    offload_optimizer: bool = True  # colocate: the trainer's optimizer state on CPU while engines generate
    cpus_per_actor: float = 1.0
    ready_timeout_s: float = 120.0  # bound on Ray reserving the resources once the fit check passed


def placement_gpus(p: Any) -> int:
    """GPUs a placement (PlacementConfig or its OmegaConf node) asks for in all."""
    return p.trainer_gpus if p.mode == "colocate" else p.rollout_gpus + p.trainer_gpus


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    steps: int = 20
    seed: int = 0
    mode: str = "sync"
    max_staleness: int = 1
    output_dir: str = "runs/default"
    resume: bool = True


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"config error at '{key}': {problem}")
        self.key = key


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
