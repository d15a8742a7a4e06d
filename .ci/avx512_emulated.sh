#!/usr/bin/env bash
# The AVX-512 kernels' tests on a CPU without AVX-512 (CI's machines are AVX2). The checkout's files
# are copied to a temporary folder, flute._cpu is built there with FLUTE_CPU_EMULATE_AVX512=1 (the
# AVX-512 units compiled against software intrinsics, csrc/cpu/emulation/immintrin.h; AMX left
# out), and the CPU kernel, op and module tests run against that build, whose "avx512" path
# (exact, int8 with VBMI + VNNI, the bf16 decoders) is then available. Results are the
# instructions', not their speed. Runs in the active Python environment (torch installed); needs
# Debian's libsimde-dev, installed here when missing. Exits with pytest's status (5, no tests,
# counts as a failure). About 5.5 minutes on a 2-core VM, most of it the build (CPU_NOTES item 230).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f /usr/include/simde/x86/avx512.h ]; then
  echo "installing libsimde-dev (SIMDe headers)"
  (apt-get install -y -q libsimde-dev || (apt-get update -q && apt-get install -y -q libsimde-dev)) >/dev/null
fi
if ! grep -qw avx2 /proc/cpuinfo; then
  echo "this CPU lacks AVX2: the emulated AVX-512 build needs it"; exit 1
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$WORK"
cd "$WORK"
FLUTE_CPU_EMULATE_AVX512=1 python setup.py -q build_ext --inplace > build.log 2>&1 || { tail -30 build.log; exit 1; }
python - <<'PY'
import flute, flute.ops as ops, os
assert os.path.dirname(flute.__file__) == os.path.join(os.getcwd(), "flute"), flute.__file__
ops.set_cpu_isa("avx512")
assert ops.get_cpu_isa() == "avx512"
import torch
assert torch.ops.flute.cpu_has_bf16(), "the emulated build should offer the bf16 decoders"
assert torch.ops.flute.cpu_vnni() != "", "the emulated build should offer the AVX2 int8 kernel's VNNI form"
print("emulated AVX-512 build loaded from", flute.__file__)
PY
rc=0
python -m pytest -q -p no:cacheprovider tests/test_cpu_kernel.py tests/test_cpu_int8.py tests/test_cpu_rows16.py tests/test_ops.py tests/test_linear.py || rc=$?
if [ "$rc" = 5 ]; then echo "no tests ran"; exit 1; fi
exit "$rc"
