// flute CPU lookup-table kernel: the interface shared by the ISA paths and the torch binding.
//
// Plain C++ (no torch headers), so each ISA path is its own translation unit compiled with its own
// flags (kernel_avx512.cpp, kernel_avx2.cpp, kernel_int8_*.cpp, kernel_portable.cpp). Everything defined in this
// header is `static` (internal linkage): a helper compiled with -mavx512f in one TU can never be
// picked by the linker for another TU. The int8 mode's arguments and their byte order are
// int8_args.h.
//
// The CPU layout of 3 and 4 bits (see flute/cpu_layout.py; 2 bits have the pair layout of
// pair_lut.h, and only its kernels read them): rows in tiles of 4, K in blocks of KB = 32*C columns
// (C = 4 chunks for 4 bits, 8 for 2/3 bits), stream [tile][block][row][BB bytes], BB = 4*C*bits.
// A row's block is 16 uint32 lanes; slot s of lane j (bits SH*s.., SH = 4 or 2) is the code of
// column 32*(s % C) + 2*j + s / C. 3 bits: three 32-byte registers R0 | R1 | R2 in the int8 kernel's
// byte order (see Int8Args): the code of lane j = 8*reg + 4*h + i, slot s = 4*q + p is at byte
// 16*h + 4*q + i, as code_at below reads it. The SIMD exact kernels read each tile converted into
// the older form (the 2-bit block of the low two bits, then the high bits as 16 uint16 lane masks,
// uint16 s bit j), made by legacy_3bit_tile_avx2.
//
// The activations the gemm kernels read are "chunk-permuted" and vector-major: within each
// 32-column chunk, the 16 even columns form vector 2*chunk, the 16 odd ones vector 2*chunk + 1, and
// the M rows of one vector are contiguous ([K_pad/16][M][16]: no L1 set conflicts between rows).
// So slot s of a block (chunk c = s % C, parity e = s / C) of row m is multiplied by the 16 floats
// at x + ((block*C + c)*2 + e)*M*16 + m*16.
#pragma once

#include <cstdint>
#include <cstring>

#include "int8_args.h"
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace flute_cpu {

enum ScalarType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct GemmArgs {
  const uint8_t* qw;      // CPU layout
  int bits;
  int64_t K, N, K_pad, N_pad, nblocks;
  const float* x;         // chunk-permuted fp32 activations [K_pad/16][M][16], zero beyond K
  const uint16_t* xb;     // bf16 mode: bf16 activations [K_pad/32][M][32] (natural order)
  int64_t M;
  const void* scales;     // [N, ng] in stype
  const void* offsets;    // [N, ng] in stype or nullptr
  int stype;
  int64_t ng;             // groups per row
  int64_t cpg;            // 32-column chunks per group (K_pad/32 when ng == 1)
  int64_t ngp;            // scale slots per row in the kernel's buffer (>= chunks/cpg + 1)
  const float* xsum;      // [M, ng] group sums of x (when offsets)
  const float* table;     // [2**bits] fp32
  float* out;             // [M, N] fp32
  uint16_t* outb;         // [M, N] bf16 (gemm_amx_rows, instead of out)
  // 3/4 bits: one 4-row tile's bytes and a row's last block's (layout_tile_bytes,
  // last_block_bytes). The AMX kernels and the 4-bit exact ones read a short last block (expanded
  // per 16 or 4 rows); the bf16 and portable ones take whole-block copies of their tiles (binding.h:
  // for_whole_tiles), 3 bits on the SIMD exact kernels the legacy conversion's whole tiles.
  int64_t tile_bytes;
  int last_bytes;
};

struct DecodeArgs {
  const uint8_t* qw;
  int bits;
  int64_t K, N, K_pad, nblocks;
  const void* scales;
  const void* offsets;
  int stype;
  int64_t ng, G;          // G: effective group size (K when group_size == -1)
  const float* table;
  void* dst;              // [rows, ld], row n - row_begin
  int64_t ld;
  bool bf16;              // dst dtype: bf16 (round to nearest even) or fp32
};

// tiles [t0, t1) of 4 rows: out[m, n] for every m < M and every n < N in those tiles
using GemmFn = void (*)(const GemmArgs&, int64_t t0, int64_t t1);
// rows [r0, r1): W[n, 0:K] (scaled, plus offset) into dst
using DecodeFn = void (*)(const DecodeArgs&, int64_t r0, int64_t r1);
using Int8Fn = void (*)(const Int8Args&, int64_t t0, int64_t t1);

void gemm_portable(const GemmArgs&, int64_t, int64_t);
void gemm_int8_portable(const Int8Args&, int64_t, int64_t);
bool quantize_x_int8_portable(const float*, int, int8_t*, int16_t*, int16_t*, float*);
void decode_portable(const DecodeArgs&, int64_t, int64_t);
#if defined(__x86_64__) || defined(_M_X64)
void gemm_avx2(const GemmArgs&, int64_t, int64_t);
void decode_avx2(const DecodeArgs&, int64_t, int64_t);
void gemm_int8_avx2(const Int8Args&, int64_t, int64_t);
// The same int16 step EVEX encoded, on 32 ymm registers (AVX-512 VL + BW CPUs).
void gemm_int8_avx512bw_ymm(const Int8Args&, int64_t, int64_t);
// n floats to bf16 as f32_to_bf16 does (the op's bf16 output: ~8 scalar instructions an element)
void f32_to_bf16_avx2(const float* src, uint16_t* dst, int64_t n);
// n bf16 to floats (the int8 mode's bf16 activations: ~1.5 scalar instructions an element)
void bf16_to_f32_avx2(const uint16_t* src, float* dst, int64_t n);
bool quantize_x_int8_avx2(const float*, int, int8_t*, int16_t*, int16_t*, float*);
// The AVX2 int8 kernel's `vpdpwssd` form (int8_avx2_kernel.h): AVX-VNNI (VEX) and AVX512-VNNI on
// ymm registers (EVEX). Both read Int8Args::xinit in the layout int8_avx2_vnni_init writes.
void gemm_int8_avxvnni(const Int8Args&, int64_t, int64_t);
void gemm_int8_avx512vnni_ymm(const Int8Args&, int64_t, int64_t);
// 3 bits: `rowblocks` row-blocks of 96 bytes from the CPU layout into dst in the older form that the
// SIMD exact kernels read: the 2-bit block of the low two bits (64 bytes, lane order), then the
// high bits as 16 uint16 lane masks (uint16 s, bit j).
void legacy_3bit_tile_avx2(const uint8_t* src, uint8_t* dst, int64_t rowblocks);
void gemm_avx512(const GemmArgs&, int64_t, int64_t);
// The int8 mode on AVX-512 with VBMI and VNNI (kernel_int8_avx512.cpp), after
// int8_prepare_avx512 over the call's nblocks * M block-rows of activations.
void gemm_int8_avx512(const Int8Args&, int64_t, int64_t);
// `ordered`: xq already in this kernel's order (quantize_x_int8_avx512), else reordered in place.
void int8_prepare_avx512(int bits, int merge, int64_t rows, int8_t* xq, const int16_t* xk, int16_t* xk2,
                         int32_t* xinit, bool ordered = false);
// The compact form (Int8Args::xkq): xq reordered as int8_prepare_avx512 does, and xkq [rows][P]
// (int8_compact_factors).
void int8_prepare_compact_avx512(int bits, int64_t rows, int8_t* xq, const int16_t* xk, uint64_t* xkq,
                                 bool ordered = false);
// Int8Args::tail of an Int8Args whose xq (in this kernel's order), xk2 or xkq, gidx, bits, M and
// nblocks are set, into dst (64 * (3 * M + 1) bytes).
void int8_prepare_tail_avx512(const Int8Args& a, int8_t* dst);
// A QuantXFn (3 and 4 bits) that writes xq in the AVX-512 int8 kernel's order ([p][reg][32] per
// block: the bytes that quantize_x_int8_avx2 and int8_prepare_avx512's reorder give) and leaves
// corr unwritten (only the AVX2 and portable kernels read it).
bool quantize_x_int8_avx512(const float* xf, int bits, int8_t* dst, int16_t* corr, int16_t* k, float* u);
void decode_avx512(const DecodeArgs&, int64_t, int64_t);
// Tiles [t0, t1) of 16 weight rows (Rows16Args).
void gemm_int8_rows16_avx512(const Rows16Args&, int64_t t0, int64_t t1);
// One block of one activation row (src: 64 * P floats, zero past K) quantized as the int8 mode does
// into the 16-row kernel's x8 (byte j of each chunk <- column col_of[j]), xinit (-64 * each chunk's
// byte sum) and xf (each chunk's factor times the block unit times table_scale); false when the
// block is not finite.
bool rows16_quantize_avx512(int bits, const float* src, const uint8_t* col_of, float table_scale, int8_t* x8,
                            int32_t* xinit, float* xf);
// bf16 widened to fp32 in 64-byte stores, for rows16_quantize_avx512's 64-byte loads.
void bf16_to_f32_avx512(const uint16_t* src, float* dst, int64_t n);
void gemm_avx512bf16(const GemmArgs&, int64_t, int64_t);
// kernel_amx.cpp (CPUs with AMX-BF16 and AVX512_BF16): amx_prepare_x lays bf16 activations [M, K]
// out as AMX B tiles (a.xb, K_pad * ceil(M / 16) * 16 bf16, or by_block K_pad * ceil(M / 32) * 32);
// gemm_amx computes blocks [b0, b1) of 16 weight rows into a.out (groups of a multiple of 32
// columns, or one group); gemm_amx_rows, for many activation rows (xb by_block), tasks [t0, t1)
// into a.outb: task t is weight rows [t % B * R, + R) (R a multiple of 32, B = ceil(N_pad / R)
// blocks) times part t / B of the activation rows (S parts of whole 32-row pairs).
void amx_prepare_x(const uint16_t* x, int64_t M, int64_t K, int64_t K_pad, uint16_t* xb, bool by_block);
void gemm_amx(const GemmArgs&, int64_t b0, int64_t b1);
void gemm_amx_rows(const GemmArgs&, int64_t R, int64_t S, int64_t t0, int64_t t1);
// Whether each translation unit whose flags a compiler may lack was built: true in the unit
// itself, false in kernel_fallbacks.cpp, which stands in for it when setup.py's probe of its flags
// fails (-mamx-tile needs GCC 11 / Clang 12, -mavx512bf16 GCC 10 / Clang 9). The binding never
// calls a unit that says false.
bool kernel_amx_built();
bool kernel_avx512bf16_built();
bool kernel_int8_avx512_built();
bool kernel_int8_rows16_built();
bool kernel_int8_avxvnni_built();
bool kernel_int8_avx512vnni_ymm_built();
#endif

// ---- small helpers (internal linkage in every TU) ------------------------------------------------
// The ISA translation units use no std:: templates either (their instantiations are COMDAT and the
// linker could keep an AVX-512-compiled copy for everyone).
namespace {

// f(RowC<0>{}), ..., f(RowC<N - 1>{}): a loop whose index is a constant in each body before any
// optimization pass runs, so that arrays it indexes (a kernel's accumulators) become registers.
template <int I>
struct RowC {
  static constexpr int value = I;
};
#if defined(__GNUC__)
#define FLUTE_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FLUTE_ALWAYS_INLINE inline
#endif
// `#pragma GCC unroll n` on the next loop, except in the emulated AVX-512 test build
// (.ci/avx512_emulated.sh), where every intrinsic is a loop of SIMDe's portable code and GCC took
// 7-10 minutes on the unrolled int8 kernel alone (3.6 without the unrolling: CPU_NOTES item 224);
// that build tests results, which the unrolling does not change.
#define FLUTE_PRAGMA(x) _Pragma(#x)
#ifdef FLUTE_CPU_EMULATED_AVX512
#define FLUTE_UNROLL(n)
#else
#define FLUTE_UNROLL(n) FLUTE_PRAGMA(GCC unroll n)
#endif

template <int N, int I = 0, class F>
FLUTE_ALWAYS_INLINE void static_rows(F&& f) {
  if constexpr (I < N) {
    f(RowC<I>{});
    static_rows<N, I + 1>(f);
  }
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// A zero-initialized buffer (a class template in the anonymous namespace: internal linkage);
// n <= 0 allocates nothing (data() is null).
template <typename T>
struct Buf {
  T* p;
  explicit Buf(int64_t n) : p(n > 0 ? new T[n]() : nullptr) {}
  ~Buf() { delete[] p; }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T* data() { return p; }
  T& operator[](int64_t i) { return p[i]; }
};
using FloatBuf = Buf<float>;
using Int64Buf = Buf<int64_t>;
using Int32Buf = Buf<int32_t>;

static constexpr int chunks_per_block(int bits) { return bits == 4 ? 4 : 8; }
static inline int block_bytes(int bits) { return 4 * chunks_per_block(bits) * bits; }

// The short last block (3 and 4 bits; flute/cpu_layout.py): where a row's last block holds at most
// half a block of K's columns (KB / 2: 128 at 3 bits, 64 at 4), the layout stores only the bytes
// that can hold their codes. Columns 0 .. KB / 2 - 1 of a block are the slots s = P * q + p with q
// even (chunk s % C < C / 2), i.e. bytes (h, q, i) with q = 0 or 2 of each index register: 3 bits,
// dwords 0, 2, 4, 6 of each 32-byte register R0 | R1 | R2 (16 bytes each, R2's left out as well
// when the tail is at most 64 columns: it then holds codes of padding only); 4 bits, bytes 0 and 2
// of each 4-byte lane. Compact dword (3 bits) or byte (4 bits) m goes back to position 2 m of its
// register: one vpmovzxdq / vpmovzxbw in the int8 kernels. 1536x576 at 3 bits: 240 bytes a row
// instead of 288 (K_pad = 768), at 4 bits 288 instead of 320.
// A short last block's bytes a row: 32 (the even bytes of R0 | R1), 48 at 3 bits when the tail
// needs R2 too (65-128 columns: `within_64` false; the int8 kernels' HALF is exactly within_64 there).
constexpr int short_block_bytes(int bits, bool within_64) { return bits == 3 && !within_64 ? 48 : 32; }
static inline int last_block_bytes(int bits, int64_t K) {
  const int64_t kb = 32 * chunks_per_block(bits), tail = K - (K - 1) / kb * kb;  // 1 .. kb columns
  return tail <= kb / 2 ? short_block_bytes(bits, tail <= 64) : block_bytes(bits);
}
// Bytes of one 4-row tile of the 3/4-bit layout: nblocks - 1 whole blocks and the last one.
static inline int64_t layout_tile_bytes(int bits, int64_t K, int64_t nblocks) {
  return 4 * ((nblocks - 1) * block_bytes(bits) + last_block_bytes(bits, K));
}
// The int8 kernels' packed last block (a short block of at most 64 columns of K: 3 bits with
// Int8Args::last_half, 4 bits every short one; Int8Args::tail): packed byte z (0-63) holds the code
// whose activation is byte 64 p + 32 reg + byte of parts 0 | 1 in the AVX-512 order [p][reg][32].
// 3 bits (both kernels): 16-byte lanes of part lane % 2, register lane / 2, from the layout's even
// dwords of R0 | R1. 4 bits, from the row's 32 stored bytes (byte sb = byte 2 (sb % 2) of lane
// sb / 2): AVX-512 low nibbles of bytes 0-31 | high nibbles, i.e. columns 0-63 in order; AVX2 low
// nibbles of bytes 0-15 | high of 0-15 | low of 16-31 | high of 16-31 (columns 0-15 | 32-47 |
// 16-31 | 48-63: each 128-bit lane meets one chunk).
// Whether a last block of these kinds is read packed (the kernels' blocks and the binding's tail
// preparation ask the same question here).
constexpr bool packed_tail(int bits, bool last_short, bool last_half) {
  return last_short && (bits == 4 || (bits == 3 && last_half));
}
constexpr int packed_tail_byte(int bits, bool avx2, int z) {
  if (bits == 3) {
    const int lane = z / 16, kk = z % 16;
    return (lane % 2) * 64 + (lane / 2) * 32 + 8 * (kk / 4) + kk % 4;
  }
  const int quarter = z / 16, nib = avx2 ? quarter % 2 : z / 32;
  const int sb = avx2 ? (quarter / 2) * 16 + z % 16 : z % 32, j = sb / 2, q = 2 * (sb % 2);
  return nib * 64 + 16 * (j / 4) + 4 * q + j % 4;
}
// A last block row of lb bytes (last_block_bytes) as the whole block's bytes, zeros elsewhere.
static inline void expand_last_block(int bits, int lb, const uint8_t* src, uint8_t* dst) {
  const int BB = block_bytes(bits);
  if (lb == BB) {
    std::memcpy(dst, src, BB);
    return;
  }
#if defined(__SSE2__)
  // 16 bytes in, 32 out: bytes (4 bits) or dwords (3 bits) interleaved with zeros (SSE2, on every
  // x86-64; the scalar loop below was ~40% of the exact mode's 4-bit 1536x576 call in perf)
  const __m128i z = _mm_setzero_si128();
  for (int k = 0; 32 * k < BB; ++k) {
    __m128i lo = z, hi = z;
    if (16 * k < lb) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * k));
      lo = bits == 4 ? _mm_unpacklo_epi8(v, z) : _mm_unpacklo_epi32(v, z);
      hi = bits == 4 ? _mm_unpackhi_epi8(v, z) : _mm_unpackhi_epi32(v, z);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 * k), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 * k + 16), hi);
  }
  return;
#endif
  // 8 bytes out at a time, each from 4 bytes (4 bits: spread to every other byte; 3 bits: a
  // zero-extended dword), all BB bytes written (little-endian)
  for (int m = 0; 8 * m < BB; ++m) {
    uint32_t v = 0;
    if (4 * m < lb) std::memcpy(&v, src + 4 * m, 4);
    uint64_t x = v;
    if (bits == 4) {
      x = (x | x << 16) & 0x0000FFFF0000FFFFull;
      x = (x | x << 8) & 0x00FF00FF00FF00FFull;
    }
    std::memcpy(dst + 8 * m, &x, 8);
  }
}
// The 4 rows' short last block (lb bytes each) of a tile as whole block rows into dst [4][BB].
static inline void expand_last_rows(int bits, const uint8_t* tile, int64_t nblocks, int lb, uint8_t* dst) {
  const int BB = block_bytes(bits);
  for (int r = 0; r < 4; ++r) expand_last_block(bits, lb, tile + (nblocks - 1) * 4 * BB + r * lb, dst + r * BB);
}
// Tiles [t0, t1) of a 3/4-bit layout (tiles of tile_bytes, layout_tile_bytes) into dst with whole
// last blocks (4 * nblocks * block_bytes each), the form every reader but the int8 kernels takes.
static inline void expand_tiles(const uint8_t* qw, int bits, int64_t K, int64_t nblocks, int64_t t0, int64_t t1,
                                uint8_t* dst) {
  const int BB = block_bytes(bits), lb = last_block_bytes(bits, K);
  const int64_t src_tile = layout_tile_bytes(bits, K, nblocks), body = 4 * (nblocks - 1) * BB;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* s = qw + t * src_tile;
    uint8_t* d = dst + (t - t0) * 4 * nblocks * BB;
    std::memcpy(d, s, body);
    expand_last_rows(bits, s, nblocks, lb, d + body);
  }
}

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | ((man & 0x3ffu) << 13);
    }
  } else {
    u = sign | (exp + 127 - 15) << 23 | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Row n of a [N, ng] scales/offsets tensor as fp32 into dst[0:ng].
static inline void load_row_f32(const void* src, int stype, int64_t n, int64_t ng, float* dst) {
  if (stype == kF32) {
    std::memcpy(dst, static_cast<const float*>(src) + n * ng, ng * sizeof(float));
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src) + n * ng;
    if (stype == kBF16) {
      for (int64_t g = 0; g < ng; ++g) dst[g] = bf16_to_f32(s[g]);
    } else {
      for (int64_t g = 0; g < ng; ++g) dst[g] = f16_to_f32(s[g]);
    }
  }
}

// Row n's first row-block in the CPU layout (rows interleaved block by block in tiles of 4; the
// next block of the row is 4 * block_bytes(bits) further).
static inline const uint8_t* row_codes(const uint8_t* qw, int64_t nblocks, int bits, int64_t n) {
  return qw + ((n / 4) * nblocks * 4 + n % 4) * block_bytes(bits);
}

// Code of (row-block pointer, lane j, slot s).
static inline int code_at(const uint8_t* rb, int bits, int j, int s) {
  if (bits == 3) {  // part p = s % 4 of half reg = j / 8 at byte (h, q, i) of R0 | R1 | R2 (kernel_int8_avx2.cpp)
    const int b = 16 * ((j >> 2) & 1) + 4 * (s >> 2) + (j & 3), reg = j >> 3;
    const int r0 = rb[b], r1 = rb[32 + b], r2 = rb[64 + b];
    switch (s & 3) {
      case 0: return (r0 >> (4 * reg)) & 7;
      case 1: return (r1 >> (1 + 4 * reg)) & 7;
      case 2: return ((r2 >> (4 * reg)) & 3) | ((r0 >> (3 + 4 * reg)) & 1) << 2;
      default: return ((r2 >> (2 + 4 * reg)) & 3) | ((r1 >> (4 * reg)) & 1) << 2;
    }
  }
  uint32_t lane;
  std::memcpy(&lane, rb + 4 * j, 4);
  if (bits == 4) return (lane >> (4 * s)) & 15;
  return (lane >> (2 * s)) & 3;
}

}  // namespace
}  // namespace flute_cpu
