"""Result files: where they go, writing them atomically, checking them against the schema, a short
text table, and the acceptance targets (kept outside the library, in ``benchmarks/targets.py``).

GPU sweep schema: ``{"device", "torch", "cuda", "driver", "commit", "copy_bw_gbps",
"points": [{"kernel", "bits", "group_size", "dtype", "M", "N", "K", "median_us", "gbps",
"roofline_pct", "speedup_vs_fp16", ...}], ...}``. The CPU benchmark's schema is in
:mod:`flute.bench.cpu`.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
from typing import Dict, List, Optional, Tuple

from .env import repo_root
from .sweep import KERNELS


def slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s.lower()).strip("-")[:40] or "device"


def result_path(out_dir: str, mode: str, device_name: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    dev = slug(device_name.replace("NVIDIA", "").split("(")[0])
    return os.path.join(out_dir, f"{mode}_{dev}_{stamp}.json")


def write_json(path: str, doc: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)


def validate_result(doc: Dict[str, object]) -> List[str]:
    """Problems with a GPU-sweep result document against the schema (empty when it conforms)."""
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
    """A short text table of GPU-sweep points (the device reply carries only the end of the output)."""
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


# -- acceptance targets (thresholds live in benchmarks/targets.py) --------------------------------

def default_targets_path() -> str:
    return os.environ.get("FLUTE_BENCH_TARGETS") or os.path.join(repo_root(), "benchmarks",
                                                                 "targets.py")


def load_targets(path: Optional[str] = None) -> Tuple[object, Optional[str]]:
    """``(module, None)`` for the targets file (``benchmarks/targets.py`` of the checkout, or
    ``$FLUTE_BENCH_TARGETS``), or ``(None, reason)`` when there is none (an installed package)."""
    path = path or default_targets_path()
    if not os.path.isfile(path):
        return None, f"no targets file at {path}"
    try:
        spec = importlib.util.spec_from_file_location("flute_bench_targets", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - a broken targets file must not lose the results
        return None, f"could not load {path}: {type(e).__name__}: {e}"
    return mod, None


def attach_targets(doc: Dict[str, object], path: Optional[str] = None) -> Optional[str]:
    """Evaluate the targets on ``doc`` (``doc["targets"]``) and return their text table, or
    record why not (``doc["targets_note"]``) and return None."""
    mod, why = load_targets(path)
    if mod is None:
        doc["targets"], doc["targets_note"] = [], f"skipped: {why}"
        return None
    doc["targets"] = mod.evaluate(doc)
    doc["targets_note"] = f"thresholds from {os.path.relpath(path or default_targets_path(), repo_root())}"
    return mod.table(doc["targets"])
