"""Typed configuration schema, one dataclass per Hydra group under `conf/`.

Hydra/OmegaConf check types when the YAML is composed (launch/ registers these
classes with Hydra's ConfigStore); `cispo.config_checks.validate()` then checks values
and their relations, and fails at start-up with a message naming the key and what is allowed.
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
ATTN_IMPLEMENTATIONS = ("sdpa", "varlen", "varlen_fa2", "flex_attention", "eager", "flash_attention_2")
WEIGHT_SYNC_PATHS = ("collective", "object_store")
WEIGHT_LOAD_MODES = ("auto", "copy", "direct", "reload")
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
    # How received weights enter vLLM: "copy" (a precomputed copy per tensor, batched: CUDA,
    # TP 1, unquantized), "direct" (each parameter's loader copies in place: CUDA, unquantized),
    # "reload" (vLLM's layerwise reload: re-processes every layer; CPU, quantized), "auto" =
    # copy for plain Qwen2/Llama-family models, else direct, where valid.
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
    # several sequences), and cuDNN's dense kernel for a row of sequences of one length on Hopper;
    # "varlen_fa2" = flash attention for every row; "flex_attention" = torch FlexAttention with a
    # document block mask.
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
