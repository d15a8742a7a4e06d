"""The command line of the CPU benchmark: ``flute bench --device cpu [--quick] [options]``
(the measurement itself is :mod:`flute.bench.cpu`). Writes ``benchmarks/results/cpu-<host>-<date>.json``
and its PNG, and evaluates ``benchmarks/targets.py`` on it when that file is present."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import time
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import llamacpp, report
from .cpu import ACT_DTYPES, KERNELS, MAX_REL_ERR, CpuBench, CpuConfig, validate_cpu_result
from .env import cpu_info, environment
from .roofline import MIN_ROTATION_BYTES_CPU, measure_read_bandwidth
from .shapes import (CPU_BITS, CPU_GROUP, CPU_M, CPU_QUICK_M, CPU_QUICK_SHAPES, CPU_SHAPES,
                     CPU_THREADS, parse_nk)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flute bench --device cpu", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--device", default="cpu", choices=("cpu",))
    p.add_argument("--quick", action="store_true", help="2 shapes (1536x576, 14336x4096), M 1 and 16 "
                   "(8.5 minutes on this project's 2-core VM with 3 rounds; the README's record command 27)")
    p.add_argument("--shapes", nargs="+", default=None, help="NxK shapes, e.g. 4096x14336")
    p.add_argument("--M", nargs="+", type=int, default=None)
    p.add_argument("--threads", nargs="+", type=int, default=None, help="thread counts (1 2)")
    p.add_argument("--bits", nargs="+", type=int, default=None, choices=(2, 3, 4))
    p.add_argument("--group-size", type=int, default=CPU_GROUP)
    p.add_argument("--flute-dtype", nargs="+", default=None, choices=tuple(ACT_DTYPES),
                   help="activation dtypes of the flute points (bf16 fp32)")
    p.add_argument("--kernels", nargs="+", default=None, choices=KERNELS)
    p.add_argument("--ggml-types", nargs="+", default=None, choices=tuple(llamacpp.TYPES))
    p.add_argument("--hot-M", nargs="*", type=int, default=None, help="M values that also get a "
                   "cache-hot point (default 1; none with an empty list)")
    p.add_argument("--target-ms", type=float, default=None, help="time per point (200; quick 100)")
    p.add_argument("--min-runs", type=int, default=None, help="fewest samples per point (15)")
    p.add_argument("--max-runs", type=int, default=2000)
    p.add_argument("--point-budget-ms", type=float, default=1500.0, help="cap on a slow point")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per shape; a point is "
                   "the median of its rounds (3)")
    p.add_argument("--interleave-calls", action="store_true", help="within a round, time the "
                   "torch-side kernels' cache-cold calls in turn, call by call, so each ratio comes "
                   "from the same minutes of a drifting machine (default: each kernel's calls back "
                   "to back)")
    p.add_argument("--read-bw-mib", type=int, default=None, help="read-bandwidth buffer (max(1024, 8 x L3))")
    p.add_argument("--read-bw-runs", type=int, default=7)
    p.add_argument("--l3-mib", type=float, default=None, help="L3 size for the rotation (sysfs)")
    p.add_argument("--rotation-mib", type=float, default=MIN_ROTATION_BYTES_CPU >> 20,
                   help="least bytes the rotated copies of a weight hold together (256)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting new work after "
                   "this long and write partial results (default: none; quick 15)")
    p.add_argument("--no-llamacpp-build", action="store_true", help="use llama.cpp only if already built")
    p.add_argument("--llamacpp-src", default=None, help="a llama.cpp tree or llama-cpp-python sdist")
    p.add_argument("--cpu-mode", default=None, choices=("exact", "bf16", "int8"),
                   help="flute's CPU kernel mode (default: the library's, flute.get_cpu_mode())")
    p.add_argument("--no-check", action="store_true", help="skip flute's float64 reference check")
    p.add_argument("--targets", default=None, help="targets file (default benchmarks/targets.py)")
    p.add_argument("--out", default=None, help="directory of the JSON and PNG (benchmarks/results)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    return p


def make_config(a, info: Dict[str, object]) -> CpuConfig:
    shapes = ([parse_nk(s) for s in a.shapes] if a.shapes else
              list(CPU_QUICK_SHAPES if a.quick else CPU_SHAPES))
    minutes = a.max_minutes if a.max_minutes is not None else (15.0 if a.quick else None)
    l3 = int(a.l3_mib * 2 ** 20) if a.l3_mib else int(info.get("l3_bytes") or 32 << 20)
    return CpuConfig(
        shapes=shapes, Ms=sorted(set(a.M or (CPU_QUICK_M if a.quick else CPU_M))),
        threads=a.threads or list(CPU_THREADS), bits=a.bits or list(CPU_BITS),
        group_size=a.group_size, flute_dtypes=a.flute_dtype or ["bf16", "fp32"],
        kernels=a.kernels or list(KERNELS), ggml_types=a.ggml_types or list(llamacpp.TYPES),
        hot_Ms=[1] if a.hot_M is None else a.hot_M,
        target_ms=a.target_ms if a.target_ms is not None else (100.0 if a.quick else 200.0),
        min_runs=a.min_runs or 15, max_runs=a.max_runs, point_budget_ms=a.point_budget_ms,
        rounds=a.rounds, interleave_calls=a.interleave_calls,
        l3_bytes=l3, rotation_min_bytes=int(a.rotation_mib * 2 ** 20),
        mem_free=int(info.get("mem_available_bytes") or 0), check=not a.no_check,
        deadline=time.monotonic() + 60 * minutes if minutes else None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {a.rounds}")
    log = lambda *x: print(*x, flush=True)  # noqa: E731
    t_start = time.monotonic()
    prev_threads = torch.get_num_threads()
    info = cpu_info()
    cfg = make_config(a, info)
    env = environment(torch.device("cpu"), a.commit)
    from .. import ops
    if a.cpu_mode and ops.HAS_CPU_KERNEL:
        ops.set_cpu_mode(a.cpu_mode)
    doc: Dict[str, object] = dict(env, kind="cpu-kernels", mode="quick" if a.quick else "full", **info)
    doc.update(device=f"cpu ({info['cpu_model']})", threads=cfg.threads,
               flute_cpu_mode=ops.get_cpu_mode(), flute_cpu_isa=ops.get_cpu_isa(),
               flute_cpu_amx=ops.get_cpu_amx(),
               flute_cpu_vnni=ops.get_cpu_vnni(),
               grid={"shapes": [f"{n}x{k}" for n, k in cfg.shapes], "M": cfg.Ms,
                     "bits": cfg.bits, "group_size": cfg.group_size,
                     "flute_dtypes": cfg.flute_dtypes, "kernels": cfg.kernels,
                     "ggml_types": cfg.ggml_types, "hot_M": cfg.hot_Ms},
               method={"timing": "time.perf_counter per call (llama.cpp: steady_clock in the "
                                 "driver); warm-up, then the median", "target_ms": cfg.target_ms,
                       "min_runs": cfg.min_runs, "point_budget_ms": cfg.point_budget_ms,
                       "rounds": cfg.rounds,
                       "interleave_calls": cfg.interleave_calls,
                       "rounds_method": "each shape's kernels timed in interleaved rounds (every "
                                        "kernel at every threads x M once per round, with 1/rounds "
                                        "of target_ms, min_runs and point_budget_ms); median_ms = "
                                        "the median of the rounds' medians (rounds_ms), p10/p90 = "
                                        "the lowest p10 and highest p90 of the rounds",
                       "rotation": f"cache-cold points rotate weight copies holding >= 2 x L3 "
                                   f"({cfg.l3_bytes >> 20} MiB) and >= "
                                   f"{cfg.rotation_min_bytes >> 20} MiB, at most a quarter of free "
                                   f"memory; cache-hot points use one copy",
                       "bytes": "weight (codes + scales + table) + activations + output, each once",
                       "weights": "random (speed only); flute checked against a float64 reference"})
    log(f"flute bench --device cpu on {platform.node()} | {info['cpu_model']} | "
        f"{' '.join(info['isa_flags'])} | L3 {info['l3_bytes'] >> 20} MiB | torch {env['torch']} | "
        f"flute CPU path {ops.get_cpu_isa()}, mode {ops.get_cpu_mode()}, AMX {ops.get_cpu_amx()} | "
        f"commit {env['commit']}{' (dirty tree)' if env.get('dirty') else ''}")
    try:
        doc.update(measure_read_bandwidth(cfg.threads, cfg.l3_bytes, log,
                                          nbytes=(a.read_bw_mib << 20) if a.read_bw_mib else None,
                                          runs=a.read_bw_runs))
        bench = CpuBench(cfg, doc["read_bw_gbps"], log)
        if "llamacpp" in cfg.kernels:
            exe, linfo = llamacpp_driver(a, log)
            bench.llamacpp_exe = exe
            doc["llamacpp"] = linfo if exe else dict(linfo, status=f"skipped: {linfo['reason']}")
            log(f"llama.cpp: {'driver ' + exe if exe else doc['llamacpp']['status']}")
        out_dir = (a.out or os.path.join("benchmarks", "results")).rstrip("/") or "."
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = os.path.join(out_dir, f"cpu-{report.slug(platform.node())}-{stamp}.json")

        def save():
            doc.update(points=bench.points, skipped=bench.skipped, truncated=bench.truncated,
                       elapsed_s=round(time.monotonic() - t_start, 1),
                       shape_elapsed_s=bench.shape_seconds)
            report.write_json(path, doc)
        save()
        bench.run(on_shape_done=save)
        save()
        table = report.attach_targets(doc, a.targets)
        report.write_json(path, doc)
    finally:
        torch.set_num_threads(prev_threads)
    problems = validate_cpu_result(doc)
    if problems:
        log("result does not match the schema: " + "; ".join(problems[:5]))
    log(table or f"targets: {doc.get('targets_note')}")
    log(f"wrote {path} ({len(bench.points)} points in {doc['elapsed_s']:.0f} s"
        f"{', TRUNCATED' if bench.truncated else ''})")
    if not a.no_plots:
        from .plots import plot_results
        try:
            for png in plot_results(path):
                log(f"wrote {png}")
        except Exception as e:  # noqa: BLE001 - plotting must never lose a result
            log(f"plotting failed ({type(e).__name__}: {e}); python benchmarks/plot.py {path}")
    bad = [p for p in bench.points if p.get("rel_err") is not None and not p["rel_err"] < MAX_REL_ERR]
    return 1 if bad or problems else 0


def llamacpp_driver(a, log) -> Tuple[Optional[str], Dict[str, object]]:
    """The llama.cpp driver, built into the cache on first use (unless --no-llamacpp-build)."""
    if a.no_llamacpp_build:
        root = os.path.join(llamacpp.cache_dir(f"llamacpp-{llamacpp.VERSION}"), "build")
        if not all(os.path.isfile(os.path.join(root, lib)) for lib in llamacpp.LIBS):
            return None, {"reason": "not built and --no-llamacpp-build given "
                                    "(python -m flute.bench.llamacpp builds it)"}
    return llamacpp.build(src=a.llamacpp_src, log=log)
