// The torch binding of the CPU lookup-table kernel (flute._cpu).
//
// Registers the CPU kernels of flute::qgemm and flute::dequantize (schemas defined in flute/ops.py,
// which imports this module): the CPU layout (uint8) runs here, validated with the messages of
// flute/ops.py; the GPU layout (int32) goes to the Python reference (flute::qgemm_reference).
// Registering in C++ instead of a Python impl that calls cpu_lut_gemm saves the Python round trip
// (measured: ~45 us of ~100 us per small call on the loaded machine). And, also in `flute`:
//   cpu_lut_gemm(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features)
//       y = x @ W.T for a CPU-layout (uint8) qweight; y in x's dtype. flute/ops.py calls it from
//       the CPU implementation of flute::qgemm after validating the arguments.
//   cpu_lut_dequantize(qweight, scales, offsets, table, bits, group_size, in_features, out_features)
//       W [out_features, in_features]: bf16 for bf16 scales, fp32 otherwise.
//   cpu_isa() -> str, cpu_set_isa(str) -> str: the kernel path in use ("avx512", "avx2",
//       "portable"); chosen from cpuid at load, or from FLUTE_CPU_ISA.
//   cpu_mode() -> str, cpu_set_mode(str) -> str, cpu_has_bf16() -> bool: the fused kernel's
//       arithmetic: "int8" (the default; int8 activations and a 7-bit table, llama.cpp's approach;
//       any bit width), "exact" (fp32; FLUTE_CPU_MODE=exact) or "bf16"
//       (FLUTE_CPU_MODE=bf16; AVX512_BF16 + VBMI CPUs only, other paths stay exact).
//   cpu_amx() -> bool, cpu_set_amx(bool) -> bool: whether bf16 activations from amx_m() rows
//       take the AMX kernels (kernel_amx.cpp; CPUs with AMX-BF16; FLUTE_CPU_AMX=0 off).
//   cpu_tile_pairs() -> bool, cpu_set_tile_pairs(bool) -> bool: whether the M = 1 int8-mode
//       kernels read two tiles far apart in one pass (on for Intel CPUs; FLUTE_CPU_TILE_PAIRS).
//   cpu_vnni() -> str, cpu_set_vnni(bool) -> str: the form the AVX2 int8 kernel runs: a VNNI one
//       where the CPU has one ("avxvnni", "avx512vnni_ymm"), else (or off) the int16 step, EVEX
//       encoded on AVX-512 CPUs ("avx512bw_ymm"), VEX otherwise (""); FLUTE_CPU_VNNI=0 off, or a
//       form's name; cpu_vnni_forms() -> str[] the named forms available, cpu_set_vnni_form(str)
//       -> str one of them (or "") by name.
//   cpu_compact_k() -> int, cpu_set_compact_k(int) -> int: the columns from which one activation
//       row takes the AVX-512 int8 kernel's compact activations (Int8Args::xkq; FLUTE_CPU_COMPACT_K).
//   cpu_rows16_m(bits) -> int: the activation rows from which the int8 mode runs that bit width on
//       the 16-row kernel (kernel_int8_rows16_avx512.cpp) on the active path, 0 where it does not.
//   cpu_panel_m(bits) -> int: the activation rows from which that bit width takes the panel path
//       (decode + at::mm, exact) on the active path and mode, where AMX does not take them first;
//       0 where none does (the int8 mode on the 16-row kernel, unless FLUTE_CPU_ROWS16_LARGE_M).
//
// Paths: bf16 x on an AMX CPU (avx512 path), groups of a multiple of 32 columns (or one group), any
// bits: 16 to kAmxMaxM = 64 rows the streamed AMX kernel (gemm_amx), more rows the blocked one
// (gemm_amx_rows, bf16 output). Otherwise, 2 bits (the pair layout, pair_lut.h): below kLargeM rows
// with such groups the pair-table kernel in the int8 mode (from rows16_m(2) rows the 16-row
// kernel where the CPU has AVX-512 VBMI + VNNI, to rows16_large_m()) or the pair layout's exact
// kernel (fused_gemm.cpp: pair_gemm), else the panel path; 3 and 4 bits: M <
// large_m() and groups of a multiple of 32 columns (or one group): the fused kernel, in the int8
// mode (int8_gemm.cpp; finite x; from rows16_m() to rows16_large_m() rows on the 16-row kernel
// where the CPU has AVX-512 VBMI + VNNI) or exact fp32 (fused_gemm.cpp), activations prepared
// once per call, threads over row tiles. Otherwise: rows decoded in panels (fp32, or bf16 for bf16 activations on CPUs with
// native bf16) and multiplied by at::mm (oneDNN/MKL), exactly.
//
// The Python module object and its direct entry to flute::qgemm: python_entry.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "binding.h"

namespace {

using namespace flute_cpu;
using namespace flute_cpu::binding;

DecodeFn decode_fn(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAvx512) return decode_avx512;
  if (isa == kAvx2) return decode_avx2;
#endif
  return decode_portable;
}

DecodeFn decode_pair_fn(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= kAvx2) return decode_pair_avx2;
#endif
  return decode_pair_portable;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The CPU layout's padded shape: 2 bits the pair layout (16-row tiles, 32-column chunks, pair_lut.h),
// 3 and 4 bits 4-row tiles and blocks of 256 or 128 columns (lut_kernel.h).
int64_t cpu_n_pad(int64_t bits, int64_t N) { return bits == 2 ? ceil_div(N, 16) * 16 : ceil_div(N, 4) * 4; }
int64_t cpu_k_unit(int64_t bits) { return bits == 2 ? 32 : bits == 4 ? 128 : 256; }

// Bytes of the CPU layout: 3 and 4 bits with the last block of each row possibly short
// (lut_kernel.h, last_block_bytes).
int64_t cpu_layout_bytes(int64_t bits, int64_t K, int64_t N) {
  const int64_t nblocks = ceil_div(K, cpu_k_unit(bits));
  if (bits == 2) return cpu_n_pad(bits, N) * nblocks * cpu_k_unit(bits) * bits / 8;
  return cpu_n_pad(bits, N) / 4 * layout_tile_bytes(static_cast<int>(bits), K, nblocks);
}

std::string layout_error(const at::Tensor& qweight, int64_t bits, int64_t K, int64_t N) {
  const int64_t cpu = cpu_layout_bytes(bits, K, N);
  const int64_t ka = bits == 3 ? 128 : 64;
  const int64_t gpu = ceil_div(N, 32) * 32 * ceil_div(K, ka) * ka * bits / 32;
  std::ostringstream os;
  os << "flute: qweight must be ";
  if (qweight.scalar_type() == at::kByte)
    os << "uint8 of shape (" << cpu << ",) (the CPU layout of a " << N << "x" << K << " " << bits
       << "-bit weight), got uint8 " << qweight.sizes();
  else
    os << "int32 of shape (" << gpu << ",) (the GPU kernel layout of a " << N << "x" << K << " "
       << bits << "-bit weight) or uint8 of shape (" << cpu << ",) (its CPU layout), got "
       << qweight.scalar_type() << " " << qweight.sizes();
  return os.str();
}

// The checks of flute/ops.py:check_weight_args (same messages, ValueError) for a CPU-layout weight.
Weight check_weight(const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& offsets, const at::Tensor& table, int64_t bits,
                    int64_t group_size, int64_t K, int64_t N) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4, "flute: bits must be one of (2, 3, 4), got ",
                    bits);
  TORCH_CHECK_VALUE(group_size == -1 || group_size >= 1,
                    "flute: group_size must be positive or -1, got ", group_size);
  TORCH_CHECK_VALUE(K >= 1 && N >= 1, "flute: in_features and out_features must be positive, got ",
                    K, " and ", N);
  Weight w;
  w.bits = static_cast<int>(bits);
  w.K = K;
  w.N = N;
  const int64_t kb = cpu_k_unit(bits);  // 2 bits: nblocks counts the pair layout's chunks
  w.K_pad = ceil_div(K, kb) * kb;
  w.N_pad = cpu_n_pad(bits, N);
  w.nblocks = w.K_pad / kb;
  w.G = group_size == -1 ? K : group_size;
  w.ng = ceil_div(K, w.G);
  if (bits != 2) {
    w.tile_bytes = layout_tile_bytes(w.bits, K, w.nblocks);
    w.last_bytes = last_block_bytes(w.bits, K);
  }
  const int64_t bytes = cpu_layout_bytes(bits, K, N);
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte && qweight.dim() == 1 && qweight.numel() == bytes,
                    layout_error(qweight, bits, K, N));
  TORCH_CHECK_VALUE(scales.is_floating_point() && scales.dim() == 2 && scales.size(0) == N &&
                        scales.size(1) == w.ng,
                    "flute: scales must be floating point of shape (", N, ", ", w.ng, "), got ",
                    scales.scalar_type(), " ", scales.sizes());
  if (offsets.has_value() && offsets->defined())
    TORCH_CHECK_VALUE(offsets->sizes() == scales.sizes() && offsets->scalar_type() == scales.scalar_type(),
                      "flute: offsets must have the shape and dtype of scales ((", N, ", ", w.ng,
                      "), ", scales.scalar_type(), "), got ", offsets->scalar_type(), " ",
                      offsets->sizes());
  TORCH_CHECK_VALUE(table.is_floating_point() && table.numel() == (int64_t(1) << bits),
                    "flute: table must be floating point with ", (1 << bits), " entries for bits=",
                    bits, ", got ", table.scalar_type(), " with ", table.numel());
  const bool one_device = scales.device() == qweight.device() && table.device() == qweight.device() &&
                          (!offsets.has_value() || !offsets->defined() ||
                           offsets->device() == qweight.device());
  TORCH_CHECK_VALUE(one_device, "flute: all tensors must be on one device");
  TORCH_CHECK_VALUE(qweight.device().is_cpu(), "flute: the CPU layout (uint8 qweight) is for CPU tensors");
  // Conversions only where needed: each no-op .to() / .contiguous() is still a dispatched call
  // (~1 us), and small layers are dominated by such fixed costs. What needs none is borrowed.
  using Borrow = c10::MaybeOwned<at::Tensor>;
  const auto use = [](const at::Tensor& t, at::ScalarType dt) {
    if (t.scalar_type() != dt) return Borrow::owned(t.to(dt).contiguous());
    return t.is_contiguous() ? Borrow::borrowed(t) : Borrow::owned(t.contiguous());
  };
  const auto st = scales.scalar_type();
  const auto sdt = st == at::kFloat || st == at::kBFloat16 || st == at::kHalf ? st : at::kFloat;
  w.stype = sdt == at::kFloat ? kF32 : sdt == at::kBFloat16 ? kBF16 : kF16;
  w.scales = use(scales, sdt);
  if (offsets.has_value() && offsets->defined()) w.offsets = use(*offsets, sdt);
  w.table = use(table, at::kFloat);
  w.qweight = use(qweight, at::kByte);
  return w;
}

DecodeArgs decode_args(const Weight& w, const at::Tensor& qweight) {
  DecodeArgs d;
  d.qw = w.qweight->data_ptr<uint8_t>();
  d.bits = w.bits;
  d.K = w.K;
  d.N = w.N;
  d.K_pad = w.K_pad;
  d.nblocks = w.nblocks;
  d.scales = w.scales->data_ptr();
  d.offsets = w.offsets->defined() ? w.offsets->data_ptr() : nullptr;
  d.stype = w.stype;
  d.ng = w.ng;
  d.G = w.G;
  d.table = w.table->data_ptr<float>();
  d.dst = nullptr;
  d.ld = w.K;
  d.bf16 = false;
  return d;
}

// Rows [r0, r1) of W into dst [r1 - r0, K], in parallel.
void decode_rows(const Weight& w, const at::Tensor& qweight, int64_t r0, int64_t r1, at::Tensor& dst) {
  DecodeArgs d = decode_args(w, qweight);
  d.dst = dst.data_ptr();
  d.bf16 = dst.scalar_type() == at::kBFloat16;
  d.ld = dst.stride(0);
  DecodeFn fn = decode_fn(active_isa());
  if (w.bits == 2) fn = decode_pair_fn(active_isa());
#if defined(__x86_64__) || defined(_M_X64)
  // decode_avx2's own fallback for groups that split a 32-column chunk, taken here so that it gets
  // the layout as it is (not the legacy 3-bit plane below)
  if (fn == decode_avx2 && w.G % 32 != 0 && w.ng != 1) fn = decode_portable;
#endif
  const bool legacy = w.bits == 3 && fn != decode_portable;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(w.K, 1));
  const int64_t esize = dst.element_size();
  at::parallel_for(r0, r1, grain, [&](int64_t b, int64_t e) {
    if (w.bits == 2) {
      DecodeArgs dd = d;
      dd.dst = static_cast<char*>(d.dst) + (b - r0) * d.ld * esize;
      fn(dd, b, e);
      return;
    }
    // 3/4 bits: the tiles of rows [b, e) with whole last blocks (for_whole_tiles), and for the SIMD
    // kernels at 3 bits the legacy high-bit plane, tile by tile
    for_whole_tiles(w, b / 4, (e + 3) / 4, [&](const uint8_t* whole, int64_t ta, int64_t tb) {
      const int64_t rb = std::max(b, 4 * ta), re = std::min(e, 4 * tb);
      DecodeArgs dd = d;
      dd.qw = whole;
      dd.dst = static_cast<char*>(d.dst) + (rb - r0) * d.ld * esize;
      if (!legacy) {
        fn(dd, rb, re);
        return;
      }
      for_legacy_tiles(whole, d.nblocks, 4 * d.nblocks * block_bytes(3), block_bytes(3), ta, tb,
                       [&](const uint8_t* base, int64_t t) {
        const int64_t rb1 = std::max(b, 4 * t), re1 = std::min(e, 4 * t + 4);
        DecodeArgs dt = d;
        dt.qw = base;
        dt.dst = static_cast<char*>(d.dst) + (rb1 - r0) * d.ld * esize;
        fn(dt, rb1, re1);
      });
    });
  });
}

at::Tensor cpu_lut_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                              const std::optional<at::Tensor>& offsets, const at::Tensor& table,
                              int64_t bits, int64_t group_size, int64_t K, int64_t N) {
  const Weight w = check_weight(qweight, scales, offsets, table, bits, group_size, K, N);
  // bf16 scales: bf16 out (rounded once from the fp32 value), anything else: fp32 out.
  const auto dt = scales.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  at::Tensor out = at::empty({N, K}, scales.options().dtype(dt));
  decode_rows(w, qweight, 0, N, out);
  return out;
}

}  // namespace

namespace flute_cpu::binding {
QgemmHandle qgemm_handle() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("flute::qgemm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, const at::Tensor&,
                                               int64_t, int64_t, int64_t, int64_t)>();
  return op;
}

void to_half(const float* src, const HalfOut& h, int64_t c0, int64_t c1) {
  if (c1 <= c0) return;
  if (h.bf16) {
    auto* dst = static_cast<uint16_t*>(h.dst) + c0;
#if defined(__x86_64__) || defined(_M_X64)
    if (h.isa >= kAvx2) {
      f32_to_bf16_avx2(src + c0, dst, c1 - c0);
      return;
    }
#endif
    for (int64_t i = c0; i < c1; ++i) *dst++ = f32_to_bf16(src[i]);
  } else {
    auto* dst = static_cast<c10::Half*>(h.dst);
    for (int64_t i = c0; i < c1; ++i) dst[i] = c10::Half(src[i]);
  }
}
}  // namespace flute_cpu::binding

namespace {

// The fused kernels (not the panel path) on the M rows of x2 (contiguous fp32, bf16 or fp16, last
// dimension K) into y (contiguous, N per row: x2's dtype if bf16 / fp16, else fp32).
void fused_rows(const at::Tensor& x2, const Weight& w, int64_t M, bool amx, const at::Tensor& y) {
  const auto xt = x2.scalar_type();
  const int isa = active_isa();
  const int64_t N = w.N;
  const bool half = xt == at::kBFloat16 || xt == at::kHalf;
  // fp32 results straight into the output; for bf16 / fp16 x into scratch, converted below (one
  // fewer dispatched op per call: ~5-10 us on small layers).
  at::Tensor hold;
  float* out = half ? reinterpret_cast<float*>(call_scratch(1, M * N * 4, hold)) : y.data_ptr<float>();
  HalfOut h;
  if (half) {
    h.dst = y.data_ptr();
    h.bf16 = xt == at::kBFloat16;
    h.isa = isa;
  }
  HalfOut* row_half = half && M == 1 ? &h : nullptr;  // one-row calls convert per thread
  HalfOut* int8_half = half ? &h : nullptr;           // the int8 mode's kernels convert per thread
  if (amx)
    amx_gemm(x2, w, out);
  else if (w.bits == 2) {
    const bool int8 = active_mode() == kModeInt8;
    const bool rows16 = int8 && M >= rows16_m(2) && rows16_available(2, isa);
    if (!(int8 && (rows16 ? int8_gemm(x2, w, isa, out, int8_half) : pair_gemm(x2, w, isa, false, out, row_half))))
      pair_gemm(x2, w, isa, true, out);
  } else if (!(active_mode() == kModeInt8 && int8_gemm(x2, w, isa, out, int8_half)))
    exact_gemm(x2, w, isa, active_mode() == kModeBf16 && has_bf16_kernel(), out);
  if (half && !h.done) to_half(out, h, 0, M * N);
}

at::Tensor cpu_lut_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, const at::Tensor& table, int64_t bits,
                        int64_t group_size, int64_t K, int64_t N) {
  const Weight w = check_weight(qweight, scales, offsets, table, bits, group_size, K, N);
  TORCH_CHECK_VALUE(x.is_floating_point(), "flute: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "flute: x must have last dimension in_features=",
                    K, ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == qweight.device(), "flute: x is on ", x.device(),
                    " but the weight is on ", qweight.device());
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;
  const int64_t M = x.numel() / K;
  if (M == 0) return at::empty(out_shape, x.options());
  const auto xt = x.scalar_type();
  const int isa = active_isa();
  const bool fused = w.G % 32 == 0 || w.ng == 1;
  // bf16 x from amx_m() rows on an AMX CPU: the AMX kernels, which read both layouts (3/4 bits and
  // the 2-bit pair layout)
  const bool amx_rows = fused && xt == at::kBFloat16 && isa == kAvx512 && M >= amx_m() && cpu_amx();
  const bool amx = amx_rows && M <= kAmxMaxM;
  if (amx_rows && M > kAmxMaxM) {
    // many rows on AMX: blocked like a bf16 GEMM, the output written in bf16 (kernel_amx.cpp)
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(out_shape, x.options());
    amx_gemm_rows(xc, w, reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()));
    return y;
  }
  if (!amx && (!fused || M >= panel_m(w.bits, isa))) {
    // Panel path: decode a few rows at a time, let at::mm (oneDNN / MKL) multiply.
    // bf16 panels only where the CPU multiplies bf16 natively (AVX512_BF16 / AMX): elsewhere oneDNN
    // emulates it and fp32 is ~3.5x faster (14336x4096 M=64 on an AVX2 Zen 3: 346 vs 99 ms).
    const auto pdt = (xt == at::kBFloat16 && M >= large_m() && has_native_bf16()) ? at::kBFloat16 : at::kFloat;
    const at::Tensor xin = x.reshape({M, K}).to(pdt).contiguous();
    const int64_t esz = pdt == at::kBFloat16 ? 2 : 4;
    // Rows per panel: panel_bytes() of them, but at most N / (4 M) panels, because each product
    // packs all of x again (M x K), and with long rows that outweighs the panel: 4096x14336 at
    // 512 rows took 7 panels of 16 MB, each packing a 14.7 MB x (CPU_NOTES item 109).
    int64_t rows = std::max<int64_t>(16, panel_bytes() / (K * esz));
    const int64_t most_panels = std::max<int64_t>(1, N / (4 * M));
    rows = std::max(rows, (N + most_panels - 1) / most_panels);
    rows = std::min<int64_t>(N, (rows + 3) / 4 * 4);
    at::Tensor hold;
    char* pbuf = call_scratch(2, rows * K * esz, hold, std::max(panel_bytes(), kPanelCachedBytes));
    at::Tensor panel = at::from_blob(pbuf, {rows, K}, x.options().dtype(pdt));
    // out [M, N] column panel by column panel (an ldc of N): the decoded panel is the product's
    // weight operand, as a bf16 nn.Linear's would be, and no transpose of the result is needed.
    at::Tensor out = at::empty({M, N}, x.options().dtype(pdt));
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t nr = std::min(rows, N - n0);
      at::Tensor p = panel.narrow(0, 0, nr);
      decode_rows(w, qweight, n0, n0 + nr, p);
      at::Tensor o = out.narrow(1, n0, nr);
      at::mm_out(o, xin, p.t());
    }
    return out.to(xt).view(out_shape);
  }
  // x as the kernels read it: contiguous fp32, bf16 or fp16, any leading dimensions (no reshape:
  // each dispatched view or allocation is ~1-2.5K instructions of a small call's ~16K).
  const bool half = xt == at::kBFloat16 || xt == at::kHalf;
  // (borrowed where it needs no conversion: see Weight)
  c10::MaybeOwned<at::Tensor> xm = c10::MaybeOwned<at::Tensor>::borrowed(x);
  if (!x.is_contiguous() || !(half || xt == at::kFloat))
    xm = c10::MaybeOwned<at::Tensor>::owned(x.to(half ? xt : at::kFloat).contiguous());
  const at::Tensor& x2 = *xm;
  at::Tensor y = at::empty(out_shape, x.options().dtype(half ? xt : at::kFloat));
  // Many rows in chunks whose fp32 results and int8 activations fit the scratch kept between calls
  // (call_scratch): past it every call allocated them afresh, page faults and all, and 4096x4096 at
  // 1536 rows took 1.9 times the time of 1024 (CPU_NOTES item 264). Each row's result is the same
  // in any chunk.
  const int64_t chunk = std::max<int64_t>(
      128, std::min(half ? kScratchCachedBytes / (4 * N) : M, kScratchCachedBytes / (2 * w.K_pad)) / 64 * 64);
  if (amx || M <= chunk) {
    fused_rows(x2, w, M, amx, y);
  } else {
    const at::Tensor xv = x2.view({M, K});
    const at::Tensor yv = y.view({M, N});
    const int64_t n = (M + chunk - 1) / chunk;
    for (int64_t i = 0, r0 = 0; i < n; ++i) {
      const int64_t rc = (M - r0) / (n - i);
      fused_rows(xv.narrow(0, r0, rc), w, rc, false, yv.narrow(0, r0, rc));
      r0 += rc;
    }
  }
  return half || xt == at::kFloat ? y : y.to(xt);
}

// flute::qgemm / flute::dequantize on CPU: the kernel for the CPU layout (uint8), the Python
// reference (flute::qgemm_reference, defined in flute/ops.py) for the GPU layout (int32) and for
// float64 activations (the kernel computes in fp32; float64 callers want float64 accuracy).
at::Tensor qgemm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& offsets, const at::Tensor& table, int64_t bits,
                     int64_t group_size, int64_t K, int64_t N) {
  if (qweight.scalar_type() == at::kInt || x.scalar_type() == at::kDouble) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flute::qgemm_reference", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, const at::Tensor&,
                                           int64_t, int64_t, int64_t, int64_t)>();
    return op.call(x, qweight, scales, offsets, table, bits, group_size, K, N);
  }
  return cpu_lut_gemm(x, qweight, scales, offsets, table, bits, group_size, K, N);
}

at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& offsets, const at::Tensor& table,
                          int64_t bits, int64_t group_size, int64_t K, int64_t N) {
  if (qweight.scalar_type() == at::kInt) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flute::dequantize_reference", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, const at::Tensor&,
                                           int64_t, int64_t, int64_t, int64_t)>();
    return op.call(qweight, scales, offsets, table, bits, group_size, K, N);
  }
  return cpu_lut_dequantize(qweight, scales, offsets, table, bits, group_size, K, N)
      .to(scales.scalar_type());
}

// Autograd of flute::qgemm, for every backend: the gradient with respect to x only (the quantized
// weight is frozen), grad @ W, so adapters (LoRA) and activations upstream of a quantized layer
// train. In C++ rather than torch.library.register_autograd because the Python autograd kernel
// costs ~10 us per call even under no_grad (HF generate: 210 calls per SmolLM2 token); flute/ops.py
// registers the same formula in Python only when this extension is missing.
class QgemmAutograd : public torch::autograd::Function<QgemmAutograd> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& offsets, const at::Tensor& table,
                            int64_t bits, int64_t group_size, int64_t K, int64_t N) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto& op = qgemm_handle();
    ctx->save_for_backward({qweight, scales, offsets.has_value() ? *offsets : at::Tensor(), table});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["K"] = K;
    ctx->saved_data["N"] = N;
    return op.call(x, qweight, scales, offsets, table, bits, group_size, K, N);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto deq = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("flute::dequantize", "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, const at::Tensor&,
                                            int64_t, int64_t, int64_t, int64_t)>();
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> offsets;
    if (saved[2].defined()) offsets = saved[2];
    const at::Tensor w = deq.call(saved[0], saved[1], offsets, saved[3], ctx->saved_data["bits"].toInt(),
                                  ctx->saved_data["group_size"].toInt(), ctx->saved_data["K"].toInt(),
                                  ctx->saved_data["N"].toInt());
    const at::Tensor grad_x = at::matmul(grads[0], w.to(grads[0].scalar_type()));
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor qgemm_autograd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& offsets, const at::Tensor& table,
                          int64_t bits, int64_t group_size, int64_t K, int64_t N) {
  // Nothing to record (inference, or no input that wants a gradient): straight to the backend
  // kernel. Function::apply fills its context (four saved_data entries: a hash map) on every call,
  // ~11K instructions, a third of a small call's C++ cost (callgrind, 4x128).
  const bool record = at::GradMode::is_enabled() &&
                      (x.requires_grad() || scales.requires_grad() || table.requires_grad() ||
                       (offsets.has_value() && offsets->requires_grad()));
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto& op = qgemm_handle();
    return op.call(x, qweight, scales, offsets, table, bits, group_size, K, N);
  }
  return QgemmAutograd::apply(x, qweight, scales, offsets, table, bits, group_size, K, N);
}

}  // namespace

TORCH_LIBRARY_IMPL(flute, Autograd, m) { m.impl("qgemm", &qgemm_autograd); }

TORCH_LIBRARY_FRAGMENT(flute, m) {
  m.def("cpu_lut_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, Tensor table, "
        "int bits, int group_size, int in_features, int out_features) -> Tensor");
  m.def("cpu_lut_dequantize(Tensor qweight, Tensor scales, Tensor? offsets, Tensor table, "
        "int bits, int group_size, int in_features, int out_features) -> Tensor");
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_set_isa(str name) -> str", &cpu_set_isa);
  m.def("cpu_mode() -> str", &cpu_mode);
  m.def("cpu_set_mode(str name) -> str", &cpu_set_mode);
  m.def("cpu_has_bf16() -> bool", &has_bf16_kernel);
  m.def("cpu_amx() -> bool", &cpu_amx);
  m.def("cpu_set_amx(bool on) -> bool", &cpu_set_amx);
  m.def("cpu_tile_pairs() -> bool", &cpu_tile_pairs);
  m.def("cpu_set_tile_pairs(bool on) -> bool", &cpu_set_tile_pairs);
  m.def("cpu_vnni() -> str", &cpu_vnni);
  m.def("cpu_set_vnni(bool on) -> str", &cpu_set_vnni);
  m.def("cpu_vnni_forms() -> str[]", &cpu_vnni_forms);
  m.def("cpu_set_vnni_form(str name) -> str", &cpu_set_vnni_form);
  m.def("cpu_units() -> str[]", &cpu_units);
  m.def("cpu_compact_k() -> int", &cpu_compact_k);
  m.def("cpu_set_compact_k(int k) -> int", &cpu_set_compact_k);
  m.def("cpu_rows16_m(int bits) -> int", &cpu_rows16_m);
  m.def("cpu_panel_m(int bits) -> int", &cpu_panel_m);
}

TORCH_LIBRARY_IMPL(flute, CPU, m) {
  m.impl("qgemm", &qgemm_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("cpu_lut_gemm", &cpu_lut_gemm);
  m.impl("cpu_lut_dequantize", &cpu_lut_dequantize);
}
