// flute CPU kernel, AVX2 path (AVX2 + FMA), for x86-64 without AVX-512. Same layout and order of
// operations as the AVX-512 path, on 8-lane halves of each 16-lane block row: `vpermps` over an
// 8-entry table (two tables and a blend on index bit 3 for 4 bits; for 3 bits the high bit is
// expanded from the uint16 mask and blends the low-half and high-half tables).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "avx2_common.h"
#include "dense_gemv.h"

namespace flute_cpu {
namespace {

template <int BITS>
inline __m256 lookup8(__m256 TA, __m256 TB, __m256i d, int s, uint16_t hi, int h);

// Two rows of one tile, one activation row.
template <int BITS>
inline void rows2(const GemmArgs& a, const uint8_t* row0, int R, const float* x, const float* sc,
                  float* res, const uint8_t* last_row0) {
  constexpr int C = BITS == 4 ? 4 : 8;
  constexpr int BB = 4 * C * BITS;
  __m256 TA, TB;
  split_table<BITS>(a.table, &TA, &TB);
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
    // last_row0: the last block's rows (whole, BB apart) where it is stored short
    const uint8_t* blk = last_row0 && b == a.nblocks - 1 ? last_row0 : row0 + b * 4 * BB;
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
            const __m256 w = lookup8<BITS>(TA, TB, d, s, hi, h);
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
    const uint8_t* tile = a.qw + t * a.tile_bytes;
    // a short last block (lut_kernel.h) expanded for the tile's 4 rows
    alignas(32) uint8_t last[4 * BB];
    const bool short_last = a.last_bytes < BB;
    if (short_last) expand_last_rows(BITS, tile, a.nblocks, a.last_bytes, last);
    for (int64_t m = 0; m < a.M; ++m) {
      for (int r0 = 0; r0 < 4 && 4 * t + r0 < a.N; r0 += 2) {
        const int R = 4 * t + r0 + 1 < a.N ? 2 : 1;
        rows2<BITS>(a, tile + r0 * BB, R, a.x + m * 16, sc.data() + r0 * ngp, res, short_last ? last + r0 * BB : nullptr);
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

// 8 decoded table values: slot s of lanes 8h .. 8h+7 of a row block (d: those lanes, hi: the 3-bit
// high-bit word of slot s). TA/TB: the table's two 8-entry halves (see rows2).
template <int BITS>
inline __m256 lookup8(__m256 TA, __m256 TB, __m256i d, int s, uint16_t hi, int h) {
  constexpr int SH = BITS == 4 ? 4 : 2;
  static_assert(BITS == 3 || BITS == 4, "2 bits have the pair layout's kernels");
  const __m256i idx = _mm256_srli_epi32(d, SH * s);
  __m256 sel;
  if (BITS == 4) {
    sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
  } else {
    const __m256i bitsel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i hb = _mm256_and_si256(_mm256_set1_epi32((hi >> (8 * h)) & 0xff), bitsel);
    sel = _mm256_castsi256_ps(_mm256_cmpeq_epi32(hb, bitsel));
  }
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(TA, idx), _mm256_permutevar8x32_ps(TB, idx), sel);
}

// Rows [r0, r1) to fp32 or bf16 (the panel path's decode), groups of a multiple of 32 columns or one
// group: one scale (and offset) per 32-column chunk. Even and odd columns of a chunk are decoded as
// two 16-wide slots and interleaved into natural order.
template <int BITS>
void decode_bits(const DecodeArgs& a, int64_t r0, int64_t r1) {
  constexpr int C = BITS == 4 ? 4 : 8;
  constexpr int BB = 4 * C * BITS;
  __m256 TA, TB;
  split_table<BITS>(a.table, &TA, &TB);
  FloatBuf sc(a.ng), off(a.ng);
  alignas(32) float tmp[32];
  for (int64_t n = r0; n < r1; ++n) {
    load_row_f32(a.scales, a.stype, n, a.ng, sc.data());
    if (a.offsets) load_row_f32(a.offsets, a.stype, n, a.ng, off.data());
    const uint8_t* row = row_codes(a.qw, a.nblocks, a.bits, n);
    float* df = static_cast<float*>(a.dst) + (n - r0) * a.ld;
    uint16_t* dh = static_cast<uint16_t*>(a.dst) + (n - r0) * a.ld;
    for (int64_t b = 0; b < a.nblocks; ++b) {
      const uint8_t* rb = row + b * 4 * BB;
      const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb));
      const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + 32));
      for (int c = 0; c < C; ++c) {
        const int64_t col0 = (b * C + c) * 32;
        if (col0 >= a.K) break;
        const int64_t g = col0 / a.G;
        const __m256 s = _mm256_set1_ps(sc[g]), o = _mm256_set1_ps(a.offsets ? off[g] : 0.f);
        uint16_t he = 0, ho = 0;
        if (BITS == 3) {
          std::memcpy(&he, rb + 64 + 2 * c, 2);
          std::memcpy(&ho, rb + 64 + 2 * (c + C), 2);
        }
        __m256 v[4];
        for (int h = 0; h < 2; ++h) {
          const __m256i d = h ? d1 : d0;
          // mul then add, not FMA: the same rounding as the portable decode
          const __m256 e = _mm256_add_ps(_mm256_mul_ps(lookup8<BITS>(TA, TB, d, c, he, h), s), o);
          const __m256 od = _mm256_add_ps(_mm256_mul_ps(lookup8<BITS>(TA, TB, d, c + C, ho, h), s), o);
          const __m256 lo = _mm256_unpacklo_ps(e, od), hi = _mm256_unpackhi_ps(e, od);
          v[2 * h] = _mm256_permute2f128_ps(lo, hi, 0x20);
          v[2 * h + 1] = _mm256_permute2f128_ps(lo, hi, 0x31);
        }
        const int64_t cnt = min64(32, a.K - col0);
        if (!a.bf16) {
          float* dst = cnt == 32 ? df + col0 : tmp;
          for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + 8 * i, v[i]);
          if (cnt < 32) std::memcpy(df + col0, tmp, cnt * sizeof(float));
        } else {
          alignas(32) uint16_t hb[32];
          for (int i = 0; i < 2; ++i) {  // packus interleaves 128-bit lanes; 0xD8 restores order
            const __m256i p = _mm256_packus_epi32(bf16_bits(v[2 * i]), bf16_bits(v[2 * i + 1]));
            _mm256_store_si256(reinterpret_cast<__m256i*>(hb + 16 * i), _mm256_permute4x64_epi64(p, 0xD8));
          }
          std::memcpy(dh + col0, hb, cnt * sizeof(uint16_t));
        }
      }
    }
  }
}

// dense_gemv.h on 256-bit registers: lanes 0-7 and 8-15 of each accumulator in two registers (lo
// from the chunk's first 32 bytes, hi from its second), so a row needs four; two rows at a time
// (16 ymm registers). The tail chunk is copied into a zeroed buffer first.
template <int R>
inline void dense_rows256(const uint16_t* const (&rp)[R], int64_t K, const float* x, int64_t M, float* const (&yp)[R],
                          int64_t N) {
  const int64_t kp = dense_k_pad(K), kf = K / kDenseChunk * kDenseChunk;
  const __m256i odd = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  alignas(32) uint16_t tail[R][kDenseChunk] = {};
  for (int r = 0; r < R; ++r) std::memcpy(tail[r], rp[r] + kf, (K - kf) * 2);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * kp;
    __m256 e[R][2], o[R][2];
    for (int r = 0; r < R; ++r) e[r][0] = e[r][1] = o[r][0] = o[r][1] = _mm256_setzero_ps();
    auto step = [&](int64_t c, bool masked) {
      if (m == 0 && !masked)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rp[r] + c) + kDensePrefetchBytes, _MM_HINT_T0);
      for (int hh = 0; hh < 2; ++hh) {
        const __m256 xe = _mm256_loadu_ps(xr + c + 8 * hh), xo = _mm256_loadu_ps(xr + c + 16 + 8 * hh);
        for (int r = 0; r < R; ++r) {
          const uint16_t* p = (masked ? tail[r] : rp[r] + c) + 16 * hh;
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          e[r][hh] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, e[r][hh]);
          o[r][hh] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), xo, o[r][hh]);
        }
      }
    };
    for (int64_t c = 0; c < kf; c += kDenseChunk) step(c, false);
    if (kf < K) step(kf, true);
    for (int r = 0; r < R; ++r) {
      const __m256 s8 = _mm256_add_ps(_mm256_add_ps(e[r][0], o[r][0]), _mm256_add_ps(e[r][1], o[r][1]));
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      yp[r][m * N] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    }
  }
}

}  // namespace

void decode_avx2(const DecodeArgs& a, int64_t r0, int64_t r1) {
  if (a.G % 32 != 0 && a.ng != 1) {  // a group boundary inside a chunk: the scalar path
    decode_portable(a, r0, r1);
    return;
  }
  switch (a.bits) {
    // 2 bits never come here: they run on the pair layout (pair_lut.h)
    case 3: decode_bits<3>(a, r0, r1); break;
    default: decode_bits<4>(a, r0, r1); break;
  }
}

void f32_to_bf16_avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    // packus keeps the 16-bit values (all <= 0xffff) and interleaves 128-bit halves: 0x d8 undoes it
    const __m256i p = _mm256_packus_epi32(bf16_bits(_mm256_loadu_ps(src + i)), bf16_bits(_mm256_loadu_ps(src + i + 8)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permute4x64_epi64(p, 0xd8));
  }
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

void bf16_to_f32_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

void legacy_3bit_tile_avx2(const uint8_t* src, uint8_t* dst, int64_t rowblocks) {
  // Low plane: byte (h, q, i) of register reg (half reg of the 2-bit block after the int8 kernel's
  // byte shuffle) holds the low fields of parts 0-3 at bits 0-1, 2-3, 4-5, 6-7, here gathered from
  // R0 | R1 | R2 (flute/cpu_layout.py), then put back in lane order by that shuffle
  // (bytes_by_position is its own inverse).
  const __m256i m03 = _mm256_set1_epi8(0x03), m0C = _mm256_set1_epi8(0x0C), mF0 = _mm256_set1_epi8(static_cast<char>(0xF0));
  // High plane: with the bytes (h, q, i) (dword 4h + q) moved to position 8q + 4h + i (dword 2q + h),
  // the movemask of the bit holding part p's high bit in every byte has, in its byte q, the bits of
  // lanes 8 reg .. 8 reg + 7 of slot 4q + p: byte reg of legacy uint16 4q + p, i.e. byte 8q + d of
  // the legacy plane for d = 2p + reg. With the 8 masks as dwords d of V, that is the 8x4 byte
  // transpose V byte 4d + q -> 8q + d: bytes_by_position in each half (d < 4, d >= 4) and a dword
  // interleave of the halves.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t rb = 0; rb < rowblocks; ++rb, src += 96, dst += 96) {
    const __m256i R0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m256i R1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
    const __m256i R2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64));
    // reg 0: R0 bits 0-1, R1 bits 1-2, R2 bits 0-3; reg 1: R0 bits 4-5, R1 bits 5-6, R2 bits 4-7
    const __m256i L0 = _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(R0, m03), _mm256_and_si256(_mm256_slli_epi16(R1, 1), m0C)),
                                       _mm256_and_si256(_mm256_slli_epi16(R2, 4), mF0));
    const __m256i L1 = _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(R0, 4), m03),
                                                       _mm256_and_si256(_mm256_srli_epi16(R1, 3), m0C)),
                                       _mm256_and_si256(R2, mF0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bytes_by_position(L0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), bytes_by_position(L1));
    const __m256i H0 = _mm256_permutevar8x32_epi32(R0, order), H1 = _mm256_permutevar8x32_epi32(R1, order);
    // bit k of each byte to bit 7 (the 16-bit shift carries the low byte's bits into the high
    // byte's low bits only, below bit 7). High bits: (0, 0) R0 bit 2, (0, 1) R0 bit 6, (1, 0) R1
    // bit 3, (1, 1) R1 bit 7, (2, 0) R0 bit 3, (2, 1) R0 bit 7, (3, 0) R1 bit 0, (3, 1) R1 bit 4.
#define FLUTE_MASK(H, bit) _mm256_movemask_epi8(_mm256_slli_epi16(H, 7 - (bit)))
    const __m256i V = _mm256_setr_epi32(FLUTE_MASK(H0, 2), FLUTE_MASK(H0, 6), FLUTE_MASK(H1, 3), FLUTE_MASK(H1, 7),
                                        FLUTE_MASK(H0, 3), FLUTE_MASK(H0, 7), FLUTE_MASK(H1, 0), FLUTE_MASK(H1, 4));
#undef FLUTE_MASK
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64),
                        _mm256_permutevar8x32_epi32(bytes_by_position(V), order));
  }
}

void gemm_avx2(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    // 2 bits never come here: they run on the pair layout (pair_lut.h)
    case 3: gemm_bits<3>(a, t0, t1); break;
    default: gemm_bits<4>(a, t0, t1); break;
  }
}

void gemv_bf16_avx2(const uint16_t* w, int64_t K, const float* x, int64_t M, int64_t N, int64_t n0, int64_t n1,
                    float* y, bool two_streams) {
  dense_row_blocks<2>(n0, n1, two_streams, [&](const int64_t (&rows)[2]) {
    const uint16_t* const rp[2] = {w + rows[0] * K, w + rows[1] * K};
    float* const yp[2] = {y + rows[0], y + rows[1]};
    dense_rows256<2>(rp, K, x, M, yp, N);
  }, [&](int64_t n) {
    const uint16_t* const rp[1] = {w + n * K};
    float* const yp[1] = {y + n};
    dense_rows256<1>(rp, K, x, M, yp, N);
  });
}

}  // namespace flute_cpu
#endif
