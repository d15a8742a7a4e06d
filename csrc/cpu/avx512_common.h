// Helpers of the AVX-512 kernels (kernel_avx512.cpp, kernel_avx512bf16.cpp, kernel_amx.cpp,
// kernel_int8_rows16_avx512.cpp), all compiled with AVX-512 F/BW/VL/DQ and F16C. Internal
// linkage only (an anonymous namespace): never shared with a translation unit compiled with other
// flags.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "lut_kernel.h"

namespace flute_cpu {
namespace {

// Row n of [N, ng] scales/offsets as fp32 (vectorized conversion).
inline void load_row(const void* src, int stype, int64_t n, int64_t ng, float* dst) {
  if (stype == kF32) {
    std::memcpy(dst, static_cast<const float*>(src) + n * ng, ng * sizeof(float));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src) + n * ng;
  for (int64_t g = 0; g < ng; g += 16) {
    const int64_t left = ng - g;
    const __mmask16 k = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m256i h = _mm256_maskz_loadu_epi16(k, s + g);
    __m512 v;
    if (stype == kBF16) {
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      v = _mm512_cvtph_ps(h);
    }
    _mm512_mask_storeu_ps(dst + g, k, v);
  }
}

// 16 floats to bf16 as f32_to_bf16 (lut_kernel.h): round to nearest even, NaN kept quiet.
inline __m256i f32x16_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v), hi = _mm512_srli_epi32(u, 16);
  const __m512i odd = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), hi, _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t left = n - i;
    const __mmask16 k = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

}  // namespace
}  // namespace flute_cpu
#endif
