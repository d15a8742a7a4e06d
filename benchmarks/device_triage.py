"""Triage of the CUDA kernels on a GPU: every case in its own process, so that a sticky CUDA error
(an illegal instruction or address poisons the context) costs one case, not the rest.

    python3 benchmarks/device_triage.py                  # the default case list, one line each
    python3 benchmarks/device_triage.py --one 2 f16 333 1000 128 0 1   # one case, in this process
    python3 benchmarks/device_triage.py --sanitize 2 f16 333 1000 128 0 1  # the same, in memcheck
    (--tool synccheck: divergent barriers and warp-synchronous instructions)

A case is: bits dtype(f16|bf16) N K group offsets(0|1) M [op(qgemm|dequant)]. Each prints one line
`CASE ... rel_err=... nan=...` or `CASE ... ERROR <the CUDA error>`; --json writes them all.
Inputs are fresh random (seeded), the output is poisoned with NaN first, the reference is float64.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

DEFAULT_CASES = [
    # bits dtype N K group offsets M: every bit width at M = 1 / 17 / 33 / 65 (batch tiles 1, 2, 4)
    f"{b} {d} {n} {k} {g} {o} {m}"
    for b in (2, 3, 4) for d in ("f16", "bf16")
    for (n, k, g, o, m) in ((333, 1000, 128, 0, 1), (333, 1000, 128, 0, 17), (40, 4096, 128, 0, 33),
                            (256, 1024, 64, 1, 65), (4096, 4096, 128, 0, 1))
] + [f"{b} f16 333 1000 128 0 0 dequant" for b in (2, 3, 4)]


def run_one(spec):
    import torch
    import flute
    from flute.layout import to_kernel_layout
    from flute.testing import random_quantized, reference_qgemm, relative_error

    parts = spec.split()
    bits, dt, n, k, group, offs, m = parts[:7]
    op = parts[7] if len(parts) > 7 else "qgemm"
    bits, n, k, group, m = int(bits), int(n), int(k), int(group), int(m)
    dtype = torch.float16 if dt == "f16" else torch.bfloat16
    dev = os.environ.get("FLUTE_TRIAGE_DEVICE", "cuda")  # "cpu": a dry run of this script
    assert dev == "cpu" or flute.ops.HAS_CUDA_KERNEL, flute.ops.CUDA_KERNEL_ERROR
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    w = random_quantized(n, k, bits, group, offsets=offs == "1", dtype=dtype, seed=n + k + m)
    q = to_kernel_layout(w.codes.to(dev), bits)
    o = None if w.offsets is None else w.offsets.to(dev)
    args = (q, w.scales.to(dev), o, w.table.to(dev), bits, group, k, n)
    if op == "dequant":
        torch.full((n * k,), float("nan"), dtype=dtype, device=dev)
        y = torch.ops.flute.dequantize(*args)
        sync()
        ref = reference_qgemm(torch.eye(k, dtype=torch.float64), w, group).t()  # W itself
    else:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        torch.full((m * n,), float("nan"), dtype=dtype, device=dev)
        y = torch.ops.flute.qgemm(x.to(dev), *args)
        sync()
        ref = reference_qgemm(x, w, group)
    y = y.double().cpu()
    nan = int((~torch.isfinite(y)).sum())
    err = relative_error(y, ref.to(y.device)) if nan == 0 else float("nan")
    return {"case": spec, "rel_err": err, "nan": nan}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs="+", help="run one case in this process")
    ap.add_argument("--sanitize", nargs="+", help="run one case under compute-sanitizer")
    ap.add_argument("--tool", default="memcheck", help="the sanitizer's tool (memcheck, synccheck, racecheck)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--jobs", type=int, default=8)
    a = ap.parse_args()
    if a.one:
        spec = " ".join(a.one)
        try:
            r = run_one(spec)
            print(f"CASE {spec} rel_err={r['rel_err']:.3e} nan={r['nan']}", flush=True)
        except Exception as exc:  # the CUDA error, one line
            print(f"CASE {spec} ERROR {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
            sys.exit(1)
        return
    if a.sanitize:
        san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        cmd = [san, "--tool", a.tool, "--show-backtrace", "device", "--print-limit", "10",
               sys.executable, __file__, "--one", *a.sanitize]
        sys.exit(subprocess.run(cmd, env=dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")).returncode)
    def run_case(spec):
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", *spec.split()], capture_output=True,
                               text=True, timeout=a.timeout)
            line = next((l for l in p.stdout.splitlines() if l.startswith("CASE")),
                        f"CASE {spec} ERROR no result (rc {p.returncode}): {p.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            line = f"CASE {spec} ERROR timeout after {a.timeout:.0f}s"
        return f"{line}  [{time.time() - t0:.1f}s]"

    with ThreadPoolExecutor(a.jobs) as pool:  # one process per case, a.jobs at a time
        results = list(pool.map(run_case, DEFAULT_CASES))
    print("\n".join(results), flush=True)
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)

if __name__ == "__main__":
    main()
