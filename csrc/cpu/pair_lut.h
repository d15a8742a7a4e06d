// flute CPU kernels for 2 bits: the pair layout and its pair lookup tables (CPU_NOTES items 129-130).
//
// Plain C++ (no torch headers), included by kernel_pair_portable.cpp, kernel_pair_avx2.cpp and the
// binding; everything defined here has internal linkage, as in lut_kernel.h.
//
// Why a layout of its own: two adjacent columns' 2-bit codes make a 4-bit index, so for each pair
// of columns (x0, x1) of an activation row the 16 sums t[a] * x0 + t[b] * x1 can be built once per
// call, and one `vpshufb` then looks up 32 weight pairs at once (T-MAC's and bitnet.cpp's idea, for
// any 4-entry table). That needs the indices of one column pair for 16 rows side by side, which the
// 3/4-bit layout (4-row tiles, each row's block contiguous) does not have.
//
// The pair layout (flute/cpu_layout.py builds it): rows in tiles of 16 (N padded with code 0), K in
// chunks of 32 columns (K padded with code 0), stream [tile][chunk][step 0..3][32 bytes], 128 bytes
// per tile and chunk, 2 bits per weight. Byte 16 * L + i of step s (L = 0, 1; i = 0..15) is row i's
// index of pair 4s + L of the chunk in bits 0-3 and of pair 4s + 2 + L in bits 4-7, where pair p is
// the chunk's columns 2p (index bits 0-1) and 2p + 1 (bits 2-3). So row i's byte 16L + i of step s
// holds, from bit 0 up, the codes of the chunk's columns 8s + 2L, 8s + 2L + 1, 8s + 2L + 4 and
// 8s + 2L + 5.
//
// The pair tables (the int8 mode for 2 bits): per activation row and chunk, pair p's 16 entries
// v[e] = t[e & 3] * x[2p] + t[e >> 2] * x[2p + 1] (float32: two products, then their sum), rounded
// to int8 with the chunk's scale: q = round-to-nearest-even(v * (127 / mx)), mx = max |v| over the
// chunk's 16 pairs, scale lsc = mx / 127 (both float32 divisions). A chunk's 256 entries are in pair
// order ([chunk][pair][16]), so step s's two 32-byte table registers are pairs 4s, 4s + 1 (one per
// 128-bit half) and 4s + 2, 4s + 3, and the low and high nibbles of the step's 32 index bytes select
// from them. A row's result is, with exact integer sums of the chunk's 16 looked-up entries:
//   y = sum over groups g of scale[g] * (sum over chunks c in g of lsc[c] * isum[c]) + offsets . xsum
// in float32: f = fma(isum, lsc, f) chunk by chunk, acc = fma(f, scale, acc) when the group ends
// (and at the end of a K block), then the offsets' dot product with the exact group sums of x.
// flute.testing.reference_qgemm_int8 is the executable spec. Every path (portable, AVX2) makes the
// same float operations in the same order: their results are equal bit for bit, on any thread count.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lut_kernel.h"

namespace flute_cpu {

constexpr int kPairTileRows = 16;
constexpr int kPairChunkCols = 32;
constexpr int kPairChunkBytes = kPairTileRows * kPairChunkCols / 4;  // 128
constexpr int kPairLutBytes = 256;  // per activation row and chunk: 16 pairs x 16 entries
// The pair kernels' software prefetch distance in each weight stream (on this project's Zen 5 VM,
// 4096 x 4096 at M = 1 from DRAM: 2 KB 232-245 us, 4 KB 199-213, 8 KB 165-177, 16 KB 192-198;
// CPU_NOTES item 131). The first kPairPrefetchBytes of a stream no kernel prefetch covers: a
// one-row call's set-up starts them (pair_gemm).
constexpr int kPairPrefetchBytes = 8192;

struct PairArgs {
  const uint8_t* qw;      // pair layout
  int64_t N, K, chunks;   // chunks = K_pad / 32
  int64_t M;
  // the int8 mode (gemm_pair_*): tables [M][chunks][256] and their scales [M][chunks]
  const int8_t* lut;
  const float* lsc;
  // the exact mode (exact_pair_*): fp32 activations [M][chunks * 32], zero beyond K, and the table
  const float* x;
  const float* table;
  const int32_t* cg;      // [chunks] group of each chunk (groups are a multiple of 32 columns, or one)
  const void* scales;     // [N, ng] in stype
  const void* offsets;    // [N, ng] in stype or nullptr
  int stype;
  int64_t ng;
  const float* xsum;      // [M, ng] exact group sums of x (when offsets; the int8 mode only)
  int64_t kbc;            // chunks per K block (the tiles of a thread's range are taken K block by
                          // K block, so that the M rows' tables of one block stay in L2)
  float* out;             // [M, N] fp32
  bool tile_pairs = false;  // M = 1: tiles t and t + H of a range in one pass (cpu_tile_pairs)
};

// One activation row's pair tables: lut [chunks][256], lsc [chunks] from x [K] (fp32). False when x
// holds a NaN or an Inf (the caller then takes the exact path).
using PairLutFn = bool (*)(const float* x, int64_t K, int64_t chunks, const float* table, int8_t* lut, float* lsc);
// Tiles [t0, t1) of 16 rows.
using PairGemmFn = void (*)(const PairArgs&, int64_t t0, int64_t t1);

bool pair_lut_portable(const float*, int64_t, int64_t, const float*, int8_t*, float*);
void gemm_pair_portable(const PairArgs&, int64_t, int64_t);
void exact_pair_portable(const PairArgs&, int64_t, int64_t);
void decode_pair_portable(const DecodeArgs&, int64_t, int64_t);
#if defined(__x86_64__) || defined(_M_X64)
bool pair_lut_avx2(const float*, int64_t, int64_t, const float*, int8_t*, float*);
void gemm_pair_avx512(const PairArgs&, int64_t, int64_t);
// The tables in gemm_pair_avx512's order (kernel_pair_avx512.cpp: the same entries, see there).
bool pair_lut_avx512(const float*, int64_t, int64_t, const float*, int8_t*, float*);
void gemm_pair_avx2(const PairArgs&, int64_t, int64_t);
void exact_pair_avx2(const PairArgs&, int64_t, int64_t);
void decode_pair_avx2(const DecodeArgs&, int64_t, int64_t);
#endif

namespace {

// The factor that rounds a chunk's entries to int8: 127 / mx, or 0 for a chunk of zeros and for one
// whose max |entry| mx is so small (below 127 / FLT_MAX, ~3.7e-37) that the factor overflows; such a
// chunk's entries are then 0, as the spec (flute.testing.pair_tables) rounds them.
static inline float pair_lut_factor(float mx) {
  const float r = 127.f / mx;  // inf for mx = 0
  return mx > 0.f && r <= 3.4028235e38f ? r : 0.f;
}

static inline const uint8_t* pair_tile(const uint8_t* qw, int64_t chunks, int64_t t) {
  return qw + t * chunks * kPairChunkBytes;
}

// Chunk c's 32 activations for a table builder: x itself, or for the last chunk of a row whose K is
// not a multiple of 32, a copy into xt with zeros beyond K.
static inline const float* pair_chunk_x(const float* x, int64_t K, int64_t c, float* xt) {
  const float* xc = x + c * kPairChunkCols;
  if ((c + 1) * kPairChunkCols <= K) return xc;
  for (int k = 0; k < kPairChunkCols; ++k) xt[k] = c * kPairChunkCols + k < K ? xc[k] : 0.f;
  return xt;
}

// Code of row i (of its tile) at column w (0..31) of a chunk (cp: the tile's chunk, 128 bytes).
static inline int pair_code_at(const uint8_t* cp, int i, int w) {
  const int s = w >> 3, L = (w >> 1) & 1, hi = (w >> 2) & 1, odd = w & 1;
  return (cp[32 * s + 16 * L + i] >> (4 * hi + 2 * odd)) & 3;
}

// Tile t's scales (rows 16t .. 16t + 15 of the [N, ng] tensor: one contiguous span) as 64-byte
// lines for a software prefetch spread over the previous tile's chunk loop, a line per chunk: a
// tile reads its 16 rows' scales all at once when it starts, and with the scales in DRAM those
// misses stalled every tile (4096 x 4096, M = 1, 1 thread, AVX-512: 127-162 us with the scales in
// cache, 210-229 us with only the scales rotated through DRAM; prefetching the whole span one or
// four tiles ahead at the tile's start did not help; CPU_NOTES item 131). Lines 0 past the end.
struct ScaleLines {
  const char* p = nullptr;
  int64_t lines = 0;
};
static inline ScaleLines tile_scale_lines(const PairArgs& a, int64_t t) {
  const int64_t n0 = kPairTileRows * t, n1 = min64(a.N, n0 + kPairTileRows);
  ScaleLines r;
  if (n0 >= n1) return r;
  const int es = a.stype == kF32 ? 4 : 2;
  r.p = static_cast<const char*>(a.scales) + n0 * a.ng * es;
  r.lines = ((n1 - n0) * a.ng * es + 63) / 64;
  return r;
}

// Row n's scales (and offsets) as fp32 rows into sc / off [ng]; off zeros without offsets.
static inline void pair_row_scales(const DecodeArgs& a, int64_t n, float* sc, float* off) {
  load_row_f32(a.scales, a.stype, n, a.ng, sc);
  if (a.offsets) load_row_f32(a.offsets, a.stype, n, a.ng, off);
  else
    for (int64_t g = 0; g < a.ng; ++g) off[g] = 0.f;
}

// The offsets' part of the tile's rows: o[m][i] = sum over g of offsets[n][g] * xsum[m][g] (float32,
// in g order), rows n = 16t + i < N; zeros without offsets.
static inline void pair_offset_terms(const PairArgs& a, int64_t t, float* row_buf, float (*o)[kPairTileRows],
                                     int64_t m0, int64_t mc) {
  for (int64_t m = 0; m < mc; ++m)
    for (int i = 0; i < kPairTileRows; ++i) o[m][i] = 0.f;
  if (!a.offsets) return;
  for (int i = 0; i < kPairTileRows && kPairTileRows * t + i < a.N; ++i) {
    load_row_f32(a.offsets, a.stype, kPairTileRows * t + i, a.ng, row_buf);
    for (int64_t m = 0; m < mc; ++m) {
      const float* xs = a.xsum + (m0 + m) * a.ng;
      float s = 0.f;
      for (int64_t g = 0; g < a.ng; ++g) s += row_buf[g] * xs[g];
      o[m][i] = s;
    }
  }
}

template <int N>
struct IntC {  // a compile-time int for the generic lambdas below (no std:: templates in ISA units)
  static constexpr int value = N;
};
template <bool B>
struct BoolC {  // a compile-time bool, as IntC
  static constexpr bool value = B;
};

// The int8 mode's loop over tiles [t0, t1), shared by the SIMD units: K blocks of a.kbc chunks
// (outermost, so that the M rows' tables of a block stay in L2), then tiles; at M = 1 tiles t and
// t + H in one pass (two weight streams per thread, each table load serving both, as the 4-row
// AVX-512 int8 kernel reads two tiles, CPU_NOTES item 89), else one tile in passes of 2 and 1
// activation rows. scales(t, g0, g1, buf) fills a tile's transposed scales ([g1 - g0][16], buf
// rows of sstride floats); pass(IntC<MC>, IntC<NT>, t, dt, c0, c1, m0, sbuf, sstride, row_buf,
// next) runs MC activation rows of NT tiles t, t + dt over chunks [c0, c1) and prefetches the
// next tiles' scales (next[NT]) a line per chunk.
template <class Scales, class Pass>
static void pair_tile_loop(const PairArgs& a, int64_t t0, int64_t t1, int64_t sstride, const Scales& scales,
                           const Pass& pass) {
  FloatBuf row_buf(a.ng), sraw(2 * sstride + 16);
  float* sbuf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(sraw.data()) + 63) & ~uintptr_t(63));
  const int64_t H = a.M == 1 && a.tile_pairs ? (t1 - t0) / 2 : 0;
  for (int64_t c0 = 0; c0 < a.chunks; c0 += a.kbc) {
    const int64_t c1 = min64(a.chunks, c0 + a.kbc), g0 = a.cg[c0], g1 = a.cg[c1 - 1] + 1;
    for (int64_t t = t0; t < t0 + H; ++t) {
      const ScaleLines next[2] = {tile_scale_lines(a, t + 1), tile_scale_lines(a, t + H + 1)};
      scales(t, g0, g1, sbuf);
      scales(t + H, g0, g1, sbuf + sstride);
      pass(IntC<1>{}, IntC<2>{}, t, H, c0, c1, int64_t(0), sbuf, sstride, row_buf.data(), next);
    }
    for (int64_t t = t0 + 2 * H; t < t1; ++t) {
      const ScaleLines next[1] = {tile_scale_lines(a, t + 1)}, none[1] = {};
      scales(t, g0, g1, sbuf);
      int64_t m = 0;  // the next tile's scales prefetched in the first pass only
      for (; m + 2 <= a.M; m += 2)
        pass(IntC<2>{}, IntC<1>{}, t, int64_t(0), c0, c1, m, sbuf, int64_t(0), row_buf.data(), m == 0 ? next : none);
      if (m < a.M) pass(IntC<1>{}, IntC<1>{}, t, int64_t(0), c0, c1, m, sbuf, int64_t(0), row_buf.data(), m == 0 ? next : none);
    }
  }
}

// Rows [r0, r1) of a pair-layout decode (DecodeArgs: dst [rows, ld], fp32 or bf16): fn(tile pointer,
// row in the tile, the row's fp32 scales and offsets [ng], its fp32 and bf16 destination rows).
template <class F>
static void for_decode_rows(const DecodeArgs& a, int64_t r0, int64_t r1, const F& fn) {
  const int64_t chunks = a.K_pad / kPairChunkCols;
  FloatBuf sc(a.ng), off(a.ng);
  for (int64_t n = r0; n < r1; ++n) {
    pair_row_scales(a, n, sc.data(), off.data());
    fn(pair_tile(a.qw, chunks, n / kPairTileRows), static_cast<int>(n % kPairTileRows), sc.data(), off.data(),
       static_cast<float*>(a.dst) + (n - r0) * a.ld, static_cast<uint16_t*>(a.dst) + (n - r0) * a.ld);
  }
}

// The exact mode on the pair layout, shared by the ISA units (each compiles it with its own flags):
// per tile, K blocks of up to 8 chunks decoded (decode_chunk: a row's chunk into 32 fp32 weights,
// table value times scale plus offset, as the dequantized weight) into a 16 x 256 buffer, then each
// activation row's dot product with each weight row (8 partial sums in a fixed order) added to out.
template <typename DecodeChunk>
static void exact_pair_impl(const PairArgs& a, int64_t t0, int64_t t1, const DecodeChunk& decode_chunk) {
  constexpr int KB = 8;  // chunks per block
  FloatBuf sc(kPairTileRows * a.ng), off(kPairTileRows * a.ng), w(kPairTileRows * KB * kPairChunkCols);
  DecodeArgs d{};
  d.scales = a.scales;
  d.offsets = a.offsets;
  d.stype = a.stype;
  d.ng = a.ng;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = kPairTileRows * t;
    const int rows = static_cast<int>(min64(kPairTileRows, a.N - n0));
    for (int i = 0; i < rows; ++i) pair_row_scales(d, n0 + i, sc.data() + i * a.ng, off.data() + i * a.ng);
    for (int64_t m = 0; m < a.M; ++m)
      for (int i = 0; i < rows; ++i) a.out[m * a.N + n0 + i] = 0.f;
    const uint8_t* tp = pair_tile(a.qw, a.chunks, t);
    for (int64_t c0 = 0; c0 < a.chunks; c0 += KB) {
      const int64_t c1 = min64(a.chunks, c0 + KB), cols = (c1 - c0) * kPairChunkCols;
      for (int i = 0; i < rows; ++i)
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t g = a.cg[c];
          decode_chunk(tp + c * kPairChunkBytes, i, a.table, sc[i * a.ng + g], off[i * a.ng + g],
                       w.data() + i * KB * kPairChunkCols + (c - c0) * kPairChunkCols);
        }
      for (int64_t m = 0; m < a.M; ++m) {
        const float* xm = a.x + m * a.chunks * kPairChunkCols + c0 * kPairChunkCols;
        for (int i = 0; i < rows; ++i) {
          const float* wr = w.data() + i * KB * kPairChunkCols;
          float p[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          for (int64_t k = 0; k < cols; k += 8)
            for (int j = 0; j < 8; ++j) p[j] += xm[k + j] * wr[k + j];
          a.out[m * a.N + n0 + i] += ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
        }
      }
    }
  }
}

}  // namespace
}  // namespace flute_cpu
