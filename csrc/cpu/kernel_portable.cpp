// flute CPU kernel, portable path: plain C++ (no intrinsics), any architecture. Same layout, same
// per-group order of operations as the vector paths (partial sum per group, times the scale).

#include <cmath>

#include "dense_gemv.h"
#include "lut_kernel.h"

namespace flute_cpu {

void gemm_portable(const GemmArgs& a, int64_t t0, int64_t t1) {
  const int C = chunks_per_block(a.bits), BB = block_bytes(a.bits);
  FloatBuf sc(a.ngp), off(a.ng);
  for (int64_t t = t0; t < t1; ++t) {
    for (int r = 0; r < 4; ++r) {
      const int64_t n = 4 * t + r;
      if (n >= a.N) break;
      for (int64_t i = 0; i < a.ngp; ++i) sc.p[i] = 0.f;
      load_row_f32(a.scales, a.stype, n, a.ng, sc.data());
      if (a.offsets) load_row_f32(a.offsets, a.stype, n, a.ng, off.data());
      const uint8_t* row = row_codes(a.qw, a.nblocks, a.bits, 4 * t + r);
      for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.x + m * 16;  // x: [K_pad/16 vectors][M][16]
        float tot = 0.f, acc = 0.f;
        int64_t g = 0, cc = 0;
        for (int64_t b = 0; b < a.nblocks; ++b) {
          const uint8_t* rb = row + b * 4 * BB;
          for (int c = 0; c < C; ++c) {
            for (int e = 0; e < 2; ++e) {
              const int s = c + e * C;
              const float* xv = x + ((b * C + c) * 2 + e) * a.M * 16;
              for (int j = 0; j < 16; ++j) acc += a.table[code_at(rb, a.bits, j, s)] * xv[j];
            }
            if (++cc == a.cpg) {
              tot += acc * sc[g];
              acc = 0.f;
              ++g;
              cc = 0;
            }
          }
        }
        if (cc) tot += acc * sc[g];
        if (a.offsets) {
          float o = 0.f;
          for (int64_t gg = 0; gg < a.ng; ++gg) o += off[gg] * a.xsum[m * a.ng + gg];
          tot += o;
        }
        a.out[m * a.N + n] = tot;
      }
    }
  }
}

// The int8 mode (see Int8Args), scalar: the integer sums are those of the vector path exactly; only
// the order of the float additions differs.
void gemm_int8_portable(const Int8Args& a, int64_t t0, int64_t t1) {
  const int P = int8_parts(a.bits), C = chunks_per_block(a.bits), BB = block_bytes(a.bits);
  const int cols = 64 * P;
  FloatBuf ws(a.ng), off(a.ng);
  for (int64_t t = t0; t < t1; ++t) {
    for (int r = 0; r < 4; ++r) {
      const int64_t n = 4 * t + r;
      if (n >= a.N) break;
      load_row_f32(a.scales, a.stype, n, a.ng, ws.data());
      if (a.offsets) load_row_f32(a.offsets, a.stype, n, a.ng, off.data());
      const uint8_t* row = row_codes(a.qw, a.nblocks, a.bits, 4 * t + r);
      for (int64_t m = 0; m < a.M; ++m) {
        float tot = 0.f;
        for (int64_t b = 0; b < a.nblocks; ++b) {
          const uint8_t* rb = row + b * 4 * BB;
          const int8_t* xb = a.xq + (b * a.M + m) * cols;
          for (int p = 0; p < P; ++p)
            for (int h = 0; h < 2; ++h)
              for (int q = 0; q < 4; ++q) {
                int32_t isum = 0;
                for (int reg = 0; reg < 2; ++reg)
                  for (int i = 0; i < 4; ++i)
                    isum += a.tu[code_at(rb, a.bits, 8 * reg + 4 * h + i, P * q + p)] *
                            xb[(reg * P + p) * 32 + h * 16 + q * 4 + i];
                const int64_t g = min64((b * C + (P * q + p) % C) * 32 / a.G, a.ng - 1);
                const int64_t w = ((b * a.M + m) * P + p) * 16 + h * 8 + 2 * q;  // int16 2q of half h
                const int32_t v = (isum - a.xcorr[w] - a.xcorr[w + 1]) * a.xk[w];
                tot += static_cast<float>(v) * (ws[g] * a.xu[b * a.M + m]);
              }
        }
        if (a.offsets) {
          float o = 0.f;
          for (int64_t gg = 0; gg < a.ng; ++gg) o += off[gg] * a.xsum[m * a.ng + gg];
          tot += o;
        }
        a.out[m * a.N + n] = tot;
      }
    }
  }
}

const int16_t* int8_positions(int bits) {
  struct Tables {
    int16_t pos[3][256];
    Tables() {
      for (int b = 2; b <= 4; ++b) {
        const int P = int8_parts(b);
        for (int reg = 0; reg < 2; ++reg)
          for (int p = 0; p < P; ++p)
            for (int h = 0; h < 2; ++h)
              for (int q = 0; q < 4; ++q)
                for (int i = 0; i < 4; ++i)
                  pos[b - 2][int8_col(b, reg, p, h, q, i)] =
                      static_cast<int16_t>((reg * P + p) * 32 + h * 16 + q * 4 + i);
      }
    }
  };
  static const Tables t;  // built once, thread-safe (C++11 static initialization)
  return t.pos[bits - 2];
}

bool quantize_x_int8_portable(const float* xf, int bits, int8_t* dst, int16_t* corr, int16_t* k, float* u) {
  const int P = int8_parts(bits), C = chunks_per_block(bits), cols = 64 * P;
  const int16_t* pos = int8_positions(bits);
  float cmax[8];
  int16_t kc[8];
  for (int ch = 0; ch < C; ++ch) {
    float amax = 0.f;
    bool finite = true;  // a max drops a NaN: test each value
    for (int c = 32 * ch; c < 32 * ch + 32; ++c) {
      const float v = xf[c] < 0.f ? -xf[c] : xf[c];
      amax = v > amax ? v : amax;
      finite = finite && v <= 3.4028235e38f;
    }
    if (!finite) return false;
    cmax[ch] = amax;
  }
  *u = int8_block_scales(cmax, C, kc);
  for (int c = 0; c < cols; ++c) {
    const float sc = static_cast<float>(kc[c / 32]) * *u;
    const float r = sc > 0.f ? std::nearbyint(xf[c] / sc) : 0.f;
    dst[pos[c]] = static_cast<int8_t>(r > 127.f ? 127.f : r < -127.f ? -127.f : r);
  }
  for (int p = 0; p < P; ++p)
    for (int h = 0; h < 2; ++h)
      for (int w = 0; w < 8; ++w) {  // int16 w of half h: bytes 2w, 2w + 1 of both registers
        int sum = 0;
        for (int reg = 0; reg < 2; ++reg)
          sum += dst[(reg * P + p) * 32 + h * 16 + 2 * w] + dst[(reg * P + p) * 32 + h * 16 + 2 * w + 1];
        corr[p * 16 + h * 8 + w] = static_cast<int16_t>(64 * sum);
        k[p * 16 + h * 8 + w] = kc[(P * (w / 2) + p) % C];
      }
  return true;
}

void decode_portable(const DecodeArgs& a, int64_t r0, int64_t r1) {
  const int C = chunks_per_block(a.bits), BB = block_bytes(a.bits);
  FloatBuf sc(a.ng), off(a.ng);
  for (int64_t n = r0; n < r1; ++n) {
    load_row_f32(a.scales, a.stype, n, a.ng, sc.data());
    if (a.offsets) load_row_f32(a.offsets, a.stype, n, a.ng, off.data());
    const uint8_t* row = row_codes(a.qw, a.nblocks, a.bits, n);
    float* df = static_cast<float*>(a.dst) + (n - r0) * a.ld;
    uint16_t* dh = static_cast<uint16_t*>(a.dst) + (n - r0) * a.ld;
    for (int64_t b = 0; b < a.nblocks; ++b) {
      const uint8_t* rb = row + b * 4 * BB;
      for (int c = 0; c < C; ++c)
        for (int e = 0; e < 2; ++e)
          for (int j = 0; j < 16; ++j) {
            const int64_t col = b * C * 32 + 32 * c + 2 * j + e;
            if (col >= a.K) continue;
            const int64_t g = col / a.G;
            const float v = a.table[code_at(rb, a.bits, j, c + e * C)] * sc[g] + off[g];
            if (a.bf16) dh[col] = f32_to_bf16(v); else df[col] = v;
          }
    }
  }
}

// The spec of dense_gemv.h's arithmetic, scalar.
void gemv_bf16_portable(const uint16_t* w, int64_t K, const float* x, int64_t M, int64_t N, int64_t n0,
                        int64_t n1, float* y, bool two_streams) {
  (void)two_streams;
  const int64_t kp = dense_k_pad(K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * kp;
      float acc[2][16] = {};
      for (int64_t c = 0; c < kp; c += kDenseChunk)
        for (int j = 0; j < 16; ++j)
          for (int h = 0; h < 2; ++h) {
            const int64_t k = c + 2 * j + h;
            acc[h][j] = std::fma(k < K ? bf16_to_f32(wr[k]) : 0.f, xr[c + 16 * h + j], acc[h][j]);
          }
      float s[16];
      for (int j = 0; j < 16; ++j) s[j] = acc[0][j] + acc[1][j];
      for (int half = 8; half >= 1; half /= 2)
        for (int j = 0; j < half; ++j) s[j] = s[j] + s[j + half];
      y[m * N + n] = s[0];
    }
  }
}

}  // namespace flute_cpu
