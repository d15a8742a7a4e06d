"""The bandwidth floor: bytes each kernel must move, the measured bandwidth that is the ceiling,
and how many weight copies to rotate through so that every timed call reads from memory.

GPU: the ceiling is a device-to-device copy (bytes read + written over its median time).
CPU: the ceiling is a read-only sweep over a buffer much larger than the last-level cache, with 1
and 2 threads, by ``torch.Tensor.sum`` over float32 and by a small C reader (``native/read_bw.c``,
when a C compiler is present) reading each thread's slice as 1 to 4 sequential runs at once, with
and without a software prefetch 2 KB ahead in each run; the fastest is the roofline. One run per
thread is not enough: one Zen 3 core read 1.4-1.7x more from three runs than from one, and torch's
fp32 matrix-vector product, which reads several rows at once, beat the one-run figure by up to 20%
(benchmarks/CPU_NOTES.md item 128). Nor is a reader without the prefetch that flute's kernels
issue: on an Intel AMX VM it read 5-8% less at 1 thread and 2-4% less at 2 (item 164).
"""
from __future__ import annotations

import json
import math
import subprocess
from typing import Dict, Optional, Sequence

import torch

from .timing import time_cpu, time_cuda

#: L2 size assumed when the device does not report one (larger than any current GPU's L2).
ASSUMED_L2_BYTES = 128 << 20
#: Rotated weight copies must together hold at least this many L2 caches (GPU).
L2_FACTOR = 3
MAX_COPIES = 4096
#: Size of the buffer copied for the GPU copy-bandwidth roofline (its bytes are counted twice).
COPY_BYTES_CUDA = 1 << 30
COPY_BYTES_CPU = 64 << 20
#: CPU: rotated copies hold at least ``L3_FACTOR`` last-level caches and at least this many bytes.
L3_FACTOR = 2
MIN_ROTATION_BYTES_CPU = 256 << 20
#: CPU read-bandwidth buffer: at least this large, and at least 8 last-level caches.
READ_BW_BYTES = 1 << 30

#: Dense kernels: bytes per weight element.
DENSE_BYTES = {"fp16": None, "fp32": 4, "bf16": 2}


def weight_bytes(kernel: str, N: int, K: int, bits: Optional[int] = None,
                 group_size: Optional[int] = None, dtype_bytes: int = 2) -> int:
    """Bytes of the weight operand a kernel must read once: codes + group scales (+ table / zeros).

    ``flute`` and ``dequant_matmul`` (same weights): ``N*K*bits/8`` code bytes, one
    ``dtype_bytes`` scale per group, the ``2**bits`` float32 table. ``fp16`` (dense, in the
    point's dtype): ``N*K*dtype_bytes``; ``fp32`` / ``bf16``: 4 / 2 bytes per weight.
    ``tinygemm`` and ``torch_int4``: 4-bit codes and a (scale, zero) 16-bit pair per group.
    ``marlin``: 4-bit codes and one 16-bit scale per group.
    """
    if kernel in DENSE_BYTES:
        return N * K * (DENSE_BYTES[kernel] or dtype_bytes)
    groups = N * math.ceil(K / (K if group_size in (None, -1) else group_size))
    if kernel in ("flute", "dequant_matmul"):
        return math.ceil(N * K * bits / 8) + groups * dtype_bytes + (2 ** bits) * 4
    if kernel in ("tinygemm", "torch_int4"):
        return N * K // 2 + groups * 2 * 2
    if kernel == "marlin":
        return N * K // 2 + groups * dtype_bytes
    raise ValueError(f"unknown kernel {kernel!r}")


def point_bytes(kernel: str, M: int, N: int, K: int, bits: Optional[int] = None,
                group_size: Optional[int] = None, dtype_bytes: int = 2) -> int:
    """The fewest bytes one call must move through memory: the weight read once, the
    activations ``[M, K]`` read once, the output ``[M, N]`` written once. (``dequant_matmul``
    really moves more -- it writes and re-reads a 16-bit weight -- but it computes the same
    function, so it is charged the same minimum: its GB/s is an effective rate.)"""
    return weight_bytes(kernel, N, K, bits, group_size, dtype_bytes) + (M * K + M * N) * dtype_bytes


def achieved_gbps(nbytes: int, median_us: float) -> float:
    return nbytes / (median_us * 1e-6) / 1e9


def roofline_pct(gbps: float, bw_gbps: float) -> float:
    return 100.0 * gbps / bw_gbps


def ideal_us(nbytes: int, bw_gbps: float) -> float:
    """Time to move ``nbytes`` at the measured bandwidth (the bandwidth floor)."""
    return nbytes / (bw_gbps * 1e9) * 1e6


def rotation_copies(bytes_per_copy: int, cache_bytes: int, factor: int = L2_FACTOR,
                    max_copies: int = MAX_COPIES, min_bytes: int = 0) -> int:
    """How many copies of a weight to rotate through so that consecutive calls read from memory:
    the copies together hold at least ``factor`` times the cache and ``min_bytes`` (at least 2
    copies; 1 when there is no cache to defeat)."""
    if cache_bytes <= 0 and min_bytes <= 0:
        return 1
    need = math.ceil(max(factor * cache_bytes, min_bytes) / max(1, bytes_per_copy))
    return int(min(max_copies, max(2, need)))


def cpu_rotation_copies(bytes_per_copy: int, l3_bytes: int, free_bytes: Optional[int] = None,
                        min_bytes: int = MIN_ROTATION_BYTES_CPU) -> int:
    """CPU rotation: ``L3_FACTOR`` x L3 and at least ``min_bytes`` in all, capped so the copies
    take at most a quarter of ``free_bytes`` (memory permitting; at least 2)."""
    n = rotation_copies(bytes_per_copy, l3_bytes, L3_FACTOR, MAX_COPIES, min_bytes)
    if free_bytes:
        n = min(n, max(2, (free_bytes // 4) // max(1, bytes_per_copy)))
    return n


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, runs: int = 20) -> Dict:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written over the median time).

    On CUDA a buffer of at least 1 GiB is copied into a second one; on the CPU 64 MiB (a rough
    number for the smoke run; the CPU benchmark measures read bandwidth instead)."""
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


def torch_read_gbps(nbytes: int, threads: int, runs: int = 7) -> float:
    """Read bandwidth of ``torch.Tensor.sum`` over a float32 buffer of ``nbytes`` (median)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(nbytes // 4, dtype=torch.float32)
        t = time_cpu([buf.sum], target_ms=0.0, min_runs=runs, max_runs=runs, warmup=1)
        return buf.numel() * 4 / (t.median_us * 1e-6) / 1e9
    finally:
        torch.set_num_threads(prev)


def c_read_gbps(exe: str, nbytes: int, threads: int, runs: int = 7, streams: int = 1,
                prefetch: int = 0) -> float:
    """Read bandwidth of the C reader (``native/read_bw.c``) over ``nbytes`` (median), each thread
    reading its slice as ``streams`` sequential runs in turn, with a software prefetch ``prefetch``
    bytes ahead in each run (0: none)."""
    r = subprocess.run([exe, str(nbytes >> 20), str(threads), str(runs), str(streams), str(prefetch)],
                       capture_output=True, text=True, timeout=600, check=True)
    return float(json.loads(r.stdout.strip().splitlines()[-1])["median_gbps"])


#: Sequential runs per thread tried by the C reader (see the module docstring).
READER_STREAMS = (1, 2, 3, 4)
#: Software prefetch distances (bytes ahead in each run) tried by the C reader; 0 is none.
READER_PREFETCH = (0, 2048)


def reader_method(streams: int, prefetch: int = 0) -> str:
    """The name of the C reader's figure at ``streams`` runs per thread and a prefetch ``prefetch``
    bytes ahead in ``read_bw_all``."""
    name = "c_xor_reader" if streams == 1 else f"c_xor_reader_{streams}streams"
    return name + (f"_prefetch{prefetch}" if prefetch else "")


def measure_read_bandwidth(threads: Sequence[int], l3_bytes: int, log=print,
                           nbytes: Optional[int] = None, runs: int = 7) -> Dict[str, object]:
    """The CPU roofline: read-only sweeps over a buffer of ``max(1 GiB, 8 x L3)`` bytes at each
    thread count, by ``torch.sum`` (float32) and by the C reader when it builds (1 to 4 runs per
    thread, :data:`READER_STREAMS`, each with and without a prefetch, :data:`READER_PREFETCH`);
    per thread count the fastest method is the roofline
    (``read_bw_gbps``: ``{threads: GB/s}``; every figure in ``read_bw_all``)."""
    from .toolchain import build_read_bw
    nbytes = nbytes or max(READ_BW_BYTES, 8 * l3_bytes)
    exe, why = build_read_bw()
    per: Dict[str, Dict[str, float]] = {}
    best: Dict[str, float] = {}
    method: Dict[str, str] = {}
    for t in threads:
        row = {"torch_sum_fp32": torch_read_gbps(nbytes, t, runs)}
        for s, pf in [(s, pf) for pf in READER_PREFETCH for s in READER_STREAMS] if exe else ():
            try:
                row[reader_method(s, pf)] = c_read_gbps(exe, nbytes, t, runs, s, pf)
            except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
                why = f"C reader failed: {type(e).__name__}: {str(e)[:200]}"
                break
        per[str(t)] = row
        method[str(t)], best[str(t)] = max(row.items(), key=lambda kv: kv[1])
        log(f"read bandwidth, {t} thread(s): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in row.items()))
    return {"read_bw_gbps": best, "read_bw_method": method, "read_bw_all": per,
            "read_bw_bytes": nbytes, "read_bw_runs": runs,
            "read_bw_note": why or ("roofline = the fastest of torch.sum (float32) and the C reader "
                                    "at 1-4 sequential runs per thread, with and without a 2 KB "
                                    "software prefetch")}
