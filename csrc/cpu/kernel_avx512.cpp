// flute CPU kernel, AVX-512 path (F + BW + VL + DQ, FMA). Compiled in its own translation unit with
// those flags only; the binding calls it only when cpuid reports them.
//
// Exact fp32 decode in registers: a 16-entry fp32 table in one zmm, `vpermps` with the shifted
// lanes as indices (it reads the low 4 bits of each lane, so no mask is needed; the 2- and 3-bit
// tables are repeated across the unused index bits). 3 bits: the high code bit comes straight from
// memory as a 16-bit mask register and selects a second table with a masked `vpermps`. One partial
// sum per (row, x row) per group, times the group's scale at the group's end (1-2 x rows), or
// weights times the scale before the FMAs (3-4 x rows). 2/3-bit fields: one shift serves two slots
// (in-lane vpermilps reads index bits 0-1, vpermps bits 2-3). Four rows are decoded per block and
// each decoded vector is multiplied with up to 4 activation rows; more rows = more passes over the
// tile (its codes then come from L1/L2).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <type_traits>

#include "avx512_common.h"
#include "dense_gemv.h"

namespace flute_cpu {
namespace {

template <int BITS>
inline void make_tables(const float* table, __m512* lo, __m512* hi) {
  alignas(64) float t[16], h[16];
  for (int i = 0; i < 16; ++i) {
    t[i] = BITS == 4 ? table[i] : table[i & 3];
    h[i] = BITS == 3 ? table[4 + (i & 3)] : 0.f;
  }
  *lo = _mm512_load_ps(t);
  *hi = _mm512_load_ps(h);
}

// Bytes ahead of the current block that the kernels prefetch (the whole 4-row tile stream).
constexpr int64_t kPrefetchBytes = 2048;

// R rows (consecutive rows of one tile, starting at row0) times MB activation rows.
// SW = false: one partial sum per (row, x row) per group, times the scale at the group's end (best
//             for MB <= 2: the scale costs one FMA per group).
// SW = true:  the decoded weights are multiplied by the group's scale before the FMAs (one multiply
//             per 16 weights, shared by MB rows; half the accumulators, so MB can reach 16).
// The kernels' tables, built once per call: T (index bits 0-3), TH (3-bit high half), T2 / TH2
// (2/3 bits: indexed by lane bits 2-3).
struct Tables {
  __m512 T, TH, T2, TH2;
};

template <int BITS>
Tables kernel_tables(const float* table) {
  Tables t;
  make_tables<BITS>(table, &t.T, &t.TH);
  alignas(64) float t2[16], th2[16];
  for (int i = 0; i < 16; ++i) {
    t2[i] = table[(i >> 2) & 3];
    th2[i] = BITS == 3 ? table[4 + ((i >> 2) & 3)] : 0.f;
  }
  t.T2 = _mm512_load_ps(t2);
  t.TH2 = _mm512_load_ps(th2);
  return t;
}

template <int BITS, int R, int MB, bool SW>
__attribute__((noinline)) void tile_kernel(const GemmArgs& a, const Tables& tabs, const uint8_t* row0,
                                           const uint8_t* tile, const float* x, const float* sc,
                                           float* res, bool prefetch, const uint8_t* last_row0) {
  constexpr int C = BITS == 4 ? 4 : 8;   // 32-column chunks per block
  constexpr int SH = BITS == 4 ? 4 : 2;  // bits per slot in the lane
  constexpr int BB = 4 * C * BITS;       // bytes per row-block
  const __m512 T = tabs.T, TH = tabs.TH, T2 = tabs.T2, TH2 = tabs.TH2;
  const int64_t vs = a.M * 16, ngp = a.ngp, cpg = a.cpg;  // x: [K_pad/16 vectors][M][16]
  __m512 acc[R][MB];
  __m512 tot[SW ? 1 : R][SW ? 1 : MB];
  __m512 sv[R];
  for (int r = 0; r < R; ++r) {
    sv[r] = _mm512_set1_ps(sc[r * ngp]);
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  if constexpr (!SW)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_setzero_ps();
  int64_t g = 0, cc = 0;
  for (int64_t b = 0; b < a.nblocks; ++b) {
    // last_row0: the last block's rows (whole, BB apart) where it is stored short
    const uint8_t* blk = last_row0 && b == a.nblocks - 1 ? last_row0 : row0 + b * 4 * BB;
    if (prefetch) {
      const char* pf = reinterpret_cast<const char*>(tile + b * 4 * BB + kPrefetchBytes);
      for (int i = 0; i < 4 * BB; i += 64) _mm_prefetch(pf + i, _MM_HINT_T0);
    }
    const float* xb = x + b * C * 2 * vs;
    __m512i d[R];
    for (int r = 0; r < R; ++r) d[r] = _mm512_loadu_si512(blk + r * BB);
FLUTE_UNROLL(8)
    for (int c = 0; c < C; ++c) {
FLUTE_UNROLL(2)
      for (int e = 0; e < 2; ++e) {
        const int s = c + e * C;
        const float* xv = xb + (2 * c + e) * vs;
        __m512 xr[MB <= 2 ? MB : 1];
        if constexpr (MB <= 2)
          for (int m = 0; m < MB; ++m) xr[m] = _mm512_loadu_ps(xv + m * 16);
FLUTE_UNROLL(4)
        for (int r = 0; r < R; ++r) {
          __m512 w;
          __m512i idx;
          if constexpr (BITS == 4) {
            idx = s ? _mm512_srli_epi32(d[r], SH * s) : d[r];
            w = _mm512_permutexvar_ps(idx, T);
          } else {
            // 2-bit fields: one shift serves slots s and s + 1 (chunks c, c + 1): the in-lane
            // vpermilps reads index bits 0-1 (slot s), vpermps with a table indexed by bits 2-3
            // (T2[i] = t[i >> 2]) reads slot s + 1.
            const int s0 = s & ~1;
            idx = s0 ? _mm512_srli_epi32(d[r], SH * s0) : d[r];
            w = (s & 1) ? _mm512_permutexvar_ps(idx, T2) : _mm512_permutevar_ps(T, idx);
            if constexpr (BITS == 3) {
              const __mmask16 k = _load_mask16((__mmask16*)(blk + r * BB + 64 + 2 * s));
              w = (s & 1) ? _mm512_mask_permutexvar_ps(w, k, idx, TH2) : _mm512_mask_permutevar_ps(w, k, TH, idx);
            }
          }
          if constexpr (SW) w = _mm512_mul_ps(w, sv[r]);
FLUTE_UNROLL(16)
          for (int m = 0; m < MB; ++m) {
            const __m512 xm = MB <= 2 ? xr[MB <= 2 ? m : 0] : _mm512_loadu_ps(xv + m * 16);
            acc[r][m] = _mm512_fmadd_ps(w, xm, acc[r][m]);
          }
        }
      }
      if (++cc == cpg) {
        if constexpr (!SW) {
          for (int r = 0; r < R; ++r)
            for (int m = 0; m < MB; ++m) {
              tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv[r], tot[r][m]);
              acc[r][m] = _mm512_setzero_ps();
            }
        }
        ++g;
        cc = 0;
        for (int r = 0; r < R; ++r) sv[r] = _mm512_set1_ps(sc[r * ngp + g]);
      }
    }
  }
  if constexpr (!SW) {
    if (cc)
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv[r], tot[r][m]);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) res[r * MB + m] = _mm512_reduce_add_ps(tot[r][m]);
  } else {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) res[r * MB + m] = _mm512_reduce_add_ps(acc[r][m]);
  }
}

template <int BITS>
void gemm_bits(const GemmArgs& a, int64_t t0, int64_t t1) {
  constexpr int BB = 4 * (BITS == 4 ? 4 : 8) * BITS;
  const int64_t ngp = a.ngp, ng = a.ng;
  FloatBuf sc(4 * ngp), off(4 * ng);
  float res[64];
  const Tables tabs = kernel_tables<BITS>(a.table);
  for (int64_t t = t0; t < t1; ++t) {
    for (int r = 0; r < 4; ++r) {
      float* s = sc.data() + r * ngp;
      for (int64_t i = 0; i < ngp; ++i) s[i] = 0.f;
      if (4 * t + r < a.N) {
        load_row(a.scales, a.stype, 4 * t + r, ng, s);
        if (a.offsets) load_row(a.offsets, a.stype, 4 * t + r, ng, off.data() + r * ng);
      }
    }
    const uint8_t* tile = a.qw + t * a.tile_bytes;
    // a short last block (lut_kernel.h) expanded for the tile's 4 rows
    alignas(64) uint8_t last[4 * BB];
    const bool short_last = a.last_bytes < BB;
    if (short_last) expand_last_rows(BITS, tile, a.nblocks, a.last_bytes, last);
    auto store = [&](int r0, int R, int MB, int64_t m0) {
      for (int r = 0; r < R; ++r) {
        const int64_t n = 4 * t + r0 + r;
        if (n >= a.N) break;
        for (int m = 0; m < MB; ++m) {
          float v = res[r * MB + m];
          if (a.offsets) v += dot(off.data() + (r0 + r) * ng, a.xsum + (m0 + m) * ng, ng);
          a.out[(m0 + m) * a.N + n] = v;
        }
      }
    };
    // Each group of R rows x MB activation rows is one pass over the tile's codes (from DRAM the
    // first time, from L1/L2 after).
    auto pass = [&](auto kernel, int R, int MB, int64_t m0, bool& first) {
      for (int r = 0; r < 4 && 4 * t + r < a.N; r += R) {
        kernel(a, tabs, tile + r * BB, tile, a.x + m0 * 16, sc.data() + r * ngp, res, first,
               short_last ? last + r * BB : nullptr);
        first = false;
        store(r, R, MB, m0);
      }
    };
    bool first = true;
    int64_t m0 = 0;
    while (m0 < a.M) {
      const int64_t left = a.M - m0;
      if (left >= 4) {
        pass(tile_kernel<BITS, 4, 4, true>, 4, 4, m0, first);
        m0 += 4;
      } else if (left == 3) {
        pass(tile_kernel<BITS, 4, 3, true>, 4, 3, m0, first);
        m0 += 3;
      } else if (left == 2) {
        pass(tile_kernel<BITS, 4, 2, false>, 4, 2, m0, first);
        m0 += 2;
      } else {
        pass(tile_kernel<BITS, 4, 1, false>, 4, 1, m0, first);
        m0 += 1;
      }
    }
  }
}

template <int BITS>
void decode_bits(const DecodeArgs& a, int64_t r0, int64_t r1) {
  constexpr int C = BITS == 4 ? 4 : 8;
  constexpr int SH = BITS == 4 ? 4 : 2;
  constexpr int BB = 4 * C * BITS;
  __m512 T, TH;
  make_tables<BITS>(a.table, &T, &TH);
  const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const bool uniform = a.G % 32 == 0 || a.ng == 1;
  FloatBuf sc(a.ng), off(a.ng);
  alignas(64) float tmp[32];
  for (int64_t n = r0; n < r1; ++n) {
    load_row(a.scales, a.stype, n, a.ng, sc.data());
    if (a.offsets) load_row(a.offsets, a.stype, n, a.ng, off.data());
    const uint8_t* row = row_codes(a.qw, a.nblocks, a.bits, n);
    float* df = static_cast<float*>(a.dst) + (n - r0) * a.ld;
    uint16_t* dh = static_cast<uint16_t*>(a.dst) + (n - r0) * a.ld;
    for (int64_t b = 0; b < a.nblocks; ++b) {
      const uint8_t* blk = row + b * 4 * BB;
      const __m512i d = _mm512_loadu_si512(blk);
      for (int c = 0; c < C; ++c) {
        const int64_t col0 = (b * C + c) * 32;
        if (col0 >= a.K) break;
        __m512 w[2];
        for (int e = 0; e < 2; ++e) {
          const int s = c + e * C;
          const __m512i idx = _mm512_srli_epi32(d, SH * s);
          w[e] = _mm512_permutexvar_ps(idx, T);
          if constexpr (BITS == 3) {
            const __mmask16 k = _load_mask16((__mmask16*)(blk + 64 + 2 * s));
            w[e] = _mm512_mask_permutexvar_ps(w[e], k, idx, TH);
          }
        }
        __m512 lo = _mm512_permutex2var_ps(w[0], ilo, w[1]);
        __m512 hi = _mm512_permutex2var_ps(w[0], ihi, w[1]);
        const int64_t nv = min64(32, a.K - col0);
        if (uniform) {
          const int64_t g = col0 / a.G;
          const __m512 s = _mm512_set1_ps(sc[g]);
          const __m512 o = _mm512_set1_ps(off[g]);
          lo = _mm512_add_ps(_mm512_mul_ps(lo, s), o);
          hi = _mm512_add_ps(_mm512_mul_ps(hi, s), o);
        } else {
          _mm512_store_ps(tmp, lo);
          _mm512_store_ps(tmp + 16, hi);
          for (int64_t i = 0; i < nv; ++i) {
            const int64_t g = (col0 + i) / a.G;
            tmp[i] = tmp[i] * sc[g] + off[g];
          }
          lo = _mm512_load_ps(tmp);
          hi = _mm512_load_ps(tmp + 16);
        }
        const __mmask16 klo = nv >= 16 ? __mmask16(0xffff) : __mmask16((1u << nv) - 1);
        const __mmask16 khi = nv >= 32 ? __mmask16(0xffff)
                              : nv > 16 ? __mmask16((1u << (nv - 16)) - 1) : __mmask16(0);
        if (a.bf16) {
          _mm256_mask_storeu_epi16(dh + col0, klo, f32x16_to_bf16(lo));
          _mm256_mask_storeu_epi16(dh + col0 + 16, khi, f32x16_to_bf16(hi));
        } else {
          _mm512_mask_storeu_ps(df + col0, klo, lo);
          _mm512_mask_storeu_ps(df + col0 + 16, khi, hi);
        }
      }
    }
  }
}

// Spread the 16 bits of v to the even bits of a 32-bit word.
inline uint32_t spread16(uint32_t v) {
  v = (v | (v << 8)) & 0x00ff00ffu;
  v = (v | (v << 4)) & 0x0f0f0f0fu;
  v = (v | (v << 2)) & 0x33333333u;
  v = (v | (v << 1)) & 0x55555555u;
  return v;
}

// 16 fp32 (table * s + o, computed in fp32) rounded to bf16 (nearest even), as 16 words
// repeated twice: a 32-entry vpermw table whose index bit 4 is ignored.
inline __m512i bf16_table(__m512 t, float s, float o) {
  const __m256i h = f32x16_to_bf16(_mm512_fmadd_ps(t, _mm512_set1_ps(s), _mm512_set1_ps(o)));
  return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

// bf16 rows for the panel path when every 32-column chunk lies in one group: the group's table is
// scaled (and offset) in fp32 and rounded to bf16 once, so W = bf16(table[q] * s + o) exactly as
// the fp32 path would round it; then one shift and one vpermw give 32 consecutive columns (slots
// c and c + C of a lane are columns 2j and 2j + 1 of chunk c, the low and high word of the lane).
template <int BITS>
void decode_bits_bf16(const DecodeArgs& a, int64_t r0, int64_t r1) {
  constexpr int C = BITS == 4 ? 4 : 8;
  constexpr int SH = BITS == 4 ? 4 : 2;
  constexpr int BB = 4 * C * BITS;
  __m512 T, TH;
  make_tables<BITS>(a.table, &T, &TH);
  FloatBuf sc(a.ng), off(a.ng);
  const int64_t cpg = a.ng == 1 ? (a.K_pad + 31) / 32 : a.G / 32;
  for (int64_t n = r0; n < r1; ++n) {
    load_row(a.scales, a.stype, n, a.ng, sc.data());
    if (a.offsets) load_row(a.offsets, a.stype, n, a.ng, off.data());
    const uint8_t* row = row_codes(a.qw, a.nblocks, a.bits, n);
    uint16_t* dh = static_cast<uint16_t*>(a.dst) + (n - r0) * a.ld;
    int64_t g = -1;
    __m512i tw = _mm512_setzero_si512(), th = tw;
    for (int64_t b = 0; b < a.nblocks; ++b) {
      const uint8_t* blk = row + b * 4 * BB;
      const __m512i d = _mm512_loadu_si512(blk);
FLUTE_UNROLL(8)
      for (int c = 0; c < C; ++c) {
        const int64_t chunk = b * C + c, col0 = chunk * 32;
        if (col0 >= a.K) break;
        const int64_t gc = min64(chunk / cpg, a.ng - 1);
        if (gc != g) {
          g = gc;
          const float o = a.offsets ? off[g] : 0.f;
          tw = bf16_table(T, sc[g], o);
          if constexpr (BITS == 3) th = bf16_table(TH, sc[g], o);
        }
        const __m512i idx = _mm512_srli_epi32(d, SH * c);
        __m512i w = _mm512_permutexvar_epi16(idx, tw);
        if constexpr (BITS == 3) {
          uint16_t m0, m1;
          std::memcpy(&m0, blk + 64 + 2 * c, 2);
          std::memcpy(&m1, blk + 64 + 2 * (c + C), 2);
          const __mmask32 k = _cvtu32_mask32(spread16(m0) | (spread16(m1) << 1));
          w = _mm512_mask_permutexvar_epi16(w, k, idx, th);
        }
        const int64_t nv = min64(32, a.K - col0);
        const __mmask32 km = nv >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << nv) - 1);
        _mm512_mask_storeu_epi16(dh + col0, km, w);
      }
    }
  }
}

// dense_gemv.h: the even and odd accumulators of a row added, then the 16 lanes halved.
inline float dense_sum16(__m512 e, __m512 o) {
  const __m512 s = _mm512_add_ps(e, o);
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// R weight rows (rp) against the M rows of x into yp[r][m * N]: per 64 bytes of a row, its 16 even
// columns widened by a shift and its 16 odd ones by an AND, two FMAs, no shuffle. The tail chunk
// by a masked load (the masked columns read as zero, as the spec pads them).
template <int R>
inline void dense_rows512(const uint16_t* const (&rp)[R], int64_t K, const float* x, int64_t M, float* const (&yp)[R],
                          int64_t N) {
  const int64_t kp = dense_k_pad(K), kf = K / kDenseChunk * kDenseChunk;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t(1) << (K - kf)) - 1);
  const __m512i odd = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * kp;
    __m512 e[R], o[R];
    for (int r = 0; r < R; ++r) e[r] = o[r] = _mm512_setzero_ps();
    auto step = [&](int64_t c, auto masked) {
      const __m512 xe = _mm512_loadu_ps(xr + c), xo = _mm512_loadu_ps(xr + c + 16);
      for (int r = 0; r < R; ++r) {
        const uint16_t* p = rp[r] + c;
        if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + kDensePrefetchBytes, _MM_HINT_T0);
        const __m512i v = decltype(masked)::value ? _mm512_maskz_loadu_epi16(tail, p) : _mm512_loadu_si512(p);
        e[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xe, e[r]);
        o[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, odd)), xo, o[r]);
      }
    };
    for (int64_t c = 0; c < kf; c += kDenseChunk) step(c, std::false_type{});
    if (kf < K) step(kf, std::true_type{});
    for (int r = 0; r < R; ++r) yp[r][m * N] = dense_sum16(e[r], o[r]);
  }
}

}  // namespace

void gemm_avx512(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    // 2 bits never come here: they run on the pair layout (pair_lut.h)
    case 3: gemm_bits<3>(a, t0, t1); break;
    default: gemm_bits<4>(a, t0, t1); break;
  }
}

void decode_avx512(const DecodeArgs& a, int64_t r0, int64_t r1) {
  if (a.bf16 && (a.G % 32 == 0 || a.ng == 1)) {
    switch (a.bits) {
      // 2 bits never come here: they run on the pair layout (pair_lut.h)
      case 3: decode_bits_bf16<3>(a, r0, r1); return;
      default: decode_bits_bf16<4>(a, r0, r1); return;
    }
  }
  switch (a.bits) {
    // 2 bits never come here: they run on the pair layout (pair_lut.h)
    case 3: decode_bits<3>(a, r0, r1); break;
    default: decode_bits<4>(a, r0, r1); break;
  }
}

void gemv_bf16_avx512(const uint16_t* w, int64_t K, const float* x, int64_t M, int64_t N, int64_t n0, int64_t n1,
                      float* y, bool two_streams) {
  dense_row_blocks<4>(n0, n1, two_streams, [&](const int64_t (&rows)[4]) {
    const uint16_t* const rp[4] = {w + rows[0] * K, w + rows[1] * K, w + rows[2] * K, w + rows[3] * K};
    float* const yp[4] = {y + rows[0], y + rows[1], y + rows[2], y + rows[3]};
    dense_rows512<4>(rp, K, x, M, yp, N);
  }, [&](int64_t n) {
    const uint16_t* const rp[1] = {w + n * K};
    float* const yp[1] = {y + n};
    dense_rows512<1>(rp, K, x, M, yp, N);
  });
}

}  // namespace flute_cpu
#endif
