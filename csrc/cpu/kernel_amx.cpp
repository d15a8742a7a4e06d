// flute CPU kernel, AMX path: bf16 activations on CPUs with AMX-BF16 (Sapphire Rapids and later),
// from 16 activation rows (binding.cpp: amx_m). Compiled in its own translation unit with the
// AVX-512 flags plus -mavx512bf16 -mamx-tile -mamx-bf16.
//
// Why: torch's bf16 matmul runs on AMX on these CPUs, so at 16+ rows it is bound by reading its
// 2-byte weights, and the panel path (decode to bf16, then oneDNN, which repacks every panel) lost
// to it by 2x (CPU_NOTES item 90). Here the decoded weights never leave L1: the rows are the AMX
// "A" operand, so each decoded chunk goes straight into a tile.
//
// The product is computed transposed, C^T = W x^T, per block of 16 weight rows (4 layout tiles):
//   A (tile 0): 16 weight rows x 32 columns, bf16, row-major: one 64-byte row is exactly what one
//     shift (3 bits: one `vpermb`) and one `vpermw` decode from a row's block chunk (decode_chunk:
//     natural column order), read from the CPU layout as it is,
//     from the row's table scaled (and offset) for the chunk's group and rounded to bf16 once, so
//     W = bf16(table[q] * s + o): the panel path's weights;
//   B (tiles 1, 2, alternating so that a load overlaps the previous product): 32 columns x 16
//     activation rows in AMX's pair-interleaved form, 16 rows of 64 bytes (column pair p: the 2
//     bf16 of each of the 16 activation rows), prepared once per call (amx_prepare_x);
//   C (tiles 3 ..): 16 weight rows x 16 activation rows, fp32, one tile per 16 activation rows,
//     up to kMaxMB of them per pass (more rows: another pass over the weights).
// Every chunk of 32 columns lies in one group (groups of a multiple of 32 columns, or one group),
// so the tables change only between chunks and no partial sums are kept outside the tiles.
// Padding: rows past N decode through zero scales (zero weights), columns past K meet zero
// activations, activation rows past M are zero and their outputs are not written.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "avx512bf16_common.h"

namespace flute_cpu {
namespace {

constexpr int kRows = 16;        // weight rows per block: one A tile, 4 layout tiles
constexpr int kMaxMB = 5;        // C tiles: 8 tile registers minus A and two B
constexpr int64_t kTileElems = 16 * 32;  // bf16 elements of an A or B tile (1 KiB)
constexpr int64_t kPrefetchBytes = 2048;

// The tile configuration (palette 1): every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

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
  if constexpr (NMB > 4) { _tile_loadd(1, xv + 4 * kTileElems, 64); _tile_dpbf16ps(7, 0, 1); }
}

template <int NMB>
inline void zero_c() {
  _tile_zero(3);
  if constexpr (NMB > 1) _tile_zero(4);
  if constexpr (NMB > 2) _tile_zero(5);
  if constexpr (NMB > 3) _tile_zero(6);
  if constexpr (NMB > 4) _tile_zero(7);
}

template <int NMB>
inline void store_c(float* cbuf) {
  _tile_stored(3, cbuf, 64);
  if constexpr (NMB > 1) _tile_stored(4, cbuf + 256, 64);
  if constexpr (NMB > 2) _tile_stored(5, cbuf + 512, 64);
  if constexpr (NMB > 3) _tile_stored(6, cbuf + 768, 64);
  if constexpr (NMB > 4) _tile_stored(7, cbuf + 1024, 64);
}

// One block of 16 weight rows (`rows`: its first layout tile, in the form decode_chunk reads;
// nr of its rows exist) times NMB blocks of 16 activation rows from activation block mb0; the C
// tiles go to cbuf [NMB][16 weight rows][16 activation rows].
// More than kMaxMB activation blocks take several passes: the first (mode kDecodeKeep) decodes
// into `acache` (the block's rows over all K: 16 x K_pad bf16, in L2), the later ones (kCached)
// only load from it. A single pass (kDecode) decodes into a double-buffered L1 tile.
enum APass { kDecode, kDecodeKeep, kCached };

template <int BITS, int NMB>
void block_product(const GemmArgs& a, const uint8_t* rows, int nr, int64_t tile_bytes,
                   const float* sc, const float* of, int64_t mb0, int64_t mbs, uint16_t* abuf,
                   uint16_t* acache, APass pass, float* cbuf) {
  constexpr int C = BITS == 4 ? 4 : 8;
  constexpr int BB = 4 * C * BITS;
  const __m512 T = tables<BITS>(a.table);
  const int64_t ngp = a.ngp, cpg = a.cpg;
  alignas(64) __m512i tw[kRows];
  auto set_tables = [&](int64_t g) {
    for (int r = 0; r < nr; ++r) tw[r] = word_table(T, sc[r * ngp + g], of ? of[r * ngp + g] : 0.f);
  };
  zero_c<NMB>();
  if (pass == kCached) {
    const int64_t chunks = a.nblocks * C;
    for (int64_t k = 0; k < chunks; ++k) {
      _tile_loadd(0, acache + k * kTileElems, 64);
      products<NMB>(a.xb + (k * mbs + mb0) * kTileElems);
    }
    store_c<NMB>(cbuf);
    return;
  }
  set_tables(0);
  int64_t g = 0, cc = 0;
  // The next block of 16 rows (4 tiles, contiguous) is fetched into L2 a slice per K block while
  // this one is decoded: a whole block ahead, across its 4 KB pages, which the hardware
  // prefetchers do not cross (K = 2048, 4 bits: one page per tile).
  const char* next = reinterpret_cast<const char*>(rows + 4 * tile_bytes);
  const int64_t slice = (4 * tile_bytes / a.nblocks + 63) / 64 * 64;
  for (int64_t b = 0; b < a.nblocks; ++b) {
    for (int t = 0; t < (nr + 3) / 4; ++t) {
      const char* pf = reinterpret_cast<const char*>(rows + t * tile_bytes + b * 4 * BB + kPrefetchBytes);
      for (int i = 0; i < 4 * BB; i += 64) _mm_prefetch(pf + i, _MM_HINT_T0);
    }
    for (int64_t i = 0; i < slice; i += 64) _mm_prefetch(next + b * slice + i, _MM_HINT_T1);
    auto row_of = [&](int r) { return rows + (r >> 2) * tile_bytes + b * 4 * BB + (r & 3) * BB; };
    // 3 bits: each row's block split into its part vectors once, for all 8 chunks (in L1)
    alignas(64) __m512i parts[BITS == 3 ? kRows : 1][kBlockVecs<BITS>];
    if constexpr (BITS == 3)
      for (int r = 0; r < nr; ++r) load_block<BITS>(row_of(r), parts[r]);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      uint16_t* ab = pass == kDecodeKeep ? acache + (b * C + c) * kTileElems : abuf + (c & 1) * kTileElems;
#pragma GCC unroll 16
      for (int r = 0; r < nr; ++r) {
        __m512i w;
        if constexpr (BITS == 3) {
          w = decode_chunk<BITS>(parts[r], c, tw[r]);
        } else {
          const __m512i d = _mm512_loadu_si512(row_of(r));
          w = decode_chunk<BITS>(&d, c, tw[r]);
        }
        _mm512_storeu_si512(ab + r * 32, w);
      }
      _tile_loadd(0, ab, 64);
      products<NMB>(a.xb + ((b * C + c) * mbs + mb0) * kTileElems);
      if (++cc == cpg) {
        ++g;
        cc = 0;
        set_tables(g);
      }
    }
  }
  store_c<NMB>(cbuf);
}

// r[i][j] <- r[j][i] for 16 vectors of 16 dwords: four butterfly rounds, each swapping the
// off-diagonal s x s blocks (s = 8, 4, 2, 1) of row pairs (i, i + s) with two `vpermt2d`.
inline void transpose16(__m512i* r) {
  for (int s = 8; s >= 1; s >>= 1) {
    alignas(64) int32_t lo[16], hi[16];
    for (int c = 0; c < 16; ++c) {
      lo[c] = (c & s) ? 16 + c - s : c;  // row i keeps its columns without bit s, takes row i + s's
      hi[c] = (c & s) ? 16 + c : c + s;
    }
    const __m512i il = _mm512_load_si512(lo), ih = _mm512_load_si512(hi);
    for (int i = 0; i < 16; ++i) {
      if (i & s) continue;
      const __m512i a = r[i], b = r[i + s];
      r[i] = _mm512_permutex2var_epi32(a, il, b);
      r[i + s] = _mm512_permutex2var_epi32(a, ih, b);
    }
  }
}

template <int BITS>
void gemm_bits(const GemmArgs& a, int64_t b0, int64_t b1) {
  constexpr int BB = 4 * (BITS == 4 ? 4 : 8) * BITS;
  const int64_t tile_bytes = a.nblocks * 4 * BB, ngp = a.ngp, ng = a.ng;
  const int64_t mbs = (a.M + 15) / 16;  // activation blocks
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
  FloatBuf sc(kRows * ngp), of(a.offsets ? kRows * ngp : 1);
  alignas(64) uint16_t abuf[2 * kTileElems];  // decoded A tiles, double-buffered
  alignas(64) float cbuf[kMaxMB * 256];
  Buf<uint16_t> acache(mbs > kMaxMB ? a.K_pad * kRows : 0);
  for (int64_t nb = b0; nb < b1; ++nb) {
    const int64_t n0 = nb * kRows;
    const int nr = static_cast<int>(min64(kRows, a.N_pad - n0));  // rows in the layout
    for (int r = 0; r < kRows; ++r) {
      float* s = sc.data() + r * ngp;
      for (int64_t i = 0; i < ngp; ++i) s[i] = 0.f;
      if (a.offsets)
        for (int64_t i = 0; i < ngp; ++i) of[r * ngp + i] = 0.f;
      if (n0 + r < a.N) {
        load_row(a.scales, a.stype, n0 + r, ng, s);
        if (a.offsets) load_row(a.offsets, a.stype, n0 + r, ng, of.data() + r * ngp);
      }
    }
    std::memset(abuf, 0, sizeof(abuf));  // rows past the layout stay zero
    const uint8_t* rows = a.qw + (n0 / 4) * tile_bytes;
    const float* ofp = a.offsets ? of.data() : nullptr;
    if (mbs > kMaxMB && nr < kRows) std::memset(acache.data(), 0, a.K_pad * kRows * sizeof(uint16_t));
    for (int64_t mb0 = 0; mb0 < mbs; mb0 += kMaxMB) {
      const int nmb = static_cast<int>(min64(kMaxMB, mbs - mb0));
      const APass pass = mbs <= kMaxMB ? kDecode : mb0 == 0 ? kDecodeKeep : kCached;
      switch (nmb) {
        case 1: block_product<BITS, 1>(a, rows, nr, tile_bytes, sc.data(), ofp, mb0, mbs, abuf, acache.data(), pass, cbuf); break;
        case 2: block_product<BITS, 2>(a, rows, nr, tile_bytes, sc.data(), ofp, mb0, mbs, abuf, acache.data(), pass, cbuf); break;
        case 3: block_product<BITS, 3>(a, rows, nr, tile_bytes, sc.data(), ofp, mb0, mbs, abuf, acache.data(), pass, cbuf); break;
        case 4: block_product<BITS, 4>(a, rows, nr, tile_bytes, sc.data(), ofp, mb0, mbs, abuf, acache.data(), pass, cbuf); break;
        default: block_product<BITS, 5>(a, rows, nr, tile_bytes, sc.data(), ofp, mb0, mbs, abuf, acache.data(), pass, cbuf); break;
      }
      // C tile i is [weight row][activation row]: transposed into out's rows
      const int nv = static_cast<int>(min64(kRows, a.N - n0));
      const __mmask16 kn = nv >= 16 ? __mmask16(0xffff) : __mmask16((1u << nv) - 1);
      for (int i = 0; i < nmb; ++i) {
        const int64_t m0 = (mb0 + i) * 16;
        const int mv = static_cast<int>(min64(16, a.M - m0));
        __m512i t[16];
        for (int r = 0; r < 16; ++r) t[r] = _mm512_load_si512(cbuf + i * 256 + r * 16);
        transpose16(t);
        for (int m = 0; m < mv; ++m) _mm512_mask_storeu_epi32(a.out + (m0 + m) * a.N + n0, kn, t[m]);
      }
    }
  }
  _tile_release();
}

}  // namespace

bool kernel_amx_built() { return true; }

void amx_prepare_x(const uint16_t* x, int64_t M, int64_t K, int64_t K_pad, uint16_t* xb) {
  // xb [K_pad/32 chunks][ceil(M/16) blocks][16 column pairs][16 rows][2]: B tiles in order. Each
  // tile is the 16x16 dword transpose of 16 rows' 32 columns.
  const int64_t mbs = (M + 15) / 16, chunks = K_pad / 32;
  for (int64_t kc = 0; kc < chunks; ++kc) {
    const int64_t col = kc * 32, nv = col < K ? min64(32, K - col) : 0;
    const __mmask32 km = nv >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << nv) - 1);
    for (int64_t mb = 0; mb < mbs; ++mb) {
      __m512i r[16];
      for (int m = 0; m < 16; ++m) {
        const int64_t row = mb * 16 + m;
        r[m] = row < M ? _mm512_maskz_loadu_epi16(km, x + row * K + col) : _mm512_setzero_si512();
      }
      transpose16(r);
      uint16_t* t = xb + (kc * mbs + mb) * kTileElems;
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(t + q * 32, r[q]);
    }
  }
}

void gemm_amx(const GemmArgs& a, int64_t b0, int64_t b1) {
  switch (a.bits) {
    case 2: gemm_bits<2>(a, b0, b1); break;
    case 3: gemm_bits<3>(a, b0, b1); break;
    default: gemm_bits<4>(a, b0, b1); break;
  }
}

}  // namespace flute_cpu
#endif
