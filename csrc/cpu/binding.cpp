// The torch binding of the CPU lookup-table kernel (flute._cpu).
//
// Registers, in the `flute` namespace (whose main schemas flute/ops.py defines):
//   cpu_lut_gemm(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features)
//       y = x @ W.T for a CPU-layout (uint8) qweight; y in x's dtype. flute/ops.py calls it from
//       the CPU implementation of flute::qgemm after validating the arguments.
//   cpu_lut_dequantize(qweight, scales, offsets, table, bits, group_size, in_features, out_features)
//       W as fp32 [out_features, in_features].
//   cpu_isa() -> str, cpu_set_isa(str) -> str: the kernel path in use ("avx512", "avx2",
//       "portable"); chosen from cpuid at load, or from FLUTE_CPU_ISA.
//
// Paths: M < kLargeM and groups of a multiple of 32 columns (or one group): the fused kernel,
// exact fp32 (activations converted to fp32 and chunk-permuted once per call), threads over row
// tiles with at::parallel_for. Otherwise: rows decoded in panels (fp32, or bf16 for bf16
// activations) and multiplied by at::mm (oneDNN/MKL).
//
// Python-version-independent: no pybind11, only the CPython stable ABI for the empty module object.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "lut_kernel.h"

namespace {

using namespace flute_cpu;

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

// Activation rows from which the panel path (decode + at::mm) is used.
constexpr int64_t kLargeM = 32;
// Bytes of one decoded panel (stays in L2/L3 between the decode and the multiply).
constexpr int64_t kPanelBytes = 2 << 20;

int detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

const int g_best = detect_isa();

int parse_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return i;
  return -1;
}

int initial_isa() {
  const char* env = std::getenv("FLUTE_CPU_ISA");
  if (env && *env) {
    const int i = parse_isa(env);
    if (i >= 0 && i <= g_best) return i;
    // An unknown or unsupported request falls back to the best path (flute/ops.py warns).
  }
  return g_best;
}

std::atomic<int> g_isa{initial_isa()};

std::string cpu_isa() { return kIsaNames[g_isa.load()]; }

std::string cpu_set_isa(const std::string& name) {
  const int i = name == "auto" || name.empty() ? g_best : parse_isa(name);
  TORCH_CHECK(i >= 0, "flute: unknown CPU ISA '", name, "' (avx512, avx2, portable or auto)");
  TORCH_CHECK(i <= g_best, "flute: this CPU does not support the '", name,
              "' kernel path (best available: ", kIsaNames[g_best], ")");
  g_isa.store(i);
  return kIsaNames[i];
}

GemmFn gemm_fn(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAvx512) return gemm_avx512;
  if (isa == kAvx2) return gemm_avx2;
#endif
  return gemm_portable;
}

DecodeFn decode_fn(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAvx512) return decode_avx512;
#endif
  return decode_portable;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Weight {
  int bits;
  int64_t K, N, K_pad, N_pad, nblocks, G, ng;
  at::Tensor scales, offsets, table;
  int stype;
};

Weight check_weight(const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& offsets, const at::Tensor& table, int64_t bits,
                    int64_t group_size, int64_t K, int64_t N) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "flute: bits must be one of (2, 3, 4), got ", bits);
  TORCH_CHECK(group_size == -1 || group_size >= 1, "flute: group_size must be positive or -1, got ",
              group_size);
  TORCH_CHECK(K >= 1 && N >= 1, "flute: in_features and out_features must be positive");
  Weight w;
  w.bits = static_cast<int>(bits);
  w.K = K;
  w.N = N;
  const int64_t kb = bits == 4 ? 128 : 256;
  w.K_pad = ceil_div(K, kb) * kb;
  w.N_pad = ceil_div(N, 4) * 4;
  w.nblocks = w.K_pad / kb;
  w.G = group_size == -1 ? K : group_size;
  w.ng = ceil_div(K, w.G);
  const int64_t bytes = w.N_pad * w.K_pad * bits / 8;
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kByte && qweight.dim() == 1 &&
                  qweight.numel() == bytes,
              "flute: qweight must be the uint8 CPU layout of shape (", bytes, ",) (",
              N, "x", K, " ", bits, "-bit), got ", qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(scales.is_floating_point() && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) == w.ng,
              "flute: scales must be floating point of shape (", N, ", ", w.ng, ")");
  at::Tensor s = scales;
  const auto st = s.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) s = s.to(at::kFloat);
  w.stype = s.scalar_type() == at::kFloat ? kF32 : s.scalar_type() == at::kBFloat16 ? kBF16 : kF16;
  w.scales = s.contiguous();
  if (offsets.has_value() && offsets->defined()) {
    TORCH_CHECK(offsets->sizes() == scales.sizes() && offsets->scalar_type() == scales.scalar_type(),
                "flute: offsets must have the shape and dtype of scales");
    w.offsets = offsets->to(s.scalar_type()).contiguous();
  }
  TORCH_CHECK(table.is_floating_point() && table.numel() == (int64_t(1) << bits),
              "flute: table must be floating point with ", (1 << bits), " entries");
  w.table = table.to(at::kFloat).contiguous();
  return w;
}

DecodeArgs decode_args(const Weight& w, const at::Tensor& qweight) {
  DecodeArgs d;
  d.qw = qweight.data_ptr<uint8_t>();
  d.bits = w.bits;
  d.K = w.K;
  d.N = w.N;
  d.K_pad = w.K_pad;
  d.nblocks = w.nblocks;
  d.scales = w.scales.data_ptr();
  d.offsets = w.offsets.defined() ? w.offsets.data_ptr() : nullptr;
  d.stype = w.stype;
  d.ng = w.ng;
  d.G = w.G;
  d.table = w.table.data_ptr<float>();
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
  const DecodeFn fn = decode_fn(g_isa.load());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(w.K, 1));
  at::parallel_for(r0, r1, grain, [&](int64_t b, int64_t e) {
    DecodeArgs dd = d;
    dd.dst = static_cast<char*>(d.dst) + (b - r0) * d.ld * dst.element_size();
    fn(dd, b, e);
  });
}

at::Tensor cpu_lut_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                              const std::optional<at::Tensor>& offsets, const at::Tensor& table,
                              int64_t bits, int64_t group_size, int64_t K, int64_t N) {
  const Weight w = check_weight(qweight, scales, offsets, table, bits, group_size, K, N);
  at::Tensor out = at::empty({N, K}, scales.options().dtype(at::kFloat));
  decode_rows(w, qweight, 0, N, out);
  return out;
}

// Fp32 activations, chunk-permuted and vector-major ([K_pad/16][M][16], see lut_kernel.h), zero
// beyond K; group sums of each row.
template <typename T>
void permute_x(const T* x, int64_t M, int64_t K, int64_t K_pad, int64_t G, int64_t ng, float* xp,
               float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    for (int64_t k = 0; k < K_pad; ++k) {
      const int64_t v = (k >> 5) * 2 + (k & 1), j = (k & 31) >> 1;
      xp[(v * M + m) * 16 + j] = k < K ? static_cast<float>(xr[k]) : 0.f;
    }
    if (xsum) {
      for (int64_t g = 0; g < ng; ++g) {
        float s = 0.f;
        for (int64_t k = g * G; k < std::min(K, (g + 1) * G); ++k) s += static_cast<float>(xr[k]);
        xsum[m * ng + g] = s;
      }
    }
  }
}

at::Tensor cpu_lut_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, const at::Tensor& table, int64_t bits,
                        int64_t group_size, int64_t K, int64_t N) {
  const Weight w = check_weight(qweight, scales, offsets, table, bits, group_size, K, N);
  TORCH_CHECK(x.is_floating_point() && x.dim() >= 1 && x.size(-1) == K,
              "flute: x must be floating point with last dimension in_features=", K);
  TORCH_CHECK(x.device().is_cpu(), "flute: x must be on the CPU");
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;
  const int64_t M = x.numel() / K;
  if (M == 0) return at::empty(out_shape, x.options());
  const auto xt = x.scalar_type();
  const int isa = g_isa.load();
  const bool fused = w.G % 32 == 0 || w.ng == 1;
  if (!fused || M >= kLargeM) {
    // Panel path: decode a few rows at a time, let at::mm (oneDNN / MKL) multiply.
    const auto pdt = (xt == at::kBFloat16 && M >= kLargeM) ? at::kBFloat16 : at::kFloat;
    const at::Tensor xin = x.reshape({M, K}).to(pdt).contiguous();
    const int64_t esz = pdt == at::kBFloat16 ? 2 : 4;
    const int64_t rows = std::min<int64_t>(N, std::max<int64_t>(16, kPanelBytes / (K * esz)) / 4 * 4);
    at::Tensor out_t = at::empty({N, M}, x.options().dtype(pdt));
    at::Tensor panel = at::empty({rows, K}, x.options().dtype(pdt));
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t nr = std::min(rows, N - n0);
      at::Tensor p = panel.narrow(0, 0, nr);
      decode_rows(w, qweight, n0, n0 + nr, p);
      at::Tensor o = out_t.narrow(0, n0, nr);
      at::mm_out(o, p, xin.t());
    }
    return out_t.t().to(xt).contiguous().view(out_shape);
  }
  at::Tensor x2 = x.reshape({M, K});
  if (!x2.is_contiguous() || (xt != at::kFloat && xt != at::kBFloat16 && xt != at::kHalf))
    x2 = x2.to(xt == at::kBFloat16 || xt == at::kHalf ? xt : at::kFloat).contiguous();
  at::Tensor xp = at::empty({M, w.K_pad}, x.options().dtype(at::kFloat));
  at::Tensor xsum;
  if (w.offsets.defined()) xsum = at::empty({M, w.ng}, x.options().dtype(at::kFloat));
  float* xs = xsum.defined() ? xsum.data_ptr<float>() : nullptr;
  switch (x2.scalar_type()) {
    case at::kBFloat16:
      permute_x(x2.data_ptr<c10::BFloat16>(), M, K, w.K_pad, w.G, w.ng, xp.data_ptr<float>(), xs);
      break;
    case at::kHalf:
      permute_x(x2.data_ptr<c10::Half>(), M, K, w.K_pad, w.G, w.ng, xp.data_ptr<float>(), xs);
      break;
    default:
      permute_x(x2.data_ptr<float>(), M, K, w.K_pad, w.G, w.ng, xp.data_ptr<float>(), xs);
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  GemmArgs a;
  a.qw = qweight.data_ptr<uint8_t>();
  a.bits = w.bits;
  a.K = K;
  a.N = N;
  a.K_pad = w.K_pad;
  a.N_pad = w.N_pad;
  a.nblocks = w.nblocks;
  a.x = xp.data_ptr<float>();
  a.M = M;
  a.scales = w.scales.data_ptr();
  a.offsets = w.offsets.defined() ? w.offsets.data_ptr() : nullptr;
  a.stype = w.stype;
  a.ng = w.ng;
  a.cpg = w.ng == 1 ? w.K_pad / 32 : w.G / 32;
  a.ngp = w.K_pad / 32 / a.cpg + 2;
  a.xsum = xs;
  a.table = w.table.data_ptr<float>();
  a.out = out.data_ptr<float>();
  const GemmFn fn = gemm_fn(isa);
  const int64_t tiles = w.N_pad / 4;
  // ~64K weights per task at least, so small layers run on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(w.K_pad, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  if (xt != at::kFloat) out = out.to(xt);
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flute, m) {
  m.def("cpu_lut_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, Tensor table, "
        "int bits, int group_size, int in_features, int out_features) -> Tensor");
  m.def("cpu_lut_dequantize(Tensor qweight, Tensor scales, Tensor? offsets, Tensor table, "
        "int bits, int group_size, int in_features, int out_features) -> Tensor");
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_set_isa(str name) -> str", &cpu_set_isa);
}

TORCH_LIBRARY_IMPL(flute, CPU, m) {
  m.impl("cpu_lut_gemm", &cpu_lut_gemm);
  m.impl("cpu_lut_dequantize", &cpu_lut_dequantize);
}

// `from . import _cpu` only needs a module object; the registrations above run at load time.
PyMODINIT_FUNC PyInit__cpu(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_cpu", "flute CPU lookup-table kernels", -1,
                            nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
