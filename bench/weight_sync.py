"""Weight sync on GPUs, the project's own path against a raw NCCL broadcast of the same bytes.

nccl (2 GPUs): a sender on GPU 0 walks the bucket plan exactly as trainer rank 0 does
(`trainer.weights_out.broadcast_plan`: flatten each bucket, broadcast it) over a bf16
Qwen2-shaped model on its GPU; a real `RolloutEngine` (vLLM, FP32 head on) on GPU 1
receives and loads every bucket (`receive_weights`). Against it: two plain processes on
the same two GPUs broadcasting the same bytes with torch.distributed (NCCL), once in the
plan's bucket sizes and once as one buffer. The engine starts from vLLM's dummy weights
(no 15 GB checkpoint to write for the 7B set); after the timed syncs its weights are
checked against the sender's, tensor by tensor (exact checksums).

ipc (1 GPU): the colocated path: sender and engine share GPU 0; the sender gathers the
buckets on the GPU and hands CUDA IPC handles to the engine (`receive_ipc`).

Reported per size: the whole sync seen by the driver (median of --reps untimed syncs),
its split from --timed-reps timed syncs (sender gather / send, engine receive / load /
FP32-head refresh: each timed sync waits for the GPU between phases), the layerwise
`reload` load path for comparison, and the raw broadcast.

    python3 bench/weight_sync.py --path nccl --sizes 0.5b 1.5b 7b --out $OUT/weight_sync.json
    python3 bench/weight_sync.py --path ipc --sizes 0.5b 1.5b --out $OUT/weight_sync_ipc.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRESETS = {"0.5b": "qwen2-0.5b-shape", "1.5b": "qwen2-1.5b-shape", "7b": "qwen2-7b-shape"}
ENGINE_MEMORY = {"0.5b": 0.15, "1.5b": 0.2, "7b": 0.35}  # of the GPU: weights + a small KV cache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Sender:
    """Stands where trainer rank 0 stands: a bf16 model on its GPU, the trainer's bucket walk."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoConfig, Qwen2ForCausalLM

        torch.manual_seed(0)
        with torch.device("cuda"):
            self.model = Qwen2ForCausalLM(AutoConfig.from_pretrained(model_dir)).to(torch.bfloat16)
        self.group = None
        self.shared = None

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def join(self, host: str, port: int, world: int) -> None:
        from cispo.weight_sync import create_sync_group

        self.group = create_sync_group("nccl", host, port, 0, world)

    def plan(self, bucket_mb: float):
        from trainer.weights_out import sync_plan

        return sync_plan(self.model, bucket_mb)

    def send(self, plan, timed: bool) -> dict:
        from trainer.weights_out import broadcast_plan

        return broadcast_plan(self.model, plan, "cuda", self.group, timed)

    def share(self, plan) -> tuple[list, float]:
        import torch

        from cispo.weight_sync import share_bucket
        from trainer.weights_out import iter_flat_buckets

        t0 = time.perf_counter()
        self.shared = list(iter_flat_buckets(self.model, plan, "cuda"))
        torch.cuda.synchronize()
        return [(b, share_bucket(f)) for b, f in zip(plan, self.shared)], time.perf_counter() - t0

    def release(self) -> None:
        import torch

        self.shared = None
        torch.cuda.ipc_collect()

    def checksums(self, vocab: int) -> dict[str, int]:
        from cispo.weight_sync import checksum
        from rollout.vllm_compat import checkpoint_to_vllm_layout

        state = {n: p.detach() for n, p in self.model.named_parameters()}
        out = {n: checksum(t) for n, t in checkpoint_to_vllm_layout(state).items()}
        head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
        out["cispo.fp32_head"] = checksum(head[:vocab].float())
        return out


class RawPeer:
    """One end of a plain torch.distributed NCCL broadcast (rank 0 sends)."""

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def join(self, host: str, port: int, rank: int) -> None:
        from cispo.weight_sync import create_sync_group

        self.rank = rank
        self.group = create_sync_group("nccl", host, port, rank, 2)

    def run(self, sizes: list[int], reps: int) -> list[float]:
        import torch

        from cispo.weight_sync import broadcast_bucket

        bufs = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]
        times = []
        for _ in range(reps + 1):  # the first one warms the communicator up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for b in bufs:
                broadcast_bucket(self.group, b)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        del bufs
        torch.cuda.empty_cache()
        return times[1:]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean_stats(rows: list[dict]) -> dict:
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    return {k: statistics.median([r[k] for r in rows if k in r]) for k in sorted(keys)}


def model_dir(size: str, root: Path) -> str:
    from launch.tiny_model import make_tiny_qwen2

    path = root / f"{PRESETS[size]}-config"
    if not (path / "config.json").exists():
        make_tiny_qwen2(path, PRESETS[size], weights=False)
    return str(path)


def start_engine(path: str, size: str, strategy, enforce_eager: bool):
    from cispo.config import RolloutConfig
    from rollout.group import RolloutGroup

    cfg = RolloutConfig(max_model_len=256, max_new_tokens=8, gpu_memory_utilization=ENGINE_MEMORY[size])
    return RolloutGroup(path, cfg, dtype="bfloat16", num_gpus=0.5, timeout_s=600, enforce_eager=enforce_eager,
                        engine_kwargs={"load_format": "dummy"}, scheduling=[strategy], name=f"sync-bench-{size}",
                        wait_ready=False)


def check_equal(ray, sender, engine, path: str) -> int:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    want = ray.get(sender.checksums.remote(vocab))
    got = engine.weight_checksums({"model.embed_tokens.weight": vocab, "lm_head.weight": vocab})[0]
    bad = sorted(n for n in want if got.get(n) != want[n])
    if set(got) != set(want) or bad:
        raise AssertionError(f"engine weights differ from the sender's after the sync: {bad[:5]} "
                             f"(names only on one side: {sorted(set(got) ^ set(want))[:5]})")
    return len(want)


def bench_nccl(ray, size: str, args, pg, raw) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as PGS

    path = model_dir(size, Path(args.work))
    t0 = time.perf_counter()
    engine = start_engine(path, size, PGS(pg, placement_group_bundle_index=1), args.enforce_eager)
    sender = ray.remote(Sender).options(num_gpus=0.5, num_cpus=1,
                                        scheduling_strategy=PGS(pg, placement_group_bundle_index=0)).remote(path)
    engine.wait_ready()
    host, port = ray.get(sender.address.remote())
    ray.get([sender.join.remote(host, port, 2), *engine.init_weight_sync(host, port, 2, "nccl")])
    plan = ray.get(sender.plan.remote(args.bucket_mb))
    nbytes = sum(m.nbytes for b in plan for m in b)
    print(f"[{size}] engine + sender up in {time.perf_counter() - t0:.1f} s; {nbytes / 2**30:.2f} GiB in "
          f"{len(plan)} buckets", flush=True)
    version = 0

    def sync(timed: bool) -> tuple[float, dict, dict]:
        nonlocal version
        version += 1
        t = time.perf_counter()
        sent, _ = ray.get([sender.send.remote(plan, timed), *engine.receive_weights(plan, version, timed)])
        wall = time.perf_counter() - t
        return wall, sent, engine.last_load_stats()[0]

    for _ in range(args.warmup):
        sync(False)
    walls = [sync(False)[0] for _ in range(args.reps)]
    timed = [sync(True) for _ in range(args.timed_reps)]
    checked = check_equal(ray, sender, engine, path)
    ray.get(engine.engines[0].set_weight_load.remote("reload"))
    reload_walls = [sync(False)[0] for _ in range(2)]
    ray.get(engine.engines[0].set_weight_load.remote("auto"))
    raw_buckets = raw_one = []
    if raw is not None:
        sizes = [sum(m.nbytes for m in b) for b in plan]
        raw_buckets = max(ray.get([p.run.remote(sizes, args.reps) for p in raw]), key=sum)
        raw_one = max(ray.get([p.run.remote([nbytes], args.reps) for p in raw]), key=sum)
    engine.shutdown()
    ray.kill(sender)
    whole = med(walls)
    raw_best = min(med(raw_buckets), med(raw_one)) if raw_buckets else float("nan")
    row = {
        "size": size, "path": "nccl", "bytes": nbytes, "buckets": len(plan), "bucket_mb": args.bucket_mb,
        "sync_s": whole, "sync_s_all": walls, "load_path": timed[0][2].get("load_path") if timed else None,
        "timed_wall_s": med([w for w, _, _ in timed]),
        "sender": mean_stats([s for _, s, _ in timed]), "engine": mean_stats([e for _, _, e in timed]),
        "reload_sync_s": med(reload_walls), "raw_buckets_s": med(raw_buckets), "raw_one_buffer_s": med(raw_one),
        "raw_gib_per_s": nbytes / raw_best / 2**30 if raw_buckets else None,
        "sync_gib_per_s": nbytes / whole / 2**30,
        "sync_vs_raw_bandwidth": raw_best / whole if raw_buckets else None,
        "tensors_checked_equal": checked,
    }
    return row


def bench_ipc(ray, size: str, args, pg) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as PGS

    path = model_dir(size, Path(args.work))
    same = PGS(pg, placement_group_bundle_index=0)
    engine = start_engine(path, size, same, args.enforce_eager)
    sender = ray.remote(Sender).options(num_gpus=0.5, num_cpus=1, scheduling_strategy=same).remote(path)
    engine.wait_ready()
    plan = ray.get(sender.plan.remote(args.bucket_mb))
    nbytes = sum(m.nbytes for b in plan for m in b)
    version, rows = 0, []
    for i in range(args.warmup + args.reps):
        version += 1
        t = time.perf_counter()
        items, gather_s = ray.get(sender.share.remote(plan))
        t1 = time.perf_counter()
        engine.receive_ipc([items], version)
        t2 = time.perf_counter()
        ray.get(sender.release.remote())
        if i >= args.warmup:
            rows.append({"wall_s": time.perf_counter() - t, "share_call_s": t1 - t, "gather_s": gather_s,
                         "load_call_s": t2 - t1, **{f"engine_{k}": v for k, v in engine.last_load_stats()[0].items()
                                                   if k.endswith("_s")}})
    checked = check_equal(ray, sender, engine, path)
    engine.shutdown()
    ray.kill(sender)
    stats = mean_stats(rows)
    return {"size": size, "path": "ipc", "bytes": nbytes, "buckets": len(plan), "bucket_mb": args.bucket_mb,
            "sync_s": stats["wall_s"], "split": stats, "sync_gib_per_s": nbytes / stats["wall_s"] / 2**30,
            "tensors_checked_equal": checked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", choices=["nccl", "ipc"], default="nccl")
    ap.add_argument("--sizes", nargs="+", choices=list(PRESETS), default=["0.5b", "1.5b", "7b"])
    ap.add_argument("--bucket-mb", type=float, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timed-reps", type=int, default=3)
    ap.add_argument("--no-raw", action="store_true")
    ap.add_argument("--enforce-eager", type=int, default=1, help="skip vLLM's compile at start-up (1) or not (0)")
    ap.add_argument("--work", default=os.environ.get("CISPO_CACHE", "/tmp/cispo-bench"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)

    import ray
    import torch
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as PGS

    from launch.cluster import init_ray

    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    need = 2 if args.path == "nccl" else 1
    if gpus < need:
        raise SystemExit(f"--path {args.path} needs {need} GPU(s); Ray reports {gpus}")
    pg = placement_group([{"GPU": 1, "CPU": 3}] * need, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    raw = None
    if args.path == "nccl" and not args.no_raw:
        peers = [ray.remote(RawPeer).options(num_gpus=0.5, num_cpus=1, scheduling_strategy=PGS(pg, placement_group_bundle_index=i)).remote()
                 for i in range(2)]
        host, port = ray.get(peers[0].address.remote())
        ray.get([p.join.remote(host, port, i) for i, p in enumerate(peers)])
        raw = peers
    results = []
    for size in args.sizes:
        row = bench_nccl(ray, size, args, pg, raw) if args.path == "nccl" else bench_ipc(ray, size, args, pg)
        results.append(row)
        print(json.dumps(row, default=str), flush=True)

    print(f"\n{'size':>5} {'path':>5} {'GiB':>6} {'bkts':>4} {'sync s':>8} {'GiB/s':>7} {'raw s':>8} "
          f"{'sync/raw':>8} {'reload s':>8}  split (timed syncs)")
    for r in results:
        split = r.get("split") or {**{f"sender_{k}": v for k, v in r["sender"].items()},
                                   **{f"engine_{k}": v for k, v in r["engine"].items()}}
        parts = ", ".join(f"{k}={v:.4f}" for k, v in split.items() if k.endswith("_s"))
        raw_s = min(r.get("raw_buckets_s", float("nan")), r.get("raw_one_buffer_s", float("nan")))
        print(f"{r['size']:>5} {r['path']:>5} {r['bytes'] / 2**30:>6.2f} {r['buckets']:>4} {r['sync_s']:>8.4f} "
              f"{r['sync_gib_per_s']:>7.1f} {raw_s:>8.4f} {r.get('sync_vs_raw_bandwidth') or float('nan'):>8.2f} "
              f"{r.get('reload_sync_s', float('nan')):>8.4f}  {parts}")
    if args.out:
        doc = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
               ray.cluster_resources(), "gpus": gpus, "command": " ".join([sys.executable, *sys.argv]),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
