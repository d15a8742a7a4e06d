#!/usr/bin/env bash
# CI stage: build the torch binding `flute._C` against the GPU machines' torch (2.11.0, CUDA 13.0)
# on this GPU-less machine, check that it loads and registers CUDA kernels for flute::qgemm and
# flute::dequantize, and dry-run benchmarks/device_check.sh up to the point where it needs a GPU.
#
#   bash .ci/cuda_binding.sh
#
# FLUTE_CUDA_VENV    the venv holding torch==2.11.0 (CUDA 13.0 build) and its NVIDIA runtime wheels
#                    (~4.5 GB installed; default $HOME/.cache/flute/cuda-torch-venv). Reused across
#                    runs; rebuilt when absent or broken. One builder at a time (flock).
# FLUTE_CUDA_PYTHON  interpreter that creates it (default python3.11, else python3)
# FLUTE_CUDA_ARCHS   SM targets of the build (default "90a;80")
# FLUTE_CUDA_DEFINES tuning-experiment macros (e.g. "FLUTE_PAIR_COPIES_WIDE=8"), recorded in DEFINES
# FLUTE_ABI3_DIR     where the built library is copied (default build/cuda-abi3): a Python-version-
#                    independent _C.abi3.so that device_check.sh reuses on the GPU machine (carry
#                    `build/cuda-abi3` in the device call; see benchmarks/device_check.sh).
#
# The build runs in a temporary copy of the sources, so the checkout's own (CPU) build is untouched.
# Exit code: 0 when everything passed (the dry run of device_check.sh must stop with its
# "needs a GPU" code 77); non-zero on any failure.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLUTE_CUDA_VENV:-$HOME/.cache/flute/cuda-torch-venv}"
PY="${FLUTE_CUDA_PYTHON:-python3.11}"
TORCH_SPEC="torch==2.11.0"
ARCHS="${FLUTE_CUDA_ARCHS:-90a;80}"
ABI3_DIR="${FLUTE_ABI3_DIR:-$REPO/build/cuda-abi3}"
READY="$VENV/.flute-cuda-torch-ready-2.11.0"
command -v "$PY" >/dev/null 2>&1 || PY=python3
start=$(date +%s)
say() { echo "cuda_binding [+$(( $(date +%s) - start ))s]: $*"; }

# The toolkit's root from the nvcc on PATH (which may be a wrapper script): ask nvcc itself.
command -v nvcc >/dev/null || { echo "cuda_binding: nvcc not found on PATH" >&2; exit 1; }
if [[ -z "${CUDA_HOME:-}" ]]; then
    top=$(cd /tmp && nvcc -dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    CUDA_HOME=$(cd "${top:-$(dirname "$(readlink -f "$(command -v nvcc)")")/..}" && pwd -P)
fi
export CUDA_HOME
[[ -x "$CUDA_HOME/bin/nvcc" ]] || { echo "cuda_binding: no bin/nvcc under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }
say "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"

# ---- 1. the CUDA torch venv (cached) --------------------------------------------------------
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
venv_ok() {
    [[ -f "$READY" && -x "$VENV/bin/python" ]] && "$VENV/bin/python" - <<'PY' 2>/dev/null
import torch, numpy, safetensors, tqdm, setuptools, ninja  # noqa: F401
assert torch.__version__.split("+")[0] == "2.11.0" and torch.version.cuda, torch.__version__
PY
}
if venv_ok; then
    say "reusing $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'))"
else
    say "creating $VENV with $TORCH_SPEC (CUDA 13.0 build + NVIDIA runtime wheels, ~2 GB download)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    # The pip config's constraint file caps torch at the local CPU wheel's line; 2.11.0 is below it.
    "$VENV/bin/pip" install -q "$TORCH_SPEC" numpy safetensors tqdm setuptools wheel ninja
    touch "$READY"
    venv_ok || { echo "cuda_binding: the fresh venv does not import torch $TORCH_SPEC with CUDA" >&2; exit 1; }
    say "venv ready"
fi
flock -u 9

# ---- 2. build flute._C in a temporary copy ---------------------------------------------------
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src"
( cd "$REPO" && cp -r setup.py README.md flute csrc "$WORK/src/" )
find "$WORK/src" -name '__pycache__' -prune -exec rm -rf {} + -o -name '*.so' -exec rm -f {} +
say "building flute._C for sm ${ARCHS} (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
(
    cd "$WORK/src"
    FLUTE_BUILD_CPU=0 FLUTE_BUILD_CUDA=1 FLUTE_CUDA_ARCHS="$ARCHS" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$VENV/bin/python" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1
) || { tail -60 "$WORK/build.log"; echo "cuda_binding: build FAILED" >&2; exit 1; }
if grep -E "warning" "$WORK/build.log" | grep -v -E "^\s*$" | grep -q -E "flute|csrc"; then
    echo "--- compiler warnings in flute sources:"; grep -E "warning" "$WORK/build.log" | grep -E "flute|csrc" | head -20
fi
so=$(ls "$WORK/src/flute/"_C*.so 2>/dev/null | head -1)
[[ -n "$so" ]] || { echo "cuda_binding: no flute/_C*.so after the build" >&2; exit 1; }
case "$so" in *.abi3.so) ;; *) echo "cuda_binding: $so is not an abi3 (Python-version-independent) build" >&2; exit 1 ;; esac
say "built $(basename "$so") ($(du -h "$so" | cut -f1))"

# ---- 3. load it and check the registrations -----------------------------------------------------
( cd "$WORK/src" && "$VENV/bin/python" - "$so" <<'PY'
import os, subprocess, sys
import torch
import flute
from flute import ops
so = sys.argv[1]
if not ops.HAS_CUDA_KERNEL:
    sys.exit(f"flute._C did not load: {ops.CUDA_KERNEL_ERROR}")
assert os.path.samefile(sys.modules["flute._C"].__file__, so), sys.modules["flute._C"].__file__
for op in ("flute::qgemm", "flute::dequantize"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op}: no CUDA kernel"
    dump = torch._C._dispatch_dump(op)
    cuda = [l for l in dump.splitlines() if l.startswith("CUDA")]
    # registered from C++ (the binding), not the Python fallback of flute/ops.py
    assert cuda and "flute_ops.cpp" in cuda[0], f"{op}: CUDA kernel not from the binding: {cuda}"
    print(f"{op}: {cuda[0].strip()[:110]}")
# Python-version independence: no libpython dependency, no CPython symbols outside the stable ABI
nm = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True).stdout
py_syms = sorted({l.split()[-1] for l in nm.splitlines() if l.split() and l.split()[-1].startswith(("Py", "_Py"))})
allowed = {"PyModule_Create2"}
bad = [s for s in py_syms if s not in allowed]
assert not bad, f"CPython symbols outside the stable ABI subset we expect: {bad}"
print("CPython symbols used:", py_syms, "| torch", torch.__version__, "| cuda available:", torch.cuda.is_available())
PY
) || { echo "cuda_binding: the built library does not load or register its kernels" >&2; exit 1; }
mkdir -p "$ABI3_DIR"
cp "$so" "$ABI3_DIR/_C.abi3.so"
( cd "$REPO" && git rev-parse HEAD 2>/dev/null || echo unknown ) >"$ABI3_DIR/COMMIT"
echo "$ARCHS" >"$ABI3_DIR/ARCHS"
echo "${FLUTE_CUDA_DEFINES:-}" >"$ABI3_DIR/DEFINES"  # empty for the product build
# device_check.sh reuses the build only for the same kernel sources (same hash as it computes)
( cd "$WORK/src" && cat $(ls csrc/cuda/* | LC_ALL=C sort) | sha256sum | cut -d' ' -f1 ) >"$ABI3_DIR/SOURCES_SHA256"
say "copied to $ABI3_DIR/_C.abi3.so (device_check.sh reuses it when carried and loadable)"

# ---- 4. dry run of the device check: must stop where it needs a GPU, with exit code 77 ---------
say "dry run of benchmarks/device_check.sh (no GPU here: expect exit 77)"
set +e
( cd "$WORK/src" && cp -r "$REPO/benchmarks" "$REPO/tests" "$REPO/pytest.ini" . 2>/dev/null
  mkdir -p build/cuda-abi3 && cp "$ABI3_DIR"/{_C.abi3.so,SOURCES_SHA256,ARCHS} build/cuda-abi3/ && rm -f flute/_C*.so
  OUT="$WORK/dry_out" PYTHON="$VENV/bin/python" FLUTE_COMMIT=dry-run bash benchmarks/device_check.sh )
rc=$?
set -e
if [[ $rc -ne 77 ]]; then
    echo "cuda_binding: device_check.sh dry run exited $rc, expected 77 (stopped at the first step needing a GPU)" >&2
    exit 1
fi
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['steps']['env']['rc']==0 and r['steps']['build']['rc']==0, r['steps']; print('dry-run record:', r['status'], r['steps'])" "$WORK/dry_out/device_check.json"
say "OK (binding builds, loads, registers CUDA kernels; device check dry run stops at the GPU step)"
