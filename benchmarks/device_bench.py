"""The GPU check's quick benchmark: flute against fp16 `torch.matmul` in one process.

    python3 benchmarks/device_bench.py --json OUT.json [--shapes 28672x8192 4096x4096] [--M 1 16 64]
                                       [--bits 4 3 2] [--label TEXT]

Method (benchmarks/NOTES.md): CALLS back-to-back calls captured in one CUDA graph, each on the next
copy of the weight, the copies together over 3x the L2 (every call reads HBM); each replay timed
with CUDA events; the median over replays. Before anything is timed the GPU runs ~0.3 s of matrix
products, so the clocks have left idle (the first run measured its copy bandwidth cold). The
read-bandwidth reference is fp16 matmul's own rate at M = 1 (it only reads its weight), beside a
device-to-device copy (read + write). Each flute configuration is checked once against the float64
reference before it is timed; a wrong result is recorded and not timed. The JSON is rewritten
after every shape, so a timeout keeps what ran.
"""
import argparse
import json
import statistics
import time

import torch

CALLS = 20  # calls per graph replay, each on the next weight copy


def graph_time(fn, args_list, reps=7):
    """Microseconds per call for each of `reps` replays of a CUDA graph of CALLS calls."""
    for a in args_list[:2]:
        fn(*a)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS):
            fn(*args_list[i % len(args_list)])
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000.0 / CALLS)
    return times


def warm_up(seconds=0.3):
    """Run matrix products until the clocks have risen (seconds of wall time)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def copies_for(nbytes, l2):
    return max(2, -(-3 * l2 // nbytes))


def check_once(bits, n, k, g, dtype):
    """Relative error of flute against float64 on a random weight of this configuration."""
    from flute.layout import to_kernel_layout
    from flute.testing import random_quantized, reference_qgemm, relative_error
    w = random_quantized(n, k, bits, g, offsets=False, dtype=dtype, seed=bits)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = torch.ops.flute.qgemm(x.cuda(), to_kernel_layout(w.codes.cuda(), bits), w.scales.cuda(), None,
                              w.table.cuda(), bits, g, k, n)
    return relative_error(y.double().cpu(), reference_qgemm(x, w, g))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--shapes", nargs="+", default=["28672x8192", "8192x8192", "4096x4096"], help="NxK")
    ap.add_argument("--M", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--label", default="", help="a name for this variant, stored in the JSON")
    ap.add_argument("--no-fp16", action="store_true", help="skip the fp16 baseline")
    a = ap.parse_args()

    import flute
    from flute.layout import to_kernel_layout
    assert flute.ops.HAS_CUDA_KERNEL, flute.ops.CUDA_KERNEL_ERROR
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20) or (60 << 20)
    warm_up()
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    t = graph_time(lambda s, d: d.copy_(s), [(buf, dst)], reps=5)
    copy_gbps = 2 * buf.numel() / min(t) / 1e3
    del buf, dst
    rec = {"device": props.name, "l2_bytes": l2, "copy_gbps": copy_gbps, "calls_per_replay": CALLS,
           "label": a.label, "group": a.group, "rows": [], "checks": {}}
    print(f"{props.name} {a.label}: device-to-device copy {copy_gbps:.0f} GB/s (read + write, best of 5)")
    g, dt = a.group, torch.float16
    for shape in a.shapes:
        n, k = map(int, shape.lower().split("x"))
        if not a.no_fp16:
            w16 = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
            ws16 = [w16] + [w16.clone() for _ in range(copies_for(n * k * 2, l2) - 1)]
            for M in a.M:
                x = torch.randn(M, k, device="cuda", dtype=dt)
                tt = graph_time(lambda x, w: torch.matmul(x, w.t()), [(x, w) for w in ws16])
                med = statistics.median(tt)
                rec["rows"].append({"impl": "fp16 matmul", "N": n, "K": k, "M": M, "median_us": med,
                                    "read_gbps": n * k * 2 / med / 1e3, "raw_us": tt})
                print(f"fp16 matmul N={n} K={k} M={M}: {med:.1f} us ({n * k * 2 / med / 1e3:.0f} GB/s read)")
            del ws16, w16
        for bits in a.bits:
            key = f"{bits}-bit g{g} fp16"
            if key not in rec["checks"]:
                rec["checks"][key] = check_once(bits, 1000, 1536, g, dt)
                print(f"check {key}: rel err {rec['checks'][key]:.2e}")
            if not rec["checks"][key] <= 3e-3:
                print(f"flute {key} is wrong: not timed")
                continue
            codes = torch.randint(0, 2 ** bits, (n, k), device="cuda", dtype=torch.uint8)
            q = to_kernel_layout(codes, bits)
            scales = (torch.rand(n, -(-k // g), device="cuda") * 0.01 + 0.01).to(dt)
            table = torch.randn(2 ** bits, device="cuda")
            wbytes = q.numel() * 4 + scales.numel() * 2
            qs = [(q, scales)] + [(q.clone(), scales.clone()) for _ in range(copies_for(wbytes, l2) - 1)]
            for M in a.M:
                x = torch.randn(M, k, device="cuda", dtype=dt)
                fn = lambda x, q, s: torch.ops.flute.qgemm(x, q, s, None, table, bits, g, k, n)  # noqa: E731
                tt = graph_time(fn, [(x, qq, ss) for qq, ss in qs])
                med = statistics.median(tt)
                fp16 = next((r["median_us"] for r in rec["rows"] if r["impl"] == "fp16 matmul"
                             and (r["N"], r["K"], r["M"]) == (n, k, M)), None)
                rec["rows"].append({"impl": f"flute {bits}-bit g{g}", "bits": bits, "N": n, "K": k, "M": M,
                                    "bytes": wbytes, "median_us": med, "read_gbps": wbytes / med / 1e3,
                                    "speedup_vs_fp16": fp16 / med if fp16 else None, "raw_us": tt})
                print(f"flute {bits}-bit N={n} K={k} M={M}: {med:.1f} us  {wbytes / med / 1e3:.0f} GB/s"
                      + (f"  {fp16 / med:.2f}x fp16" if fp16 else ""))
            del qs
        torch.cuda.empty_cache()
        json.dump(rec, open(a.json, "w"), indent=1)
    json.dump(rec, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
