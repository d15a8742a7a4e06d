// flute CPU kernels for 2 bits on the pair layout (pair_lut.h), portable path: plain C++, any
// architecture. The float operations are those of kernel_pair_avx2.cpp in the same order (std::fma
// where it fuses), so both give the same bits.

#include <cmath>

#include "pair_lut.h"

namespace flute_cpu {

bool pair_lut_portable(const float* x, int64_t K, int64_t chunks, const float* table, int8_t* lut, float* lsc) {
  float bad = 0.f;  // x * 0 is NaN exactly for a NaN or an Inf
  for (int64_t c = 0; c < chunks; ++c) {
    float v[16][16];
    float mx = 0.f;
    for (int p = 0; p < 16; ++p) {
      const int64_t k = c * kPairChunkCols + 2 * p;
      const float x0 = k < K ? x[k] : 0.f, x1 = k + 1 < K ? x[k + 1] : 0.f;
      bad += x0 * 0.f + x1 * 0.f;
      for (int e = 0; e < 16; ++e) {
        const float a = table[e & 3] * x0, b = table[e >> 2] * x1;
        v[p][e] = a + b;
        mx = std::fabs(v[p][e]) > mx ? std::fabs(v[p][e]) : mx;
      }
    }
    lsc[c] = mx / 127.f;
    const float inv = pair_lut_factor(mx);
    for (int p = 0; p < 16; ++p)
      for (int e = 0; e < 16; ++e)
        lut[c * kPairLutBytes + 16 * p + e] = static_cast<int8_t>(std::nearbyint(v[p][e] * inv));
  }
  return bad == 0.f;
}

void gemm_pair_portable(const PairArgs& a, int64_t t0, int64_t t1) {
  FloatBuf ws(kPairTileRows), row_buf(a.ng);
  float f[kPairTileRows], facc[kPairTileRows], o[1][kPairTileRows];
  for (int64_t c0 = 0; c0 < a.chunks; c0 += a.kbc) {
    const int64_t c1 = min64(a.chunks, c0 + a.kbc);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = kPairTileRows * t;
      const int rows = static_cast<int>(min64(kPairTileRows, a.N - n0));
      const uint8_t* tp = pair_tile(a.qw, a.chunks, t);
      for (int64_t m = 0; m < a.M; ++m) {
        for (int i = 0; i < kPairTileRows; ++i) {
          facc[i] = c0 == 0 || i >= rows ? 0.f : a.out[m * a.N + n0 + i];
          f[i] = 0.f;
        }
        auto flush = [&](int64_t g) {
          for (int i = 0; i < kPairTileRows; ++i) {
            float s = 0.f;
            if (i < rows) {
              const int64_t e = (n0 + i) * a.ng + g;
              s = a.stype == kF32 ? static_cast<const float*>(a.scales)[e]
                  : a.stype == kBF16 ? bf16_to_f32(static_cast<const uint16_t*>(a.scales)[e])
                                     : f16_to_f32(static_cast<const uint16_t*>(a.scales)[e]);
            }
            facc[i] = std::fma(f[i], s, facc[i]);
            f[i] = 0.f;
          }
        };
        int64_t g = a.cg[c0];
        for (int64_t c = c0; c < c1; ++c) {
          if (a.cg[c] != g) {
            flush(g);
            g = a.cg[c];
          }
          const uint8_t* cp = tp + c * kPairChunkBytes;
          const int8_t* lt = a.lut + (m * a.chunks + c) * kPairLutBytes;
          const float l = a.lsc[m * a.chunks + c];
          for (int i = 0; i < kPairTileRows; ++i) {
            int isum = 0;
            for (int s = 0; s < 4; ++s)
              for (int L = 0; L < 2; ++L) {
                const int b = cp[32 * s + 16 * L + i];
                isum += lt[16 * (4 * s + L) + (b & 15)] + lt[16 * (4 * s + 2 + L) + (b >> 4)];
              }
            f[i] = std::fma(static_cast<float>(isum), l, f[i]);
          }
        }
        flush(g);
        if (c1 == a.chunks) pair_offset_terms(a, t, row_buf.data(), o, m, 1);
        for (int i = 0; i < rows; ++i) a.out[m * a.N + n0 + i] = c1 == a.chunks ? facc[i] + o[0][i] : facc[i];
      }
    }
  }
}

namespace {
// Row i's chunk as 32 fp32 weights: table value times scale, plus offset (mul, then add).
void decode_chunk_portable(const uint8_t* cp, int i, const float* table, float sc, float off, float* dst) {
  for (int w = 0; w < kPairChunkCols; ++w) dst[w] = table[pair_code_at(cp, i, w)] * sc + off;
}
}  // namespace

void exact_pair_portable(const PairArgs& a, int64_t t0, int64_t t1) { exact_pair_impl(a, t0, t1, decode_chunk_portable); }

void decode_pair_portable(const DecodeArgs& a, int64_t r0, int64_t r1) {
  for_decode_rows(a, r0, r1, [&](const uint8_t* tp, int i, const float* sc, const float* off, float* df, uint16_t* dh) {
    for (int64_t k = 0; k < a.K; ++k) {
      const int64_t g = min64(k / a.G, a.ng - 1);
      const float v = a.table[pair_code_at(tp + (k / kPairChunkCols) * kPairChunkBytes, i, static_cast<int>(k % kPairChunkCols))] * sc[g] + off[g];
      if (a.bf16) dh[k] = f32_to_bf16(v); else df[k] = v;
    }
  });
}

}  // namespace flute_cpu
