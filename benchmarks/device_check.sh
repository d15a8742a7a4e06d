#!/usr/bin/env bash
# One command for the GPU machine (H100/H200, no network, <= 10 minutes): build the extension,
# run the GPU tests, run a quick benchmark against fp16 torch.matmul, and write logs plus a JSON
# record under $OUT (default ./device_check_out), suitable for committing under benchmarks/results/.
#
#   OUT=/some/dir FLUTE_COMMIT=$(git rev-parse HEAD) bash benchmarks/device_check.sh
#
# The device machine gets the working tree without .git: pass the commit being measured in
# FLUTE_COMMIT. STAGES (default "build tests quick bench") picks stages, so that a session can
# split the work over calls of at most 10 minutes each (the built extension stays between calls
# on a warm machine). Logs go into one archive, $OUT/logs.tgz, because the device tool returns at
# most 8 files: logs.tgz, device_check.json, and the bench JSON and plots.
#
# The JSON holds device, driver, torch, commit (full hash), tests {passed, failed, skipped,
# errors}, build/test status and the raw timings (every repetition, in microseconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_check_out}
STAGES=" ${STAGES:-build tests quick bench} "
LOGS="$OUT/logs"
mkdir -p "$OUT" "$LOGS"
want() { [[ "$STAGES" == *" $1 "* ]]; }
pack_logs() { tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"; }
trap pack_logs EXIT
PY=${PYTHON:-python}
T0=$(date +%s)
log() { echo "[device_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOGS/device_check.log"; }

BUILD_RC=skipped
if want build; then
  log "build (MAX_JOBS=16, FLUTE_BUILD_CUDA=1)"
  export MAX_JOBS=${MAX_JOBS:-16} FLUTE_BUILD_CUDA=1
  timeout 330 $PY -m pip install --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1
  BUILD_RC=$?
  log "build rc=$BUILD_RC ($(grep -c 'error' "$LOGS/build.log" || true) lines mention 'error')"
fi

TEST_RC=skipped
if want tests; then
  log "GPU tests"
  timeout 240 $PY -m pytest tests/test_cuda_kernel.py -x -q -p no:cacheprovider \
    --junitxml="$LOGS/pytest_cuda.xml" >"$LOGS/tests.log" 2>&1
  TEST_RC=$?
  tail -5 "$LOGS/tests.log" | tee -a "$LOGS/device_check.log"
fi

if want quick; then
log "quick benchmark"
timeout 150 $PY - "$OUT" "$BUILD_RC" "$TEST_RC" <<'PY' 2>&1 | tee -a "$LOGS/device_check.log"
import json, os, statistics, subprocess, sys, time, xml.etree.ElementTree as ET
import torch

out, build_rc, test_rc = sys.argv[1], sys.argv[2], sys.argv[3]

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""

tests = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
try:
    root = ET.parse(os.path.join(out, "logs", "pytest_cuda.xml")).getroot()
    for ts in root.iter("testsuite"):
        t, f, e, s = (int(ts.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        tests["failed"] += f; tests["errors"] += e; tests["skipped"] += s; tests["passed"] += t - f - e - s
except Exception as exc:  # no junit file: the tests did not run
    tests["errors"] = -1
    tests["note"] = f"no junit xml: {exc}"

record = {
    "kind": "flute device_check",
    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1"),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "nvcc": sh("nvcc --version | tail -1"),
    "commit": os.environ.get("FLUTE_COMMIT") or sh("git rev-parse HEAD") or "unknown",
    "dirty": bool(sh("git status --porcelain --untracked-files=no")),
    "build_rc": build_rc,
    "tests_rc": test_rc,
    "tests": tests,
    "timings": [],
}

import flute
record["has_cuda_kernel"] = bool(flute.HAS_CUDA_KERNEL)
if torch.cuda.is_available():
    from flute.layout import to_kernel_layout
    props = torch.cuda.get_device_properties(0)
    record["sms"] = props.multi_processor_count
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    record["l2_bytes"] = l2
    dev = "cuda"

    def bench(fn, args_list, reps=50, warmup=10):
        """Median of `reps` timed calls (CUDA events), rotating through the argument copies."""
        for i in range(warmup):
            fn(*args_list[i % len(args_list)])
        torch.cuda.synchronize()
        times = []
        for i in range(reps):
            a = args_list[i % len(args_list)]
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(*a); e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1000.0)
        return times

    # (N, K): two large shapes (Llama-3-8B MLP up/gate and a 70B-ish down-projection slice).
    for (n, k) in ((28672, 8192), (8192, 8192)):
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        copies16 = max(2, -(-3 * l2 // (n * k * 2)))
        ws16 = [w16] + [w16.clone() for _ in range(copies16 - 1)]
        for M in (1, 16):
            x = torch.randn(M, k, device=dev, dtype=torch.float16)
            t = bench(lambda x, w: torch.matmul(x, w.t()), [(x, w) for w in ws16])
            record["timings"].append({"impl": "torch.matmul fp16", "N": n, "K": k, "M": M,
                                      "median_us": statistics.median(t), "raw_us": t})
            print(f"fp16 matmul N={n} K={k} M={M}: {statistics.median(t):.1f} us", flush=True)
        del ws16
        for bits in (4, 3, 2):
            g = 128
            codes = torch.randint(0, 2 ** bits, (n, k), device=dev, dtype=torch.uint8)
            q = to_kernel_layout(codes, bits)
            scales = (torch.rand(n, k // g, device=dev) * 0.01 + 0.01).half()
            table = torch.randn(2 ** bits, device=dev)
            wbytes = q.numel() * 4 + scales.numel() * 2
            copies = max(2, -(-3 * l2 // wbytes))
            qs = [(q, scales)] + [(q.clone(), scales.clone()) for _ in range(copies - 1)]
            for M in (1, 16):
                x = torch.randn(M, k, device=dev, dtype=torch.float16)
                fn = lambda x, q, s: torch.ops.flute.qgemm(x, q, s, None, table, bits, g, k, n)
                try:
                    t = bench(fn, [(x, a, b) for a, b in qs])
                    med = statistics.median(t)
                    record["timings"].append({"impl": f"flute {bits}-bit g{g} fp16", "N": n, "K": k,
                                              "M": M, "bits": bits, "group": g, "copies": copies,
                                              "bytes": wbytes, "median_us": med,
                                              "gbps": wbytes / med / 1e3, "raw_us": t})
                    print(f"flute {bits}-bit N={n} K={k} M={M}: {med:.1f} us "
                          f"({wbytes / med / 1e3:.0f} GB/s)", flush=True)
                except Exception as exc:
                    record["timings"].append({"impl": f"flute {bits}-bit", "N": n, "K": k, "M": M,
                                              "error": str(exc)[:500]})
                    print("flute error:", str(exc)[:300], flush=True)
            del qs
        torch.cuda.empty_cache()

with open(os.path.join(out, "device_check.json"), "w") as f:
    json.dump(record, f, indent=1)
print("wrote", os.path.join(out, "device_check.json"), "tests:", tests)
PY
fi

# The full benchmark suite (owned by benchmarks/bench.py's author), if present.
if want bench; then
  log "benchmarks/bench.py --quick"
  FLUTE_BENCH_COMMIT=${FLUTE_COMMIT:-} timeout 180 $PY benchmarks/bench.py --quick --out "$OUT" \
    >"$LOGS/bench_quick.log" 2>&1
  log "bench.py rc=$?"
fi
log "done; results in $OUT"
[[ "$BUILD_RC" =~ ^(0|skipped)$ ]] && [[ "$TEST_RC" =~ ^(0|skipped)$ ]]
