// flute CPU kernel, AVX-512 BF16 path: the opt-in "bf16" mode (flute.ops.set_cpu_mode("bf16")).
// Compiled in its own translation unit with -mavx512bf16 on top of the AVX-512 flags; used only
// when cpuid reports AVX512_BF16 and the mode is selected. Not exact: activations and table values
// are rounded to bf16 (products and sums stay fp32, scales and offsets are applied in fp32), like
// torch's bf16 matmul of the dequantized weight.
//
// One shift and one `vpermw` decode a whole 32-column chunk of a row in natural column order
// (slots c and c + C of a lane are columns 2j and 2j + 1: the low and high word of the lane), and
// one `vdpbf16ps` multiplies it with 32 activations: half the instructions of the exact path.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "avx512bf16_common.h"

namespace flute_cpu {
namespace {

constexpr int64_t kPrefetchBytes = 2048;

// R rows x MB activation rows. ST = false: unscaled bf16 table, fp32 partial sum per group times
// the scale at the group's end. ST = true: the table is scaled per (row, group) before rounding to
// bf16, so no per-group reduction (fewer accumulators, MB up to 16).
template <int BITS, int R, int MB, bool ST>
__attribute__((noinline)) void tile_kernel(const GemmArgs& a, const uint8_t* row0, const uint8_t* tile,
                                           const uint16_t* x, const float* sc, float* res,
                                           bool prefetch) {
  constexpr int C = BITS == 4 ? 4 : 8;
  constexpr int BB = 4 * C * BITS;
  const __m512 T = tables<BITS>(a.table);
  const int64_t vs = a.M * 32, ngp = a.ngp, cpg = a.cpg;  // x: [K_pad/32 chunks][M][32] bf16
  __m512 acc[R][MB];
  __m512 tot[ST ? 1 : R][ST ? 1 : MB];
  __m512i tw[R];
  auto set_tables = [&](int64_t g) {
    for (int r = 0; r < R; ++r) tw[r] = word_table(T, ST ? sc[r * ngp + g] : 1.f);
  };
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  if constexpr (!ST)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_setzero_ps();
  set_tables(0);
  int64_t g = 0, cc = 0;
  for (int64_t b = 0; b < a.nblocks; ++b) {
    const uint8_t* blk = row0 + b * 4 * BB;
    if (prefetch) {
      const char* pf = reinterpret_cast<const char*>(tile + b * 4 * BB + kPrefetchBytes);
      for (int i = 0; i < 4 * BB; i += 64) _mm_prefetch(pf + i, _MM_HINT_T0);
    }
    __m512i d[R][kBlockVecs<BITS>];
    for (int r = 0; r < R; ++r) load_block<BITS>(blk + r * BB, d[r]);
FLUTE_UNROLL(8)
    for (int c = 0; c < C; ++c) {
      const uint16_t* xv = x + (b * C + c) * vs;
FLUTE_UNROLL(4)
      for (int r = 0; r < R; ++r) {
        const __m512i w = decode_chunk<BITS>(d[r], c, tw[r]);
FLUTE_UNROLL(16)
        for (int m = 0; m < MB; ++m)
          acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w,
                                       (__m512bh)_mm512_loadu_si512(xv + m * 32));
      }
      if (++cc == cpg) {
        if constexpr (!ST) {
          for (int r = 0; r < R; ++r) {
            const __m512 s = _mm512_set1_ps(sc[r * ngp + g]);
            for (int m = 0; m < MB; ++m) {
              tot[r][m] = _mm512_fmadd_ps(acc[r][m], s, tot[r][m]);
              acc[r][m] = _mm512_setzero_ps();
            }
          }
        }
        ++g;
        cc = 0;
        if constexpr (ST) set_tables(g);
      }
    }
  }
  if constexpr (!ST) {
    if (cc)
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(sc[r * ngp + g]);
        for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], s, tot[r][m]);
      }
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
  for (int64_t t = t0; t < t1; ++t) {
    for (int r = 0; r < 4; ++r) {
      float* s = sc.data() + r * ngp;
      for (int64_t i = 0; i < ngp; ++i) s[i] = 0.f;
      if (4 * t + r < a.N) {
        load_row(a.scales, a.stype, 4 * t + r, ng, s);
        if (a.offsets) load_row(a.offsets, a.stype, 4 * t + r, ng, off.data() + r * ng);
      }
    }
    const uint8_t* tile = a.qw + t * a.nblocks * 4 * BB;
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
    auto pass = [&](auto kernel, int R, int MB, int64_t m0, bool& first) {
      for (int r = 0; r < 4 && 4 * t + r < a.N; r += R) {
        kernel(a, tile + r * BB, tile, a.xb + m0 * 32, sc.data() + r * ngp, res, first);
        first = false;
        store(r, R, MB, m0);
      }
    };
    bool first = true;
    int64_t m0 = 0;
    while (m0 < a.M) {
      const int64_t left = a.M - m0;
      if (left >= 4) {  // R = 4: x is read once per 4 rows (R = 1, MB = 16 was L2-bound)
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

}  // namespace

bool kernel_avx512bf16_built() { return true; }

void gemm_avx512bf16(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    // 2 bits never come here: they run on the pair layout (pair_lut.h)
    case 3: gemm_bits<3>(a, t0, t1); break;
    default: gemm_bits<4>(a, t0, t1); break;
  }
}

}  // namespace flute_cpu
#endif
