// The int8 mode of the CPU op's fused path, torch side: the activations quantized per call (rows in
// parallel) and the calls of the int8 kernels: the 4-row kernels (kernel_int8_avx2.cpp,
// kernel_int8_avx512.cpp, kernel_portable.cpp) and, for several activation
// rows on AVX-512 VBMI + VNNI, the 16-row kernel (kernel_int8_rows16_avx512.cpp). Declared in
// binding.h; split from fused_gemm.cpp, which keeps the exact, bf16, pair-table and AMX calls
// (int8_table.cpp holds the 7-bit table).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <climits>
#include <cstring>
#include <type_traits>

#include "binding.h"

namespace flute_cpu::binding {
namespace {

// The int8 mode's activations, rows [m0, m1): each block of each row widened to fp32 (zero past K)
// and handed to block(src, m, b), which quantizes it (QuantXFn for the 4-row kernels, see Int8Args;
// rows16_quantize_avx512 for the 16-row kernel); exact group sums when there are offsets.
// False (nothing usable) when x holds a NaN or an Inf: the caller then takes the exact path, which
// propagates them as the float math would.
template <typename T, typename Block>
bool int8_x(const T* x, int64_t m0, int64_t m1, const Weight& w, Bf16ToF32Fn widen, float* xsum, StreamWarm* warm,
            const Block& block) {
  const int bits = w.bits, P = int8_parts(bits), cols = 64 * P;
  const int64_t K = w.K, nb = w.nblocks;
  alignas(32) float xf[256];
  for (int64_t m = m0; m < m1; ++m) {
    const T* xr = x + m * K;
    for (int64_t b = 0; b < nb; ++b) {
      const float* src = xf;
      const int64_t n = std::min<int64_t>(cols, K - b * cols);  // the block's columns inside K
      if (std::is_same_v<T, float> && n == cols) {
        src = reinterpret_cast<const float*>(xr + b * cols);  // a whole block of fp32: no copy
      } else if (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) {
        // a bf16 block, or the zero-padded last block of either (at K = 576 a 3-bit row's third
        // block: 64 of 256 columns), by the vector routine rather than a loop over every column
        if constexpr (std::is_same_v<T, float>) std::memcpy(xf, xr + b * cols, n * sizeof(float));
        else widen(reinterpret_cast<const uint16_t*>(xr + b * cols), xf, n);
        std::fill(xf + n, xf + cols, 0.f);
      } else {
        for (int c = 0; c < cols; ++c) {
          const int64_t k = b * cols + c;
          xf[c] = k < K ? static_cast<float>(xr[k]) : 0.f;
        }
      }
      if (warm) warm->step((warm->lines + nb - 1) / nb);
      if (!block(src, m, b)) return false;
    }
    if (xsum) {
      for (int64_t g = 0; g < w.ng; ++g) {
        float s = 0.f;
        for (int64_t k = g * w.G; k < std::min(K, (g + 1) * w.G); ++k) s += static_cast<float>(xr[k]);
        xsum[m * w.ng + g] = s;
      }
    }
  }
  return true;
}

// int8_x over x2's dtype.
template <typename Block>
bool int8_x_any(const at::Tensor& x2, int64_t m0, int64_t m1, const Weight& w, Bf16ToF32Fn widen, float* xsum,
                StreamWarm* warm, const Block& block) {
  switch (x2.scalar_type()) {
    case at::kBFloat16: return int8_x(x2.data_ptr<c10::BFloat16>(), m0, m1, w, widen, xsum, warm, block);
    case at::kHalf: return int8_x(x2.data_ptr<c10::Half>(), m0, m1, w, widen, xsum, warm, block);
    default: return int8_x(x2.data_ptr<float>(), m0, m1, w, widen, xsum, warm, block);
  }
}

// AVX-512 VBMI and VNNI: the int8 mode's AVX-512 kernel (kernel_int8_avx512.cpp); other AVX-512
// CPUs run the AVX2 int8 kernel.
bool has_vbmi_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool v = [] {
    __builtin_cpu_init();
    return FLUTE_CPU_SUPPORTS("avx512vbmi") && FLUTE_CPU_SUPPORTS("avx512vnni") &&
           kernel_int8_avx512_built();
  }();
  return v;
#else
  return false;
#endif
}

}  // namespace

// Columns [n0, n1) of every row of out [M, N] into h.dst, by the thread that just wrote them: a
// batch's conversion after the kernel ran on one thread while the others waited.
static void rows_to_half(const float* out, const HalfOut& h, int64_t M, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) to_half(out, h, m * N + n0, m * N + n1);
}

bool rows16_available(int bits, int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool built = kernel_int8_rows16_built();
  return isa == kAvx512 && built && has_vbmi_vnni();
#else
  (void)bits, (void)isa;
  return false;
#endif
}

#if defined(__x86_64__) || defined(_M_X64)
// The int8 mode's 16-row kernel (Rows16Args): the activations of int8_x quantized by
// rows16_quantize_avx512 in its byte order, with each chunk's correction and float factor.
// Column (within its 32-column chunk) of activation byte j of the chunk in the 16-row kernel's order:
// dword k = j / 4 meets the columns of weight vector k (kernel_int8_rows16_avx512.cpp's decoders).
static int rows16_col(int bits, int j) {
  if (bits == 4) return j;
  if (bits == 2) return 8 * (j / 8) + 2 * (j / 4 % 2) + (j & 1) + 4 * (j / 2 % 2);  // k = 2s + L, i
  const int k = j / 4, i = j % 4, e = k / 4, reg = (k / 2) % 2, h = k % 2;
  return 16 * reg + 8 * h + e + 2 * i;
}

// The 16-row kernel's activation buffers for M rows (scratch slot 2), filled per row range by
// quantize_rows16.
struct Rows16Buffers {
  int8_t* x8;
  int64_t x8_stride;
  int32_t* xinit;
  float* xf;
  int32_t* cg;
  alignas(32) uint8_t col_of[32];  // byte j of a chunk in the kernel's order <- column col_of[j]
  at::Tensor hold;
};

static void rows16_buffers(const Weight& w, int64_t M, Rows16Buffers& r) {
  const int P = int8_parts(w.bits), C = chunks_per_block(w.bits), bc = 64 * P;
  const int64_t cols = w.nblocks * bc, cpr = w.nblocks * C;
  // One line more than a row's bytes, so that the 16 rows a pass reads at one chunk lie in 16
  // different L1 sets: at K = 4096 the rows were 4 KB apart, all in one set of the 12-way L1, and
  // the 16-row kernel ran 3-15% slower at 8-64 rows on a Zen 5 (CPU_NOTES item 271).
  r.x8_stride = cols + 64;
  const int64_t o_init = align64(M * r.x8_stride), o_f = align64(o_init + M * cpr * 4), o_cg = align64(o_f + M * cpr * 4),
                total = o_cg + cpr * 4;
  char* base = call_scratch(2, total, r.hold);
  r.x8 = reinterpret_cast<int8_t*>(base);
  r.xinit = reinterpret_cast<int32_t*>(base + o_init);
  r.xf = reinterpret_cast<float*>(base + o_f);
  r.cg = reinterpret_cast<int32_t*>(base + o_cg);
  for (int j = 0; j < 32; ++j) r.col_of[j] = static_cast<uint8_t>(rows16_col(w.bits, j));
}

// Activation rows [m0, m1) of x2 into r's buffers (and the group sums xs when there are offsets);
// false when x is not finite.
static bool quantize_rows16(const at::Tensor& x2, const Weight& w, int64_t m0, int64_t m1, Bf16ToF32Fn widen,
                            const Table7& t7, const Rows16Buffers& r, float* xs) {
  const int P = int8_parts(w.bits), C = chunks_per_block(w.bits);
  const int64_t cpr = w.nblocks * C;
  return int8_x_any(x2, m0, m1, w, widen, xs, nullptr, [&](const float* src, int64_t m, int64_t b) {
    return rows16_quantize_avx512(w.bits, src, r.col_of, t7.scale, r.x8 + m * r.x8_stride + b * 64 * P,
                                  r.xinit + m * cpr + b * C, r.xf + m * cpr + b * C);
  });
}

static void rows16_gemm(const Weight& w, int64_t M, const Rows16Buffers& r, const float* xs, const Table7& t7,
                        float* out, const HalfOut* half) {
  const int64_t nb = w.nblocks, chunks = (w.K + 31) / 32;
  int32_t* cg = r.cg;
  for (int64_t c = 0; c < chunks; ++c) cg[c] = static_cast<int32_t>(std::min<int64_t>(c * 32 / w.G, w.ng - 1));
  Rows16Args a{};
  a.qw = w.qweight->data_ptr<uint8_t>();
  a.bits = w.bits;
  a.N = w.N;
  a.N_pad = w.N_pad;
  a.nblocks = nb;
  a.M = M;
  a.chunks = chunks;
  a.x8 = r.x8;
  a.x8_stride = r.x8_stride;
  a.xinit = r.xinit;
  a.xf = r.xf;
  a.cg = cg;
  a.scales = w.scales->data_ptr();
  a.offsets = w.offsets->defined() ? w.offsets->data_ptr() : nullptr;
  a.stype = w.stype;
  a.ng = w.ng;
  a.xsum = xs;
  std::memcpy(a.tu, t7.tu, 16);
  a.out = out;
  const bool bf16_out = half && half->bf16;
  if (bf16_out) a.out_bf16 = static_cast<uint16_t*>(half->dst);
  a.tile_bytes = w.tile_bytes;
  a.last_bytes = w.last_bytes;
  const int64_t tiles = (w.N + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, task_weights() / 16 / std::max<int64_t>(w.K_pad, 1));
  for_tiles(tiles, grain, [&](int64_t t0, int64_t t1) {
    gemm_int8_rows16_avx512(a, t0, t1);
    if (half && !bf16_out) rows_to_half(out, *half, M, w.N, 16 * t0, std::min(w.N, 16 * t1));
  });
}
#endif

// The int8 kernels' per-call functions for one ISA path.
struct Int8Fns {
  QuantXFn quant = quantize_x_int8_portable;
  Int8Fn fn = gemm_int8_portable;
  Bf16ToF32Fn widen = bf16_to_f32_portable;
  bool avx512 = false;  // the AVX-512 VBMI + VNNI kernel (its own activation order)
  bool vnni = false;    // a VNNI form of the AVX2 kernel (Int8Args::xinit from int8_vnni_init)
  bool ordered = false;  // quant writes that order itself (quantize_x_int8_avx512; one-row calls)
};

static Int8Fns int8_fns(int isa) {
  Int8Fns f;
  f.widen = bf16_to_f32_fn(isa);
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= kAvx2) {
    f.quant = quantize_x_int8_avx2;
    f.fn = gemm_int8_avx2;
    const int form = vnni_form();
    f.vnni = form == 1 || form == 2;
    if (form == 1) f.fn = gemm_int8_avxvnni;
    if (form == 2) f.fn = gemm_int8_avx512vnni_ymm;
    if (form == 3) f.fn = gemm_int8_avx512bw_ymm;
  }
  f.avx512 = isa == kAvx512 && has_vbmi_vnni();
  if (f.avx512) {
    f.fn = gemm_int8_avx512;
    f.vnni = false;
  }
#else
  (void)isa;
#endif
  return f;
}

// Where the 4-row kernels' per-call data lies in one scratch buffer (small calls are dominated by
// fixed costs, so one buffer): activations, their corrections and scales, group sums, the scale map
// and the AVX-512 kernel's reordered activations.
struct Int8Scratch {
  int64_t o_corr, o_k, o_u, o_sum, o_g0, o_gidx, o_k2, o_init, o_kq, o_tail, total;
  Int8Scratch(int64_t nb, int64_t M, int P, int64_t ng) {
    o_corr = align64(nb * M * 64 * P);
    o_k = align64(o_corr + nb * M * P * 16 * 2);
    o_u = align64(o_k + nb * M * P * 16 * 2);
    o_sum = align64(o_u + nb * M * 4);
    o_g0 = align64(o_sum + M * ng * 4);
    o_gidx = align64(o_g0 + nb * 8);
    o_k2 = align64(o_gidx + nb * P * 8 * 4);
    o_init = align64(o_k2 + nb * M * P * 32 * 2);
    o_kq = align64(o_init + nb * M * P * 16 * 4);
    o_tail = align64(o_kq + nb * M * P * 8);
    total = o_tail + 64 * (3 * M + 1);
  }
};

// Activation rows [m0, m1) of x2 quantized into base's buffers (int8_x), their units times the
// table scale; false when x is not finite.
static bool quantize_rows(const at::Tensor& x2, const Weight& w, int64_t M, int64_t m0, int64_t m1, const Int8Fns& f,
                          const Table7& t7, char* base, const Int8Scratch& L, StreamWarm* warm = nullptr) {
  int8_t* xq = reinterpret_cast<int8_t*>(base);
  int16_t* xcorr = reinterpret_cast<int16_t*>(base + L.o_corr);
  int16_t* xk = reinterpret_cast<int16_t*>(base + L.o_k);
  float* xu = reinterpret_cast<float*>(base + L.o_u);
  float* xs = w.offsets->defined() ? reinterpret_cast<float*>(base + L.o_sum) : nullptr;
  const int P = int8_parts(w.bits), cols = 64 * P;
  const bool ok = int8_x_any(x2, m0, m1, w, f.widen, xs, warm, [&](const float* src, int64_t m, int64_t b) {
    const int64_t bm = b * M + m;
    return f.quant(src, w.bits, xq + bm * cols, xcorr + bm * P * 16, xk + bm * P * 16, xu + bm);
  });
  if (!ok) return false;
  for (int64_t b = 0; b < w.nblocks; ++b)
    for (int64_t m = m0; m < m1; ++m) xu[b * M + m] *= t7.scale;
  return true;
}

// The VNNI forms' start values (int8_avx2_kernel.h): per block-row bm and merge j of Q parts,
// xinit[bm][j][d] = -(sum over the merge's parts p of corr * k over int16s 2d and 2d + 1 of part
// p), the int32 that the int16 form's subtraction of the correction before its `vpmaddwd` adds.
static void int8_vnni_init(int P, int Q, int64_t rows, const int16_t* corr, const int16_t* k, int32_t* xinit) {
  for (int64_t bm = 0; bm < rows; ++bm)
    for (int j = 0; j < P / Q; ++j)
      for (int d = 0; d < 8; ++d) {
        int32_t v = 0;
        for (int p = j * Q; p < (j + 1) * Q; ++p) {
          const int64_t i = (bm * P + p) * 16 + 2 * d;
          v -= int32_t{corr[i]} * k[i] + int32_t{corr[i + 1]} * k[i + 1];
        }
        xinit[(bm * (P / Q) + j) * 8 + d] = v;
      }
}

// Int8Args::tail for the AVX2 kernels (int8_avx2_kernel.h), from xq in their order [reg][p][32]:
// per activation row X0 | X1 (packed_tail_byte's order), the 16 int16 chunk factors shared by both,
// the 16 int16 corrections (64 * the 4 bytes of each int16 over X0 and X1, as quantize_x_int8_avx2's
// corr) and the VNNI forms' 8 int32 start values (as int8_vnni_init's); then the 8 group entries.
[[maybe_unused]] static void int8_prepare_tail_avx2(const Int8Args& a, int8_t* dst) {
  const int P = int8_parts(a.bits);
  const int64_t b = a.nblocks - 1;
  auto part_of = [&](int z, int& p, int& byte) {
    const int off = packed_tail_byte(a.bits, true, z);
    p = off / 64;
    byte = off % 64;  // 32 reg + byte in the register
  };
  for (int64_t m = 0; m < a.M; ++m) {
    const int64_t bm = b * a.M + m;
    const int8_t* xb = a.xq + bm * 64 * P;
    const int16_t* kb = a.xk + bm * P * 16;
    int8_t* t = dst + 192 * m;
    int16_t k16[16], c16[16];
    int32_t s32[8];
    for (int z = 0; z < 64; ++z) {
      int p, byte;
      part_of(z, p, byte);
      t[z] = xb[((byte / 32) * P + p) * 32 + byte % 32];
    }
    for (int w = 0; w < 16; ++w) {
      int p, byte;
      part_of(2 * w, p, byte);
      k16[w] = kb[p * 16 + (byte % 32) / 2];
      c16[w] = static_cast<int16_t>(64 * (t[2 * w] + t[2 * w + 1] + t[32 + 2 * w] + t[33 + 2 * w]));
    }
    for (int d = 0; d < 8; ++d)
      s32[d] = -(int32_t{c16[2 * d]} * k16[2 * d] + int32_t{c16[2 * d + 1]} * k16[2 * d + 1]);
    std::memcpy(t + 64, k16, 32);
    std::memcpy(t + 96, c16, 32);
    std::memcpy(t + 128, s32, 32);
  }
  int32_t g[8];
  for (int d = 0; d < 8; ++d) {
    int p, byte;
    part_of(4 * d, p, byte);
    g[d] = a.gidx[(b * P + p) * 8 + (byte / 4) % 4];
  }
  std::memcpy(dst + 192 * a.M, g, 32);
}

// The 4-row kernels' arguments for the quantized activations of all M rows in base: the scale map
// (no division per tile in the kernel) and, for the AVX-512 kernel, the activations in its order.
static Int8Args int8_args(const Weight& w, int64_t M, const Int8Fns& f, const Table7& t7, char* base,
                          const Int8Scratch& L, float* out) {
  const int64_t nb = w.nblocks;
  const int P = int8_parts(w.bits), C = chunks_per_block(w.bits);
  int8_t* xq = reinterpret_cast<int8_t*>(base);
  int16_t* xk = reinterpret_cast<int16_t*>(base + L.o_k);
  int64_t* g0 = reinterpret_cast<int64_t*>(base + L.o_g0);
  int32_t* gidx = reinterpret_cast<int32_t*>(base + L.o_gidx);
  // The group of each 32-column chunk counted along the row rather than divided out (groups here are
  // a multiple of 32 columns or one group): a division per entry was ~0.3 us of each thread's
  // set-up of a one-row call at K = 576 (CPU_NOTES item 177).
  const int64_t per_group = w.ng == 1 ? INT64_MAX : w.G / 32;
  int64_t grp = 0, left = per_group;
  for (int64_t b = 0; b < nb; ++b) {
    int64_t cg[8];  // the block's chunks' groups (C <= 8)
    for (int j = 0; j < C; ++j) {
      cg[j] = std::min(grp, w.ng - 1);
      if (--left == 0) {
        ++grp;
        left = per_group;
      }
    }
    g0[b] = cg[0];
    for (int p = 0; p < P; ++p)
      for (int q = 0; q < 4; ++q)
        gidx[(b * P + p) * 8 + q] = gidx[(b * P + p) * 8 + 4 + q] = static_cast<int32_t>(cg[(P * q + p) % C] - cg[0]);
  }
  Int8Args a;
  a.qw = w.qweight->data_ptr<uint8_t>();
  a.bits = w.bits;
  a.N = w.N;
  a.nblocks = nb;
  a.M = M;
  a.xq = xq;
  a.xcorr = reinterpret_cast<int16_t*>(base + L.o_corr);
  a.xk = xk;
  a.xu = reinterpret_cast<float*>(base + L.o_u);
  // Parts added as int32 when their dwords meet the same weight groups: part p of dword q meets
  // chunk (P * q + p) % C, so parts 0-1 (and 2-3) of a dword cover one 64-aligned span of 64
  // columns, and parts 0-3 (2 and 3 bits) one 128-aligned span of 128.
  a.merge = 1;
  if (w.ng == 1 || w.G % 64 == 0) a.merge = 2;
  if (w.bits != 4 && (w.ng == 1 || w.G % 128 == 0)) a.merge = 4;
  // (the portable kernel reads whole last blocks, gemm_int8_whole, and neither flag)
  a.last_short = w.last_bytes < block_bytes(w.bits);
  a.last_half = a.last_short && w.K - (nb - 1) * 64 * P <= 32 * P / 2;
  a.tile_bytes = w.tile_bytes;
  a.scales = w.scales->data_ptr();
  a.offsets = w.offsets->defined() ? w.offsets->data_ptr() : nullptr;
  a.stype = w.stype;
  a.ng = w.ng;
  a.G = w.G;
  a.xsum = w.offsets->defined() ? reinterpret_cast<float*>(base + L.o_sum) : nullptr;
  a.g0 = g0;
  a.gidx = gidx;
  std::memcpy(a.tu, t7.tu, 16);
  a.out = out;
  a.tile_pairs = cpu_tile_pairs();
  if (f.vnni) {
    int32_t* xinit = reinterpret_cast<int32_t*>(base + L.o_init);
    int8_vnni_init(P, a.merge, nb * M, a.xcorr, xk, xinit);
    a.xinit = xinit;
  }
#if defined(__x86_64__) || defined(_M_X64)
  if (f.avx512 && M == 1 && w.K >= cpu_compact_k()) {  // long rows: compact activations (Int8Args::xkq)
    uint64_t* xkq = reinterpret_cast<uint64_t*>(base + L.o_kq);
    int8_prepare_compact_avx512(w.bits, nb, xq, xk, xkq, f.ordered);
    a.xkq = xkq;
  } else if (f.avx512) {
    int16_t* xk2 = reinterpret_cast<int16_t*>(base + L.o_k2);
    int32_t* xinit = reinterpret_cast<int32_t*>(base + L.o_init);
    int8_prepare_avx512(w.bits, a.merge, nb * M, xq, xk, xk2, xinit, f.ordered);
    a.xk2 = xk2;
    a.xinit = xinit;
  }
  // the packed last block (packed_tail_byte); the portable kernel reads whole blocks
  if (f.fn != gemm_int8_portable && packed_tail(w.bits, a.last_short, a.last_half)) {
    int8_t* tail = reinterpret_cast<int8_t*>(base + L.o_tail);
    if (f.avx512) int8_prepare_tail_avx512(a, tail);
    else int8_prepare_tail_avx2(a, tail);
    a.tail = tail;
  }
#else
  (void)f;
#endif
  return a;
}

// f's kernel over tiles [t0, t1): the SIMD kernels read short last blocks themselves, the
// portable one whole blocks (for_whole_tiles).
static void int8_tiles(const Int8Fns& f, const Weight& w, const Int8Args& a, int64_t t0, int64_t t1) {
  if (f.fn != gemm_int8_portable) {
    f.fn(a, t0, t1);
    return;
  }
  for_whole_tiles(w, t0, t1, [&](const uint8_t* whole, int64_t ta, int64_t tb) {
    Int8Args aw = a;
    aw.qw = whole;
    f.fn(aw, ta, tb);
  });
}

// One activation row over several threads: each thread quantizes the row into its own scratch
// (the same bytes in each: the same code on the same input) and then runs its tiles
// (for_tiles_prepared). In cache, 2 threads: 0.3-2 us less per call, most for long rows; from DRAM
// no difference measured (CPU_NOTES item 171).
static bool int8_gemm_row(const at::Tensor& x2, const Weight& w, const Int8Fns& f_in, const Table7& t7, float* out,
                          HalfOut* half) {
  Int8Fns f = f_in;
#if defined(__x86_64__) || defined(_M_X64)
  if (f.avx512) {  // the row straight into the AVX-512 kernel's order (CPU_NOTES item 179)
    f.quant = quantize_x_int8_avx512;
    f.ordered = true;
  }
#endif
  const Int8Scratch L(w.nblocks, 1, int8_parts(w.bits), w.ng);
  const int64_t grain = std::max<int64_t>(1, task_weights() / 4 / std::max<int64_t>(w.K_pad, 1));
  const bool ok = for_tiles_prepared<Int8Args>(
      w.N_pad / 4, grain, false,
      [&](Int8Args& a, TileRange first) {
        at::Tensor hold;
        char* base = call_scratch(0, L.total, hold);  // each thread's own buffer (thread_local)
        // The first 4 KB of the thread's streams (tiles_int8's: its first range, or that range's
        // halves with tile pairs) requested while it quantizes the row, a few lines per block: in
        // one process, 2 threads, from DRAM, 25.7 -> 25.3 us (3 bits) and 25.9 -> 25.6 (4 bits) on
        // 1536x576, 19.2 -> 18.9 and 23.3 -> 22.9 on 576x1536; 2 KB and 8 KB no better (CPU_NOTES
        // item 217).
        constexpr int64_t kWarmBytes = 4096;
        StreamWarm warm;
        const int64_t n = first.t1 - first.t0;
        if (n > 0) {
          const int64_t H = cpu_tile_pairs() && !w.offsets->defined() && 4 * (first.t0 + 2 * (n / 2)) <= w.N ? n / 2 : 0;
          const char* qw = reinterpret_cast<const char*>(w.qweight->data_ptr<uint8_t>());
          warm.stream[0] = qw + first.t0 * w.tile_bytes;
          if (H > 0) warm.stream[1] = qw + (first.t0 + H) * w.tile_bytes;
          warm.lines = std::min<int64_t>(kWarmBytes, (H > 0 ? H : n) * w.tile_bytes) / 64;
        }
        if (!quantize_rows(x2, w, 1, 0, 1, f, t7, base, L, &warm)) return false;
        a = int8_args(w, 1, f, t7, base, L, out);
        return true;
      },
      [&](const Int8Args& a, int64_t t0, int64_t t1) {
        int8_tiles(f, w, a, t0, t1);
        if (half) to_half(out, *half, 4 * t0, std::min(w.N, 4 * t1));
      });
  if (ok && half) half->done = true;
  return ok;
}

bool int8_gemm(const at::Tensor& x2, const Weight& w_in, int isa, float* out, HalfOut* half) {
  // 2 bits (the 16-row kernel only): the activations in blocks of 256 columns, as 3 bits
  Weight w = w_in;
  if (w.bits == 2) w.nblocks = (w.K + 255) / 256;
  const int64_t M = x2.numel() / w.K, nb = w.nblocks;
  const Int8Fns f = int8_fns(isa);
  const Table7& t7 = table7(w.table->data_ptr<float>(), 1 << w.bits);
#if defined(__x86_64__) || defined(_M_X64)
  const bool rows16 = w.bits == 2 || (M >= rows16_m(w.bits) && rows16_available(w.bits, isa));  // 2 bits: see the caller
#else
  const bool rows16 = false;
#endif
  if (!rows16 && M == 1) return int8_gemm_row(x2, w, f, t7, out, half);
  const Int8Scratch L(nb, M, int8_parts(w.bits), w.ng);
  at::Tensor hold;
  char* base = call_scratch(0, L.total, hold);
#if defined(__x86_64__) || defined(_M_X64)
  Rows16Buffers r16;
  if (rows16) rows16_buffers(w, M, r16);
#endif
  // Activation rows in parallel (prefill: serial, this was a sixth of a 576x1536 M = 64 call at 2
  // threads, the other thread waiting; CPU_NOTES item 138), each row quantized with its units
  // times the table scale (see Int8Args::xu), for the 16-row kernel straight into its order.
  std::atomic<bool> finite{true};
  float* xs = w.offsets->defined() ? reinterpret_cast<float*>(base + L.o_sum) : nullptr;
  const int64_t rows_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(w.K, 1));
  at::parallel_for(0, M, rows_grain, [&](int64_t m0, int64_t m1) {
#if defined(__x86_64__) || defined(_M_X64)
    const bool ok = rows16 ? quantize_rows16(x2, w, m0, m1, bf16_to_f32_avx512, t7, r16, xs) : quantize_rows(x2, w, M, m0, m1, f, t7, base, L);
#else
    const bool ok = quantize_rows(x2, w, M, m0, m1, f, t7, base, L);
#endif
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  if (!finite.load()) return false;
#if defined(__x86_64__) || defined(_M_X64)
  if (rows16) {
    rows16_gemm(w, M, r16, xs, t7, out, half);
    if (half) half->done = true;
    return true;
  }
#endif
  const Int8Args a = int8_args(w, M, f, t7, base, L, out);
  const int64_t grain = std::max<int64_t>(1, task_weights() / 4 / std::max<int64_t>(w.K_pad, 1));
  for_tiles(w.N_pad / 4, grain, [&](int64_t t0, int64_t t1) {
    int8_tiles(f, w, a, t0, t1);
    if (half) rows_to_half(out, *half, M, w.N, std::min(w.N, 4 * t0), std::min(w.N, 4 * t1));
  });
  if (half) half->done = true;
  return true;
}

}  // namespace flute_cpu::binding
