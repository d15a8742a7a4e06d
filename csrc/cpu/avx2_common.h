// Helpers shared by the AVX2 translation units (kernel_avx2.cpp, kernel_int8_avx2.cpp,
// kernel_pair_avx2.cpp); included
// only from files compiled with -mavx2 -mfma. Internal linkage, as everything in lut_kernel.h.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "lut_kernel.h"

namespace flute_cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 4 rows' sums of 8 floats each, in row order.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// In each 128-bit half, dword q <- byte q of each of the 4 lanes (out byte 4q + i = in byte 4i + q):
// the int8 kernel's byte order (Int8Args). A 4x4 byte transpose per half, so its own inverse.
inline __m256i bytes_by_position(__m256i v) {
  const __m256i perm = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm256_shuffle_epi8(v, perm);
}

// The table as two 8-entry vectors for `vpermps`: 4 bits: entries 0-7 and 8-15 (index bit 3
// selects); 3 bits: entries 0-3 and 4-7, each repeated (the high-bit plane selects); 2 bits:
// entries 0-3 repeated (TB unused).
// 8 floats to bf16, round to nearest even, NaN kept quiet (as f32_to_bf16), in the low 16 bits of
// each dword.
inline __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

template <int BITS>
inline void split_table(const float* table, __m256* TA, __m256* TB) {
  alignas(32) float t0[8], t1[8];
  for (int i = 0; i < 8; ++i) {
    t0[i] = BITS == 4 ? table[i] : table[i & 3];
    t1[i] = BITS == 4 ? table[8 + i] : BITS == 3 ? table[4 + (i & 3)] : 0.f;
  }
  *TA = _mm256_load_ps(t0);
  *TB = _mm256_load_ps(t1);
}

}  // namespace
}  // namespace flute_cpu
#endif
