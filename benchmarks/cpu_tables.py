"""Markdown tables for the README from a committed CPU benchmark record.

    python benchmarks/cpu_tables.py benchmarks/results/cpu-<host>-<date>.json [--threads 1]

Prints (1) M = 1 times per shape for every kernel, weights from DRAM (cache-cold), (2) flute's
speedups on the largest shape at each M, and (3) the targets of benchmarks/targets.py evaluated on
the same record. Every figure is read from the JSON; nothing is typed in by hand.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import targets  # noqa: E402  (benchmarks/targets.py)


def label(p):
    if p["kernel"] == "llamacpp":
        return f"llama.cpp {p['ggml_type']}"
    if p["kernel"] == "flute":
        return f"flute {p['bits']}-bit g{p['group_size']} ({p['dtype']} x)"
    if p["kernel"] == "torch_int4":
        return f"torch int4 g{p['group_size']} (bf16 x)"
    return f"torch {p['kernel']} matmul"


def fastest(points):
    """``{(label, N, K, M): median_ms}`` keeping the fastest layout of each llama.cpp type."""
    best = {}
    for p in points:
        key = (label(p), p["N"], p["K"], p["M"])
        best[key] = min(best.get(key, float("inf")), p["median_ms"])
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("record")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flute-dtype", default="bf16", help="activation dtype of the speedup table")
    a = ap.parse_args()
    doc = json.load(open(a.record))
    pts = [p for p in doc["points"] if p.get("cache", "cold") == "cold" and p["threads"] == a.threads]
    best = fastest(pts)
    shapes = sorted({(p["N"], p["K"]) for p in pts}, key=lambda s: s[0] * s[1])
    labels = sorted({k[0] for k in best}, key=lambda s: (not s.startswith("torch"),
                                                         not s.startswith("llama"), s))
    bw = doc.get("read_bandwidth_gbps") or doc.get("read_bandwidth") or {}
    print(f"M = 1, {a.threads} thread(s), weights from DRAM: median ms per call "
          f"({doc.get('cpu_model', doc.get('device'))}; commit {doc['commit'][:10]})\n")
    print("| kernel | " + " | ".join(f"{n}×{k}" for n, k in shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for lab in labels:
        cells = [best.get((lab, n, k, 1)) for n, k in shapes]
        if all(c is None for c in cells):
            continue
        print(f"| {lab} | " + " | ".join("–" if c is None else f"{c:.3g}" for c in cells) + " |")
    n, k = max(shapes, key=lambda s: (s[0] * s[1], s[0]))  # the largest; 14336x4096 over its transpose
    ms = sorted({p["M"] for p in pts})
    print(f"\nflute on {n}×{k}, {a.threads} thread(s): speedup over each baseline "
          "(baseline time / flute time)\n")
    print("| flute | M | × fp32 | × bf16 | × torch int4 | × llama.cpp (same bits class) |")
    print("|---|---|---|---|---|---|")
    peers = {4: ("q4_0", "iq4_nl"), 3: ("q3_K",), 2: ("q2_K",)}
    for lab in [x for x in labels if x.startswith("flute") and f"({a.flute_dtype} x)" in x]:
        bits = int(lab.split()[1][0])
        for m in ms:
            t = best.get((lab, n, k, m))
            if t is None:
                continue
            def ratio(base):
                b = best.get((base, n, k, m))
                return "–" if b is None else f"{b / t:.2f}"
            llama = [best.get((f"llama.cpp {ty}", n, k, m)) for ty in peers[bits]]
            llama = [x for x in llama if x is not None]
            lr = f"{min(llama) / t:.2f} ({'/'.join(peers[bits])})" if llama else "–"
            print(f"| {lab} | {m} | {ratio('torch fp32 matmul')} | {ratio('torch bf16 matmul')} | "
                  f"{ratio('torch int4 g64 (bf16 x)')} | {lr} |")
    print("\nTargets (benchmarks/targets.py, every thread count, worst point decides):\n")
    print("```")
    print(targets.table(targets.evaluate(doc)))
    print("```")
    if bw:
        print(f"\nMeasured read bandwidth: {json.dumps(bw)}")


if __name__ == "__main__":
    main()
