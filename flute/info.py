"""``flute info``: which of flute's kernels this machine runs, and why not the fast ones where it
does not.

What a bug report or a slow run needs first: the versions, the CPU and the ISA flags the kernels
use, the CPU kernel's state (built or why not, the path chosen, its int8 / VNNI / AMX forms, the
optional units the compiler built), the CUDA extension and the GPUs, and one hint per fallback
found (a missing build, a forced slow path, a unit the compiler left out, huge pages off).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from typing import Dict, List, Optional

import torch

from . import ops

# Optional CPU units (setup.py's OPTIONAL_KERNELS) and the /proc/cpuinfo flags of the CPUs that run
# them: where the CPU has the flags and the build lacks the unit, those CPUs run a slower kernel.
UNIT_FLAGS = {
    "kernel_amx.cpp": ("amx_bf16",),
    "kernel_avx512bf16.cpp": ("avx512_bf16", "avx512vbmi"),
    "kernel_int8_avx512.cpp": ("avx512vbmi", "avx512_vnni"),
    "kernel_int8_rows16_avx512.cpp": ("avx512vbmi", "avx512_vnni"),
    "kernel_int8_avxvnni.cpp": ("avx_vnni",),
    "kernel_int8_avx512vnni_ymm.cpp": ("avx512_vnni", "avx512vl"),
}
#: The CUDA kernel's oldest target (setup.py builds sm_80 and newer).
MIN_CUDA_CAPABILITY = (8, 0)


def _version(dist: str) -> Optional[str]:
    """An installed distribution's version without importing it (None when not installed)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_kernel() -> Dict[str, object]:
    state: Dict[str, object] = {"built": ops.HAS_CPU_KERNEL, "error": ops.CPU_KERNEL_ERROR,
                                "isa": ops.get_cpu_isa(), "mode": ops.get_cpu_mode(),
                                "threads": torch.get_num_threads()}
    if ops.HAS_CPU_KERNEL:
        state.update(vnni=ops.get_cpu_vnni(), vnni_forms=ops.get_cpu_vnni_forms(), amx=ops.get_cpu_amx(),
                     bf16_kernel=bool(torch.ops.flute.cpu_has_bf16()),
                     units=list(torch.ops.flute.cpu_units()),
                     tile_pairs=bool(torch.ops.flute.cpu_tile_pairs()),
                     # per bit width: activation rows from which the 16-row kernel runs (0: none on
                     # this path) and from which the panel path (decode + matmul) does (0: never)
                     rows16_m={str(b): int(torch.ops.flute.cpu_rows16_m(b)) for b in (2, 3, 4)},
                     panel_m={str(b): int(torch.ops.flute.cpu_panel_m(b)) for b in (2, 3, 4)})
    return state


def _cuda() -> Dict[str, object]:
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append({"name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    return {"torch_cuda": torch.version.cuda, "kernel_built": ops.HAS_CUDA_KERNEL,
            "error": ops.CUDA_KERNEL_ERROR, "devices": devices}


def hints(report: Dict[str, object]) -> List[str]:
    """One line per slow fallback in ``report`` (see :func:`collect`), with what to do about it."""
    out: List[str] = []
    cpu, kernel, cuda = report["cpu"], report["cpu_kernel"], report["cuda"]
    flags = set(cpu["isa_flags"])
    if not kernel["built"]:
        out.append(f"CPU: flute._cpu is not available ({kernel['error']}); CPU calls run the slow "
                   f"reference. Rebuild: pip install --no-build-isolation -e . (needs a C++17 compiler)")
        return out + _cuda_hints(cuda)
    forced = os.environ.get("FLUTE_CPU_ISA", "").strip()
    if kernel["isa"] == "portable" and "avx2" in flags:
        out.append("CPU: the portable kernels run although this CPU has AVX2"
                   + (f" (FLUTE_CPU_ISA={forced})" if forced else "") + "; flute.set_cpu_isa('auto') picks the best")
    elif kernel["isa"] == "avx2" and "avx512bw" in flags and forced:
        out.append(f"CPU: FLUTE_CPU_ISA={forced} holds this AVX-512 CPU to the AVX2 kernels")
    if kernel["mode"] != "int8":
        out.append(f"CPU: mode {kernel['mode']!r}: decoding runs exact float32 products, slower than the "
                   f"default int8 mode (flute.set_cpu_mode('int8'))")
    missing = [u for u, need in UNIT_FLAGS.items()
               if all(f in flags for f in need) and u not in kernel["units"]]
    if missing:
        out.append(f"CPU: this CPU could run {', '.join(missing)} but the build left them out (the "
                   f"compiler lacked their instructions: GCC 11+ or Clang 12+ builds them all); "
                   f"slower kernels run instead")
    if ("amx_bf16" in flags and "kernel_amx.cpp" in kernel["units"] and not kernel["amx"]
            and os.environ.get("FLUTE_CPU_AMX", "").strip() != "0"):
        out.append("CPU: the CPU has AMX but Linux did not grant its tile state (kernel 5.16+): "
                   "bf16 batches run the AVX-512 kernels")
    vnni_env = os.environ.get("FLUTE_CPU_VNNI", "").strip().lower()
    forms = kernel.get("vnni_forms") or []
    if (kernel["isa"] == "avx2" and kernel["vnni"] in ("", "avx512bw_ymm")
            and ({"avx_vnni", "avx512_vnni"} & flags) and vnni_env not in ("0", "false", "off", "no")):
        out.append("CPU: the AVX2 int8 kernel runs its int16 form although this CPU has VNNI "
                   "(flute.set_cpu_vnni(True))")
    elif kernel["isa"] == "avx2" and kernel["vnni"] == "" and "avx512bw_ymm" in forms:
        out.append("CPU: the AVX2 int8 kernel runs its int16 step VEX encoded (16 vector registers) where "
                   "the EVEX build (32) took 0.81-0.99 of its time (flute.set_cpu_vnni(False))")
    elif (kernel["isa"] == "avx2" and kernel["vnni"] == "avxvnni" and "avx512vnni_ymm" in forms
            and vnni_env != "avxvnni"):
        out.append("CPU: the AVX2 int8 kernel runs its AVX-VNNI form (16 vector registers) where the "
                   "AVX512-VNNI one (32) took 0.78-0.98 of its time (flute.set_cpu_vnni(True))")
    if cpu.get("transparent_hugepage") == "never":
        # flute.huge_pages asks for huge pages (madvise) for layouts of >= 64 KiB; cache-cold calls
        # took 0.93-0.97 of the time with them (CPU_NOTES item 68)
        out.append("CPU: transparent huge pages are off ('never'): streamed weights take 3-7% longer; "
                   "echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled")
    return out + _cuda_hints(cuda)


def _cuda_hints(cuda: Dict[str, object]) -> List[str]:
    out = []
    if cuda["devices"] and not cuda["kernel_built"]:
        out.append(f"GPU: flute._C is not available ({cuda['error']}); CUDA tensors run the slow "
                   f"reference. Build on a machine with nvcc: FLUTE_BUILD_CUDA=1 pip install "
                   f"--no-build-isolation -e .")
    for d in cuda["devices"]:
        major, minor = (int(v) for v in d["capability"].split("."))
        if (major, minor) < MIN_CUDA_CAPABILITY:
            out.append(f"GPU: {d['name']} (sm_{major}{minor}) is older than the CUDA kernel's "
                       f"sm_80 target: it runs the reference")
    return out


def collect() -> Dict[str, object]:
    """The report as a dict (``flute info --json`` prints it): versions, ``cpu`` (model, ISA flags,
    caches: :func:`flute.bench.env.cpu_info`), ``cpu_kernel``, ``cuda``, and ``hints``."""
    import flute
    from .bench.env import cpu_info
    report: Dict[str, object] = {
        "flute": flute.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(),
        "transformers": _version("transformers"), "vllm": _version("vllm"),
        "cpu": cpu_info(), "cpu_kernel": _cpu_kernel(), "cuda": _cuda(),
    }
    report["hints"] = hints(report)
    return report


def format_report(report: Dict[str, object]) -> str:
    """The report as the plain text ``flute info`` prints."""
    cpu, kernel, cuda = report["cpu"], report["cpu_kernel"], report["cuda"]
    lines = [f"flute {report['flute']}, torch {report['torch']}, Python {report['python']} ({report['platform']})",
             f"transformers {report['transformers'] or 'not installed'}, vllm {report['vllm'] or 'not installed'}",
             f"CPU: {cpu['cpu_model']}, {cpu['cpu_count']} logical CPUs, L2 {cpu['l2_bytes_per_core'] >> 10} KB "
             f"per core, L3 {cpu['l3_bytes'] >> 20} MB; flags: {' '.join(cpu['isa_flags']) or 'none of interest'}"]
    if kernel["built"]:
        forms = [f"path {kernel['isa']}", f"mode {kernel['mode']}", f"{kernel['threads']} threads",
                 f"AVX2 int8 kernel's form {kernel['vnni'] or 'int16 (VEX)'}"
                 + (f" (of {', '.join(kernel['vnni_forms'])})" if kernel.get("vnni_forms") else ""), f"AMX {'on' if kernel['amx'] else 'off'}",
                 f"bf16 kernel {'yes' if kernel['bf16_kernel'] else 'no'}"]
        lines.append("CPU kernel: " + ", ".join(forms))
        lines.append("  optional units built: " + (", ".join(kernel["units"]) or "none"))
        if "rows16_m" in kernel:
            r16, panel = kernel["rows16_m"], kernel["panel_m"]
            lines.append("  batches (2 / 3 / 4 bits): 16-row kernel from "
                         + " / ".join(str(r16[b]) if r16[b] else "-" for b in ("2", "3", "4"))
                         + " rows, panel path (decode + matmul) from "
                         + " / ".join(str(panel[b]) if panel[b] else "never" for b in ("2", "3", "4"))
                         + f" rows; tile pairs "
                         f"{'on' if kernel['tile_pairs'] else 'off'}")
    else:
        lines.append(f"CPU kernel: not available ({kernel['error']})")
    gpus = ", ".join(f"{d['name']} (sm_{d['capability'].replace('.', '')})" for d in cuda["devices"]) or "none"
    built = "built" if cuda["kernel_built"] else f"not available ({cuda['error']})"
    lines.append(f"CUDA: torch built with CUDA {cuda['torch_cuda'] or 'no'}; GPUs: {gpus}; flute._C {built}")
    lines += [f"hint: {h}" for h in report["hints"]] or ["no fallbacks found"]
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    """``flute info`` (``--json``: the dict of :func:`collect`)."""
    report = collect()
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0
