"""Rollout generation throughput with and without the FP32 LM head, and the time of a
full weight update into the running engine.

One `RolloutEngine` (no Ray: the GPU image has none) on a randomly initialised
Qwen2-shaped model made here; the FP32 head is switched on and off in the same engine
between timed rounds (alternating, best of --rounds), so both modes share everything
else. Tokens/s counts generated tokens only (ignore_eos: every sample runs to
--new-tokens).

    CPU:  PYTHONPATH=. .venv/bin/python bench/rollout_throughput.py
    GPU:  python3 bench/rollout_throughput.py --shape qwen2-0.5b --dtype bfloat16 \\
              --prompts 256 --new-tokens 512 --out bench/results/rollout_h100.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.tiny_model import PRESETS as MODEL_SHAPES  # noqa: E402

SHAPES = {
    # CPU default: small body, a realistic 32k vocabulary so the head is a real share
    "cpu-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=768, vocab_size=32000, tie_word_embeddings=False),
    "qwen2-0.5b": MODEL_SHAPES["qwen2-0.5b-shape"],
}


def make_model(path: Path, shape: dict, dtype: str) -> Path:
    """A random Qwen2 of `shape` with the project's char tokenizer (prompts use ids < 100;
    outputs are not detokenized, so the larger model vocabulary is fine)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from launch.tiny_model import build_char_tokenizer

    if (path / "config.json").exists():
        return path
    tok = build_char_tokenizer()
    cfg = Qwen2Config(max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, torch_dtype=dtype, **shape)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    del model
    return path


def mismatch_check(engine, path: Path, prompts: list[list[int]], modes: list[str], cuda: bool) -> dict:
    """Log-probs of sampled tokens per FP32-head mode vs a transformers fp32 forward of
    the same weights (the trainer's view)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cispo.metrics import mismatch_metrics

    device = "cuda" if cuda else "cpu"
    ref_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    out = {}
    for m in modes:
        engine.set_fp32_head(m != "off", None if m == "off" else m)
        trajs = engine.generate(prompts, n=1, max_new_tokens=32, ignore_eos=True, detokenize=False, seed=7)
        refs, gots = [], []
        for t in trajs:
            ids = torch.tensor([t.prompt_ids + t.response_ids], device=device)
            with torch.no_grad():
                lp = torch.log_softmax(ref_model(ids).logits[0].float(), -1)
            p = len(t.prompt_ids)
            tgt = torch.tensor(t.response_ids, device=device)
            refs.append(lp[p - 1 : p - 1 + len(tgt)].gather(1, tgt[:, None])[:, 0].cpu())
            gots.append(torch.tensor(t.rollout_logprobs))
        ref, got = torch.cat(refs), torch.cat(gots)
        r = mismatch_metrics(ref, got, torch.ones_like(ref, dtype=torch.bool))
        r["max_abs"] = (ref - got).abs().max().item()
        r["tokens"] = ref.numel()
        out[m] = r
    del ref_model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--impls", default="exact", help="comma list of FP32-head implementations to time (exact,split3)")
    ap.add_argument("--model-dir", default="/tmp/cispo-bench-model")
    ap.add_argument("--gpu-mem", type=float, default=None)
    ap.add_argument("--no-update", action="store_true", help="skip the weight-update timing")
    ap.add_argument("--engine-kwargs", default="{}", help='extra vllm.LLM arguments as JSON, e.g. {"attention_backend": "FLASH_ATTN"}')
    ap.add_argument("--check", type=int, default=0, help="also compare N prompts' log-probs with a transformers fp32 forward per head mode")
    ap.add_argument("--out", default="bench/results/rollout_cpu.json")
    args = ap.parse_args()

    import torch

    from cispo.config import RolloutConfig
    from cispo.weight_sync import flatten_bucket, meta_of, plan_buckets
    from rollout.engine import RolloutEngine

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    path = make_model(Path(args.model_dir) / f"{args.shape}-{args.dtype}", SHAPES[args.shape], args.dtype)
    make_s = time.perf_counter() - t0
    cfg = RolloutConfig(
        max_new_tokens=args.new_tokens,
        max_model_len=args.prompt_len + args.new_tokens + 16,
        gpu_memory_utilization=args.gpu_mem or (0.85 if cuda else 0.2),
        repetition_stop=False,
        lm_head_fp32=True,
    )
    engine = RolloutEngine(str(path), cfg, dtype=args.dtype, enforce_eager=None if cuda else True,
                           engine_kwargs=json.loads(args.engine_kwargs))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 100, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]

    def run(mode: str) -> float:
        engine.set_fp32_head(mode != "off", None if mode == "off" else mode)
        t = time.perf_counter()
        trajs = engine.generate(prompts, n=1, ignore_eos=True, detokenize=False, temperature=1.0)
        dt_s = time.perf_counter() - t
        toks = sum(len(x.response_ids) for x in trajs)
        assert toks == args.prompts * args.new_tokens, toks
        return toks / dt_s

    modes = ["off"] + [m for m in args.impls.split(",") if m]
    run(modes[0])  # warm-up (CUDA graphs, caches)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            rates[m].append(run(m))
    best = {m: max(v) for m, v in rates.items()}
    median = {m: sorted(v)[len(v) // 2] for m, v in rates.items()}

    update = {}
    if not args.no_update:
        from safetensors.torch import load_file

        state = {}
        for f in sorted(path.glob("*.safetensors")):
            state.update(load_file(str(f), device="cuda" if cuda else "cpu"))
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        engine.set_fp32_head(True, modes[-1] if len(modes) > 1 else "exact")
        times = []
        for _ in range(2):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            engine.update_weights(state)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        plan = plan_buckets([meta_of(k, v) for k, v in state.items()], 64 << 20)
        buckets = [(b, flatten_bucket([state[p.name] for p in b])) for b in plan]
        t = time.perf_counter()
        engine.update_weights(buckets)
        if cuda:
            torch.cuda.synchronize()
        update = {
            "bytes": nbytes,
            "named_tensors_s": min(times),
            "buckets_64mb_s": time.perf_counter() - t,
            "num_buckets": len(plan),
            "note": "in-process tensors already on the engine's device: the reload/re-shard cost of one full update",
        }

    check: dict = {}
    if args.check:
        # runs after the weight updates above: agreement here also shows the updates
        # left the engine intact
        check = mismatch_check(engine, path, prompts[: args.check], modes, cuda)

    info = engine.info()
    result = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "vllm": info["vllm"],
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "shape": args.shape,
        "params": SHAPES[args.shape],
        "dtype": args.dtype,
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "engine_startup_s": info["startup_s"],
        "model_make_s": make_s,
        "tokens_per_s": rates,
        "best_tokens_per_s": best,
        "median_tokens_per_s": median,
        "load_average_at_end": os.getloadavg(),
        "fp32_head_cost_pct": {m: 100.0 * (1 - best[m] / best["off"]) for m in modes if m != "off"},
        "weight_update": update,
        "mismatch_vs_transformers_fp32": check,
    }
    print(f"\n{'FP32 head':<12}{'tokens/s (best)':>18}{'vs off':>10}{'median':>12}   rounds")
    for m in modes:
        rel = "" if m == "off" else f"{-result['fp32_head_cost_pct'][m]:+.1f}%"
        print(f"{m:<12}{best[m]:>18.1f}{rel:>10}{median[m]:>12.1f}   {', '.join(f'{r:.1f}' for r in rates[m])}")
    if update:
        print(f"weight update ({update['bytes'] / 1e6:.0f} MB): {update['named_tensors_s']:.3f} s named tensors, "
              f"{update['buckets_64mb_s']:.3f} s as {update['num_buckets']} x 64 MB buckets")
    for m, r in check.items():
        print(f"mismatch vs transformers fp32, head {m:<7}: mean|dlogp|={r['abs_logp_diff']:.3e} "
              f"max={r['max_abs']:.3e} pearson={r['pearson']:.6f} ({r['tokens']} tokens)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    engine.shutdown()


if __name__ == "__main__":
    main()
