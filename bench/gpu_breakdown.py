"""Where one forward+backward of an LM-head method spends GPU time and memory: per-kernel
times and the host's idle gaps (torch.profiler), and the allocations live at the peak
(the CUDA caching allocator's history). Used by bench/kernels_lm_head.py (--profile,
--memory-trace); `method(h, w, t)` returns per-row log-probs."""
import os

import torch


def warmed_up(method, h, w, t, g):
    """Leaf copies of h and w after one forward+backward of the loss sum(method(h, w, t) * g)
    (it autotunes), their gradients cleared: else the measured run adds its gradients to
    these, which is not the method's work."""
    hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()
    (method(hg, wg, t) * g).sum().backward()
    hg.grad = wg.grad = None
    torch.cuda.synchronize()
    return hg, wg


def profile_kernels(method, h, w, t, g, what):
    """Per-kernel GPU time of one forward+backward (after a warm-up that autotunes)."""
    hg, wg = warmed_up(method, h, w, t, g)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        (method(hg, wg, t) * g).sum().backward()
        torch.cuda.synchronize()
    print(f"profile {what}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
    print_gaps(prof)


def print_gaps(prof, top=8):
    """How busy the GPU was between its first and last kernel of the profiled run, and the
    largest idle gaps with the kernels on either side: where the host, not the GPU, sets
    the pace."""
    from torch.autograd import DeviceType
    evs = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == DeviceType.CUDA)
    if not evs:
        return
    gaps, busy, end = [], 0.0, evs[0][0]
    prev = ""
    for a, b, name in evs:
        if a > end:
            gaps.append((a - end, prev, name))
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
        prev = name
    span = end - evs[0][0]
    idle = sum(g[0] for g in gaps)
    print(f"GPU timeline: span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.1f}%), "
          f"idle {idle / 1e3:.1f} ms in {len(gaps)} gaps, {sum(g[0] for g in gaps if g[0] > 50) / 1e3:.1f} ms "
          f"in gaps over 50 us")
    for us, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  gap {us:8.1f} us after {before[:60]!r} before {after[:60]!r}")


def memory_trace(method, h, w, t, g, what, top=12):
    """The allocations live at the peak of one forward+backward (after a warm-up), largest
    first, each with the innermost frame of this repository that made it."""
    hg, wg = warmed_up(method, h, w, t, g)
    torch.cuda.memory._record_memory_history(max_entries=200000)
    (method(hg, wg, t) * g).sum().backward()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for ev in snap["device_traces"][0]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]

    def origin(ev):
        frames = [f for f in ev.get("frames", []) if "/kernels/" in f["filename"] or "/bench/" in f["filename"]]
        f = frames[0] if frames else (ev.get("frames") or [{"filename": "?", "line": 0, "name": "?"}])[0]
        return f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"
    print(f"memory at the peak of fwd+bwd, {what}: {peak / 2**30:.3f} GiB allocated during it")
    for ev in sorted(at_peak.values(), key=lambda e: -e["size"])[:top]:
        print(f"  {ev['size'] / 2**20:10.1f} MiB  {origin(ev)}")
    hg.grad = wg.grad = None
