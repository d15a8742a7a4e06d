"""The flute benchmark suite (``flute bench`` / ``python benchmarks/bench.py``).

Modes:
  --device cpu      the CPU benchmark: flute's CPU op side by side with torch fp32/bf16/int4 and
                    llama.cpp's kernels, cache-cold, 1 and 2 threads, against the measured read
                    bandwidth (``flute bench --device cpu --help``; ``--quick`` for a short run)
  --quick           GPU: two large shapes, M in {1, 16}, 4-bit g128 and 3-bit g64, fp16 and bf16,
                    all baselines (the device check runs this; about two minutes on an H100)
  --full            GPU: the whole grid (every shape, M, bits, group size, dtype); filter it with
                    --shapes, --M, --bits, --group-size, --dtype
  --e2e             Hugging Face generate with a static cache and CUDA graphs on a
                    Llama-3-8B-shaped model with random weights: decode and prefill tokens/s
  --device cpu --smoke   the GPU sweep's code on small shapes on the CPU (tests the sweep)

Method on CUDA: the device-to-device copy bandwidth is measured first in the same process and is
the roofline; every kernel call reads its weights from HBM because the weights are rotated through
enough copies to exceed the L2 cache several times over; calls are timed with CUDA events (for
small M inside a CUDA graph that replays one call per weight copy, so launch gaps vanish), after a
warm-up, and the median over many runs is reported. Ratios are between kernels timed in the same
run on the same shapes. Weights are random (speed does not depend on their values); every flute
weight configuration is checked once against the float64 reference (``rel_err`` in the JSON).
Acceptance targets are read from benchmarks/targets.py when it is present.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from .e2e import run_e2e
from .env import environment
from .plots import plot_results
from .report import attach_targets, result_path, summary_table, validate_result, write_json
from .roofline import L2_FACTOR, MAX_COPIES, measure_copy_bandwidth, measure_matmul_tflops
from .shapes import (BITS_FULL, GROUPS_FULL, M_FULL, QUICK_CONFIGS, QUICK_M, QUICK_SHAPES,
                     SMOKE_CONFIGS, SMOKE_M, SMOKE_SHAPES, all_shapes, select_shapes)
from .sweep import DTYPES, KERNELS, MAX_REL_ERR, Config, Sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flute bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="two large shapes, M 1 and 16, 4b g128 and "
                      "3b g64, fp16+bf16, all baselines (the device check's run)")
    mode.add_argument("--full", action="store_true", help="the whole GPU grid (default on CUDA)")
    mode.add_argument("--smoke", action="store_true", help="with --device cpu: run the GPU sweep's "
                      "code on small shapes on the CPU (a test of the sweep, not a measurement)")
    mode.add_argument("--e2e", action="store_true", help="end-to-end HF generate benchmark")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; cpu runs "
                   "the CPU benchmark, see flute bench --device cpu --help)")
    p.add_argument("--out", default=None, help="directory for the JSON and PNGs (default "
                   "benchmarks/results, or benchmarks/results/cpu in CPU mode)")
    p.add_argument("--shapes", nargs="+", default=None, help="shape names or globs, e.g. "
                   "'llama3-8b/*' '*-tp2/*' (see --list-shapes)")
    p.add_argument("--list-shapes", action="store_true", help="print the shape grid and exit")
    p.add_argument("--M", nargs="+", type=int, default=None, help="batch sizes (tokens)")
    p.add_argument("--bits", nargs="+", type=int, default=None, choices=(2, 3, 4))
    p.add_argument("--group-size", nargs="+", type=int, default=None)
    p.add_argument("--dtype", nargs="+", default=None, choices=tuple(DTYPES))
    p.add_argument("--kernels", nargs="+", default=None, choices=KERNELS,
                   help="kernels to time (default: all)")
    p.add_argument("--target-ms", type=float, default=None,
                   help="time to spend timing one point (default: full 20, quick 200, cpu 30)")
    p.add_argument("--min-runs", type=int, default=None, help="fewest timed samples per point")
    p.add_argument("--max-runs", type=int, default=1000)
    p.add_argument("--graph-max-m", type=int, default=256, help="use CUDA graphs up to this M")
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting new shapes (or "
                   "e2e variants) after this long and write partial results (default: full 8.5, "
                   "quick 3, cpu 1, e2e 9; 0 = no limit)")
    p.add_argument("--no-check", action="store_true", help="skip the flute-vs-reference check")
    p.add_argument("--allow-reference", action="store_true", help="time qgemm on CUDA even when "
                   "flute._C is not built (the slow reference path)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="--smoke: torch threads (default 1)")
    p.add_argument("--targets", default=None, help="targets file (default benchmarks/targets.py)")
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse "
                   "HEAD, or $FLUTE_BENCH_COMMIT; needed where the tree has no .git)")
    p.add_argument("--tests-json", default=None, help="a JSON file with GPU test counts to embed")
    p.add_argument("--e2e-bits", nargs="+", default=None, choices=("fp16", "2", "3", "4"),
                   help="e2e variants (default: fp16 4 3 2)")
    p.add_argument("--e2e-batch", nargs="+", type=int, default=None, help="decode batches (1 8 32)")
    p.add_argument("--e2e-group", type=int, default=64)
    p.add_argument("--e2e-layers", type=int, default=None, help="decoder layers (default 32)")
    p.add_argument("--e2e-prompt", type=int, default=None, help="prompt tokens for decode (128)")
    p.add_argument("--e2e-new-tokens", type=int, default=None, help="decoded tokens timed (128)")
    p.add_argument("--e2e-prefill", type=int, default=None, help="prefill tokens (2048; 0 = skip)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="timed generate calls (3)")
    p.add_argument("--e2e-no-compile", action="store_true", help="eager decode (no CUDA graphs)")
    return p


def _load_tests(path: Optional[str]):
    if not path:
        return None
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        return {"error": f"could not read {path}: {e}"}
    try:
        return json.loads(text)
    except ValueError:
        return {"raw": text[:4000]}


def make_config(args, dev: torch.device) -> Config:
    cpu = dev.type == "cpu"
    if args.quick:
        mode, shapes, Ms, configs = "quick", list(QUICK_SHAPES), list(QUICK_M), list(QUICK_CONFIGS)
        target, min_runs, minutes = 200.0, 50, 3.0
    elif cpu and not args.full:
        mode, shapes, Ms, configs = "cpu", list(SMOKE_SHAPES), list(SMOKE_M), list(SMOKE_CONFIGS)
        target, min_runs, minutes = 30.0, 5, 1.0
    else:
        mode, shapes, Ms = "full", None, list(M_FULL)
        configs = [(b, g) for b in BITS_FULL for g in GROUPS_FULL]
        target, min_runs, minutes = 20.0, 10, 8.5
    if cpu:  # the CPU path is the slow reference: never the large shapes unless asked for
        if mode == "quick":
            mode, shapes, target, min_runs, minutes = "cpu-quick", list(SMOKE_SHAPES), 30.0, 5, 1.0
        mode = "cpu" if mode == "full" else mode
    if args.shapes:
        shapes = args.shapes
    if args.M:
        Ms = args.M
    if args.bits or args.group_size:
        bits = args.bits or sorted({b for b, _ in configs})
        groups = args.group_size or sorted({g for _, g in configs})
        configs = [(b, g) for b in bits for g in groups]
    dtypes = args.dtype or ["fp16", "bf16"]
    minutes = args.max_minutes if args.max_minutes is not None else minutes
    return Config(mode=mode, device=dev, shapes=select_shapes(shapes), Ms=sorted(set(Ms)),
                  configs=configs, dtypes=dtypes, kernels=list(args.kernels or KERNELS),
                  target_ms=args.target_ms if args.target_ms is not None else target,
                  min_runs=args.min_runs or min_runs, max_runs=args.max_runs,
                  graph_max_m=args.graph_max_m,
                  deadline=(time.monotonic() + 60 * minutes) if minutes else None,
                  check=not args.no_check, allow_reference=args.allow_reference)


def _finish_plots(path: str, args, log) -> List[str]:
    if args.no_plots:
        return []
    try:
        pngs = plot_results(path)
    except Exception as e:  # noqa: BLE001 - plotting must never lose a result
        log(f"plotting failed ({type(e).__name__}: {e}); the JSON is intact: "
            f"python benchmarks/plot.py {path}")
        return []
    if not pngs:
        log(f"matplotlib is not importable: no PNGs; later run python benchmarks/plot.py {path}")
    for p in pngs:
        log(f"wrote {p}")
    return pngs


def wants_cpu_benchmark(argv: Sequence[str]) -> bool:
    """``--device cpu`` without --smoke / --e2e / --list-shapes (or no device and no CUDA)."""
    argv = list(argv)
    if any(a in argv for a in ("--smoke", "--e2e", "--list-shapes", "--full")):
        return False
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1] == "cpu"
        if a.startswith("--device="):
            return a.split("=", 1)[1] == "cpu"
    return not torch.cuda.is_available() and "-h" not in argv and "--help" not in argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_cpu_benchmark(argv):
        from .cpu_cli import main as cpu_main
        if not any(a == "--device" or a.startswith("--device=") for a in argv) and "--quick" not in argv:
            print("flute bench: no CUDA device; running the CPU benchmark's --quick subset "
                  "(flute bench --device cpu for all of it)", flush=True)
            argv = argv + ["--quick"]
        return cpu_main(argv)
    args = build_parser().parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if args.list_shapes:
        for s in all_shapes():
            log(f"{s.name:28s} N={s.N:6d} K={s.K:6d}")
        return 0
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        log("flute bench: --device cuda but torch sees no CUDA device")
        return 2
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dev = torch.device("cuda", torch.cuda.current_device())
    else:  # one thread: steadier host timings on a shared machine (override with --threads)
        torch.set_num_threads(args.threads or 1)
    env = environment(dev, args.commit)
    tests = _load_tests(args.tests_json)
    if tests is not None:
        env["tests"] = tests
    out_dir = args.out or os.path.join("benchmarks", "results", "cpu" if dev.type == "cpu" else "")
    out_dir = out_dir.rstrip("/") or "."
    log(f"flute bench on {env['device']} | torch {env['torch']} cuda {env['cuda']} driver "
        f"{env['driver']} | commit {env['commit']}{' (dirty tree)' if env.get('dirty') else ''}")
    if dev.type == "cpu":
        log("smoke run: host-clock timing of the GPU sweep's code on the CPU on small shapes; these "
            "numbers test the sweep, they are not a measurement (that is flute bench --device cpu)")

    if args.e2e:
        if args.max_minutes is None:
            args.max_minutes = 9.0 if dev.type == "cuda" else 1.0
        doc = run_e2e(args, env, log)
        doc.update(measure_copy_bandwidth(dev))
        path = result_path(out_dir, "e2e" if dev.type == "cuda" else "e2e-cpu", str(env["device"]))
        table = attach_targets(doc, args.targets) if dev.type == "cuda" else None
        write_json(path, doc)
        log(f"wrote {path}")
        for r in doc["e2e"]:
            if "prefill_tok_s" in r:
                what = f"prefill {r['prefill_tokens']}: {r['prefill_tok_s']:.1f} tok/s"
            elif r.get("decode_tok_s"):
                what = f"decode batch {r['batch']}: {r['decode_tok_s']:.1f} tok/s"
            else:
                what = f"decode batch {r['batch']}: not measurable"
            sp = r.get("speedup_vs_fp16")
            log(f"{r['variant']:22s} {what}" + (f" ({sp:.2f}x fp16)" if sp else ""))
        if table:
            log(table)
        _finish_plots(path, args, log)
        return 0

    cfg = make_config(args, dev)
    bw = measure_copy_bandwidth(dev)
    log(f"copy bandwidth {bw['copy_bw_gbps']:.1f} GB/s ({bw['copy_bytes'] / 2 ** 30:.2f} GiB moved per "
        f"copy, median of {bw['copy_runs']})")
    doc: Dict[str, object] = dict(env, kind="kernels", mode=cfg.mode)
    doc.update(bw)
    if dev.type == "cuda":
        doc["l2_rotation"] = {"factor": L2_FACTOR, "max_copies": MAX_COPIES}
        try:
            doc["matmul_tflops"] = {d: measure_matmul_tflops(dev, DTYPES[d]) for d in cfg.dtypes}
            log("dense matmul ceiling (8192^3): " + ", ".join(f"{d} {v:.0f} TFLOP/s"
                                                             for d, v in doc["matmul_tflops"].items()))
        except Exception as e:  # noqa: BLE001
            doc["matmul_tflops"] = {"error": str(e)[:200]}
    doc.update(grid={"shapes": [s.name for s in cfg.shapes], "M": cfg.Ms, "configs": cfg.configs,
                     "dtypes": cfg.dtypes, "kernels": cfg.kernels},
               method={"timing": "CUDA events; CUDA graph of one call per rotated weight copy for "
                                 f"M <= {cfg.graph_max_m}, per-call events above; median"
                       if dev.type == "cuda" else "time.perf_counter per call; median; no rotation",
                       "target_ms": cfg.target_ms, "min_runs": cfg.min_runs,
                       "weights": "random codes < 2**bits and random positive scales (speed only)",
                       "bytes": "minimum: weight (codes + scales + table) + activations + output, "
                                "each once"})
    sweep = Sweep(cfg, env, bw["copy_bw_gbps"], log)
    marlin_state = ("available" if sweep.marlin is not None else f"skipped: {sweep.marlin_reason}")
    doc["baselines"] = {"marlin": marlin_state}
    log(f"marlin: {marlin_state}")
    path = result_path(out_dir, cfg.mode, str(env["device"]))
    table: List[Optional[str]] = [None]

    def save():
        tf = doc.get("matmul_tflops")
        if isinstance(tf, dict):
            for p in sweep.points:
                if isinstance(tf.get(p["dtype"]), float):
                    p["compute_pct"] = 100.0 * p["tflops"] / tf[p["dtype"]]
        doc.update(points=sweep.points, skipped=sweep.skipped, truncated=sweep.truncated)
        table[0] = attach_targets(doc, args.targets)
        write_json(path, doc)

    save()
    t0 = time.monotonic()
    sweep.run(on_shape_done=save)
    doc["elapsed_s"] = time.monotonic() - t0
    save()
    n_skip = len(sweep.skipped)
    reasons = sorted({f"{s['kernel']}: {s['reason']}" for s in sweep.skipped})
    log("\n" + summary_table(sweep.points))
    if n_skip:
        log(f"{n_skip} skipped points/configs:")
        for r in reasons[:12]:
            log(f"  {r[:200]}")
    if dev.type == "cuda":
        log("targets (benchmarks/targets.py):\n" + (table[0] or str(doc.get("targets_note"))))
    problems = validate_result(doc)
    if problems:
        log("result does not match the schema: " + "; ".join(problems[:5]))
    log(f"wrote {path} ({len(sweep.points)} points in {doc['elapsed_s']:.1f} s"
        f"{', TRUNCATED' if sweep.truncated else ''})")
    _finish_plots(path, args, log)
    bad = [p for p in sweep.points if p["kernel"] == "flute" and p.get("rel_err") is not None
           and not p["rel_err"] < MAX_REL_ERR]
    if bad:
        log(f"ERROR: {len(bad)} flute points failed the correctness check")
        return 1
    return 0
