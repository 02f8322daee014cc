"""The weight-sync group (`cispo.weight_sync`) with a member that dies mid-broadcast, and
the cost of its abort line.

Members are processes on this host: rank 0 sends, the others receive (one GPU each with
nccl, CPU with gloo). Two phases:

1. cost: `--buckets` broadcasts of `--bucket-mb` each through `broadcast_bucket` (which
   polls the store's abort key while it waits) against the bare `pg.broadcast().wait()`
   (plus a device synchronize, so both are complete transfers).
2. dead peer: the last receiver SIGKILLs itself after its first bucket of another round;
   the parent sees the process gone and calls `request_abort` (as launch.weight_channel
   does when Ray reports an engine dead). Reported: seconds from the kill to each
   survivor leaving the broadcast (SyncAborted or the backend's own error), against the
   group's 300 s timeout.

    CPU:  PYTHONPATH=. .venv/bin/python bench/sync_dead_peer.py --backend gloo --members 3
    GPU:  python3 bench/sync_dead_peer.py --backend nccl --members 2 \\
              --out bench/results/sync_dead_peer_h200.json      (2 GPUs: nvidia-h200-x2)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def member(rank: int, args, port: int, q) -> None:
    import torch
    import torch.distributed as dist

    from cispo.weight_sync import SyncAborted, broadcast_bucket, create_sync_group

    device = torch.device(f"cuda:{rank}") if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = create_sync_group(args.backend, "127.0.0.1", port, rank, args.members)
    flat = torch.ones(int(args.bucket_mb * 2**20) // 2, dtype=torch.bfloat16, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for label in ("warm-up", "bare", "polled"):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.buckets if label != "warm-up" else 2):
            if label == "polled":
                broadcast_bucket(group, flat)
            else:
                opts = dist.BroadcastOptions()
                opts.rootRank = 0
                group.pg.broadcast([flat], opts).wait()
            sync()
        q.put(("time", rank, label, (time.perf_counter() - t0) / max(args.buckets, 1)))
    victim = args.members - 1
    try:
        for k in range(args.buckets):
            broadcast_bucket(group, flat)
            sync()
            if rank == victim and k == 0:
                q.put(("killed", rank, time.time()))
                q.close()
                q.join_thread()  # the message is out before the process dies
                os.kill(os.getpid(), signal.SIGKILL)
        q.put(("left", rank, time.time(), "finished (no failure seen)"))
    except SyncAborted as err:
        q.put(("left", rank, time.time(), f"SyncAborted: {err}"))
    except Exception as err:  # the backend's own error (gloo sees a closed connection)
        q.put(("left", rank, time.time(), f"{type(err).__name__}: {str(err)[:120]}"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=64)
    ap.add_argument("--buckets", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from cispo.weight_sync import request_abort

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=member, args=(r, args, port, q)) for r in range(args.members)]
    for p in procs:
        p.start()
    times: dict[str, list[float]] = {}
    killed_at, left, aborted_at = None, {}, None
    deadline = time.time() + 600
    while len(left) < args.members - 1 and time.time() < deadline:
        if killed_at is not None and aborted_at is None and procs[-1].exitcode is not None:
            aborted_at = time.time()
            request_abort("127.0.0.1", port)
        try:
            msg = q.get(timeout=0.05)
        except Exception:
            continue
        if msg[0] == "time":
            times.setdefault(msg[2], []).append(msg[3])
        elif msg[0] == "killed":
            killed_at = msg[2]
        elif msg[0] == "left":
            left[msg[1]] = (msg[2], msg[3])
    for p in procs:
        p.kill()
    result = {
        "date": dt.date.today().isoformat(),
        "command": " ".join([sys.executable, *sys.argv]),
        "backend": args.backend, "members": args.members, "bucket_mb": args.bucket_mb,
        "per_bucket_s": {k: max(v) for k, v in times.items() if k != "warm-up"},
        "abort_requested_after_kill_s": None if aborted_at is None or killed_at is None else aborted_at - killed_at,
        "survivors": {r: {"left_after_kill_s": t - killed_at if killed_at else None, "how": how}
                      for r, (t, how) in sorted(left.items())},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
