"""Quick single-thread timing of the flute CPU kernel against torch on the same machine (not a test).

    python benchmarks/cpu_kernel_quick.py [--threads 1] [--reps 9] [--shapes 14336x4096,4096x4096,1536x576]
        [--batches 1,4,16,64] [--bits 2,3,4] [--hot] [--mode exact|bf16]

Weights (every format, every baseline) rotate through enough copies that more than --rotate-mb
(default 256 MB, > L3) is touched between two uses of one copy, so each timed call reads its weight
from DRAM (--hot: one copy, cache-hot figures). Median of --reps calls; flute and the baselines
are timed round-robin (one call of each per round), so all see the same load on a shared machine. Baselines in the same run:
fp32 and bf16 ``x @ W.T`` (torch/oneDNN), torch's int4 CPU kernel
``aten._weight_int4pack_mm_for_cpu`` (bf16 activations, g64), and a read-bandwidth sweep.
flute runs with bf16 activations for the ratios (fp32 activations at M=1 too: the exact path is
the same kernel). Ratios: baseline time / flute time (> 1: flute faster).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import flute  # noqa: F401
from flute.cpu_layout import to_cpu_layout
from flute.testing import random_quantized


def medians_ms(cases, reps):
    """``cases``: {name: (fn, copies)}. The cases are timed round-robin (one call of each per
    round), so that all of them see the same background load on a shared machine; medians in ms."""
    for fn, copies in cases.values():
        fn(copies[0])  # warm-up (allocations, code)
    ts = {name: [] for name in cases}
    for i in range(reps):
        for name, (fn, copies) in cases.items():
            c = copies[(i + 1) % len(copies)]
            t = time.perf_counter()
            fn(c)
            ts[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in ts.items()}


def n_copies(nbytes, rotate_mb, hot):
    return 1 if hot else max(2, int(rotate_mb * 2 ** 20 // max(nbytes, 1)) + 1)


def read_bandwidth_gbs(reps=5):
    buf = torch.ones(64 * 2 ** 20, dtype=torch.float32)  # 256 MB
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        ts.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(ts) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--shapes", default="14336x4096,4096x4096,1536x576")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--rotate-mb", type=int, default=256)
    p.add_argument("--hot", action="store_true")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--mode", choices=["exact", "bf16", "int8"], default="exact",
                   help="flute's CPU mode (bf16: opt-in, AVX512_BF16 only; int8: opt-in, 2 and 4 bits)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    flute.ops.set_cpu_mode(a.mode)
    print(f"threads={a.threads} isa={flute.ops.get_cpu_isa()} mode={flute.ops.get_cpu_mode()} group={a.group} "
          f"{'cache-hot' if a.hot else f'weights rotated over >{a.rotate_mb} MB'}; median of {a.reps}")
    bw = read_bandwidth_gbs()
    print(f"read bandwidth (torch sum over 256 MB, {a.threads} thread): {bw:.1f} GB/s")
    bits_list = [int(b) for b in a.bits.split(",")]
    rows = []
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        if not a.no_baselines:
            w = torch.randn(n, k, generator=g)
            fp32 = [w.clone() for _ in range(n_copies(w.numel() * 4, a.rotate_mb, a.hot))]
            bf16 = [w.bfloat16() for _ in range(n_copies(w.numel() * 2, a.rotate_mb, a.hot))]
            qi = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
            packed = torch._convert_weight_to_int4pack_for_cpu(qi, 1)
            sz = torch.rand(k // a.group, n, 2, generator=g).bfloat16()
            i4 = [(packed.clone(), sz.clone())
                  for _ in range(n_copies(packed.numel() * packed.element_size(), a.rotate_mb, a.hot))]
        for bits in bits_list:
            qw = random_quantized(n, k, bits, a.group, dtype=torch.bfloat16, generator=g)
            q = to_cpu_layout(qw.codes, bits)
            nbytes = q.numel() + qw.scales.numel() * 2
            fl = [(q.clone(), qw.scales.clone())
                  for _ in range(n_copies(nbytes, a.rotate_mb, a.hot))]
            for m in (int(v) for v in a.batches.split(",")):
                x = torch.randn(m, k, generator=g)
                xb = x.bfloat16()
                r = dict(shape=shape, bits=bits, M=m)
                cases = {"flute": (lambda c: torch.ops.flute.qgemm(
                    xb, c[0], c[1], None, qw.table, bits, a.group, k, n), fl)}
                if m == 1:
                    cases["flute_fp32x"] = (lambda c: torch.ops.flute.qgemm(
                        x, c[0], c[1], None, qw.table, bits, a.group, k, n), fl)
                if not a.no_baselines:
                    cases["fp32"] = (lambda c: x @ c.t(), fp32)
                    cases["bf16"] = (lambda c: xb @ c.t(), bf16)
                    cases["int4"] = (lambda c: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        xb, c[0], a.group, c[1]), i4)
                with torch.inference_mode():
                    r.update(medians_ms(cases, a.reps))
                r["GB/s"] = nbytes / r["flute"] / 1e6
                rows.append(r)
                line = (f"{shape:>11} {bits}b M={m:<3} flute {r['flute']:8.3f} ms "
                        f"({r['GB/s']:5.1f} GB/s, {100 * r['GB/s'] / bw:3.0f}% of read bw)")
                if "flute_fp32x" in r:
                    line += f" [fp32 x {r['flute_fp32x']:.3f}]"
                if "fp32" in r:
                    line += (f" | fp32 {r['fp32']:8.3f} bf16 {r['bf16']:8.3f} int4 {r['int4']:7.3f}"
                             f" | x{r['fp32'] / r['flute']:5.2f} fp32 x{r['bf16'] / r['flute']:5.2f} bf16"
                             f" x{r['int4'] / r['flute']:5.2f} int4")
                print(line, flush=True)


if __name__ == "__main__":
    main()
