// flute CPU kernel, int8 mode (see Int8Args in lut_kernel.h), AVX-512 with VBMI and VNNI (Ice Lake,
// Sapphire Rapids, Zen 4 and later). The integer sums are those of the AVX2 kernel; per 64-byte
// register it needs far fewer operations:
// - One zmm holds both 32-byte registers (reg 0 in the low 256 bits, reg 1 in the high) of one part,
//   so every operation covers 64 weights.
// - The lookup is `vpermb` on a 64-entry table, which ignores index bits 6-7, and each table
//   ignores the other index bits it does not need (make_tables): no AND per index register.
//   3 bits: each 32-byte register R0, R1, R2 of the layout is loaded broadcast into both halves
//   and the high half shifted by 4 (one masked shift), which gives reg 0 and reg 1 of its parts;
//   the parts 2 and 3 take their high bit by one `vpternlogd` bit select.
// - `vpmaddubsw` (u8 table value x s8 activation, pairs into int16, no saturation: see Int8Args),
//   then `vpdpwssd` multiplies the int16 pairs by the chunk factor k and adds them into int32:
//   two operations per part where AVX2 needs six for half the width.
// - The correction 64 * sum(x8 * k) enters as the int32 start value of each merge (xinit, computed
//   once per call): the uncorrected int32 sums may wrap in between, but wrapping arithmetic is
//   exact modulo 2^32 and the corrected total fits (Int8Args), so the result is exact.
// - The float epilogue stays per merge (one conversion, scale product and FMA on 16 dwords).
// - Decode may read two tiles far apart in one pass (pair(), int8_tiles.h: Int8Args::tile_pairs,
//   on Intel CPUs only): two streams per thread.
// The activations are read in their own order, [block][m][part][reg][32 bytes] (int8_prepare_avx512
// reorders the AVX2 order in place).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "avx2_common.h"
#include "int8_tiles.h"

namespace flute_cpu {
namespace {

// The lookup tables as 64-entry `vpermb` tables. 4 bits: index bits 0-3 (the high nibble arrives
// with the next byte's low bits at 4-7 after a 16-bit shift; 4-5 ignored here, 6-7 by vpermb).
// 3 bits: the layout's four
// index forms as in the AVX2 kernel: A code at bits 0-2, B at bits 1-3, C low field at bits 0-1
// and high bit at bit 3, D low field at bits 2-3 and high bit at bit 0.
struct Tables512 {
  __m512i A, B, C, D;
};
template <int BITS>
inline Tables512 make_tables512(const uint8_t* tu) {
  alignas(64) uint8_t t[4][64];
  for (int w = 0; w < 4; ++w)
    for (int i = 0; i < 64; ++i) t[w][i] = int8_table_entry<BITS>(tu, w, i);
  return {_mm512_load_si512(t[0]), _mm512_load_si512(t[1]), _mm512_load_si512(t[2]), _mm512_load_si512(t[3])};
}

// Groups of 64 columns: the group pattern of each merge's dwords as in the AVX2 kernel's
// group_scales64 (4 bits: 0, 1, 0, 1 per 128-bit lane; 2 and 3 bits: 0, 2, 0, 2 and 1, 3, 1, 3),
// the same in all four lanes.
template <int BITS, int SRC>
inline void group_scales64_512(const ScaleMap& sm, int64_t row, int64_t b, __m512 (&wg)[BITS == 4 ? 1 : 2]) {
  constexpr int GPB = BITS == 4 ? 2 : 4;
  const int64_t i = row * sm.ngp + GPB * b;
  if (SRC == kDirectBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(sm.WS) + i;
    if (BITS == 4) {
      int32_t v;
      std::memcpy(&v, s, 4);
      const __m512i spread = _mm512_set4_epi32(0x03020000 | 0xFFFF, 0x01000000 | 0xFFFF, 0x03020000 | 0xFFFF,
                                               0x01000000 | 0xFFFF);
      wg[0] = _mm512_castsi512_ps(_mm512_shuffle_epi8(_mm512_set1_epi32(v), spread));
    } else {
      int64_t v;
      std::memcpy(&v, s, 8);
      const __m512i y = _mm512_set1_epi64(v);
      wg[0] = _mm512_castsi512_ps(_mm512_slli_epi32(y, 16));
      wg[1] = _mm512_castsi512_ps(_mm512_and_si512(y, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
    }
  } else {
    const float* f = static_cast<const float*>(sm.WS) + i;
    if (BITS == 4) {
      double d;
      std::memcpy(&d, f, 8);
      wg[0] = _mm512_castpd_ps(_mm512_set1_pd(d));
    } else {
      const __m512 z = _mm512_broadcast_f32x4(_mm_loadu_ps(f));
      wg[0] = _mm512_permute_ps(z, 0x88);
      wg[1] = _mm512_permute_ps(z, 0xDD);
    }
  }
}

// Prefetch distance of each weight stream: 4 KB at 4 bits, where the shared 8 KB took 2-5% longer
// on the Zen 5 VM (1 and 2 threads, 14336x4096, 4096x14336 and 4096x4096 from DRAM, in-process
// A/B; 3 bits were 2-4% slower at 4 KB and keep 8 KB: CPU_NOTES item 136).
template <int BITS>
constexpr int kPrefetch512 = BITS == 4 && kPrefetchBytes == 8192 ? 4096 : kPrefetchBytes;
// Two streams (tile pairs, Intel's default): 3 bits 2 KB ahead in each, where 8 KB took 4-11% longer
// on the Intel AMX VM (kernel alone from DRAM, 1536x768, 576x1536, 4096x4096 and 14336x4096 at 1
// and 2 threads; 4 KB 1-5%; 4 bits kept 4 KB: 2 KB gave 0.94-1.03; CPU_NOTES item 161).
template <int BITS, int NT>
constexpr int kPrefetchAhead = NT == 2 && BITS == 3 && kPrefetchBytes == 8192 ? 2048 : kPrefetch512<BITS>;

// The packed last block (CPU_NOTES item 231): a short last block of at most 64 columns of K (3 bits:
// Int8Args::last_half; 4 bits: every short block) read as one zmm of all 64 of its columns. The
// general form loads each index register by a zero-extending `vpmovzx` and a broadcast between
// registers (two port-5 shuffles each, with the lookups' `vpermb`s on the same port) and computes
// whole parts of which half are padding, so such a block cost as much as a whole one. Here each row
// is one broadcast load of its 32 bytes (no shuffle), one or two masked shifts and one `vpermb`:
// 3 bits, the lanes R0 | R1 | R0 | R1 of the even dwords, shifted by 0 | 1 | 4 | 5 bits, are parts 0
// and 1 of registers 0 and 1 (table A reads each as the code at bits 0-2: bits 3-5 are ignored by
// the table, 6-7 by vpermb); 4 bits, [S | S >> 4] are the block's columns 0-31 and 32-63 in order.
// The activations, chunk factors and group entries of the block are put in that order once per
// call (int8_prepare_tail_avx512: two-source permutes of parts 0 and 1; Int8Args::tail), with the
// start value of each dword computed from them as the compact form does. The integers of each
// column are those of the general form; the float sums meet in other lanes. Measured (CPU_NOTES
// item 231): 1536x576 in cache 0.94-0.95 of the time at 3 and 4 bits, from DRAM 0.98-0.99.
struct PackedTail {
  alignas(64) uint8_t x[64];   // byte z of the packed activations: its byte in parts 0 | 1 (0-127)
  alignas(64) uint16_t k[32];  // int16 w of the packed chunk factors: its int16 in parts 0 | 1 (0-63)
  alignas(64) uint32_t g[16];  // dword d: its entry in the block's group offsets (8 p + dword q)
  constexpr explicit PackedTail(int bits) : x(), k(), g() {
    for (int z = 0; z < 64; ++z) {
      const int off = packed_tail_byte(bits, false, z);  // in this kernel's order [p][reg][32]
      x[z] = static_cast<uint8_t>(off);
      if (z % 2 == 0) k[z / 2] = static_cast<uint16_t>(off / 2);
      if (z % 4 == 0) g[z / 4] = static_cast<uint32_t>((off / 64) * 8 + (off % 64) / 4 % 4);
    }
  }
};
template <int BITS>
inline constexpr PackedTail kPackedTail{BITS};

inline __m256 fold_max(__m512 v) { return _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
inline __m256 fold(__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }

// The 4 weight rows of a tile against MC activation rows, in one pass (as the AVX2 kernel's rows_int8).
// NT = 2 (M = 1): tile + dt tiles as well, its rows' sums into res[1].
// CX: the compact activations of long rows (Int8Args::xkq; M = 1): the chunk factors broadcast from
// one qword per part and each merge's start value computed per block from xq, instead of the 64
// bytes of xk2 per part and 64 of xinit per merge read per block.
template <int BITS, int Q, int SRC, int MC, bool G64, int NT = 1, bool CX = false>
inline void rows_int8_512(const Int8Args& a, const Tables512& tab, const uint8_t* tile, const ScaleMap& sm,
                          int64_t m0, float (*res)[4], int64_t dt = 0) {
  static_assert(NT == 1 || MC == 1, "tile pairs only for decode");
  constexpr int NR = 4;
  static_assert(!CX || MC == 1, "compact activations only for decode");
  constexpr int P = BITS == 4 ? 2 : 4, BB = BITS == 3 ? 96 : 64, COLS = 64 * P, NM = P / Q;
  static_assert(P % Q == 0, "merged parts come in whole groups of Q");
  // In each 128-bit lane, dword q <- byte q of each of the lane's 4 code dwords (bytes_by_position).
  const __m512i by_pos = _mm512_set4_epi32(0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400);
  const __m512i m03 = _mm512_set1_epi8(0x03), m0C = _mm512_set1_epi8(0x0C);
  constexpr __mmask32 kHigh = 0xFFFF0000u;  // the words of the upper 256 bits (reg 1)
  const int64_t M = a.M;
  const int64_t tile_bytes = a.tile_bytes;
  // Zeroed through static_rows, one constant index at a time: GCC 12 turned the plain loop over the
  // tile pairs' 8 rows into a `rep stos` of the array, which then stayed in memory, every block's
  // FMAs loading and storing all 8 accumulators (4 rows it had kept in registers).
  __m512 facc[NT * NR][MC];
  static_rows<NT * NR>([&](auto r_c) __attribute__((always_inline)) {
    for (int mc = 0; mc < MC; ++mc) facc[decltype(r_c)::value][mc] = _mm512_setzero_ps();
  });
  // HALF: the last block when only its first P / 2 parts meet columns of K (Int8Args::last_half).
  // SHORT: the last block stored short (Int8Args::last_short): rows LB bytes apart, each index
  // register zero-extended from its even dwords (3 bits) or bytes (4 bits; lut_kernel.h).
  auto block = [&](int64_t b, auto fast_c, auto half_c, auto short_c) __attribute__((always_inline)) {
    constexpr bool FAST = decltype(fast_c)::value, HALF = decltype(half_c)::value;
    constexpr bool SHORT = decltype(short_c)::value;
    constexpr bool PACKED = packed_tail(BITS, SHORT, HALF);  // PackedTail
    constexpr int PU = HALF ? P / 2 : P;  // parts computed
    constexpr int LB = SHORT ? short_block_bytes(BITS, HALF) : BB;
    __m512 ub[MC];
    for (int mc = 0; mc < MC; ++mc) ub[mc] = _mm512_set1_ps(a.xu[b * M + m0 + mc]);
    // CX: the block's chunk factors and merge start values, shared by its rows (one activation row)
    __m512i kvc[CX ? P : 1], initc[CX ? NM : 1];
    if constexpr (CX && !PACKED) {
      const int8_t* xb = a.xq + (b * M + m0) * COLS;
      const __m512i c64 = _mm512_set1_epi8(64);
      for (int p = 0; p < PU; ++p) kvc[p] = _mm512_set1_epi64(static_cast<long long>(a.xkq[(b * M + m0) * P + p]));
      for (int j = 0; j * Q < PU; ++j) {
        // 64 * sum(x8 * k) per dword, as int8_prepare_avx512's xinit (the same integers)
        __m512i c = _mm512_setzero_si512();
        for (int p = j * Q; p < j * Q + Q && p < PU; ++p)
          c = _mm512_dpwssd_epi32(c, _mm512_maddubs_epi16(c64, _mm512_loadu_si512(xb + p * 64)), kvc[p]);
        initc[j] = _mm512_sub_epi32(_mm512_setzero_si512(), c);
      }
    }
    {
      for (int tt = 0; tt < NT; ++tt) {
        const char* ahead = reinterpret_cast<const char*>(tile + tt * dt * tile_bytes + b * 4 * BB) + kPrefetchAhead<BITS, NT>;
        for (int i = 0; i < 4 * BB / 64; ++i) _mm_prefetch(ahead + 64 * i, _MM_HINT_T0);
        // The next tile's scales: one tile (NT = 1) only. With tile pairs this prefetch cost time
        // on the Intel AMX VM (kernel alone, weights from DRAM, B/A without it: 3 bits 0.82-0.98,
        // 4 bits 0.94-0.98 over 1536x768, 576x1536 and 4096x4096 at 1 and 2 threads; without
        // tile pairs 0.98-1.02; CPU_NOTES item 158).
        if constexpr (NT == 1) prefetch_tile_scales<SRC>(sm, 4, b);
      }
    }
    if constexpr (PACKED) {
      const __m512i gp = _mm512_loadu_si512(a.tail + 3 * 64 * M);
      constexpr __mmask32 kOdd = 0xFF00FF00u;  // the words of 128-bit lanes 1 and 3 (3 bits: R1)
FLUTE_UNROLL(8)
      for (int rr = 0; rr < NT * NR; ++rr) {
        const int tt = rr / NR, r = rr % NR;
        const uint8_t* rb = tile + tt * dt * tile_bytes + b * 4 * BB + r * LB;
        const int64_t srow = r + 4 * dt * tt;
        const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb)));
        __m512i idx = _mm512_mask_srli_epi16(v, kHigh, v, 4);
        if constexpr (BITS == 3) idx = _mm512_mask_srli_epi16(idx, kOdd, idx, 1);
        const __m512i u = _mm512_permutexvar_epi8(idx, tab.A);
        const __m256 wv = load_scales8<SRC>(sm.WS, srow * sm.ngp + sm.g0[b]);
        for (int mc = 0; mc < MC; ++mc) {
          const int8_t* t = a.tail + 3 * 64 * (m0 + mc);  // [x][k][start] of the activation row
          const __m512i isum = _mm512_dpwssd_epi32(_mm512_loadu_si512(t + 128), _mm512_maddubs_epi16(u, _mm512_loadu_si512(t)),
                                                   _mm512_loadu_si512(t + 64));
          const __m512 ws = _mm512_permutexvar_ps(gp, _mm512_mul_ps(_mm512_castps256_ps512(wv), ub[mc]));
          facc[rr][mc] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), ws, facc[rr][mc]);
        }
      }
      return;
    }
FLUTE_UNROLL(8)
    for (int rr = 0; rr < NT * NR; ++rr) {
      const int tt = rr / NR, r = rr % NR;  // tile pairs: the second tile's rows are 4 * dt further
      const uint8_t* rb = tile + tt * dt * tile_bytes + b * 4 * BB + r * LB;
      const int64_t srow = r + 4 * dt * tt;
      __m512i u[P];
      if (BITS == 3) {
        // index register k of the row's block (a short block's: dwords 0, 2, 4, 6 from 16 bytes)
        auto reg = [&](int k) {
          if constexpr (SHORT) return _mm256_cvtepu32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + 16 * k)));
          else return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + 32 * k));
        };
        // [R | R >> 4]: reg 0's codes in the low half, reg 1's (4 bits up in the same bytes) in the high
        const __m512i B0 = _mm512_broadcast_i64x4(reg(0));
        const __m512i B1 = _mm512_broadcast_i64x4(reg(1));
        const __m512i B2 = HALF ? B0 : _mm512_broadcast_i64x4(reg(2));
        const __m512i i0 = _mm512_mask_srli_epi16(B0, kHigh, B0, 4);
        const __m512i i1 = _mm512_mask_srli_epi16(B1, kHigh, B1, 4);
        u[0] = _mm512_permutexvar_epi8(i0, tab.A);
        u[1] = _mm512_permutexvar_epi8(i1, tab.B);
        if constexpr (!HALF) {
          const __m512i i2 = _mm512_mask_srli_epi16(B2, kHigh, B2, 4);
          // bit select (0xCA: mask ? i2 : other): the low field from R2, the high bit from R0 / R1
          u[2] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(m03, i2, i0, 0xCA), tab.C);
          u[3] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(m0C, i2, i1, 0xCA), tab.D);
        }
      } else {
        __m512i raw;
        if constexpr (SHORT) raw = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb)));
        else raw = _mm512_loadu_si512(rb);
        const __m512i c = _mm512_shuffle_epi8(raw, by_pos);
        const __m512i cs = _mm512_srli_epi16(c, 4);
        u[0] = _mm512_permutexvar_epi8(c, tab.A);  // 4 bits (2 bits have the pair layout)
        u[1] = _mm512_permutexvar_epi8(cs, tab.A);
      }
      __m256 wv;
      __m512 wg[BITS == 4 ? 1 : 2];
      if constexpr (FAST) group_scales64_512<BITS, SRC>(sm, srow, b, wg);
      else wv = load_scales8<SRC>(sm.WS, srow * sm.ngp + sm.g0[b]);
      const int32_t* gi = sm.gidx + b * P * 8;
      for (int mc = 0; mc < MC; ++mc) {
        const int64_t bm = b * M + m0 + mc;
        const int8_t* xb = a.xq + bm * COLS;
        // (CX: neither buffer exists)
        const int16_t* xk = CX ? nullptr : a.xk2 + bm * P * 32;
        const int32_t* xi = CX ? nullptr : a.xinit + bm * NM * 16;
        __m512 wu = ub[mc];
        if constexpr (!FAST) wu = _mm512_mul_ps(_mm512_castps256_ps512(wv), wu);
        for (int j = 0; j * Q < PU; ++j) {
          __m512i isum;
          if constexpr (CX) isum = initc[j];
          else isum = _mm512_loadu_si512(xi + j * 16);
          for (int p = j * Q; p < j * Q + Q && p < PU; ++p) {
            const __m512i s16 = _mm512_maddubs_epi16(u[p], _mm512_loadu_si512(xb + p * 64));
            if constexpr (CX) isum = _mm512_dpwssd_epi32(isum, s16, kvc[p]);
            else isum = _mm512_dpwssd_epi32(isum, s16, _mm512_loadu_si512(xk + p * 32));
          }
          __m512 ws;
          if constexpr (FAST) {
            ws = _mm512_mul_ps(wg[j], wu);
          } else {
            const __m512i gidx = _mm512_broadcast_i32x8(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gi + (j * Q + Q - 1) * 8)));
            ws = _mm512_permutexvar_ps(gidx, wu);
          }
          facc[rr][mc] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), ws, facc[rr][mc]);
        }
      }
    }
  };
  for_blocks<BITS, SRC, G64>(a, block);
  if constexpr (NT == 2) {
    // The two tiles' row sums in 512-bit registers: the additions of fold and hsum4 below, in the
    // same order, on both tiles at once (tile 0 in the low 256 bits, tile 1 in the high; shuffle_ps
    // 0x88 / 0xDD and an add are hadd_ps): 24 instructions instead of 38 per pair, which was ~9% of
    // a 3-bit K = 512 call in cache.
    __m512 f[4];
    static_rows<4>([&](auto r_c) __attribute__((always_inline)) {
      constexpr int r = decltype(r_c)::value;
      const __m512 lo = _mm512_shuffle_f32x4(facc[r][0], facc[4 + r][0], _MM_SHUFFLE(1, 0, 1, 0));
      const __m512 hi = _mm512_shuffle_f32x4(facc[r][0], facc[4 + r][0], _MM_SHUFFLE(3, 2, 3, 2));
      f[r] = _mm512_add_ps(lo, hi);
    });
    auto hadd = [](__m512 a, __m512 b) {
      return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
    };
    const __m512 s = hadd(hadd(f[0], f[1]), hadd(f[2], f[3]));
    const __m512 t = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(2, 3, 0, 1)));
    _mm_storeu_ps(res[0], _mm512_castps512_ps128(t));
    _mm_storeu_ps(res[1], _mm512_extractf32x4_ps(t, 2));
  } else {
    for (int mc = 0; mc < MC; ++mc)
      _mm_storeu_ps(res[mc], hsum4(fold(facc[0][mc]), fold(facc[1][mc]), fold(facc[2][mc]), fold(facc[3][mc])));
  }
}

// CX: the compact activations (Int8Args::xkq), for one activation row only.
template <bool CX>
struct Avx512Int8 {
  using Tables = Tables512;
  static constexpr bool kDecodeOnly = CX;
  static constexpr bool kTilePairs = true;
  template <int BITS, int Q, int SRC, bool G64>
  static void pair(const Int8Args& a, const Tables& tab, const uint8_t* tile, int64_t dt, const ScaleMap& sm,
                   float (*res)[4]) {
    rows_int8_512<BITS, Q, SRC, 1, G64, 2, CX>(a, tab, tile, sm, 0, res, dt);
  }
  template <int BITS>
  static Tables tables(const uint8_t* tu) { return make_tables512<BITS>(tu); }
  template <int BITS, int Q, int SRC, int MC, bool G64>
  static void rows(const Int8Args& a, const Tables& tab, const uint8_t* tile, const ScaleMap& sm,
                   int64_t m0, float (*res)[4]) {
    rows_int8_512<BITS, Q, SRC, MC, G64, 1, CX>(a, tab, tile, sm, m0, res);
  }
};

// xq of `rows` block rows from the AVX2 kernel's order [reg][p][32] into this kernel's [p][reg][32],
// in place.
inline void reorder_xq(int P, int64_t rows, int8_t* xq) {
  alignas(64) int8_t tmp[256];
  for (int64_t br = 0; br < rows; ++br) {
    int8_t* x = xq + br * 64 * P;
    std::memcpy(tmp, x, 64 * P);
    for (int p = 0; p < P; ++p)
      for (int reg = 0; reg < 2; ++reg) std::memcpy(x + (2 * p + reg) * 32, tmp + (reg * P + p) * 32, 32);
  }
}

// The activations of one block straight into this kernel's byte order ([p][reg][32]), the bytes
// quantize_x_int8_avx2 and then reorder_xq give: each chunk's max, the shared block scales
// (int8_block_scales), the same division and rounding per value, then one two-source `vpermb` per
// part instead of the AVX2 order's dword copies and the reorder (CPU_NOTES item 179).
struct Order512 {
  alignas(64) uint8_t idx[2][4][64];  // [0: 4 bits, 1: 3 bits][part][byte]: column in source a, or 64 + in b
  uint8_t src[2][4][2];               // the two 64-column sources of each part
  alignas(32) int16_t kidx[2][4][16]; // chunk of each int16 of part p's chunk factors
  Order512() {
    for (int w = 0; w < 2; ++w) {
      const int bits = w ? 3 : 4, P = int8_parts(bits), C = chunks_per_block(bits);
      const int16_t* pos = int8_positions(bits);
      int col[256];
      for (int c = 0; c < 64 * P; ++c) {
        const int r = pos[c] / 32, reg = r / P, p = r % P;
        col[(p * 2 + reg) * 32 + pos[c] % 32] = c;
      }
      for (int p = 0; p < P; ++p) {
        int a = 8, b = -1;
        for (int o = 0; o < 64; ++o) {
          a = std::min(a, col[64 * p + o] / 64);
          b = std::max(b, col[64 * p + o] / 64);
        }
        src[w][p][0] = static_cast<uint8_t>(a);
        src[w][p][1] = static_cast<uint8_t>(b);
        for (int o = 0; o < 64; ++o) {
          const int c = col[64 * p + o];
          idx[w][p][o] = static_cast<uint8_t>(c % 64 + (c / 64 == a ? 0 : 64));
        }
        for (int hw = 0; hw < 16; ++hw) kidx[w][p][hw] = static_cast<int16_t>((P * ((hw & 7) >> 1) + p) % C);
      }
    }
  }
};

template <int BITS>
bool quantize_x_int8_512(const float* xf, int8_t* dst, int16_t* k, float* u) {
  constexpr int P = int8_parts(BITS), C = chunks_per_block(BITS);
  static const Order512 ord;
  constexpr int w = BITS == 3 ? 1 : 0;
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 fmax = _mm512_set1_ps(3.4028235e38f);
  float cmax[8];
  alignas(16) int16_t kc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int ch = 0; ch < C; ++ch) {
    const __m512 a0 = _mm512_and_ps(_mm512_loadu_ps(xf + 32 * ch), absmask);
    const __m512 a1 = _mm512_and_ps(_mm512_loadu_ps(xf + 32 * ch + 16), absmask);
    // false for NaN and Inf (a max would drop a NaN)
    if ((_mm512_cmp_ps_mask(a0, fmax, _CMP_LE_OQ) & _mm512_cmp_ps_mask(a1, fmax, _CMP_LE_OQ)) != 0xFFFF) return false;
    const __m256 m = fold_max(_mm512_max_ps(a0, a1));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    cmax[ch] = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
  *u = int8_block_scales(cmax, C, kc);
  const __m512i lo = _mm512_set1_epi8(-127);
  __m512i z[P];  // columns 64 j .. 64 j + 63, in column order
  for (int j = 0; j < P; ++j) {
    __m512i v = _mm512_setzero_si512();
    for (int c2 = 0; c2 < 2; ++c2) {
      const int ch = 2 * j + c2;
      const float sc = static_cast<float>(kc[ch]) * *u;
      for (int i = 0; i < 2; ++i) {
        // cvtps rounds to nearest even, as nearbyint; vpmovsdb saturates, the max below gives [-127, 127]
        const __m128i b = sc > 0.f ? _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(
                                         _mm512_div_ps(_mm512_loadu_ps(xf + 32 * ch + 16 * i), _mm512_set1_ps(sc))))
                                   : _mm_setzero_si128();
        v = _mm512_inserti32x4(v, b, 2 * c2 + i);
      }
    }
    z[j] = _mm512_max_epi8(v, lo);
  }
  const __m128i kcv = _mm_load_si128(reinterpret_cast<const __m128i*>(kc));
  for (int p = 0; p < P; ++p) {
    const __m512i idx = _mm512_load_si512(ord.idx[w][p]);
    _mm512_storeu_si512(dst + 64 * p, _mm512_permutex2var_epi8(z[ord.src[w][p][0]], idx, z[ord.src[w][p][1]]));
    const __m256i ki = _mm256_load_si256(reinterpret_cast<const __m256i*>(ord.kidx[w][p]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(k + 16 * p),
                        _mm256_permutexvar_epi16(ki, _mm256_castsi128_si256(kcv)));
  }
  return true;
}

}  // namespace

bool kernel_int8_avx512_built() { return true; }

bool quantize_x_int8_avx512(const float* xf, int bits, int8_t* dst, int16_t* corr, int16_t* k, float* u) {
  (void)corr;  // read by the AVX2 and portable kernels only
  return bits == 4 ? quantize_x_int8_512<4>(xf, dst, k, u) : quantize_x_int8_512<3>(xf, dst, k, u);
}

void int8_prepare_avx512(int bits, int merge, int64_t rows, int8_t* xq, const int16_t* xk, int16_t* xk2,
                         int32_t* xinit, bool ordered) {
  // Vectorized: this runs on the calling thread before the call's threads start (its scalar form
  // was ~0.8 us of a 576x1536 call; CPU_NOTES item 136).
  const int P = int8_parts(bits), NM = P / merge, COLS = 64 * P;
  // dword d of a part's zmm (reg d / 8, half (d / 4) % 2, dword q = d % 4) is 4 activations of
  // int16 (h, q) of the chunk factors k, the even ones: k[8 h + 2 q] = k[2 (d % 8)]
  const __m512i k_of_dword = _mm512_set_epi32(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i ones = _mm512_set1_epi8(1);
  if (!ordered) reorder_xq(P, rows, xq);
  for (int64_t br = 0; br < rows; ++br) {
    int8_t* x = xq + br * COLS;
    const int16_t* k = xk + br * P * 16;
    __m512i kd[4];
    for (int p = 0; p < P; ++p) {
      const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + p * 16));
      _mm512_storeu_si512(xk2 + (br * P + p) * 32, _mm512_inserti64x4(_mm512_castsi256_si512(kv), kv, 1));
      kd[p] = _mm512_permutexvar_epi32(k_of_dword, _mm512_cvtepi16_epi32(kv));
    }
    for (int j = 0; j < NM; ++j) {
      __m512i c = _mm512_setzero_si512();
      for (int p = j * merge; p < j * merge + merge; ++p) {
        // the part's 64 bytes in the kernel's order: dword d's 4 bytes at 4 d
        const __m512i s4 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(x + 2 * p * 32));
        c = _mm512_add_epi32(c, _mm512_mullo_epi32(kd[p], s4));
      }
      _mm512_storeu_si512(xinit + (br * NM + j) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(c, 6)));
    }
  }
}

void int8_prepare_compact_avx512(int bits, int64_t rows, int8_t* xq, const int16_t* xk, uint64_t* xkq, bool ordered) {
  if (!ordered) reorder_xq(int8_parts(bits), rows, xq);
  int8_compact_factors(int8_parts(bits), rows, xk, xkq);
}

void int8_prepare_tail_avx512(const Int8Args& a, int8_t* dst) {
  const PackedTail& pt = a.bits == 3 ? kPackedTail<3> : kPackedTail<4>;
  const int P = int8_parts(a.bits), COLS = 64 * P;
  const int64_t b = a.nblocks - 1, M = a.M;
  const __m512i ix = _mm512_load_si512(pt.x), ik = _mm512_load_si512(pt.k), c64 = _mm512_set1_epi8(64);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t bm = b * M + m;
    const int8_t* xb = a.xq + bm * COLS;
    const __m512i x = _mm512_permutex2var_epi8(_mm512_loadu_si512(xb), ix, _mm512_loadu_si512(xb + 64));
    __m512i k0, k1;
    if (a.xkq) {  // the compact form: the factors of dwords 0 and 1 in a qword per part
      k0 = _mm512_set1_epi64(static_cast<long long>(a.xkq[bm * P]));
      k1 = _mm512_set1_epi64(static_cast<long long>(a.xkq[bm * P + 1]));
    } else {
      k0 = _mm512_loadu_si512(a.xk2 + bm * P * 32);
      k1 = _mm512_loadu_si512(a.xk2 + bm * P * 32 + 32);
    }
    const __m512i k = _mm512_permutex2var_epi16(k0, ik, k1);
    // the start value: minus 64 * sum(x8 * k) per dword, as the compact form computes it per merge
    const __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(),
                                          _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(c64, x), k));
    _mm512_storeu_si512(dst + 3 * 64 * m, x);
    _mm512_storeu_si512(dst + 3 * 64 * m + 64, k);
    _mm512_storeu_si512(dst + 3 * 64 * m + 128, init);
  }
  _mm512_storeu_si512(dst + 3 * 64 * M,
                     _mm512_permutexvar_epi32(_mm512_load_si512(pt.g), _mm512_loadu_si512(a.gidx + b * P * 8)));
}

void gemm_int8_avx512(const Int8Args& a, int64_t t0, int64_t t1) {
  if (a.xkq) gemm_int8_dispatch<Avx512Int8<true>>(a, t0, t1);
  else gemm_int8_dispatch<Avx512Int8<false>>(a, t0, t1);
}

}  // namespace flute_cpu
#endif
