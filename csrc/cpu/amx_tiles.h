// The AMX kernels' building blocks (kernel_amx.cpp, its only includer): the tile configuration,
// the tile products, the decoders that turn the CPU layout's codes into bf16 A tiles, and a 16 x 16
// dword transpose. Plain intrinsics; compiled with kernel_amx.cpp's flags (AVX-512 + BF16 + VBMI +
// AMX-TILE + AMX-BF16). The A / B / C tile roles are described at the top of kernel_amx.cpp.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "avx512bf16_common.h"
#include "pair_lut.h"

namespace flute_cpu::amx {

constexpr int kRows = 16;        // weight rows per block: one A tile, 4 layout tiles
constexpr int kMaxMB = 4;        // C tiles (up to 5 fit: 8 tile registers minus A and two B);
                                 // binding.cpp sends at most 64 rows here (kAmxMaxM)
constexpr int64_t kTileElems = 16 * 32;  // bf16 elements of an A or B tile (1 KiB)
constexpr int64_t kPrefetchBytes = 2048;

// The tile configuration (palette 1): every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows of 64 bytes (palette 1), for this thread.
inline void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

// The scales (and offsets, if of) of weight rows [n0, n0 + rows) as fp32, a.ngp slots per row;
// rows past N and slots past the row's groups zero (zero weights).
inline void load_scale_rows(const GemmArgs& a, int64_t n0, int64_t rows, float* sc, float* of) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < a.ngp; ++i) sc[r * a.ngp + i] = 0.f;
    if (of)
      for (int64_t i = 0; i < a.ngp; ++i) of[r * a.ngp + i] = 0.f;
    if (n0 + r < a.N) {
      load_row(a.scales, a.stype, n0 + r, a.ng, sc + r * a.ngp);
      if (of) load_row(a.offsets, a.stype, n0 + r, a.ng, of + r * a.ngp);
    }
  }
}

// The tile register numbers are assembler immediates (GCC's _tile_* macros paste them into the
// instruction text), hence one line per C tile. B tiles alternate between registers 1 and 2 so a
// load overlaps the previous product; the C tile of activation block i is register 3 + i.
template <int NMB>
inline void products(const uint16_t* xv) {
  static_assert(NMB >= 1 && NMB <= kMaxMB);
  _tile_loadd(1, xv, 64);
  _tile_dpbf16ps(3, 0, 1);
  if constexpr (NMB > 1) { _tile_loadd(2, xv + kTileElems, 64); _tile_dpbf16ps(4, 0, 2); }
  if constexpr (NMB > 2) { _tile_loadd(1, xv + 2 * kTileElems, 64); _tile_dpbf16ps(5, 0, 1); }
  if constexpr (NMB > 3) { _tile_loadd(2, xv + 3 * kTileElems, 64); _tile_dpbf16ps(6, 0, 2); }
}

template <int NMB>
inline void zero_c() {
  _tile_zero(3);
  if constexpr (NMB > 1) _tile_zero(4);
  if constexpr (NMB > 2) _tile_zero(5);
  if constexpr (NMB > 3) _tile_zero(6);
}

template <int NMB>
inline void store_c(float* cbuf) {
  _tile_stored(3, cbuf, 64);
  if constexpr (NMB > 1) _tile_stored(4, cbuf + 256, 64);
  if constexpr (NMB > 2) _tile_stored(5, cbuf + 512, 64);
  if constexpr (NMB > 3) _tile_stored(6, cbuf + 768, 64);
}

// ---- 2 bits: the pair layout (pair_lut.h) -----------------------------------------------------
// A pair-layout tile has 16 rows, and its 128-byte chunk holds exactly one A tile's 16 x 32 codes:
// row i's code of column w is in byte 32 s + 16 L + i (s = w / 8, L = w / 2 % 2), bits 4 hi + 2 odd
// (hi = w / 4 % 2, odd = w % 2). One `vpermt2b` per 8 rows gathers each row's 8 bytes into a qword
// (row byte 2 s + L = chunk byte 16 (2 s + L) + i), so column w's code is in word s of its row's
// qword at bit 8 L + 4 hi + 2 odd. Per row, one `vpermw` puts that word in the column's place and
// one `vpsrlvw` shifts the code to bits 0-1; the table `vpermw` ignores the garbage above them,
// since a 2-bit table repeats every 4 entries (tables<2>). Two permutes and a shift per 32 weights,
// against a load, a shift and a permute for the 4-bit layout's.
struct PairDecodeIndex {
  alignas(64) uint8_t gather[2][64];  // vpermt2b, rows 8 h .. 8 h + 7: byte 8 r + j = chunk byte 16 j + 8 h + r
  alignas(64) uint16_t word[8][32];   // vpermw, row r of its 8: word w = word w / 8 of qword r
  alignas(64) uint16_t shift[32];     // vpsrlvw: 8 L + 4 hi + 2 odd
  constexpr PairDecodeIndex() : gather{}, word{}, shift{} {
    for (int h = 0; h < 2; ++h)
      for (int b = 0; b < 64; ++b) gather[h][b] = static_cast<uint8_t>(16 * (b & 7) + 8 * h + (b >> 3));
    for (int r = 0; r < 8; ++r)
      for (int w = 0; w < 32; ++w) word[r][w] = static_cast<uint16_t>(4 * r + (w >> 3));
    for (int w = 0; w < 32; ++w)
      shift[w] = static_cast<uint16_t>(8 * ((w >> 1) & 1) + 4 * ((w >> 2) & 1) + 2 * (w & 1));
  }
};
constexpr PairDecodeIndex kPairDecode{};

// A pair-layout chunk (128 bytes at cp) to its 16 rows' 32 bf16 weights each, natural column
// order, row r from tw[r] (word_table of tables<2>), into dst rows of 32 (an A tile).
inline void decode_pair_chunk(const uint8_t* cp, const __m512i* tw, uint16_t* dst) {
  const __m512i lo = _mm512_loadu_si512(cp), hi = _mm512_loadu_si512(cp + 64);
  const __m512i q[2] = {_mm512_permutex2var_epi8(lo, _mm512_load_si512(kPairDecode.gather[0]), hi),
                        _mm512_permutex2var_epi8(lo, _mm512_load_si512(kPairDecode.gather[1]), hi)};
  const __m512i sh = _mm512_load_si512(kPairDecode.shift);
FLUTE_UNROLL(16)
  for (int r = 0; r < kRows; ++r) {
    const __m512i words = _mm512_permutexvar_epi16(_mm512_load_si512(kPairDecode.word[r & 7]), q[r >> 3]);
    _mm512_storeu_si512(dst + r * 32, _mm512_permutexvar_epi16(_mm512_srlv_epi16(words, sh), tw[r]));
  }
}

// The first byte of the 16 weight rows from n0 (a multiple of 16) in the layout: 4 tiles of 4
// rows (3/4 bits, tile_bytes each) or one pair-layout tile (2 bits).
template <int BITS>
inline const uint8_t* rows16(const GemmArgs& a, int64_t n0, int64_t tile_bytes) {
  if constexpr (BITS == 2) return pair_tile(a.qw, a.nblocks, n0 / kPairTileRows);
  else return a.qw + (n0 / 4) * tile_bytes;
}

// Rows [0, nr) of a 16-row block's short last block b (lut_kernel.h: last_block_bytes lb < BB) as
// whole block rows into tail[r], as expand_last_block writes them: one zero-extending load per 16
// bytes (a scalar byte loop made 4-bit 1536x576 at 16 rows ~15% slower).
template <int BITS>
inline void expand_short_rows(const uint8_t* rows, int64_t tile_bytes, int64_t b, int lb, int nr,
                              uint8_t (*tail)[4 * (BITS == 4 ? 4 : 8) * BITS]) {
  constexpr int BB = 4 * (BITS == 4 ? 4 : 8) * BITS;
  for (int r = 0; r < nr; ++r) {
    const uint8_t* src = rows + (r >> 2) * tile_bytes + b * 4 * BB + (r & 3) * lb;
    if constexpr (BITS == 4) {
      _mm512_store_si512(tail[r], _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))));
    } else {
      for (int k = 0; k < 3; ++k) {
        const __m256i v = 16 * k < lb ? _mm256_cvtepu32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * k)))
                                      : _mm256_setzero_si256();
        _mm256_store_si256(reinterpret_cast<__m256i*>(tail[r] + 32 * k), v);
      }
    }
  }
}

// Chunks per layout block: 4 (4 bits), 8 (3 bits), 1 (2 bits: a pair-layout chunk is the block).
template <int BITS>
constexpr int kChunks = BITS == 4 ? 4 : BITS == 3 ? 8 : 1;

// The word tables (word_table) of rows [0, nr) of a 16-row block for group g, from the block's
// scales and offsets (sc, of: ngp slots per row).
inline void row_tables(__m512 T, const float* sc, const float* of, int64_t ngp, int64_t g, int nr, __m512i* tw) {
  for (int r = 0; r < nr; ++r) tw[r] = word_table(T, sc[r * ngp + g], of ? of[r * ngp + g] : 0.f);
}

// r[i][j] <- r[j][i] for 16 vectors of 16 dwords: four butterfly rounds, each swapping the
// off-diagonal s x s blocks (s = 8, 4, 2, 1) of row pairs (i, i + s) with two `vpermt2d`. The
// index vectors are constants: built per call, they cost as much as the permutes.
struct TransposeIndex {
  alignas(64) int32_t lo[4][16], hi[4][16];  // round j: s = 8 >> j
  constexpr TransposeIndex() : lo{}, hi{} {
    for (int j = 0; j < 4; ++j)
      for (int c = 0; c < 16; ++c) {
        const int s = 8 >> j;
        lo[j][c] = (c & s) ? 16 + c - s : c;  // row i keeps its columns without bit s, takes row i + s's
        hi[j][c] = (c & s) ? 16 + c : c + s;
      }
  }
};
constexpr TransposeIndex kTransposeIndex{};

inline void transpose16(__m512i* r) {
FLUTE_UNROLL(4)
  for (int j = 0; j < 4; ++j) {
    const int s = 8 >> j;
    const __m512i il = _mm512_load_si512(kTransposeIndex.lo[j]), ih = _mm512_load_si512(kTransposeIndex.hi[j]);
FLUTE_UNROLL(16)
    for (int i = 0; i < 16; ++i) {
      if (i & s) continue;
      const __m512i a = r[i], b = r[i + s];
      r[i] = _mm512_permutex2var_epi32(a, il, b);
      r[i + s] = _mm512_permutex2var_epi32(a, ih, b);
    }
  }
}

}  // namespace flute_cpu::amx
#endif
