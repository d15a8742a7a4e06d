// flute CPU kernel for 2 bits on the pair layout (pair_lut.h), AVX-512 (F, BW, VL, DQ): the int8
// mode's pair-table kernel with 512-bit registers, two steps of a chunk per register, and the 16
// rows of a tile in one float vector. Its tables come in their own order (pair_lut_avx512); the
// integer sums and the float operations per row are those of the portable and AVX2 kernels, so the
// results are the same bits. The exact mode and the decodes of AVX-512 CPUs are the AVX2 ones.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "pair_lut.h"
#include "tile16_avx512.h"

namespace flute_cpu {
namespace {

constexpr int kPrefetchBytes = kPairPrefetchBytes;  // in each weight stream (pair_lut.h)


// Group g's 16 row scales of a tile's transposed scales: fp32 (tile16_rows) or, with B16, bf16 words
// (tile16_rows_bf16) widened here.
template <bool B16>
inline __m512 tile_group_scales(const float* buf, int64_t g) {
  if constexpr (B16) return bf16x16_to_f32(reinterpret_cast<const uint16_t*>(buf) + 16 * g);
  else return _mm512_load_ps(buf + 16 * g);
}

// MC activation rows (m0 ..) of NT tiles (t, t + dt: NT = 2 only with MC = 1, two weight streams
// sharing each table load) over chunks [c0, c1); sbuf + k * sstride: tile k's scales (tile_scales;
// bf16 words with B16) from group cg[c0] on. Results into out (rows < N), starting from out's
// values when c0 > 0.
template <int MC, int NT, bool B16>
inline void pair_pass(const PairArgs& a, int64_t t, int64_t dt, int64_t c0, int64_t c1, int64_t m0, const float* sbuf,
                      int64_t sstride, float* row_buf, const ScaleLines* next) {
  static_assert(NT == 1 || MC == 1, "two tiles at once only for one activation row");
  int64_t n0[NT];
  __mmask16 rows[NT];
  const uint8_t* tp[NT];
  for (int k = 0; k < NT; ++k) {
    n0[k] = kPairTileRows * (t + k * dt);
    rows[k] = static_cast<__mmask16>(n0[k] + kPairTileRows <= a.N ? 0xffff : (1u << (a.N - n0[k])) - 1);
    tp[k] = pair_tile(a.qw, a.chunks, t + k * dt);
  }
  const __m512i m0F = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi8(1);
  __m512 facc[NT][MC], f[NT][MC], ws[NT];
  for (int k = 0; k < NT; ++k)
    for (int m = 0; m < MC; ++m) {
      facc[k][m] = c0 > 0 ? _mm512_maskz_loadu_ps(rows[k], a.out + (m0 + m) * a.N + n0[k]) : _mm512_setzero_ps();
      f[k][m] = _mm512_setzero_ps();
    }
  const int64_t gf = a.cg[c0];
  int64_t g = gf;
  for (int k = 0; k < NT; ++k) ws[k] = tile_group_scales<B16>(sbuf + k * sstride, 0);
  for (int64_t c = c0; c < c1; ++c) {
    if (a.cg[c] != g) {
      g = a.cg[c];
      for (int k = 0; k < NT; ++k) {
        for (int m = 0; m < MC; ++m) {
          facc[k][m] = _mm512_fmadd_ps(f[k][m], ws[k], facc[k][m]);
          f[k][m] = _mm512_setzero_ps();
        }
        ws[k] = tile_group_scales<B16>(sbuf + k * sstride, g - gf);
      }
    }
    __m512i acc[NT][MC][2];
    for (int k = 0; k < NT; ++k) {
      const char* ahead = reinterpret_cast<const char*>(tp[k] + c * kPairChunkBytes) + kPrefetchBytes;
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      if (c - c0 < next[k].lines) _mm_prefetch(next[k].p + 64 * (c - c0), _MM_HINT_T0);
      for (int m = 0; m < MC; ++m) acc[k][m][0] = acc[k][m][1] = _mm512_setzero_si512();
    }
    for (int sp = 0; sp < 2; ++sp) {  // steps 2 sp, 2 sp + 1: one per 256-bit half
      __m512i lo[NT], hi[NT];
      for (int k = 0; k < NT; ++k) {
        const __m512i code = _mm512_loadu_si512(tp[k] + c * kPairChunkBytes + 64 * sp);
        lo[k] = _mm512_and_si512(code, m0F);
        hi[k] = _mm512_and_si512(_mm512_srli_epi16(code, 4), m0F);
      }
      for (int m = 0; m < MC; ++m) {
        const int8_t* lt = a.lut + ((m0 + m) * a.chunks + c) * kPairLutBytes + 128 * sp;
        const __m512i tlo = _mm512_loadu_si512(lt), thi = _mm512_loadu_si512(lt + 64);
        for (int k = 0; k < NT; ++k) {
          const __m512i r1 = _mm512_shuffle_epi8(tlo, lo[k]), r2 = _mm512_shuffle_epi8(thi, hi[k]);
          acc[k][m][0] = _mm512_add_epi16(acc[k][m][0], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(r1, r2)));
          acc[k][m][1] = _mm512_add_epi16(acc[k][m][1], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(r1, r2)));
        }
      }
    }
    // acc[k][m][0]: rows 0-7 in each 128-bit quarter, [1]: rows 8-15; halves(k, m): [rows 0-7 of
    // quarters 0 + 1, of 2 + 3, rows 8-15 of quarters 0 + 1, of 2 + 3]
    auto halves = [&](int k, int m) {
      return _mm512_add_epi16(_mm512_shuffle_i32x4(acc[k][m][0], acc[k][m][1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_i32x4(acc[k][m][0], acc[k][m][1], _MM_SHUFFLE(3, 1, 3, 1)));
    };
    auto add_chunk = [&](__m256i s16, int k, int m) {  // 16 rows' int16 sums, times the chunk's table scale
      const __m512 l = _mm512_set1_ps(a.lsc[(m0 + m) * a.chunks + c]);
      f[k][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(s16)), l, f[k][m]);
    };
    if constexpr (NT * MC == 2) {
      // two tiles or two activation rows: the second step adds both halves of each in one register,
      // [first's rows 0-15, second's rows 0-15]: 7 shuffles and 3 adds per chunk against 8 and 4
      // one by one (hot 2-bit calls 0.98-1.0 of the time, CPU_NOTES item 302)
      constexpr int k1 = NT - 1, m1 = MC - 1;
      const __m512i x0 = halves(0, 0), x1 = halves(k1, m1);
      const __m512i y = _mm512_add_epi16(_mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                                         _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
      add_chunk(_mm512_castsi512_si256(y), 0, 0);
      add_chunk(_mm512_extracti64x4_epi64(y, 1), k1, m1);
    } else {
      for (int m = 0; m < MC; ++m)
        for (int k = 0; k < NT; ++k) {
          const __m512i x = halves(k, m);
          const __m512i z = _mm512_add_epi16(x, _mm512_shuffle_i32x4(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
          add_chunk(_mm512_castsi512_si256(_mm512_shuffle_i32x4(z, z, _MM_SHUFFLE(2, 0, 2, 0))), k, m);
        }
    }
  }
  const bool last = c1 == a.chunks;
  for (int k = 0; k < NT; ++k) {
    float o[MC][kPairTileRows];
    if (last) pair_offset_terms(a, t + k * dt, row_buf, o, m0, MC);
    for (int m = 0; m < MC; ++m) {
      facc[k][m] = _mm512_fmadd_ps(f[k][m], ws[k], facc[k][m]);
      if (last && a.offsets) facc[k][m] = _mm512_add_ps(facc[k][m], _mm512_loadu_ps(o[m]));
      _mm512_mask_storeu_ps(a.out + (m0 + m) * a.N + n0[k], rows[k], facc[k][m]);
    }
  }
}

}  // namespace

// The pair tables of pair_lut_avx2 / pair_lut_portable (the same entries and chunk scales) in this
// kernel's order: per two steps (2 sp, 2 sp + 1) of a chunk, 128 bytes, its low-nibble register
// (pairs 8 sp + 0, 1, 4, 5) then its high-nibble one (8 sp + 2, 3, 6, 7), so pair p of a chunk at
// byte 128 (p / 8) + 64 (p % 4 / 2) + 32 (p / 4 % 2) + 16 (p % 2). All 16 entries of a pair in one
// register: entry e = table[e & 3] x0 + table[e >> 2] x1 as a product, a product and a sum (no FMA:
// the other builders round each product). The build is serial work of each one-row call (before
// the threads start): with the AVX2 builder it was ~13% of a 576x1536 call at 2 threads (perf, hot).
bool pair_lut_avx512(const float* x, int64_t K, int64_t chunks, const float* table, int8_t* lut, float* lsc) {
  const __m512 tA = _mm512_setr_ps(table[0], table[1], table[2], table[3], table[0], table[1], table[2], table[3],
                                   table[0], table[1], table[2], table[3], table[0], table[1], table[2], table[3]);
  const __m512 tB = _mm512_setr_ps(table[0], table[0], table[0], table[0], table[1], table[1], table[1], table[1],
                                   table[2], table[2], table[2], table[2], table[3], table[3], table[3], table[3]);
  const float tmx = std::max(std::max(table[0], table[1]), std::max(table[2], table[3]));
  const float tmn = std::min(std::min(table[0], table[1]), std::min(table[2], table[3]));
  const __m512 tmax = _mm512_set1_ps(tmx), tmin = _mm512_set1_ps(tmn);
  const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(0x80000000u)));
  const __m512 zero = _mm512_setzero_ps();
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  // packs leave dword 4 l + j of a store = entries 4 l .. 4 l + 3 of its j-th pair; pair j's 16
  // entries go to dwords 4 j .. 4 j + 3
  const __m512i unlace = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512 bad = zero;  // x * 0: NaN exactly for a NaN or an Inf
  alignas(64) float xt[kPairChunkCols];
  for (int64_t c = 0; c < chunks; ++c) {
    const float* xc = pair_chunk_x(x, K, c, xt);
    const __m512 xa = _mm512_loadu_ps(xc), xb = _mm512_loadu_ps(xc + 16);
    bad = _mm512_add_ps(bad, _mm512_mul_ps(xa, zero));
    bad = _mm512_add_ps(bad, _mm512_mul_ps(xb, zero));
    __m512 v[16];
    for (int p = 0; p < 16; ++p)
      v[p] = _mm512_add_ps(_mm512_mul_ps(tA, _mm512_set1_ps(xc[2 * p])), _mm512_mul_ps(tB, _mm512_set1_ps(xc[2 * p + 1])));
    // max |v| over the chunk without visiting all 256 entries: rounding is monotonic, so each pair's
    // largest entry is the sum of its largest products and its smallest the sum of its smallest,
    // and the products' extremes are those of the table's max and min (the same roundings as the
    // entries themselves). Equal to the max over all entries when that is finite; otherwise (an
    // overflow) the entries' own max, as before.
    const __m512 x0 = _mm512_permutex2var_ps(xa, even, xb), x1 = _mm512_permutex2var_ps(xa, odd, xb);
    const __m512 a0 = _mm512_mul_ps(tmax, x0), b0 = _mm512_mul_ps(tmin, x0);
    const __m512 a1 = _mm512_mul_ps(tmax, x1), b1 = _mm512_mul_ps(tmin, x1);
    const __m512 hi = _mm512_add_ps(_mm512_max_ps(a0, b0), _mm512_max_ps(a1, b1));
    const __m512 lo = _mm512_add_ps(_mm512_min_ps(a0, b0), _mm512_min_ps(a1, b1));
    __m512 mx = _mm512_max_ps(_mm512_max_ps(hi, _mm512_xor_ps(lo, sign)), zero);
    float m = _mm512_reduce_max_ps(mx);
    if (!(m <= 3.4028235e38f)) {
      mx = zero;
      for (int p = 0; p < 16; ++p) mx = _mm512_max_ps(mx, _mm512_and_ps(v[p], absm));
      __m256 h8 = _mm256_max_ps(_mm512_castps512_ps256(mx), _mm512_extractf32x8_ps(mx, 1));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    }
    lsc[c] = m / 127.f;
    const __m512 inv = _mm512_set1_ps(pair_lut_factor(m));
    int8_t* lc = lut + c * kPairLutBytes;
    auto q = [&](int p) { return _mm512_cvtps_epi32(_mm512_mul_ps(v[p], inv)); };
    // pairs (b, b + 1, b + 4, b + 5) fill 64 consecutive bytes from 16 b' (the order above); the two
    // signed packs saturate as vpmovsdb does
    for (int g = 0; g < 4; ++g) {
      const int b = 8 * (g / 2) + 2 * (g % 2);
      const __m512i r = _mm512_packs_epi16(_mm512_packs_epi32(q(b), q(b + 1)), _mm512_packs_epi32(q(b + 4), q(b + 5)));
      _mm512_storeu_si512(lc + 64 * g, _mm512_permutexvar_epi32(unlace, r));
    }
  }
  return _mm512_reduce_add_ps(bad) == 0.f;
}

void gemm_pair_avx512(const PairArgs& a, int64_t t0, int64_t t1) {
  auto run = [&](auto b16, const auto& scales) {
    pair_tile_loop(a, t0, t1, 16 * (a.ng + 16), scales,
                   [&](auto mc, auto nt, int64_t t, int64_t dt, int64_t c0, int64_t c1, int64_t m0, const float* sbuf,
                       int64_t sstride, float* row_buf, const ScaleLines* next) {
                     pair_pass<decltype(mc)::value, decltype(nt)::value, decltype(b16)::value>(
                         a, t, dt, c0, c1, m0, sbuf, sstride, row_buf, next);
                   });
  };
  // bf16 scales in bf16 words where a K block holds more than 16 groups; up to 16, one run of
  // tile16_rows (16 or 8 groups) costs less than a run of 32 words (1536x576, 9 groups: 2% slower in
  // words, hot). buf holds 16 (ng + 16) floats: room for tile16_rows_bf16's last run of 32 groups.
  const int64_t block_groups = a.chunks > 0 ? a.cg[min64(a.chunks, a.kbc) - 1] + 1 - a.cg[0] : 0;
  if (a.stype == kBF16 && block_groups > 16)
    run(BoolC<true>{}, [&](int64_t t, int64_t g0, int64_t g1, float* buf) {
      tile16_rows_bf16(static_cast<const uint16_t*>(a.scales), a.N, a.ng, kPairTileRows * t, g0, g1,
                       reinterpret_cast<uint16_t*>(buf));
    });
  else
    run(BoolC<false>{}, [&](int64_t t, int64_t g0, int64_t g1, float* buf) {
      tile16_rows(a.scales, a.stype, a.N, a.ng, kPairTileRows * t, g0, g1, buf);
    });
}

}  // namespace flute_cpu
#endif
