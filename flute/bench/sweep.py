"""The GPU kernel sweep: every (shape, dtype, bits, group size, M) of a grid, for flute and the
baselines, one shape at a time (one weight set in memory at a time). On the CPU the same code runs
as a smoke test (``flute bench --device cpu --smoke``); the CPU measurement is :mod:`flute.bench.cpu`."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import baselines as bl
from .roofline import achieved_gbps, ideal_us, point_bytes, roofline_pct, rotation_copies, weight_bytes
from .shapes import Shape
from .timing import Timing, time_cpu, time_cuda
from .weights import (check_flute, dequant_matmul_call, flute_call, generator,
                      random_flute_weights)

KERNELS = ("flute", "fp16", "tinygemm", "marlin", "dequant_matmul")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: A flute point whose output differs more than this from the float64 reference fails the run.
MAX_REL_ERR = 2e-2


@dataclass
class Config:
    mode: str
    device: torch.device
    shapes: List[Shape]
    Ms: List[int]
    configs: List[tuple]           # (bits, group_size)
    dtypes: List[str]
    kernels: List[str]
    target_ms: float
    min_runs: int
    max_runs: int
    graph_max_m: int
    deadline: Optional[float]      # time.monotonic() after which no new shape starts
    check: bool = True
    allow_reference: bool = False


class Sweep:
    """Runs the grid shape by shape, keeping one weight set in memory at a time."""

    def __init__(self, cfg: Config, env: Dict[str, object], copy_bw: float, log=print):
        self.cfg, self.env, self.copy_bw, self.log = cfg, env, copy_bw, log
        self.points: List[Dict[str, object]] = []
        self.skipped: List[Dict[str, object]] = []
        self.l2 = int(env.get("l2_bytes", 0) or 0)
        self.marlin, self.marlin_reason = (bl.load_marlin() if "marlin" in cfg.kernels
                                           else (None, "not requested"))
        self.truncated = False

    # a point ------------------------------------------------------------------------------------
    def _time(self, calls, M):
        c = self.cfg
        if c.device.type == "cuda":
            return time_cuda(calls, use_graph=M <= c.graph_max_m, target_ms=c.target_ms,
                             min_runs=c.min_runs, max_runs=c.max_runs)
        return time_cpu(calls, target_ms=c.target_ms, min_runs=c.min_runs, max_runs=c.max_runs)

    def _record(self, kernel, shape, M, dtype, bits, group, timing: Timing, copies, **extra):
        nbytes = point_bytes(kernel, M, shape.N, shape.K, bits, group)
        gbps = achieved_gbps(nbytes, timing.median_us)
        p = {"kernel": kernel, "bits": bits, "group_size": group, "dtype": dtype, "M": M,
             "N": shape.N, "K": shape.K, "shape": shape.name, "median_us": timing.median_us,
             "p10_us": timing.p10_us, "p90_us": timing.p90_us, "bytes": nbytes, "gbps": gbps,
             "roofline_pct": roofline_pct(gbps, self.copy_bw),
             "ideal_us": ideal_us(nbytes, self.copy_bw),
             "tflops": 2.0 * M * shape.N * shape.K / (timing.median_us * 1e-6) / 1e12,
             "speedup_vs_fp16": None, "runs": timing.runs, "calls_per_run": timing.calls_per_run,
             "timing": timing.method, "rotation_copies": copies}
        if timing.note:
            p["note"] = timing.note
        p.update(extra)
        self.points.append(p)
        return p

    def _skip(self, kernel, shape, reason, **extra):
        s = {"kernel": kernel, "shape": shape.name, "N": shape.N, "K": shape.K, "reason": reason}
        s.update(extra)
        self.skipped.append(s)

    def _activations(self, M, K, dtype, seed):
        return torch.randn(M, K, generator=generator(self.cfg.device, seed), device=self.cfg.device,
                           dtype=torch.float32).to(dtype)

    def _copies(self, bytes_per_copy):
        return rotation_copies(bytes_per_copy, self.l2) if self.cfg.device.type == "cuda" else 1

    def _sweep_m(self, kernel, shape, dtype_name, bits, group, make_calls, copies, extra_fn=None):
        dtype = DTYPES[dtype_name]
        for M in self.cfg.Ms:
            if self._past_deadline():
                return
            x = self._activations(M, shape.K, dtype, seed=M)
            try:
                calls = make_calls(x, M)
                extra = extra_fn(x, M) if extra_fn else {}
                t = self._time(calls, M)
            except Exception as e:  # noqa: BLE001 - one failing point must not end the run
                self._skip(kernel, shape, f"failed: {type(e).__name__}: {str(e)[:300]}", M=M,
                           bits=bits, group_size=group, dtype=dtype_name)
                self.log(f"  {kernel:15s} M={M:5d} FAILED {type(e).__name__}: {str(e)[:160]}")
                continue
            p = self._record(kernel, shape, M, dtype_name, bits, group, t, copies, **extra)
            self.log(f"  {kernel:15s} {dtype_name} b={bits} g={group} M={M:5d} "
                     f"{p['median_us']:10.2f} us {p['gbps']:8.1f} GB/s {p['roofline_pct']:5.1f}%"
                     + (f" rel_err={extra['rel_err']:.1e}" if 'rel_err' in extra else ""))

    def _past_deadline(self) -> bool:
        if self.cfg.deadline is not None and time.monotonic() > self.cfg.deadline:
            if not self.truncated:
                self.log("time budget spent: stopping here (results are partial)")
            self.truncated = True
        return self.truncated

    # one shape ----------------------------------------------------------------------------------
    def _dense(self, shape, dtype_name):
        dev, dtype = self.cfg.device, DTYPES[dtype_name]
        copies = self._copies(weight_bytes("fp16", shape.N, shape.K))
        wd = (torch.randn(copies, shape.N, shape.K, device=dev, generator=generator(dev, 1))
              * 0.02).to(dtype)
        self._sweep_m("fp16", shape, dtype_name, None, None,
                      lambda x, M: [(lambda i=i: F.linear(x, wd[i])) for i in range(copies)], copies)

    def _tinygemm(self, shape, dtype_name, groups):
        dev = self.cfg.device
        for g in groups:
            why = bl.tinygemm_support(shape.N, shape.K, g, dev)
            if why:
                self._skip("tinygemm", shape, why, group_size=g, dtype=dtype_name)
                continue
            copies = self._copies(weight_bytes("tinygemm", shape.N, shape.K, 4, g))
            try:
                wt = bl.random_tinygemm_weights(shape.N, shape.K, g, dev, copies)
            except Exception as e:  # noqa: BLE001
                self._skip("tinygemm", shape, f"packing failed: {type(e).__name__}: {e}",
                           group_size=g, dtype=dtype_name)
                continue
            self._sweep_m("tinygemm", shape, dtype_name, 4, g,
                          lambda x, M: [bl.tinygemm_call(wt, i, x) for i in range(copies)], copies)

    def _marlin(self, shape, dtype_name):
        dev, dtype = self.cfg.device, DTYPES[dtype_name]
        why = bl.marlin_support(self.marlin, self.marlin_reason, shape.N, shape.K, 128, dtype, dev)
        if why:
            self._skip("marlin", shape, why, group_size=128, dtype=dtype_name)
            return
        copies = self._copies(weight_bytes("marlin", shape.N, shape.K, 4, 128))
        wm = bl.random_marlin_weights(shape.N, shape.K, dev, copies)

        def marlin_calls(x, M):
            out = torch.empty(M, shape.N, dtype=torch.float16, device=dev)
            return [bl.marlin_call(self.marlin, wm, i, x, out) for i in range(copies)]
        self._sweep_m("marlin", shape, dtype_name, 4, 128, marlin_calls, copies)

    def _flute(self, shape, dtype_name, bits, g, want):
        import flute
        c, dev = self.cfg, self.cfg.device
        copies = self._copies(weight_bytes("flute", shape.N, shape.K, bits, g))
        w = random_flute_weights(shape.N, shape.K, bits, g, DTYPES[dtype_name], dev, copies,
                                 seed=17 * bits + g)
        backend = ("cuda-kernel" if flute.HAS_CUDA_KERNEL else "reference") \
            if dev.type == "cuda" else "cpu-reference"
        if "flute" in want:
            if dev.type == "cuda" and not flute.HAS_CUDA_KERNEL and not c.allow_reference:
                self._skip("flute", shape, "flute._C is not built (HAS_CUDA_KERNEL=False): "
                           "qgemm would run the slow reference; pass --allow-reference to "
                           "time it anyway", bits=bits, group_size=g, dtype=dtype_name)
            else:
                checked: Dict[str, object] = {}

                def extra(x, M):
                    if c.check and not checked:
                        xs = x[: min(M, 16)]
                        checked["rel_err"] = check_flute(w, 0, xs)
                        checked["check_M"] = xs.shape[0]
                        if not checked["rel_err"] < MAX_REL_ERR:
                            self.log(f"  WARNING: flute output differs from the reference: "
                                     f"rel_err={checked['rel_err']:.3e}")
                    return dict(checked, backend=backend)
                self._sweep_m("flute", shape, dtype_name, bits, g,
                              lambda x, M: [flute_call(w, i, x) for i in range(copies)],
                              copies, extra_fn=extra)
        if "dequant_matmul" in want:
            self._sweep_m("dequant_matmul", shape, dtype_name, bits, g,
                          lambda x, M: [dequant_matmul_call(w, i, x) for i in range(copies)],
                          copies, extra_fn=lambda x, M: {"backend": backend})

    def run_shape(self, shape: Shape):
        c = self.cfg
        kern = set(c.kernels)
        self.log(f"{shape.name}: N={shape.N} K={shape.K}")
        groups = sorted({g for _, g in c.configs})
        for dtype_name in c.dtypes:
            dtype = DTYPES[dtype_name]
            if "fp16" in kern:
                self._dense(shape, dtype_name)
            if "tinygemm" in kern and dtype == torch.bfloat16:
                self._tinygemm(shape, dtype_name, groups)
            if "marlin" in kern and dtype == torch.float16 and 128 in groups:
                self._marlin(shape, dtype_name)
            want = [k for k in ("flute", "dequant_matmul") if k in kern]
            for bits, g in c.configs if want else ():
                self._flute(shape, dtype_name, bits, g, want)
                if c.device.type == "cuda":
                    torch.cuda.empty_cache()

    def run(self, on_shape_done=None):
        for shape in self.cfg.shapes:
            if self._past_deadline():
                break
            self.run_shape(shape)
            fill_speedups(self.points)
            if on_shape_done:
                on_shape_done()
        fill_speedups(self.points)


def fill_speedups(points: List[Dict[str, object]]) -> None:
    """``speedup_vs_fp16`` on every point (dense time / this time, same M, N, K and dtype) and, on
    flute points, ``speedup_vs`` each baseline timed on the same M, N, K, dtype and group size
    (tinygemm: bf16 only; marlin: fp16 g128 only; dequant_matmul: same bits too)."""
    dense = {(p["M"], p["N"], p["K"], p["dtype"]): p["median_us"] for p in points
             if p["kernel"] == "fp16"}
    base = {}
    for p in points:
        if p["kernel"] in ("tinygemm", "marlin"):
            base[(p["kernel"], p["M"], p["N"], p["K"], p["dtype"], p["group_size"])] = p["median_us"]
        elif p["kernel"] == "dequant_matmul":
            base[("dequant_matmul", p["M"], p["N"], p["K"], p["dtype"], p["group_size"],
                  p["bits"])] = p["median_us"]
    for p in points:
        d = dense.get((p["M"], p["N"], p["K"], p["dtype"]))
        p["speedup_vs_fp16"] = None if d is None else d / p["median_us"]
        if p["kernel"] != "flute":
            continue
        vs = {}
        for k in ("tinygemm", "marlin"):
            t = base.get((k, p["M"], p["N"], p["K"], p["dtype"], p["group_size"]))
            if t is not None:
                vs[k] = t / p["median_us"]
        t = base.get(("dequant_matmul", p["M"], p["N"], p["K"], p["dtype"], p["group_size"], p["bits"]))
        if t is not None:
            vs["dequant_matmul"] = t / p["median_us"]
        p["speedup_vs"] = vs
