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
// already repeat every 4 and 8 entries (tables).
inline __m512i word_table(__m512 t, float s, float o = 0.f) {
  const __m512 v = _mm512_mul_ps(t, _mm512_set1_ps(s));
  const __m256bh h = _mm512_cvtneps_pbh(o != 0.f ? _mm512_add_ps(v, _mm512_set1_ps(o)) : v);
  const __m256i hi = (__m256i)h;
  return _mm512_inserti64x4(_mm512_castsi256_si512(hi), hi, 1);
}

// The 16 fp32 table values that word_table scales: 4 bits, the table; 2 bits, its 4 entries
// repeated; 3 bits, its 8 entries repeated (decode_chunk's 3-bit indices carry garbage in bits 3-4).
template <int BITS>
inline __m512 tables(const float* table) {
  alignas(64) float t[16];
  for (int i = 0; i < 16; ++i) t[i] = table[i & ((1 << BITS) - 1)];
  return _mm512_load_ps(t);
}

// How many vectors load_block makes of a row's block: 2/4 bits its first 64 bytes, 3 bits the four
// part vectors below.
template <int BITS>
constexpr int kBlockVecs = BITS == 3 ? 4 : 1;

// vpermb indices of a 3-bit chunk c, by q0 = c / 4: output word 2j + e (both its bytes) takes the
// byte of lane j = 8 reg + 4 h + i, slot c + 8e = 4 (q0 + 2e) + c % 4, which is byte
// 16 h + 4 (q0 + 2e) + i of half reg of the part vector (lut_kernel.h's 3-bit byte order).
struct Chunk3Index {
  alignas(64) uint8_t v[2][64];
  constexpr Chunk3Index() : v{} {
    for (int q0 = 0; q0 < 2; ++q0)
      for (int byte = 0; byte < 64; ++byte) {
        const int j = byte >> 2, e = (byte >> 1) & 1;
        v[q0][byte] = static_cast<uint8_t>(32 * (j >> 3) + 16 * ((j >> 2) & 1) + 4 * (q0 + 2 * e) + (j & 3));
      }
  }
};
constexpr Chunk3Index kChunk3Index{};

// A row's block into what decode_chunk reads. 3 bits: the block is three 32-byte registers
// R0 | R1 | R2 (lut_kernel.h), and part p = s % 4 of a slot is spread over them: p 0 is R0's
// nibble bits 0-2, p 1 R1's bits 1-3, p 2 R2's bits 0-1 with R0's bit 3 above them, p 3 R2's bits
// 2-3 with R1's bit 0 above (nibble reg = 0 / 1 for lanes 0-7 / 8-15). Part vector p holds, for
// each byte b, half reg = 0 then 1, that code in bits 0-2 (higher bits garbage): one pass of
// 64-bit shifts and bit selects per block, so each chunk is then one `vpermb` and one `vpermw`.
template <int BITS>
inline void load_block(const uint8_t* rb, __m512i* v) {
  if constexpr (BITS == 3) {
    const __m512i d01 = _mm512_loadu_si512(rb);
    const __m512i r2 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + 64)));
    const __m512i r0 = _mm512_shuffle_i64x2(d01, d01, 0x44), r1 = _mm512_shuffle_i64x2(d01, d01, 0xee);
    auto by = [](int lo, int hi) {  // 64-bit shift counts: lo for half 0, hi for half 1
      return _mm512_setr_epi64(lo, lo, lo, lo, hi, hi, hi, hi);
    };
    const __m512i low2 = _mm512_set1_epi8(3);
    // 0xca: bitwise low2 ? A : B, A = the low two bits' source, B = the high bit's (bit 2)
    v[0] = _mm512_srlv_epi64(r0, by(0, 4));
    v[1] = _mm512_srlv_epi64(r1, by(1, 5));
    v[2] = _mm512_ternarylogic_epi64(low2, _mm512_srlv_epi64(r2, by(0, 4)), _mm512_srlv_epi64(r0, by(1, 5)), 0xca);
    v[3] = _mm512_ternarylogic_epi64(low2, _mm512_srlv_epi64(r2, by(2, 6)), _mm512_rolv_epi64(r1, by(2, 62)), 0xca);
  } else {
    v[0] = _mm512_loadu_si512(rb);
  }
}

// Chunk c of a row's block (load_block's vectors) to 32 bf16 in natural column order, from tw, the
// 32-entry table of word_table. 2/4 bits: one shift and one `vpermw` (slots c and c + C of a lane
// are columns 2j and 2j + 1, the lane's low and high word). 3 bits: one `vpermb` gathers the
// chunk's codes from part vector c % 4 (Chunk3Index), one `vpermw` looks them up.
template <int BITS>
inline __m512i decode_chunk(const __m512i* v, int c, __m512i tw) {
  if constexpr (BITS == 3) {
    const __m512i idx = _mm512_load_si512(kChunk3Index.v[c >> 2]);
    return _mm512_permutexvar_epi16(_mm512_permutexvar_epi8(idx, v[c & 3]), tw);
  } else {
    constexpr int SH = BITS == 4 ? 4 : 2;
    return _mm512_permutexvar_epi16(c ? _mm512_srli_epi32(v[0], SH * c) : v[0], tw);
  }
}

}  // namespace
}  // namespace flute_cpu
#endif
