// Experiment, not part of the extension: a 2-bit "pair lookup table" GEMV for AVX2, timed against
// the shipped int8-mode kernel (csrc/cpu/kernel_int8_avx2.cpp) in one process (benchmarks/CPU_NOTES.md
// item 129). Build and run with benchmarks/experiments/pair_lut_2bit.sh.
//
// Idea (T-MAC's and bitnet.cpp's TL kernels, for any 4-entry table): two adjacent columns of a 2-bit
// row form a 4-bit index, and for each such column pair the call builds the 16 sums
// t[a] * x0 + t[b] * x1 once, as int8 with one scale per CHUNK columns. One `vpshufb` then looks up
// 32 weight pairs at once (16 rows x 2 pairs), where the shipped kernel decodes codes to table
// values and multiplies them with the activations (~4x more vector operations per weight).
//
// Layout (derived from the canonical codes; here built by pack()): row tiles of 16; per tile and
// group of 64 columns, 8 steps of 32 bytes (step s covers pairs 4s .. 4s + 3): byte i of lane L is
// row i's index of pair 4s + L in bits 0-3 and of pair 4s + 2 + L in bits 4-7 (index = code of the
// even column + 4 * code of the odd one); then the 16 rows' bf16 group scales. 2 bits per weight plus
// the scales, as the shipped layout. The lookup table of step s is 64 bytes: the 16 entries of pairs
// 4s, 4s + 1 (one per 128-bit lane: register Tlo) and 4s + 2, 4s + 3 (Thi).
//
// M > 1 (gemm_pair_lut): one table per activation row; passes of 2 rows share each step's index split.
//
// Accumulation: the two lookups of a step (pairs 4s + L and 4s + 2 + L for the same 16 rows) are
// interleaved byte-wise (`vpunpck[lh]bw`) and summed pairwise into int16 by `vpmaddubsw` with ones
// (no correction term: the table entries are signed, the ones unsigned); int16 holds the sums of a
// chunk (<= 16 pairs x 127 per lane). Per chunk and 8 rows: the two lanes added, widened, converted
// and multiplied by the chunk's LUT scale and the rows' group scales (one FMA).
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "lut_kernel.h"

#ifndef CHUNK
#define CHUNK 32  // columns per LUT scale: 64 or 32
#endif
static_assert(CHUNK == 32 || CHUNK == 64, "one or two LUT scales per group of 64");
constexpr int kRows = 16, kSteps = 8, kChunks = 64 / CHUNK, kStepsPerChunk = kSteps / kChunks;
constexpr size_t kGroupBytes = kSteps * 32 + kRows * 2;  // codes + bf16 scales of one tile-group

extern "C" void run_int8(const void* args, long t0, long t1);  // the shipped kernel, see the .sh

static float bf2f(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static uint16_t f2bf(float f) { uint32_t u; std::memcpy(&u, &f, 4); return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16); }

static void pack(const uint8_t* codes, const uint16_t* sc, int64_t N, int64_t K, uint8_t* dst) {
  const int64_t ng = K / 64;
  for (int64_t t = 0; t < N / kRows; ++t)
    for (int64_t g = 0; g < ng; ++g) {
      uint8_t* p = dst + (t * ng + g) * kGroupBytes;
      for (int s = 0; s < kSteps; ++s)
        for (int lane = 0; lane < 2; ++lane)
          for (int i = 0; i < 16; ++i) {
            const uint8_t* row = codes + (t * kRows + i) * K + g * 64;
            auto idx = [&](int pair) { return row[2 * pair] | row[2 * pair + 1] << 2; };
            p[s * 32 + lane * 16 + i] = uint8_t(idx(4 * s + lane) | idx(4 * s + 2 + lane) << 4);
          }
      uint16_t* ps = reinterpret_cast<uint16_t*>(p + kSteps * 32);
      for (int i = 0; i < kRows; ++i) ps[i] = sc[(t * kRows + i) * ng + g];
    }
}

// lut [K / 64][8 steps][64 bytes], lsc [K / CHUNK]: entry e of pair p is round(v * 127 / max) with
// v = t[e & 3] * x[2p] + t[e >> 2] * x[2p + 1] and max the largest |v| of the pair's chunk.
static void build_lut(const float* x, const float* tab, int64_t K, int8_t* lut, float* lsc) {
  const __m256 tA = _mm256_setr_ps(tab[0], tab[1], tab[2], tab[3], tab[0], tab[1], tab[2], tab[3]);
  const __m256 tBl = _mm256_setr_ps(tab[0], tab[0], tab[0], tab[0], tab[1], tab[1], tab[1], tab[1]);
  const __m256 tBh = _mm256_setr_ps(tab[2], tab[2], tab[2], tab[2], tab[3], tab[3], tab[3], tab[3]);
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  alignas(32) float v[CHUNK / 2][16];
  for (int64_t c = 0; c < K / CHUNK; ++c) {
    __m256 mx = _mm256_setzero_ps();
    for (int p = 0; p < CHUNK / 2; ++p) {
      const __m256 x0 = _mm256_broadcast_ss(x + c * CHUNK + 2 * p), x1 = _mm256_broadcast_ss(x + c * CHUNK + 2 * p + 1);
      const __m256 a = _mm256_mul_ps(tA, x0);
      const __m256 lo = _mm256_fmadd_ps(tBl, x1, a), hi = _mm256_fmadd_ps(tBh, x1, a);
      _mm256_store_ps(v[p], lo);
      _mm256_store_ps(v[p] + 8, hi);
      mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_and_ps(lo, absm), _mm256_and_ps(hi, absm)));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float m = _mm_cvtss_f32(h);
    lsc[c] = m / 127.f;
    const __m256 inv = _mm256_set1_ps(m > 0 ? 127.f / m : 0.f);
    for (int p = 0; p < CHUNK / 2; p += 2) {  // pairs p, p + 1 (4s + j, j = 0 or 2): 32 bytes at 16 j
      auto q = [&](const float* f) { return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(f), inv)); };
      const __m256i b = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(q(v[p]), q(v[p] + 8)), _mm256_packs_epi32(q(v[p + 1]), q(v[p + 1] + 8))), perm);
      const int64_t pair = c * CHUNK / 2 + p;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lut + (pair / 4) * 64 + 16 * (pair % 4)), b);
    }
  }
}

static const uint16_t* g_scales;  // SCALES_IN_PLACE: the canonical [N, ng] bf16 scales

// Row tiles [t0, t1) into out.
static void gemv_pair_lut(const uint8_t* w, int64_t K, const int8_t* lut, const float* lsc, float* out, int64_t t0, int64_t t1) {
  const int64_t ng = K / 64;
  const __m256i m0F = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi8(1);
  for (int64_t t = t0; t < t1; ++t) {
    __m256 facc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // rows 0-7, 8-15
    for (int64_t g = 0; g < ng; ++g) {
      const uint8_t* p = w + (t * ng + g) * kGroupBytes;
      for (int i = 0; i < 5; ++i) _mm_prefetch(reinterpret_cast<const char*>(p) + 4096 + 64 * i, _MM_HINT_T0);
#ifdef SCALES_IN_PLACE
      // the rows' group scales gathered from the canonical [N, ng] bf16 tensor: the dword at each
      // scale's address holds it in its low half
      const char* sb = reinterpret_cast<const char*>(g_scales + (t * kRows) * ng + g);
      const __m256i rows8 = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int(2 * ng)));
      const __m256 ws[2] = {
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_i32gather_epi32(reinterpret_cast<const int*>(sb), rows8, 1), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_i32gather_epi32(reinterpret_cast<const int*>(sb + 16 * ng), rows8, 1), 16))};
#else
      const __m256 ws[2] = {  // the rows' group scales
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 256))), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 272))), 16))};
#endif
      __m256 f[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
#pragma GCC unroll 2
      for (int c = 0; c < kChunks; ++c) {
        __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 8
        for (int s = c * kStepsPerChunk; s < (c + 1) * kStepsPerChunk; ++s) {
          const int8_t* ls = lut + (g * kSteps + s) * 64;
          const __m256i Tlo = _mm256_load_si256(reinterpret_cast<const __m256i*>(ls));
          const __m256i Thi = _mm256_load_si256(reinterpret_cast<const __m256i*>(ls + 32));
          const __m256i code = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + s * 32));
          const __m256i r1 = _mm256_shuffle_epi8(Tlo, _mm256_and_si256(code, m0F));
          const __m256i r2 = _mm256_shuffle_epi8(Thi, _mm256_and_si256(_mm256_srli_epi16(code, 4), m0F));
          acc[0] = _mm256_add_epi16(acc[0], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(r1, r2)));
          acc[1] = _mm256_add_epi16(acc[1], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(r1, r2)));
        }
        const __m256 lsv = _mm256_broadcast_ss(lsc + g * kChunks + c);
        for (int h = 0; h < 2; ++h) {  // lane 0: even pairs, lane 1: odd pairs of the same 8 rows
          const __m128i s16 = _mm_add_epi16(_mm256_castsi256_si128(acc[h]), _mm256_extracti128_si256(acc[h], 1));
          f[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(s16)), lsv, f[h]);
        }
      }
      facc[0] = _mm256_fmadd_ps(f[0], ws[0], facc[0]);
      facc[1] = _mm256_fmadd_ps(f[1], ws[1], facc[1]);
    }
    _mm256_storeu_ps(out + t * kRows, facc[0]);
    _mm256_storeu_ps(out + t * kRows + 8, facc[1]);
  }
}

// M > 1 activation rows, in passes of MC rows: each pass re-reads the group's codes (from L1) and
// splits their indices once for its MC rows; one table per activation row (lut + m * lut_stride).
// facc [M][16] per tile lives in memory, updated once per group.
template <int MC>
static void pass_pair_lut(const uint8_t* p, const int8_t* lut, int64_t lut_stride, const float* lsc, int64_t lsc_stride,
                          int64_t g, const __m256 (&ws)[2], float (*facc)[16]) {
  const __m256i m0F = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi8(1);
  __m256 f[MC][2];
  for (auto& r : f) r[0] = r[1] = _mm256_setzero_ps();
#pragma GCC unroll 2
  for (int c = 0; c < kChunks; ++c) {
    __m256i acc[MC][2];
    for (auto& r : acc) r[0] = r[1] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int s = c * kStepsPerChunk; s < (c + 1) * kStepsPerChunk; ++s) {
      const __m256i code = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + s * 32));
      const __m256i lo = _mm256_and_si256(code, m0F), hi = _mm256_and_si256(_mm256_srli_epi16(code, 4), m0F);
      for (int m = 0; m < MC; ++m) {
        const int8_t* ls = lut + m * lut_stride + (g * kSteps + s) * 64;
        const __m256i r1 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(ls)), lo);
        const __m256i r2 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(ls + 32)), hi);
        acc[m][0] = _mm256_add_epi16(acc[m][0], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(r1, r2)));
        acc[m][1] = _mm256_add_epi16(acc[m][1], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(r1, r2)));
      }
    }
    for (int m = 0; m < MC; ++m) {
      const __m256 lsv = _mm256_broadcast_ss(lsc + m * lsc_stride + g * kChunks + c);
      for (int h = 0; h < 2; ++h) {
        const __m128i s16 = _mm_add_epi16(_mm256_castsi256_si128(acc[m][h]), _mm256_extracti128_si256(acc[m][h], 1));
        f[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(s16)), lsv, f[m][h]);
      }
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_ps(facc[m] + 8 * h, _mm256_fmadd_ps(f[m][h], ws[h], _mm256_loadu_ps(facc[m] + 8 * h)));
}

static void gemm_pair_lut(const uint8_t* w, int64_t N, int64_t K, int64_t M, const int8_t* lut, const float* lsc, float* out,
                          int64_t t0, int64_t t1) {
  const int64_t ng = K / 64, lut_stride = ng * 512, lsc_stride = K / CHUNK;
  alignas(32) float facc[64][16];
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m = 0; m < M; ++m)
      for (int i = 0; i < 16; ++i) facc[m][i] = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      const uint8_t* p = w + (t * ng + g) * kGroupBytes;
      for (int i = 0; i < 5; ++i) _mm_prefetch(reinterpret_cast<const char*>(p) + 4096 + 64 * i, _MM_HINT_T0);
      const __m256 ws[2] = {
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 256))), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 272))), 16))};
      int64_t m0 = 0;
      for (; m0 + 2 <= M; m0 += 2) pass_pair_lut<2>(p, lut + m0 * lut_stride, lut_stride, lsc + m0 * lsc_stride, lsc_stride, g, ws, facc + m0);
      if (m0 < M) pass_pair_lut<1>(p, lut + m0 * lut_stride, lut_stride, lsc + m0 * lsc_stride, lsc_stride, g, ws, facc + m0);
    }
    for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * N + t * kRows, facc[m], sizeof(facc[m]));
  }
}

static uint8_t* huge_buffer(size_t bytes) {
  const size_t al = (bytes + (2u << 20) - 1) / (2u << 20) * (2u << 20);
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(2u << 20, al));
  madvise(p, al, MADV_HUGEPAGE);
  return p;
}

// pair_lut_2bit N K REPS THREADS [M]: one JSON line (times in us, per round).
int main(int argc, char** argv) {
  if (argc < 5) { std::fprintf(stderr, "usage: %s N K REPS THREADS [M]\n", argv[0]); return 2; }
  const int64_t N = std::atol(argv[1]), K = std::atol(argv[2]);
  const int reps = std::atoi(argv[3]), threads = std::atoi(argv[4]);
  const int64_t M = argc > 5 ? std::atol(argv[5]) : 1;
  if (M < 1 || M > 64) { std::fprintf(stderr, "M in 1..64\n"); return 2; }
  if (N % kRows || K % 64) { std::fprintf(stderr, "N must be a multiple of 16, K of 64\n"); return 2; }
  omp_set_num_threads(threads);
  const int64_t ng = K / 64, nb = (K + 255) / 256;
  srand(1);
  std::vector<uint8_t> codes(N * K);
  for (auto& c : codes) c = rand() & 3;
  std::vector<uint16_t> sc(N * ng);
  for (auto& s : sc) s = f2bf(0.01f * (1 + (rand() % 100) / 50.f));
  const float tab[4] = {-1.f, -0.3f, 0.35f, 1.f};
  std::vector<float> x(M * K);
  for (auto& v : x) {  // N(0, 1) by Box-Muller
    const float u1 = (rand() + 1.f) / (RAND_MAX + 2.f), u2 = rand() / float(RAND_MAX);
    v = std::sqrt(-2 * std::log(u1)) * std::cos(6.2831853f * u2);
  }
  // Copies of each weight rotated through > 300 MB, so that every timed call reads DRAM.
  const size_t lbytes = (N / kRows) * ng * kGroupBytes, wbytes = size_t(N) * nb * 64;
  const int copies = int(std::max<int64_t>(1, 300000000 / int64_t(lbytes)));
  std::vector<uint8_t*> lw(copies), qw(copies);
  for (int c = 0; c < copies; ++c) {
    lw[c] = huge_buffer(lbytes);
    qw[c] = huge_buffer(wbytes);
    if (c == 0) {
      pack(codes.data(), sc.data(), N, K, lw[0]);
      for (size_t i = 0; i < wbytes; ++i) qw[0][i] = uint8_t(rand());  // the shipped kernel: timing only
    } else {
      std::memcpy(lw[c], lw[0], lbytes);
      std::memcpy(qw[c], qw[0], wbytes);
    }
  }
  g_scales = sc.data();
  int8_t* lut = static_cast<int8_t*>(std::aligned_alloc(64, M * ng * 512));
  std::vector<float> lsc(M * (K / CHUNK)), out(M * N), out8(M * N);
  // The shipped kernel's arguments for a whole-tile, bf16-scale, groups-of-64 call (its M = 1 path).
  std::vector<int8_t> xq(nb * M * 256);
  std::vector<int16_t> xc(nb * M * 64), xk(nb * M * 64);
  std::vector<float> xu(nb * M, 1e-3f);
  for (auto& v : xq) v = int8_t(rand() % 255 - 127);
  for (size_t i = 0; i < xc.size(); ++i) { xc[i] = int16_t(rand() % 1000); xk[i] = int16_t(1 + rand() % 100); }
  std::vector<int64_t> g0(nb);
  for (int64_t b = 0; b < nb; ++b) g0[b] = 4 * b;
  std::vector<int32_t> gidx(nb * 32, 0);
  flute_cpu::Int8Args a{};
  a.bits = 2; a.N = N; a.nblocks = nb; a.M = M; a.xq = xq.data(); a.xcorr = xc.data(); a.xk = xk.data(); a.xu = xu.data(); a.merge = 2;
  a.last_half = K - (nb - 1) * 256 <= 64;  // as fused_gemm.cpp sets it
  a.scales = sc.data(); a.stype = flute_cpu::kBF16; a.ng = ng; a.G = 64; a.g0 = g0.data(); a.gidx = gidx.data();
  for (int i = 0; i < 16; ++i) a.tu[i] = uint8_t(40 + 5 * i);
  a.out = out8.data();
  auto call_lut = [&](int c) {
    for (int64_t m = 0; m < M; ++m) build_lut(x.data() + m * K, tab, K, lut + m * ng * 512, lsc.data() + m * (K / CHUNK));
#pragma omp parallel
    {
      const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num(), tiles = N / kRows;
      if (M == 1) gemv_pair_lut(lw[c], K, lut, lsc.data(), out.data(), tiles * id / nt, tiles * (id + 1) / nt);
      else gemm_pair_lut(lw[c], N, K, M, lut, lsc.data(), out.data(), tiles * id / nt, tiles * (id + 1) / nt);
    }
  };
  auto call_int8 = [&](int c) {
    flute_cpu::Int8Args ac = a;
    ac.qw = qw[c];
#pragma omp parallel
    {
      const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num(), tiles = N / 4;
      run_int8(&ac, tiles * id / nt, tiles * (id + 1) / nt);
    }
  };
  call_lut(0);
  double num = 0, den = 0;  // against float64
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double y = 0;
      for (int64_t g = 0; g < ng; ++g) {
        double s = 0;
        for (int k = 0; k < 64; ++k) s += double(tab[codes[n * K + g * 64 + k]]) * x[m * K + g * 64 + k];
        y += s * bf2f(sc[n * ng + g]);
      }
      num += (out[m * N + n] - y) * (out[m * N + n] - y);
      den += y * y;
    }
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto us = [](auto d) { return std::chrono::duration<double, std::micro>(d).count(); };
  double tb = 0;
  for (int i = 0; i < 20; ++i) { const auto s = now(); build_lut(x.data(), tab, K, lut, lsc.data()); tb += us(now() - s); }
  std::vector<double> tl, t8;
  for (int r = 0; r < reps; ++r) {  // alternating, the order reversed every round
    for (int k = 0; k < 2; ++k) {
      const bool lut_first = (r & 1) == 0, run_lut = (k == 0) == lut_first;
      const auto s = now();
      if (run_lut) call_lut(r % copies); else call_int8(r % copies);
      (run_lut ? tl : t8).push_back(us(now() - s));
    }
  }
  std::printf("{\"M\": %ld, \"N\": %ld, \"K\": %ld, \"threads\": %d, \"chunk\": %d, \"copies\": %d, \"rel_err\": %.4e, \"lut_build_us\": %.2f, \"pair_lut_us\": [",
              long(M), long(N), long(K), threads, CHUNK, copies, std::sqrt(num / den), tb / 20);
  for (int r = 0; r < reps; ++r) std::printf("%s%.1f", r ? ", " : "", tl[r]);
  std::printf("], \"int8_kernel_us\": [");
  for (int r = 0; r < reps; ++r) std::printf("%s%.1f", r ? ", " : "", t8[r]);
  std::printf("]}\n");
}
