// Helpers (beyond avx512_common.h) of the two kernels that decode rows to bf16 with `vpermw`
// (kernel_avx512bf16.cpp and kernel_amx.cpp), both compiled with AVX-512 F/BW/VL/DQ and
// AVX512_BF16 flags. Internal linkage only (an anonymous namespace): never shared with a
// translation unit compiled with other flags.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "avx512_common.h"

namespace flute_cpu {
namespace {

// 16 fp32 values times s plus o (a multiply, then an add: the panel decode's rounding), rounded to
// bf16, repeated twice: a 32-entry vpermw table (index bit 4 ignored). 2 and 3 bits: the values
// already repeat every 4 entries.
inline __m512i word_table(__m512 t, float s, float o = 0.f) {
  const __m512 v = _mm512_mul_ps(t, _mm512_set1_ps(s));
  const __m256bh h = _mm512_cvtneps_pbh(o != 0.f ? _mm512_add_ps(v, _mm512_set1_ps(o)) : v);
  const __m256i hi = (__m256i)h;
  return _mm512_inserti64x4(_mm512_castsi256_si512(hi), hi, 1);
}

template <int BITS>
inline void tables(const float* table, __m512* lo, __m512* hi) {
  alignas(64) float t[16], h[16];
  for (int i = 0; i < 16; ++i) {
    t[i] = BITS == 4 ? table[i] : table[i & 3];
    h[i] = BITS == 3 ? table[4 + (i & 3)] : 0.f;
  }
  *lo = _mm512_load_ps(t);
  *hi = _mm512_load_ps(h);
}

// Chunk c of a row's block to 32 bf16 in natural column order: one shift and one `vpermw` (slots c
// and c + C of a lane are columns 2j and 2j + 1, the lane's low and high word). `row` is the
// block's bytes in the form the SIMD exact kernels read (3 bits: the 2-bit block of the low bits,
// then 16 uint16 lane masks of the high bits), d its first 64 bytes, tw / th the 32-entry tables
// of word_table (th: 3 bits' codes 4..7).
template <int BITS>
inline __m512i decode_chunk(const uint8_t* row, __m512i d, int c, __m512i tw, __m512i th) {
  constexpr int C = BITS == 4 ? 4 : 8, SH = BITS == 4 ? 4 : 2;
  const __m512i idx = c ? _mm512_srli_epi32(d, SH * c) : d;
  __m512i w = _mm512_permutexvar_epi16(idx, tw);
  if constexpr (BITS == 3) {
    // high bits of slots c (low words) and c + C (high words): both uint16 masks in every lane,
    // word 2j / 2j + 1 shifted right by j, bit 0 tested -> the 32-bit word mask
    const __m512i hcnt = _mm512_setr_epi32(0, 0x10001, 0x20002, 0x30003, 0x40004, 0x50005, 0x60006,
                                            0x70007, 0x80008, 0x90009, 0xa000a, 0xb000b, 0xc000c,
                                            0xd000d, 0xe000e, 0xf000f);
    uint16_t m0, m1;
    std::memcpy(&m0, row + 64 + 2 * c, 2);
    std::memcpy(&m1, row + 64 + 2 * (c + C), 2);
    const __m512i hb = _mm512_set1_epi32(int(uint32_t(m0) | (uint32_t(m1) << 16)));
    const __mmask32 k = _mm512_test_epi16_mask(_mm512_srlv_epi16(hb, hcnt), _mm512_set1_epi16(1));
    w = _mm512_mask_permutexvar_epi16(w, k, idx, th);
  } else {
    (void)row, (void)th;
  }
  return w;
}

}  // namespace
}  // namespace flute_cpu
#endif
