"""``flute bench --device cpu``: flute's CPU op side by side with torch and llama.cpp kernels.

Every point is ``y = x @ W.T`` with ``W`` of ``N x K`` and ``x`` of ``M x K``, timed at 1 and 2
threads (``torch.set_num_threads``; llama.cpp gets the same thread count):

- kernels: ``fp32`` and ``bf16`` (torch ``F.linear``), ``torch_int4`` (torch's int4 CPU kernel,
  bf16, the flute group size), ``llamacpp`` (ggml's CPU kernels for q4_0 / iq4_nl / q3_K / q2_K,
  plain and repacked layouts, and f32 / bf16, through ``native/ggml_matmul.cpp``) and ``flute``
  (``torch.ops.flute.qgemm`` on a prepared :class:`flute.QuantLinear`, called as its forward
  calls it: through ``flute.ops.QGEMM_EAGER``, the extension's direct entry; 2/3/4 bits, bf16 and
  fp32 activations);
- cache-cold (the default): every kernel's weight is rotated through copies that together hold
  at least 2x the L3 size and 256 MiB (memory permitting), so each call reads its weight from
  memory; cache-hot figures (one copy) are separate points with ``cache == "hot"`` (M = 1);
- timing: warm-up, then the median of many calls (``time.perf_counter``; the driver uses
  ``std::chrono::steady_clock``); a point whose calls are too slow for ``--min-runs`` within
  ``--point-budget-ms`` gets fewer samples (at least one), timed on one weight copy, with a note;
- rounds (``--rounds``, 3): each shape's kernels are timed in interleaved rounds, every kernel at
  every (threads, M) once per round with a share of the point's time, and a point is the median
  of its rounds' medians (``rounds_ms`` keeps each), so a slow moment of a shared machine lands in
  one round of a few points instead of deciding a ratio; with ``--interleave-calls`` the
  torch-side kernels' cache-cold calls within a round go in turn, call by call, so their ratios
  come from the same minutes (:func:`flute.bench.timing.time_cpu_interleaved`);
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
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..huge_pages import place_for_streaming
from ..ops import QGEMM_EAGER
from . import llamacpp, peers
from .roofline import MIN_ROTATION_BYTES_CPU, cpu_rotation_copies, weight_bytes
from .shapes import CPU_GROUP
from .timing import Timing, quantiles, reps, time_cpu, time_cpu_interleaved
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
    rounds: int = 3
    interleave_calls: bool = False


def _ms(call) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


def combine_rounds(rounds: List[Dict[str, object]]) -> Dict[str, object]:
    """One point from its rounds (each ``{median_ms, p10_ms, p90_ms, runs}``, one per round):
    ``median_ms`` is the median of the rounds' medians, so a slow moment of the machine that hits
    one round of one kernel does not decide the point; ``p10_ms`` / ``p90_ms`` are the lowest p10
    and highest p90 of the rounds; ``runs`` all samples; ``rounds_ms`` each round's median."""
    meds = [float(r["median_ms"]) for r in rounds]
    return dict(median_ms=statistics.median(meds), p10_ms=min(float(r["p10_ms"]) for r in rounds),
                p90_ms=max(float(r["p90_ms"]) for r in rounds),
                runs=sum(int(r["runs"]) for r in rounds), rounds_ms=meds)


@dataclass
class _Source:
    """One torch-side kernel of a shape (fp32, bf16, torch_int4 or flute at one bit width and
    activation dtype), its rotated weight copies built once for all rounds."""
    kernel: str
    dtype: str
    make_calls: Callable
    w_bytes: int
    copies: int
    bits: Optional[int] = None
    group: Optional[int] = None
    extra: Dict[str, object] = field(default_factory=dict)
    failed: bool = False


class CpuBench:
    """Runs the grid shape by shape. Each shape's kernels are timed in ``cfg.rounds`` interleaved
    rounds: a round times every kernel at every (threads, M) once, with a ``1 / rounds`` share of
    the point's time, and a point is the median of its rounds (:func:`combine_rounds`). This
    machine class (a shared VM) moves 1.5-2x within minutes, and a point timed in one window could
    catch a slow moment that its baseline missed."""

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
        spread = (f" rounds {'/'.join(f'{v:.4g}' for v in extra['rounds_ms'])}"
                  if len(extra.get("rounds_ms") or ()) > 1 else "")
        self.log(f"  {label:22s} {dtype:4s} T={threads} M={M:4d} {cache:4s} {median_ms:10.4f} ms "
                 f"{gbps:6.1f} GB/s" + (f" {p['roofline_pct']:5.1f}%" if bw else "") + spread
                 + (f" [{extra['note']}]" if extra.get("note") else ""))
        return p

    # -- one round's timing --------------------------------------------------------------------
    def round_share(self) -> Tuple[float, int, float]:
        """``(target_ms, min_runs, point_budget_ms)`` of one round: the point's over the rounds."""
        c = self.cfg
        r = max(1, c.rounds)
        return c.target_ms / r, max(2, math.ceil(c.min_runs / r)), c.point_budget_ms / r

    def time_calls(self, calls, probe_ms: Optional[float] = None) -> Timing:
        """Warm-up and one round's timing. A call slower than ``slow_call_ms`` (the reference op,
        big M) keeps its first timed call as a sample and adds samples on one copy while the
        round's share of the point budget lasts (at least one). ``probe_ms``: the point's median
        from its first round; later rounds then take one warm-up call instead of a probe and up
        to 4 more (weights and code were warmed in round 1)."""
        c = self.cfg
        target_ms, min_runs, budget_ms = self.round_share()
        calls[0]()
        one_ms = _ms(calls[1 % len(calls)]) if probe_ms is None else probe_ms
        if one_ms > c.slow_call_ms:
            samples = [one_ms] if probe_ms is None else []
            while not samples or (len(samples) < min_runs and sum(samples) + one_ms <= budget_ms):
                samples.append(_ms(calls[0]))
            med, p10, p90 = quantiles([v * 1e3 for v in samples])
            return Timing(med, p10, p90, len(samples), 1, "perf_counter",
                          f"slow calls: {len(samples)} sample(s) per round within the "
                          f"{budget_ms:.0f} ms round budget, on one or two weight copies")
        return time_cpu(calls, target_ms=target_ms, min_runs=min_runs, max_runs=c.max_runs,
                        warmup=min(len(calls), 4) if probe_ms is None else 1, budget_ms=budget_ms)

    def copies(self, w_bytes: int) -> int:
        return cpu_rotation_copies(w_bytes, self.cfg.l3_bytes, self.cfg.mem_free or None,
                                   self.cfg.rotation_min_bytes)

    # -- the torch-side kernels of a shape (fp32, bf16, torch_int4, flute) ---------------------
    def dense_source(self, N, K, kernel) -> _Source:
        w = weight_bytes(kernel, N, K)
        n = self.copies(w)
        make, _ = peers.dense(N, K, kernel, n)
        return _Source(kernel, kernel, make, w, n)

    def int4_source(self, N, K) -> Optional[_Source]:
        g = self.cfg.group_size
        why = peers.torch_int4_support(N, K, g)
        if why:
            self.skip("torch_int4", N, K, why, group_size=g)
            return None
        w = weight_bytes("torch_int4", N, K, 4, g)
        n = self.copies(w)
        make, _ = peers.torch_int4(N, K, g, n)
        return _Source("torch_int4", "bf16", make, w, n, 4, g)

    def flute_sources(self, N, K, bits) -> List[_Source]:
        g, c = self.cfg.group_size, self.cfg
        try:
            q, rw = flute_cpu_linear(N, K, bits, g, torch.bfloat16, seed=7 * bits)
        except Exception as e:  # noqa: BLE001
            self.skip("flute", N, K, f"building the layer failed: {type(e).__name__}: {e}", bits=bits)
            return []
        w = weight_bytes("flute", N, K, bits, g)
        # Each copy's layout placed as QuantLinear.prepare places it (flute.huge_pages: layouts
        # packed one after another, as a model's layers are); the deepcopy shares the layout (a
        # view of a whole shared chunk) and is then given its own.
        layers = [q] + [copy.deepcopy(q, {id(q.qweight): q.qweight}) for _ in range(self.copies(w) - 1)]
        for m in layers[1:]:
            placed = place_for_streaming(m.qweight)  # below 64 KiB: the same tensor, so clone
            m.qweight = placed.clone() if placed is q.qweight else placed
        args = [qgemm_args(m) for m in layers]
        op = QGEMM_EAGER  # as QuantLinear.forward calls the op
        out = []
        for dt in c.flute_dtypes:
            extra = {}
            if c.check:
                from ..testing import reference_qgemm, relative_error
                xs = torch.randn(2, K, generator=torch.Generator().manual_seed(5)).to(ACT_DTYPES[dt])
                extra["rel_err"] = relative_error(op(xs, *args[0]), reference_qgemm(xs, rw, g))
                if not extra["rel_err"] < MAX_REL_ERR:
                    self.log(f"  WARNING: flute {bits}b {dt} differs from the float64 reference: "
                             f"rel_err={extra['rel_err']:.3e}")
            out.append(_Source("flute", dt, lambda x, args=args: [(lambda a=a: op(x, *a)) for a in args],
                               w, len(args), bits, g, extra))
        return out

    def torch_round(self, N, K, sources, acc) -> None:
        """Every source at every (threads, M) once, kernels back to back per (threads, M), or,
        with ``interleave_calls``, their cache-cold calls taken in turn (:meth:`interleaved_cold`)."""
        c = self.cfg
        xs: Dict[Tuple[int, str], torch.Tensor] = {}
        for t in c.threads:
            torch.set_num_threads(t)
            for M in c.Ms:
                live = []
                for i, s in enumerate(sources):
                    if s.failed or self.past_deadline():
                        continue
                    if (M, s.dtype) not in xs:
                        xs[(M, s.dtype)] = torch.randn(
                            M, K, generator=torch.Generator().manual_seed(M)).to(ACT_DTYPES[s.dtype])
                    live.append((i, s, s.make_calls(xs[(M, s.dtype)])))
                done = self.interleaved_cold(N, K, t, M, live, acc) if c.interleave_calls else set()
                for i, s, calls in live:
                    for cache, cs in [("cold", calls)] + ([("hot", calls[:1])] if M in c.hot_Ms else []):
                        key = (i, t, M, cache, len(cs))
                        if key in done:
                            continue
                        try:
                            tm = self.time_calls(cs, acc[key][0]["probe_ms"] if key in acc else None)
                        except Exception as e:  # noqa: BLE001 - one failing point must not end the run
                            self.skip(s.kernel, N, K, f"failed: {type(e).__name__}: {str(e)[:300]}",
                                      M=M, threads=t, bits=s.bits, dtype=s.dtype)
                            s.failed = True
                            break
                        self.add_timing(acc, key, tm)

    @staticmethod
    def add_timing(acc, key, tm: Timing) -> None:
        acc.setdefault(key, []).append(
            dict(median_ms=tm.median_us / 1e3, p10_ms=tm.p10_us / 1e3, p90_ms=tm.p90_us / 1e3,
                 runs=tm.runs, note=tm.note, probe_ms=tm.median_us / 1e3))

    def interleaved_cold(self, N, K, t, M, live, acc) -> set:
        """The cache-cold points of one (threads, M), timed call by call in turn
        (:func:`flute.bench.timing.time_cpu_interleaved`) so that each ratio between them comes
        from the same minutes. Each kernel is warmed up and probed alone first; one slower than
        ``slow_call_ms``, or one that fails, is left to the back-to-back timing. Returns the keys
        timed here."""
        c = self.cfg
        target_ms, min_runs, budget_ms = self.round_share()
        keys, lists, runs = [], [], []
        for i, s, calls in live:
            key = (i, t, M, "cold", len(calls))
            try:
                calls[0]()
                one_ms = acc[key][0]["probe_ms"] if key in acc else _ms(calls[1 % len(calls)])
            except Exception:  # noqa: BLE001 - the back-to-back timing reports it
                continue
            if one_ms > c.slow_call_ms:
                continue
            n = reps(one_ms, target_ms, min_runs, c.max_runs)
            n = max(1, min(n, int(budget_ms // max(one_ms, 1e-6))))
            keys.append(key)
            lists.append(calls)
            runs.append(n)
        if not keys:
            return set()
        try:
            samples = time_cpu_interleaved(lists, runs)
        except Exception:  # noqa: BLE001 - the back-to-back timing reports it
            return set()
        for key, us, n in zip(keys, samples, runs):
            med, p10, p90 = quantiles(us)
            note = f"slow point: {n} sample(s) within the {budget_ms:.0f} ms budget" if n < min_runs else ""
            self.add_timing(acc, key, Timing(med, p10, p90, n, 1, "perf_counter, interleaved", note))
        return set(keys)

    def record_torch(self, N, K, sources, acc) -> None:
        for (i, t, M, cache, n), rounds in acc.items():
            s = sources[i]
            act_bytes = torch.empty(0, dtype=ACT_DTYPES[s.dtype]).element_size()
            notes = sorted({r["note"] for r in rounds if r["note"]})
            ex = dict(s.extra, copies=n, **combine_rounds(rounds))
            if notes:
                ex["note"] = "; ".join(notes)
            med = ex.pop("median_ms")
            self.record(s.kernel, N, K, M, t, cache, s.dtype, med, s.w_bytes, act_bytes, s.bits,
                        s.group, **ex)

    # -- llama.cpp ------------------------------------------------------------------------------
    def llamacpp_round(self, N, K, acc, dead, qdir=None) -> None:
        """One driver run per (type, layout) and cache: all its (threads, M) points of one round.
        ``dead`` holds the (type, layout) pairs that cannot run this shape (skipped once). ``qdir``:
        a folder where the driver keeps each type's quantized weight for the later rounds."""
        c = self.cfg
        target_ms, min_runs, budget_ms = self.round_share()
        hot = [m for m in c.hot_Ms if m in c.Ms]
        for ty in c.ggml_types:
            for layout in (("plain", "repack") if ty in llamacpp.REPACK_TYPES else ("plain",)):
                if (ty, layout) in dead or self.past_deadline():
                    continue
                if K % (llamacpp.BLOCK[ty] or 1):
                    self.skip("llamacpp", N, K, f"K={K} is not a multiple of the {ty} block "
                              f"({llamacpp.BLOCK[ty]})", ggml_type=ty, layout=layout)
                    dead.update((ty, lay) for lay in ("plain", "repack"))
                    break
                n = self.copies(llamacpp.weight_bytes(ty, N, K))
                kw = dict(repack=layout == "repack", target_ms=target_ms, min_runs=min_runs,
                          max_runs=c.max_runs, budget_ms=budget_ms,
                          qcache=os.path.join(qdir, f"{ty}-{N}x{K}.bin") if qdir else None)
                try:
                    rows = llamacpp.run(self.llamacpp_exe, ty, N, K, c.Ms, c.threads, n, **kw)
                    if hot:
                        rows += llamacpp.run(self.llamacpp_exe, ty, N, K, hot, c.threads, 1,
                                             hot=True, **kw)
                except Exception as e:  # noqa: BLE001
                    self.skip("llamacpp", N, K, f"{type(e).__name__}: {e}", ggml_type=ty,
                              layout=layout)
                    dead.add((ty, layout))
                    continue
                for r in rows:
                    key = (ty, r["layout"], r["M"], r["threads"], r["cache"], r["copies"],
                           r["weight_bytes"])
                    acc.setdefault(key, []).append(r)

    def record_llamacpp(self, N, K, acc) -> None:
        for (ty, layout, M, t, cache, n, wb), rounds in acc.items():
            ex = combine_rounds(rounds)
            med = ex.pop("median_ms")
            self.record("llamacpp", N, K, M, t, cache, "fp32", med, wb, 4, llamacpp.TYPES[ty],
                        llamacpp.BLOCK[ty], ggml_type=ty, layout=layout, copies=n, **ex)

    # -- the grid ------------------------------------------------------------------------------
    def run_shape(self, N, K) -> None:
        c = self.cfg
        sources: List[_Source] = []
        for kernel in ("fp32", "bf16"):
            if kernel in c.kernels:
                sources.append(self.dense_source(N, K, kernel))
        if "torch_int4" in c.kernels:
            s = self.int4_source(N, K)
            sources += [s] if s else []
        for bits in c.bits if "flute" in c.kernels else ():
            sources += self.flute_sources(N, K, bits)
        use_llama = "llamacpp" in c.kernels and self.llamacpp_exe
        acc_t: Dict[tuple, list] = {}
        acc_l: Dict[tuple, list] = {}
        dead: set = set()
        # the quantized llama.cpp weights of this shape, kept for its later rounds, then removed
        with tempfile.TemporaryDirectory(prefix="flute-ggml-") as qdir:
            for r in range(max(1, c.rounds)):
                if self.past_deadline():
                    break
                t0 = time.monotonic()
                self.torch_round(N, K, sources, acc_t)
                t1 = time.monotonic()
                if use_llama:
                    self.llamacpp_round(N, K, acc_l, dead, qdir)
                self.log(f"  round {r + 1}/{c.rounds} in {time.monotonic() - t0:.1f} s"
                         + (f" (llama.cpp {time.monotonic() - t1:.1f} s)" if use_llama else ""))
        # dense and torch int4 first, then llama.cpp, then flute (the order of earlier records)
        first = {k: v for k, v in acc_t.items() if sources[k[0]].kernel != "flute"}
        self.record_torch(N, K, sources, first)
        self.record_llamacpp(N, K, acc_l)
        self.record_torch(N, K, sources, {k: v for k, v in acc_t.items() if k not in first})

    def run(self, on_shape_done=None):
        for N, K in self.cfg.shapes:
            if self.past_deadline():
                break
            self.log(f"N={N} K={K}")
            t0 = time.monotonic()
            self.run_shape(N, K)
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
