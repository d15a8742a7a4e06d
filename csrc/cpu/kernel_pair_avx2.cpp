// flute CPU kernels for 2 bits on the pair layout (pair_lut.h), AVX2 + FMA + F16C (also the 2-bit
// path of AVX-512 CPUs). Compiled with -ffp-contract=off: the table products and sums, the decodes
// and the exact dot products round like kernel_pair_portable.cpp; FMAs are where the intrinsics
// ask for them (and std::fma there).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstring>

#include "avx2_common.h"
#include "pair_lut.h"

namespace flute_cpu {
namespace {

constexpr int kPrefetchBytes = kPairPrefetchBytes;  // in each weight stream (pair_lut.h)


// Byte shuffles moving the last nh 16-bit elements of 16 bytes to the front, the rest zeroed
// (a constant table: no initialization guard in the loop).
struct TailShuffles {
  alignas(16) int8_t m[9][16];
};
constexpr TailShuffles make_tail_shuffles() {
  TailShuffles t{};
  for (int nh = 0; nh <= 8; ++nh)
    for (int b = 0; b < 16; ++b) t.m[nh][b] = static_cast<int8_t>(b < 2 * nh ? b + 16 - 2 * nh : -1);
  return t;
}
alignas(16) constexpr TailShuffles kTailShuffles = make_tail_shuffles();

// Groups [gb, gb + nh) (nh 1..8) of one row of an [N, ng] scale tensor from element e, as fp32 in
// dwords 0..nh-1 (the rest 0). A last run of fewer than 8 groups (e.g. 8 + 1 groups of 64 at
// K = 576) reads only elements of the tensor: fp32 by a masked load; 16-bit values by the 16 bytes
// that end with the run (from e + nh - 8 >= 0), moved down by a byte shuffle (a copy into a
// zeroed buffer cost a store-forwarding stall per row), or where the tensor starts inside those
// bytes (row 0 with fewer than 8 groups), by that copy.
template <int STYPE>
inline __m256 scale_run8(const void* src, int64_t e, int nh) {
  if constexpr (STYPE == kF32) {
    const float* p = static_cast<const float*>(src) + e;
    if (nh == 8) return _mm256_loadu_ps(p);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(nh), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(src) + e;
    __m128i h;
    if (nh == 8) {
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else if (e + nh >= 8) {
      h = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + nh - 8)),
                           _mm_load_si128(reinterpret_cast<const __m128i*>(kTailShuffles.m[nh])));
    } else {
      alignas(16) uint16_t v[8] = {};
      std::memcpy(v, p, sizeof(uint16_t) * nh);
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(v));
    }
    if constexpr (STYPE == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

// The 16 rows' fp32 scales of groups [g0, g1) of tile t into buf [g1 - g0][16] (rows past N: 0):
// 8 groups of 8 rows' contiguous scales at a time, transposed (the kernel needs the rows of one
// group side by side; a vpgatherdd per group cost ~20% of a call, kernel_pair_avx512.cpp). One
// instantiation per scale dtype and every register array indexed by constants (static_rows), as
// tile16_rows: with the dtype and the row checks tested per row and a scalar path for a last run
// of fewer than 8 groups, this took 27% of a 2048x2048 call's time in cache and 46% at 1536x576,
// now 13-15% and 20-23% (the AVX2 path forced on an AVX-512 Xeon; CPU_NOTES item 241).
template <int STYPE>
inline void tile_scales_t(const PairArgs& a, int64_t t, int64_t g0, int64_t g1, float* buf) {
  const int64_t n0 = kPairTileRows * t;
  const bool full = n0 + kPairTileRows <= a.N;
  for (int64_t gb = g0; gb < g1; gb += 8) {
    const int nh = static_cast<int>(min64(8, g1 - gb));
    for (int half = 0; half < 2; ++half) {
      __m256 r[8], u[8], v[8];
      static_rows<8>([&](auto i_c) __attribute__((always_inline)) {
        constexpr int i = decltype(i_c)::value;
        const int64_t n = n0 + 8 * half + i;
        r[i] = full || n < a.N ? scale_run8<STYPE>(a.scales, n * a.ng + gb, nh) : _mm256_setzero_ps();
      });
      // 8 x 8 transpose
      static_rows<4>([&](auto k_c) __attribute__((always_inline)) {
        constexpr int k = decltype(k_c)::value;
        u[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        u[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
      });
      static_rows<2>([&](auto k_c) __attribute__((always_inline)) {  // v[4k + j], lane l: rows 4k..4k+3 of group 4l + j
        constexpr int k = decltype(k_c)::value;
        const __m256d a0 = _mm256_castps_pd(u[4 * k]), a1 = _mm256_castps_pd(u[4 * k + 1]);
        const __m256d a2 = _mm256_castps_pd(u[4 * k + 2]), a3 = _mm256_castps_pd(u[4 * k + 3]);
        v[4 * k + 0] = _mm256_castpd_ps(_mm256_unpacklo_pd(a0, a2));
        v[4 * k + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a0, a2));
        v[4 * k + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(a1, a3));
        v[4 * k + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(a1, a3));
      });
      float* dst = buf + (gb - g0) * 16 + 8 * half;
      static_rows<4>([&](auto j_c) __attribute__((always_inline)) {
        constexpr int j = decltype(j_c)::value;
        if (j < nh) _mm256_store_ps(dst + j * 16, _mm256_permute2f128_ps(v[j], v[4 + j], 0x20));
        if (4 + j < nh) _mm256_store_ps(dst + (4 + j) * 16, _mm256_permute2f128_ps(v[j], v[4 + j], 0x31));
      });
    }
  }
}

inline void tile_scales(const PairArgs& a, int64_t t, int64_t g0, int64_t g1, float* buf) {
  if (a.stype == kF32) tile_scales_t<kF32>(a, t, g0, g1, buf);
  else if (a.stype == kBF16) tile_scales_t<kBF16>(a, t, g0, g1, buf);
  else tile_scales_t<kF16>(a, t, g0, g1, buf);
}

// MC activation rows (m0 ..) of NT tiles (t, t + dt: NT = 2 only with MC = 1, two weight streams
// sharing each table load) over chunks [c0, c1); sbuf + k * sstride: tile k's scales (tile_scales)
// from group cg[c0] on. Each step's index split is shared by the MC rows' lookups. Results into
// out (rows < N), starting from out's values when c0 > 0.
template <int MC, int NT>
inline void pair_pass(const PairArgs& a, int64_t t, int64_t dt, int64_t c0, int64_t c1, int64_t m0, const float* sbuf,
                      int64_t sstride, float* row_buf, const ScaleLines* next) {
  static_assert(NT == 1 || MC == 1, "two tiles at once only for one activation row");
  int64_t n0[NT];
  bool full[NT];
  const uint8_t* tp[NT];
  for (int k = 0; k < NT; ++k) {
    n0[k] = kPairTileRows * (t + k * dt);
    full[k] = n0[k] + kPairTileRows <= a.N;
    tp[k] = pair_tile(a.qw, a.chunks, t + k * dt);
  }
  const __m256i m0F = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi8(1);
  __m256 facc[NT][MC][2], f[NT][MC][2], ws[NT][2];
  for (int k = 0; k < NT; ++k)
    for (int m = 0; m < MC; ++m) {
      const float* o = a.out + (m0 + m) * a.N + n0[k];
      if (c0 > 0 && full[k]) {
        facc[k][m][0] = _mm256_loadu_ps(o);
        facc[k][m][1] = _mm256_loadu_ps(o + 8);
      } else if (c0 > 0) {
        alignas(32) float v[kPairTileRows] = {};
        for (int i = 0; n0[k] + i < a.N; ++i) v[i] = o[i];
        facc[k][m][0] = _mm256_load_ps(v);
        facc[k][m][1] = _mm256_load_ps(v + 8);
      } else {
        facc[k][m][0] = facc[k][m][1] = _mm256_setzero_ps();
      }
      f[k][m][0] = f[k][m][1] = _mm256_setzero_ps();
    }
  const int64_t gf = a.cg[c0];
  int64_t g = gf;
  for (int k = 0; k < NT; ++k) {
    ws[k][0] = _mm256_load_ps(sbuf + k * sstride);
    ws[k][1] = _mm256_load_ps(sbuf + k * sstride + 8);
  }
  for (int64_t c = c0; c < c1; ++c) {
    if (a.cg[c] != g) {
      g = a.cg[c];
      for (int k = 0; k < NT; ++k) {
        for (int m = 0; m < MC; ++m)
          for (int h = 0; h < 2; ++h) {
            facc[k][m][h] = _mm256_fmadd_ps(f[k][m][h], ws[k][h], facc[k][m][h]);
            f[k][m][h] = _mm256_setzero_ps();
          }
        ws[k][0] = _mm256_load_ps(sbuf + k * sstride + (g - gf) * 16);
        ws[k][1] = _mm256_load_ps(sbuf + k * sstride + (g - gf) * 16 + 8);
      }
    }
    __m256i acc[NT][MC][2];
    for (int k = 0; k < NT; ++k) {
      const char* ahead = reinterpret_cast<const char*>(tp[k] + c * kPairChunkBytes) + kPrefetchBytes;
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      if (c - c0 < next[k].lines) _mm_prefetch(next[k].p + 64 * (c - c0), _MM_HINT_T0);
      for (int m = 0; m < MC; ++m) acc[k][m][0] = acc[k][m][1] = _mm256_setzero_si256();
    }
FLUTE_UNROLL(4)
    for (int s = 0; s < 4; ++s) {
      __m256i lo[NT], hi[NT];
      for (int k = 0; k < NT; ++k) {
        const __m256i code = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tp[k] + c * kPairChunkBytes + 32 * s));
        lo[k] = _mm256_and_si256(code, m0F);
        hi[k] = _mm256_and_si256(_mm256_srli_epi16(code, 4), m0F);
      }
      for (int m = 0; m < MC; ++m) {
        const int8_t* lt = a.lut + ((m0 + m) * a.chunks + c) * kPairLutBytes + 64 * s;
        const __m256i tlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lt));
        const __m256i thi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lt + 32));
        for (int k = 0; k < NT; ++k) {
          const __m256i r1 = _mm256_shuffle_epi8(tlo, lo[k]), r2 = _mm256_shuffle_epi8(thi, hi[k]);
          // row i's two lookups side by side, summed into int16 (table entries signed, ones unsigned)
          acc[k][m][0] = _mm256_add_epi16(acc[k][m][0], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(r1, r2)));
          acc[k][m][1] = _mm256_add_epi16(acc[k][m][1], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(r1, r2)));
        }
      }
    }
    for (int m = 0; m < MC; ++m) {
      const __m256 l = _mm256_broadcast_ss(a.lsc + (m0 + m) * a.chunks + c);
      for (int k = 0; k < NT; ++k)
        for (int h = 0; h < 2; ++h) {  // the halves: pairs 4s, 4s + 2 and 4s + 1, 4s + 3 of rows 8h..8h+7
          const __m128i s16 = _mm_add_epi16(_mm256_castsi256_si128(acc[k][m][h]), _mm256_extracti128_si256(acc[k][m][h], 1));
          f[k][m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(s16)), l, f[k][m][h]);
        }
    }
  }
  const bool last = c1 == a.chunks;
  for (int k = 0; k < NT; ++k) {
    float o[MC][kPairTileRows];
    if (last) pair_offset_terms(a, t + k * dt, row_buf, o, m0, MC);
    for (int m = 0; m < MC; ++m) {
      for (int h = 0; h < 2; ++h) {
        facc[k][m][h] = _mm256_fmadd_ps(f[k][m][h], ws[k][h], facc[k][m][h]);
        if (last && a.offsets) facc[k][m][h] = _mm256_add_ps(facc[k][m][h], _mm256_loadu_ps(o[m] + 8 * h));
      }
      float* dst = a.out + (m0 + m) * a.N + n0[k];
      if (full[k]) {
        _mm256_storeu_ps(dst, facc[k][m][0]);
        _mm256_storeu_ps(dst + 8, facc[k][m][1]);
      } else {
        alignas(32) float v[kPairTileRows];
        _mm256_store_ps(v, facc[k][m][0]);
        _mm256_store_ps(v + 8, facc[k][m][1]);
        for (int i = 0; n0[k] + i < a.N; ++i) dst[i] = v[i];
      }
    }
  }
}

// Step s of row i's chunk as 8 fp32 weights in natural column order: table value times scale, plus
// offset (mul, then add). The step's two bytes (16L + i) hold the codes of columns 8s + {0, 1, 4, 5}
// (L = 0) and 8s + {2, 3, 6, 7} (L = 1) from bit 0 up, so as one 16-bit value the code of column
// 8s + j is at bit shift[j]; vpermps reads index bits 0-2 (tab: entries 0-3 twice).
inline __m256 decode_step_avx2(const uint8_t* cp, int i, int s, __m256 tab, __m256 sc, __m256 off) {
  const __m256i shift = _mm256_setr_epi32(0, 2, 8, 10, 4, 6, 12, 14);
  const int v = cp[32 * s + i] | cp[32 * s + 16 + i] << 8;
  const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(v), shift);
  return _mm256_add_ps(_mm256_mul_ps(_mm256_permutevar8x32_ps(tab, idx), sc), off);
}

inline __m256 table8(const float* table) {  // entries 0-3 twice (vpermps reads 3 index bits)
  return _mm256_setr_ps(table[0], table[1], table[2], table[3], table[0], table[1], table[2], table[3]);
}

}  // namespace

// The tables in pair order ([chunk][pair][16]: step s's registers are 64 s and 64 s + 32).
bool pair_lut_avx2(const float* x, int64_t K, int64_t chunks, const float* table, int8_t* lut, float* lsc) {
  const __m256 tA = _mm256_setr_ps(table[0], table[1], table[2], table[3], table[0], table[1], table[2], table[3]);
  const __m256 tBl = _mm256_setr_ps(table[0], table[0], table[0], table[0], table[1], table[1], table[1], table[1]);
  const __m256 tBh = _mm256_setr_ps(table[2], table[2], table[2], table[2], table[3], table[3], table[3], table[3]);
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  __m256 bad = _mm256_setzero_ps();  // x * 0: NaN exactly for a NaN or an Inf
  alignas(32) float v[16][16];
  alignas(32) float xt[kPairChunkCols];
  for (int64_t c = 0; c < chunks; ++c) {
    const float* xc = pair_chunk_x(x, K, c, xt);
    for (int k = 0; k < kPairChunkCols; k += 8) bad = _mm256_add_ps(bad, _mm256_mul_ps(_mm256_loadu_ps(xc + k), _mm256_setzero_ps()));
    __m256 mx = _mm256_setzero_ps();
    for (int p = 0; p < 16; ++p) {
      const __m256 x0 = _mm256_broadcast_ss(xc + 2 * p), x1 = _mm256_broadcast_ss(xc + 2 * p + 1);
      const __m256 a = _mm256_mul_ps(tA, x0);
      const __m256 lo = _mm256_add_ps(a, _mm256_mul_ps(tBl, x1)), hi = _mm256_add_ps(a, _mm256_mul_ps(tBh, x1));
      _mm256_store_ps(v[p], lo);
      _mm256_store_ps(v[p] + 8, hi);
      mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_and_ps(lo, absm), _mm256_and_ps(hi, absm)));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float m = _mm_cvtss_f32(h);
    lsc[c] = m / 127.f;
    const __m256 inv = _mm256_set1_ps(pair_lut_factor(m));
    for (int p = 0; p < 16; p += 2) {
      auto q = [&](const float* fv) { return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(fv), inv)); };
      const __m256i b = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(q(v[p]), q(v[p] + 8)), _mm256_packs_epi32(q(v[p + 1]), q(v[p + 1] + 8))), perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lut + c * kPairLutBytes + 16 * p), b);
    }
  }
  alignas(32) float bv[8];
  _mm256_store_ps(bv, bad);
  for (float e : bv)
    if (e != 0.f) return false;
  return true;
}

void gemm_pair_avx2(const PairArgs& a, int64_t t0, int64_t t1) {
  pair_tile_loop(
      a, t0, t1, 16 * (a.ng + 8), [&](int64_t t, int64_t g0, int64_t g1, float* buf) { tile_scales(a, t, g0, g1, buf); },
      [&](auto mc, auto nt, int64_t t, int64_t dt, int64_t c0, int64_t c1, int64_t m0, const float* sbuf, int64_t sstride,
          float* row_buf, const ScaleLines* next) {
        pair_pass<decltype(mc)::value, decltype(nt)::value>(a, t, dt, c0, c1, m0, sbuf, sstride, row_buf, next);
      });
}

void exact_pair_avx2(const PairArgs& a, int64_t t0, int64_t t1) {
  const __m256 tab = table8(a.table);
  exact_pair_impl(a, t0, t1, [&](const uint8_t* cp, int i, const float*, float sc, float off, float* dst) {
    for (int st = 0; st < 4; ++st) _mm256_storeu_ps(dst + 8 * st, decode_step_avx2(cp, i, st, tab, _mm256_set1_ps(sc), _mm256_set1_ps(off)));
  });
}

void decode_pair_avx2(const DecodeArgs& a, int64_t r0, int64_t r1) {
  if (a.G % 8 != 0 && a.ng != 1) {  // a group boundary inside 8 columns: the scalar decode
    decode_pair_portable(a, r0, r1);
    return;
  }
  const int64_t chunks = a.K_pad / kPairChunkCols;
  const __m256 tab = table8(a.table);
  // Groups of whole chunks (G % 32 == 0, or one group): one scale per chunk, its index counted
  // along the row rather than divided per 8 columns
  const int64_t cpg = a.ng == 1 ? chunks : a.G % kPairChunkCols == 0 ? a.G / kPairChunkCols : 0;
  for_decode_rows(a, r0, r1, [&](const uint8_t* tp, int i, const float* sc, const float* off, float* df, uint16_t* dh) {
    alignas(32) float w[kPairChunkCols];
    int64_t g = 0, in_group = 0;  // (chunk groups) the chunk's group and its place in it
    for (int64_t c = 0; c < chunks; ++c) {
      const uint8_t* cp = tp + c * kPairChunkBytes;
      const int64_t k0 = c * kPairChunkCols, kn = min64(kPairChunkCols, a.K - k0);
      if (cpg > 0 && kn == kPairChunkCols) {
        // a whole chunk in registers, to bf16 there (bf16_bits, as f32_to_bf16_avx2): a call of
        // f32_to_bf16_avx2 per chunk, the floats stored and read again, and a division per 8
        // columns took ~45% of this decode's time; it is now bound by writing the panels
        // (CPU_NOTES items 260, 261)
        const __m256 scv = _mm256_set1_ps(sc[g]), ofv = _mm256_set1_ps(off[g]);
        __m256 v[4];
        for (int st = 0; st < 4; ++st) v[st] = decode_step_avx2(cp, i, st, tab, scv, ofv);
        if (a.bf16) {
          for (int h = 0; h < 2; ++h) {  // packus interleaves 128-bit halves: 0xd8 undoes it
            const __m256i p = _mm256_packus_epi32(bf16_bits(v[2 * h]), bf16_bits(v[2 * h + 1]));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dh + k0 + 16 * h), _mm256_permute4x64_epi64(p, 0xd8));
          }
        } else {
          for (int st = 0; st < 4; ++st) _mm256_storeu_ps(df + k0 + 8 * st, v[st]);
        }
      } else {
        for (int s = 0; s < 4 && 8 * s < kn; ++s) {  // 8 columns share a group (G % 8 == 0)
          const int64_t gs = min64((k0 + 8 * s) / a.G, a.ng - 1);
          _mm256_store_ps(w + 8 * s, decode_step_avx2(cp, i, s, tab, _mm256_set1_ps(sc[gs]), _mm256_set1_ps(off[gs])));
        }
        if (a.bf16) {
          f32_to_bf16_avx2(w, dh + k0, kn);  // 16 at a time, then a scalar tail (kernel_avx2.cpp)
        } else {
          for (int64_t k = 0; k < kn; ++k) df[k0 + k] = w[k];
        }
      }
      if (cpg > 0 && ++in_group == cpg && g + 1 < a.ng) {
        in_group = 0;
        ++g;
      }
    }
  });
}

}  // namespace flute_cpu
#endif
