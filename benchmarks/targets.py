"""Acceptance targets of the flute kernels, checked against a benchmark result document.

Kept out of the library on purpose: the suite (``flute bench``) measures and computes ratios, and
this file says which ratios count as good enough. ``flute bench`` loads it when it runs from a
checkout (or ``$FLUTE_BENCH_TARGETS`` / ``--targets``) and stores ``evaluate(doc)`` in the JSON's
``targets``; ``python benchmarks/check_targets.py RESULT.json`` re-checks any result file.

Each target row: ``{"target", "threshold", "points", "pass", "worst", "worst_point"}``. ``points``
counts the measured points the target covers; ``pass`` is None when none was measured, else
whether the worst of them meets the threshold.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

Row = Dict[str, object]

# -- GPU (set for an H100 / H200) -----------------------------------------------------------------
#: "Large shapes" on the GPU: at least 50M weights (Llama-3-8B's down and gate_up, all of 70B).
GPU_LARGE_WEIGHTS = 50_000_000
#: (bits, group size, minimum % of the measured copy bandwidth) at M 1-16 on large shapes.
GPU_ROOFLINE = ((4, 128, 85.0), (3, 64, 80.0), (2, 64, 75.0))
#: (M, minimum speedup over tinygemm) for 4-bit g128 bf16.
GPU_VS_TINYGEMM = ((1, 1.3), (16, 2.0))
GPU_VS_MARLIN = 1.0                 # 4-bit g128 fp16, M 1-32
GPU_M64_VS_FP16 = 2.5               # 4-bit, M = 64, large shapes
GPU_LARGE_M_VS_FP16 = 0.9           # M >= 512
GPU_BF16_FP16_TOLERANCE = 0.10      # |t(bf16) / t(fp16) - 1| for flute
GPU_E2E_DECODE = ((4, 2.8), (3, 3.3))  # decode batch 1, x fp16 tokens/s

# -- CPU (flute bench --device cpu; 4-bit g64 etc. at the suite's group size) ----------------------
#: "Large shapes" on the CPU: at least 16M weights (8192x2048 and up).
CPU_LARGE_WEIGHTS = 16_000_000
#: (bits, minimum speedup over dense fp32) at M = 1.
CPU_VS_FP32_M1 = ((4, 5.0), (3, 6.0), (2, 7.0))
CPU_VS_TORCH_INT4_M1 = 2.0          # 4-bit, M = 1
CPU_ROOFLINE_M1 = 80.0              # 4-bit, M = 1: % of the measured read bandwidth
#: (bits, llama.cpp types whose best is the bar) at M = 1 on large shapes: >= 1.0x.
CPU_VS_LLAMACPP = ((4, ("q4_0", "iq4_nl")), (3, ("q3_K",)), (2, ("q2_K",)))
CPU_M16_VS_BF16 = 1.5               # 4-bit, M = 16
CPU_LARGE_M_VS_BF16 = 0.9           # every bit width, M >= 64


def _check(out: List[Row], name: str, threshold: float, pts: List[dict],
           value: Callable[[dict], Optional[float]], higher: bool = True) -> None:
    vals = [(value(p), p) for p in pts]
    vals = [(v, p) for v, p in vals if v is not None]
    row: Row = {"target": name, "threshold": threshold, "points": len(vals), "pass": None}
    if vals:
        v, p = (min if higher else max)(vals, key=lambda t: t[0])
        row.update(worst=v, worst_point={k: p.get(k) for k in ("shape", "kernel", "bits",
                                                               "group_size", "dtype", "M", "N",
                                                               "K", "threads") if k in p},
                   **{"pass": bool(v >= threshold if higher else v <= threshold)})
    out.append(row)


def gpu_targets(points: List[dict], e2e: Optional[List[dict]] = None) -> List[Row]:
    fl = [p for p in points if p["kernel"] == "flute"]
    big = lambda p: p["N"] * p["K"] >= GPU_LARGE_WEIGHTS  # noqa: E731
    out: List[Row] = []
    for bits, g, thr in GPU_ROOFLINE:
        _check(out, f"% roofline, M 1-16, large shapes, {bits}-bit g{g}", thr,
               [p for p in fl if p["bits"] == bits and p["group_size"] == g and p["M"] <= 16
                and big(p)], lambda p: p["roofline_pct"])
    for M, thr in GPU_VS_TINYGEMM:
        _check(out, f"x tinygemm, 4-bit g128 bf16, M={M}", thr,
               [p for p in fl if p["bits"] == 4 and p["group_size"] == 128 and p["dtype"] == "bf16"
                and p["M"] == M], lambda p: (p.get("speedup_vs") or {}).get("tinygemm"))
    _check(out, "x Marlin, 4-bit g128 fp16, M 1-32", GPU_VS_MARLIN,
           [p for p in fl if p["bits"] == 4 and p["group_size"] == 128 and p["dtype"] == "fp16"
            and p["M"] <= 32], lambda p: (p.get("speedup_vs") or {}).get("marlin"))
    _check(out, "x fp16, M=64, large shapes, 4-bit", GPU_M64_VS_FP16,
           [p for p in fl if p["bits"] == 4 and p["M"] == 64 and big(p)],
           lambda p: p.get("speedup_vs_fp16"))
    _check(out, "x fp16, M >= 512", GPU_LARGE_M_VS_FP16, [p for p in fl if p["M"] >= 512],
           lambda p: p.get("speedup_vs_fp16"))
    key = lambda p: (p["shape"], p["M"], p["bits"], p["group_size"])  # noqa: E731
    fp16_t = {key(p): p["median_us"] for p in fl if p["dtype"] == "fp16"}
    _check(out, "|bf16 / fp16 time - 1| (flute)", GPU_BF16_FP16_TOLERANCE,
           [dict(p, ratio=p["median_us"] / fp16_t[key(p)]) for p in fl
            if p["dtype"] == "bf16" and key(p) in fp16_t],
           lambda p: abs(p["ratio"] - 1.0), higher=False)
    if e2e is not None:
        for bits, thr in GPU_E2E_DECODE:
            _check(out, f"e2e decode batch 1, {bits}-bit, x fp16", thr,
                   [dict(r, shape="llama3-8b e2e", M=1) for r in e2e if r.get("bits") == bits
                    and r.get("batch") == 1 and "decode_tok_s" in r],
                   lambda r: r.get("speedup_vs_fp16"))
    return out


def _best_llamacpp(p: dict, types) -> Optional[float]:
    vs = p.get("speedup_vs") or {}
    have = [vs[f"llamacpp_{t}"] for t in types if f"llamacpp_{t}" in vs]
    return min(have) if have else None  # flute / fastest peer = the smallest ratio


def cpu_targets(points: List[dict]) -> List[Row]:
    """Every CPU target once per flute activation dtype measured (cache-cold points, all thread
    counts; the worst point decides)."""
    out: List[Row] = []
    fl_all = [p for p in points if p["kernel"] == "flute" and p.get("cache", "cold") == "cold"]
    big = lambda p: p["N"] * p["K"] >= CPU_LARGE_WEIGHTS  # noqa: E731
    for dt in sorted({p["dtype"] for p in fl_all}):
        fl = [p for p in fl_all if p["dtype"] == dt]
        m1 = [p for p in fl if p["M"] == 1]
        for bits, thr in CPU_VS_FP32_M1:
            _check(out, f"[flute {dt}] M=1 {bits}-bit: x fp32", thr,
                   [p for p in m1 if p["bits"] == bits], lambda p: p.get("speedup_vs_fp32"))
        _check(out, f"[flute {dt}] M=1 4-bit: x torch int4", CPU_VS_TORCH_INT4_M1,
               [p for p in m1 if p["bits"] == 4],
               lambda p: (p.get("speedup_vs") or {}).get("torch_int4"))
        _check(out, f"[flute {dt}] M=1 4-bit: % read bandwidth", CPU_ROOFLINE_M1,
               [p for p in m1 if p["bits"] == 4], lambda p: p.get("roofline_pct"))
        for bits, types in CPU_VS_LLAMACPP:
            _check(out, f"[flute {dt}] M=1 {bits}-bit large: x llama.cpp {'/'.join(types)}", 1.0,
                   [p for p in m1 if p["bits"] == bits and big(p)],
                   lambda p, types=types: _best_llamacpp(p, types))
        _check(out, f"[flute {dt}] M=16 4-bit: x bf16", CPU_M16_VS_BF16,
               [p for p in fl if p["M"] == 16 and p["bits"] == 4], lambda p: p.get("speedup_vs_bf16"))
        _check(out, f"[flute {dt}] M>=64: x bf16", CPU_LARGE_M_VS_BF16,
               [p for p in fl if p["M"] >= 64], lambda p: p.get("speedup_vs_bf16"))
    return out


def evaluate(doc: dict) -> List[Row]:
    """The targets that apply to this result document (CPU kernels, GPU sweep, or end to end)."""
    if doc.get("kind") == "cpu-kernels":
        return cpu_targets(doc.get("points") or [])
    if doc.get("kind") == "e2e":
        return gpu_targets([], doc.get("e2e") or [])[-len(GPU_E2E_DECODE):]
    return gpu_targets(doc.get("points") or [])


def table(rows: List[Row]) -> str:
    lines = []
    for r in rows:
        state = {True: "PASS", False: "MISS", None: "n/a "}[r["pass"]]
        worst = "" if r["pass"] is None else (
            f"worst {r['worst']:.3g} at " + " ".join(f"{k}={v}" for k, v in r["worst_point"].items()
                                                      if v is not None))
        op = "<=" if r["target"].startswith("|") else ">="
        lines.append(f"{state} {r['target']:52s} ({op} {r['threshold']}, {r['points']} points) {worst}")
    return "\n".join(lines)
