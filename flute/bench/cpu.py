"""``flute bench --device cpu``: flute's CPU op side by side with torch and llama.cpp kernels.

Every point is ``y = x @ W.T`` with ``W`` of ``N x K`` and ``x`` of ``M x K``, timed at 1 and 2
threads (``torch.set_num_threads``; llama.cpp gets the same thread count):

- kernels: ``fp32`` and ``bf16`` (torch ``F.linear``), ``torch_int4`` (torch's int4 CPU kernel,
  bf16, the flute group size), ``llamacpp`` (ggml's CPU kernels for q4_0 / iq4_nl / q3_K / q2_K,
  plain and repacked layouts, and f32 / bf16, through ``native/ggml_matmul.cpp``) and ``flute``
  (``torch.ops.flute.qgemm`` on a prepared :class:`flute.QuantLinear`, 2/3/4 bits, bf16 and fp32
  activations);
- cache-cold (the default): every kernel's weight is rotated through copies that together hold
  at least 2x the L3 size and 256 MiB (memory permitting), so each call reads its weight from
  memory; cache-hot figures (one copy) are separate points with ``cache == "hot"`` (M = 1);
- timing: warm-up, then the median of many calls (``time.perf_counter``; the driver uses
  ``std::chrono::steady_clock``); a point whose calls are too slow for ``--min-runs`` within
  ``--point-budget-ms`` gets fewer samples (at least one), timed on one weight copy, with a note;
- roofline: read bandwidth measured in the same run (:func:`flute.bench.roofline.measure_read_bandwidth`),
  per thread count; ``roofline_pct`` = the point's bytes / time over it.

JSON (``benchmarks/results/cpu-<host>-<date>.json``): host, CPU model, ISA flags, caches, torch
version, commit and dirty flag, command, threads, measured bandwidth, and per point ``{kernel,
bits, group_size, dtype, M, N, K, threads, cache, median_ms, gbps, roofline_pct, speedup_vs_fp32,
speedup_vs_bf16, speedup_vs}`` (``speedup_vs``: flute against ``torch_int4`` and each llama.cpp
type, best layout, same M, N, K, threads and cache). Targets (``benchmarks/targets.py``) are
evaluated on the same document when that file is present. The command line is :mod:`flute.bench.cpu_cli`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from . import llamacpp, peers
from .roofline import MIN_ROTATION_BYTES_CPU, cpu_rotation_copies, weight_bytes
from .shapes import CPU_GROUP
from .timing import Timing, quantiles, time_cpu
from .weights import flute_cpu_linear, qgemm_args

KERNELS = ("fp32", "bf16", "torch_int4", "llamacpp", "flute")
ACT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_REL_ERR = 2e-2


@dataclass
class CpuConfig:
    shapes: List[Tuple[int, int]]
    Ms: List[int]
    threads: List[int]
    bits: List[int]
    group_size: int = CPU_GROUP
    flute_dtypes: List[str] = field(default_factory=lambda: ["bf16", "fp32"])
    kernels: List[str] = field(default_factory=lambda: list(KERNELS))
    ggml_types: List[str] = field(default_factory=lambda: list(llamacpp.TYPES))
    hot_Ms: List[int] = field(default_factory=lambda: [1])
    target_ms: float = 200.0
    min_runs: int = 15
    max_runs: int = 2000
    point_budget_ms: float = 1500.0
    slow_call_ms: float = 250.0
    l3_bytes: int = 32 << 20
    rotation_min_bytes: int = MIN_ROTATION_BYTES_CPU
    mem_free: int = 0
    check: bool = True
    deadline: Optional[float] = None


def _ms(call) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


class CpuBench:
    def __init__(self, cfg: CpuConfig, bw: Dict[str, float], log=print):
        self.cfg, self.bw, self.log = cfg, bw, log
        self.points: List[Dict[str, object]] = []
        self.skipped: List[Dict[str, object]] = []
        self.truncated = False
        self.llamacpp_exe: Optional[str] = None
        self.shape_seconds: Dict[str, float] = {}

    # -- bookkeeping -----------------------------------------------------------------------------
    def past_deadline(self) -> bool:
        if self.cfg.deadline is not None and time.monotonic() > self.cfg.deadline and not self.truncated:
            self.log("time budget spent: stopping here (results are partial)")
            self.truncated = True
        return self.truncated

    def skip(self, kernel: str, N: int, K: int, reason: str, **extra) -> None:
        self.skipped.append(dict(kernel=kernel, N=N, K=K, reason=reason, **extra))
        self.log(f"  skipped {kernel} {extra or ''}: {reason[:160]}")

    def record(self, kernel: str, N: int, K: int, M: int, threads: int, cache: str, dtype: str,
               median_ms: float, w_bytes: int, act_bytes: int, bits=None, group=None, **extra):
        nbytes = w_bytes + (M * K + M * N) * act_bytes
        gbps = nbytes / (median_ms * 1e-3) / 1e9
        bw = self.bw.get(str(threads))
        p = dict(kernel=kernel, bits=bits, group_size=group, dtype=dtype, M=M, N=N, K=K,
                 threads=threads, cache=cache, median_ms=median_ms, bytes=nbytes, gbps=gbps,
                 roofline_pct=100.0 * gbps / bw if bw else None, speedup_vs_fp32=None,
                 speedup_vs_bf16=None, **extra)
        self.points.append(p)
        label = kernel + (f" {extra['ggml_type']}/{extra.get('layout')}" if kernel == "llamacpp"
                          else f" {bits}b" if bits else "")
        self.log(f"  {label:22s} {dtype:4s} T={threads} M={M:4d} {cache:4s} {median_ms:10.4f} ms "
                 f"{gbps:6.1f} GB/s" + (f" {p['roofline_pct']:5.1f}%" if bw else "")
                 + (f" [{extra['note']}]" if extra.get("note") else ""))
        return p

    # -- torch-side kernels (fp32, bf16, torch_int4, flute) ------------------------------------
    def time_calls(self, calls) -> Timing:
        """Warm-up and timing. A call slower than ``slow_call_ms`` (the reference op, big M) keeps
        its first timed call as a sample and adds samples on one copy while the point budget lasts."""
        c = self.cfg
        calls[0]()
        one_ms = _ms(calls[1 % len(calls)])
        if one_ms > c.slow_call_ms:
            samples = [one_ms]
            while len(samples) < c.min_runs and sum(samples) + one_ms <= c.point_budget_ms:
                samples.append(_ms(calls[0]))
            med, p10, p90 = quantiles([v * 1e3 for v in samples])
            return Timing(med, p10, p90, len(samples), 1, "perf_counter",
                          f"slow calls: {len(samples)} sample(s) within the "
                          f"{c.point_budget_ms:.0f} ms point budget, on one or two weight copies")
        return time_cpu(calls, target_ms=c.target_ms, min_runs=c.min_runs, max_runs=c.max_runs,
                        warmup=min(len(calls), 4), budget_ms=c.point_budget_ms)

    def sweep_torch(self, kernel, N, K, make_calls, dtype_name, w_bytes, copies, bits=None,
                    group=None, extra=None):
        c = self.cfg
        xdtype = ACT_DTYPES[dtype_name]
        act_bytes = torch.empty(0, dtype=xdtype).element_size()
        for t in c.threads:
            torch.set_num_threads(t)
            for M in c.Ms:
                if self.past_deadline():
                    return
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(xdtype)
                calls = make_calls(x)
                runs = [("cold", calls)] + ([("hot", calls[:1])] if M in c.hot_Ms else [])
                for cache, cs in runs:
                    try:
                        tm = self.time_calls(cs)
                    except Exception as e:  # noqa: BLE001 - one failing point must not end the run
                        self.skip(kernel, N, K, f"failed: {type(e).__name__}: {str(e)[:300]}",
                                  M=M, threads=t, bits=bits, dtype=dtype_name)
                        break
                    ex = dict(extra or {}, copies=len(cs), runs=tm.runs,
                              p10_ms=tm.p10_us / 1e3, p90_ms=tm.p90_us / 1e3)
                    if tm.note:
                        ex["note"] = tm.note
                    self.record(kernel, N, K, M, t, cache, dtype_name, tm.median_us / 1e3, w_bytes,
                                act_bytes, bits, group, **ex)

    def copies(self, w_bytes: int) -> int:
        return cpu_rotation_copies(w_bytes, self.cfg.l3_bytes, self.cfg.mem_free or None,
                                   self.cfg.rotation_min_bytes)

    def run_dense(self, N, K, kernel):
        w = weight_bytes(kernel, N, K)
        n = self.copies(w)
        make, _ = peers.dense(N, K, kernel, n)
        self.sweep_torch(kernel, N, K, make, kernel, w, n)

    def run_int4(self, N, K):
        g = self.cfg.group_size
        why = peers.torch_int4_support(N, K, g)
        if why:
            return self.skip("torch_int4", N, K, why, group_size=g)
        w = weight_bytes("torch_int4", N, K, 4, g)
        n = self.copies(w)
        make, _ = peers.torch_int4(N, K, g, n)
        self.sweep_torch("torch_int4", N, K, make, "bf16", w, n, 4, g)

    def run_flute(self, N, K, bits):
        g, c = self.cfg.group_size, self.cfg
        try:
            q, rw = flute_cpu_linear(N, K, bits, g, torch.bfloat16, seed=7 * bits)
        except Exception as e:  # noqa: BLE001
            return self.skip("flute", N, K, f"building the layer failed: {type(e).__name__}: {e}",
                             bits=bits)
        w = weight_bytes("flute", N, K, bits, g)
        layers = [q] + [copy.deepcopy(q) for _ in range(self.copies(w) - 1)]
        args = [qgemm_args(m) for m in layers]
        op = torch.ops.flute.qgemm
        for dt in c.flute_dtypes:
            extra = {}
            if c.check:
                from ..testing import reference_qgemm, relative_error
                xs = torch.randn(2, K, generator=torch.Generator().manual_seed(5)).to(ACT_DTYPES[dt])
                extra["rel_err"] = relative_error(op(xs, *args[0]), reference_qgemm(xs, rw, g))
                if not extra["rel_err"] < MAX_REL_ERR:
                    self.log(f"  WARNING: flute {bits}b {dt} differs from the float64 reference: "
                             f"rel_err={extra['rel_err']:.3e}")
            self.sweep_torch("flute", N, K, lambda x: [(lambda a=a: op(x, *a)) for a in args],
                             dt, w, len(args), bits, g, extra)

    # -- llama.cpp ------------------------------------------------------------------------------
    def run_llamacpp(self, N, K):
        c = self.cfg
        for ty in c.ggml_types:
            for layout in (("plain", "repack") if ty in llamacpp.REPACK_TYPES else ("plain",)):
                if self.past_deadline():
                    return
                if K % (llamacpp.BLOCK[ty] or 1):
                    self.skip("llamacpp", N, K, f"K={K} is not a multiple of the {ty} block "
                              f"({llamacpp.BLOCK[ty]})", ggml_type=ty, layout=layout)
                    break
                n = self.copies(llamacpp.weight_bytes(ty, N, K))
                try:
                    rows = llamacpp.run(self.llamacpp_exe, ty, N, K, c.Ms, c.threads, n,
                                        repack=layout == "repack", target_ms=c.target_ms,
                                        min_runs=c.min_runs, max_runs=c.max_runs,
                                        budget_ms=c.point_budget_ms)
                    hot = [m for m in c.hot_Ms if m in c.Ms]
                    if hot:
                        rows += llamacpp.run(self.llamacpp_exe, ty, N, K, hot, c.threads, 1,
                                             repack=layout == "repack", hot=True,
                                             target_ms=c.target_ms, min_runs=c.min_runs,
                                             max_runs=c.max_runs, budget_ms=c.point_budget_ms)
                except Exception as e:  # noqa: BLE001
                    self.skip("llamacpp", N, K, f"{type(e).__name__}: {e}", ggml_type=ty,
                              layout=layout)
                    continue
                for r in rows:
                    self.record("llamacpp", N, K, r["M"], r["threads"], r["cache"], "fp32",
                                r["median_ms"], r["weight_bytes"], 4, llamacpp.TYPES[ty],
                                llamacpp.BLOCK[ty], ggml_type=ty, layout=r["layout"],
                                copies=r["copies"], runs=r["runs"], p10_ms=r["p10_ms"],
                                p90_ms=r["p90_ms"])

    def run(self, on_shape_done=None):
        c = self.cfg
        for N, K in c.shapes:
            if self.past_deadline():
                break
            self.log(f"N={N} K={K}")
            t0 = time.monotonic()
            for kernel in ("fp32", "bf16"):
                if kernel in c.kernels and not self.past_deadline():
                    self.run_dense(N, K, kernel)
            if "torch_int4" in c.kernels and not self.past_deadline():
                self.run_int4(N, K)
            if "llamacpp" in c.kernels and self.llamacpp_exe and not self.past_deadline():
                self.run_llamacpp(N, K)
            for bits in c.bits if "flute" in c.kernels else ():
                if not self.past_deadline():
                    self.run_flute(N, K, bits)
            fill_ratios(self.points)
            self.shape_seconds[f"{N}x{K}"] = round(time.monotonic() - t0, 1)
            if on_shape_done:
                on_shape_done()
        fill_ratios(self.points)


def fill_ratios(points: List[Dict[str, object]]) -> None:
    """``speedup_vs_fp32`` / ``speedup_vs_bf16`` on every point (dense time over this time at the
    same M, N, K, threads and cache) and, on flute points, ``speedup_vs``: ``torch_int4`` and
    ``llamacpp_<type>`` (the faster layout of that type) at the same M, N, K, threads and cache."""
    key = lambda p: (p["M"], p["N"], p["K"], p["threads"], p["cache"])  # noqa: E731
    base: Dict[tuple, float] = {}
    for p in points:
        name = (f"llamacpp_{p['ggml_type']}" if p["kernel"] == "llamacpp" else p["kernel"])
        if p["kernel"] in ("fp32", "bf16", "torch_int4", "llamacpp"):
            k = (name,) + key(p)
            base[k] = min(base.get(k, float("inf")), p["median_ms"])
    for p in points:
        for d in ("fp32", "bf16"):
            t = base.get((d,) + key(p))
            p[f"speedup_vs_{d}"] = None if t is None else t / p["median_ms"]
        if p["kernel"] == "flute":
            p["speedup_vs"] = {name: t / p["median_ms"] for (name, *k), t in base.items()
                               if tuple(k) == key(p) and name not in ("fp32", "bf16")}


def validate_cpu_result(doc: Dict[str, object]) -> List[str]:
    """Problems with a CPU result document against its schema (empty when it conforms)."""
    errs = []
    for k, typ in (("host", str), ("cpu_model", str), ("isa_flags", list), ("torch", str),
                   ("commit", str), ("command", str), ("threads", list), ("read_bw_gbps", dict),
                   ("points", list), ("skipped", list)):
        if not isinstance(doc.get(k), typ):
            errs.append(f"top-level {k!r} should be {typ.__name__}, got {type(doc.get(k)).__name__}")
    num = (int, float)
    for i, p in enumerate(doc.get("points") or []):
        for k, typ in (("kernel", str), ("dtype", str), ("M", int), ("N", int), ("K", int),
                       ("threads", int), ("median_ms", num), ("gbps", num), ("cache", str)):
            if not isinstance(p.get(k), typ):
                errs.append(f"points[{i}].{k} = {p.get(k)!r} has the wrong type")
        if p.get("kernel") not in KERNELS:
            errs.append(f"points[{i}].kernel {p.get('kernel')!r} is not one of {KERNELS}")
        for k in ("bits", "group_size", "roofline_pct", "speedup_vs_fp32", "speedup_vs_bf16"):
            if k not in p:
                errs.append(f"points[{i}] lacks {k!r}")
    return errs
