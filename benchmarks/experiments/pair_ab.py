"""A/B timing of the 2-bit CPU op between two builds of flute (CPU_NOTES item 131; not a test).

    for i in 1 2 3; do for t in OLD NEW; do PYTHONPATH=$t python pair_ab.py --label $t; done; done

One JSON line per process: for each shape and batch, the median time (us) of --reps calls of
torch.ops.flute.qgemm at 2 bits (g64, bf16 activations and scales, the default int8 mode), weights
rotated (codes and scales) through more than --rotate-mb so that every call reads DRAM, each copy
placed as QuantLinear places a layout (flute.huge_pages.place_for_streaming: huge pages from 64 KiB). Processes of the two builds
alternate, so both see the same machine state.
"""
import argparse
import json
import statistics
import time

import torch

import flute  # noqa: F401
from flute.cpu_layout import to_cpu_layout
from flute.huge_pages import place_for_streaming
from flute.testing import random_quantized

p = argparse.ArgumentParser()
p.add_argument("--label", default="")
p.add_argument("--shapes", default="1536x576,576x1536,8192x2048,4096x4096,14336x4096,4096x14336")
p.add_argument("--batches", default="1,4,16")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--reps", type=int, default=60)
p.add_argument("--bits", type=int, default=2)
p.add_argument("--rotate-mb", type=int, default=300)
args = p.parse_args()
torch.set_num_threads(args.threads)
out = {"label": args.label, "threads": args.threads, "bits": args.bits, "isa": torch.ops.flute.cpu_isa(), "us": {}}
for shape in args.shapes.split(","):
    n, k = map(int, shape.split("x"))
    w = random_quantized(n, k, args.bits, 64, dtype=torch.bfloat16, seed=0)
    q = to_cpu_layout(w.codes, args.bits)
    copies = [(place_for_streaming(q.clone()), place_for_streaming(w.scales.clone()))
              for _ in range(1 + max(1, args.rotate_mb * 2 ** 20 // q.numel()))]
    for m in map(int, args.batches.split(",")):
        x = torch.randn(m, k).to(torch.bfloat16)
        f = lambda c: torch.ops.flute.qgemm(x, c[0], c[1], None, w.table, args.bits, 64, k, n)
        for c in copies[:3]:
            f(c)
        ts = []
        for i in range(args.reps):
            c = copies[i % len(copies)]
            t = time.perf_counter()
            f(c)
            ts.append(time.perf_counter() - t)
        out["us"][f"{shape} M={m}"] = round(statistics.median(ts) * 1e6, 1)
print(json.dumps(out))
