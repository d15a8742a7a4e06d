"""The flute benchmark suite: kernel sweeps, baselines, roofline, end-to-end generation.

Run it as ``python benchmarks/bench.py ...`` (or ``flute bench ...``); :func:`main` takes the
argument list. Modes:

``--quick``   two large shapes, M in {1, 16}, 4-bit g128 and 3-bit g64, fp16 and bf16, all
              baselines (the device check runs this; about two minutes on an H100).
``--full``    the whole grid of the issue (every shape, M, bits, group size, dtype); filter it with
              ``--shapes``, ``--M``, ``--bits``, ``--group-size``, ``--dtype``.
``--e2e``     Hugging Face ``generate`` with a static cache and CUDA graphs (``torch.compile``) on
              a Llama-3-8B-shaped model with random weights: decode and prefill tokens/s.
``--device cpu``  a smoke test of the same code on small shapes (host clock, no L2 rotation).

Method on CUDA: the device-to-device copy bandwidth is measured first in the same process and is
the roofline; every kernel call reads its weights from HBM because the weights are rotated through
enough copies to exceed the L2 cache several times over; calls are timed with CUDA events (for
small M inside a CUDA graph that replays one call per weight copy, so launch gaps vanish), after a
warm-up, and the median over many runs is reported. Ratios (speedups) are between kernels timed
in the same run on the same shapes.

Weights are random (random codes below ``2**bits``, random positive scales, the NF table): speed
does not depend on their values, and quality is not measured here. Every flute point of a weight
configuration is checked once against an independent float32 reference so a fast wrong kernel
cannot pass unnoticed (``rel_err`` in the JSON).

JSON schema (one file per run): ``{"device", "torch", "cuda", "driver", "commit", "copy_bw_gbps",
"points": [{"kernel", "bits", "group_size", "dtype", "M", "N", "K", "median_us", "gbps",
"roofline_pct", "speedup_vs_fp16", ...}], ...}``; kernel names ``flute``, ``fp16`` (dense
``F.linear`` in the point's dtype: cuBLAS on CUDA), ``tinygemm``, ``marlin``, ``dequant_matmul``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

SCHEMA_VERSION = 1
KERNELS = ("flute", "fp16", "tinygemm", "marlin", "dequant_matmul")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# -- the grid ---------------------------------------------------------------------------------------

#: ``model -> [(layer, in_features K, out_features N, parallel style)]``. Fused q/k/v and gate/up
#: projections as serving engines run them; ``col`` layers split N under tensor parallelism,
#: ``row`` layers split K.
MODELS = {
    "llama3-8b": [("qkv", 4096, 6144, "col"), ("o", 4096, 4096, "row"),
                  ("gate_up", 4096, 28672, "col"), ("down", 14336, 4096, "row")],
    "llama3-70b": [("qkv", 8192, 10240, "col"), ("o", 8192, 8192, "row"),
                   ("gate_up", 8192, 57344, "col"), ("down", 28672, 8192, "row")],
    # hidden 576, intermediate 1536, 9 heads of 64, 3 kv heads: qkv = 576 + 2 * 192 = 960.
    "smollm2-135m": [("qkv", 576, 960, "col"), ("o", 576, 576, "row"),
                     ("gate_up", 576, 3072, "col"), ("down", 1536, 576, "row")],
}
TP_MODELS = ("llama3-8b", "llama3-70b")
TP_DEGREES = (1, 2, 4)
M_FULL = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
BITS_FULL = (2, 3, 4)
GROUPS_FULL = (64, 128)

QUICK_SHAPES = ("llama3-70b/o", "llama3-70b-tp2/gate_up")  # 8192x8192 and 8192->28672
QUICK_M = (1, 16)
QUICK_CONFIGS = ((4, 128), (3, 64))
CPU_SHAPES = ("smollm2-135m/o", "smollm2-135m/qkv")
CPU_M = (1, 16)
CPU_CONFIGS = ((4, 64), (3, 64))

#: L2 size assumed when the device does not report one (larger than any current GPU's L2).
ASSUMED_L2_BYTES = 128 << 20
#: Rotated weight copies must together hold at least this many L2 caches.
L2_FACTOR = 3
MAX_COPIES = 4096
#: Size of the buffer copied for the copy-bandwidth roofline (its bytes are counted twice: read + written).
COPY_BYTES_CUDA = 1 << 30
COPY_BYTES_CPU = 64 << 20


@dataclass(frozen=True)
class Shape:
    name: str      # e.g. "llama3-70b-tp2/gate_up"
    model: str
    layer: str
    tp: int
    K: int         # in_features
    N: int         # out_features


def all_shapes() -> List[Shape]:
    """Every shape of the issue's grid: each model's linears, and Llama's TP 2 and 4 splits.

    Ordered unsplit models first, then TP 2, then TP 4, so that a run stopped by its time budget
    has the most important shapes."""
    out = []
    for tp in TP_DEGREES:
        for model, layers in MODELS.items():
            if tp > 1 and model not in TP_MODELS:
                continue
            prefix = model if tp == 1 else f"{model}-tp{tp}"
            for layer, k, n, style in layers:
                kk, nn_ = (k, n // tp) if style == "col" else (k // tp, n)
                out.append(Shape(f"{prefix}/{layer}", model, layer, tp, kk, nn_))
    return out


def select_shapes(patterns: Optional[Sequence[str]]) -> List[Shape]:
    """Shapes whose name matches any glob pattern (all of them when ``patterns`` is empty)."""
    shapes = all_shapes()
    if not patterns:
        return shapes
    picked = [s for s in shapes if any(fnmatch.fnmatchcase(s.name, p) or s.name == p for p in patterns)]
    if not picked:
        names = ", ".join(s.name for s in shapes)
        raise ValueError(f"no shape matches {list(patterns)}; known shapes: {names}")
    return picked


# -- bytes, roofline, rotation ----------------------------------------------------------------------

def weight_bytes(kernel: str, N: int, K: int, bits: Optional[int] = None,
                 group_size: Optional[int] = None, dtype_bytes: int = 2) -> int:
    """Bytes of the weight operand a kernel must read once: codes + group scales (+ table / zeros).

    ``flute`` and ``dequant_matmul`` (same weights): ``N*K*bits/8`` code bytes, one 16-bit scale per
    group, the ``2**bits`` float32 table. ``fp16``: ``N*K`` 16-bit values. ``tinygemm``: 4-bit codes
    and a (scale, zero) 16-bit pair per group. ``marlin``: 4-bit codes and one 16-bit scale per group.
    """
    if kernel == "fp16":
        return N * K * dtype_bytes
    groups = N * math.ceil(K / (K if group_size in (None, -1) else group_size))
    if kernel in ("flute", "dequant_matmul"):
        return math.ceil(N * K * bits / 8) + groups * dtype_bytes + (2 ** bits) * 4
    if kernel == "tinygemm":
        return N * K // 2 + groups * 2 * dtype_bytes
    if kernel == "marlin":
        return N * K // 2 + groups * dtype_bytes
    raise ValueError(f"unknown kernel {kernel!r}")


def point_bytes(kernel: str, M: int, N: int, K: int, bits: Optional[int] = None,
                group_size: Optional[int] = None, dtype_bytes: int = 2) -> int:
    """The fewest bytes one call must move through device memory: the weight read once, the
    activations ``[M, K]`` read once, the output ``[M, N]`` written once. (``dequant_matmul``
    really moves more -- it writes and re-reads a 16-bit weight -- but it computes the same
    function, so it is charged the same minimum: its GB/s is an effective rate.)"""
    return weight_bytes(kernel, N, K, bits, group_size, dtype_bytes) + (M * K + M * N) * dtype_bytes


def achieved_gbps(nbytes: int, median_us: float) -> float:
    return nbytes / (median_us * 1e-6) / 1e9


def roofline_pct(gbps: float, copy_bw_gbps: float) -> float:
    return 100.0 * gbps / copy_bw_gbps


def ideal_us(nbytes: int, copy_bw_gbps: float) -> float:
    """Time to move ``nbytes`` at the measured copy bandwidth (the bandwidth floor)."""
    return nbytes / (copy_bw_gbps * 1e9) * 1e6


def rotation_copies(bytes_per_copy: int, l2_bytes: int, factor: int = L2_FACTOR,
                    max_copies: int = MAX_COPIES) -> int:
    """How many copies of a weight to rotate through so that consecutive calls read from HBM: the
    copies together hold at least ``factor`` times the L2 size (at least 2 copies)."""
    if l2_bytes <= 0:
        return 1
    need = math.ceil(factor * l2_bytes / max(1, bytes_per_copy))
    return int(min(max_copies, max(2, need)))


# -- environment ------------------------------------------------------------------------------------

def _run(cmd: Sequence[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(explicit: Optional[str] = None) -> Dict[str, object]:
    """``{"commit", "dirty"}``: ``explicit`` (or ``$FLUTE_BENCH_COMMIT``) wins, else ``git rev-parse
    HEAD`` in the repository (read-only git commands only). The device machine gets a copy of the
    working tree without ``.git``: there the caller must pass the commit."""
    given = explicit or os.environ.get("FLUTE_BENCH_COMMIT")
    if given:
        return {"commit": given, "dirty": None, "commit_source": "given"}
    root = repo_root()
    head = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if not head:
        return {"commit": "unknown (no git repository; pass --commit)", "dirty": None,
                "commit_source": "none"}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return {"commit": head, "dirty": bool(status), "commit_source": "git"}


def driver_version() -> str:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        import pynvml  # type: ignore
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - any failure means "not known"
        return "unavailable"


def environment(device: torch.device, commit: Optional[str] = None) -> Dict[str, object]:
    """Device name, library versions, driver, commit and the command line of this run."""
    info: Dict[str, object] = {
        "schema_version": SCHEMA_VERSION,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.argv[0]) or "python"] + sys.argv[1:]),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
    }
    info.update(git_commit(commit))
    try:
        import flute
        info["flute_version"] = flute.__version__
        info["flute_cuda_kernel"] = bool(flute.HAS_CUDA_KERNEL)
    except Exception as e:  # noqa: BLE001
        info["flute_version"] = f"import failed: {e}"
        info["flute_cuda_kernel"] = False
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), driver=driver_version(),
                    sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    l2_bytes=int(getattr(p, "L2_cache_size", 0) or 0),
                    memory_gib=round(p.total_memory / 2 ** 30, 1))
        if info["l2_bytes"] <= 0:  # unknown: assume a large L2 so the rotation still defeats it
            info.update(l2_bytes=ASSUMED_L2_BYTES, l2_bytes_assumed=True)
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads)",
                    driver="none", l2_bytes=0)
    return info


# -- timing -----------------------------------------------------------------------------------------

@dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    runs: int           # timed samples the median is over
    calls_per_run: int  # kernel calls inside one sample (graph replays hold one per weight copy)
    method: str         # "cuda-graph", "cuda-events" or "perf_counter"
    note: str = ""


def _quantiles(samples: List[float]):
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]  # noqa: E731
    return statistics.median(s), pick(0.1), pick(0.9)


def _reps(per_run_ms: float, target_ms: float, min_runs: int, max_runs: int) -> int:
    return int(min(max_runs, max(min_runs, math.ceil(target_ms / max(per_run_ms, 1e-4)))))


def time_cpu(calls: Sequence[Callable[[], object]], target_ms: float = 50.0, min_runs: int = 5,
             max_runs: int = 200, warmup: int = 2) -> Timing:
    """Host-clock timing for the CPU path: every call timed alone with ``time.perf_counter``."""
    for i in range(max(warmup, 1)):
        calls[i % len(calls)]()
    t0 = time.perf_counter()
    calls[0]()
    first_ms = (time.perf_counter() - t0) * 1e3
    n = _reps(first_ms, target_ms, min_runs, max_runs)
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        samples.append((time.perf_counter() - t0) * 1e6)
    med, p10, p90 = _quantiles(samples)
    return Timing(med, p10, p90, n, 1, "perf_counter")


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
            n = _reps(start.elapsed_time(end), target_ms, min_runs, max_runs)
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
            for s, e in ev:
                s.record()
                graph.replay()
                e.record()
            torch.cuda.synchronize()
            samples = [s.elapsed_time(e) * 1e3 / len(calls) for s, e in ev]
            del graph
            med, p10, p90 = _quantiles(samples)
            return Timing(med, p10, p90, n, len(calls), "cuda-graph")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    calls[0]()
    end.record()
    end.synchronize()
    n = _reps(start.elapsed_time(end), target_ms, min_runs, max_runs)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]
    for i, (s, e) in enumerate(ev):
        s.record()
        calls[i % len(calls)]()
        e.record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 for s, e in ev]
    med, p10, p90 = _quantiles(samples)
    return Timing(med, p10, p90, n, 1, "cuda-events", note)


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, runs: int = 20) -> Dict:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written over the median time).

    On CUDA a buffer of at least 1 GiB is copied into a second one; on the CPU 64 MiB (a rough
    number, only there so the CPU mode has a denominator)."""
    if nbytes is None:
        nbytes = COPY_BYTES_CUDA if device.type == "cuda" else COPY_BYTES_CPU
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    if device.type == "cuda":
        t = time_cuda([copy], use_graph=False, target_ms=0.0, min_runs=runs, max_runs=runs)
    else:
        t = time_cpu([copy], target_ms=0.0, min_runs=max(3, runs // 4), max_runs=max(3, runs // 4))
    del src, dst
    bw = 2 * n * 4 / (t.median_us * 1e-6) / 1e9
    return {"copy_bw_gbps": bw, "copy_bytes": 2 * n * 4, "copy_median_us": t.median_us,
            "copy_runs": t.runs}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """Dense matmul rate of this device (TFLOP/s) on a ``size``-cubed product: the compute ceiling
    against which large-M points are judged (``compute_pct``)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t = time_cuda([lambda: torch.matmul(a, b)], use_graph=False, target_ms=200.0, min_runs=10)
    return 2 * size ** 3 / (t.median_us * 1e-6) / 1e12


# -- weights and kernel closures --------------------------------------------------------------------

def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_flute_weights(N: int, K: int, bits: int, group_size: int, dtype: torch.dtype,
                         device: torch.device, copies: int = 1, seed: int = 0) -> Dict[str, object]:
    """``copies`` random flute weights in the kernel layout (for speed only, not quality).

    Every bit of the int32 kernel layout is a code bit, so uniformly random words are uniformly
    random codes below ``2**bits`` (the padding atoms, if any, are never part of a result). Scales
    are random positive values around ``1/sqrt(K)``; the table is the NF table.
    """
    from .codebooks import get_table
    from .format import num_groups
    from .layout import kernel_layout_shape
    g = _gen(device, seed)
    (words,) = kernel_layout_shape(bits, K, N)
    qweight = torch.randint(-2 ** 31, 2 ** 31, (copies, words), dtype=torch.int32, device=device,
                            generator=g)
    ng = num_groups(group_size, K)
    scales = (torch.rand(copies, N, ng, device=device, generator=g, dtype=torch.float32) + 0.5)
    scales = (scales / math.sqrt(K)).to(dtype)
    table = get_table("nf", bits).to(device=device, dtype=torch.float32)
    return {"qweight": qweight, "scales": scales, "table": table, "bits": bits,
            "group_size": group_size, "N": N, "K": K, "copies": copies}


def flute_call(w: Dict[str, object], i: int, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    q, s, t = w["qweight"][i], w["scales"][i], w["table"]
    b, gs, k, n = w["bits"], w["group_size"], w["K"], w["N"]
    return lambda: torch.ops.flute.qgemm(x, q, s, None, t, b, gs, k, n)


def dequant_matmul_call(w: Dict[str, object], i: int, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    q, s, t = w["qweight"][i], w["scales"][i], w["table"]
    b, gs, k, n = w["bits"], w["group_size"], w["K"], w["N"]
    return lambda: F.linear(x, torch.ops.flute.dequantize(q, s, None, t, b, gs, k, n))


def flute_reference(w: Dict[str, object], i: int, x: torch.Tensor) -> torch.Tensor:
    """float32 ``x @ W.T`` through the pure-torch reference (independent of the CUDA kernel)."""
    from .ops import dequantize_reference
    wt = dequantize_reference(w["qweight"][i], w["scales"][i].float(), None, w["table"], w["bits"],
                              w["group_size"], w["K"], w["N"])
    return x.float() @ wt.float().t()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def tinygemm_support(N: int, K: int, group_size: int, device: torch.device) -> Optional[str]:
    """None when ``torch._weight_int4pack_mm`` can run this shape, else the reason it cannot."""
    if device.type != "cuda":
        return "tinygemm (torch._weight_int4pack_mm) is benchmarked on CUDA only"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "this torch has no aten::_weight_int4pack_mm"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm needs compute capability 8.0+"
    if group_size not in (32, 64, 128, 256):
        return f"tinygemm supports group sizes 32/64/128/256, not {group_size}"
    if K % group_size or N % 8 or K % 32:
        return f"tinygemm needs K % group == 0, K % 32 == 0 and N % 8 == 0 (N={N}, K={K})"
    return None


def _inner_k_tiles(K: int) -> int:
    for t in (8, 4, 2):
        if K % (t * 16) == 0:
            return t
    raise ValueError(f"K={K} is not a multiple of 32")


def random_tinygemm_weights(N: int, K: int, group_size: int, device: torch.device, copies: int,
                            seed: int = 0) -> Dict[str, object]:
    """Random int4 weights packed by ``torch._convert_weight_to_int4pack`` (uint8 [N, K/2] input,
    torch >= 2.5) and bf16 (scale, zero) pairs ``[K/G, N, 2]``, ``copies`` of each."""
    g = _gen(device, seed)
    packed = []
    for _ in range(copies if copies <= 4 else 1):
        raw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device, generator=g)
        packed.append(torch.ops.aten._convert_weight_to_int4pack(raw, _inner_k_tiles(K)))
    if len(packed) < copies:  # any packed bits are valid codes: replicate to save packing time
        packed = [packed[0]] * copies
    b = torch.stack(packed).contiguous()
    sz = torch.empty(copies, K // group_size, N, 2, dtype=torch.bfloat16, device=device)
    sz[..., 0].uniform_(0.5 / math.sqrt(K), 1.5 / math.sqrt(K), generator=g)
    sz[..., 1].uniform_(-0.01, 0.01, generator=g)
    return {"B": b, "sz": sz, "group_size": group_size}


def tinygemm_call(w: Dict[str, object], i: int, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    b, sz, gs = w["B"][i], w["sz"][i], w["group_size"]
    return lambda: torch.ops.aten._weight_int4pack_mm(x, b, gs, sz)


def load_marlin():
    """``(module, None)`` when the original IST-DASLab Marlin is importable, else ``(None, reason)``."""
    try:
        import marlin  # type: ignore
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken build's OSError
        return None, (f"not importable ({type(e).__name__}: {e}); build it from source as "
                      f"benchmarks/MARLIN.md describes")
    if not hasattr(marlin, "mul"):
        return None, f"the importable 'marlin' ({getattr(marlin, '__file__', '?')}) has no mul()"
    return marlin, None


def marlin_support(marlin_mod, marlin_reason: Optional[str], N: int, K: int, group_size: int,
                   dtype: torch.dtype, device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "Marlin is benchmarked on CUDA only"
    if marlin_mod is None:
        return marlin_reason
    if dtype != torch.float16:
        return "Marlin runs fp16 activations only"
    if group_size != 128:
        return "Marlin supports group size 128 (or per-channel) only"
    if K % 128 or N % 256:
        return f"Marlin needs K % 128 == 0 and N % 256 == 0 (N={N}, K={K})"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "Marlin needs compute capability 8.0+"
    return None


def random_marlin_weights(N: int, K: int, device: torch.device, copies: int, seed: int = 0):
    """Random Marlin-format weights: B int32 ``[K/16, N*16/8]`` (any bits are valid packed int4
    codes), fp16 scales ``[K/128, N]``, and a zeroed int32 workspace of ``N/128*16`` entries (the
    kernel's locks; it leaves them zero after each call, so one serves every call)."""
    g = _gen(device, seed)
    b = torch.randint(-2 ** 31, 2 ** 31, (copies, K // 16, N * 16 // 8), dtype=torch.int32,
                      device=device, generator=g)
    s = (torch.rand(copies, K // 128, N, device=device, generator=g) + 0.5) / math.sqrt(K)
    ws = torch.zeros(N // 128 * 16, dtype=torch.int32, device=device)
    return {"B": b, "s": s.half(), "workspace": ws}


def marlin_call(marlin_mod, w, i: int, x: torch.Tensor, out: torch.Tensor):
    b, s, ws = w["B"][i], w["s"][i], w["workspace"]

    def call():
        marlin_mod.mul(x, b, out, s, ws, -1, -1, -1, 16)
        return out
    return call


# -- the sweep --------------------------------------------------------------------------------------

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
        self.marlin, self.marlin_reason = (load_marlin() if "marlin" in cfg.kernels
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
        return torch.randn(M, K, generator=_gen(self.cfg.device, seed), device=self.cfg.device,
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
    def run_shape(self, shape: Shape):
        c, dev = self.cfg, self.cfg.device
        import flute
        kern = set(c.kernels)
        self.log(f"{shape.name}: N={shape.N} K={shape.K}")
        for dtype_name in c.dtypes:
            dtype = DTYPES[dtype_name]
            if "fp16" in kern:
                copies = self._copies(weight_bytes("fp16", shape.N, shape.K))
                wd = (torch.randn(copies, shape.N, shape.K, device=dev, generator=_gen(dev, 1))
                      * 0.02).to(dtype)
                self._sweep_m("fp16", shape, dtype_name, None, None,
                              lambda x, M: [(lambda i=i: F.linear(x, wd[i])) for i in range(copies)],
                              copies)
                del wd
            groups = sorted({g for _, g in c.configs})
            if "tinygemm" in kern and dtype == torch.bfloat16:
                for g in groups:
                    why = tinygemm_support(shape.N, shape.K, g, dev)
                    if why:
                        self._skip("tinygemm", shape, why, group_size=g, dtype=dtype_name)
                        continue
                    copies = self._copies(weight_bytes("tinygemm", shape.N, shape.K, 4, g))
                    try:
                        wt = random_tinygemm_weights(shape.N, shape.K, g, dev, copies)
                    except Exception as e:  # noqa: BLE001
                        self._skip("tinygemm", shape, f"packing failed: {type(e).__name__}: {e}",
                                   group_size=g, dtype=dtype_name)
                        continue
                    self._sweep_m("tinygemm", shape, dtype_name, 4, g,
                                  lambda x, M: [tinygemm_call(wt, i, x) for i in range(copies)], copies)
                    del wt
            if "marlin" in kern and dtype == torch.float16 and 128 in groups:
                why = marlin_support(self.marlin, self.marlin_reason, shape.N, shape.K, 128, dtype, dev)
                if why:
                    self._skip("marlin", shape, why, group_size=128, dtype=dtype_name)
                else:
                    copies = self._copies(weight_bytes("marlin", shape.N, shape.K, 4, 128))
                    wm = random_marlin_weights(shape.N, shape.K, dev, copies)

                    def marlin_calls(x, M, wm=wm, copies=copies):
                        out = torch.empty(M, shape.N, dtype=torch.float16, device=dev)
                        return [marlin_call(self.marlin, wm, i, x, out) for i in range(copies)]
                    self._sweep_m("marlin", shape, dtype_name, 4, 128, marlin_calls, copies)
                    del wm
            for bits, g in c.configs:
                want = [k for k in ("flute", "dequant_matmul") if k in kern]
                if not want:
                    continue
                copies = self._copies(weight_bytes("flute", shape.N, shape.K, bits, g))
                w = random_flute_weights(shape.N, shape.K, bits, g, dtype, dev, copies,
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

                        def extra(x, M, w=w, checked=checked, backend=backend):
                            if c.check and not checked:
                                xs = x[: min(M, 16)]
                                out = flute_call(w, 0, xs)()
                                checked["rel_err"] = rel_err(out, flute_reference(w, 0, xs))
                                checked["check_M"] = xs.shape[0]
                                if not checked["rel_err"] < 2e-2:
                                    self.log(f"  WARNING: flute output differs from the reference: "
                                             f"rel_err={checked['rel_err']:.3e}")
                            return dict(checked, backend=backend)
                        self._sweep_m("flute", shape, dtype_name, bits, g,
                                      lambda x, M, w=w: [flute_call(w, i, x) for i in range(copies)],
                                      copies, extra_fn=extra)
                if "dequant_matmul" in want:
                    self._sweep_m("dequant_matmul", shape, dtype_name, bits, g,
                                  lambda x, M, w=w: [dequant_matmul_call(w, i, x)
                                                     for i in range(copies)],
                                  copies, extra_fn=lambda x, M, backend=backend: {"backend": backend})
                del w
                if dev.type == "cuda":
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


# -- the issue's targets ----------------------------------------------------------------------------

#: "Large shapes" for the targets: at least 50M weights (Llama-3-8B's down projection and up).
LARGE_WEIGHTS = 50_000_000


def _is_large(p) -> bool:
    return p["N"] * p["K"] >= LARGE_WEIGHTS


def evaluate_targets(points: List[Dict[str, object]], e2e: Optional[List[Dict[str, object]]] = None
                     ) -> List[Dict[str, object]]:
    """The issue's H100 targets checked against measured points: for each, the worst point, how
    many points it covers, and whether all of them meet it (``None`` when nothing was measured)."""
    fl = [p for p in points if p["kernel"] == "flute"]
    out = []

    def add(name, threshold, pts, value, higher=True):
        vals = [(value(p), p) for p in pts]
        vals = [(v, p) for v, p in vals if v is not None]
        row = {"target": name, "threshold": threshold, "points": len(vals), "pass": None}
        if vals:
            v, p = (min if higher else max)(vals, key=lambda t: t[0])
            row.update(worst=v, worst_point={k: p.get(k) for k in ("shape", "kernel", "bits",
                                                                   "group_size", "dtype", "M")
                                             if k in p},
                       **{"pass": bool(v >= threshold if higher else v <= threshold)})
        out.append(row)

    for bits, g, thr in ((4, 128, 85.0), (3, 64, 80.0), (2, 64, 75.0)):
        add(f"% roofline, M 1-16, large shapes, {bits}-bit g{g}", thr,
            [p for p in fl if p["bits"] == bits and p["group_size"] == g and p["M"] <= 16
             and _is_large(p)], lambda p: p["roofline_pct"])
    for M, thr in ((1, 1.3), (16, 2.0)):
        add(f"x tinygemm, 4-bit g128 bf16, M={M}", thr,
            [p for p in fl if p["bits"] == 4 and p["group_size"] == 128 and p["dtype"] == "bf16"
             and p["M"] == M], lambda p: (p.get("speedup_vs") or {}).get("tinygemm"))
    add("x Marlin, 4-bit g128 fp16, M 1-32", 1.0,
        [p for p in fl if p["bits"] == 4 and p["group_size"] == 128 and p["dtype"] == "fp16"
         and p["M"] <= 32], lambda p: (p.get("speedup_vs") or {}).get("marlin"))
    add("x fp16, M=64, large shapes, 4-bit", 2.5,
        [p for p in fl if p["bits"] == 4 and p["M"] == 64 and _is_large(p)],
        lambda p: p.get("speedup_vs_fp16"))
    add("x fp16, M >= 512", 0.9, [p for p in fl if p["M"] >= 512], lambda p: p.get("speedup_vs_fp16"))
    fp16_t = {(p["shape"], p["M"], p["bits"], p["group_size"]): p["median_us"] for p in fl
              if p["dtype"] == "fp16"}
    add("|bf16 / fp16 time - 1| (flute)", 0.10,
        [dict(p, ratio=p["median_us"] / fp16_t[(p["shape"], p["M"], p["bits"], p["group_size"])])
         for p in fl if p["dtype"] == "bf16" and (p["shape"], p["M"], p["bits"], p["group_size"])
         in fp16_t], lambda p: abs(p["ratio"] - 1.0), higher=False)
    if e2e is not None:
        for bits, thr in ((4, 2.8), (3, 3.3)):
            add(f"e2e decode batch 1, {bits}-bit, x fp16", thr,
                [dict(r, shape="llama3-8b e2e", M=1) for r in e2e if r.get("bits") == bits
                 and r.get("batch") == 1 and "decode_tok_s" in r],
                lambda r: r.get("speedup_vs_fp16"))
    return out


def targets_table(rows: List[Dict[str, object]]) -> str:
    lines = []
    for r in rows:
        state = {True: "PASS", False: "MISS", None: "n/a "}[r["pass"]]
        worst = "" if r["pass"] is None else (
            f"worst {r['worst']:.3g} at " + " ".join(f"{k}={v}" for k, v in r["worst_point"].items()))
        op = "<=" if r["target"].startswith("|") else ">="
        lines.append(f"{state} {r['target']:48s} ({op} {r['threshold']}, {r['points']} points) {worst}")
    return "\n".join(lines)


# -- output -----------------------------------------------------------------------------------------

def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s.lower()).strip("-")[:40] or "device"


def result_path(out_dir: str, mode: str, device_name: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    dev = _slug(device_name.replace("NVIDIA", "").split("(")[0])
    return os.path.join(out_dir, f"{mode}_{dev}_{stamp}.json")


def write_json(path: str, doc: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)


def validate_result(doc: Dict[str, object]) -> List[str]:
    """Problems with a result document against the schema (an empty list when it conforms)."""
    errs = []
    for key, typ in (("device", str), ("torch", str), ("cuda", str), ("driver", str),
                     ("commit", str), ("copy_bw_gbps", float), ("points", list)):
        if not isinstance(doc.get(key), typ):
            errs.append(f"top-level {key!r} should be {typ.__name__}, got {type(doc.get(key)).__name__}")
    for i, p in enumerate(doc.get("points") or []):
        for key, typ in (("kernel", str), ("dtype", str), ("M", int), ("N", int), ("K", int),
                         ("median_us", float), ("gbps", float), ("roofline_pct", float)):
            if not isinstance(p.get(key), typ):
                errs.append(f"points[{i}].{key} should be {typ.__name__}, got {p.get(key)!r}")
        if p.get("kernel") not in KERNELS:
            errs.append(f"points[{i}].kernel {p.get('kernel')!r} is not one of {KERNELS}")
        for key in ("bits", "group_size"):
            if p.get(key) is not None and not isinstance(p.get(key), int):
                errs.append(f"points[{i}].{key} should be int or null")
        s = p.get("speedup_vs_fp16")
        if s is not None and not isinstance(s, float):
            errs.append(f"points[{i}].speedup_vs_fp16 should be float or null")
    return errs


def summary_table(points: List[Dict[str, object]], limit: int = 60) -> str:
    """A short text table (the device reply carries only the end of the output)."""
    rows = [f"{'shape':24s} {'kernel':14s} {'dt':4s} {'b':>2s} {'g':>4s} {'M':>5s} "
            f"{'us':>9s} {'GB/s':>7s} {'%roof':>6s} {'xfp16':>6s}"]
    pts = sorted(points, key=lambda p: (p["shape"], p["dtype"], p["M"], p["kernel"],
                                        p["bits"] or 0, p["group_size"] or 0))
    for p in pts[:limit]:
        sp = p.get("speedup_vs_fp16")
        rows.append(f"{p['shape']:24s} {p['kernel']:14s} {p['dtype']:4s} {str(p['bits'] or '-'):>2s} "
                    f"{str(p['group_size'] or '-'):>4s} {p['M']:5d} {p['median_us']:9.2f} "
                    f"{p['gbps']:7.1f} {p['roofline_pct']:6.1f} "
                    f"{('%.2f' % sp) if sp else '-':>6s}")
    if len(pts) > limit:
        rows.append(f"... {len(pts) - limit} more points in the JSON")
    return "\n".join(rows)


# -- plots (optional: only when matplotlib is importable) -------------------------------------------

def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # noqa: BLE001
        return None


def _series(points, shape, dtype, metric):
    """``{label: (Ms, values)}`` for one shape and dtype."""
    out: Dict[str, tuple] = {}
    for p in points:
        if p["shape"] != shape or p["dtype"] != dtype or p.get(metric) is None:
            continue
        if p["kernel"] == "fp16" and metric == "speedup_vs_fp16":
            continue
        label = p["kernel"] if p["kernel"] == "fp16" else f"{p['kernel']} {p['bits']}b g{p['group_size']}"
        out.setdefault(label, ([], []))
        out[label][0].append(p["M"])
        out[label][1].append(p[metric])
    for k, (ms, vs) in out.items():
        order = sorted(range(len(ms)), key=ms.__getitem__)
        out[k] = ([ms[i] for i in order], [vs[i] for i in order])
    return out


_STYLE = {"flute": "-", "dequant_matmul": ":", "tinygemm": "--", "marlin": "-.", "fp16": "-"}
_COLOR = {2: "tab:red", 3: "tab:orange", 4: "tab:blue", None: "black"}


def plot_results(json_path: str, out_dir: Optional[str] = None) -> List[str]:
    """Write ``<stem>_speedup.png`` (speedup over dense vs M, one panel per shape and dtype) and
    ``<stem>_roofline.png`` (% of the copy-bandwidth roofline vs M); for an end-to-end result,
    ``<stem>_e2e.png``. Returns the written paths (empty when matplotlib is not importable)."""
    plt = _plt()
    if plt is None:
        return []
    with open(json_path) as f:
        doc = json.load(f)
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    stem = os.path.splitext(os.path.basename(json_path))[0]
    written = []
    if doc.get("e2e"):
        written.append(_plot_e2e(plt, doc, os.path.join(out_dir, f"{stem}_e2e.png")))
    points = doc.get("points") or []
    if not points:
        return written
    order = {s.name: i for i, s in enumerate(all_shapes())}
    shapes = sorted({p["shape"] for p in points}, key=lambda s: (order.get(s, len(order)), s))
    dtypes = [d for d in ("fp16", "bf16") if any(p["dtype"] == d for p in points)]
    title = (f"{doc.get('device', '?')} | copy {doc.get('copy_bw_gbps', 0):.0f} GB/s | "
             f"commit {str(doc.get('commit', '?'))[:10]}")
    # Rows: (model and TP split, dtype); columns: the layer (qkv, o, gate_up, down, ...).
    prefixes = list(dict.fromkeys(s.split("/")[0] for s in shapes))
    layers = list(dict.fromkeys(s.split("/", 1)[-1] for s in shapes))
    panels = [(pre, dt) for pre in prefixes for dt in dtypes]
    for metric, fname, ylabel in (("speedup_vs_fp16", "speedup", "speedup over dense"),
                                  ("roofline_pct", "roofline", "% of copy roofline")):
        nrow, ncol = len(panels), len(layers)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol + 1.5, 2.5 * nrow), squeeze=False)
        handles = {}
        for r, (pre, dt) in enumerate(panels):
            for cidx, layer in enumerate(layers):
                ax = axes[r][cidx]
                shape = f"{pre}/{layer}"
                if shape not in shapes:
                    ax.set_visible(False)
                    continue
                for label, (ms, vs) in sorted(_series(points, shape, dt, metric).items()):
                    kernel = label.split()[0]
                    bits = None if kernel == "fp16" else int(label.split()[1][:-1])
                    if kernel in ("flute", "dequant_matmul", "fp16"):
                        color = _COLOR.get(bits if kernel != "fp16" else None)
                    else:
                        color = "tab:green" if kernel == "tinygemm" else "tab:purple"
                    (h,) = ax.plot(ms, vs, _STYLE.get(kernel, "-"), marker="o" if
                                   label.endswith("g128") or kernel == "fp16" else "x", ms=3,
                                   color=color, alpha=1.0 if kernel == "flute" else 0.7, label=label)
                    handles.setdefault(label, h)
                ax.set_xscale("log", base=2)
                if metric == "speedup_vs_fp16":
                    ax.axhline(1.0, color="grey", lw=0.8)
                ax.set_title(f"{shape} {dt}", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
                if r == nrow - 1:
                    ax.set_xlabel("M (tokens)", fontsize=8)
                if cidx == 0:
                    ax.set_ylabel(ylabel, fontsize=8)
        if handles:
            labels = sorted(handles)
            fig.legend([handles[k] for k in labels], labels, loc="center right", fontsize=7)
        fig.suptitle(f"{ylabel} vs M | {title}", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1 - 1.5 / (3.6 * ncol + 1.5), 0.97))
        path = os.path.join(out_dir, f"{stem}_{fname}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def _plot_e2e(plt, doc, path):
    rows = doc["e2e"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows)]
    batches = sorted({r["batch"] for r in rows if r.get("decode_tok_s")})
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        ys = [next((r["decode_tok_s"] for r in rows if r["variant"] == v and r["batch"] == b
                    and r.get("decode_tok_s")), 0) for b in batches]
        axes[0].bar([j + i * width for j in range(len(batches))], ys, width, label=v)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(batches))])
    axes[0].set_xticklabels([f"batch {b}" for b in batches])
    axes[0].set_ylabel("decode tokens/s")
    axes[0].legend(fontsize=7)
    pre = [(r["variant"], r["prefill_tok_s"]) for r in rows if r.get("prefill_tok_s")]
    axes[1].bar([p[0] for p in pre], [p[1] for p in pre], color="tab:gray")
    axes[1].set_ylabel(f"prefill tokens/s ({doc.get('prefill_tokens', '?')} tokens)")
    fig.suptitle(f"{doc.get('model', '')} | {doc.get('device', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# -- end to end -------------------------------------------------------------------------------------

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY_LLAMA = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def build_random_llama(shape: Dict[str, object], layers: Optional[int], device: torch.device,
                       dtype: torch.dtype = torch.float16):
    """A LlamaForCausalLM of the given shape with random weights, built on ``device`` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(shape)
    if layers:
        kw["num_hidden_layers"] = layers
    config = LlamaConfig(**kw)
    config.eos_token_id = None
    config.bos_token_id = None
    config.pad_token_id = 0
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model.eval().requires_grad_(False)
    with torch.no_grad():  # explicit random init: never time uninitialized memory
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def random_quant_linear(linear: torch.nn.Module, bits: int, group_size: int, seed: int = 0):
    """A QuantLinear of the shape of ``linear`` (an nn.Linear or a QuantLinear) with random codes
    and scales (speed only, not quality); scales are chosen so the reconstructed weights have a std
    near 0.02, like HF's init."""
    from .codebooks import get_table
    from .layout import kernel_layout_shape
    from .linear import QuantLinear
    ref = linear.weight if isinstance(linear, torch.nn.Linear) else linear.scales
    dev, dtype = ref.device, ref.dtype
    k, n = linear.in_features, linear.out_features
    q = QuantLinear(k, n, bits, group_size, bias=linear.bias is not None, dtype=dtype, device=dev,
                    codebook="nf")
    g = _gen(dev, seed)
    (words,) = kernel_layout_shape(bits, k, n)
    q.qweight = torch.randint(-2 ** 31, 2 ** 31, (words,), dtype=torch.int32, device=dev, generator=g)
    q.qcodes = q.qcodes.new_empty(0)
    table = get_table("nf", bits).to(dev)
    std = float(table.float().pow(2).mean().sqrt()) or 1.0
    q.scales.copy_((torch.rand(q.scales.shape, device=dev, generator=g) + 0.5) * (0.02 / std))
    q.table.copy_(table)
    if linear.bias is not None:
        q.bias.data.copy_(linear.bias.data)
    return q


def swap_linears(model, make) -> int:
    """Replace every ``nn.Linear`` of the decoder layers (not lm_head) by ``make(name, linear)``."""
    from .linear import QuantLinear
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, QuantLinear)) and ".layers." in f".{n}"]
    for i, (name, mod) in enumerate(targets):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, make(i, mod))
    return len(targets)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_generate(model, input_ids, new_tokens, device, compile_on: bool):
    from transformers import GenerationConfig
    gc = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static", pad_token_id=0, eos_token_id=None,
                          disable_compile=not compile_on)
    mask = torch.ones_like(input_ids)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gc)
    _sync(device)
    dt = time.perf_counter() - t0
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - input_ids.shape[1]} new tokens, "
                           f"asked for {new_tokens}")
    return dt


def e2e_measure(model, device, batches, prompt_len, new_tokens, prefill_tokens, repeats,
                compile_on, log=print):
    """Decode tokens/s per batch (time of N new tokens minus time of 1, so prefill cancels) and
    prefill tokens/s at ``prefill_tokens`` (batch 1, time to the first token)."""
    res = []
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    for b in batches:
        # generate sizes its static cache by the longest earlier call: reset so that every variant
        # and batch attends over the same prompt_len + new_tokens positions.
        model._previous_max_cache_length = -1
        ids = torch.randint(1, vocab, (b, prompt_len), generator=g).to(device)
        for _ in range(2):  # compile / capture / warm up both lengths
            _timed_generate(model, ids, new_tokens, device, compile_on)
            _timed_generate(model, ids, 1, device, compile_on)
        t_n = statistics.median(_timed_generate(model, ids, new_tokens, device, compile_on)
                                for _ in range(repeats))
        t_1 = statistics.median(_timed_generate(model, ids, 1, device, compile_on)
                                for _ in range(repeats))
        r = {"batch": b, "prompt_len": prompt_len, "new_tokens": new_tokens,
             "generate_s": t_n, "first_token_s": t_1}
        if t_n > t_1 and new_tokens > 1:
            step = (t_n - t_1) / (new_tokens - 1)
            r.update(decode_ms_per_step=step * 1e3, decode_tok_s=b / step)
            log(f"  batch {b:3d}: {r['decode_tok_s']:10.1f} decode tok/s "
                f"({r['decode_ms_per_step']:.2f} ms/step)")
        else:
            r.update(decode_ms_per_step=None, decode_tok_s=None,
                     note="t(N tokens) <= t(1 token): timing noise swamps decode; raise --e2e-new-tokens")
            log(f"  batch {b:3d}: decode not measurable (t(N)={t_n:.4f}s <= t(1)={t_1:.4f}s)")
        res.append(r)
    if prefill_tokens:
        model._previous_max_cache_length = -1
        ids = torch.randint(1, vocab, (1, prefill_tokens), generator=g).to(device)
        for _ in range(2):
            _timed_generate(model, ids, 1, device, compile_on)
        t = statistics.median(_timed_generate(model, ids, 1, device, compile_on) for _ in range(repeats))
        res.append({"batch": 1, "prefill_tokens": prefill_tokens, "prefill_s": t,
                    "prefill_tok_s": prefill_tokens / t})
        log(f"  prefill {prefill_tokens}: {prefill_tokens / t:10.1f} tok/s")
    return res


def run_e2e(args, env, log=print) -> Dict[str, object]:
    dev = torch.device(args.device)
    cpu = dev.type == "cpu"
    shape = TINY_LLAMA if cpu else LLAMA3_8B
    layers = args.e2e_layers or (None if not cpu else 2)
    batches = args.e2e_batch or ([1, 2] if cpu else [1, 8, 32])
    prompt = args.e2e_prompt or (8 if cpu else 128)
    new = args.e2e_new_tokens or (16 if cpu else 128)
    prefill = args.e2e_prefill if args.e2e_prefill is not None else (32 if cpu else 2048)
    repeats = args.e2e_repeats or (1 if cpu else 3)
    variants = args.e2e_bits or ["fp16", "4", "3", "2"]
    compile_on = not cpu and not args.e2e_no_compile
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    doc = dict(env, kind="e2e", model=("tiny-llama (CPU smoke)" if cpu else "llama3-8b-shaped") +
               ", random weights", layers=layers or shape["num_hidden_layers"],
               group_size=args.e2e_group, prefill_tokens=prefill, compiled=compile_on,
               method=("HF generate, cache_implementation='static'; decode steps run through "
                       "transformers' automatic torch.compile (mode reduce-overhead: CUDA graphs); "
                       "prefill runs eagerly inside generate. decode tok/s = batch * (N-1) / "
                       "(t(N new tokens) - t(1 new token)); prefill tok/s = tokens / t(1 new token)"
                       if compile_on else "HF generate, static cache, no compile"),
               points=[], e2e=[], skipped=[])
    torch.manual_seed(0)
    log(f"e2e: building a random {doc['model']} on {dev} ({doc['layers']} layers)")
    model = build_random_llama(shape, layers, dev, torch.float16)
    for v in variants:
        if deadline and time.monotonic() > deadline:
            doc["truncated"] = True
            log("time budget spent: stopping the end-to-end run (results are partial)")
            break
        label = "fp16" if v == "fp16" else f"flute-{v}bit-g{args.e2e_group}"
        if v != "fp16":
            bits = int(v)
            swap_linears(model, lambda i, m, bits=bits: random_quant_linear(m, bits, args.e2e_group, i))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for attr in ("_compiled_call", "_last_compile_config"):
            if hasattr(model, attr):
                delattr(model, attr)
        if compile_on:
            torch._dynamo.reset()
        wbytes = sum(t.numel() * t.element_size() for n, t in
                     list(model.named_parameters()) + list(model.named_buffers()) if ".layers." in f".{n}")
        log(f"{label}: decoder weights {wbytes / 2 ** 30:.2f} GiB")
        try:
            rows = e2e_measure(model, dev, batches, prompt, new, prefill, repeats, compile_on, log)
        except Exception as e:  # noqa: BLE001
            doc["skipped"].append({"variant": label, "reason": f"{type(e).__name__}: {str(e)[:400]}"})
            log(f"  {label} FAILED: {type(e).__name__}: {str(e)[:200]}")
            continue
        for r in rows:
            r.update(variant=label, bits=None if v == "fp16" else int(v), decoder_weight_bytes=wbytes)
            doc["e2e"].append(r)
    fp = {(r["batch"], "prefill_tok_s" in r): r for r in doc["e2e"] if r["variant"] == "fp16"}
    for r in doc["e2e"]:
        key = "prefill_tok_s" if "prefill_tok_s" in r else "decode_tok_s"
        base = fp.get((r["batch"], key == "prefill_tok_s"))
        r["speedup_vs_fp16"] = r[key] / base[key] if base and base.get(key) and r.get(key) else None
    if not cpu:
        doc["targets"] = evaluate_targets([], doc["e2e"])[-2:]
    return doc


# -- command line -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flute bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="two large shapes, M 1 and 16, 4b g128 and "
                      "3b g64, fp16+bf16, all baselines (the device check's run)")
    mode.add_argument("--full", action="store_true", help="the whole grid of the issue (default on CUDA)")
    mode.add_argument("--e2e", action="store_true", help="end-to-end HF generate benchmark")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu "
                   "with the small CPU smoke grid)")
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
    p.add_argument("--threads", type=int, default=None, help="CPU mode: torch threads (default 1)")
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
        mode, shapes, Ms, configs = "cpu", list(CPU_SHAPES), list(CPU_M), list(CPU_CONFIGS)
        target, min_runs, minutes = 30.0, 5, 1.0
    else:
        mode, shapes, Ms = "full", None, list(M_FULL)
        configs = [(b, g) for b in BITS_FULL for g in GROUPS_FULL]
        target, min_runs, minutes = 20.0, 10, 8.5
    if cpu:  # the CPU path is the slow reference: never the large shapes unless asked for
        if mode == "quick":
            mode, shapes, target, min_runs, minutes = "cpu-quick", list(CPU_SHAPES), 30.0, 5, 1.0
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


def main(argv: Optional[Sequence[str]] = None) -> int:
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
        log("CPU mode: host-clock timing of the CPU reference path on small shapes; these numbers "
            "are a smoke test, not GPU results")

    if args.e2e:
        if args.max_minutes is None:
            args.max_minutes = 9.0 if dev.type == "cuda" else 1.0
        doc = run_e2e(args, env, log)
        doc.update(measure_copy_bandwidth(dev))
        path = result_path(out_dir, "e2e" if dev.type == "cuda" else "e2e-cpu", str(env["device"]))
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
        if doc.get("targets"):
            log(targets_table(doc["targets"]))
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

    def save():
        tf = doc.get("matmul_tflops")
        if isinstance(tf, dict):
            for p in sweep.points:
                if isinstance(tf.get(p["dtype"]), float):
                    p["compute_pct"] = 100.0 * p["tflops"] / tf[p["dtype"]]
        doc.update(points=sweep.points, skipped=sweep.skipped, truncated=sweep.truncated,
                   targets=evaluate_targets(sweep.points))
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
        log("targets of the issue (set for an H100; large = N*K >= 50M):\n"
            + targets_table(doc["targets"]))
    problems = validate_result(doc)
    if problems:
        log("result does not match the schema: " + "; ".join(problems[:5]))
    log(f"wrote {path} ({len(sweep.points)} points in {doc['elapsed_s']:.1f} s"
        f"{', TRUNCATED' if sweep.truncated else ''})")
    _finish_plots(path, args, log)
    bad = [p for p in sweep.points if p["kernel"] == "flute" and p.get("rel_err") is not None
           and not p["rel_err"] < 2e-2]
    if bad:
        log(f"ERROR: {len(bad)} flute points failed the correctness check")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
