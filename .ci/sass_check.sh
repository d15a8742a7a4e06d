#!/usr/bin/env bash
# Scan the machine code of the built CUDA extension for instruction forms that are known to fault.
#
#   bash .ci/sass_check.sh [path/to/_C.abi3.so]     (default build/cuda-abi3/_C.abi3.so)
#
# Why: on the first GPU run (H200, benchmarks/NOTES.md), ptxas 13.0 had compiled one cp.async of the
# 2-bit, 16-row GEMM kernels into `LDGSTS [R+UR0+imm], desc[UR1]`: an address with a uniform
# register and a memory descriptor in a register that nothing writes. It faulted with "an illegal
# instruction was encountered" and compiled without a warning. This check fails on
#   - an LDGSTS whose shared address adds a uniform register (no other instruction of ours has it),
#   - a memory descriptor in an odd uniform register (descriptors are 64-bit register pairs),
#   - a binary without the expected kernels (18 fused GEMMs and 6 dequantize kernels per arch).
# Needs cuobjdump: from PATH, $CUDA_HOME/bin, or the Triton wheel in the CUDA torch venv of
# .ci/cuda_binding.sh (FLUTE_CUDA_VENV). No GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
SO=${1:-build/cuda-abi3/_C.abi3.so}
[[ -f "$SO" ]] || { echo "sass_check: $SO not found (build it with bash .ci/cuda_binding.sh)" >&2; exit 2; }
VENV="${FLUTE_CUDA_VENV:-$HOME/.cache/flute/cuda-torch-venv}"
CUO=$(command -v cuobjdump || true)
[[ -z "$CUO" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/cuobjdump" ]] && CUO=$CUDA_HOME/bin/cuobjdump
[[ -z "$CUO" ]] && CUO=$(ls "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1 || true)
[[ -n "$CUO" ]] || { echo "sass_check: no cuobjdump found (PATH, CUDA_HOME, $VENV)" >&2; exit 2; }
SASS=$(mktemp)
trap 'rm -f "$SASS"' EXIT
"$CUO" --dump-sass "$SO" >"$SASS" 2>/dev/null
python3 - "$SASS" "$SO" <<'PY'
import re, sys
from collections import Counter
sass, so = sys.argv[1], sys.argv[2]
func = arch = None
bad, kernels = [], Counter()
for line in open(sass):
    m = re.search(r"arch = (sm_\w+)", line)
    if m:
        arch = m.group(1)
    m = re.search(r"Function : (\S+)", line)
    if m:
        func = m.group(1)
        kind = "gemm" if "flute_gemm_kernel" in func else "dequant" if "flute_dequant_kernel" in func else None
        if kind:
            kernels[(arch, kind)] += 1
        continue
    m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
    if not m:
        continue
    pc, text = m.groups()
    if "LDGSTS" in text and re.search(r"\[R\w+\s*\+\s*UR\d+", text):
        bad.append(f"{arch} {func} +0x{pc}: LDGSTS with a uniform-register address: {text.strip()}")
    if re.search(r"desc\[UR\d*[13579]\]", text):
        bad.append(f"{arch} {func} +0x{pc}: memory descriptor in an odd uniform register: {text.strip()}")
archs = sorted({a for a, _ in kernels})
print(f"sass_check: {so}: archs {archs}; kernels " +
      ", ".join(f"{a} {k} {n}" for (a, k), n in sorted(kernels.items())))
for a in archs:
    if kernels[(a, "gemm")] != 18 or kernels[(a, "dequant")] != 6:
        bad.append(f"{a}: expected 18 GEMM and 6 dequantize kernels, found "
                   f"{kernels[(a, 'gemm')]} and {kernels[(a, 'dequant')]}")
if not archs:
    bad.append("no flute kernels found in the binary")
for b in bad:
    print("FAIL:", b)
print("sass_check:", "FAILED" if bad else "OK")
sys.exit(1 if bad else 0)
PY
