// A/B timing of two versions of the int8-mode AVX2 kernel (csrc/cpu/kernel_int8_avx2.cpp) in one
// process, without rebuilding the extension: each version is compiled as its own translation unit
// under its own namespace and called on the same synthetic Int8Args (M = 1, bf16 scales, groups of
// 64, whole tiles), the two alternating call by call with the order reversed every round, weights
// rotated through more than the L3 size (copies > 1) or hot (copies = 1). Prints the medians and
// the median of the per-round ratios, and whether the two versions' outputs agree. Build and run
// with benchmarks/experiments/int8_kernel_ab.sh; an experiment tool (CPU_NOTES item 129).
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "lut_kernel.h"

extern "C" void run_a(const void* args, long t0, long t1);
extern "C" void run_b(const void* args, long t0, long t1);

// int8_kernel_ab BITS N K COPIES REPS
int main(int argc, char** argv) {
  if (argc < 6) { std::fprintf(stderr, "usage: %s BITS N K COPIES REPS\n", argv[0]); return 2; }
  const int bits = std::atoi(argv[1]), copies = std::atoi(argv[4]), reps = std::atoi(argv[5]);
  const int64_t N = std::atol(argv[2]), K = std::atol(argv[3]);
  const int P = bits == 4 ? 2 : 4, BB = bits == 3 ? 96 : 64, COLS = 64 * P;
  if (N % 4 || K % COLS) { std::fprintf(stderr, "N must be a multiple of 4, K of %d\n", COLS); return 2; }
  const int64_t nb = K / COLS, ng = K / 64;
  const size_t wbytes = size_t(N) * nb * BB, al = (wbytes + (2u << 20) - 1) / (2u << 20) * (2u << 20);
  srand(1);
  std::vector<uint8_t*> qw(copies);
  for (int c = 0; c < copies; ++c) {
    qw[c] = static_cast<uint8_t*>(std::aligned_alloc(2u << 20, al));
    madvise(qw[c], al, MADV_HUGEPAGE);
    if (c == 0) for (size_t i = 0; i < wbytes; ++i) qw[0][i] = uint8_t(rand());
    else std::memcpy(qw[c], qw[0], wbytes);
  }
  std::vector<uint16_t> sc(N * ng);
  for (auto& s : sc) s = uint16_t(0x3f80 + (rand() & 0x7f));  // bf16 in [1, 2)
  std::vector<int8_t> xq(nb * COLS);
  std::vector<int16_t> xc(nb * P * 16), xk(nb * P * 16);
  std::vector<float> xu(nb, 1e-3f), out_a(N), out_b(N);
  for (auto& v : xq) v = int8_t(rand() % 255 - 127);
  for (size_t i = 0; i < xc.size(); ++i) { xc[i] = int16_t(rand() % 1000); xk[i] = int16_t(1 + rand() % 100); }
  std::vector<int64_t> g0(nb);
  for (int64_t b = 0; b < nb; ++b) g0[b] = b * COLS / 64;
  std::vector<int32_t> gidx(nb * P * 8, 0);
  flute_cpu::Int8Args a{};
  a.bits = bits; a.N = N; a.nblocks = nb; a.M = 1; a.xq = xq.data(); a.xcorr = xc.data(); a.xk = xk.data();
  a.xu = xu.data(); a.merge = 2; a.scales = sc.data(); a.stype = flute_cpu::kBF16; a.ng = ng; a.G = 64;
  a.g0 = g0.data(); a.gidx = gidx.data();
  for (int i = 0; i < 16; ++i) a.tu[i] = uint8_t(40 + 5 * i);
  void (*fn[2])(const void*, long, long) = {run_a, run_b};
  std::vector<double> t[2], ratio;
  for (int r = 0; r < reps; ++r) {
    double tr[2];
    for (int k = 0; k < 2; ++k) {
      const int v = (r & 1) ? 1 - k : k;
      a.qw = qw[r % copies];
      a.out = v ? out_b.data() : out_a.data();
      const auto s = std::chrono::steady_clock::now();
      fn[v](&a, 0, N / 4);
      tr[v] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - s).count();
      t[v].push_back(tr[v]);
    }
    ratio.push_back(tr[1] / tr[0]);
  }
  for (auto& v : t) std::sort(v.begin(), v.end());
  std::sort(ratio.begin(), ratio.end());
  const double w = double(N) * K;
  std::printf("%d-bit %ldx%ld copies %d: A %.1f us (%.1f G weights/s), B %.1f us (%.1f), B/A per round: median %.3f "
              "[p10 %.3f, p90 %.3f], outputs %s\n", bits, long(N), long(K), copies, t[0][reps / 2], w / t[0][reps / 2] / 1e3,
              t[1][reps / 2], w / t[1][reps / 2] / 1e3, ratio[reps / 2], ratio[reps / 10], ratio[reps * 9 / 10],
              std::memcmp(out_a.data(), out_b.data(), N * sizeof(float)) == 0 ? "equal" : "DIFFER");
}
