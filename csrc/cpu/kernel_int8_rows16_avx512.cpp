// flute CPU kernel, the int8 mode for several activation rows (Rows16Args in lut_kernel.h), 3 and 4
// bits, AVX-512 with VBMI and VNNI. The 4-row kernels (kernel_int8_avx512.cpp) put K along the vector:
// every activation row redoes the lookups and the multiply-adds of `vpmaddubsw` + `vpdpwssd`, so at
// 16 rows they ran at 0.41-0.44x torch's bf16 matmul on a Zen 5 (CPU_NOTES item 131). Here the
// vector holds 16 weight rows instead, each dword 4 consecutive columns of one chunk, so one
// decoded weight vector serves every activation row through one `vpdpbusd` with the row's 4
// activation bytes broadcast: 64 multiply-adds per instruction and row, the lookups done once.
//
// 4-bit decode of a K block (128 columns) of 16 weight rows (the layout's 4-row tiles 4T .. 4T + 3), from
// the layout as it is (lut_kernel.h): row n's block is 16 dwords; dword j holds in its bytes
// b0 = (chunk 0, column 2j | chunk 1, column 2j) as low | high nibble, b1 = chunks 2 | 3 at 2j,
// b2 = chunks 0 | 1 at 2j + 1, b3 = chunks 2 | 3 at 2j + 1. So bytes b0, b2 of dwords 2i and
// 2i + 1 are the codes of columns 4i .. 4i + 3 of chunks 0 (low nibbles) and 1 (high), in column
// order, and bytes b1, b3 those of chunks 2 and 3.
// - The 16 rows' 64-byte blocks are transposed as 8-byte units (two 8 x 8 qword transposes, 48
//   shuffles): register i of rows 0-7 and of rows 8-15 hold each row's dwords 2i, 2i + 1.
// - One `vpermt2b` per byte parity then picks, for each row n, its 4 bytes b0, b2 (or b1, b3) of
//   those two dwords into dword n: codes of chunks 0 | 1 (or 2 | 3), columns 4i .. 4i + 3.
// - `vpermb` looks the low nibbles up in a 64-entry table (index bits 4-5 ignored by the table,
//   6-7 by the instruction), and the high nibbles after a 16-bit shift by 4.
// A block decodes to 32 weight vectors (2 KB) in ~110 instructions (3 bits: Decoder<3>), stored to
// an L1 buffer of kRangeCols columns; the activation rows then run over it in passes of up to 16
// (one float accumulator each: 16 + 8 weight vectors + temporaries fit the 32 registers).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "avx512_common.h"
#include "int8_tiles.h"
#include "lut_kernel.h"
#include "pair_lut.h"
#include "tile16_avx512.h"

namespace flute_cpu {
namespace {

constexpr int kRows = 16;
constexpr int kRangeCols = 1024;  // K columns decoded at once: 16 KB of weight vectors, in L1
constexpr int64_t kBlockRows = 64;                 // activation rows per block (rows16_tiles)
constexpr int64_t kBlockBytes = int64_t(1) << 20;  // most int8 activation data per block
// The weight streams are prefetched kStreamPrefetchBytes ahead (3 and 4 bits: Streams) or
// kPrefetchBytes (2 bits, one stream per tile: Decoder<2>), and each tile's scales one tile ahead.

// Rows 0-7 (or 8-15) of a block, 8 qwords each, transposed: o[i] = qword i of the 8 rows.
inline void transpose8x8_qwords(const __m512i* r, __m512i* o) {
  __m512i t[8];
  for (int k = 0; k < 4; ++k) {  // 128-bit lane L of t[2k + h]: rows 2k, 2k + 1, qword 2L + h
    t[2 * k] = _mm512_unpacklo_epi64(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi64(r[2 * k], r[2 * k + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // a 4 x 4 transpose of 128-bit lanes among t[h], t[2 + h], ...
    const __m512i u0 = _mm512_shuffle_i64x2(t[h], t[2 + h], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i u1 = _mm512_shuffle_i64x2(t[h], t[2 + h], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512i u2 = _mm512_shuffle_i64x2(t[4 + h], t[6 + h], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i u3 = _mm512_shuffle_i64x2(t[4 + h], t[6 + h], _MM_SHUFFLE(3, 1, 3, 1));
    o[h] = _mm512_shuffle_i64x2(u0, u2, _MM_SHUFFLE(2, 0, 2, 0));      // qword h (lane 0 of each t)
    o[2 + h] = _mm512_shuffle_i64x2(u1, u3, _MM_SHUFFLE(2, 0, 2, 0));  // lane 1
    o[4 + h] = _mm512_shuffle_i64x2(u0, u2, _MM_SHUFFLE(3, 1, 3, 1));  // lane 2
    o[6 + h] = _mm512_shuffle_i64x2(u1, u3, _MM_SHUFFLE(3, 1, 3, 1));  // lane 3
  }
}

// Each of a 16-row tile's 4 weight streams (3 and 4 bits) is prefetched this far ahead: 8 KB in
// flight in all, as the one-row kernel's single stream (int8_tiles.h). With kPrefetchBytes (8 KB)
// in each stream, calls of 4 to 16 rows from DRAM took up to 1.2 times as long (CPU_NOTES item 278).
constexpr int64_t kStreamPrefetchBytes = 2048;

// The 16 rows' streams of one K block: load(n, off) reads bytes of row n's block (zeros past
// N_pad), with the prefetch kStreamPrefetchBytes ahead in each of the 4 layout tiles' streams, into the
// next 16-row tile's streams (next) near the end of a row: a tile's 4 streams lie nb * block bytes
// apart, so a plain 8 KB ahead would fetch the lines the next stream is reading now whenever they
// are that close (4 bits, K <= 4096: 4096 x 4096 at M = 1 read DRAM at ~11 GB/s that way).
template <int BITS>
struct Streams {
  static constexpr int64_t kRowBytes = (BITS == 4 ? 128 : 256) * BITS / 8;  // a row's block: 64 or 96 bytes
  static constexpr int64_t kBlockBytes = 4 * kRowBytes;                       // the 4-row tile's
  const uint8_t* p[4];
  Streams(const uint8_t* const* tiles, const uint8_t* const* next, int64_t b, int64_t nb) {
    constexpr int64_t D = std::max<int64_t>(1, kStreamPrefetchBytes / kBlockBytes);
    for (int j = 0; j < 4; ++j) {
      p[j] = tiles[j] ? tiles[j] + b * kBlockBytes : nullptr;
      const uint8_t* pf = !tiles[j] ? nullptr : b + D < nb ? p[j] + D * kBlockBytes
                                              : next[j] ? next[j] + (b + D - nb) * kBlockBytes : nullptr;
      if (pf)
        for (int l = 0; l < kBlockBytes / 64; ++l) _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * l), _MM_HINT_T0);
    }
  }
  __m512i row64(int n, int off) const {
    return p[n / 4] ? _mm512_loadu_si512(p[n / 4] + (n % 4) * kRowBytes + off) : _mm512_setzero_si512();
  }
  __m256i row32(int n, int off) const {
    return p[n / 4] ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[n / 4] + (n % 4) * kRowBytes + off))
                    : _mm256_setzero_si256();
  }
};

// The decoders: block b of the 16 rows into w[c * 8 + k], chunk c of the block, weight vector k
// (lane n: row n's u = t7 + 64 of the chunk's 4 columns that activation dword k of the chunk holds,
// rows16_col in int8_gemm.cpp).
template <int BITS>
struct Decoder;

// 4 bits (see the top of the file): k = i, columns 4i .. 4i + 3 in order.
template <>
struct Decoder<4> {
  __m512i table, pick_even, pick_odd;
  explicit Decoder(const uint8_t* tu) {
    alignas(64) uint8_t t[64], e[64], o[64];
    for (int i = 0; i < 64; ++i) {
      t[i] = tu[i & 15];
      const int n = i / 4, b = i % 4;  // dword n of the result: row n's bytes 0, 2, 4, 6 of its qword
      e[i] = static_cast<uint8_t>((n < 8 ? 0 : 64) + 8 * (n % 8) + 2 * b);
      o[i] = static_cast<uint8_t>(e[i] + 1);
    }
    table = _mm512_load_si512(t);
    pick_even = _mm512_load_si512(e);
    pick_odd = _mm512_load_si512(o);
  }
  void block(const Streams<4>& st, __m512i* w) const {
    __m512i r[kRows], lo[8], hi[8];
    for (int n = 0; n < kRows; ++n) r[n] = st.row64(n, 0);
    transpose8x8_qwords(r, lo);
    transpose8x8_qwords(r + 8, hi);
    for (int i = 0; i < 8; ++i) {
      const __m512i ev = _mm512_permutex2var_epi8(lo[i], pick_even, hi[i]);
      const __m512i od = _mm512_permutex2var_epi8(lo[i], pick_odd, hi[i]);
      _mm512_store_si512(w + 0 * 8 + i, _mm512_permutexvar_epi8(ev, table));
      _mm512_store_si512(w + 1 * 8 + i, _mm512_permutexvar_epi8(_mm512_srli_epi16(ev, 4), table));
      _mm512_store_si512(w + 2 * 8 + i, _mm512_permutexvar_epi8(od, table));
      _mm512_store_si512(w + 3 * 8 + i, _mm512_permutexvar_epi8(_mm512_srli_epi16(od, 4), table));
    }
  }
};

// 2 bits, on the pair layout (pair_lut.h): one stream per 16-row tile, [chunk][step s][32 bytes];
// byte 16 L + n of step s holds row n's codes of the chunk's columns 8s + 2L, 8s + 2L + 1,
// 8s + 2L + 4, 8s + 2L + 5 at bits 0-1, 2-3, 4-5, 6-7: weight vector k = 2s + L, lane n, is that
// byte spread over 4 bytes (`vpermb`), each shifted to its field (`vpmultishiftqb`, per byte bit
// offset 8b + 2 (b % 4) of its qword) and looked up (a table of tu[x & 3]): 3 instructions a vector,
// no transpose. A block is 8 chunks (256 columns, the int8 activations' block), each prefetched
// kPrefetchBytes ahead in the stream.
template <>
struct Decoder<2> {
  __m512i table, spread[2], shift;
  explicit Decoder(const uint8_t* tu) {
    alignas(64) uint8_t t[64], sp[2][64], sh[64];
    for (int i = 0; i < 64; ++i) {
      t[i] = tu[i & 3];
      for (int L = 0; L < 2; ++L) sp[L][i] = static_cast<uint8_t>(16 * L + i / 4);
      sh[i] = static_cast<uint8_t>(8 * (i % 8) + 2 * (i % 4));
    }
    table = _mm512_load_si512(t);
    spread[0] = _mm512_load_si512(sp[0]);
    spread[1] = _mm512_load_si512(sp[1]);
    shift = _mm512_load_si512(sh);
  }
  // Chunks [c0, c1) of the tile at tp into w[(c - c0) * 8 + k].
  void chunks(const uint8_t* tp, int64_t c0, int64_t c1, __m512i* w) const {
    for (int64_t c = c0; c < c1; ++c, w += 8) {
      const uint8_t* p = tp + c * kPairChunkBytes;
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + 64), _MM_HINT_T0);
      for (int half = 0; half < 2; ++half) {  // steps 2 half, 2 half + 1
        const __m512i v = _mm512_loadu_si512(p + 64 * half);
        for (int k = 0; k < 4; ++k) {  // k = 2 (s % 2) + L: bytes 32 (s % 2) + 16 L + n
          __m512i idx = spread[k % 2];
          if (k >= 2) idx = _mm512_add_epi8(idx, _mm512_set1_epi8(32));
          const __m512i f = _mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(idx, v));
          _mm512_store_si512(w + 4 * half + k, _mm512_permutexvar_epi8(f, table));
        }
      }
    }
  }
};

// 3 bits: a row's block is R0 | R1 | R2 (flute/cpu_layout.py), each 32 bytes in the int8 kernel's
// byte order: byte 16h + 4q + i holds, for part p (R0: p = 0, R1: p = 1, R2 with the spare bits of
// R0 and R1: p = 2, 3) and half reg (low or high nibble), the code of lane j = 8 reg + 4h + i,
// slot s = 4q + p, i.e. column 32 (s % 8) + 2j + s / 8. So each dword (h, q) of a register holds
// for each (p, reg) 4 columns of one chunk c = s % 8 (parity e = s / 8, stride 2): weight vector
// k = 4e + 2 reg + h of chunk c. The 16 rows' R0 | R1 are transposed as dwords (64 shuffles), R2
// likewise (32), and each (h, q) gives 8 weight vectors by the layout's four index forms (the
// tables of int8_table_entry<3>: A, B from R0, R1 directly, C and D after one bit select).
template <>
struct Decoder<3> {
  __m512i ta, tb, tc, td;
  explicit Decoder(const uint8_t* tu) {
    alignas(64) uint8_t t[4][64];
    for (int which = 0; which < 4; ++which)
      for (int i = 0; i < 64; ++i) t[which][i] = int8_table_entry<3>(tu, which, i);
    ta = _mm512_load_si512(t[0]);
    tb = _mm512_load_si512(t[1]);
    tc = _mm512_load_si512(t[2]);
    td = _mm512_load_si512(t[3]);
  }
  void block(const Streams<3>& st, __m512i* w) const {
    __m512i r[kRows], t01[16], t2[8];
    __m256i r2[kRows];
    for (int n = 0; n < kRows; ++n) {
      r[n] = st.row64(n, 0);
      r2[n] = st.row32(n, 64);
    }
    transpose16x16_epi32(r, t01);  // t01[4h + q]: R0's dword (h, q); t01[8 + 4h + q]: R1's
    transpose16x8_epi32(r2, t2);
    const __m512i m88 = _mm512_set1_epi8(static_cast<char>(0x88)), m11 = _mm512_set1_epi8(0x11);
    for (int h = 0; h < 2; ++h)
      for (int q = 0; q < 4; ++q) {
        const __m512i R0 = t01[4 * h + q], R1 = t01[8 + 4 * h + q], R2 = t2[4 * h + q];
        const __m512i c = _mm512_ternarylogic_epi32(m88, R0, R2, 0xCA);  // R0's bits 3, 7, R2's others
        const __m512i d = _mm512_ternarylogic_epi32(m11, R1, R2, 0xCA);  // R1's bits 0, 4, R2's others
        const __m512i src[4] = {R0, R1, c, d}, tab[4] = {ta, tb, tc, td};
        for (int p = 0; p < 4; ++p) {
          const int s = 4 * q + p, ch = s % 8, e = s / 8;
          _mm512_store_si512(w + ch * 8 + 4 * e + h, _mm512_permutexvar_epi8(src[p], tab[p]));
          _mm512_store_si512(w + ch * 8 + 4 * e + 2 + h,
                             _mm512_permutexvar_epi8(_mm512_srli_epi16(src[p], 4), tab[p]));
        }
      }
  }
};

// MC activation rows from m0 over global chunks [c0, c1) (w: their weight vectors, 8 per chunk;
// sbuf: the tile's scales [ng][16]); accumulators in acc [MC][16].
template <int MC>
void rows_pass(const Rows16Args& a, const __m512i* w, int64_t c0, int64_t c1, int64_t m0, const float* sbuf,
               float* acc_mem) {
  const int64_t cs = a.nblocks * (a.bits == 4 ? 4 : 8), xs = a.x8_stride;  // per-chunk and x8 row strides
  __m512 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm512_load_ps(acc_mem + 16 * m);
  for (int64_t c = c0; c < c1; ++c, w += 8) {
    const __m512i w0 = _mm512_load_si512(w), w1 = _mm512_load_si512(w + 1), w2 = _mm512_load_si512(w + 2),
                  w3 = _mm512_load_si512(w + 3), w4 = _mm512_load_si512(w + 4), w5 = _mm512_load_si512(w + 5),
                  w6 = _mm512_load_si512(w + 6), w7 = _mm512_load_si512(w + 7);
    const __m512 ws = _mm512_load_ps(sbuf + 16 * a.cg[c]);
    for (int m = 0; m < MC; ++m) {
      const int32_t* x = reinterpret_cast<const int32_t*>(a.x8 + (m0 + m) * xs + c * 32);
      __m512i s = _mm512_set1_epi32(a.xinit[(m0 + m) * cs + c]);
      if constexpr (MC >= 8) {  // 8 independent rows: each row's chain of 8 may wait on itself
        s = _mm512_dpbusd_epi32(s, w0, _mm512_set1_epi32(x[0]));
        s = _mm512_dpbusd_epi32(s, w1, _mm512_set1_epi32(x[1]));
        s = _mm512_dpbusd_epi32(s, w2, _mm512_set1_epi32(x[2]));
        s = _mm512_dpbusd_epi32(s, w3, _mm512_set1_epi32(x[3]));
        s = _mm512_dpbusd_epi32(s, w4, _mm512_set1_epi32(x[4]));
        s = _mm512_dpbusd_epi32(s, w5, _mm512_set1_epi32(x[5]));
        s = _mm512_dpbusd_epi32(s, w6, _mm512_set1_epi32(x[6]));
        s = _mm512_dpbusd_epi32(s, w7, _mm512_set1_epi32(x[7]));
      } else {  // few rows: two chains of 4 per row, or the `vpdpbusd` latency bounds the pass
        __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_set1_epi32(x[1]));
        s = _mm512_dpbusd_epi32(s, w0, _mm512_set1_epi32(x[0]));
        s = _mm512_dpbusd_epi32(s, w2, _mm512_set1_epi32(x[2]));
        s1 = _mm512_dpbusd_epi32(s1, w3, _mm512_set1_epi32(x[3]));
        s = _mm512_dpbusd_epi32(s, w4, _mm512_set1_epi32(x[4]));
        s1 = _mm512_dpbusd_epi32(s1, w5, _mm512_set1_epi32(x[5]));
        s = _mm512_dpbusd_epi32(s, w6, _mm512_set1_epi32(x[6]));
        s1 = _mm512_dpbusd_epi32(s1, w7, _mm512_set1_epi32(x[7]));
        s = _mm512_add_epi32(s, s1);
      }
      const __m512 f = _mm512_mul_ps(ws, _mm512_set1_ps(a.xf[(m0 + m) * cs + c]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), f, acc[m]);
    }
  }
  for (int m = 0; m < MC; ++m) _mm512_store_ps(acc_mem + 16 * m, acc[m]);
}

using PassFn = void (*)(const Rows16Args&, const __m512i*, int64_t, int64_t, int64_t, const float*, float*);
const PassFn kPasses[kRows] = {rows_pass<1>,  rows_pass<2>,  rows_pass<3>,  rows_pass<4>,  rows_pass<5>,  rows_pass<6>,
                               rows_pass<7>,  rows_pass<8>,  rows_pass<9>,  rows_pass<10>, rows_pass<11>, rows_pass<12>,
                               rows_pass<13>, rows_pass<14>, rows_pass<15>, rows_pass<16>};

template <int BITS>
void rows16_tiles(const Rows16Args& a, int64_t t0, int64_t t1) {
  constexpr int64_t C = BITS == 4 ? 4 : 8, range = kRangeCols / (32 * C);  // chunks per block, blocks per range
  constexpr int64_t tile_block_bytes = BITS == 2 ? 0 : Streams<BITS>::kBlockBytes;
  const Decoder<BITS> dec(a.tu);
  const int64_t ltiles = a.N_pad / 4, M = a.M;
  // Activation rows and K in blocks, rows [mb0, mb1) x ranges [kr0, kr1), each weight tile running
  // over one block before the next: every 16-row tile reads all of a block's int8 activations, so
  // with all M rows at once a call of 512 rows read 2 MB of them from L3 per tile (K = 4096) and ran
  // at the speed of 128 rows' call ~0.8 times; blocks of kBlockRows rows and at most kBlockBytes of
  // activation data (x8 and the per-chunk xinit and xf: 40 bytes per 32 columns) stay in L2. The
  // weights are read and decoded once per row block. CPU_NOTES item 264.
  const int64_t nranges = (a.nblocks + range - 1) / range;
  const int64_t nmb = (M + kBlockRows - 1) / kBlockRows;
  const int64_t range_bytes = (M + nmb - 1) / nmb * kRangeCols / 32 * 40;
  const int64_t kb_ranges = std::max<int64_t>(1, kBlockBytes / range_bytes);
  const int64_t nkb = (nranges + kb_ranges - 1) / kb_ranges;
  FloatBuf raw(16 * (2 * a.ng + M) + 16 + range * C * 8 * 16);
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63));
  __m512i* w = reinterpret_cast<__m512i*>(base);
  float* sbuf = base + range * C * 8 * 16;
  float* obuf = sbuf + 16 * a.ng;
  float* acc = obuf + 16 * a.ng;
  for (int64_t im = 0, mb0 = 0; im < nmb; ++im) {
    const int64_t mb1 = mb0 + (M - mb0) / (nmb - im);
    const int64_t np = (mb1 - mb0 + kRows - 1) / kRows;  // passes of activation rows, as equal as can be
    for (int64_t ik = 0, kr0 = 0; ik < nkb; ++ik) {
      const int64_t kr1 = kr0 + (nranges - kr0) / (nkb - ik);
      const bool first = ik == 0, last = ik == nkb - 1;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = kRows * t;
        const uint8_t* tiles[4];
        const uint8_t* next[4];
        for (int j = 0; j < 4; ++j) {
          tiles[j] = 4 * t + j < ltiles ? a.qw + (4 * t + j) * a.tile_bytes : nullptr;
          next[j] = 4 * t + 4 + j < ltiles && t + 1 < t1 ? a.qw + (4 * t + 4 + j) * a.tile_bytes : nullptr;
        }
        // A short last block (lut_kernel.h) expanded into whole blocks of the 4 tiles, read through
        // tiles pointers placed so that Streams finds block nblocks - 1 there.
        alignas(64) uint8_t lastb[4][tile_block_bytes > 0 ? tile_block_bytes : 1];
        const uint8_t* tlast[4];
        const bool short_last = BITS != 2 && a.last_bytes < tile_block_bytes / 4;
        if constexpr (BITS != 2)
          if (short_last && last)
            for (int j = 0; j < 4; ++j) {
              tlast[j] = nullptr;
              if (!tiles[j]) continue;
              const uint8_t* src = tiles[j] + (a.nblocks - 1) * tile_block_bytes;
              for (int r = 0; r < 4; ++r)
                expand_last_block(BITS, a.last_bytes, src + r * a.last_bytes, lastb[j] + r * (tile_block_bytes / 4));
              tlast[j] = lastb[j] - (a.nblocks - 1) * tile_block_bytes;
            }
        if constexpr (BITS == 2) tiles[0] = pair_tile(a.qw, a.chunks, t);
        if (t + 1 < t1) {  // the next tile's scale rows (item 278)
          const int esz = a.stype == kF32 ? 4 : 2;
          const char* sp = static_cast<const char*>(a.scales) + (n0 + kRows) * a.ng * esz;
          const int64_t nbytes = std::min<int64_t>(kRows, a.N - n0 - kRows) * a.ng * esz;
          for (int64_t o = 0; o < nbytes; o += 64) _mm_prefetch(sp + o, _MM_HINT_T0);
        }
        tile16_rows(a.scales, a.stype, a.N, a.ng, n0, 0, a.ng, sbuf);
        const __mmask16 rows = static_cast<__mmask16>(n0 + kRows <= a.N ? 0xffff : (1u << (a.N - n0)) - 1);
        for (int64_t m = mb0; m < mb1; ++m)  // the sums so far of a K block before this one, kept in out
          _mm512_store_ps(acc + 16 * m, first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(rows, a.out + m * a.N + n0));
        for (int64_t b0 = kr0 * range; b0 < std::min(a.nblocks, kr1 * range); b0 += range) {
          const int64_t b1 = min64(a.nblocks, b0 + range);
          const int64_t c0 = C * b0, c1 = min64(a.chunks, C * b1);  // chunks past K: x8 = 0, skipped
          if constexpr (BITS == 2)
            dec.chunks(tiles[0], c0, c1, w);
          else
            for (int64_t b = b0; b < b1; ++b)
              dec.block(Streams<BITS>(short_last && b == a.nblocks - 1 ? tlast : tiles, next, b, a.nblocks),
                        w + (b - b0) * C * 8);
          for (int64_t p = 0, m0 = mb0; p < np; ++p) {
            const int64_t mc = (mb1 - m0) / (np - p);
            kPasses[mc - 1](a, w, c0, c1, m0, sbuf, acc + 16 * m0);
            m0 += mc;
          }
        }
        if (a.offsets && last) {  // + sum over groups of offsets * exact group sums of x
          tile16_rows(a.offsets, a.stype, a.N, a.ng, n0, 0, a.ng, obuf);
          for (int64_t m = mb0; m < mb1; ++m) {
            __m512 s = _mm512_load_ps(acc + 16 * m);
            for (int64_t g = 0; g < a.ng; ++g)
              s = _mm512_fmadd_ps(_mm512_load_ps(obuf + 16 * g), _mm512_set1_ps(a.xsum[m * a.ng + g]), s);
            _mm512_store_ps(acc + 16 * m, s);
          }
        }
        if (last && a.out_bf16)  // rounded here rather than by a pass over out after the call (item 272)
          for (int64_t m = mb0; m < mb1; ++m)
            _mm256_mask_storeu_epi16(a.out_bf16 + m * a.N + n0, rows, f32x16_to_bf16(_mm512_load_ps(acc + 16 * m)));
        else
          for (int64_t m = mb0; m < mb1; ++m) _mm512_mask_storeu_ps(a.out + m * a.N + n0, rows, _mm512_load_ps(acc + 16 * m));
      }
      kr0 = kr1;
    }
    mb0 = mb1;
  }
}

}  // namespace

void gemm_int8_rows16_avx512(const Rows16Args& a, int64_t t0, int64_t t1) {
  if (a.bits == 2) rows16_tiles<2>(a, t0, t1);
  else if (a.bits == 3) rows16_tiles<3>(a, t0, t1);
  else rows16_tiles<4>(a, t0, t1);
}

bool kernel_int8_rows16_built() { return true; }

namespace {
// (GCC 12's _mm512_mask_reduce_add_epi32 warns of an uninitialized temporary.)
inline int32_t sum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}
}  // namespace

void bf16_to_f32_avx512(const uint16_t* src, float* dst, int64_t n) {
  // 64-byte stores: rows16_quantize_avx512's 64-byte loads of 32-byte stores (bf16_to_f32_avx2)
  // could not be forwarded and waited for them to reach L1: 56% of its samples on those loads,
  // the function 21.5% of a 576x1536 call at 512 rows (CPU_NOTES item 266).
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = static_cast<__mmask16>(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, src + i));
    _mm512_mask_storeu_ps(dst + i, k, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
}

bool rows16_quantize_avx512(int bits, const float* src, const uint8_t* col_of, float table_scale, int8_t* x8,
                            int32_t* xinit, float* xf) {
  // The int8 mode's quantization of one block (quantize_x_int8_avx2's arithmetic: the same chunk
  // maxima, block scales, division and rounding, so the same bytes) written in the 16-row kernel's
  // order, with each chunk's correction and float factor: quantizing into the 4-row kernels' order
  // and then reordering (rows16_prepare) took 14% of a 576x1536 call at 512 rows (CPU_NOTES item 266).
  const int C = bits == 4 ? 4 : 8;
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 fmax = _mm512_set1_ps(3.4028235e38f);
  float cmax[8];
  __mmask16 ok = 0xffff;
  for (int c = 0; c < C; ++c) {
    const __m512 a0 = _mm512_and_ps(_mm512_loadu_ps(src + 32 * c), absmask);
    const __m512 a1 = _mm512_and_ps(_mm512_loadu_ps(src + 32 * c + 16), absmask);
    ok &= _mm512_cmp_ps_mask(a0, fmax, _CMP_LE_OQ) & _mm512_cmp_ps_mask(a1, fmax, _CMP_LE_OQ);  // not NaN / Inf
    cmax[c] = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
  }
  if (ok != 0xffff) return false;
  int16_t kc[8];
  const float u = int8_block_scales(cmax, C, kc), xu = u * table_scale;
  const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_of));
  const __m256i lo = _mm256_set1_epi8(-127), ones = _mm256_set1_epi8(1);
  for (int c = 0; c < C; ++c) {
    const float sc = static_cast<float>(kc[c]) * u;
    __m256i v = _mm256_setzero_si256();
    if (sc > 0.f) {  // cvtps rounds to nearest even; vpmovsdb saturates as the two packs do
      const __m512 d = _mm512_set1_ps(sc);
      const __m128i b0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(src + 32 * c), d)));
      const __m128i b1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(src + 32 * c + 16), d)));
      v = _mm256_max_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(b0), b1, 1), lo);
    }
    v = _mm256_permutexvar_epi8(perm, v);  // byte j <- column col_of[j]
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x8 + 32 * c), v);
    xinit[c] = -64 * sum8_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, v));
    xf[c] = static_cast<float>(kc[c]) * xu;
  }
  return true;
}

}  // namespace flute_cpu
#endif
