// Test-only: the AVX-512 intrinsics in software, so that the AVX-512 translation units build and
// run on a CPU without AVX-512 (an AVX2 one), where their tests would otherwise skip. setup.py puts
// this folder first on those units' include path when FLUTE_CPU_EMULATE_AVX512=1 (see
// .ci/avx512_emulated.sh): `#include <immintrin.h>` then gets the compiler's own header (the
// AVX2 intrinsics stay native) and SIMDe's AVX-512 intrinsics under their Intel names (Debian's
// libsimde-dev, header only). Results are those of the instructions (SIMDe's definitions), not
// their speed: never a build for timing. AMX has no software form; that unit is left out.
#pragma once
#include_next <immintrin.h>

#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// The few intrinsics the kernels use that SIMDe 0.7.4 does not alias, written out from their
// definitions in the Intel intrinsics guide.
namespace flute_emulation {

// The bytes of one value as another type of the same size (a vector as its element array and back).
template <class To, class From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// Element i of the result: f(element i of a), for the N elements of a vector (conversions).
template <class Out, class In, int N, class VOut, class VIn, class F>
inline VOut map(VIn a, F f) {
  const auto in = bit_cast<std::array<In, N>>(a);
  std::array<Out, N> out;
  for (int i = 0; i < N; ++i) out[i] = f(in[i]);
  return bit_cast<VOut>(out);
}

// Masked loads: masked-off elements are zero and their memory is not read (the instructions
// suppress faults there). Masked stores leave the masked-off elements' memory as it is.
template <class T, int N, class V>
inline V maskz_load(uint32_t k, const void* p) {
  std::array<T, N> v{};
  for (int i = 0; i < N; ++i)
    if ((k >> i) & 1) std::memcpy(&v[i], static_cast<const char*>(p) + i * sizeof(T), sizeof(T));
  return bit_cast<V>(v);
}
template <class T, int N, class V>
inline void mask_store(void* p, uint32_t k, V a) {
  const auto v = bit_cast<std::array<T, N>>(a);
  for (int i = 0; i < N; ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<char*>(p) + i * sizeof(T), &v[i], sizeof(T));
}

// Halves of a 64-byte vector (vector types are not template arguments here: GCC drops their
// alignment attributes there, with a warning).
inline void split(const void* whole, void* lo, void* hi) {
  std::memcpy(lo, whole, 32);
  std::memcpy(hi, static_cast<const char*>(whole) + 32, 32);
}
inline void join(void* whole, const void* lo, const void* hi) {
  std::memcpy(whole, lo, 32);
  std::memcpy(static_cast<char*>(whole) + 32, hi, 32);
}

inline simde__m256 extractf32x8_ps(simde__m512 a, int imm) {
  simde__m256 h[2];
  split(&a, &h[0], &h[1]);
  return h[imm & 1];
}

inline simde__m512i broadcast_i32x8(simde__m256i a) {
  simde__m512i r;
  join(&r, &a, &a);
  return r;
}

// GCC's order of additions (its avx512fintrin.h): halves, then quarters, then pairs.
inline float reduce_add_ps(simde__m512 a) {
  auto v = bit_cast<std::array<float, 16>>(a);
  for (int i = 0; i < 8; ++i) v[i] += v[i + 8];
  for (int i = 0; i < 4; ++i) v[i] += v[i + 4];
  for (int i = 0; i < 2; ++i) v[i] += v[i + 2];
  return v[0] + v[1];
}

// The same tree with VMAXPS's rule (the second operand where either is NaN or both are zero).
inline float reduce_max_ps(simde__m512 a) {
  auto v = bit_cast<std::array<float, 16>>(a);
  const auto mx = [](float x, float y) { return x > y ? x : y; };
  for (int i = 0; i < 8; ++i) v[i] = mx(v[i], v[i + 8]);
  for (int i = 0; i < 4; ++i) v[i] = mx(v[i], v[i + 4]);
  for (int i = 0; i < 2; ++i) v[i] = mx(v[i], v[i + 2]);
  return mx(v[0], v[1]);
}

// VCVTPS2DQ: round to nearest even (the default MXCSR mode); NaN and out-of-range to INT32_MIN.
inline int32_t cvt_nearest(float v) {
  const float r = std::nearbyint(v);
  return r >= -2147483648.f && r < 2147483648.f ? static_cast<int32_t>(r) : INT32_MIN;
}

// VCVTNEPS2BF16: round to nearest even, denormal inputs to signed zero, NaN to a quiet NaN.
inline uint16_t bf16_of(uint32_t u) {
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
inline simde__m256bh cvtneps_pbh(simde__m512 a) { return map<uint16_t, uint32_t, 16, simde__m256bh>(a, bf16_of); }

// 32 bf16: words 0-15 from b, 16-31 from a (VCVTNE2PS2BF16).
inline simde__m512bh cvtne2ps_pbh(simde__m512 a, simde__m512 b) {
  const simde__m256bh lo = cvtneps_pbh(b), hi = cvtneps_pbh(a);
  simde__m512bh r;
  join(&r, &lo, &hi);
  return r;
}

// fp16 to fp32 (exact), by the F16C instruction on each half.
inline simde__m512 cvtph_ps(simde__m256i a) {
  __m128i h[2];
  std::memcpy(h, &a, 32);
  const __m256 lo = _mm256_cvtph_ps(h[0]), hi = _mm256_cvtph_ps(h[1]);
  simde__m512 r;
  join(&r, &lo, &hi);
  return r;
}

// Lanes 0-1 of the result from a's 128-bit lanes imm[1:0], imm[3:2]; lanes 2-3 from b's imm[5:4], imm[7:6].
inline simde__m512i shuffle_i64x2(simde__m512i a, simde__m512i b, int imm) {
  const char* src[2] = {reinterpret_cast<const char*>(&a), reinterpret_cast<const char*>(&b)};
  simde__m512i r;
  for (int l = 0; l < 4; ++l) std::memcpy(reinterpret_cast<char*>(&r) + 16 * l, src[l / 2] + 16 * ((imm >> (2 * l)) & 3), 16);
  return r;
}

// Within each 128-bit lane, element i takes element sel(i) & 3 of the same lane.
template <class Sel>
inline simde__m512 permute_in_lanes(simde__m512 a, Sel sel) {
  const auto v = bit_cast<std::array<float, 16>>(a);
  std::array<float, 16> o;
  for (int i = 0; i < 16; ++i) o[i] = v[(i & ~3) + (sel(i) & 3)];
  return bit_cast<simde__m512>(o);
}
inline simde__m512 permute_ps(simde__m512 a, int imm) {
  return permute_in_lanes(a, [imm](int i) { return imm >> (2 * (i & 3)); });
}
inline simde__m512 permutevar_ps(simde__m512 a, simde__m512i idx) {
  const auto x = bit_cast<std::array<int32_t, 16>>(idx);
  return permute_in_lanes(a, [&x](int i) { return x[i]; });
}

inline simde__mmask16 load_mask16(const void* p) {
  uint16_t k;
  std::memcpy(&k, p, 2);
  return k;
}

// Elements whose mask bit is clear: src's.
template <class T, int N, class V>
inline V blend_mask(V src, uint32_t k, V a) {
  auto s = bit_cast<std::array<T, N>>(src);
  const auto v = bit_cast<std::array<T, N>>(a);
  for (int i = 0; i < N; ++i)
    if ((k >> i) & 1) s[i] = v[i];
  return bit_cast<V>(s);
}
inline simde__m512 mask_permutevar_ps(simde__m512 src, simde__mmask16 k, simde__m512 a, simde__m512i idx) {
  return blend_mask<float, 16>(src, k, permutevar_ps(a, idx));
}

// Words whose mask bit is set: a's word shifted right by imm (0 from 16 up); the others src's.
inline simde__m512i mask_srli_epi16(simde__m512i src, simde__mmask32 k, simde__m512i a, int imm) {
  const auto shifted = map<uint16_t, uint16_t, 32, simde__m512i>(
      a, [imm](uint16_t w) { return static_cast<uint16_t>(imm > 15 ? 0 : w >> imm); });
  return blend_mask<uint16_t, 32>(src, k, shifted);
}

// The float form of shuffle_i64x2 (the same 128-bit lane moves).
inline simde__m512 shuffle_f32x4(simde__m512 a, simde__m512 b, int imm) {
  return bit_cast<simde__m512>(shuffle_i64x2(bit_cast<simde__m512i>(a), bit_cast<simde__m512i>(b), imm));
}

}  // namespace flute_emulation

#define _mm512_extractf32x8_ps(a, imm) flute_emulation::extractf32x8_ps(a, imm)
#define _mm512_broadcast_i32x8(a) flute_emulation::broadcast_i32x8(a)
#define _mm512_reduce_add_ps(a) flute_emulation::reduce_add_ps(a)
#define _mm512_reduce_max_ps(a) flute_emulation::reduce_max_ps(a)
#define _mm512_cvtepi32_ps(a) \
  flute_emulation::map<float, int32_t, 16, simde__m512>(a, [](int32_t v) { return static_cast<float>(v); })
#define _mm512_cvtps_epi32(a) flute_emulation::map<int32_t, float, 16, simde__m512i>(a, flute_emulation::cvt_nearest)
#define _mm512_cvtepi32_epi16(a) \
  flute_emulation::map<int16_t, int32_t, 16, simde__m256i>(a, [](int32_t v) { return static_cast<int16_t>(v); })
#define _mm512_cvtepu16_epi32(a) \
  flute_emulation::map<uint32_t, uint16_t, 16, simde__m512i>(a, [](uint16_t v) { return uint32_t{v}; })
#define _mm512_cvtepi16_epi32(a) \
  flute_emulation::map<int32_t, int16_t, 16, simde__m512i>(a, [](int16_t v) { return int32_t{v}; })
#define _mm512_cvtepu8_epi16(a) \
  flute_emulation::map<uint16_t, uint8_t, 32, simde__m512i>(a, [](uint8_t v) { return uint16_t{v}; })
#define _mm512_cvtneps_pbh(a) flute_emulation::cvtneps_pbh(a)
#define _mm512_cvtne2ps_pbh(a, b) flute_emulation::cvtne2ps_pbh(a, b)
#define _mm512_cvtph_ps(a) flute_emulation::cvtph_ps(a)
#define _mm512_maskz_loadu_ps(k, p) flute_emulation::maskz_load<float, 16, simde__m512>(k, p)
#define _mm256_maskz_loadu_epi16(k, p) flute_emulation::maskz_load<uint16_t, 16, simde__m256i>(k, p)
#define _mm512_maskz_loadu_epi16(k, p) flute_emulation::maskz_load<uint16_t, 32, simde__m512i>(k, p)
#define _mm_maskz_loadu_epi16(k, p) flute_emulation::maskz_load<uint16_t, 8, __m128i>(k, p)
#define _mm256_maskz_loadu_ps(k, p) flute_emulation::maskz_load<float, 8, __m256>(k, p)
#define _mm512_mask_storeu_ps(p, k, a) flute_emulation::mask_store<float, 16>(p, k, a)
#define _mm512_mask_storeu_epi16(p, k, a) flute_emulation::mask_store<uint16_t, 32>(p, k, a)
#define _mm256_mask_storeu_epi16(p, k, a) flute_emulation::mask_store<uint16_t, 16>(p, k, a)
#define _mm512_shuffle_i64x2(a, b, imm) flute_emulation::shuffle_i64x2(a, b, imm)
#define _mm512_shuffle_i32x4(a, b, imm) flute_emulation::shuffle_i64x2(a, b, imm)  // the same 128-bit lane moves
#define _mm512_shuffle_f32x4(a, b, imm) flute_emulation::shuffle_f32x4(a, b, imm)
#define _mm512_permute_ps(a, imm) flute_emulation::permute_ps(a, imm)
#define _mm512_permutevar_ps(a, idx) flute_emulation::permutevar_ps(a, idx)
#define _mm512_mask_permutevar_ps(src, k, a, idx) flute_emulation::mask_permutevar_ps(src, k, a, idx)
#define _mm512_mask_srli_epi16(src, k, a, imm) flute_emulation::mask_srli_epi16(src, k, a, imm)
#define _load_mask16(p) flute_emulation::load_mask16(p)
#define _cvtu32_mask32(x) static_cast<simde__mmask32>(x)
// AVX-VNNI (kernel_int8_avxvnni.cpp, built here with FLUTE_EMULATED_AVXVNNI): the VEX form of
// AVX512-VNNI's 256-bit instruction, the same result.
#define _mm256_dpwssd_avx_epi32(src, a, b) simde_mm256_dpwssd_epi32(src, a, b)
