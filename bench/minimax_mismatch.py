"""Train/rollout token-probability mismatch of a bf16 hybrid lightning-attention MoE model
(MiniMax-M1's architecture), with and without the FP32 LM head and with and without
routing replay: MiniMax-M1's Fig. 3 (Pearson of train vs rollout token probabilities) at
small scale.

Rollout: the project's vLLM engine (rollout.engine.RolloutEngine running
rollout/models/minimax.py) with a bf16 body and the routing recorded; the FP32 head is
switched on and off in the same running engine; samples at temperature 1.
Trainer: transformers' model as the trainer runs it (trainer.policy.PolicyModel on packed
rows, the whole module in bf16 as DeepSpeed's bf16 engine holds it), scoring the sampled
tokens with the FP32 head kernel (trainer.fp32_head) or with a bf16 head (logits rounded
to bf16, then an fp32 log-softmax), the routing live or replayed from the rollout.
Both sides hold the same weights: the model is rounded to bf16 values once, before either
loads it, so what differs is kernels and precision only.

For each head (bf16, fp32) one set of rollouts; for each routing mode (live, replay) the
trainer's log-probs of those tokens: Pearson of probabilities, mean and max |d log p|,
KL k3, and the share of (token, layer) routing choices where the trainer's live router
agrees with the engine's.

    CPU (toy size):  PYTHONPATH=. .venv/bin/python bench/minimax_mismatch.py --make tiny --out /tmp/mm.json
    GPU (one H200):  python3 bench/minimax_mismatch.py --make gpu --out bench/results/minimax_mismatch_h200.json
    any HF MiniMaxForCausalLM folder:  --model PATH [--head-scale 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# --make presets: a transformers MiniMaxConfig shape (launch.tiny_model.make_tiny_minimax
# overrides) and the factor the random head is scaled by so token probabilities spread
# over 0..1 instead of sitting near 1/vocab.
PRESETS = {
    "tiny": dict(shape=dict(), head_scale=10.0),  # minimax-tiny: hidden 256, 8 layers (7:1), 4 experts
    "gpu": dict(shape=dict(hidden_size=1024, num_hidden_layers=16,
                           layer_types=(["linear_attention"] * 7 + ["full_attention"]) * 2,
                           num_attention_heads=8, head_dim=128, num_key_value_heads=8, intermediate_size=1024,
                           num_local_experts=8, num_experts_per_tok=2, block_size=256, vocab_size=32768,
                           max_position_embeddings=8192),
                head_scale=8.0),
}


def prepare_model(args, work: Path) -> tuple[Path, dict]:
    """The model folder both sides load: weights rounded to bf16 values (stored fp32), the
    head scaled by --head-scale."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.tiny_model import make_tiny_minimax

    if args.model:
        source, scale = Path(args.model), args.head_scale or 1.0
    else:
        preset = PRESETS[args.make]
        source = make_tiny_minimax(work / f"source-{args.make}", seed=args.seed, **preset["shape"])
        scale = args.head_scale or preset["head_scale"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if model.config.model_type != "minimax":
        raise SystemExit(f"--model {source}: model_type {model.config.model_type!r}, expected 'minimax'")
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    out = work / "model"
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    c = model.config
    info = dict(source=str(source), head_scale=scale, params=sum(p.numel() for p in model.parameters()),
                hidden_size=c.hidden_size, layers=c.num_hidden_layers, layer_types=list(c.layer_types),
                heads=c.num_attention_heads, head_dim=c.head_dim, experts=c.num_local_experts,
                top_k=c.num_experts_per_tok, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                block_size=c.block_size)
    return out, info


def random_prompts(n: int, vocab: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    top = min(vocab, 100)  # ids of the char tokenizer's printable characters
    return [torch.randint(4, top, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def trainer_logprobs(policy, trajs, head: str, replay: bool, device, chunk: int):
    """The trainer's log-probs of each trajectory's response tokens (concatenated), and how
    often its live routing agrees with the engine's (counts)."""
    import torch
    import torch.nn.functional as F

    from cispo.batch import pack
    from trainer.policy import loss_positions

    out, agree, total = [], 0, 0
    for i in range(0, len(trajs), chunk):
        part = [t for t in trajs[i : i + chunk] if t.response_ids]
        if not part:
            continue
        b = pack(part).to(device)
        pos = loss_positions(b.loss_mask)
        routed = b.routed_experts if replay else None
        with torch.no_grad():
            if head == "fp32":
                lp, _ = policy(b.input_ids, b.position_ids, pos, b.targets[pos], 1.0, routed_experts=routed)
            else:  # a bf16 head: logits in bf16, log-softmax in fp32
                policy.moe.set_replay(routed)
                hidden = policy.hf.model(input_ids=b.input_ids[None], position_ids=b.position_ids[None],
                                         use_cache=False).last_hidden_state[0]
                logits = F.linear(hidden[pos], policy.hf.lm_head.weight).float()
                lp = torch.log_softmax(logits, -1).gather(1, b.targets[pos][:, None])[:, 0]
            if not replay and b.routed_experts is not None:
                recorded = b.routed_experts.long()
                k = recorded.shape[-1]
                for layer, router in enumerate(policy.moe.routers):
                    live = torch.topk(torch.softmax(router.last_logits.float(), -1), k, -1).indices.sort(-1).values
                    rec = recorded[:, layer].sort(-1).values
                    seen = (rec >= 0).all(-1)
                    agree += int(((live == rec).all(-1) & seen).sum())
                    total += int(seen.sum())
        out.append(lp[b.loss_mask[pos]].float().cpu())
    return torch.cat(out), (agree, total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="a Hugging Face MiniMaxForCausalLM folder")
    src.add_argument("--make", choices=sorted(PRESETS), default="tiny", help="a random model of this preset")
    ap.add_argument("--head-scale", type=float, default=None, help="scale the LM head (default: the preset's; 1 for --model)")
    ap.add_argument("--prompts", type=int, default=None, help="default 64 on GPU, 2 on CPU")
    ap.add_argument("--samples", type=int, default=None, help="per prompt; default 8 on GPU, 2 on CPU")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 512 on GPU, 12 on CPU")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--dtype", default="bfloat16", help="the body's dtype on both sides")
    ap.add_argument("--state-dtype", default="float32",
                    help="vLLM's lightning-attention state cache dtype (mamba_cache_dtype; 'auto' = the body's)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM's share (default 0.5 GPU, 0.1 CPU)")
    ap.add_argument("--chunk", type=int, default=16, help="trajectories per trainer forward (one packed row)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for the model (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    args = ap.parse_args()

    import tempfile

    import torch

    on_gpu = torch.cuda.is_available()
    prompts_n = args.prompts or (64 if on_gpu else 2)
    samples = args.samples or (8 if on_gpu else 2)
    new_tokens = args.new_tokens or (512 if on_gpu else 12)
    work = Path(args.work or tempfile.mkdtemp(prefix="minimax-mismatch-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if on_gpu else "cpu")
    print(f"seed {args.seed}; device {torch.cuda.get_device_name() if on_gpu else platform.processor() or 'cpu'}", flush=True)

    t0 = time.perf_counter()
    model_path, model_info = prepare_model(args, work)
    print(f"model: {model_info['params'] / 1e6:.1f}M params, {model_info['layers']} layers, "
          f"{model_info['experts']} experts top-{model_info['top_k']}, vocab {model_info['vocab_size']} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    from cispo.config import RolloutConfig
    from cispo.metrics import mismatch_metrics
    from rollout.engine import RolloutEngine
    from trainer.policy import PolicyModel, load_hf_causal_lm

    max_len = args.prompt_len[1] + new_tokens + 8
    cfg = RolloutConfig(max_new_tokens=new_tokens, max_model_len=max_len, temperature=1.0, repetition_stop=False,
                        record_routing=True, seed=args.seed,
                        gpu_memory_utilization=args.gpu_memory_utilization or (0.5 if on_gpu else 0.1))
    t0 = time.perf_counter()
    engine = RolloutEngine(str(model_path), cfg, dtype=args.dtype, engine_kwargs={"mamba_cache_dtype": args.state_dtype})
    print(f"vLLM engine up in {time.perf_counter() - t0:.1f} s ({engine.info()['vllm']})", flush=True)

    hf = load_hf_causal_lm(str(model_path))
    policy = PolicyModel(hf, chunk_tokens=1024).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    if policy.moe is None:
        raise SystemExit("trainer.minimax found no MiniMaxTopKRouter in this transformers: no routing replay")
    prompts = random_prompts(prompts_n, model_info["vocab_size"], args.seed, *args.prompt_len)

    results = []
    for head in ("bf16", "fp32"):
        engine.set_fp32_head(head == "fp32")
        t0 = time.perf_counter()
        trajs = engine.generate(prompts, n=samples, temperature=1.0, ignore_eos=True, detokenize=False, seed=args.seed)
        gen_s = time.perf_counter() - t0
        rollout = torch.tensor([x for t in trajs for x in t.rollout_logprobs], dtype=torch.float32)
        for replay in (False, True):
            t0 = time.perf_counter()
            train, (agree, total) = trainer_logprobs(policy, trajs, head, replay, device, args.chunk)
            m = mismatch_metrics(train, rollout, torch.ones_like(train, dtype=torch.bool))
            row = dict(head=head, routing_replay=replay, tokens=int(train.numel()),
                       pearson=m["pearson"], abs_logp_diff=m["abs_logp_diff"],
                       max_abs_logp_diff=float((train - rollout).abs().max()), kl_k3=m["kl_k3"],
                       mean_prob=float(rollout.exp().mean()),
                       routing_agree=(agree / total) if total else None, generate_s=gen_s,
                       trainer_s=time.perf_counter() - t0)
            results.append(row)
            print(json.dumps(row), flush=True)
    engine.shutdown()

    print(f"\n{'LM head':8} {'routing':8} {'pearson(p)':>11} {'mean|dlogp|':>12} {'max|dlogp|':>11} "
          f"{'kl_k3':>10} {'tokens':>7} {'live routing = engine':>22}")
    for r in results:
        agree = "-" if r["routing_agree"] is None else f"{r['routing_agree']:.4f}"
        print(f"{r['head']:8} {'replay' if r['routing_replay'] else 'live':8} {r['pearson']:11.6f} "
              f"{r['abs_logp_diff']:12.3e} {r['max_abs_logp_diff']:11.3e} {r['kl_k3']:10.2e} {r['tokens']:7d} "
              f"{agree:>22}")

    import transformers
    import vllm

    report = dict(
        bench="minimax_mismatch",
        device=torch.cuda.get_device_name() if on_gpu else f"cpu ({platform.processor() or platform.machine()})",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        versions=dict(torch=torch.__version__, vllm=vllm.__version__, transformers=transformers.__version__),
        model=model_info,
        settings=dict(dtype=args.dtype, state_dtype=args.state_dtype, prompts=prompts_n, samples=samples,
                      new_tokens=new_tokens, prompt_len=list(args.prompt_len), temperature=1.0, seed=args.seed,
                      engine="vLLM, eager (routing recorded), prefix caching off",
                      trainer="transformers + trainer.policy.PolicyModel, module in " + args.dtype),
        results=results,
    )
    if any(not math.isfinite(r["abs_logp_diff"]) for r in results):
        raise SystemExit("non-finite mismatch: see the rows above")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
