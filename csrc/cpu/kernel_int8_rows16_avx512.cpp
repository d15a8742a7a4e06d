// flute CPU kernel, the int8 mode for several activation rows (Rows16Args in lut_kernel.h), 4 bits,
// AVX-512 with VBMI and VNNI. The 4-row kernels (kernel_int8_avx512.cpp) put K along the vector:
// every activation row redoes the lookups and the multiply-adds of `vpmaddubsw` + `vpdpwssd`, so at
// 16 rows they ran at 0.41-0.44x torch's bf16 matmul on a Zen 5 (CPU_NOTES item 131). Here the
// vector holds 16 weight rows instead, each dword 4 consecutive columns of one chunk, so one
// decoded weight vector serves every activation row through one `vpdpbusd` with the row's 4
// activation bytes broadcast: 64 multiply-adds per instruction and row, the lookups done once.
//
// Decode of a K block (128 columns) of 16 weight rows (the layout's 4-row tiles 4T .. 4T + 3), from
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
// A block decodes to 32 weight vectors (2 KB) in ~110 instructions, stored to an L1 buffer of
// kRange blocks; the activation rows then run over it in passes of up to 16 (one float accumulator
// each: 16 + 8 weight vectors + temporaries fit the 32 registers).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "lut_kernel.h"
#include "tile16_avx512.h"

namespace flute_cpu {
namespace {

constexpr int kRows = 16;
constexpr int kRange = 8;  // K blocks decoded at once: 8 x 2 KB of weight vectors, in L1
// Software prefetch distance in each of the 4 weight streams (one per layout tile; see
// Decoder::block), 8 KB as the other int8 kernels (int8_tiles.h).
constexpr int kPrefetchBytes = 8192;

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

struct Decoder {
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
  // Block b of the 16 rows (tiles: each layout tile's stream, nullptr past N_pad; nb blocks per
  // row) into w[c * 8 + i] for chunk c, dword i. Prefetched kPrefetchBytes ahead in each stream,
  // into the next 16-row tile's streams (next) near the end of a row: a tile's 4 streams lie
  // nb * 256 bytes apart, so a plain 8 KB ahead would fetch the lines the next stream is reading
  // now whenever nb <= 32 (K <= 4096: 4096 x 4096 at M = 1 read DRAM at ~11 GB/s that way).
  void block(const uint8_t* const* tiles, const uint8_t* const* next, int64_t b, int64_t nb, __m512i* w) const {
    constexpr int64_t D = kPrefetchBytes / 256;
    __m512i r[kRows], lo[8], hi[8];
    for (int j = 0; j < 4; ++j) {
      if (!tiles[j]) {
        for (int rr = 0; rr < 4; ++rr) r[4 * j + rr] = _mm512_setzero_si512();
        continue;
      }
      const uint8_t* p = tiles[j] + b * 256;
      const uint8_t* pf = b + D < nb ? p + D * 256 : next[j] ? next[j] + (b + D - nb) * 256 : nullptr;
      for (int rr = 0; rr < 4; ++rr) {
        if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + rr * 64), _MM_HINT_T0);
        r[4 * j + rr] = _mm512_loadu_si512(p + rr * 64);
      }
    }
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

// MC activation rows from m0 over global chunks [c0, c1) (w: their weight vectors, 8 per chunk;
// sbuf: the tile's scales [ng][16]); accumulators in acc [MC][16].
template <int MC>
void rows_pass(const Rows16Args& a, const __m512i* w, int64_t c0, int64_t c1, int64_t m0, const float* sbuf,
               float* acc_mem) {
  const int64_t xs = a.nblocks * 128, cs = a.nblocks * 4;
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
      s = _mm512_dpbusd_epi32(s, w0, _mm512_set1_epi32(x[0]));
      s = _mm512_dpbusd_epi32(s, w1, _mm512_set1_epi32(x[1]));
      s = _mm512_dpbusd_epi32(s, w2, _mm512_set1_epi32(x[2]));
      s = _mm512_dpbusd_epi32(s, w3, _mm512_set1_epi32(x[3]));
      s = _mm512_dpbusd_epi32(s, w4, _mm512_set1_epi32(x[4]));
      s = _mm512_dpbusd_epi32(s, w5, _mm512_set1_epi32(x[5]));
      s = _mm512_dpbusd_epi32(s, w6, _mm512_set1_epi32(x[6]));
      s = _mm512_dpbusd_epi32(s, w7, _mm512_set1_epi32(x[7]));
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

}  // namespace

void gemm_int8_rows16_avx512(const Rows16Args& a, int64_t t0, int64_t t1) {
  const Decoder dec(a.tu);
  const int64_t ltiles = a.N_pad / 4, M = a.M;
  const int64_t np = (M + kRows - 1) / kRows;  // passes of activation rows, as equal as can be
  FloatBuf raw(16 * (2 * a.ng + M) + 16 + kRange * 32 * 16);
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63));
  __m512i* w = reinterpret_cast<__m512i*>(base);
  float* sbuf = base + kRange * 32 * 16;
  float* obuf = sbuf + 16 * a.ng;
  float* acc = obuf + 16 * a.ng;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = kRows * t;
    const uint8_t* tiles[4];
    const uint8_t* next[4];
    for (int j = 0; j < 4; ++j) {
      tiles[j] = 4 * t + j < ltiles ? a.qw + (4 * t + j) * a.nblocks * 256 : nullptr;
      next[j] = 4 * t + 4 + j < ltiles && t + 1 < t1 ? a.qw + (4 * t + 4 + j) * a.nblocks * 256 : nullptr;
    }
    tile16_rows(a.scales, a.stype, a.N, a.ng, n0, 0, a.ng, sbuf);
    for (int64_t i = 0; i < 16 * M; ++i) acc[i] = 0.f;
    for (int64_t b0 = 0; b0 < a.nblocks; b0 += kRange) {
      const int64_t b1 = min64(a.nblocks, b0 + kRange);
      for (int64_t b = b0; b < b1; ++b) dec.block(tiles, next, b, a.nblocks, w + (b - b0) * 32);
      const int64_t c0 = 4 * b0, c1 = min64(a.chunks, 4 * b1);  // chunks past K: x8 = 0, skipped
      for (int64_t p = 0, m0 = 0; p < np; ++p) {
        const int64_t mc = (M - m0) / (np - p);
        kPasses[mc - 1](a, w, c0, c1, m0, sbuf, acc + 16 * m0);
        m0 += mc;
      }
    }
    if (a.offsets) {  // + sum over groups of offsets * exact group sums of x
      tile16_rows(a.offsets, a.stype, a.N, a.ng, n0, 0, a.ng, obuf);
      for (int64_t m = 0; m < M; ++m) {
        __m512 s = _mm512_load_ps(acc + 16 * m);
        for (int64_t g = 0; g < a.ng; ++g)
          s = _mm512_fmadd_ps(_mm512_load_ps(obuf + 16 * g), _mm512_set1_ps(a.xsum[m * a.ng + g]), s);
        _mm512_store_ps(acc + 16 * m, s);
      }
    }
    const __mmask16 rows = static_cast<__mmask16>(n0 + kRows <= a.N ? 0xffff : (1u << (a.N - n0)) - 1);
    for (int64_t m = 0; m < M; ++m) _mm512_mask_storeu_ps(a.out + m * a.N + n0, rows, _mm512_load_ps(acc + 16 * m));
  }
}

bool kernel_int8_rows16_built() { return true; }

}  // namespace flute_cpu
#endif
