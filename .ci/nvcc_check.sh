#!/usr/bin/env bash
# Compile every CUDA kernel file (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90a, print ptxas's
# resource usage per kernel, and fail on a compile error or on register spills in the main
# kernels (flute_gemm_kernel, flute_dequant_kernel). Needs only nvcc: no GPU, no torch.
#
#   bash .ci/nvcc_check.sh                 # sm_80 + sm_90a, release flags of setup.py
#   ARCHS="80 86 89 90a" bash .ci/nvcc_check.sh
#   FLUTE_DEBUG=1 bash .ci/nvcc_check.sh   # also build with device-side bound checks
#   JOBS=4 bash .ci/nvcc_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${ARCHS:-"80 90a"}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
FLAGS=(-O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -Icsrc/cuda -Xptxas -v)
command -v "$NVCC" >/dev/null || { echo "nvcc_check: nvcc not found" >&2; exit 2; }
"$NVCC" --version | tail -1

jobs_list=()
for f in csrc/cuda/*.cu; do
  for a in $ARCHS; do
    jobs_list+=("$f $a release")
    if [ "${FLUTE_DEBUG:-0}" = 1 ]; then jobs_list+=("$f $a debug"); fi
  done
done

compile_one() {
  local f=$1 a=$2 mode=$3
  local base; base=$(basename "$f" .cu)_sm${a}_${mode}
  local extra=()
  [ "$mode" = debug ] && extra=(-DFLUTE_DEBUG)
  if "$NVCC" "${FLAGS[@]}" "${extra[@]}" "-gencode=arch=compute_${a},code=sm_${a}" -c "$f" \
      -o "$OUT/$base.o" >"$OUT/$base.log" 2>&1; then
    echo ok >"$OUT/$base.status"
  else
    echo fail >"$OUT/$base.status"
  fi
}
export -f compile_one
export NVCC OUT
export FLAGS_STR="${FLAGS[*]}"
# bash arrays do not export: re-split in the child
compile_wrapper() { FLAGS=($FLAGS_STR); compile_one "$@"; }
export -f compile_wrapper

start=$(date +%s)
printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -L 1 bash -c 'compile_wrapper $0 $1 $2'
echo "compiled ${#jobs_list[@]} (file, arch, mode) units in $(( $(date +%s) - start )) s with $JOBS jobs"

status=0
for s in "$OUT"/*.status; do
  b=$(basename "$s" .status)
  if [ "$(cat "$s")" != ok ]; then
    echo "=== COMPILE ERROR: $b"; cat "$OUT/$b.log"; status=1
  fi
done

# Parse ptxas -v: "Compiling entry function 'NAME' for 'sm_XX'", then the properties lines.
python3 - "$OUT" <<'PY' || status=1
import glob, os, re, subprocess, sys
out = sys.argv[1]
rows, bad = [], []
for log in sorted(glob.glob(os.path.join(out, "*.log"))):
    mode = "debug" if log.endswith("_debug.log") else "release"
    name = arch = None
    for line in open(log):
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            name, arch = m.groups(); cur = {"name": name, "arch": arch, "mode": mode}
            rows.append(cur); continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
def short(n):
    m = re.search(r"flute_(gemm|dequant)_kernelI(\d+)(__half|__nv_bfloat16)Li(\d)E(?:Li(\d)E)?", n)
    if not m:
        return n
    kind, _, dt, bits, mt = m.groups()
    dt = "fp16" if dt == "__half" else "bf16"
    return f"{kind}<{dt}, {bits}-bit" + (f", {16 * int(mt)} rows>" if mt else ">")
print(f"{'kernel':<30} {'arch':<7} {'mode':<7} {'regs':>4} {'stack':>5} {'spill st/ld':>11}")
for r in sorted(rows, key=lambda r: (short(r["name"]), r["arch"], r["mode"])):
    print(f"{short(r['name']):<30} {r['arch']:<7} {r['mode']:<7} {r.get('regs', -1):>4} "
          f"{r.get('stack', -1):>5} {r.get('spill_st', -1):>5}/{r.get('spill_ld', -1):<5}")
    main = "flute_gemm_kernel" in r["name"] or "flute_dequant_kernel" in r["name"]
    if main and r["mode"] == "release" and (r.get("spill_st", 0) or r.get("spill_ld", 0)):
        bad.append(f"{short(r['name'])} {r['arch']}: spills {r['spill_st']}/{r['spill_ld']} bytes")
kernels = {r["name"] for r in rows if "flute_gemm_kernel" in r["name"]}
if len(kernels) != 18:
    bad.append(f"expected 18 fused-GEMM instantiations (3 bits x 2 dtypes x 3 batch tiles), got {len(kernels)}")
for b in bad:
    print("FAIL:", b)
sys.exit(1 if bad else 0)
PY
if [ $status -ne 0 ]; then echo "nvcc_check: FAILED"; exit 1; fi
echo "nvcc_check: OK"
