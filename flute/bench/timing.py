"""Timing: the median of many timed calls after a warm-up, on the host clock or CUDA events.

Every timer takes a list of closures, one per rotated weight copy, and cycles through them so
consecutive calls read different weights (see :func:`flute.bench.roofline.rotation_copies`).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    runs: int           # timed samples the median is over
    calls_per_run: int  # kernel calls inside one sample (graph replays hold one per weight copy)
    method: str         # "cuda-graph", "cuda-events" or "perf_counter"
    note: str = ""


def quantiles(samples: List[float]):
    """``(median, p10, p90)`` of the samples."""
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]  # noqa: E731
    return statistics.median(s), pick(0.1), pick(0.9)


def reps(per_run_ms: float, target_ms: float, min_runs: int, max_runs: int) -> int:
    """Samples that fill about ``target_ms`` at ``per_run_ms`` each, within [min_runs, max_runs]."""
    return int(min(max_runs, max(min_runs, math.ceil(target_ms / max(per_run_ms, 1e-4)))))


def time_cpu(calls: Sequence[Callable[[], object]], target_ms: float = 50.0, min_runs: int = 5,
             max_runs: int = 200, warmup: int = 2, budget_ms: Optional[float] = None) -> Timing:
    """Host-clock timing: every call timed alone with ``time.perf_counter`` (monotonic).

    ``warmup`` calls first (at least one), then ``min_runs``..``max_runs`` samples filling about
    ``target_ms``. ``budget_ms`` caps a slow point: when one call takes so long that ``min_runs``
    samples would exceed it, fewer samples are taken (at least one) and ``note`` says so."""
    first_ms = 0.0
    for i in range(max(warmup, 1)):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        first_ms = (time.perf_counter() - t0) * 1e3
    n = reps(first_ms, target_ms, min_runs, max_runs)
    note = ""
    if budget_ms is not None and n * first_ms > budget_ms:
        n = max(1, min(n, int(budget_ms // max(first_ms, 1e-6))))
        if n < min_runs:
            note = f"slow point: {n} sample(s) within the {budget_ms:.0f} ms budget"
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        samples.append((time.perf_counter() - t0) * 1e6)
    med, p10, p90 = quantiles(samples)
    return Timing(med, p10, p90, n, 1, "perf_counter", note)


def time_cpu_interleaved(call_lists: Sequence[Sequence[Callable[[], object]]],
                         runs: Sequence[int]) -> List[List[float]]:
    """Samples (us) of several kernels timed call by call in turn, ``runs[i]`` of kernel ``i``
    (each cycling through its own ``call_lists[i]``, its rotated weight copies).

    Sample j of every kernel is taken before sample j + 1 of any, so the kernels' medians cover
    the same minutes of a machine whose speed drifts; the kernel that goes first rotates with j,
    so none always runs right after the same other one (on a 2-core VM the second of two
    back-to-back variants measured 1-15% faster: CPU_NOTES item 118). No warm-up here."""
    k = len(call_lists)
    samples: List[List[float]] = [[] for _ in range(k)]
    for j in range(max(runs, default=0)):
        for o in range(k):
            i = (j + o) % k
            if j < runs[i]:
                calls = call_lists[i]
                t0 = time.perf_counter()
                calls[j % len(calls)]()
                samples[i].append((time.perf_counter() - t0) * 1e6)
    return samples


def time_cuda(calls: Sequence[Callable[[], object]], use_graph: bool = True, target_ms: float = 30.0,
              min_runs: int = 10, max_runs: int = 1000, warmup: int = 3) -> Timing:
    """CUDA-event timing of ``calls`` (one closure per rotated weight copy).

    With ``use_graph`` the calls are captured once, in order, into one CUDA graph; each replay runs
    every copy once and is timed with a pair of events, and a sample is the replay time divided by
    the number of calls. Without it (or when capture fails) each call is timed alone with events,
    cycling through the copies. Either way: a warm-up first, then ``min_runs``..``max_runs``
    samples chosen to fill about ``target_ms``, and the median.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    passes = max(1, math.ceil(warmup / len(calls)))  # >= `warmup` calls and >= one pass
    with torch.cuda.stream(stream):  # warm up on a side stream, as graph capture requires
        for _ in range(passes):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    note = ""
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for c in calls:
                    c()
            graph.replay()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - fall back to per-call events
            note = f"graph capture failed ({type(e).__name__}: {str(e)[:120]}); timed eagerly"
            graph = None
            torch.cuda.synchronize()
        if graph is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            n = reps(start.elapsed_time(end), target_ms, min_runs, max_runs)
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
            for s, e in ev:
                s.record()
                graph.replay()
                e.record()
            torch.cuda.synchronize()
            samples = [s.elapsed_time(e) * 1e3 / len(calls) for s, e in ev]
            del graph
            med, p10, p90 = quantiles(samples)
            return Timing(med, p10, p90, n, len(calls), "cuda-graph")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    calls[0]()
    end.record()
    end.synchronize()
    n = reps(start.elapsed_time(end), target_ms, min_runs, max_runs)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]
    for i, (s, e) in enumerate(ev):
        s.record()
        calls[i % len(calls)]()
        e.record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 for s, e in ev]
    med, p10, p90 = quantiles(samples)
    return Timing(med, p10, p90, n, 1, "cuda-events", note)
