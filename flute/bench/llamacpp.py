"""llama.cpp's CPU kernels as a peer: built once from the llama.cpp tree that the
``llama-cpp-python`` source distribution carries (PyPI; no other network access needed).

:func:`build` (also ``python -m flute.bench.llamacpp``) does, into
``~/.cache/flute/llamacpp-<version>/`` (or ``$FLUTE_CACHE``):

1. ``pip download --no-deps --no-binary :all: llama-cpp-python==<version>`` (skipped when the
   sdist is already there, or ``src`` points at a llama.cpp tree or sdist);
2. extract its ``vendor/llama.cpp`` tree; configure it with cmake (``-DGGML_NATIVE=ON``, static,
   no curl / tests / tools / server) and build only the ggml libraries (ggml, ggml-base, ggml-cpu);
3. compile ``native/ggml_matmul.cpp`` (the driver, flute's own code) against them.

Nothing of llama.cpp is part of this repository. The build takes about 2 minutes on 2 cores;
later runs reuse it. Every failure is returned as a reason, which the benchmark records as a
``skipped`` entry.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .toolchain import cache_dir, compile_exe, source

#: The llama-cpp-python release whose vendored llama.cpp is built (override: $FLUTE_LLAMACPP_VERSION).
VERSION = os.environ.get("FLUTE_LLAMACPP_VERSION", "0.3.36")
#: ggml types timed, with the flute bit width each is compared at (None: dense reference).
TYPES = {"q4_0": 4, "iq4_nl": 4, "q3_K": 3, "q2_K": 2, "f32": None, "bf16": None}
#: Weights per block (the group size of the format's scales).
BLOCK = {"q4_0": 32, "iq4_nl": 32, "q3_K": 256, "q2_K": 256, "f32": None, "bf16": None}
#: Bytes per block of each type (``ggml_row_size``; the driver reports the exact figure).
BLOCK_BYTES = {"q4_0": 18, "iq4_nl": 18, "q3_K": 110, "q2_K": 84, "f32": 4, "bf16": 2}
#: Types llama.cpp can repack into row-interleaved layouts on x86 (its default for model weights).
REPACK_TYPES = ("q4_0", "iq4_nl", "q2_K")
LIBS = ("ggml/src/libggml.a", "ggml/src/libggml-cpu.a", "ggml/src/libggml-base.a")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF",
               "-DGGML_CCACHE=OFF")


def weight_bytes(ggml_type: str, N: int, K: int) -> int:
    """Bytes of an ``[N, K]`` weight of a ggml type (``K`` a multiple of the block)."""
    return N * (K // (BLOCK[ggml_type] or 1)) * BLOCK_BYTES[ggml_type]


def _sh(cmd: Sequence[str], log_path: str, cwd: Optional[str] = None, timeout: int = 1800) -> None:
    with open(log_path, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(list(cmd), cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                       check=True)


def _source_tree(root: str, src: Optional[str], version: str, log_path: str) -> str:
    """The llama.cpp source tree: ``src`` itself, or extracted from ``src`` / the cached sdist /
    a fresh ``pip download``."""
    if src and os.path.isdir(src):
        return src
    tree = os.path.join(root, "llama.cpp")
    if os.path.isfile(os.path.join(tree, "ggml", "include", "ggml.h")):
        return tree
    sdist = src
    if not sdist:
        found = glob.glob(os.path.join(root, f"llama_cpp_python-{version}.tar.gz"))
        if not found:
            _sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={version}", "-d", root], log_path, timeout=900)
            found = glob.glob(os.path.join(root, f"llama_cpp_python-{version}.tar.gz"))
        if not found:
            raise FileNotFoundError(f"pip did not leave llama_cpp_python-{version}.tar.gz in {root}")
        sdist = found[0]
    tmp = tree + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        if not members:
            raise FileNotFoundError(f"{sdist} holds no vendor/llama.cpp tree")
        for m in members:
            m.name = m.name.split("/vendor/llama.cpp", 1)[1].lstrip("/") or "."
            if m.name.startswith("/") or ".." in m.name.split("/"):
                raise ValueError(f"unsafe path in {sdist}: {m.name}")
        keep = [m for m in members if m.name != "."]
        try:
            tf.extractall(tmp, members=keep, filter="data")
        except TypeError:  # Python without extraction filters: names were checked above
            tf.extractall(tmp, members=keep)
    os.replace(tmp, tree)
    return tree


def build(version: str = VERSION, src: Optional[str] = None, log=print, jobs: Optional[int] = None
          ) -> Tuple[Optional[str], Dict[str, object]]:
    """``(driver path, info)``, or ``(None, info)`` with ``info["reason"]`` saying why not."""
    root = cache_dir(f"llamacpp-{version}")
    info: Dict[str, object] = {"cache": root, "version": f"llama-cpp-python {version}"}
    log_path = os.path.join(root, "build.log")
    build_dir = os.path.join(root, "build")
    stamp = os.path.join(root, "build.json")
    libs = [os.path.join(build_dir, lib) for lib in LIBS]
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            info["reason"] = f"no {tool} on PATH"
            return None, info
    try:
        if not all(os.path.isfile(lib) for lib in libs):
            log(f"llama.cpp: building ggml {version} into {root} (once; about 2 minutes on 2 cores; "
                f"log: {log_path})")
            t0 = time.monotonic()
            tree = _source_tree(root, src, version, log_path)
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            _sh(["cmake", "-S", tree, "-B", build_dir, *gen, *CMAKE_FLAGS], log_path)
            _sh(["cmake", "--build", build_dir, "--target", "ggml", "ggml-base", "ggml-cpu",
                 "-j", str(jobs or os.cpu_count() or 2)], log_path)
            with open(stamp, "w") as f:
                json.dump({"seconds": round(time.monotonic() - t0, 1), "tree": tree,
                           "cmake_flags": list(CMAKE_FLAGS),
                           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
        tree = json.load(open(stamp))["tree"] if os.path.isfile(stamp) else os.path.join(root, "llama.cpp")
        exe, why = compile_exe([source("ggml_matmul.cpp")], root, "ggml_matmul", "c++",
                               ["-O2", "-std=c++17", "-march=native",
                                f"-I{os.path.join(tree, 'ggml', 'include')}", *libs,
                                "-fopenmp", "-lpthread", "-ldl"], deps=libs)
    except (OSError, subprocess.SubprocessError, ValueError, tarfile.TarError) as e:
        info["reason"] = f"build failed ({type(e).__name__}: {str(e)[:300]}); see {log_path}"
        return None, info
    if exe is None:
        info["reason"] = f"driver did not compile: {why}"
        return None, info
    if os.path.isfile(stamp):
        info["build"] = json.load(open(stamp))
    info["driver"] = exe
    return exe, info


def run(exe: str, ggml_type: str, N: int, K: int, Ms: Sequence[int], threads: Sequence[int],
        copies: int, repack: bool = False, hot: bool = False, target_ms: float = 300.0,
        min_runs: int = 10, max_runs: int = 2000, budget_ms: Optional[float] = None,
        qcache: Optional[str] = None, timeout: int = 1800) -> List[Dict[str, object]]:
    """Time ``y = x @ W.T`` for one ggml type and shape at every (threads, M); one dict per point
    (``median_ms``, ``weight_bytes``, ``runs``, ...). Raises RuntimeError with the driver's reason.
    ``qcache``: a file for the quantized weight of this type and shape (read when present, else
    written), so that repeated runs skip the quantization."""
    cmd = [exe, "--type", ggml_type, "--n", str(N), "--k", str(K), "--m", ",".join(map(str, Ms)),
           "--threads", ",".join(map(str, threads)), "--copies", str(copies),
           "--target-ms", str(target_ms), "--min-runs", str(min_runs), "--max-runs", str(max_runs)]
    cmd += ["--budget-ms", str(budget_ms)] if budget_ms else []
    cmd += ["--repack"] if repack else []
    cmd += ["--hot"] if hot else []
    cmd += ["--qcache", qcache] if qcache else []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0:
        err = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("repack:")]
        raise RuntimeError((err[-1] if err else f"exit code {r.returncode}")[:300])
    return rows


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Build llama.cpp's ggml and flute's driver into the cache.")
    p.add_argument("--version", default=VERSION)
    p.add_argument("--src", default=None, help="a llama.cpp tree or llama-cpp-python sdist to use")
    a = p.parse_args(argv)
    exe, info = build(a.version, a.src)
    print(json.dumps(info, indent=1))
    return 0 if exe else 1


if __name__ == "__main__":
    sys.exit(main())
