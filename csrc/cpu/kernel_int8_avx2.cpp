// flute CPU kernel, int8 mode, AVX2 (int8_avx2_kernel.h, its int16 form): also the path of AVX-512
// CPUs without VBMI and VNNI and of AVX2 CPUs without AVX-VNNI. Also the activation quantizer of
// every 256-bit int8 kernel.
#if defined(__x86_64__) || defined(_M_X64)
#include "int8_avx2_kernel.h"

namespace flute_cpu {

namespace {

// One instantiation per bit width: the byte placement and chunk factors below then have constant
// offsets (with bits at run time their index arithmetic was most of their instructions).
template <int BITS>
bool quantize_x_int8_bits(const float* xf, int8_t* dst, int16_t* corr, int16_t* k, float* u) {
  constexpr int P = int8_parts(BITS), C = chunks_per_block(BITS);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(3.4028235e38f);
  // packs_epi32 then packs_epi16 interleave 4-dword groups across the two 128-bit halves; this
  // vpermd puts the 32 bytes back in column order.
  const __m256i unpack = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i lo = _mm256_set1_epi8(-127);
  // Per 128-bit half (columns 16L .. 16L + 15 of the chunk): even columns, then odd. Then each
  // dword is 4 bytes of one (reg = L, h, part, dword q) of the byte order (see Int8Args): column
  // 32 ch + 2 j + e with j = 8 reg + 4 h + i, slot s = ch + C e, part s % P, dword s / P.
  const __m256i even_odd = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  alignas(32) int32_t eo[8];
  int32_t* d32 = reinterpret_cast<int32_t*>(dst);
  float cmax[8];
  int16_t kc[8];
  for (int ch = 0; ch < C; ++ch) {
    __m256 m = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int i = 0; i < 4; ++i) {
      const __m256 av = _mm256_and_ps(_mm256_loadu_ps(xf + 32 * ch + 8 * i), absmask);
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(av, fmax, _CMP_LE_OQ));  // false for NaN and Inf
      m = _mm256_max_ps(m, av);
    }
    if (_mm256_movemask_ps(ok) != 0xFF) return false;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    cmax[ch] = _mm_cvtss_f32(h);
  }
  *u = int8_block_scales(cmax, C, kc);
  for (int ch = 0; ch < C; ++ch) {
    const float sc = static_cast<float>(kc[ch]) * *u;
    __m256i r[4];
    for (int i = 0; i < 4; ++i)  // cvtps rounds to nearest even, as nearbyint
      r[i] = sc > 0.f ? _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xf + 32 * ch + 8 * i), _mm256_set1_ps(sc)))
                      : _mm256_setzero_si256();
    // saturating packs clamp to [-128, 127], the max to [-127, 127]
    const __m256i b = _mm256_max_epi8(_mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3])), lo);
    _mm256_store_si256(reinterpret_cast<__m256i*>(eo),
                       _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(b, unpack), even_odd));
    // 8 dword copies per chunk instead of 32 byte scatters (a third of this function's instructions)
    for (int e = 0; e < 2; ++e) {
      const int sl = ch + C * e, p = sl % P, q = sl / P;
      for (int reg = 0; reg < 2; ++reg)
        for (int h = 0; h < 2; ++h) d32[((reg * P + p) * 2 + h) * 4 + q] = eo[reg * 4 + e * 2 + h];
    }
  }
  // corr: 64 * the sum of the 4 bytes of int16 (h, w) of part p over both registers; k: the factor
  // of that int16's chunk, (P * q + p) % C for dword q = w / 2.
  const __m256i ones8 = _mm256_set1_epi8(1);
  for (int p = 0; p < P; ++p) {
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + p * 32));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + (P + p) * 32));
    const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(ones8, a0), _mm256_maddubs_epi16(ones8, a1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(corr + p * 16), _mm256_slli_epi16(s, 6));
    for (int hw = 0; hw < 16; ++hw) k[p * 16 + hw] = kc[(P * ((hw & 7) >> 1) + p) % C];
  }
  return true;
}

}  // namespace

bool quantize_x_int8_avx2(const float* xf, int bits, int8_t* dst, int16_t* corr, int16_t* k, float* u) {
  switch (bits) {
    // 2 bits (the 16-row kernel's activations only): blocks of 256 columns, as 3 bits
    case 2:
    case 3: return quantize_x_int8_bits<3>(xf, dst, corr, k, u);
    default: return quantize_x_int8_bits<4>(xf, dst, corr, k, u);
  }
}

void gemm_int8_avx2(const Int8Args& a, int64_t t0, int64_t t1) { gemm_int8_dispatch<Avx2Int8>(a, t0, t1); }

}  // namespace flute_cpu
#endif
