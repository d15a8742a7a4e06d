// flute CPU kernel, AMX path: bf16 activations on CPUs with AMX-BF16 (Sapphire Rapids and later),
// from 16 activation rows (settings.cpp: amx_m; gemm_amx up to 64 rows, gemm_amx_rows beyond). Compiled in its own translation unit with the
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
//     natural column order), read from the CPU layout as it is (2 bits: a pair-layout chunk,
//     decode_pair_chunk),
//     from the row's table scaled (and offset) for the chunk's group and rounded to bf16 once, so
//     W = bf16(table[q] * s + o): the panel path's weights;
//   B (tiles 1, 2, alternating so that a load overlaps the previous product): 32 columns x 16
//     activation rows in AMX's pair-interleaved form, 16 rows of 64 bytes (column pair p: the 2
//     bf16 of each of the 16 activation rows), prepared once per call (amx_prepare_x);
//   C (tiles 3 ..): 16 weight rows x 16 activation rows, fp32, one tile per 16 activation rows,
//     up to kMaxMB of them (one pass over the weights; more rows take gemm_amx_rows below).
// Every chunk of 32 columns lies in one group (groups of a multiple of 32 columns, or one group),
// so the tables change only between chunks and no partial sums are kept outside the tiles.
// Padding: rows past N decode through zero scales (zero weights), columns past K meet zero
// activations, activation rows past M are zero and their outputs are not written.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <new>

#include "amx_tiles.h"

namespace flute_cpu {
namespace {

using namespace amx;

// One block of 16 weight rows (`rows`: its first layout tile, in the form decode_chunk reads, or
// its pair-layout tile; nr of its rows exist) times NMB blocks of 16 activation rows; the C tiles
// go to cbuf [NMB][16 weight rows][16 activation rows]. Each chunk is decoded into a
// double-buffered L1 tile.
template <int BITS, int NMB>
void block_product(const GemmArgs& a, const uint8_t* rows, int nr, int64_t tile_bytes,
                   const float* sc, const float* of, int64_t mbs, uint16_t* abuf, float* cbuf) {
  constexpr int C = kChunks<BITS>;
  constexpr int BB = 4 * C * BITS;  // 3/4 bits: a row's block
  const __m512 T = tables<BITS>(a.table);
  const int64_t ngp = a.ngp, cpg = a.cpg;
  alignas(64) __m512i tw[kRows];
  zero_c<NMB>();
  row_tables(T, sc, of, ngp, 0, nr, tw);
  int64_t g = 0, cc = 0;
  for (int64_t b = 0; b < a.nblocks; ++b) {
    if constexpr (BITS == 2) {
      // one stream: the lines kPrefetchBytes ahead, into the next tile near the end of this one
      const char* pf = reinterpret_cast<const char*>(rows + b * kPairChunkBytes) + kPrefetchBytes;
      _mm_prefetch(pf, _MM_HINT_T0);
      _mm_prefetch(pf + 64, _MM_HINT_T0);
    } else {
      for (int t = 0; t < (nr + 3) / 4; ++t) {
        const char* pf = reinterpret_cast<const char*>(rows + t * tile_bytes + b * 4 * BB + kPrefetchBytes);
        for (int i = 0; i < 4 * BB; i += 64) _mm_prefetch(pf + i, _MM_HINT_T0);
      }
      // The next block of 16 rows (4 tiles, contiguous) is fetched into L2 a slice per K block
      // while this one is decoded: a whole block ahead, across its 4 KB pages, which the hardware
      // prefetchers do not cross (K = 2048, 4 bits: one page per tile).
      const char* next = reinterpret_cast<const char*>(rows + 4 * tile_bytes);
      const int64_t slice = (4 * tile_bytes / a.nblocks + 63) / 64 * 64;
      for (int64_t i = 0; i < slice; i += 64) _mm_prefetch(next + b * slice + i, _MM_HINT_T1);
    }
    // a short last block (lut_kernel.h) expanded per row into tail, once per 16 rows
    alignas(64) uint8_t tail[BITS == 2 ? 1 : kRows][BITS == 2 ? 1 : BB];
    const bool short_b = BITS != 2 && b == a.nblocks - 1 && a.last_bytes < BB;
    if constexpr (BITS != 2)
      if (short_b) expand_short_rows<BITS>(rows, tile_bytes, b, a.last_bytes, nr, tail);
    auto row_of = [&](int r) { return short_b ? tail[r] : rows + (r >> 2) * tile_bytes + b * 4 * BB + (r & 3) * BB; };
    // 3 bits: each row's block split into its part vectors once, for all 8 chunks (in L1)
    alignas(64) __m512i parts[BITS == 3 ? kRows : 1][kBlockVecs<BITS>];
    if constexpr (BITS == 3)
      for (int r = 0; r < nr; ++r) load_block<BITS>(row_of(r), parts[r]);
FLUTE_UNROLL(8)
    for (int c = 0; c < C; ++c) {
      uint16_t* ab = abuf + ((b * C + c) & 1) * kTileElems;
      if constexpr (BITS == 2) {
        decode_pair_chunk(rows + b * kPairChunkBytes, tw, ab);
      } else {
FLUTE_UNROLL(16)
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
      }
      _tile_loadd(0, ab, 64);
      products<NMB>(a.xb + (b * C + c) * mbs * kTileElems);
      if (++cc == cpg) {
        ++g;
        cc = 0;
        row_tables(T, sc, of, ngp, g, nr, tw);
      }
    }
  }
  store_c<NMB>(cbuf);
}

template <int BITS>
void gemm_bits(const GemmArgs& a, int64_t b0, int64_t b1) {
  const int64_t tile_bytes = a.tile_bytes, ngp = a.ngp;
  const int64_t mbs = (a.M + 15) / 16;  // activation blocks
  configure_tiles();
  FloatBuf sc(kRows * ngp), of(a.offsets ? kRows * ngp : 1);
  alignas(64) uint16_t abuf[2 * kTileElems];  // decoded A tiles, double-buffered
  alignas(64) float cbuf[kMaxMB * 256];
  for (int64_t nb = b0; nb < b1; ++nb) {
    const int64_t n0 = nb * kRows;
    const int nr = static_cast<int>(min64(kRows, a.N_pad - n0));  // rows in the layout
    load_scale_rows(a, n0, kRows, sc.data(), a.offsets ? of.data() : nullptr);
    std::memset(abuf, 0, sizeof(abuf));  // rows past the layout stay zero
    const uint8_t* rows = rows16<BITS>(a, n0, tile_bytes);
    const float* ofp = a.offsets ? of.data() : nullptr;
    const int nmb = static_cast<int>(mbs);  // 1 to kMaxMB
    switch (nmb) {
      case 1: block_product<BITS, 1>(a, rows, nr, tile_bytes, sc.data(), ofp, mbs, abuf, cbuf); break;
      case 2: block_product<BITS, 2>(a, rows, nr, tile_bytes, sc.data(), ofp, mbs, abuf, cbuf); break;
      case 3: block_product<BITS, 3>(a, rows, nr, tile_bytes, sc.data(), ofp, mbs, abuf, cbuf); break;
      default: block_product<BITS, 4>(a, rows, nr, tile_bytes, sc.data(), ofp, mbs, abuf, cbuf); break;
    }
    // C tile i is [weight row][activation row]: transposed into out's rows
    const int nv = static_cast<int>(min64(kRows, a.N - n0));
    const __mmask16 kn = nv >= 16 ? __mmask16(0xffff) : __mmask16((1u << nv) - 1);
    for (int i = 0; i < nmb; ++i) {
      const int64_t m0 = i * 16;
      const int mv = static_cast<int>(min64(16, a.M - m0));
      __m512i t[16];
      for (int r = 0; r < 16; ++r) t[r] = _mm512_load_si512(cbuf + i * 256 + r * 16);
      transpose16(t);
      for (int m = 0; m < mv; ++m) _mm512_mask_storeu_epi32(a.out + (m0 + m) * a.N + n0, kn, t[m]);
    }
  }
  _tile_release();
}

// ---- Many activation rows (binding.cpp: more than kAmxMaxM) ------------------------------------
// The path above reads every activation tile again for each 16 weight rows, from L3 once the
// activations outgrow L2 (512 x 4096 bf16: 4 MB), and lost to oneDNN's bf16 matmul from ~200 rows.
// Here the loops are blocked as a bf16 GEMM's are, with the decode folded into packing A:
//   - a block of R weight rows (thread task) is decoded one K block at a time into `acache`
//     (R x kc bf16, <= kABytes, in L2), once per K block for all activation rows;
//   - 2 x 2 register blocking: A tiles 0 and 1 (32 weight rows), B tiles 2 and 3 (32 activation
//     rows), C tiles 4-7: 4 products per 4 tile loads (the path above: 5 per 6 loads with only 1
//     of them an A tile, so its activation tiles stream from wherever they are);
//   - the activations are laid out block-row-major (amx_prepare_x, by_block): one 32-row pair's
//     tiles for a K block are 2 x kc / 16 contiguous KB, loaded from L3 once per weight block and
//     then from L2 for the block's other R / 32 - 1 A pairs;
//   - the C tiles are accumulated across K blocks in `cacc` (R x part fp32; K > 2048 at R = 128)
//     and, after the last, rounded to bf16 and written to the output, transposed, straight from
//     the tile registers (write_pair_tiles).
constexpr int64_t kABytes = 512 * 1024;  // decoded weights per K block: a quarter of a 2 MB L2

// Per-thread buffers kept between calls (slot 0: decoded A tiles, 512 KB; slot 1: C tiles, R x M
// fp32): allocated and zeroed per call, they cost page faults and a memset on every prefill call.
struct ThreadBuffer {
  char* p = nullptr;
  int64_t cap = 0;
  ~ThreadBuffer() { ::operator delete[](p, std::align_val_t(64)); }
};
char* thread_buffer(int slot, int64_t bytes) {
  thread_local ThreadBuffer bufs[2];
  ThreadBuffer& b = bufs[slot];
  if (bytes > b.cap) {
    ::operator delete[](b.p, std::align_val_t(64));
    b.p = static_cast<char*>(::operator new[](bytes, std::align_val_t(64)));
    b.cap = bytes;
  }
  return b.p;
}

// 16 weight rows (`rows`: their first layout tile, or their pair-layout tile; nr exist) over
// layout blocks [blk0, blk1) into dst [chunk][16 rows][32] bf16, the A tiles of successive
// 32-column chunks. Rows past nr are not written (the caller zeroes them).
template <int BITS>
void decode_a_tiles(const GemmArgs& a, const uint8_t* rows, int nr, int64_t tile_bytes, const float* sc,
                    const float* of, int64_t blk0, int64_t blk1, uint16_t* dst) {
  constexpr int C = kChunks<BITS>;
  constexpr int BB = 4 * C * BITS;  // 3/4 bits: a row's block
  const __m512 T = tables<BITS>(a.table);
  const int64_t ngp = a.ngp, cpg = a.cpg;
  alignas(64) __m512i tw[kRows];
  int64_t g = blk0 * C / cpg, cc = blk0 * C % cpg;
  row_tables(T, sc, of, ngp, g, nr, tw);
  for (int64_t b = blk0; b < blk1; ++b) {
    if constexpr (BITS == 2) {
      const uint8_t* cp = rows + b * kPairChunkBytes;
      _mm_prefetch(reinterpret_cast<const char*>(cp) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(cp) + kPrefetchBytes + 64, _MM_HINT_T0);
      decode_pair_chunk(cp, tw, dst + (b - blk0) * kTileElems);
      if (++cc == cpg) {
        ++g;
        cc = 0;
        row_tables(T, sc, of, ngp, g, nr, tw);
      }
      continue;
    }
    for (int t = 0; t < (nr + 3) / 4; ++t) {
      const char* pf = reinterpret_cast<const char*>(rows + t * tile_bytes + b * 4 * BB + kPrefetchBytes);
      for (int i = 0; i < 4 * BB; i += 64) _mm_prefetch(pf + i, _MM_HINT_T0);
    }
    alignas(64) uint8_t tail[kRows][BB];  // a short last block (lut_kernel.h), expanded per row
    const bool short_b = BITS != 2 && b == a.nblocks - 1 && a.last_bytes < BB;
    if constexpr (BITS != 2)
      if (short_b) expand_short_rows<BITS>(rows, tile_bytes, b, a.last_bytes, nr, tail);
    auto row_of = [&](int r) { return short_b ? tail[r] : rows + (r >> 2) * tile_bytes + b * 4 * BB + (r & 3) * BB; };
    alignas(64) __m512i parts[kRows][kBlockVecs<BITS>];
    for (int r = 0; r < nr; ++r) load_block<BITS>(row_of(r), parts[r]);
FLUTE_UNROLL(8)
    for (int c = 0; c < C; ++c) {
      uint16_t* ab = dst + ((b - blk0) * C + c) * kTileElems;
      for (int r = 0; r < nr; ++r) _mm512_storeu_si512(ab + r * 32, decode_chunk<BITS>(parts[r], c, tw[r]));
      if (++cc == cpg) {
        ++g;
        cc = 0;
        row_tables(T, sc, of, ngp, g, nr, tw);
      }
    }
  }
}

// C tiles 4..7 += (A tiles a0, a1) x (B tiles b0, b1) over kc >= 1 chunks (tiles 1 KiB apart in
// each). Software-pipelined: each tile is reloaded for the next chunk right after its last product
// of this one, so the loads run under the remaining products (microbenchmark of item 113's loop,
// 18 chunks x 8 B pairs x 4 A pairs: 86 ticks a step against 88 in each of 3 runs; in one
// process at M = 512, 2 threads, ahead of the plain order at 9 of 12 points (up to 15%), behind by
// 5-7% at 3 of 576 x 1536's; mixed at 1 thread: CPU_NOTES item 116).
inline void pair_products(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0, const uint16_t* b1,
                          int64_t kc) {
  _tile_loadd(0, a0, 64);
  _tile_loadd(2, b0, 64);
  _tile_loadd(3, b1, 64);
  _tile_loadd(1, a1, 64);
  for (int64_t k = 1; k < kc; ++k) {
    const int64_t o = k * kTileElems;
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_loadd(0, a0 + o, 64);
    _tile_dpbf16ps(6, 1, 2);
    _tile_loadd(2, b0 + o, 64);
    _tile_dpbf16ps(7, 1, 3);
    _tile_loadd(3, b1 + o, 64);
    _tile_loadd(1, a1 + o, 64);
  }
  _tile_dpbf16ps(4, 0, 2);
  _tile_dpbf16ps(5, 0, 3);
  _tile_dpbf16ps(6, 1, 2);
  _tile_dpbf16ps(7, 1, 3);
}

// Word permutes of the write-out: `pair` puts word j of each half side by side (dword j = the two
// weight rows' values of activation row j), `split` undoes it after the transpose.
struct WritePermutes {
  alignas(64) uint16_t pair[32], split[32];
  constexpr WritePermutes() : pair{}, split{} {
    for (int i = 0; i < 32; ++i) {
      pair[i] = static_cast<uint16_t>((i & 1) * 16 + i / 2);
      split[i] = static_cast<uint16_t>(i < 16 ? 2 * i : 2 * (i - 16) + 1);
    }
  }
};
constexpr WritePermutes kWritePermutes{};

// C tiles 4..7 (an A pair's 32 weight rows x a B pair's 32 activation rows, fp32, transposed)
// rounded to bf16 into out[m0 .. m0 + 31][nc .. nc + 31]. Rounding first halves the transposes:
// weight rows r and r + 16 share a dword, so one 16 x 16 dword transpose turns 32 weight rows
// into 32 output columns (two transposes of fp32 before, and 40 live vectors that spilled).
inline void write_pair_tiles(const GemmArgs& a, int64_t m0, int64_t nc) {
  alignas(64) float ct[4][256];  // tiles 4, 5, 6, 7: (A0, B0), (A0, B1), (A1, B0), (A1, B1)
  _tile_stored(4, ct[0], 64);
  _tile_stored(5, ct[1], 64);
  _tile_stored(6, ct[2], 64);
  _tile_stored(7, ct[3], 64);
  const int nv = static_cast<int>(min64(32, a.N - nc));
  const __mmask32 kn = nv >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << nv) - 1);
  const __m512i pair = _mm512_load_si512(kWritePermutes.pair), split = _mm512_load_si512(kWritePermutes.split);
  for (int b = 0; b < 2; ++b) {
    const int mv = static_cast<int>(min64(16, a.M - m0 - 16 * b));
    if (mv <= 0) break;
    const float* lo = ct[b];      // weight rows 0-15
    const float* hi = ct[2 + b];  // weight rows 16-31
    __m512i v[16];
    for (int r = 0; r < 16; ++r) {
      const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(hi + r * 16), _mm512_load_ps(lo + r * 16));
      v[r] = _mm512_permutexvar_epi16(pair, w);
    }
    transpose16(v);
    uint16_t* o = a.outb + (m0 + 16 * b) * a.N + nc;
    for (int m = 0; m < mv; ++m) _mm512_mask_storeu_epi16(o + m * a.N, kn, _mm512_permutexvar_epi16(split, v[m]));
  }
}

// Task t: weight block t % blocks of R rows times activation part t / blocks (of S, whole 32-row
// pairs). Part-major, so that a thread's consecutive tasks share their activations, which the
// same thread laid out when the split matches (576 x 1536 at 512 rows, 2 threads, 61 rounds in
// one process: 0.89-0.90x bf16 against 0.78-0.80x block-major).
template <int BITS>
void gemm_rows_bits(const GemmArgs& a, int64_t R, int64_t S, int64_t t0, int64_t t1) {
  constexpr int C = kChunks<BITS>;
  const int64_t tile_bytes = a.tile_bytes, ngp = a.ngp;  // 3/4 bits
  const int64_t mbs = (a.M + 31) / 32 * 2;  // activation blocks, even (the last pair zero-padded)
  const int64_t part = (mbs / 2 + S - 1) / S * 2;  // activation blocks per part
  const int64_t chunks = a.nblocks * C, at = R / 16, blocks = (a.N_pad + R - 1) / R;
  // K blocks: whole layout blocks, R x kc decoded bf16 within kABytes
  const int64_t kblocks = max64(1, kABytes / (R * 2) / (32 * C));
  configure_tiles();
  FloatBuf sc(R * ngp), of(a.offsets ? R * ngp : 1);
  // decoded A tiles [A tile][chunk of the K block][16][32], and, when K spans more than one K
  // block, the C tiles kept between them [A tile][activation block of the part][16 weight rows][16]
  // (both fully written before they are read)
  uint16_t* acache = reinterpret_cast<uint16_t*>(thread_buffer(0, at * kblocks * C * kTileElems * 2));
  float* cacc = a.nblocks > kblocks ? reinterpret_cast<float*>(thread_buffer(1, at * part * 256 * 4)) : nullptr;
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t n0 = task % blocks * R, mb0 = task / blocks * part, mb1 = min64(mbs, mb0 + part);
    if (mb0 >= mb1) continue;
    load_scale_rows(a, n0, R, sc.data(), a.offsets ? of.data() : nullptr);
    // A pairs with an output column (the last block's others would only multiply zeros)
    const int64_t pairs = min64(R / 32, (a.N - n0 + 31) / 32);
    for (int64_t k0 = 0; k0 < a.nblocks; k0 += kblocks) {
      const int64_t k1 = min64(a.nblocks, k0 + kblocks), kc = (k1 - k0) * C;
      const bool last = k1 == a.nblocks;
      // chunks that meet a column below K: the rest of the last layout block is padding, zero
      // activations (K = 576 at 3 bits: 18 of 24 chunks)
      const int64_t kuse = min64(kc, (a.K + 31) / 32 - k0 * C);
      for (int64_t t = 0; t < 2 * pairs; ++t) {
        uint16_t* dst = acache + t * kc * kTileElems;
        const int nr = static_cast<int>(max64(0, min64(16, a.N_pad - n0 - 16 * t)));
        if (nr < 16) std::memset(dst, 0, kc * kTileElems * sizeof(uint16_t));
        if (nr <= 0) continue;
        const uint8_t* rows = rows16<BITS>(a, n0 + 16 * t, tile_bytes);
        const float* sct = sc.data() + 16 * t * ngp;
        const float* oft = a.offsets ? of.data() + 16 * t * ngp : nullptr;
        decode_a_tiles<BITS>(a, rows, nr, tile_bytes, sct, oft, k0, k1, dst);
      }
      // each B pair (2 x kc KiB) is loaded from L3 once, then from L2 for the block's other A pairs;
      // after the last K block the C tiles go straight to the output (from L1, written whole
      // 64-byte row pieces, a B pair's 32 rows at a time)
      for (int64_t mb = mb0; mb < mb1; mb += 2) {
        const uint16_t* xb0 = a.xb + (mb * chunks + k0 * C) * kTileElems;
        const uint16_t* xb1 = xb0 + chunks * kTileElems;
        for (int64_t p = 0; p < pairs; ++p) {
          float* c00 = cacc ? cacc + ((2 * p) * part + mb - mb0) * 256 : nullptr;
          float* c10 = c00 ? c00 + part * 256 : nullptr;
          if (k0 == 0) {
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            _tile_zero(7);
          } else {
            _tile_loadd(4, c00, 64);
            _tile_loadd(5, c00 + 256, 64);
            _tile_loadd(6, c10, 64);
            _tile_loadd(7, c10 + 256, 64);
          }
          const uint16_t* a0 = acache + 2 * p * kc * kTileElems;
          pair_products(a0, a0 + kc * kTileElems, xb0, xb1, kuse);
          if (last) {
            write_pair_tiles(a, mb * 16, n0 + 32 * p);
          } else {
            _tile_stored(4, c00, 64);
            _tile_stored(5, c00 + 256, 64);
            _tile_stored(6, c10, 64);
            _tile_stored(7, c10 + 256, 64);
          }
        }
      }
    }
  }
  _tile_release();
}

}  // namespace

bool kernel_amx_built() { return true; }

void amx_prepare_x(const uint16_t* x, int64_t M, int64_t K, int64_t K_pad, uint16_t* xb, bool by_block) {
  // xb: B tiles of 16 column pairs x 16 rows x 2 bf16, each the 16x16 dword transpose of 16 rows'
  // 32 columns; [K_pad/32 chunks][ceil(M/16) blocks] in order (gemm_amx), or by_block
  // [ceil(M/32) * 2 blocks][K_pad/32 chunks] (gemm_amx_rows; the odd last block all zero). The
  // loops follow xb's order, so each of the 16 rows is read front to back (by_block, 512 x 1536
  // x 576 weight rows at 1 thread: ~22% of the product's time read chunk by chunk, ~11% row by row).
  const int64_t mbs = by_block ? (M + 31) / 32 * 2 : (M + 15) / 16, chunks = K_pad / 32;
  for (int64_t i = 0; i < mbs * chunks; ++i) {
    const int64_t mb = by_block ? i / chunks : i % mbs, kc = by_block ? i % chunks : i / mbs;
    const int64_t col = kc * 32, nv = col < K ? min64(32, K - col) : 0;
    const __mmask32 km = nv >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << nv) - 1);
    __m512i r[16];
    for (int m = 0; m < 16; ++m) {
      const int64_t row = mb * 16 + m;
      r[m] = row < M ? _mm512_maskz_loadu_epi16(km, x + row * K + col) : _mm512_setzero_si512();
    }
    transpose16(r);
    uint16_t* t = xb + i * kTileElems;
    for (int q = 0; q < 16; ++q) _mm512_storeu_si512(t + q * 32, r[q]);
  }
}

void gemm_amx(const GemmArgs& a, int64_t b0, int64_t b1) {
  switch (a.bits) {
    case 2: gemm_bits<2>(a, b0, b1); break;  // the pair layout
    case 3: gemm_bits<3>(a, b0, b1); break;
    default: gemm_bits<4>(a, b0, b1); break;
  }
}

void gemm_amx_rows(const GemmArgs& a, int64_t R, int64_t S, int64_t t0, int64_t t1) {
  switch (a.bits) {
    case 2: gemm_rows_bits<2>(a, R, S, t0, t1); break;  // the pair layout
    case 3: gemm_rows_bits<3>(a, R, S, t0, t1); break;
    default: gemm_rows_bits<4>(a, R, S, t0, t1); break;
  }
}

}  // namespace flute_cpu
#endif
