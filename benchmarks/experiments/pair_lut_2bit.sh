#!/usr/bin/env bash
# Builds benchmarks/experiments/pair_lut_2bit.cpp against the shipped int8 AVX2 kernel and times both
# (2 bits, M = 1 and a few M = 4 / 16 points, groups of 64, weights rotated through DRAM) at 1 and 2
# threads; writes
# benchmarks/results/pair-lut-2bit-<host>-<date>.json. An experiment (CPU_NOTES item 129), not a test.
# Since item 131 the shipped int8 kernel has no 2-bit path (2 bits run on the pair layout): build it
# from revision 96068b4 to repeat this comparison.
#   bash benchmarks/experiments/pair_lut_2bit.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/../.."
reps=${1:-60}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
flags=(-O3 -std=c++17 -mavx2 -mfma -fopenmp -Icsrc/cpu)
# The shipped kernel, as setup.py compiles it, plus a C entry point and the one helper it takes from
# fused_gemm.cpp (bf16 rows for the buffered tail tiles).
cat > "$tmp/int8_entry.cpp" <<'CPP'
#include "kernel_int8_avx2.cpp"
namespace flute_cpu {
void bf16_to_f32_avx2(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) { uint32_t u = uint32_t(s[i]) << 16; std::memcpy(d + i, &u, 4); }
}
}  // namespace flute_cpu
extern "C" void run_int8(const void* a, long t0, long t1) {
  flute_cpu::gemm_int8_avx2(*static_cast<const flute_cpu::Int8Args*>(a), t0, t1);
}
CPP
g++ "${flags[@]}" -c "$tmp/int8_entry.cpp" -o "$tmp/int8.o" &
for c in 32 64; do g++ "${flags[@]}" -DCHUNK=$c -c benchmarks/experiments/pair_lut_2bit.cpp -o "$tmp/lut$c.o" & done
wait
for c in 32 64; do g++ -fopenmp "$tmp/lut$c.o" "$tmp/int8.o" -o "$tmp/lut$c"; done
out=benchmarks/results/pair-lut-2bit-$(hostname | cut -c1-12)-$(date -u +%Y%m%d-%H%M%S).json
{
  for threads in 1 2; do
    for shape in "1536 576" "576 1536" "8192 2048" "4096 4096" "14336 4096" "4096 14336"; do
      for c in 32 64; do OMP_PROC_BIND=close "$tmp/lut$c" $shape "$reps" "$threads"; done
    done
    for m in 4 16; do  # batches: one table per activation row
      for shape in "1536 576" "4096 4096"; do OMP_PROC_BIND=close "$tmp/lut32" $shape "$reps" "$threads" $m; done
    done
  done
} > "$tmp/runs.jsonl"
python3 - "$tmp/runs.jsonl" "$out" "$reps" <<'PY'
import json, platform, statistics, subprocess, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
for r in runs:
    r["pair_lut_median_us"] = statistics.median(r["pair_lut_us"])
    r["int8_kernel_median_us"] = statistics.median(r["int8_kernel_us"])
    r["ratio_median"] = statistics.median(a / b for a, b in zip(r["pair_lut_us"], r["int8_kernel_us"]))
    print(f"M={r['M']:<2} {r['N']:>5}x{r['K']:<5} T{r['threads']} chunk {r['chunk']}: pair-LUT {r['pair_lut_median_us']:8.1f} us, "
          f"int8 kernel {r['int8_kernel_median_us']:8.1f} us, per-round ratio {r['ratio_median']:.3f}, rel_err {r['rel_err']:.2e}")
json.dump({"what": "2-bit pair-LUT GEMV prototype vs the shipped int8 AVX2 kernel, g64, weights from DRAM "
                   "(benchmarks/experiments/pair_lut_2bit.cpp; the pair-LUT time includes building its table)",
           "commit": commit, "cpu_model": cpu, "command": "bash benchmarks/experiments/pair_lut_2bit.sh " + sys.argv[3],
           "runs": runs}, open(sys.argv[2], "w"), indent=1)
print("wrote", sys.argv[2])
PY
