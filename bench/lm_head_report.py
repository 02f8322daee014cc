"""What a report of bench/kernels_lm_head.py says: issue 13's head targets, the markdown
table for bench/results (`--table`) and the console table. Plain JSON in, text out."""
import json


def target_summary(report):
    """Issue 13's head targets for every fused fp16x2 method, against naive fp32 of the same
    shape: fwd+bwd ms (<= 237 at T=16k, H=4096), speed-up (>= 5), max |d log p| (<= 1e-5),
    peak extra / naive's (<= 0.10), and the floor of 7 half-precision products (7 x the
    forward's bf16 matmul h @ W^T)."""
    rows = report["results"]
    naive = {(r["T"], r["H"]): r for r in rows if r["name"] == "naive_fp32"}
    out = []
    for r in rows:
        n = naive.get((r["T"], r["H"]))
        if not r["name"].startswith("fused_fp16x2") or n is None or r.get("fwd_bwd_ms") is None:
            continue
        out.append(dict(T=r["T"], H=r["H"], method=r["name"], fwd_bwd_ms=r["fwd_bwd_ms"],
                        speedup_vs_naive=(n.get("fwd_bwd_ms") or float("nan")) / r["fwd_bwd_ms"],
                        max_abs_dlogp=r.get("max_abs_dlogp"),
                        peak_vs_naive=(r.get("peak_extra_gb") or float("nan")) / (n.get("peak_extra_gb") or float("nan")),
                        floor_7_products_ms=7 * r["bf16_matmul_ms"] if r.get("bf16_matmul_ms") else None))
    return out


# (hidden, weight) bytes per element each method gets: for the "of which not grads" column.
_BF16_BOTH = {"naive_bf16", "fused_bf16", "liger_bf16", "fused_fp16x2_w16"}
_BF16_HIDDEN = _BF16_BOTH | {"fused_bf16x3", "fused_fp16x2"}


def markdown_table(paths):
    """Markdown results table from one or more JSON reports of this script."""
    rows = [r for p in paths for r in json.load(open(p))["results"]]
    V = json.load(open(paths[0]))["V"]
    naive = {(r["T"], r["H"]): r for r in rows if r["name"] == "naive_fp32"}
    out = ["| T | H | method | fwd ms | fwd+bwd ms | peak extra GiB | of which not grads GiB | "
           "max abs Δlog p vs fp64 | fwd speed-up vs naive fp32 | fwd+bwd speed-up | "
           "peak vs naive fp32 | fwd / bf16 matmul |", "|" + "---|" * 12]

    def num(r, k, fmt):
        return "OOM" if r.get("oom") and r.get(k) is None else (
            format(r[k], fmt) if r.get(k) is not None else "n/a")

    def ratio(a, b):
        return "n/a" if a is None or b is None else f"{a / b:.2f}"

    for r in rows:
        n = naive.get((r["T"], r["H"]), {})
        base = r["name"].split("@")[0]  # fused_fp16x2@... variants take the same inputs
        grads = (r["T"] * r["H"] * (2 if base in _BF16_HIDDEN else 4)
                 + V * r["H"] * (2 if base in _BF16_BOTH else 4)) / 2**30
        work = f"{r['peak_extra_gb'] - grads:.2f}" if r.get("peak_extra_gb") is not None else num(r, "peak_extra_gb", ".2f")
        name = f"**{r['name']}**" if r["name"].startswith("fused") else r["name"]
        mm = r.get("bf16_matmul_ms")
        out.append(
            f"| {r['T']} | {r['H']} | {name} | {num(r, 'fwd_ms', '.2f')} | {num(r, 'fwd_bwd_ms', '.1f')} | "
            f"{num(r, 'peak_extra_gb', '.2f')} | {work} | {num(r, 'max_abs_dlogp', '.2e')} | "
            f"{ratio(n.get('fwd_ms'), r.get('fwd_ms'))} | {ratio(n.get('fwd_bwd_ms'), r.get('fwd_bwd_ms'))} | "
            f"{ratio(r.get('peak_extra_gb'), n.get('peak_extra_gb'))} | {ratio(r.get('fwd_ms'), mm)} |")
    return "\n".join(out)


def print_table(report):
    print(f"\n{report['device']}  V={report['V']}  (times: median ms; mem: peak extra GiB during fwd+bwd)")
    hdr = f"{'T':>6} {'H':>5} {'method':12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak GiB':>9} {'max|dlogp|':>11}"
    print(hdr)
    for r in report["results"]:
        miss = "OOM" if r.get("oom") else "-"
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else format(miss, fmt[:-3] + "s")  # noqa: E731
        print(f"{r['T']:>6} {r['H']:>5} {r['name']:12} {f('fwd_ms', '9.2f')} {f('fwd_bwd_ms', '11.2f')} "
              f"{f('peak_extra_gb', '9.2f')} {f('max_abs_dlogp', '11.2e')}")
