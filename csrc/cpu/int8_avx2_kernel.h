// flute CPU kernel, int8 mode (see Int8Args in lut_kernel.h), on 256-bit registers: one byte shuffle
// per 32 bytes of codes puts each dword on one chunk (3 bits: the layout stores them so), the table
// lookup is `vpshufb` on nibbles (4 bits) or 3-bit codes in place (3 bits: half of them with their
// high bit joined by one AND and OR, see rows_int8), the products `vpmaddubsw` (u8 table value x
// s8 activation, pairs into int16), then into int32 times the chunks' integer scale factors (one
// unit per block), the parts in the same weight groups added as int32, one float FMA per 8 dwords
// and group. The loop over tiles is int8_tiles.h.
//
// Two forms of the int32 step, chosen by the unit's compiler flags (FLUTE_INT8_VNNI below):
// - AVX2 (kernel_int8_avx2.cpp): the two registers' pairs added and corrected in int16, then one
//   `vpmaddwd` by the factors and one `vpaddd` per part;
// - VNNI (kernel_int8_avxvnni.cpp: AVX-VNNI, VEX, e.g. Alder Lake, Sierra Forest;
//   kernel_int8_avx512vnni_ymm.cpp: AVX512-VNNI + VL on ymm registers, e.g. Cascade Lake): each
//   merge's int32 sum starts at its correction (Int8Args::xinit, int8_gemm.cpp) and each register's
//   int16 pairs go in by one `vpdpwssd` (multiply by the factors, add pairs, accumulate):
//   two operations per part and register pair instead of four, the same integers.
// AVX-512 CPUs with VBMI and VNNI run kernel_int8_avx512.cpp instead.
// Each unit that includes this header defines one kernel function from Avx2Int8.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "avx2_common.h"
#include "int8_tiles.h"

// FLUTE_INT8_VNNI: the unit is built with a 256-bit `vpdpwssd` (its flags say which encoding;
// FLUTE_EMULATED_AVXVNNI: csrc/cpu/emulation's software form of AVX-VNNI, for tests).
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__) || defined(FLUTE_EMULATED_AVXVNNI)
#define FLUTE_INT8_VNNI 1
#else
#define FLUTE_INT8_VNNI 0
#endif

namespace flute_cpu {
namespace {

#if FLUTE_INT8_VNNI
// acc + the int16 pairs of a times those of b, summed per dword (int32, wrapping).
inline __m256i dot_pairs_acc(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#else
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#endif
}
#endif

// The lookup tables of the bit width (see rows_int8), built once per call. A: 4 bits, index = code.
// 3 bits: the four index forms of the layout,
// A code at bits 0-2, B code at bits 1-3, C low field at bits 0-1 and high bit at bit 3, D low field
// at bits 2-3 and high bit at bit 0 (each form ignores its other bits below bit 4).
struct Tables {
  __m256i A, B, C, D;
};
template <int BITS>
inline Tables make_tables(const uint8_t* tu) {
  alignas(16) uint8_t t[4][16];
  for (int w = 0; w < 4; ++w)
    for (int i = 0; i < 16; ++i) t[w][i] = int8_table_entry<BITS>(tu, w, i);
  auto bc = [](const uint8_t* t) {
    return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
  };
  return {bc(t[0]), bc(t[1]), bc(t[2]), bc(t[3])};
}

// Groups of 64 columns (G64, the library's default; Q = 2): dword q (of either half) of merge j
// (parts 2j and 2j + 1) meets chunk (P*q + 2j + 1) % C, so its groups are, relative to the
// block's first, 0, 1, 0, 1 (4 bits, one merge) or 0, 2, 0, 2 (j = 0) and 1, 3, 1, 3 (j = 1)
// (2 and 3 bits). So each merge's 8 scales come from one broadcast load of the block's 2 or 4
// scales and one in-lane operation, instead of widening 8 scales and one lane-crossing `vpermps`
// per merge and activation row: the scale epilogue was ~15-20% of an M = 1 call
// (benchmarks/CPU_NOTES.md item 52). Used for every block whose groups lie inside the row (a
// direct load must not leave it), the general path for the rest.
template <int BITS, int SRC>
inline void group_scales64(const ScaleMap& sm, int64_t row, int64_t b, __m256 (&wg)[BITS == 4 ? 1 : 2]) {
  constexpr int GPB = BITS == 4 ? 2 : 4;  // groups of 64 per block
  const int64_t i = row * sm.ngp + GPB * b;
  if (SRC == kDirectBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(sm.WS) + i;
    if (BITS == 4) {  // dword (s1 << 16 | s0) everywhere; each word to the top of its own dword
      // (one byte shuffle whose mask stays in memory: unpacking with zeros held a zero register,
      // and the M = 1 loop has none to spare, see rows_int8)
      int32_t v;
      std::memcpy(&v, s, 4);
      const __m256i spread = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 0, 1, -1, -1, 2, 3,
                                              -1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 0, 1, -1, -1, 2, 3);
      wg[0] = _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_set1_epi32(v), spread));
    } else {  // qword (s3 s2 s1 s0): << 16 per dword gives s0, s2; the high words s1, s3
      int64_t v;
      std::memcpy(&v, s, 8);
      const __m256i y = _mm256_set1_epi64x(v);
      wg[0] = _mm256_castsi256_ps(_mm256_slli_epi32(y, 16));
      wg[1] = _mm256_castsi256_ps(_mm256_and_si256(y, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
    }
  } else {
    const float* f = static_cast<const float*>(sm.WS) + i;
    if (BITS == 4) {
      wg[0] = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(f)));
    } else {
      const __m256 z = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(f));
      wg[0] = _mm256_permute_ps(z, 0x88);  // s0 s2 s0 s2
      wg[1] = _mm256_permute_ps(z, 0xDD);  // s1 s3 s1 s3
    }
  }
}

// The 4 weight rows of a tile (all blocks) against activation rows m0 .. m0 + MC - 1, into
// res[mc][r]. One pass reads the tile front to back (the 4 rows are interleaved block by block), so
// the weight stream is one sequential run per thread, and decodes each code once for all MC rows:
// 4 x MC accumulators, which at MC > 1 spill, yet two passes of 2 rows (MC = 2) or four of one
// (MC = 3, 4) took 12-25% longer (CPU_NOTES item 221).
template <int BITS, int Q, int SRC, int MC, bool G64>
inline void rows_int8(const Int8Args& a, const Tables& tab, const uint8_t* tile, const ScaleMap& sm, int64_t m0,
                      float (*res)[4]) {
  constexpr int NR = 4;
  const __m256i TA = tab.A;
  constexpr int P = BITS == 4 ? 2 : 4, BB = BITS == 3 ? 96 : 64, COLS = 64 * P;
  static_assert(P % Q == 0, "merged parts come in whole groups of Q");
  // Table lookups by `vpshufb` (index bits 0-3; bit 7 must be clear, bits 4-6 are ignored). 3 bits: the layout
  // (R0 | R1 | R2, already in the registers' byte order) makes four index registers one AND of R0
  // or R1 (after one shared 4-bit shift for register 1) and the other four an AND of R2, an AND of
  // a spare bit of R0 or R1 and an OR, each form with its own table: 19 vector operations per 256
  // weights for the 8 index registers, against 29 with a separate high-bit plane (and no byte
  // shuffle): kernel instructions -8% (callgrind, 512x1024 M = 1; benchmarks/CPU_NOTES.md item 80).
  const __m256i m0F = _mm256_set1_epi8(0x0F), m03 = _mm256_set1_epi8(0x03), m0C = _mm256_set1_epi8(0x0C);
  const int64_t M = a.M;
  __m256 facc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int mc = 0; mc < MC; ++mc) facc[r][mc] = _mm256_setzero_ps();
  // HALF: the last block when only its first P / 2 parts meet columns of K (Int8Args::last_half):
  // the other parts' sums are exactly 0, so their codes are not decoded nor their products taken.
  // SHORT: the last block stored short (Int8Args::last_short): rows LB bytes apart, each index
  // register zero-extended from its even dwords (3 bits) or bytes (4 bits; lut_kernel.h).
  auto block = [&](int64_t b, auto fast_c, auto half_c, auto short_c) {
    constexpr bool FAST = decltype(fast_c)::value, HALF = decltype(half_c)::value;
    constexpr bool SHORT = decltype(short_c)::value;
    constexpr bool PACKED = packed_tail(BITS, SHORT, HALF);  // int8_prepare_tail_avx2
    constexpr int PU = HALF ? P / 2 : P;  // parts computed
    constexpr int LB = SHORT ? short_block_bytes(BITS, HALF) : BB;
    __m256 ub[MC];  // the block's activation unit per row (times the table scale)
    for (int mc = 0; mc < MC; ++mc) ub[mc] = _mm256_broadcast_ss(a.xu + b * M + m0 + mc);
    {  // kPrefetchBytes ahead (into the next tiles)
      const char* ahead = reinterpret_cast<const char*>(tile + b * 4 * BB) + kPrefetchBytes;
      for (int i = 0; i < 4 * BB / 64; ++i) _mm_prefetch(ahead + 64 * i, _MM_HINT_T0);
      prefetch_tile_scales<SRC>(sm, 4, b);
    }
    if constexpr (PACKED) {
      // The packed last block (int8_prepare_tail_avx2, int8_gemm.cpp): all 64 columns of a short
      // block of at most 64 in two registers U0, U1, whose low 128-bit lanes meet one chunk and
      // high lanes the next. 3 bits: the row's 32 bytes are R0 | R1 of its even dwords, parts 0
      // and 1, so its low nibbles are registers (0, 0) | (1, 0) and its high ones (0, 1) | (1, 1),
      // looked up in tables A | B. 4 bits: each 16 bytes broadcast, shifted by 0 | 4 bits per
      // lane: low nibbles | high nibbles, i.e. columns 0-15 | 32-47 and 16-31 | 48-63.
      const __m256i TAB = BITS == 3 ? _mm256_blend_epi32(tab.A, tab.B, 0xF0) : TA;
      const __m256i gp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.tail + 192 * M));
FLUTE_UNROLL(4)
      for (int r = 0; r < NR; ++r) {
        const uint8_t* rb = tile + b * 4 * BB + r * LB;
        __m256i U0, U1;
        if constexpr (BITS == 3) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb));
          U0 = _mm256_shuffle_epi8(TAB, _mm256_and_si256(v, m0F));
          U1 = _mm256_shuffle_epi8(TAB, _mm256_and_si256(_mm256_srli_epi16(v, 4), m0F));
        } else {
          const __m256i sh = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
          const __m256i v0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb)));
          const __m256i v1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + 16)));
          U0 = _mm256_shuffle_epi8(TAB, _mm256_and_si256(_mm256_srlv_epi32(v0, sh), m0F));
          U1 = _mm256_shuffle_epi8(TAB, _mm256_and_si256(_mm256_srlv_epi32(v1, sh), m0F));
        }
        const __m256 wv = load_scales8<SRC>(sm.WS, r * sm.ngp + sm.g0[b]);
        for (int mc = 0; mc < MC; ++mc) {
          const int8_t* t = a.tail + 192 * (m0 + mc);  // [X0 | X1 | k | corr | start] of the row
          auto ld = [&](int o) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + o)); };
          const __m256i s0 = _mm256_maddubs_epi16(U0, ld(0)), s1 = _mm256_maddubs_epi16(U1, ld(32));
#if FLUTE_INT8_VNNI
          const __m256i isum = dot_pairs_acc(dot_pairs_acc(ld(128), s0, ld(64)), s1, ld(64));
#else
          const __m256i isum = _mm256_madd_epi16(_mm256_sub_epi16(_mm256_add_epi16(s0, s1), ld(96)), ld(64));
#endif
          const __m256 ws = _mm256_permutevar8x32_ps(_mm256_mul_ps(wv, ub[mc]), gp);
          facc[r][mc] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), ws, facc[r][mc]);
        }
      }
      return;
    }
    // The rows unrolled. Though the unrolled M = 1 loop spills more (tables and index registers),
    // its accumulators stay in registers and the 4 rows' loads overlap: a 14336-column call
    // streamed from DRAM at 1 thread took 3-7% less time (2, 3 and 4 bits; benchmarks/CPU_NOTES.md
    // item 82; the same unrolling written as a lambda called from an unrolled loop measured only
    // 0-4%, with the same instruction count).
FLUTE_UNROLL(4)
    for (int r = 0; r < NR; ++r) {
      const uint8_t* rb = tile + b * 4 * BB + r * LB;
      // 32-byte register k of the row's block (short: its even dwords or bytes from 16 bytes)
      auto reg = [&](int k) {
        if constexpr (!SHORT) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + 32 * k));
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + 16 * k));
        return BITS == 3 ? _mm256_cvtepu32_epi64(h) : _mm256_cvtepu8_epi16(h);
      };
      __m256i u0[P], u1[P];
      if (BITS == 3) {
        // R0 | R1 | R2, each 32 bytes in the index registers' byte order: R0 holds parts (0, reg 0)
        // and (0, reg 1) as whole codes at bits 0-2 and 4-6, R1 parts (1, reg 0/1) at bits 1-3 and
        // 5-7, R2 the low fields of parts 2 and 3 (bits 0-1 / 4-5 and 2-3 / 6-7) whose high bits are
        // the spare bits of R0 (3, 7) and R1 (0, 4). Tables A and B ignore the spare bit beside
        // their code (bit 3, bit 0), C and D index bits 0-1 + 3 and 2-3 + 0 (make_tables).
        const __m256i R0 = reg(0), R1 = reg(1);
        const __m256i R0s = _mm256_srli_epi16(R0, 4), R1s = _mm256_srli_epi16(R1, 4);
        // (C ignores index bit 2 and D bit 1, so R0's bit 2 and R1's bit 1 may ride along: three
        // masks serve, and the M = 1 loop holds no more constants)
        u0[0] = _mm256_shuffle_epi8(tab.A, _mm256_and_si256(R0, m0F));
        u1[0] = _mm256_shuffle_epi8(tab.A, _mm256_and_si256(R0s, m0F));
        u0[1] = _mm256_shuffle_epi8(tab.B, _mm256_and_si256(R1, m0F));
        u1[1] = _mm256_shuffle_epi8(tab.B, _mm256_and_si256(R1s, m0F));
        if constexpr (!HALF) {
          const __m256i R2 = reg(2);
          const __m256i R2s = _mm256_srli_epi16(R2, 4);
          u0[2] = _mm256_shuffle_epi8(tab.C, _mm256_or_si256(_mm256_and_si256(R2, m03), _mm256_and_si256(R0, m0C)));
          u1[2] = _mm256_shuffle_epi8(tab.C, _mm256_or_si256(_mm256_and_si256(R2s, m03), _mm256_and_si256(R0s, m0C)));
          u0[3] = _mm256_shuffle_epi8(tab.D, _mm256_or_si256(_mm256_and_si256(R2, m0C), _mm256_and_si256(R1, m03)));
          u1[3] = _mm256_shuffle_epi8(tab.D, _mm256_or_si256(_mm256_and_si256(R2s, m0C), _mm256_and_si256(R1s, m03)));
        }
      } else {
        const __m256i c0 = bytes_by_position(reg(0)), c1 = bytes_by_position(reg(1));
        // 4 bits (2 bits have the pair layout)
        u0[0] = _mm256_shuffle_epi8(TA, _mm256_and_si256(c0, m0F));
        u1[0] = _mm256_shuffle_epi8(TA, _mm256_and_si256(c1, m0F));
        u0[1] = _mm256_shuffle_epi8(TA, _mm256_and_si256(_mm256_srli_epi16(c0, 4), m0F));
        u1[1] = _mm256_shuffle_epi8(TA, _mm256_and_si256(_mm256_srli_epi16(c1, 4), m0F));
      }
      __m256 wv, wg[BITS == 4 ? 1 : 2];
      if constexpr (FAST) group_scales64<BITS, SRC>(sm, r, b, wg);
      else wv = load_scales8<SRC>(sm.WS, r * sm.ngp + sm.g0[b]);
      const int32_t* gi = sm.gidx + b * P * 8;
      for (int mc = 0; mc < MC; ++mc) {
        const int64_t bm = b * M + m0 + mc;
        const int8_t* xb = a.xq + bm * COLS;
        [[maybe_unused]] const int16_t* xc = a.xcorr + bm * P * 16;
        const int16_t* xk = a.xk + bm * P * 16;
        // weight scale * table scale * the block's activation unit, per group
        __m256 wu = ub[mc];
        if constexpr (!FAST) wu = _mm256_mul_ps(wv, wu);
        __m256i isum = _mm256_setzero_si256();
        for (int p = 0; p < PU; ++p) {
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + p * 32));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + (P + p) * 32));
          const __m256i kp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk + p * 16));
#if FLUTE_INT8_VNNI
          // the merge's sum starts at its correction (minus 64 * k * the activation bytes of each
          // dword: Int8Args::xinit), then each register's int16 pairs (no saturation: u <= 127,
          // |x| <= 127) times the chunk factor k, into int32; parts past a half last block meet
          // x = 0, so their corrections in the start value are 0 as well
          if (p % Q == 0) isum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xinit + (bm * (P / Q) + p / Q) * 8));
          isum = dot_pairs_acc(isum, _mm256_maddubs_epi16(u0[p], x0), kp);
          isum = dot_pairs_acc(isum, _mm256_maddubs_epi16(u1[p], x1), kp);
#else
          // int16 pairs cannot saturate (u <= 127, |x| <= 127); the two registers' pairs are added
          // and the correction subtracted in wrapping int16 (exact: see Int8Args), one vpmaddwd.
          const __m256i s16 = _mm256_sub_epi16(
              _mm256_add_epi16(_mm256_maddubs_epi16(u0[p], x0), _mm256_maddubs_epi16(u1[p], x1)),
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + p * 16)));
          // x the chunk factor k: every dword in the block's unit (int32 bounds: see Int8Args)
          isum = _mm256_add_epi32(isum, _mm256_madd_epi16(s16, kp));
#endif
          if (p % Q == Q - 1 || p == PU - 1) {  // a merge's parts have their dwords in the same groups
            __m256 ws;
            if constexpr (FAST) ws = _mm256_mul_ps(wg[p / 2], wu);
            else ws = _mm256_permutevar8x32_ps(wu, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gi + (p | (Q - 1)) * 8)));
            facc[r][mc] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), ws, facc[r][mc]);
            isum = _mm256_setzero_si256();
          }
        }
      }
    }
  };
  for_blocks<BITS, SRC, G64>(a, block);
  for (int mc = 0; mc < MC; ++mc) _mm_storeu_ps(res[mc], hsum4(facc[0][mc], facc[1][mc], facc[2][mc], facc[3][mc]));
}

// The AVX2 kernel as int8_tiles.h's driver calls it.
struct Avx2Int8 {
  using Tables = flute_cpu::Tables;
  static constexpr bool kDecodeOnly = false;
  static constexpr bool kTilePairs = false;  // two streams per thread measured slower on Zen 3 (CPU_NOTES 83c)
  template <int BITS, int Q, int SRC, bool G64>
  static void pair(const Int8Args&, const Tables&, const uint8_t*, int64_t, const ScaleMap&, float (*)[4]) {}
  template <int BITS>
  static Tables tables(const uint8_t* tu) { return make_tables<BITS>(tu); }
  template <int BITS, int Q, int SRC, int MC, bool G64>
  static void rows(const Int8Args& a, const Tables& tab, const uint8_t* tile, const ScaleMap& sm, int64_t m0,
                   float (*res)[4]) {
    rows_int8<BITS, Q, SRC, MC, G64>(a, tab, tile, sm, m0, res);
  }
};

}  // namespace

}  // namespace flute_cpu
#endif
