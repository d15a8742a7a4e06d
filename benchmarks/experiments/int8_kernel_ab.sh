#!/usr/bin/env bash
# A/B of two versions of csrc/cpu/kernel_int8_avx2.cpp (ISA=avx512: kernel_int8_avx512.cpp) in one
# process (int8_kernel_ab.cpp), ~1 minute to build instead of rebuilding the extension. A and B are
# files or git revisions (REV:path is taken from git); the headers come from csrc/cpu of the working
# tree. A_FLAGS / B_FLAGS: extra compiler flags of one version (e.g. -DFLUTE_CPU_PREFETCH_BYTES=4096);
# THREADS: threads of each call (default 1); TILE_PAIRS=0: no tile pairs (the default on AMD CPUs);
# SCALES_HOT=1: every call reads the scales of copy 0 (cache-hot), the codes still rotated.
# READER=1: each round also times a plain read of as many bytes, and each version's share of the
# reader's rate is printed (over all rounds and over the half whose reader ran faster). The reader
# is one run per thread without software prefetch: on 0.5 MB at 2 threads of the Intel AMX VM it
# got 23-28 GB/s where two runs with a 4 KB prefetch got 32-34 (CPU_NOTES item 157).
#   [ISA=avx512] [THREADS=2] [READER=1] bash benchmarks/experiments/int8_kernel_ab.sh A B [BITS N K COPIES REPS]
# BITS 3 or 4 (since CPU_NOTES item 131 the kernel has no 2-bit path: 2 bits run on the pair layout).
#   e.g. bash benchmarks/experiments/int8_kernel_ab.sh HEAD csrc/cpu/kernel_int8_avx2.cpp 3 4096 14336 14 100
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
tmp=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] && cp "$tmp/ab" "$KEEP"; rm -rf "$tmp"' EXIT
isa=${ISA:-avx2}
flags=(-O3 -std=c++17 -mavx2 -mfma -fopenmp -Icsrc/cpu)
kernel=kernel_int8_avx2.cpp
if [ "$isa" = avx512 ]; then
  # as setup.py builds kernel_int8_avx512.cpp
  flags+=(-mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vbmi -mavx512vnni)
  kernel=kernel_int8_avx512.cpp
fi
prep='  (void)a;'
if [ "$isa" = avx512 ]; then
  # -DFLUTE_AB_COMPACT in a version's flags: the compact activations of long rows (Int8Args::xkq)
  prep='#ifdef FLUTE_AB_COMPACT
  auto* kq = new uint64_t[a.nblocks * 4];
  flute_cpu::int8_prepare_compact_avx512(a.bits, a.nblocks, const_cast<int8_t*>(a.xq), a.xk, kq);
  a.xkq = kq;
#else
  flute_cpu::int8_prepare_avx512(a.bits, a.merge, a.nblocks, const_cast<int8_t*>(a.xq), a.xk,
                                 const_cast<int16_t*>(a.xk2), const_cast<int32_t*>(a.xinit));
#endif'
fi
for v in a b; do
  src=$([ $v = a ] && echo "$1" || echo "$2")
  vflags=$([ $v = a ] && echo "${A_FLAGS:-}" || echo "${B_FLAGS:-}")
  if [ -f "$src" ]; then cp "$src" "$tmp/$v.cpp"; else git show "$src:csrc/cpu/$kernel" > "$tmp/$v.cpp"; fi
  cat >> "$tmp/$v.cpp" <<CPP
namespace flute_cpu {
void bf16_to_f32_avx2(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) { uint32_t u = uint32_t(s[i]) << 16; std::memcpy(d + i, &u, 4); }
}
// kernel_portable.cpp's; only the one-row quantizer (quantize_x_int8_avx512) uses it, never the harness
const int16_t* int8_positions(int) { __builtin_trap(); }
}  // namespace flute_cpu
extern "C" void run_$v(const void* a, long t0, long t1) {
  flute_cpu::gemm_int8_$isa(*static_cast<const flute_cpu::Int8Args*>(a), t0, t1);
}
extern "C" void prep_$v(void* p) {
  auto& a = *static_cast<flute_cpu::Int8Args*>(p);
$prep
}
CPP
  # each version in its own namespace: the kernels' internal-linkage helpers cannot collide
  # shellcheck disable=SC2086
  g++ "${flags[@]}" $vflags -Dflute_cpu=flute_ab_$v -c "$tmp/$v.cpp" -o "$tmp/$v.o" &
done
g++ "${flags[@]}" -c benchmarks/experiments/int8_kernel_ab.cpp -o "$tmp/main.o"
wait
g++ -fopenmp "$tmp/main.o" "$tmp/a.o" "$tmp/b.o" -o "$tmp/ab"
shift 2
if [ $# -ge 5 ]; then "$tmp/ab" "$@"; exit; fi
for bits in 3 4; do
  "$tmp/ab" $bits 256 4096 1 400            # hot (L2)
  "$tmp/ab" $bits 4096 14336 $((300 / (4096 * 14336 * bits / 8 / 1000000) + 1)) 100  # from DRAM
done
