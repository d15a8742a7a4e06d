"""Small native helpers of the CPU benchmark, compiled once into a cache directory.

Sources live beside this module (``native/``): ``read_bw.c`` (the read-bandwidth sweep) and
``ggml_matmul.cpp`` (the llama.cpp peer driver, built by :mod:`flute.bench.peers`). Binaries go to
``$FLUTE_CACHE`` or ``~/.cache/flute``, named by a hash of their source and flags, so an edited
source is rebuilt and an unchanged one never is.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from typing import List, Optional, Sequence, Tuple

SRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")


def cache_dir(*parts: str) -> str:
    root = os.environ.get("FLUTE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flute")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def source(name: str) -> str:
    return os.path.join(SRC_DIR, name)


def _digest(paths: Sequence[str], flags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:10]


def compile_exe(sources: Sequence[str], out_dir: str, name: str, compiler: str,
                flags: Sequence[str], deps: Sequence[str] = (), timeout: int = 600
                ) -> Tuple[Optional[str], Optional[str]]:
    """``(path, None)`` of an executable built from ``sources`` (reused when already built), or
    ``(None, reason)``. ``deps`` are extra inputs (libraries) whose change forces a rebuild."""
    cc = shutil.which(compiler)
    if cc is None:
        return None, f"no {compiler} on PATH"
    try:
        tag = _digest(list(sources) + [d for d in deps if os.path.isfile(d)], flags)
    except OSError as e:
        return None, f"cannot read the sources: {e}"
    exe = os.path.join(out_dir, f"{name}-{tag}")
    if os.path.isfile(exe) and os.access(exe, os.X_OK):
        return exe, None
    cmd: List[str] = [cc, *sources, "-o", exe + ".tmp", *flags]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{compiler} failed to run: {e}"
    if r.returncode != 0:
        return None, f"{compiler} failed: {(r.stderr or r.stdout).strip()[-600:]}"
    os.replace(exe + ".tmp", exe)
    return exe, None


def build_read_bw() -> Tuple[Optional[str], Optional[str]]:
    """The read-bandwidth sweep (``native/read_bw.c``) built with ``cc -O3 -march=native -fopenmp``."""
    return compile_exe([source("read_bw.c")], cache_dir("native"), "read_bw", "cc",
                       ["-O3", "-march=native", "-fopenmp"])
