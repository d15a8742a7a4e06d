"""Time tuning variants of the CUDA kernel in one device call (issue #14's first experiment,
benchmarks/NOTES.md "v0": bytes in flight against instruction latency).

    python3 benchmarks/device_tune.py --out $OUT [--budget 240]

Variants, each in its own process through benchmarks/device_bench.py (same shapes, M and bits):
  default        the product build (flute/_C.abi3.so, or build/cuda-abi3/_C.abi3.so)
  ctas2, ctas1   FLUTE_CUDA_MAX_CTAS_PER_SM=2 / 1: fewer resident CTAs per SM, more pipeline stages
  pc8, pc8-ctas2 a build with FLUTE_PAIR_COPIES_WIDE=8 (3/4-bit pair tables 4x smaller: more
                 stages), made here by
                 FLUTE_CUDA_DEFINES=FLUTE_PAIR_COPIES_WIDE=8 FLUTE_CUDA_ARCHS=90a \\
                     FLUTE_ABI3_DIR=build/cuda-abi3-pc8 bash .ci/cuda_binding.sh
                 and carried (skipped when absent)
Writes $OUT/tune.json (every variant's rows) and prints one table: µs per call and the speedup
over the default build per (shape, bits, M).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def package_with(so_path, tmp, label):
    """A copy of the flute package whose _C is `so_path`; returns the directory to put first on
    PYTHONPATH."""
    dst = os.path.join(tmp, label)
    shutil.copytree(os.path.join(ROOT, "flute"), os.path.join(dst, "flute"),
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy(so_path, os.path.join(dst, "flute", "_C.abi3.so"))
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=240, help="seconds for all variants")
    ap.add_argument("--shapes", nargs="+", default=["28672x8192", "4096x4096"])
    ap.add_argument("--M", nargs="+", default=["1", "16", "64"])
    a = ap.parse_args()
    product = os.path.join(ROOT, "flute", "_C.abi3.so")
    if not os.path.exists(product):
        product = os.path.join(ROOT, "build", "cuda-abi3", "_C.abi3.so")
    pc8 = os.path.join(ROOT, "build", "cuda-abi3-pc8", "_C.abi3.so")
    variants = [("default", product, {}), ("ctas2", product, {"FLUTE_CUDA_MAX_CTAS_PER_SM": "2"}),
                ("ctas1", product, {"FLUTE_CUDA_MAX_CTAS_PER_SM": "1"})]
    if os.path.exists(pc8):
        variants += [("pc8", pc8, {}), ("pc8-ctas2", pc8, {"FLUTE_CUDA_MAX_CTAS_PER_SM": "2"})]
    else:
        print(f"no {pc8}: the pair-copies variants are skipped")
    t0, results = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, so, env in variants:
            left = a.budget - (time.time() - t0)
            if left < 20:
                results[label] = {"error": "skipped: budget"}
                continue
            path = package_with(so, tmp, label)
            out = os.path.join(tmp, f"{label}.json")
            cmd = [sys.executable, os.path.join(HERE, "device_bench.py"), "--json", out, "--label", label,
                   "--shapes", *a.shapes, "--M", *a.M] + ([] if label == "default" else ["--no-fp16"])
            e = dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
            try:
                p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=left)
                print(f"== {label} (rc {p.returncode})\n{p.stdout[-3000:]}{p.stderr[-1500:] if p.returncode else ''}",
                      flush=True)
            except subprocess.TimeoutExpired:
                print(f"== {label}: timeout", flush=True)
            results[label] = json.load(open(out)) if os.path.exists(out) else {"error": "no result"}
            results[label]["env"] = env
            results[label]["binary"] = os.path.relpath(so, ROOT)
            json.dump(results, open(os.path.join(a.out, "tune.json"), "w"), indent=1)
    base = {(r["impl"], r["N"], r["K"], r["M"]): r["median_us"]
            for r in results.get("default", {}).get("rows", [])}
    print(f"\n{'impl':<18} {'shape':>11} {'M':>3} " + " ".join(f"{v[0]:>10}" for v in variants))
    for key, us in sorted(base.items()):
        cells = []
        for label, _, _ in variants:
            r = next((r for r in results.get(label, {}).get("rows", [])
                      if (r["impl"], r["N"], r["K"], r["M"]) == key), None)
            cells.append(f"{r['median_us']:6.1f}/{us / r['median_us']:.2f}" if r else f"{'-':>10}")
        print(f"{key[0]:<18} {key[1]:>5}x{key[2]:<5} {key[3]:>3} " + " ".join(f"{c:>10}" for c in cells))


if __name__ == "__main__":
    main()
