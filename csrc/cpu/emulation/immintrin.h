// Test-only: the AVX-512 intrinsics in software, so that the AVX-512 translation units build and
// run on a CPU without AVX-512 (an AVX2 one), where their tests would otherwise skip. setup.py puts
// this folder first on those units' include path when FLUTE_CPU_EMULATE_AVX512=1 (see
// .ci/avx512_emulated.sh): `#include <immintrin.h>` then gets the compiler's own header (the
// AVX2 intrinsics stay native) and SIMDe's AVX-512 intrinsics under their Intel names (Debian's
// libsimde-dev, header only). Results are those of the instructions (SIMDe's definitions), not
// their speed: never a build for timing. AMX has no software form; that unit is left out.
#pragma once
#include_next <immintrin.h>

#include <cstdint>
#include <cstring>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// The few intrinsics the kernels use that SIMDe 0.7.4 does not alias, written out from their
// definitions in the Intel intrinsics guide.
namespace flute_emulation {

inline simde__m256 extractf32x8_ps(simde__m512 a, int imm) {
  simde__m256 r;
  std::memcpy(&r, reinterpret_cast<const char*>(&a) + 32 * (imm & 1), 32);
  return r;
}

// Masked-off lanes are zero and their memory is not read (as the instruction suppresses faults).
inline simde__m512 maskz_loadu_ps(simde__mmask16 k, const void* p) {
  float v[16];
  for (int i = 0; i < 16; ++i) v[i] = (k >> i) & 1 ? static_cast<const float*>(p)[i] : 0.f;
  simde__m512 r;
  std::memcpy(&r, v, 64);
  return r;
}

// GCC's order of additions (its avx512fintrin.h): halves, then quarters, then pairs.
inline float reduce_add_ps(simde__m512 a) {
  float v[16];
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 8; ++i) v[i] += v[i + 8];
  for (int i = 0; i < 4; ++i) v[i] += v[i + 4];
  for (int i = 0; i < 2; ++i) v[i] += v[i + 2];
  return v[0] + v[1];
}


inline simde__m512 cvtepi32_ps(simde__m512i a) {
  int32_t v[16];
  float f[16];
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(v[i]);  // round to nearest even
  simde__m512 r;
  std::memcpy(&r, f, 64);
  return r;
}

// Truncation to the low 16 bits of each dword.
inline simde__m256i cvtepi32_epi16(simde__m512i a) {
  int32_t v[16];
  int16_t h[16];
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 16; ++i) h[i] = static_cast<int16_t>(v[i]);
  simde__m256i r;
  std::memcpy(&r, h, 32);
  return r;
}

inline simde__m512i broadcast_i32x8(simde__m256i a) {
  simde__m512i r;
  std::memcpy(&r, &a, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &a, 32);
  return r;
}

// VCVTNEPS2BF16: round to nearest even, denormal inputs to signed zero, NaN to a quiet NaN.
inline simde__m256bh cvtneps_pbh(simde__m512 a) {
  uint32_t v[16];
  uint16_t h[16];
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 16; ++i) {
    const uint32_t u = v[i];
    if ((u & 0x7fffffffu) > 0x7f800000u) h[i] = static_cast<uint16_t>((u >> 16) | 0x40);
    else if ((u & 0x7f800000u) == 0) h[i] = static_cast<uint16_t>((u >> 16) & 0x8000);
    else h[i] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  }
  simde__m256bh r;
  std::memcpy(&r, h, 32);
  return r;
}


// Masked-off words are zero and not read.
inline simde__m256i maskz_loadu_epi16(simde__mmask16 k, const void* p) {
  uint16_t h[16];
  for (int i = 0; i < 16; ++i) h[i] = (k >> i) & 1 ? static_cast<const uint16_t*>(p)[i] : 0;
  simde__m256i r;
  std::memcpy(&r, h, 32);
  return r;
}

// Masked-off lanes of memory are left as they are (not written).
inline void mask_storeu_ps(void* p, simde__mmask16 k, simde__m512 a) {
  float v[16];
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) static_cast<float*>(p)[i] = v[i];
}

// fp16 to fp32 (exact), by the F16C instruction on each half.
inline simde__m512 cvtph_ps(simde__m256i a) {
  __m128i h[2];
  std::memcpy(h, &a, 32);
  __m256 f[2] = {_mm256_cvtph_ps(h[0]), _mm256_cvtph_ps(h[1])};
  simde__m512 r;
  std::memcpy(&r, f, 64);
  return r;
}

inline simde__m512i cvtepu16_epi32(simde__m256i a) {
  uint16_t h[16];
  uint32_t v[16];
  std::memcpy(h, &a, 32);
  for (int i = 0; i < 16; ++i) v[i] = h[i];
  simde__m512i r;
  std::memcpy(&r, v, 64);
  return r;
}

// Lanes 0-1 of the result from a's 128-bit lanes imm[1:0], imm[3:2]; lanes 2-3 from b's imm[5:4], imm[7:6].
inline simde__m512i shuffle_i64x2(simde__m512i a, simde__m512i b, int imm) {
  char x[64], y[64], o[64];
  std::memcpy(x, &a, 64);
  std::memcpy(y, &b, 64);
  for (int l = 0; l < 4; ++l) std::memcpy(o + 16 * l, (l < 2 ? x : y) + 16 * ((imm >> (2 * l)) & 3), 16);
  simde__m512i r;
  std::memcpy(&r, o, 64);
  return r;
}

// Within each 128-bit lane, element i takes element imm[2i+1:2i] of the same lane.
inline simde__m512 permute_ps(simde__m512 a, int imm) {
  float v[16], o[16];
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 16; ++i) o[i] = v[(i & ~3) + ((imm >> (2 * (i & 3))) & 3)];
  simde__m512 r;
  std::memcpy(&r, o, 64);
  return r;
}


// Within each 128-bit lane, element i takes element idx[i] & 3 of the same lane.
inline simde__m512 permutevar_ps(simde__m512 a, simde__m512i idx) {
  float v[16], o[16];
  int32_t x[16];
  std::memcpy(v, &a, 64);
  std::memcpy(x, &idx, 64);
  for (int i = 0; i < 16; ++i) o[i] = v[(i & ~3) + (x[i] & 3)];
  simde__m512 r;
  std::memcpy(&r, o, 64);
  return r;
}

inline simde__m512 mask_permutevar_ps(simde__m512 src, simde__mmask16 k, simde__m512 a, simde__m512i idx) {
  float s[16], o[16];
  const simde__m512 p = permutevar_ps(a, idx);
  std::memcpy(s, &src, 64);
  std::memcpy(o, &p, 64);
  for (int i = 0; i < 16; ++i)
    if (!((k >> i) & 1)) o[i] = s[i];
  simde__m512 r;
  std::memcpy(&r, o, 64);
  return r;
}

// Words whose mask bit is set: a's word shifted right by imm (0 from 16 up); the others src's.
inline simde__m512i mask_srli_epi16(simde__m512i src, simde__mmask32 k, simde__m512i a, int imm) {
  uint16_t s[32], v[32];
  std::memcpy(s, &src, 64);
  std::memcpy(v, &a, 64);
  for (int i = 0; i < 32; ++i)
    if ((k >> i) & 1) s[i] = imm > 15 ? 0 : static_cast<uint16_t>(v[i] >> imm);
  simde__m512i r;
  std::memcpy(&r, s, 64);
  return r;
}


// Words whose mask bit is set are written; the others' memory is left as it is.
template <int WORDS, class V>
inline void mask_storeu_words(void* p, uint32_t k, V a) {
  uint16_t v[WORDS];
  std::memcpy(v, &a, 2 * WORDS);
  for (int i = 0; i < WORDS; ++i)
    if ((k >> i) & 1) static_cast<uint16_t*>(p)[i] = v[i];
}


inline simde__mmask16 load_mask16(const void* p) {
  uint16_t k;
  std::memcpy(&k, p, 2);
  return k;
}


// 32 bf16: words 0-15 from b, 16-31 from a (VCVTNE2PS2BF16).
inline simde__m512bh cvtne2ps_pbh(simde__m512 a, simde__m512 b) {
  const simde__m256bh lo = cvtneps_pbh(b), hi = cvtneps_pbh(a);
  simde__m512bh r;
  std::memcpy(&r, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &hi, 32);
  return r;
}

}  // namespace flute_emulation

#define _mm512_extractf32x8_ps(a, imm) flute_emulation::extractf32x8_ps(a, imm)
#define _mm512_maskz_loadu_ps(k, p) flute_emulation::maskz_loadu_ps(k, p)
#define _mm512_reduce_add_ps(a) flute_emulation::reduce_add_ps(a)
#define _mm512_cvtepi32_ps(a) flute_emulation::cvtepi32_ps(a)
#define _mm512_cvtepi32_epi16(a) flute_emulation::cvtepi32_epi16(a)
#define _mm512_broadcast_i32x8(a) flute_emulation::broadcast_i32x8(a)
#define _mm512_cvtneps_pbh(a) flute_emulation::cvtneps_pbh(a)
#define _mm512_cvtne2ps_pbh(a, b) flute_emulation::cvtne2ps_pbh(a, b)
#define _mm256_maskz_loadu_epi16(k, p) flute_emulation::maskz_loadu_epi16(k, p)
#define _mm512_mask_storeu_ps(p, k, a) flute_emulation::mask_storeu_ps(p, k, a)
#define _mm512_cvtph_ps(a) flute_emulation::cvtph_ps(a)
#define _mm512_cvtepu16_epi32(a) flute_emulation::cvtepu16_epi32(a)
#define _mm512_shuffle_i64x2(a, b, imm) flute_emulation::shuffle_i64x2(a, b, imm)
#define _mm512_permute_ps(a, imm) flute_emulation::permute_ps(a, imm)
#define _mm512_permutevar_ps(a, idx) flute_emulation::permutevar_ps(a, idx)
#define _mm512_mask_permutevar_ps(src, k, a, idx) flute_emulation::mask_permutevar_ps(src, k, a, idx)
#define _mm512_mask_srli_epi16(src, k, a, imm) flute_emulation::mask_srli_epi16(src, k, a, imm)
#define _mm512_mask_storeu_epi16(p, k, a) flute_emulation::mask_storeu_words<32>(p, k, a)
#define _mm256_mask_storeu_epi16(p, k, a) flute_emulation::mask_storeu_words<16>(p, k, a)
#define _load_mask16(p) flute_emulation::load_mask16(p)
#define _cvtu32_mask32(x) static_cast<simde__mmask32>(x)
