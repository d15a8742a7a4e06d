"""The run's environment: host, CPU model and ISA flags, caches, device, library versions, the
git commit (and whether the tree was dirty) and the command line."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch

SCHEMA_VERSION = 1
#: ISA flags worth recording for CPU kernels (from /proc/cpuinfo).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vbmi", "avx512_vbmi2", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16", "gfni", "neon", "asimd", "sve")


def run_quiet(cmd: Sequence[str], cwd: Optional[str] = None) -> Optional[str]:
    """stdout of a command, or None when it fails or is missing."""
    try:
        r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def repo_root() -> str:
    """The directory holding the ``flute`` package (the repository root in a checkout)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit(explicit: Optional[str] = None) -> Dict[str, object]:
    """``{"commit", "dirty"}``: ``explicit`` (or ``$FLUTE_BENCH_COMMIT``) wins, else ``git rev-parse
    HEAD`` in the repository (read-only git commands only). The device machine gets a copy of the
    working tree without ``.git``: there the caller must pass the commit."""
    given = explicit or os.environ.get("FLUTE_BENCH_COMMIT")
    if given:
        return {"commit": given, "dirty": None, "commit_source": "given"}
    root = repo_root()
    head = run_quiet(["git", "rev-parse", "HEAD"], cwd=root)
    if not head:
        return {"commit": "unknown (no git repository; pass --commit)", "dirty": None,
                "commit_source": "none"}
    status = run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return {"commit": head, "dirty": bool(status), "commit_source": "git"}


def driver_version() -> str:
    out = run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        import pynvml  # type: ignore
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - any failure means "not known"
        return "unavailable"


def _cpuinfo() -> Dict[str, str]:
    out: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                k, _, v = line.partition(":")
                out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def _cache_bytes(level: int) -> int:
    """Size of the largest cache of ``level`` from sysfs (0 when unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        names = [d for d in os.listdir(base) if d.startswith("index")]
    except OSError:
        return 0
    for d in names:
        try:
            with open(os.path.join(base, d, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_info() -> Dict[str, object]:
    """CPU model, core count, ISA flags of interest, L2/L3 sizes, available memory, the
    transparent huge page mode (flute's CPU layouts ask for huge pages: :mod:`flute.huge_pages`)."""
    from ..huge_pages import thp_setting
    info = _cpuinfo()
    flags: List[str] = (info.get("flags") or info.get("Features") or "").split()
    return {"cpu_model": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "isa_flags": [f for f in ISA_FLAGS if f in flags],
            "l2_bytes_per_core": _cache_bytes(2), "l3_bytes": _cache_bytes(3),
            "mem_available_bytes": mem_available_bytes(), "transparent_hugepage": thp_setting()}


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
            from .roofline import ASSUMED_L2_BYTES
            info.update(l2_bytes=ASSUMED_L2_BYTES, l2_bytes_assumed=True)
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads)",
                    driver="none", l2_bytes=0)
    return info
