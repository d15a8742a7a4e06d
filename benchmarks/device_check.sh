#!/usr/bin/env bash
# The GPU check of flute, in one device call (H100/H200, 16 cores, no network): <= ~550 s, build
# included. Every step runs under its own `timeout` (a hung Stream-K wait cannot eat the call),
# capped by a global deadline; after every step the JSON record and the logs are rewritten under
# $OUT, so a killed run still returns what ran. The device returns at most 8 files: $OUT holds
# device_check.json, logs.tgz (all step logs) and bench.json.
#
#   OUT=/some/dir FLUTE_COMMIT=<full hash> bash benchmarks/device_check.sh
#
# Steps, in order (STEPS picks a subset, default all):
#   env        versions, GPU, driver, nvcc, SM count and L2
#   build      reuse the carried Python-version-independent build build/cuda-abi3/_C.abi3.so (made
#              by .ci/cuda_binding.sh) when its source hash matches csrc/cuda and it loads;
#              otherwise build flute._C from source for sm_90a only (MAX_JOBS=16)
#   gpu        stop with exit code 77 when no CUDA device is visible (the CI dry run ends here)
#   smoke      90 s: every bits x dtype, M = 1, 17, 33, 300, odd N and K, groups 128/48/-1/32+offsets,
#              one large split shape, determinism, CUDA-graph replay
#   memcheck   compute-sanitizer memcheck on small shapes (caching allocator off)
#   racecheck  compute-sanitizer racecheck (shared-memory hazards) on small shapes
#   matrix     tests/test_cuda_kernel.py without the large/compile tests (junit counts in the JSON)
#   bench      CUDA-graph-timed calls (M = 1, 16, 64) with weights rotated beyond L2, vs fp16 torch.matmul
#   large      the large-shape and torch.compile tests
#
# A missing or broken flute._C on a machine with a GPU fails (never skips): the build step fails,
# and tests/test_cuda_kernel.py fails with the import error.
#
# Device call (the carried build saves ~1.5 minutes; without it the script builds):
#   run(command="OUT=$OUT FLUTE_COMMIT=<hash> bash benchmarks/device_check.sh",
#       carry=["build/cuda-abi3"], timeout_s=600)
#
# Exit code: 0 all steps passed; 77 no GPU (stopped before the first GPU step); 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device_check_out}
PY=${PYTHON:-python3}
STEPS=" ${STEPS:-env build gpu smoke memcheck racecheck matrix bench large} "
DEADLINE=${DEVICE_CHECK_DEADLINE:-550}   # seconds for the whole script
LOGS=$(mktemp -d)/logs
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT
export DEVICE_CHECK_COMMAND="STEPS='${STEPS# }' DEVICE_CHECK_DEADLINE=$DEADLINE bash benchmarks/device_check.sh"
T0=$(date +%s)
REC="$OUT/device_check.json"
FAILED=0
want() { [[ "$STEPS" == *" $1 "* ]]; }
elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[device_check +$(elapsed)s] $*" | tee -a "$LOGS/device_check.log"; }
pack() { tar czf "$OUT/logs.tgz.tmp" -C "$(dirname "$LOGS")" logs 2>/dev/null && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"; }

# record STEP RC SECONDS NOTE: merge one step into the JSON record (and set the overall status)
record() {
  "$PY" - "$REC" "$@" <<'PY' || true
import json, os, sys, time
path, step, rc, secs, note = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
try:
    r = json.load(open(path))
except Exception:
    r = {"kind": "flute device_check", "steps": {}}
status = ("passed" if rc == 0 else "timeout" if rc in (124, 137) else
          "no-gpu" if (step == "gpu" and rc == 77) else "failed")
r["steps"][step] = {"rc": rc, "seconds": secs, "status": status, "note": note[:2000]}
r["updated_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
bad = [k for k, v in r["steps"].items() if v["rc"] != 0 and k != "gpu"]
r["status"] = "failed" if bad else ("no-gpu" if r["steps"].get("gpu", {}).get("rc") == 77 else "passed")
r["failed_steps"] = bad
tmp = path + ".tmp"
json.dump(r, open(tmp, "w"), indent=1)
os.replace(tmp, path)
PY
}

# run_step NAME BUDGET CMD...: run under timeout min(BUDGET, time left), log, record, pack
run_step() {
  local name=$1 budget=$2; shift 2
  local left=$(( DEADLINE - $(elapsed) ))
  if (( left < 15 )); then
    log "$name: skipped, ${left}s left of the ${DEADLINE}s deadline"
    record "$name" 124 0 "skipped: deadline"; FAILED=1; pack; return 124
  fi
  (( budget > left )) && budget=$left
  log "$name: start (timeout ${budget}s)"
  local s; s=$(date +%s)
  timeout -k 10 "$budget" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - s ))
  log "$name: rc=$rc in ${secs}s"
  tail -n "${TAIL_LINES:-15}" "$LOGS/$name.log" | sed "s/^/  [$name] /"
  record "$name" "$rc" "$secs" "$(tail -n 5 "$LOGS/$name.log" | tr '\n' ' ')"
  pack
  [[ $rc -ne 0 ]] && FAILED=1
  return $rc
}

WORK=$(mktemp -d)

# ---------------------------------------------------------------------------------------------
if want env; then
cat >"$WORK/env.py" <<'PY'
import json, os, subprocess, sys, time
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:
        return f"error: {exc}"
import torch
r = {"kind": "flute device_check", "steps": {}}
path = os.path.join(os.environ["OUT"], "device_check.json")
try:
    r = json.load(open(path))
except Exception:
    pass
r.update({
    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "commit": os.environ.get("FLUTE_COMMIT") or sh("git rev-parse HEAD 2>/dev/null") or "unknown",
    "command": os.environ.get("DEVICE_CHECK_COMMAND", ""),
    "python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "nvcc": sh("nvcc --version | tail -1"),
    "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1"),
    "gpu_visible": torch.cuda.is_available(),
})
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    r.update({"device": p.name, "sms": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
              "l2_bytes": getattr(p, "L2_cache_size", None), "memory_bytes": p.total_memory})
else:
    r["device"] = "none"
json.dump(r, open(path, "w"), indent=1)
print(json.dumps({k: v for k, v in r.items() if k != "steps"}, indent=1))
PY
run_step env 30 "$PY" "$WORK/env.py"
fi

# ---------------------------------------------------------------------------------------------
cat >"$WORK/load_check.py" <<'PY'
import sys
import torch
import flute
from flute import ops
if not ops.HAS_CUDA_KERNEL:
    sys.exit(f"flute._C did not load: {ops.CUDA_KERNEL_ERROR}")
for op in ("flute::qgemm", "flute::dequantize"):
    dump = [l for l in torch._C._dispatch_dump(op).splitlines() if l.startswith("CUDA")]
    if not dump or "flute_ops.cpp" not in dump[0]:
        sys.exit(f"{op}: CUDA kernel not registered by the binding: {dump}")
print("flute._C loaded from", sys.modules["flute._C"].__file__, "| torch", torch.__version__)
PY
# sha256 of csrc/cuda/* concatenated in byte order of the names (= .ci/cuda_binding.sh's
# `cat $(ls csrc/cuda/* | LC_ALL=C sort) | sha256sum`), in Python: the device image may lack sha256sum.
src_hash() { "$PY" -c 'import glob, hashlib; print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sorted(glob.glob("csrc/cuda/*")))).hexdigest())'; }
build_or_reuse() {
  rm -f flute/_C*.so
  local pre=build/cuda-abi3/_C.abi3.so
  if [[ -f "$pre" && -n "$(cat build/cuda-abi3/DEFINES 2>/dev/null)" ]]; then
    echo "the carried build is a tuning experiment (DEFINES: $(cat build/cuda-abi3/DEFINES)): building from source"
  elif [[ -f "$pre" ]]; then
    if [[ "$(cat build/cuda-abi3/SOURCES_SHA256 2>/dev/null)" == "$(src_hash)" ]]; then
      cp "$pre" flute/_C.abi3.so
      if "$PY" "$WORK/load_check.py"; then
        echo "reused the carried build $pre (sources match, archs $(cat build/cuda-abi3/ARCHS 2>/dev/null))"
        return 0
      fi
      echo "the carried build does not load here: building from source"
      rm -f flute/_C*.so
    else
      echo "the carried build is of other sources (hash mismatch): building from source"
    fi
  fi
  if [[ -z "${CUDA_HOME:-}" ]]; then
    local top; top=$(cd /tmp && nvcc -dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    [[ -n "$top" ]] && CUDA_HOME=$(cd "$top" && pwd -P) && export CUDA_HOME
  fi
  echo "building flute._C for sm_90a (CUDA_HOME=${CUDA_HOME:-unset}, MAX_JOBS=${MAX_JOBS:-16})"
  FLUTE_BUILD_CPU=0 FLUTE_BUILD_CUDA=1 FLUTE_CUDA_ARCHS="${FLUTE_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" setup.py build_ext --inplace || return 1
  "$PY" "$WORK/load_check.py"
}
if want build; then
  run_step build 240 bash -c "$(declare -f src_hash build_or_reuse); PY='$PY' WORK='$WORK' build_or_reuse" || {
    log "build failed: the GPU steps would only test the reference path; stopping"
    pack; exit 1
  }
fi

# ---------------------------------------------------------------------------------------------
if want gpu; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    log "no CUDA device visible (torch.cuda.is_available() is False): stopping before the GPU steps (exit 77)"
    record gpu 77 0 "no CUDA device"
    pack; exit 77
  fi
  record gpu 0 0 "CUDA device visible"
fi

# ---------------------------------------------------------------------------------------------
cat >"$WORK/smoke.py" <<'PY'
import sys, time
import torch
import flute
from flute.layout import to_kernel_layout
from flute.testing import random_quantized, reference_qgemm, relative_error

assert flute.ops.HAS_CUDA_KERNEL, flute.ops.CUDA_KERNEL_ERROR
t0 = time.time()
fails, n = [], 0
LIMIT = {torch.float16: 3e-3, torch.bfloat16: 2e-2}

def case(bits, dtype, n_out, k, group, offsets, ms, seed=0):
    global n
    w = random_quantized(n_out, k, bits, group, offsets=offsets, dtype=dtype, seed=seed)
    q = to_kernel_layout(w.codes.cuda(), bits)
    s = w.scales.cuda(); o = None if w.offsets is None else w.offsets.cuda(); t = w.table.cuda()
    for M in ms:
        x = torch.randn(M, k, generator=torch.Generator().manual_seed(M + seed)).to(dtype).cuda()
        torch.full((M * n_out,), float("nan"), dtype=dtype, device="cuda")  # poison the allocator
        y = torch.ops.flute.qgemm(x, q, s, o, t, bits, group, k, n_out)
        torch.cuda.synchronize()
        err = relative_error(y.cpu(), reference_qgemm(x, w, group).cpu())
        n += 1
        tag = f"bits={bits} {str(dtype)[6:]} N={n_out} K={k} g={group} off={offsets} M={M}"
        if not err <= LIMIT[dtype]:
            fails.append(f"{tag}: rel err {err:.2e}")
            print("FAIL", tag, err, flush=True)
    return q, s, o, t, w

WIDTHS = [int(b) for b in sys.argv[1:]] or [2, 3, 4]  # one width per process in the smoke step
for bits in WIDTHS:
    for dtype in (torch.float16, torch.bfloat16):
        case(bits, dtype, 333, 1000, 128, False, (1, 17, 33, 300))
        case(bits, dtype, 197, 2000, 48, False, (1, 17))
        case(bits, dtype, 129, 776, -1, False, (1, 33))
        case(bits, dtype, 250, 1024, 32, True, (3, 300))
    print(f"bits={bits} done, {n} cases, {time.time() - t0:.1f}s", flush=True)

if 3 in WIDTHS:
    case(3, torch.bfloat16, 4096, 4096, 128, False, (1,))
if 4 not in WIDTHS:
    print(f"smoke {WIDTHS}: {n} cases in {time.time() - t0:.1f}s; failures: {len(fails)}")
    for f in fails[:30]:
        print("  ", f)
    sys.exit(1 if fails else 0)
# one large shape whose tiles are split across many CTAs (N=256: 2 tiles, K=16384: 128 k-tiles)
q, s, o, t, w = case(4, torch.float16, 256, 16384, 128, False, (1, 16))
# determinism: same inputs, same bits, across calls and streams
x = torch.randn(5, 16384, dtype=torch.float16, device="cuda")
ys = []
for i in range(3):
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())  # x and the weight were made on the default stream
    with torch.cuda.stream(st):
        ys.append(torch.ops.flute.qgemm(x, q, s, o, t, 4, 128, 16384, 256))
    st.synchronize()
if not (torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])):
    fails.append("not deterministic across calls/streams")
# CUDA graph: capture (first use of the capture stream's workspace inside the capture), replay
x = torch.randn(8, 16384, dtype=torch.float16, device="cuda")
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    yg = torch.ops.flute.qgemm(x, q, s, o, t, 4, 128, 16384, 256)
for i in range(3):
    x.copy_(torch.randn(8, 16384, dtype=torch.float16, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    err = relative_error(yg.cpu(), reference_qgemm(x, w, 128).cpu())
    if not err <= LIMIT[torch.float16]:
        fails.append(f"graph replay {i}: rel err {err:.2e}")
    if not torch.equal(yg, torch.ops.flute.qgemm(x, q, s, o, t, 4, 128, 16384, 256)):
        fails.append(f"graph replay {i} differs from the eager call")
print(f"smoke {WIDTHS}: {n} cases + determinism + graph replay in {time.time() - t0:.1f}s; failures: {len(fails)}")
for f in fails[:30]:
    print("  ", f)
sys.exit(1 if fails else 0)
PY
# per_width LOGNAME CMD...: run CMD once per bit width (4, 3, 2) in parallel, FLUTE_TEST_BITS and the
# width as the last argument set; each in its own process (a sticky CUDA error in one kernel poisons
# only its process); prints each log; fails when any fails.
per_width() {
  local name=$1; shift
  local pids=() rc=0 b
  for b in 4 3 2; do
    FLUTE_TEST_BITS=$b "$@" "$b" >"$LOGS/${name}_b$b.log" 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for b in 4 3 2; do echo "== ${name} bits=$b"; tail -n 25 "$LOGS/${name}_b$b.log"; done
  return $rc
}
want smoke && run_step smoke 90 bash -c "$(declare -f per_width); LOGS='$LOGS' per_width smoke '$PY' '$WORK/smoke.py'"

# ---------------------------------------------------------------------------------------------
cat >"$WORK/sanitize.py" <<'PY'
import torch
import flute
from flute.layout import to_kernel_layout
from flute.testing import random_quantized
assert flute.ops.HAS_CUDA_KERNEL, flute.ops.CUDA_KERNEL_ERROR
for bits, dtype, n, k, group, offs, M in ((4, torch.float16, 130, 1000, -1, False, 3),
                                          (3, torch.bfloat16, 64, 2048, 48, True, 17),
                                          (2, torch.float16, 40, 4096, 128, False, 33),
                                          (2, torch.bfloat16, 333, 1000, 128, False, 1)):
    w = random_quantized(n, k, bits, group, offsets=offs, dtype=dtype)
    q = to_kernel_layout(w.codes.cuda(), bits)
    o = None if w.offsets is None else w.offsets.cuda()
    x = torch.randn(M, k, dtype=dtype, device="cuda")
    torch.ops.flute.qgemm(x, q, w.scales.cuda(), o, w.table.cuda(), bits, group, k, n)
    torch.ops.flute.dequantize(q, w.scales.cuda(), o, w.table.cuda(), bits, group, k, n)
torch.cuda.synchronize()
print("sanitize workload done")
PY
SAN_BIN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
SAN=("${SAN_BIN:-compute-sanitizer}" --error-exitcode 13 --print-limit 20)
want memcheck && run_step memcheck 75 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SAN[@]}" --tool memcheck "$PY" "$WORK/sanitize.py"
want racecheck && run_step racecheck 75 "${SAN[@]}" --tool racecheck --racecheck-report hazard "$PY" "$WORK/sanitize.py"

# merge_junit: GPU test counts of every pytest step so far (matrix, large; one junit file per bit
# width) into the record: tests = {passed, failed, skipped, errors, by_step: {step: {bits: ...}}}.
merge_junit() {
  "$PY" - "$REC" "$LOGS"/pytest_*_b*.xml <<'PY' || true
import json, os, re, sys, xml.etree.ElementTree as ET
r = json.load(open(sys.argv[1]))
t = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "by_step": {}}
for path in sys.argv[2:]:
    m = re.search(r"pytest_(\w+)_b(\d)\.xml$", os.path.basename(path))
    if not m:
        continue
    step, bits = m.groups()
    try:
        for ts in ET.parse(path).getroot().iter("testsuite"):
            n, f, e, s = (int(ts.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            t["failed"] += f; t["errors"] += e; t["skipped"] += s; t["passed"] += n - f - e - s
            t["by_step"].setdefault(step, {})[bits] = {"passed": n - f - e - s, "failed": f + e, "skipped": s}
    except Exception as exc:
        t.setdefault("notes", []).append(f"{path}: no junit xml: {exc}")
for step, widths in t["by_step"].items():
    if len(widths) < 3:
        t.setdefault("notes", []).append(f"{step}: junit files for {len(widths)} of 3 widths")
r["tests"] = t
json.dump(r, open(sys.argv[1], "w"), indent=1)
print("GPU tests so far:", {k: v for k, v in t.items() if k != "by_step"}, t["by_step"])
PY
}

# ---------------------------------------------------------------------------------------------
if want matrix; then
  cat >"$WORK/matrix.sh" <<SH
exec "$PY" -m pytest tests/test_cuda_kernel.py -q -p no:cacheprovider -rfE \\
  -k "not large and not compile" --junitxml="$LOGS/pytest_matrix_b\$1.xml"
SH
  run_step matrix 150 bash -c "$(declare -f per_width); LOGS='$LOGS' per_width matrix bash '$WORK/matrix.sh'"
  merge_junit
fi

# ---------------------------------------------------------------------------------------------
want bench && run_step bench 75 "$PY" benchmarks/device_bench.py --json "$OUT/bench.json"

# ---------------------------------------------------------------------------------------------
cat >"$WORK/large.sh" <<SH
exec "$PY" -m pytest tests/test_cuda_kernel.py -q -p no:cacheprovider -rfE -k "large or compile" \\
  --junitxml="$LOGS/pytest_large_b\$1.xml"
SH
if want large; then
  run_step large 120 bash -c "$(declare -f per_width); LOGS='$LOGS' per_width large bash '$WORK/large.sh'"
  merge_junit
fi

log "done in $(elapsed)s; results in $OUT (device_check.json, logs.tgz, bench.json)"
pack
exit $(( FAILED ? 1 : 0 ))
