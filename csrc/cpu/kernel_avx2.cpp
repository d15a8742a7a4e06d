// flute CPU kernel, AVX2 path (AVX2 + FMA), for x86-64 without AVX-512. Same layout and order of
// operations as the AVX-512 path, on 8-lane halves of each 16-lane block row: `vpermps` over an
// 8-entry table (two tables and a blend on index bit 3 for 4 bits; for 3 bits the high bit is
// expanded from the uint16 mask and blends the low-half and high-half tables).
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

// Two rows of one tile, one activation row.
template <int BITS>
inline void rows2(const GemmArgs& a, const uint8_t* row0, int R, const float* x, const float* sc,
                  float* res) {
  constexpr int C = BITS == 4 ? 4 : 8;
  constexpr int SH = BITS == 4 ? 4 : 2;
  constexpr int BB = 4 * C * BITS;
  alignas(32) float t0[8], t1[8];
  for (int i = 0; i < 8; ++i) {
    t0[i] = BITS == 4 ? a.table[i] : a.table[i & 3];
    t1[i] = BITS == 4 ? a.table[8 + i] : BITS == 3 ? a.table[4 + (i & 3)] : 0.f;
  }
  const __m256 TA = _mm256_load_ps(t0), TB = _mm256_load_ps(t1);
  const __m256i bitsel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const int64_t ngp = a.ngp, cpg = a.cpg;
  __m256 acc[2][2], tot[2][2];
  for (int r = 0; r < 2; ++r)
    for (int h = 0; h < 2; ++h) acc[r][h] = tot[r][h] = _mm256_setzero_ps();
  int64_t g = 0, cc = 0;
  auto flush = [&]() {
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(sc[r * ngp + g]);
      for (int h = 0; h < 2; ++h) {
        tot[r][h] = _mm256_fmadd_ps(acc[r][h], s, tot[r][h]);
        acc[r][h] = _mm256_setzero_ps();
      }
    }
  };
  for (int64_t b = 0; b < a.nblocks; ++b) {
    const uint8_t* blk = row0 + b * 4 * BB;
    const float* xb = x + b * C * 2 * a.M * 16;  // x: [K_pad/16 vectors][M][16]
    for (int c = 0; c < C; ++c) {
      for (int e = 0; e < 2; ++e) {
        const int s = c + e * C;
        for (int r = 0; r < R; ++r) {
          const uint8_t* rb = blk + r * BB;
          uint16_t hi = 0;
          if (BITS == 3) std::memcpy(&hi, rb + 64 + 2 * s, 2);
          for (int h = 0; h < 2; ++h) {
            const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + 32 * h));
            const __m256i idx = _mm256_srli_epi32(d, SH * s);
            __m256 w;
            if (BITS == 4) {
              w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(TA, idx), _mm256_permutevar8x32_ps(TB, idx),
                                   _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
            } else if (BITS == 2) {
              w = _mm256_permutevar8x32_ps(TA, idx);
            } else {
              const __m256i hb = _mm256_and_si256(_mm256_set1_epi32((hi >> (8 * h)) & 0xff), bitsel);
              const __m256 sel = _mm256_castsi256_ps(_mm256_cmpeq_epi32(hb, bitsel));
              w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(TA, idx), _mm256_permutevar8x32_ps(TB, idx), sel);
            }
            acc[r][h] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + (2 * c + e) * a.M * 16 + 8 * h), acc[r][h]);
          }
        }
      }
      if (++cc == cpg) {
        flush();
        ++g;
        cc = 0;
      }
    }
  }
  if (cc) flush();
  for (int r = 0; r < R; ++r) res[r] = hsum(_mm256_add_ps(tot[r][0], tot[r][1]));
}

template <int BITS>
void gemm_bits(const GemmArgs& a, int64_t t0, int64_t t1) {
  constexpr int BB = 4 * (BITS == 4 ? 4 : 8) * BITS;
  const int64_t ngp = a.ngp, ng = a.ng;
  FloatBuf sc(4 * ngp), off(4 * ng);
  float res[2];
  for (int64_t t = t0; t < t1; ++t) {
    for (int r = 0; r < 4; ++r) {
      float* s = sc.data() + r * ngp;
      for (int64_t i = 0; i < ngp; ++i) s[i] = 0.f;
      if (4 * t + r < a.N) {
        load_row_f32(a.scales, a.stype, 4 * t + r, ng, s);
        if (a.offsets) load_row_f32(a.offsets, a.stype, 4 * t + r, ng, off.data() + r * ng);
      }
    }
    const uint8_t* tile = a.qw + t * a.nblocks * 4 * BB;
    for (int64_t m = 0; m < a.M; ++m) {
      for (int r0 = 0; r0 < 4 && 4 * t + r0 < a.N; r0 += 2) {
        const int R = 4 * t + r0 + 1 < a.N ? 2 : 1;
        rows2<BITS>(a, tile + r0 * BB, R, a.x + m * 16, sc.data() + r0 * ngp, res);
        for (int r = 0; r < R; ++r) {
          float v = res[r];
          if (a.offsets) {
            float o = 0.f;
            for (int64_t gg = 0; gg < ng; ++gg) o += off[(r0 + r) * ng + gg] * a.xsum[m * ng + gg];
            v += o;
          }
          a.out[m * a.N + 4 * t + r0 + r] = v;
        }
      }
    }
  }
}

}  // namespace

void gemm_avx2(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2: gemm_bits<2>(a, t0, t1); break;
    case 3: gemm_bits<3>(a, t0, t1); break;
    default: gemm_bits<4>(a, t0, t1); break;
  }
}

}  // namespace flute_cpu
#endif
