// The int8 mode's driver, shared by its SIMD kernels (kernel_int8_avx2.cpp,
// kernel_int8_avx512.cpp): the scale map, the loop over row tiles with the configurations of rows
// and activation rows, the per-tile scale buffers and the choice of instantiation. A kernel is a
// class KER with
//   using Tables;                                   the lookup tables, in registers
//   template <int BITS> static Tables tables(const uint8_t* tu);
//   template <int BITS, int Q, int SRC, int MC, bool G64>
//   static void rows(const Int8Args&, const Tables&, const uint8_t* tile, const ScaleMap&,
//                    int64_t m0, float (*res)[4]);  the tile's 4 weight rows against MC activation
//                                                   rows from m0, into res[mc][r]
//   static constexpr bool kDecodeOnly;              whether it runs M = 1 only (rows() with MC = 1)
//   static constexpr bool kTilePairs;               whether it has pair(): M = 1, tiles t and
//   template <int BITS, int Q, int SRC, bool G64>   t + dt read together, into res[0] and res[1]
//   static void pair(const Int8Args&, const Tables&, const uint8_t* tile, int64_t dt, const ScaleMap&,
//                    float (*res)[4]);
// Included only from translation units compiled for x86 SIMD; internal linkage (lut_kernel.h).
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <type_traits>

#include "lut_kernel.h"

namespace flute_cpu {
namespace {

// Software prefetch distance in the weight stream: the hardware prefetchers alone left the 4-bit
// M = 1 call at ~40% of read bandwidth (the same fix took the AVX-512 exact kernel from 6.1 to
// 2.7 ms, benchmarks/CPU_NOTES.md). 8 KB rather than 2 KB: a 117 MB stream at 1 thread (A/B in
// one process, 6 runs, both slot orders) took 2-7% fewer cycles at 4 bits, 2 and 3 bits within
// the noise, and in-cache shapes were unchanged (CPU_NOTES item 62).
// FLUTE_CPU_PREFETCH_BYTES: an experiment's override (benchmarks/experiments/int8_kernel_ab.sh).
#ifndef FLUTE_CPU_PREFETCH_BYTES
#define FLUTE_CPU_PREFETCH_BYTES 8192
#endif
constexpr int kPrefetchBytes = FLUTE_CPU_PREFETCH_BYTES;

// Weight scales: row r's scales start at WS + r * ngp, in the form SRC says; the 8 dwords of part p
// of block b take scale g0[b] + gidx[b][p][d] of the row (one vpermps of 8 consecutive group
// scales: a block spans at most 8 groups; gidx never points past the row's last group).
//   kBuffered: fp32, rows copied per tile and zero-padded by 8;
//   kDirectBF16 / kDirectF32: the op's own [N, ng] scales tensor (ngp = ng), read in place. An
//   8-scale load may run past the row's end into
//   the next row (lanes vpermps never selects), so the tiles whose loads could leave the tensor
//   (its last one or two) are buffered. Converting every tile's rows (and the per-row output
//   loop) cost ~25% of a 1536x576 call's kernel instructions (callgrind; benchmarks/CPU_NOTES.md
//   item 37).
enum ScaleSrc : int { kBuffered = 0, kDirectBF16 = 1, kDirectF32 = 2 };
struct ScaleMap {
  const void* WS;
  int64_t ngp;
  const int64_t* g0;   // [nblocks]: first group of the block
  const int32_t* gidx;  // [nblocks][P][8]: group of each dword, relative to g0
};

// Line b of the scales of the 4 rows from row r of the tile's ScaleMap on (the next tile: r = 4),
// read in place: a prefetch spread over the current tile's block loop, one line per block (as the
// pair kernel's, CPU_NOTES item 131). With the scales from DRAM as well as the codes, 4-bit M = 1
// calls took 10-20% longer than with only the codes there, though the scales are 6% of the bytes;
// the gain of this prefetch is small and noisy on the Zen 5 VM (CPU_NOTES item 135). Past the
// tensor's end it only names an address: a prefetch never faults.
template <int SRC>
inline void prefetch_tile_scales(const ScaleMap& sm, int64_t r, int64_t b) {
  if constexpr (SRC != kBuffered) {
    constexpr int64_t es = SRC == kDirectBF16 ? 2 : 4;
    if (64 * b < 4 * sm.ngp * es) _mm_prefetch(static_cast<const char*>(sm.WS) + r * sm.ngp * es + 64 * b, _MM_HINT_T0);
  }
}

// Entry i of lookup table `which` (0-3: A, B, C, D) of the bit width, as the 3/4-bit kernels build
// them (2 bits have the pair layout): 4 bits, A indexed by the code in bits 0-3; 3 bits, the
// layout's four index forms: A code at bits 0-2, B code at bits 1-3, C low field at bits 0-1 and high
// bit at bit 3, D low field at bits 2-3 and high bit at bit 0. Each ignores its other index bits
// (i < 16 for vpshufb, < 64 for vpermb).
template <int BITS>
inline uint8_t int8_table_entry(const uint8_t* tu, int which, int i) {
  static_assert(BITS == 3 || BITS == 4, "the 4-row layout's widths");
  if (BITS == 3) {
    switch (which) {
      case 0: return tu[i & 7];
      case 1: return tu[(i >> 1) & 7];
      case 2: return tu[(i & 3) | ((i >> 3) & 1) << 2];
      default: return tu[((i >> 2) & 3) | (i & 1) << 2];
    }
  }
  return which == 0 ? tu[i & 15] : 0;
}

// 8 consecutive group scales of a row as fp32 (the general path's vpermps source).
template <int SRC>
inline __m256 load_scales8(const void* WS, int64_t i) {
  if (SRC == kDirectBF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(WS) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(WS) + i);
}

// Row n of the [N, ng] scales as fp32 into dst[0:ng], the bf16 widening vectorized: one scale per
// 64 weights, and the scalar loops were ~15% of a 4-bit M = 1 call's kernel instructions
// (callgrind, 1536x576: 546K -> 506K per call).
inline void row_f32(const void* src, int stype, int64_t n, int64_t ng, float* dst) {
  if (stype == kBF16) bf16_to_f32_avx2(static_cast<const uint16_t*>(src) + n * ng, dst, ng);
  else load_row_f32(src, stype, n, ng, dst);
}

// A tile's blocks in the order KER::rows runs them: block(b, fast, half) with std::true_type /
// std::false_type. fast: the block's 2 or 4 group scales lie inside the row (group_scales64; G64
// only, buffered rows are zero-padded by 8).
// half: the last block when only its first P / 2 parts meet columns of K (Int8Args::last_half).
// short: the last block stored short (Int8Args::last_short; always so where half).
// Always inlined: GCC 12 left the 4-bit decode instantiations (rows_int8<4, 2, SRC, 4, 1, true>)
// as calls, their accumulators then updated through the closure in memory with many scalar
// spills, and the 4-bit M = 1 call took 10-21% longer (benchmarks/CPU_NOTES.md item 122).
template <int BITS, int SRC, bool G64, class Block>
__attribute__((always_inline)) inline void for_blocks(const Int8Args& a, Block&& block) {
  const int64_t nb = a.nblocks, nfull = nb - (a.last_half || a.last_short);
  int64_t b = 0, nfast = 0;
  using T = std::true_type;
  using F = std::false_type;
  if constexpr (G64) {
    nfast = SRC == kBuffered ? nb : min64(nb, a.ng / (BITS == 4 ? 2 : 4));
    for (; b < min64(nfast, nfull); ++b) block(b, T{}, F{}, F{});
  }
  for (; b < nfull; ++b) block(b, F{}, F{}, F{});
  if (a.last_half) {
    if (nb - 1 < nfast) block(nb - 1, T{}, T{}, T{});
    else block(nb - 1, F{}, T{}, T{});
  } else if (a.last_short) {
    if (nb - 1 < nfast) block(nb - 1, T{}, F{}, T{});
    else block(nb - 1, F{}, F{}, T{});
  }
}

// Row tiles [t0, t1) with their scales read as SRC says (see ScaleMap; kBuffered converts each
// tile's 4 rows into WSp first).
template <class KER, int BITS, int Q, int SRC, bool G64>
void tiles_int8(const Int8Args& a, const typename KER::Tables& tab, int64_t t0, int64_t t1, float* WSp, float* off) {
  const int64_t ng = a.ng;
  const int64_t ngp = SRC == kBuffered ? ng + 8 : ng;
  alignas(16) float res[4][4];  // [mc][row of the tile]
  if constexpr (KER::kTilePairs && SRC != kBuffered) {
    // Decode without offsets, where the binding asks for it (Int8Args::tile_pairs: Intel CPUs):
    // tiles t and t + H in one pass over their blocks (KER::pair), two sequential streams far
    // apart per thread. One core of a Sapphire Rapids VM streams 10-11 GB/s
    // from one run and 12-13 GB/s from two; the AVX-512 kernel took 8-15% less time at 4 bits and
    // 4-10% at 2 and 3 bits (benchmarks/CPU_NOTES.md item 89).
    const int64_t H = (t1 - t0) / 2;
    if (a.M == 1 && a.tile_pairs && !a.offsets && H > 0 && 4 * (t0 + 2 * H) <= a.N) {
      const int64_t tile_bytes = a.tile_bytes, row_scales = 4 * ng * (SRC == kDirectBF16 ? 2 : 4);
      for (int64_t t = t0; t < t0 + H; ++t) {
        const ScaleMap sm{static_cast<const char*>(a.scales) + t * row_scales, ng, a.g0, a.gidx};
        KER::template pair<BITS, Q, SRC, G64>(a, tab, a.qw + t * tile_bytes, H, sm, res);
        _mm_storeu_ps(a.out + 4 * t, _mm_load_ps(res[0]));
        _mm_storeu_ps(a.out + 4 * (t + H), _mm_load_ps(res[1]));
      }
      t0 += 2 * H;
    }
  }
  for (int64_t t = t0; t < t1; ++t) {
    ScaleMap sm{WSp, ngp, a.g0, a.gidx};
    if (SRC != kBuffered) sm.WS = static_cast<const char*>(a.scales) + 4 * t * ng * (SRC == kDirectBF16 ? 2 : 4);
    // Rows to prepare: buffered scales, offsets or padding rows; none for a whole tile read in place
    // (per-tile work counts on short rows: K = 576 is 5 blocks per tile at 4 bits).
    const bool prep = SRC == kBuffered || a.offsets || 4 * t + 4 > a.N;
    for (int r = 0; r < 4 && prep; ++r) {
      const int64_t n = 4 * t + r;
      if (n >= a.N) {  // padding rows of the last tile: computed (codes 0), never written
        if (SRC == kBuffered)
          for (int64_t i = 0; i < ng; ++i) WSp[r * ngp + i] = 0.f;
        continue;
      }
      if (SRC == kBuffered) row_f32(a.scales, a.stype, n, ng, WSp + r * ngp);
      if (a.offsets) load_row_f32(a.offsets, a.stype, n, ng, off + r * ng);
    }
    const uint8_t* tile = a.qw + t * a.tile_bytes;
    if (a.M == 1 && !prep) {  // decode, a whole tile without offsets: its 4 outputs stored directly
      KER::template rows<BITS, Q, SRC, 1, G64>(a, tab, tile, sm, 0, res);
      _mm_storeu_ps(a.out + 4 * t, _mm_load_ps(res[0]));
      continue;
    }
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
      const int64_t mc = min64(4, a.M - m0);
      if constexpr (KER::kDecodeOnly) {  // M = 1: the other configurations are not instantiated
        KER::template rows<BITS, Q, SRC, 1, G64>(a, tab, tile, sm, m0, res);
      } else {
        // each code decoded once for up to 4 activation rows (a pass per 1 or 2 weight rows took
        // 12-25% longer at 2-4 rows: CPU_NOTES item 221)
        switch (mc) {
          case 1: KER::template rows<BITS, Q, SRC, 1, G64>(a, tab, tile, sm, m0, res); break;
          case 2: KER::template rows<BITS, Q, SRC, 2, G64>(a, tab, tile, sm, m0, res); break;
          case 3: KER::template rows<BITS, Q, SRC, 3, G64>(a, tab, tile, sm, m0, res); break;
          default: KER::template rows<BITS, Q, SRC, 4, G64>(a, tab, tile, sm, m0, res);
        }
      }
      if (!a.offsets && 4 * t + 4 <= a.N) {  // a whole tile: 4 outputs per activation row
        for (int64_t i = 0; i < mc; ++i) _mm_storeu_ps(a.out + (m0 + i) * a.N + 4 * t, _mm_load_ps(res[i]));
        continue;
      }
      for (int r = 0; r < 4 && 4 * t + r < a.N; ++r) {
        for (int64_t i = 0; i < mc; ++i) {
          float v = res[i][r];
          if (a.offsets) {
            float o = 0.f;
            for (int64_t g = 0; g < ng; ++g) o += off[r * ng + g] * a.xsum[(m0 + i) * ng + g];
            v += o;
          }
          a.out[(m0 + i) * a.N + 4 * t + r] = v;
        }
      }
    }
  }
}

template <class KER, int BITS, int Q, bool G64>
void gemm_int8_bits(const Int8Args& a, int64_t t0, int64_t t1) {
  const typename KER::Tables tab = KER::template tables<BITS>(a.tu);
  const int64_t ng = a.ng;
  const int64_t ngp = ng + 8;
  // Per-tile scales (buffered tiles) and offsets of 4 rows: on the stack for up to ~1000 groups per
  // row (a small call should not pay for heap allocations), else on the heap.
  constexpr int64_t kStackFloats = 4096;
  float stack_buf[kStackFloats];
  const int64_t need = 4 * ngp + 4 * ng;
  FloatBuf heap(need > kStackFloats ? need : 0);
  float* const WSp = need > kStackFloats ? heap.data() : stack_buf;
  float* const off = WSp + 4 * ngp;
  for (int64_t i = 0; i < 4 * ngp; ++i) WSp[i] = 0.f;  // the 8 padding scales per row stay zero
  // Tiles whose 8-scale loads stay inside the scales tensor read it in place: the last row's
  // loads reach at most 7 scales past its last group.
  int64_t t_direct = t0;
  if (a.stype != kF16) {
    const int64_t last_ok = (a.N * ng - 7) / ng - 4;  // (4 t + 4) * ng + 7 <= N * ng
    t_direct = last_ok < 0 ? t0 : min64(t1, last_ok / 4 + 1);
    if (t_direct < t0) t_direct = t0;
  }
  if (t_direct > t0) {
    if (a.stype == kBF16) tiles_int8<KER, BITS, Q, kDirectBF16, G64>(a, tab, t0, t_direct, WSp, off);
    else tiles_int8<KER, BITS, Q, kDirectF32, G64>(a, tab, t0, t_direct, WSp, off);
  }
  if (t_direct < t1) tiles_int8<KER, BITS, Q, kBuffered, G64>(a, tab, t_direct, t1, WSp, off);
}

// One instantiation per bit width and merge width Q (parts added as int32: see Int8Args), and one
// more for groups of 64 (group_scales64).
template <class KER, int BITS>
void gemm_int8_merge(const Int8Args& a, int64_t t0, int64_t t1) {
  if (a.merge == 1) {
    gemm_int8_bits<KER, BITS, 1, false>(a, t0, t1);
  } else if (a.merge == 2 && a.G == 64) {
    gemm_int8_bits<KER, BITS, 2, true>(a, t0, t1);
  } else if constexpr (BITS == 4) {
    gemm_int8_bits<KER, BITS, 2, false>(a, t0, t1);
  } else if (a.merge == 2) {
    gemm_int8_bits<KER, BITS, 2, false>(a, t0, t1);
  } else {
    gemm_int8_bits<KER, BITS, 4, false>(a, t0, t1);
  }
}

template <class KER>
void gemm_int8_dispatch(const Int8Args& a, int64_t t0, int64_t t1) {
  switch (a.bits) {
    // 2 bits never come here: they run on the pair layout (pair_lut.h)
    case 3: gemm_int8_merge<KER, 3>(a, t0, t1); break;
    default: gemm_int8_merge<KER, 4>(a, t0, t1); break;
  }
}

}  // namespace
}  // namespace flute_cpu
#endif
