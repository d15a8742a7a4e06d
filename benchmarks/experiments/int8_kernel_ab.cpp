// A/B timing of two versions of an int8-mode kernel (csrc/cpu/kernel_int8_avx2.cpp, or with ISA=avx512
// kernel_int8_avx512.cpp) in one process, without rebuilding the extension: each version is compiled
// as its own translation unit under its own namespace and called on the same synthetic Int8Args
// (M = 1, bf16 scales, groups of 64, whole tiles), the two alternating call by call with the order
// reversed every round, codes and scales rotated through more than the L3 size (copies > 1) or hot
// (copies = 1). THREADS > 1 splits the tiles as the op's for_tiles does (dynamic chunks, OpenMP).
// Prints the medians and the median of the per-round ratios, and whether the two versions' outputs
// agree. READER=1: each round also times a plain read of as many bytes (XOR of 64-byte lines over a
// third rotation, the same threads), and the ratios are printed again for the rounds whose reader ran
// faster than its median: this VM's read rate drifts ~2x within minutes, and a change may only show
// when memory is fast (CPU_NOTES item 139). Build and run with benchmarks/experiments/int8_kernel_ab.sh; an experiment tool (CPU_NOTES
// items 129, 136).
#include <omp.h>
#include <sys/mman.h>

#include <atomic>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "lut_kernel.h"

extern "C" void run_a(const void* args, long t0, long t1);
extern "C" void run_b(const void* args, long t0, long t1);
extern "C" void prep_a(void* args);  // each version's own activation preparation (AVX-512: xk2, xinit,
extern "C" void prep_b(void* args);  // xq reordered), on its own copy of the activations

// Random bytes (identical pages could be merged by the host and read from cache).
static uint8_t* huge_alloc(size_t bytes) {
  const size_t al = (bytes + (2u << 20) - 1) / (2u << 20) * (2u << 20);
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(2u << 20, al));
  madvise(p, al, MADV_HUGEPAGE);
  return p;
}

// The op's for_tiles (binding.h): dynamic chunks, up to 8 per thread, of at least 4 grains.
static void for_tiles(int nt, int64_t tiles, int64_t grain, void (*fn)(const void*, long, long), const void* a) {
  const int64_t per = std::min<int64_t>(8, tiles / (nt * 4 * grain));
  if (nt <= 1 || per < 2) {
#pragma omp parallel num_threads(nt)
    {
      const int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
      fn(a, tiles * i / n, tiles * (i + 1) / n);
    }
    return;
  }
  const int64_t chunk = (tiles + nt * per - 1) / (nt * per);
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  for (int64_t t0 = next.fetch_add(chunk); t0 < tiles; t0 = next.fetch_add(chunk))
    fn(a, t0, std::min(tiles, t0 + chunk));
}

// XOR of the 64-byte lines of [p, p + bytes), split among nt threads: the reader of READER=1.
static uint64_t read_lines(int nt, const uint8_t* p, size_t bytes) {
  uint64_t total = 0;
#pragma omp parallel num_threads(nt) reduction(^ : total)
  {
    const size_t n = bytes / 64, i = omp_get_thread_num(), k = omp_get_num_threads();
    uint64_t acc[8] = {0};
    for (size_t l = n * i / k; l < n * (i + 1) / k; ++l)
      for (int j = 0; j < 8; ++j) acc[j] ^= reinterpret_cast<const uint64_t*>(p + 64 * l)[j];
    for (int j = 0; j < 8; ++j) total ^= acc[j];
  }
  return total;
}

// Median of v (copied).
static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0. : v[v.size() / 2];
}

// int8_kernel_ab BITS N K COPIES REPS
int main(int argc, char** argv) {
  if (argc < 6) { std::fprintf(stderr, "usage: %s BITS N K COPIES REPS\n", argv[0]); return 2; }
  const int bits = std::atoi(argv[1]), copies = std::atoi(argv[4]), reps = std::atoi(argv[5]);
  const int64_t N = std::atol(argv[2]), K = std::atol(argv[3]);
  const int P = bits == 4 ? 2 : 4, BB = bits == 3 ? 96 : 64, COLS = 64 * P;
  if (N % 4 || K % COLS) { std::fprintf(stderr, "N must be a multiple of 4, K of %d\n", COLS); return 2; }
  const int64_t nb = K / COLS, ng = K / 64;
  const char* th = std::getenv("THREADS");
  const int nt = th ? std::atoi(th) : 1;
  const size_t wbytes = size_t(N) * nb * BB;
  srand(1);
  std::vector<uint8_t*> qw(copies);
  std::vector<uint16_t*> sc(copies);
  for (int c = 0; c < copies; ++c) {
    qw[c] = huge_alloc(wbytes);
    sc[c] = reinterpret_cast<uint16_t*>(huge_alloc(N * ng * 2));
    for (size_t i = 0; i < wbytes; ++i) qw[c][i] = uint8_t(rand());
    for (int64_t i = 0; i < N * ng; ++i) sc[c][i] = uint16_t(0x3f80 + (rand() & 0x7f));  // bf16 in [1, 2)
  }
  const bool scales_hot = std::getenv("SCALES_HOT") && std::atoi(std::getenv("SCALES_HOT")) == 1;
  const bool reader = std::getenv("READER") && std::atoi(std::getenv("READER")) == 1;
  const size_t rbytes = wbytes + size_t(N) * ng * 2;
  std::vector<uint8_t*> rbuf(reader ? copies : 0);
  for (auto& b : rbuf) {
    b = huge_alloc(rbytes);
    for (size_t i = 0; i < rbytes; ++i) b[i] = uint8_t(rand());
  }
  std::vector<double> tread;
  uint64_t sink = 0;
  std::vector<int8_t> xq(nb * COLS);
  std::vector<int16_t> xc(nb * P * 16), xk(nb * P * 16), xk2(nb * P * 32);
  std::vector<int32_t> xinit(nb * 32);
  std::vector<float> xu(nb, 1e-3f), out_a(N), out_b(N);
  for (auto& v : xq) v = int8_t(rand() % 255 - 127);
  // chunk factors as the quantizer writes them (Int8Args::xk): int16 hw of part p holds the factor
  // of chunk (P * ((hw & 7) / 2) + p) % C of its block
  for (int64_t b = 0; b < nb; ++b) {
    int16_t kc[8];
    for (auto& v : kc) v = int16_t(1 + rand() % 100);
    for (int p = 0; p < P; ++p)
      for (int hw = 0; hw < 16; ++hw) xk[(b * P + p) * 16 + hw] = kc[(P * ((hw & 7) / 2) + p) % (2 * P)];
  }
  // the AVX2 kernel's corrections, as the quantizer writes them (Int8Args::xcorr): 64 * the sum of
  // bytes 2w, 2w + 1 of half h of both registers of part p
  for (int64_t b = 0; b < nb; ++b)
    for (int p = 0; p < P; ++p)
      for (int hw = 0; hw < 16; ++hw) {
        int sum = 0;
        for (int reg = 0; reg < 2; ++reg)
          for (int e = 0; e < 2; ++e) sum += xq[b * COLS + (reg * P + p) * 32 + (hw / 8) * 16 + 2 * (hw % 8) + e];
        xc[(b * P + p) * 16 + hw] = int16_t(64 * sum);
      }
  std::vector<int64_t> g0(nb);
  for (int64_t b = 0; b < nb; ++b) g0[b] = b * COLS / 64;
  std::vector<int32_t> gidx(nb * P * 8, 0);
  flute_cpu::Int8Args a{};
  a.bits = bits; a.N = N; a.nblocks = nb; a.M = 1; a.xq = xq.data(); a.xcorr = xc.data(); a.xk = xk.data();
  a.xu = xu.data(); a.merge = 2; a.scales = sc[0]; a.stype = flute_cpu::kBF16; a.ng = ng; a.G = 64;
  a.g0 = g0.data(); a.gidx = gidx.data();
  a.tile_bytes = flute_cpu::layout_tile_bytes(bits, K, nb);  // the layout's tile stride (binding.cpp sets it so)
  for (int i = 0; i < 16; ++i) a.tu[i] = uint8_t(40 + 5 * i);
  a.tile_pairs = !(std::getenv("TILE_PAIRS") && std::atoi(std::getenv("TILE_PAIRS")) == 0);  // as on Intel
  a.xk2 = xk2.data();
  a.xinit = xinit.data();
  flute_cpu::Int8Args av[2] = {a, a};
  std::vector<int8_t> xq_b(xq);
  std::vector<int16_t> xk2_b(xk2.size());
  std::vector<int32_t> xinit_b(xinit.size());
  av[1].xq = xq_b.data();
  av[1].xk2 = xk2_b.data();
  av[1].xinit = xinit_b.data();
  prep_a(&av[0]);
  prep_b(&av[1]);
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / 4 / K);  // the op's task_weights() default
  void (*fn[2])(const void*, long, long) = {run_a, run_b};
  std::vector<double> t[2], ratio;
  for (int r = 0; r < reps; ++r) {
    double tr[2];
    for (int k = 0; k < 2; ++k) {
      const int v = (r & 1) ? 1 - k : k;
      flute_cpu::Int8Args& a = av[v];
      a.qw = qw[(2 * r + k) % copies];
      a.scales = sc[scales_hot ? 0 : (2 * r + k) % copies];
      a.out = v ? out_b.data() : out_a.data();
      const auto s = std::chrono::steady_clock::now();
      for_tiles(nt, N / 4, grain, fn[v], &a);
      tr[v] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - s).count();
      t[v].push_back(tr[v]);
    }
    ratio.push_back(tr[1] / tr[0]);
    if (reader) {
      const auto s = std::chrono::steady_clock::now();
      sink ^= read_lines(nt, rbuf[r % copies], rbytes);
      tread.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - s).count());
    }
  }
  for (int v = 0; v < 2; ++v) {  // outputs compared on one copy (each copy has its own random codes)
    flute_cpu::Int8Args& a = av[v];
    a.qw = qw[0];
    a.scales = sc[0];
    a.out = v ? out_b.data() : out_a.data();
    for_tiles(nt, N / 4, grain, fn[v], &a);
  }
  if (reader) {  // per round: each version's time over the reader's, all rounds and the fast half
    const double rmed = median(tread);
    std::vector<double> fa, fb, fr, aa, ab_;
    for (int r = 0; r < reps; ++r) {
      aa.push_back(tread[r] / t[0][r]);
      ab_.push_back(tread[r] / t[1][r]);
      if (tread[r] < rmed) {
        fa.push_back(tread[r] / t[0][r]);
        fb.push_back(tread[r] / t[1][r]);
        fr.push_back(ratio[r]);
      }
    }
    std::vector<double> fast_t;
    for (double x : tread)
      if (x < rmed) fast_t.push_back(x);
    std::printf("reader %.1f GB/s median (fast half %.1f); share of the reader's rate: A %.3f B %.3f all rounds, "
                "A %.3f B %.3f fast half (B/A there %.3f) [%lx]\n", rbytes / rmed / 1e3, rbytes / median(fast_t) / 1e3,
                median(aa), median(ab_), median(fa), median(fb), median(fr), static_cast<unsigned long>(sink & 1));
  }
  for (auto& v : t) std::sort(v.begin(), v.end());
  std::sort(ratio.begin(), ratio.end());
  const double w = double(N) * K;
  std::printf("%d-bit %ldx%ld copies %d threads %d: A %.1f us (%.1f G weights/s), B %.1f us (%.1f), B/A per round: median %.3f "
              "[p10 %.3f, p90 %.3f], outputs %s\n", bits, long(N), long(K), copies, nt, t[0][reps / 2], w / t[0][reps / 2] / 1e3,
              t[1][reps / 2], w / t[1][reps / 2] / 1e3, ratio[reps / 2], ratio[reps / 10], ratio[reps * 9 / 10],
              std::memcmp(out_a.data(), out_b.data(), N * sizeof(float)) == 0 ? "equal" : "DIFFER");
}
