"""Trainer throughput: tokens/s and MFU of CISPO training steps on one device.

A Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate
4864, vocab 151936, tied embeddings; random weights, nothing downloaded; `--preset qwen2-1.5b`:
hidden 1536, 28 layers, 12 heads, 2 kv heads, intermediate 8960) trains on
random packed sequences with the trainer's own code path: `trainer.worker.TrainerWorker`
(DeepSpeed engine, world size 1, FP32 LM head on response tokens, token-budget
micro-batches, one optimizer update per step). `--engine torch` runs the same policy
forward/loss with plain torch AdamW and bf16 autocast instead, for machines without
DeepSpeed.

Model FLOPs per step (what MFU counts; the head's backward recompute is not counted):
  body   6 * N_body * tokens                 (N_body: parameters of the decoder layers)
  head   6 * V * H * loss_tokens             (the LM head runs on response positions only)
  attn   6 * L * H * sum_seq(len^2)          (QK^T and AV: 12 L H len^2 fwd+bwd, halved for causal)
MFU = model FLOPs / step time / peak; peak = 989 TFLOP/s (H100 and H200 SXM dense bf16 datasheet).
The speed options (trainer.attn_implementation, liger, activation_checkpointing, compile) are
flags here; bench/trainer_profile.py sweeps them and profiles a step.

    python bench/trainer_throughput.py --preset qwen2-0.5b --out result.json
    python bench/trainer_throughput.py --preset tiny --device cpu --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from launch.tiny_model import PRESETS as MODEL_SHAPES  # noqa: E402

PRESETS = {
    "qwen2-0.5b": MODEL_SHAPES["qwen2-0.5b-shape"],
    "qwen2-1.5b": MODEL_SHAPES["qwen2-1.5b-shape"],
    "qwen2-3b": MODEL_SHAPES["qwen2-3b-shape"],
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=256, vocab_size=1000, tie_word_embeddings=True),
}
PEAK_FLOPS = {"cuda": 989e12, "cpu": float("nan")}


def make_model_folder(preset: str, path: Path) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, torch_dtype="bfloat16", **PRESETS[preset])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)  # half the bytes to write and read
    body = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    total = sum(p.numel() for p in model.parameters())
    del model
    return {"params_total": total, "params_body": body, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "vocab": cfg.vocab_size}


def scratch_dir(need_gib: float = 16) -> str | None:
    """/dev/shm when it has room (model folders of GBs load from memory; containers often
    give it only 64 MB), else the default temporary directory."""
    import shutil

    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > need_gib * 2**30 else None
    except OSError:
        return None


def make_batch(args, vocab: int):
    from cispo.batch import Trajectory, pack

    g = torch.Generator().manual_seed(0)
    trajs = []
    for i in range(args.seqs_per_step):
        n = args.seq_len
        if args.mixed_lengths:  # e.g. 1k..4k: several sequences share a packed micro-batch
            n = int(torch.randint(args.seq_len // 4, args.seq_len + 1, (1,), generator=g))
        p = min(args.prompt_len, n // 2)
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        trajs.append(Trajectory(prompt_ids=ids[:p], response_ids=ids[p:],
                                rollout_logprobs=(-11.0 + 0.1 * torch.randn(n - p, generator=g)).tolist(),
                                finish_reason="stop", policy_version=0, advantage=float(torch.randn(1, generator=g))))
    return pack(trajs)


def model_flops(batch, shape) -> float:
    lengths = batch.seq_lengths().double()
    attn = 6.0 * shape["layers"] * shape["hidden"] * float((lengths ** 2).sum())
    return 6.0 * shape["params_body"] * batch.num_tokens + 6.0 * shape["vocab"] * shape["hidden"] * batch.num_loss_tokens + attn


def trainer_config(args, **overrides):
    from cispo.config import TrainerConfig

    cfg = dict(num_ranks=1, zero_stage=args.zero_stage, dtype=args.dtype, lr=1e-6,
               micro_batch_tokens=args.micro_batch_tokens, logprob_chunk_tokens=args.chunk_tokens,
               lm_head_mode=args.head_mode, attn_implementation=args.attn, liger=args.liger,
               activation_checkpointing=args.activation_checkpointing, compile=args.compile)
    return TrainerConfig(**{**cfg, **overrides})


def run_deepspeed(cfg, path, batch):
    """(step function, micro-batches per step, close) for the real trainer: TrainerWorker."""
    from cispo.aggregation import count_loss_seqs
    from cispo.config import AlgorithmConfig
    from trainer.packing import plan_micro_batches
    from trainer.worker import TrainerWorker

    worker = TrainerWorker(0, 1, str(path), cfg, AlgorithmConfig())
    host, port = worker.address()
    worker.setup(host, port)
    plans, _ = plan_micro_batches(batch, list(range(batch.num_seqs)), 1, cfg.micro_batch_tokens)
    n_tok, n_seq = batch.num_loss_tokens, count_loss_seqs(batch.loss_mask, batch.seq_index)

    def step():
        return worker.train_micro_batches(plans[0], n_tok, n_seq)

    def close():  # the engine only: the process group stays for the next run in this process
        worker.engine.destroy()
        worker.engine = None

    return step, len(plans[0]), close


def run_torch(cfg, path, batch):
    """The same forward/loss without DeepSpeed: bf16 autocast, fp32 weights, torch AdamW."""
    from cispo.aggregation import count_loss_seqs
    from cispo.objectives import policy_loss, resolve_algorithm
    from trainer.device_batch import to_device
    from trainer.packing import plan_micro_batches
    from trainer.policy import PolicyModel, load_hf_causal_lm
    from trainer.speed import apply_speed_options

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = load_hf_causal_lm(str(path), cfg.attn_implementation)
    apply_speed_options(hf, cfg)
    policy = PolicyModel(hf, cfg.logprob_chunk_tokens, cfg.lm_head_mode).to(device).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.95), eps=1e-15,
                            fused=device == "cuda")
    alg = resolve_algorithm("cispo")
    plans, _ = plan_micro_batches(batch, list(range(batch.num_seqs)), 1, cfg.micro_batch_tokens)
    n_tok, n_seq = batch.num_loss_tokens, count_loss_seqs(batch.loss_mask, batch.seq_index)
    dtype = getattr(torch, cfg.dtype)

    def step():
        for mb in [to_device(mb, device, alg.loss_agg, n_tok, n_seq) for mb in plans[0]]:
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                lp, _ = policy(*mb.model_inputs(), cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen)
            policy_loss(alg, lp, mb.old_logprobs, mb.advantages, mb.weights, mb.mask).loss.backward()
        with torch.profiler.record_function("trainer.optimizer_step"):
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, len(plans[0]), lambda: None


def add_option_flags(ap) -> None:
    ap.add_argument("--attn", default="sdpa", help="trainer.attn_implementation (sdpa, varlen, flex_attention, ...)")
    ap.add_argument("--liger", action="store_true", help="trainer.liger")
    ap.add_argument("--activation-checkpointing", action="store_true", help="trainer.activation_checkpointing")
    ap.add_argument("--compile", action="store_true", help="trainer.compile")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2-0.5b", choices=sorted(PRESETS))
    ap.add_argument("--engine", default="deepspeed", choices=["deepspeed", "torch"])
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    add_option_flags(ap)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--mixed-lengths", action="store_true", help="lengths in [seq_len/4, seq_len], packed")
    ap.add_argument("--seqs-per-step", type=int, default=16)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--head-mode", default="auto", help="LM-head product precision (trainer.lm_head_mode: auto, fp16x2, bf16x3, tf32x3, fp32)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
        shape = make_model_folder(args.preset, Path(tmp) / "model")
        batch = make_batch(args, shape["vocab"])
        build = run_deepspeed if args.engine == "deepspeed" else run_torch
        step, micro_batches, close = build(trainer_config(args), Path(tmp) / "model", batch)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for _ in range(args.warmup):
            step()
        sync()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    times.sort()
    median = times[len(times) // 2]
    flops = model_flops(batch, shape)
    result = {
        "preset": args.preset, "engine": args.engine, "zero_stage": args.zero_stage if args.engine == "deepspeed" else None,
        "dtype": args.dtype, "attn": args.attn, "head_mode": args.head_mode, "liger": args.liger,
        "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
        "head_impl": "kernels", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "params_total": shape["params_total"], "params_body": shape["params_body"],
        "seqs_per_step": batch.num_seqs, "tokens_per_step": batch.num_tokens, "loss_tokens_per_step": batch.num_loss_tokens,
        "micro_batches_per_step": micro_batches, "micro_batch_tokens": args.micro_batch_tokens,
        "mixed_lengths": args.mixed_lengths, "step_times_s": times, "median_step_s": median,
        "tokens_per_s": batch.num_tokens / median, "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / median / 1e12, "mfu": flops / median / PEAK_FLOPS[device],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"SUMMARY {args.engine} {args.preset} head={args.head_mode} mixed={args.mixed_lengths}: {result['tokens_per_s']:.0f} tok/s, "
          f"{result['achieved_tflops']:.1f} TFLOP/s, MFU {result['mfu']:.3f}, step {median:.3f}s")


if __name__ == "__main__":
    main()
