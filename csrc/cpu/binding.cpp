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
//       (FLUTE_CPU_MODE=bf16; AVX512_BF16 CPUs only, other paths stay exact).
//
// Paths: M < kLargeM and groups of a multiple of 32 columns (or one group): the fused kernel, in
// the int8 mode (finite x) or exact fp32 (activations converted to fp32 and
// chunk-permuted once per call), threads over row tiles (for_tiles). Otherwise: rows
// decoded in panels (fp32, or bf16 for bf16 activations on CPUs with native bf16) and multiplied by
// at::mm (oneDNN/MKL), exactly.
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
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "lut_kernel.h"

namespace {

using namespace flute_cpu;

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

// Activation rows from which the panel path (decode + at::mm) is used (FLUTE_CPU_LARGE_M
// overrides, for tuning).
int64_t large_m() {
  static const int64_t v = [] {
    const char* env = std::getenv("FLUTE_CPU_LARGE_M");
    const long m = env ? std::atol(env) : 0;
    return m > 0 ? int64_t(m) : int64_t(32);
  }();
  return v;
}
// Bytes of one decoded panel: it should stay in L2 between the decode and the multiply
// (FLUTE_CPU_PANEL_KB overrides, for tuning).
int64_t panel_bytes() {
  static const int64_t v = [] {
    const char* env = std::getenv("FLUTE_CPU_PANEL_KB");
    const long kb = env ? std::atol(env) : 0;
    return kb > 0 ? int64_t(kb) << 10 : int64_t(4096) << 10;
  }();
  return v;
}

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

bool detect_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  return g_best == kAvx512 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const bool g_has_bf16 = detect_bf16();

// Arithmetic mode of the fused kernel: 0 = exact (fp32), 1 = bf16 (opt-in, AVX512_BF16 CPUs), 2 = int8
// (the default: int8 activations and a 7-bit table; see Int8Args).
const char* const kModeNames[] = {"exact", "bf16", "int8"};

int parse_mode(const char* name) {
  for (int i = 0; i < 3; ++i)
    if (name && std::string(name) == kModeNames[i]) return i;
  return -1;
}

// The default is int8: its measured perplexity cost on SmolLM2 is within +-0.5% for every usable
// 2-, 3- and 4-bit model (benchmarks/results/int8-quality-*.json), the bar for a default.
std::atomic<int> g_mode{[] {
  const int m = parse_mode(std::getenv("FLUTE_CPU_MODE"));
  return m >= 0 ? m : 2;
}()};

std::string cpu_mode() { return kModeNames[g_mode.load()]; }

std::string cpu_set_mode(const std::string& name) {
  const int i = parse_mode(name.c_str());
  TORCH_CHECK(i >= 0, "flute: unknown CPU mode '", name, "' (exact, bf16 or int8)");
  g_mode.store(i);
  return cpu_mode();
}

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
  if (isa == kAvx2) return decode_avx2;
#endif
  return decode_portable;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Weight {
  int bits;
  int64_t K, N, K_pad, N_pad, nblocks, G, ng;
  at::Tensor scales, offsets, table, qweight;
  int stype;
};

std::string layout_error(const at::Tensor& qweight, int64_t bits, int64_t K, int64_t N) {
  const int64_t cpu = ceil_div(N, 4) * 4 * ceil_div(K, bits == 4 ? 128 : 256) * (bits == 4 ? 128 : 256) * bits / 8;
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
  const int64_t kb = bits == 4 ? 128 : 256;
  w.K_pad = ceil_div(K, kb) * kb;
  w.N_pad = ceil_div(N, 4) * 4;
  w.nblocks = w.K_pad / kb;
  w.G = group_size == -1 ? K : group_size;
  w.ng = ceil_div(K, w.G);
  const int64_t bytes = w.N_pad * w.K_pad * bits / 8;
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
  // (~1 us), and small layers are dominated by such fixed costs.
  const auto contig = [](const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); };
  at::Tensor s = scales;
  const auto st = s.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) s = s.to(at::kFloat);
  w.stype = s.scalar_type() == at::kFloat ? kF32 : s.scalar_type() == at::kBFloat16 ? kBF16 : kF16;
  w.scales = contig(s);
  if (offsets.has_value() && offsets->defined())
    w.offsets = contig(offsets->scalar_type() == s.scalar_type() ? *offsets : offsets->to(s.scalar_type()));
  w.table = contig(table.scalar_type() == at::kFloat ? table : table.to(at::kFloat));
  w.qweight = contig(qweight);
  return w;
}

DecodeArgs decode_args(const Weight& w, const at::Tensor& qweight) {
  DecodeArgs d;
  d.qw = w.qweight.data_ptr<uint8_t>();
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
  // bf16 scales: bf16 out (rounded once from the fp32 value), anything else: fp32 out.
  const auto dt = scales.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  at::Tensor out = at::empty({N, K}, scales.options().dtype(dt));
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

// bf16 activations for the bf16 mode, [K_pad/32][M][32] (natural order in a chunk), zero beyond K.
template <typename T>
void bf16_x(const T* x, int64_t M, int64_t K, int64_t K_pad, uint16_t* xb) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    for (int64_t k = 0; k < K_pad; ++k) {
      uint16_t v = 0;
      if (k < K) {
        if constexpr (std::is_same_v<T, c10::BFloat16>) v = xr[k].x;
        else v = f32_to_bf16(static_cast<float>(xr[k]));
      }
      xb[((k >> 5) * M + m) * 32 + (k & 31)] = v;
    }
  }
}

// The int8 mode's activations (see Int8Args): each block of each row through the ISA's QuantXFn
// (per 32-column chunk, scale = max|x| / 127 and x8 = round(x / scale), stored in the kernel's
// byte order with the per-dword corrections and scales); exact group sums when there are offsets.
// False (nothing usable) when x holds a NaN or an Inf: the caller then takes the exact path, which
// propagates them as the float math would.
template <typename T>
bool int8_x(const T* x, int64_t M, const Weight& w, QuantXFn quant, int8_t* xq, int16_t* xcorr,
            int16_t* xk, float* xu, float* xsum) {
  const int bits = w.bits, P = int8_parts(bits), cols = 64 * P;
  const int64_t K = w.K, nb = w.nblocks;
  alignas(32) float xf[256];
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    for (int64_t b = 0; b < nb; ++b) {
      const float* src = xf;
      if (std::is_same_v<T, float> && (b + 1) * cols <= K) {
        src = reinterpret_cast<const float*>(xr + b * cols);  // a whole block of fp32: no copy
      } else {
        for (int c = 0; c < cols; ++c) {
          const int64_t k = b * cols + c;
          xf[c] = k < K ? static_cast<float>(xr[k]) : 0.f;
        }
      }
      const int64_t bm = b * M + m;
      if (!quant(src, bits, xq + bm * cols, xcorr + bm * P * 16, xk + bm * P * 16, xu + bm)) return false;
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

// The int8 mode's table: 7-bit integers t7 (stored as u = t7 + 64) times one scale. The scale is
// max|t| / d for the d in [8, 63] (steps of 1/16) with the least squared rounding error, the
// largest d on ties: uniform tables (int, fp4) become exact (d = 8 for the int table), and NF4's
// error drops below max|t| / 126. flute.testing.reference_qgemm_int8 makes the same choice.
struct Table7 {
  uint8_t tu[16];
  float scale;
};

Table7 quantize_table7(const float* t, int n) {
  Table7 r{};
  float tmax = 0.f;
  for (int c = 0; c < n; ++c) tmax = std::max(tmax, std::fabs(t[c]));
  r.scale = 0.f;
  double best = 0.;
  for (int i = 0; i <= (63 - 8) * 16 && tmax > 0.f; ++i) {
    const float sc = static_cast<float>(tmax / (63.0 - i / 16.0));
    double err = 0.;
    for (int c = 0; c < n; ++c) {
      const float v = std::max(-63.f, std::min(63.f, std::nearbyint(t[c] / sc)));
      const double e = static_cast<double>(t[c]) - static_cast<double>(v) * sc;
      err += e * e;
    }
    if (i == 0 || err < best * (1 - 1e-9)) {  // strictly better by a margin: ties keep the larger d
      best = err;
      r.scale = sc;
    }
  }
  for (int c = 0; c < 16; ++c) {
    const float v = c < n && r.scale > 0.f ? std::nearbyint(t[c] / r.scale) : 0.f;
    r.tu[c] = static_cast<uint8_t>(64 + static_cast<int>(std::max(-63.f, std::min(63.f, v))));
  }
  return r;
}

// quantize_table7 costs ~10 us (881 candidate scales); a model reuses its tables every call, so the
// results are cached per thread by the table's bytes (a fixed-size key: no allocation per lookup).
struct TableKey {
  uint32_t words[16];
  int n;
  bool operator==(const TableKey& o) const {
    return n == o.n && std::memcmp(words, o.words, sizeof(words)) == 0;
  }
};

struct TableKeyHash {
  size_t operator()(const TableKey& k) const {
    uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(k.n);
    for (int i = 0; i < k.n; ++i) h = (h ^ k.words[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

const Table7& table7(const float* t, int n) {
  thread_local std::unordered_map<TableKey, Table7, TableKeyHash> cache;
  TableKey key{};
  key.n = n;
  std::memcpy(key.words, t, n * sizeof(float));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() > 4096) cache.clear();
  return cache.emplace(key, quantize_table7(t, n)).first->second;
}

// fn(t0, t1) over the row tiles [0, tiles), at least `grain` tiles per call of fn. Large calls:
// threads take chunks of tiles from a shared counter (dynamic balancing, as llama.cpp's CPU backend
// does) rather than one static share each, because on a shared or virtualized machine one core is
// often slowed down and a static split waits for it (measured, 14336x4096 4-bit M=1, 2 threads:
// 2.27 -> 2.12 ms on a quiet VM, 5.59 -> 4.48 ms with the other core busy). Small calls keep the
// static split (chunks under 4 grains cost more than they balance: 1536x576 67 -> 76 us).
template <typename F>
void for_tiles(int64_t tiles, int64_t grain, const F& fn) {
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || tiles <= grain) {
    fn(0, tiles);
    return;
  }
  const int64_t chunk = std::max<int64_t>(4 * grain, tiles / (8 * nt));
  if (tiles < 2 * nt * chunk) {
    at::parallel_for(0, tiles, grain, fn);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t t0 = next.fetch_add(chunk); t0 < tiles; t0 = next.fetch_add(chunk))
      fn(t0, std::min(tiles, t0 + chunk));
  });
}

// Bytes from `off` rounded up to a 64-byte boundary (the int8 scratch buffer's parts).
int64_t align64(int64_t off) { return (off + 63) / 64 * 64; }

// The int8 mode's product into out [M, N] fp32; false when x is not finite (see int8_x).
bool int8_gemm(const at::Tensor& x2, const Weight& w, int isa, at::Tensor& out) {
  const int64_t M = x2.size(0), nb = w.nblocks;
  const int P = int8_parts(w.bits), C = chunks_per_block(w.bits);
  // One scratch allocation per call (small calls are dominated by fixed costs): activations,
  // their corrections and scales, group sums and the scale map.
  const int64_t o_corr = align64(nb * M * 64 * P), o_k = align64(o_corr + nb * M * P * 16 * 2),
                o_u = align64(o_k + nb * M * P * 16 * 2), o_sum = align64(o_u + nb * M * 4),
                o_g0 = align64(o_sum + M * w.ng * 4),
                o_gidx = align64(o_g0 + nb * 8), total = o_gidx + nb * P * 8 * 4;
  at::Tensor scratch = at::empty({total + 64}, x2.options().dtype(at::kByte));
  char* base = reinterpret_cast<char*>(align64(reinterpret_cast<intptr_t>(scratch.data_ptr())));
  int8_t* xq = reinterpret_cast<int8_t*>(base);
  int16_t* xcorr = reinterpret_cast<int16_t*>(base + o_corr);
  int16_t* xk = reinterpret_cast<int16_t*>(base + o_k);
  float* xu = reinterpret_cast<float*>(base + o_u);
  float* xs = w.offsets.defined() ? reinterpret_cast<float*>(base + o_sum) : nullptr;
  int64_t* g0 = reinterpret_cast<int64_t*>(base + o_g0);
  int32_t* gidx = reinterpret_cast<int32_t*>(base + o_gidx);
  QuantXFn quant = quantize_x_int8_portable;
  Int8Fn fn = gemm_int8_portable;
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= kAvx2) {
    quant = quantize_x_int8_avx2;
    fn = gemm_int8_avx2;
  }
#endif
  bool ok;
  switch (x2.scalar_type()) {
    case at::kBFloat16: ok = int8_x(x2.data_ptr<c10::BFloat16>(), M, w, quant, xq, xcorr, xk, xu, xs); break;
    case at::kHalf: ok = int8_x(x2.data_ptr<c10::Half>(), M, w, quant, xq, xcorr, xk, xu, xs); break;
    default: ok = int8_x(x2.data_ptr<float>(), M, w, quant, xq, xcorr, xk, xu, xs);
  }
  if (!ok) return false;
  // The scale map: no division per tile in the kernel.
  for (int64_t b = 0; b < nb; ++b) {
    g0[b] = std::min<int64_t>(b * C * 32 / w.G, w.ng - 1);
    for (int p = 0; p < P; ++p)
      for (int q = 0; q < 4; ++q) {
        const int64_t g = std::min<int64_t>((b * C + (P * q + p) % C) * 32 / w.G, w.ng - 1);
        gidx[(b * P + p) * 8 + q] = gidx[(b * P + p) * 8 + 4 + q] = static_cast<int32_t>(g - g0[b]);
      }
  }
  Int8Args a;
  a.qw = w.qweight.data_ptr<uint8_t>();
  a.bits = w.bits;
  a.N = w.N;
  a.nblocks = nb;
  a.M = M;
  a.xq = xq;
  a.xcorr = xcorr;
  a.xk = xk;
  a.xu = xu;
  // Parts added as int32 when their dwords meet the same weight groups: part p of dword q meets
  // chunk (P * q + p) % C, so parts 0-1 (and 2-3) of a dword cover one 64-aligned span of 64
  // columns, and parts 0-3 (2 and 3 bits) one 128-aligned span of 128.
  a.merge = 1;
  if (w.ng == 1 || w.G % 64 == 0) a.merge = 2;
  if (w.bits != 4 && (w.ng == 1 || w.G % 128 == 0)) a.merge = 4;
  a.scales = w.scales.data_ptr();
  a.offsets = w.offsets.defined() ? w.offsets.data_ptr() : nullptr;
  a.stype = w.stype;
  a.ng = w.ng;
  a.G = w.G;
  a.xsum = xs;
  a.g0 = g0;
  a.gidx = gidx;
  const Table7& t7 = table7(w.table.data_ptr<float>(), 1 << w.bits);
  std::memcpy(a.tu, t7.tu, 16);
  a.tscale = t7.scale;
  a.out = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(w.K_pad, 1));
  for_tiles(w.N_pad / 4, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  return true;
}

// The fused kernel's exact (fp32) or bf16 mode into out [M, N] fp32.
void exact_gemm(const at::Tensor& x2, const Weight& w, int isa, at::Tensor& out) {
  const int64_t M = x2.size(0);
  at::Tensor xp = at::empty({M, w.K_pad}, x2.options().dtype(at::kFloat));
  at::Tensor xsum;
  if (w.offsets.defined()) xsum = at::empty({M, w.ng}, x2.options().dtype(at::kFloat));
  float* xs = xsum.defined() ? xsum.data_ptr<float>() : nullptr;
  switch (x2.scalar_type()) {
    case at::kBFloat16:
      permute_x(x2.data_ptr<c10::BFloat16>(), M, w.K, w.K_pad, w.G, w.ng, xp.data_ptr<float>(), xs);
      break;
    case at::kHalf:
      permute_x(x2.data_ptr<c10::Half>(), M, w.K, w.K_pad, w.G, w.ng, xp.data_ptr<float>(), xs);
      break;
    default:
      permute_x(x2.data_ptr<float>(), M, w.K, w.K_pad, w.G, w.ng, xp.data_ptr<float>(), xs);
  }
  GemmFn fn = gemm_fn(isa);
  at::Tensor xb;
#if defined(__x86_64__) || defined(_M_X64)
  if (g_mode.load() == 1 && g_has_bf16 && isa == kAvx512) {
    xb = at::empty({w.K_pad * M}, x2.options().dtype(at::kShort));
    auto* dst = reinterpret_cast<uint16_t*>(xb.data_ptr<int16_t>());
    switch (x2.scalar_type()) {
      case at::kBFloat16: bf16_x(x2.data_ptr<c10::BFloat16>(), M, w.K, w.K_pad, dst); break;
      case at::kHalf: bf16_x(x2.data_ptr<c10::Half>(), M, w.K, w.K_pad, dst); break;
      default: bf16_x(x2.data_ptr<float>(), M, w.K, w.K_pad, dst);
    }
    fn = gemm_avx512bf16;
  }
#endif
  GemmArgs a;
  a.xb = xb.defined() ? reinterpret_cast<const uint16_t*>(xb.data_ptr<int16_t>()) : nullptr;
  a.qw = w.qweight.data_ptr<uint8_t>();
  a.bits = w.bits;
  a.K = w.K;
  a.N = w.N;
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
  const int64_t tiles = w.N_pad / 4;
  // ~64K weights per task at least, so small layers run on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(w.K_pad, 1));
  for_tiles(tiles, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
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
  const int isa = g_isa.load();
  const bool fused = w.G % 32 == 0 || w.ng == 1;
  if (!fused || M >= large_m()) {
    // Panel path: decode a few rows at a time, let at::mm (oneDNN / MKL) multiply.
    // bf16 panels only where the CPU multiplies bf16 natively (AVX512_BF16 / AMX): elsewhere oneDNN
    // emulates it and fp32 is ~3.5x faster (14336x4096 M=64 on an AVX2 Zen 3: 346 vs 99 ms).
    const auto pdt = (xt == at::kBFloat16 && M >= large_m() && g_has_bf16) ? at::kBFloat16 : at::kFloat;
    const at::Tensor xin = x.reshape({M, K}).to(pdt).contiguous();
    const int64_t esz = pdt == at::kBFloat16 ? 2 : 4;
    const int64_t rows = std::min<int64_t>(N, std::max<int64_t>(16, panel_bytes() / (K * esz)) / 4 * 4);
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
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (!(g_mode.load() == 2 && int8_gemm(x2, w, isa, out))) exact_gemm(x2, w, isa, out);
  // Output in x's dtype, converted here (one fewer dispatched op per call: ~5-10 us on small layers).
  if (xt == at::kBFloat16 || xt == at::kHalf) {
    at::Tensor y = at::empty(out_shape, x.options());
    const float* src = out.data_ptr<float>();
    const int64_t total = M * N;
    if (xt == at::kBFloat16) {
      auto* dst = y.data_ptr<c10::BFloat16>();
      for (int64_t i = 0; i < total; ++i) dst[i] = c10::BFloat16(src[i]);
    } else {
      auto* dst = y.data_ptr<c10::Half>();
      for (int64_t i = 0; i < total; ++i) dst[i] = c10::Half(src[i]);
    }
    return y;
  }
  if (xt != at::kFloat) out = out.to(xt);
  return out.view(out_shape);
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
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flute::qgemm", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, const at::Tensor&,
                                           int64_t, int64_t, int64_t, int64_t)>();
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
  m.def("cpu_has_bf16() -> bool", [] { return g_has_bf16; });
}

TORCH_LIBRARY_IMPL(flute, CPU, m) {
  m.impl("qgemm", &qgemm_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("cpu_lut_gemm", &cpu_lut_gemm);
  m.impl("cpu_lut_dequantize", &cpu_lut_dequantize);
}

// `from . import _cpu` only needs a module object; the registrations above run at load time.
PyMODINIT_FUNC PyInit__cpu(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_cpu", "flute CPU lookup-table kernels", -1,
                            nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
