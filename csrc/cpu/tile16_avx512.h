// Helpers of the AVX-512 kernels whose float vectors hold 16 weight rows side by side (the pair
// kernel, kernel_pair_avx512.cpp; the int8 mode's 16-row kernel, kernel_int8_rows16_avx512.cpp),
// compiled with AVX-512 F/BW/VL/DQ and F16C. Internal linkage only, as lut_kernel.h.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "lut_kernel.h"

namespace flute_cpu {
namespace {

// 16 rows of 16 dwords transposed: out[d], lane n = dword d of r[n]. Pairs of rows interleaved,
// then quads, then 128-bit lanes: 64 shuffles.
inline void transpose16x16_epi32(const __m512i* r, __m512i* out) {
  __m512i u[16], v[16];
  for (int k = 0; k < 8; ++k) {
    u[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    u[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // v[4k + j], lane l: rows 4k..4k+3 of dword 4l + j
    v[4 * k + 0] = _mm512_unpacklo_epi64(u[4 * k], u[4 * k + 2]);
    v[4 * k + 1] = _mm512_unpackhi_epi64(u[4 * k], u[4 * k + 2]);
    v[4 * k + 2] = _mm512_unpacklo_epi64(u[4 * k + 1], u[4 * k + 3]);
    v[4 * k + 3] = _mm512_unpackhi_epi64(u[4 * k + 1], u[4 * k + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i xl = _mm512_shuffle_i32x4(v[j], v[4 + j], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i xh = _mm512_shuffle_i32x4(v[j], v[4 + j], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512i yl = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i yh = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], _MM_SHUFFLE(3, 1, 3, 1));
    out[j] = _mm512_shuffle_i32x4(xl, yl, _MM_SHUFFLE(2, 0, 2, 0));
    out[4 + j] = _mm512_shuffle_i32x4(xh, yh, _MM_SHUFFLE(2, 0, 2, 0));
    out[8 + j] = _mm512_shuffle_i32x4(xl, yl, _MM_SHUFFLE(3, 1, 3, 1));
    out[12 + j] = _mm512_shuffle_i32x4(xh, yh, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// 16 rows of 8 dwords (r[n]) transposed: out[d], lane n = dword d of r[n]. Two rows per register
// (rows k, k + 4 and 8 + k, 12 + k), then the first two stages of transpose16x16_epi32 and one
// shuffle of 128-bit lanes: 8 inserts and 24 shuffles.
inline void transpose16x8_epi32(const __m256i* r, __m512i* out) {
  __m512i y[8], u[8], v[8];
  for (int k = 0; k < 4; ++k) {
    y[k] = _mm512_inserti64x4(_mm512_castsi256_si512(r[k]), r[k + 4], 1);
    y[4 + k] = _mm512_inserti64x4(_mm512_castsi256_si512(r[8 + k]), r[12 + k], 1);
  }
  for (int k = 0; k < 4; ++k) {
    u[2 * k] = _mm512_unpacklo_epi32(y[2 * k], y[2 * k + 1]);
    u[2 * k + 1] = _mm512_unpackhi_epi32(y[2 * k], y[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k) {  // v[4k + j], lane l: registers 4k..4k+3, dword 4 (l % 2) + j
    v[4 * k + 0] = _mm512_unpacklo_epi64(u[4 * k], u[4 * k + 2]);
    v[4 * k + 1] = _mm512_unpackhi_epi64(u[4 * k], u[4 * k + 2]);
    v[4 * k + 2] = _mm512_unpacklo_epi64(u[4 * k + 1], u[4 * k + 3]);
    v[4 * k + 3] = _mm512_unpackhi_epi64(u[4 * k + 1], u[4 * k + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    out[j] = _mm512_shuffle_i32x4(v[j], v[4 + j], _MM_SHUFFLE(2, 0, 2, 0));
    out[4 + j] = _mm512_shuffle_i32x4(v[j], v[4 + j], _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Rows n0 .. n0 + 15 of an [N, ng] tensor of scales or offsets (stype), groups [g0, g1), as fp32
// into buf [g1 - g0][16] (rows past N: 0): 16 groups of the 16 rows' contiguous values at a time,
// transposed. The kernels need the 16 rows of one group side by side; gathering them costs a
// vpgatherdd per group, ~20% of a 4096 x 4096 call in a profile, against ~0.5 instructions per
// scale here (CPU_NOTES item 131). Every register array is indexed by constants (static_rows) and
// rows past N are masked loads of nothing (a masked-off element never faults): with a branch per
// row and a store loop up to a run-time count, GCC kept the rows and columns in stack arrays (116
// zmm stores per call of the 16-row kernel's copy; CPU_NOTES item 210).
inline void tile16_rows(const void* src, int stype, int64_t N, int64_t ng, int64_t n0, int64_t g0, int64_t g1,
                        float* buf) {
  for (int64_t gb = g0; gb < g1; gb += 16) {
    const int nh = static_cast<int>(min64(16, g1 - gb));
    const __mmask16 km = static_cast<__mmask16>(nh == 16 ? 0xffff : (1u << nh) - 1);
    // row i's mask: its nh groups, none past N
    auto row_mask = [&](int i) { return static_cast<__mmask16>(n0 + i < N ? km : 0); };
    __m512i col[16];
    auto store = [&](auto d_c) __attribute__((always_inline)) {
      constexpr int d = decltype(d_c)::value;
      if (d < nh) _mm512_store_si512(buf + (gb - g0 + d) * 16, col[d]);
    };
    if (nh <= 8) {  // a last run of up to 8 groups (24 groups of 64 at K = 1536): 8 dwords per row
      __m256i h8[16];
      static_rows<16>([&](auto i_c) __attribute__((always_inline)) {
        constexpr int i = decltype(i_c)::value;
        const __mmask8 k8 = static_cast<__mmask8>(row_mask(i));
        const int64_t e = (n0 + i) * ng + gb;
        if (stype == kF32) {
          h8[i] = _mm256_castps_si256(_mm256_maskz_loadu_ps(k8, static_cast<const float*>(src) + e));
        } else {
          const __m128i h = _mm_maskz_loadu_epi16(k8, static_cast<const uint16_t*>(src) + e);
          h8[i] = stype == kBF16 ? _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16) : _mm256_castps_si256(_mm256_cvtph_ps(h));
        }
      });
      transpose16x8_epi32(h8, col);
      static_rows<8>(store);
      continue;
    }
    __m512i r[16];
    static_rows<16>([&](auto i_c) __attribute__((always_inline)) {
      constexpr int i = decltype(i_c)::value;
      const __mmask16 ki = row_mask(i);
      const int64_t e = (n0 + i) * ng + gb;
      if (stype == kF32) {
        r[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(ki, static_cast<const float*>(src) + e));
      } else {
        const __m256i h = _mm256_maskz_loadu_epi16(ki, static_cast<const uint16_t*>(src) + e);
        r[i] = stype == kBF16 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16) : _mm512_castps_si512(_mm512_cvtph_ps(h));
      }
    });
    transpose16x16_epi32(r, col);
    static_rows<16>(store);
  }
}

// Rows n0 .. n0 + 15 of an [N, ng] bf16 tensor, groups [g0, g1), as bf16 words into buf: group g's
// 16 rows at buf + 16 (g - g0) (32 bytes; rows past N and groups past g1 in the last run of 32: 0,
// and a last run writes all 32 of its groups, so buf needs 16 (g1 - g0 + 31) words). 32 groups of
// the 16 rows' contiguous words at a time: three unpack stages in 128-bit lanes (words, dwords,
// qwords) leave w[8 o + j] with, in lane L, rows 8 o .. 8 o + 7 of group 8 L + j; one two-source
// permute per pair of lanes then joins each group's two halves of rows. 64 shuffles and 32 stores
// per 32 groups against tile16_rows' 128 shuffles, 64 conversions and 32 stores (the scales'
// transposition was 10-15% of a hot 2-bit one-row call: CPU_NOTES item 286); the kernel widens
// each group where it uses it (bf16x16_to_f32).
inline void tile16_rows_bf16(const uint16_t* src, int64_t N, int64_t ng, int64_t n0, int64_t g0, int64_t g1,
                             uint16_t* buf) {
  const __m512i lanes01 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i lanes23 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int64_t gb = g0; gb < g1; gb += 32) {
    const int nh = static_cast<int>(min64(32, g1 - gb));
    const __mmask32 km = nh == 32 ? 0xffffffffu : (1u << nh) - 1;
    __m512i r[16], u[16], v[16], w[16];
    static_rows<16>([&](auto i_c) __attribute__((always_inline)) {
      constexpr int i = decltype(i_c)::value;
      r[i] = _mm512_maskz_loadu_epi16(n0 + i < N ? km : 0, src + (n0 + i) * ng + gb);
    });
    for (int k = 0; k < 8; ++k) {  // u[2k], lane L: rows 2k, 2k + 1 of groups 8L + 0..3; u[2k + 1]: 8L + 4..7
      u[2 * k] = _mm512_unpacklo_epi16(r[2 * k], r[2 * k + 1]);
      u[2 * k + 1] = _mm512_unpackhi_epi16(r[2 * k], r[2 * k + 1]);
    }
    for (int q = 0; q < 4; ++q)  // v[4q + 2h + e], lane L: rows 4q .. 4q + 3 of groups 8L + 4h + 2e, + 1
      for (int h = 0; h < 2; ++h) {
        v[4 * q + 2 * h] = _mm512_unpacklo_epi32(u[4 * q + h], u[4 * q + 2 + h]);
        v[4 * q + 2 * h + 1] = _mm512_unpackhi_epi32(u[4 * q + h], u[4 * q + 2 + h]);
      }
    for (int o = 0; o < 2; ++o)  // w[8o + j], lane L: rows 8o .. 8o + 7 of group 8L + j
      for (int s = 0; s < 4; ++s) {
        w[8 * o + 2 * s] = _mm512_unpacklo_epi64(v[8 * o + s], v[8 * o + 4 + s]);
        w[8 * o + 2 * s + 1] = _mm512_unpackhi_epi64(v[8 * o + s], v[8 * o + 4 + s]);
      }
    uint16_t* out = buf + (gb - g0) * 16;
    for (int j = 0; j < 8; ++j) {  // groups j, 8 + j (lanes 0, 1) and 16 + j, 24 + j (lanes 2, 3)
      const __m512i a = _mm512_permutex2var_epi64(w[j], lanes01, w[8 + j]);
      const __m512i b = _mm512_permutex2var_epi64(w[j], lanes23, w[8 + j]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * j), _mm512_castsi512_si256(a));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * (8 + j)), _mm512_extracti64x4_epi64(a, 1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * (16 + j)), _mm512_castsi512_si256(b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * (24 + j)), _mm512_extracti64x4_epi64(b, 1));
    }
  }
}

// One group's 16 bf16 words (tile16_rows_bf16) as fp32: exact, the bits shifted into the high half.
inline __m512 bf16x16_to_f32(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

}  // namespace
}  // namespace flute_cpu
#endif
