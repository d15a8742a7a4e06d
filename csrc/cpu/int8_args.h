// flute CPU kernels, the int8 mode's interface (included by lut_kernel.h): its arithmetic, the byte
// order of its activations, the arguments of its 4-row kernels (Int8Args) and of its 16-row kernel
// (Rows16Args), and the helpers every path shares so that all of them round alike. Plain C++, no
// torch headers; `static` helpers only (see lut_kernel.h).
#pragma once

#include <cstdint>

namespace flute_cpu {

// The int8 mode (the default below 32 rows; FLUTE_CPU_MODE / flute.set_cpu_mode; groups of a
// multiple of 32 columns or one group). llama.cpp's approach: activations quantized to int8 per
// 32-column chunk, the table to 7-bit integers t7 in [-63, 63] (scale max|t| / 63), stored as
// u = t7 + 64 in [1, 127] so that one `vpmaddubsw` (u8 x s8, pairs summed into int16) never
// saturates: 2 * 127 * 127 < 32767. sum(x8 * t7) = sum(x8 * u) - 64 * sum(x8), the second term
// precomputed per chunk from the activations alone.
//
// Activation scales: one float unit per block and row, u = (bmax / 127) / kInt8KMax (bmax = max|x|
// over the block's 64 * P columns), and per 32-column chunk an integer
// k = min(kInt8KMax, ceil(cmax / (bmax / kInt8KMax))) (cmax = the chunk's max|x|). The chunk's scale
// is k * u: at most 1 + bmax / (kInt8KMax * cmax) times llama.cpp's per-chunk max|x| / 127, 1.012
// for a chunk 100x below its block's max (LLM activations have such outliers: with k <= 1023,
// 3-bit GPTQ-LUT lost +0.85% perplexity against +0.48%). x8 = round-to-nearest-even(x / (k * u))
// clamped to [-127, 127]. The integer k multiplies in the `vpmaddwd` (instead of ones), so the int32
// sums of all the chunks of a block are in one unit, and the parts whose dwords lie in the same
// weight groups (Q of them: 2 or 4 for groups of 64 or 128 columns) are added as int32 before one
// float conversion and FMA, with (weight scale * table scale * u) for the dword's group. int32
// bounds: a part's dword is at most 2 * 32004 * 8191 = 524.3M, Q = 4 of them 2.097G < 2^31
// (kInt8KMax is the largest 2^n - 1 that fits).
//
// The correction is subtracted in int16, before the one `vpmaddwd` per part: the two registers'
// `vpmaddubsw` results are added with wrap-around and the precomputed int16 correction of those
// 4 bytes subtracted; the true value, sum of 4 products t7 * x8, is within 4 * 63 * 127 = 32004, so
// the wrapped arithmetic gives it exactly (and the correction, 64 * 4 * 127 = 32512, fits int16).
//
// Byte order: a row's block (16 uint32 lanes, 64 bytes) is read as two 32-byte registers reg = 0, 1
// (lanes 8*reg ..); in each 128-bit half h a byte shuffle makes dword q the q-th bytes of lanes
// 4h .. 4h+3, so byte (h, q, i) is byte q of lane j = 8*reg + 4*h + i. Part p (a nibble for 4 bits,
// a 2-bit field for 2 and 3 bits; P = 2 or 4 parts per byte) of that byte is slot s = P*q + p: the code
// of column 32*(s % C) + 2*j + s / C of the block. So dword (h, q) of part p only ever meets
// chunk (P*q + p) % C, and the activation bytes are stored in exactly this order:
// xq[block][m][reg][p][h][q][i] (32 * 2 * P = block-column bytes per block and row). 3 bits: the
// layout stores the codes of part p, register reg already in this byte order (no byte shuffle),
// in three registers: R0 holds parts (0, 0) and (0, 1) at bits 0-2 and 4-6, R1 parts (1, 0) and
// (1, 1) at bits 1-3 and 5-7, R2 the low two bits of (2, 0), (3, 0), (2, 1), (3, 1) at bits 0-1,
// 2-3, 4-5, 6-7, whose high bits are R0's bits 3 and 7 and R1's bits 0 and 4 (flute/cpu_layout.py).
struct Int8Args {
  const uint8_t* qw;      // CPU layout
  int bits;               // 2, 3 or 4
  int64_t N, nblocks, M;
  const int8_t* xq;       // [nblocks][M][cols per block] activations in the byte order above
  const int16_t* xcorr;   // [nblocks][M][P][16]: 64 * sum of the 4 xq bytes of int16 (h, w) of part p
                          // (bytes 2w, 2w + 1 of half h of both registers)
  const int16_t* xk;      // [nblocks][M][P][16]: k of the chunk of int16 (h, w) of part p
  const float* xu;        // [nblocks][M]: the block's activation unit u times the table scale
                          // (one product per block and row, none per tile and weight row)
  int merge;              // Q: parts added as int32 (1, 2, or 4 for 2 and 3 bits; see above)
  const void* scales;     // [N, ng] in stype
  const void* offsets;    // [N, ng] in stype or nullptr
  int stype;
  int64_t ng, G;          // groups per row and group size in columns (a multiple of 32, or K)
  const float* xsum;      // [M, ng] exact group sums of x (when offsets)
  // The scale map, built once per call: the first group of each block and each dword's group
  // relative to it (a block spans at most 8 groups: groups are >= 32 columns).
  const int64_t* g0;      // [nblocks]
  const int32_t* gidx;    // [nblocks][P][8]
  uint8_t tu[16];         // u = t7 + 64 per code (2 bits: entries 0..3)
  float* out;             // [M, N] fp32
  // The AVX-512 VNNI kernel only (int8_prepare_avx512 fills them and reorders xq into
  // [nblocks][M][P][reg][32]): the chunk factor of each int16 of a part's 64-byte register
  // [nblocks][M][P][32], and each merge's int32 start value, minus 64 * the sum over its parts of
  // k * (the 4 activation bytes of the dword), [nblocks][M][P / Q][16].
  const int16_t* xk2 = nullptr;
  const int32_t* xinit = nullptr;
  // Or, for one activation row with long rows (cpu_compact_k()), the compact form
  // (int8_prepare_compact_avx512, int8_compact_factors): per block and part one qword, the chunk
  // factors of its dwords 0 and 1 as two int16 pairs (dwords 2 and 3 repeat them), broadcast in the
  // kernel, which computes each merge's start value from xq per block. A row pass then meets 1.2
  // bytes of activation data per column instead of 2.5, so that with the weight stream they fit L1
  // (CPU_NOTES item 144). The AVX2 kernel keeps its form: compact there (the corrections computed
  // per block) measured 0.99-1.04x the time on the Zen 5 VM, where it is compute-bound.
  const uint64_t* xkq = nullptr;
  // The last block holds at most 32 * P / 2 columns of K (the rest is padding: 1536x576 at 2 and 3
  // bits is 2.25 blocks of 256 per row). Part p meets chunks p and P + p only (int8_col), so parts
  // P / 2 .. P - 1 of that block meet padding alone: x8 = 0 there and their int32 sums, start
  // values included, are exactly 0. The AVX-512 and AVX2 kernels skip them; the portable one
  // computes them.
  bool last_half = false;
  // The last block is stored short (last_block_bytes < block_bytes: at most KB / 2 columns of K;
  // set wherever last_half is): its rows are last_block_bytes apart, read by zero-extending loads
  // (by the AVX-512 kernel, where it holds at most 64 columns of K, as a packed block: tail).
  bool last_short = false;
  // The packed last block (packed_tail_byte; 3 bits with last_half, 4 bits with last_short) of the
  // AVX-512 and AVX2 kernels, written once per call: per activation row 192 bytes, then 64 bytes of
  // group entries of its dwords. AVX-512 (int8_prepare_tail_avx512): the 64 activations, their 32
  // int16 chunk factors and 16 int32 start values, in the packed order; AVX2 (int8_prepare_tail_avx2):
  // the activations X0 | X1, 16 int16 factors, 16 int16 corrections and 8 int32 start values.
  const int8_t* tail = nullptr;
  int64_t tile_bytes = 0;  // layout_tile_bytes: one 4-row tile of the stream
  // M = 1 without offsets: each thread's range read as tile pairs t, t + H (kernels with pair(),
  // int8_tiles.h); the binding's choice (cpu_tile_pairs).
  bool tile_pairs = false;
};

// The int8 mode's 16-row kernel (3 and 4 bits, AVX-512 VBMI + VNNI, kernel_int8_rows16_avx512.cpp), for
// calls of several activation rows: the same integers as Int8Args (x8, k, u, t7; the spec is
// flute.testing.reference_qgemm_int8), with weight rows instead of columns along the vector. Per
// 32-column chunk c of activation row m, the exact int32 sum S = sum(u * x8) + xinit (xinit =
// -64 * sum(x8): S is then sum(t7 * x8), |S| <= 32 * 63 * 127, exact in float32), and
// y += float(S) * (scale of the chunk's group * xf), xf = k * u * table scale; offsets as Int8Args.
struct Rows16Args {
  const uint8_t* qw;      // the 3- or 4-bit CPU layout (tiles of 4 rows, blocks of C = 8 or 4 chunks)
  int bits;
  int64_t N, N_pad, nblocks, M;
  int64_t chunks;         // chunks holding columns of K (ceil(K / 32)); rows of x8 hold nblocks * C
  const int8_t* x8;       // [M] rows of x8_stride bytes: nblocks * C chunks, each chunk's 32 bytes in the
                          // kernel's order (4 bits: column order), 0 beyond K
  int64_t x8_stride;      // bytes from one row of x8 to the next (a row's bytes + 64: rows16_buffers)
  const int32_t* xinit;   // [M][nblocks * C]
  const float* xf;        // [M][nblocks * C]
  const int32_t* cg;      // [chunks] group of each chunk
  const void* scales;     // [N, ng] in stype
  const void* offsets;    // [N, ng] in stype or nullptr
  int stype;
  int64_t ng;
  const float* xsum;      // [M, ng] exact group sums of x (when offsets)
  uint8_t tu[16];         // u = t7 + 64 per code
  float* out;             // [M, N] fp32
  uint16_t* out_bf16 = nullptr;  // [M, N] bf16 or nullptr: the results rounded there (as f32_to_bf16)
                                 // instead of written to out; out then holds only a K block's sums
  // 3/4 bits: one 4-row tile's bytes and a row's last block's (a short last block is expanded per
  // 16 rows, expand_last_block)
  int64_t tile_bytes = 0;
  int last_bytes = 0;
};

// Column within its block of byte (reg, h, q, i), part p (see Int8Args).
static constexpr int int8_parts(int bits) { return bits == 4 ? 2 : 4; }

static inline int int8_col(int bits, int reg, int p, int h, int q, int i) {
  const int P = int8_parts(bits), C = bits == 4 ? 4 : 8;
  const int j = 8 * reg + 4 * h + i, s = P * q + p;
  return 32 * (s % C) + 2 * j + s / C;
}

// One block of activations (64 * P floats, zero beyond K) in the int8 mode's form: dst [64 * P]
// bytes in the byte order above, corr [P * 16], k [P * 16] and the unit *u (see Int8Args; float32
// arithmetic in the order written there). False, with nothing usable written, when a value is not
// finite.
using QuantXFn = bool (*)(const float* xf, int bits, int8_t* dst, int16_t* corr, int16_t* k, float* u);
// The activation unit and chunk factors of a block from the chunks' max|x| (C of them), shared by
// every path so that all round the same: returns u, k[c] per chunk.
constexpr int kInt8KMax = 8191;
static inline float int8_block_scales(const float* cmax, int C, int16_t* k) {
  float bmax = 0.f;
  for (int c = 0; c < C; ++c) bmax = cmax[c] > bmax ? cmax[c] : bmax;
  const float D = bmax / static_cast<float>(kInt8KMax);
  for (int c = 0; c < C; ++c) {
    const float r = D > 0.f ? cmax[c] / D : 0.f;
    int kc = static_cast<int>(r);
    kc += static_cast<float>(kc) < r;  // ceil
    k[c] = static_cast<int16_t>(kc > kInt8KMax ? kInt8KMax : kc);
  }
  return bmax / 127.f / static_cast<float>(kInt8KMax);
}
// The compact chunk factors (Int8Args::xkq) of `rows` block rows from xk: part p's int16 (h, w) has
// the factor of chunk (P * (w / 2) + p) % C, chunk p for dwords 0 and 2 of each 128-bit lane and
// p + C / 2 for dwords 1 and 3 (C = 2 P), both int16 of a dword alike: xk's int16 0 and 2 of the
// part hold the two, and the qword is dwords 0 and 1.
static inline void int8_compact_factors(int P, int64_t rows, const int16_t* xk, uint64_t* xkq) {
  for (int64_t br = 0; br < rows; ++br)
    for (int p = 0; p < P; ++p) {
      const uint64_t k0 = static_cast<uint16_t>(xk[(br * P + p) * 16]);
      const uint64_t k1 = static_cast<uint16_t>(xk[(br * P + p) * 16 + 2]);
      xkq[br * P + p] = (k0 | k0 << 16) | (k1 | k1 << 16) << 32;
    }
}
// Byte position in the int8 order of each column of a block ([64 * P], int8_col inverted).
const int16_t* int8_positions(int bits);

}  // namespace flute_cpu
