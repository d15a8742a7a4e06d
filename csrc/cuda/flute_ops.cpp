// The torch binding: CUDA implementations of torch.ops.flute.qgemm / flute::dequantize.
//
// The schemas are defined in Python (flute/ops.py) before this module is imported; here we only
// register the CUDA kernels for them. Every input is validated with TORCH_CHECK; launches go to
// the current stream under a device guard; the Stream-K workspace is persistent per device and
// stream (torch caching allocator, zeroed once), so a call allocates nothing but its output and
// is safe under CUDA-graph capture and on several streams. The kernels are
// reached through the plain C++ header flute_launch.h only.
//
// Python-version-independent: no pybind11, only the CPython stable ABI (Py_LIMITED_API, set by
// setup.py) for the empty module object that `import flute._C` needs; the ops are registered by
// TORCH_LIBRARY_IMPL's static initializer when the library is loaded. Only c10/cuda headers (no
// ATen/cuda/CUDAContext.h, which needs cuBLAS/cuSPARSE headers that a plain toolkit lacks).
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "flute_launch.h"

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

flute::DTypeId dtype_id(at::ScalarType t) {
  return t == at::kBFloat16 ? flute::DTypeId::kBFloat16 : flute::DTypeId::kHalf;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "flute: ", what, " failed: ", cudaGetErrorString(err));
}

struct Weight {
  at::Tensor qweight, scales, table;
  std::optional<at::Tensor> offsets;
  int bits, group, ngroups, K, N;
};

// Validate the quantized-weight arguments (mirrors flute/ops.py: check_weight_args) and return
// them ready for the kernels (table as contiguous float32).
Weight check_weight(const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& offsets, const at::Tensor& table, int64_t bits,
                    int64_t group_size, int64_t in_features, int64_t out_features) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "flute: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(group_size == -1 || group_size >= 1,
              "flute: group_size must be positive or -1, got ", group_size);
  TORCH_CHECK(in_features >= 1 && out_features >= 1 && in_features < (1 << 30) &&
                  out_features < (1 << 30),
              "flute: in_features and out_features must be in [1, 2^30), got ", in_features,
              " and ", out_features);
  const int64_t group = group_size == -1 ? in_features : group_size;
  const int64_t ngroups = ceil_div(in_features, group);

  TORCH_CHECK(qweight.is_cuda(), "flute: qweight must be a CUDA tensor, got ", qweight.device());
  TORCH_CHECK(qweight.scalar_type() != at::kByte,
              "flute: qweight is in the CPU layout (uint8); on a GPU the op takes the GPU kernel "
              "layout (int32): rebuild it with flute.cpu_layout.device_layout(codes, bits, device) "
              "or move the QuantLinear with .to(device), which does so");
  TORCH_CHECK(qweight.scalar_type() == at::kInt, "flute: qweight must be int32, got ",
              qweight.scalar_type());
  const int64_t words = flute::layout_words((int)bits, in_features, out_features);
  TORCH_CHECK(qweight.dim() == 1 && qweight.numel() == words,
              "flute: qweight must have shape (", words, ",) (the kernel layout of a ",
              out_features, "x", in_features, " ", bits, "-bit weight), got ", qweight.sizes());
  TORCH_CHECK(qweight.is_contiguous(), "flute: qweight must be contiguous");
  TORCH_CHECK(aligned(qweight, 16), "flute: qweight must be 16-byte aligned");

  TORCH_CHECK(scales.device() == qweight.device(), "flute: scales is on ", scales.device(),
              " but qweight is on ", qweight.device());
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16,
              "flute: on CUDA, scales must be float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out_features && scales.size(1) == ngroups,
              "flute: scales must have shape (", out_features, ", ", ngroups, "), got ",
              scales.sizes());
  TORCH_CHECK(scales.is_contiguous(), "flute: scales must be contiguous");
  TORCH_CHECK(aligned(scales, 4), "flute: scales must be 4-byte aligned");
  if (offsets.has_value()) {
    const at::Tensor& o = *offsets;
    TORCH_CHECK(o.device() == qweight.device(), "flute: offsets is on ", o.device(),
                " but qweight is on ", qweight.device());
    TORCH_CHECK(o.scalar_type() == scales.scalar_type() && o.sizes() == scales.sizes(),
                "flute: offsets must match scales (", scales.scalar_type(), " ", scales.sizes(),
                "), got ", o.scalar_type(), " ", o.sizes());
    TORCH_CHECK(o.is_contiguous(), "flute: offsets must be contiguous");
    TORCH_CHECK(aligned(o, 4), "flute: offsets must be 4-byte aligned");
  }
  TORCH_CHECK(table.device() == qweight.device(), "flute: table is on ", table.device(),
              " but qweight is on ", qweight.device());
  TORCH_CHECK(at::isFloatingType(table.scalar_type()) && table.numel() == (int64_t(1) << bits),
              "flute: table must be floating point with ", int64_t(1) << bits,
              " entries for bits=", bits, ", got ", table.scalar_type(), " with ", table.numel());

  Weight w;
  w.qweight = qweight;
  w.scales = scales;
  w.offsets = offsets;
  w.table = table.reshape({-1}).to(at::kFloat).contiguous();
  w.bits = (int)bits;
  w.group = (int)group;
  w.ngroups = (int)ngroups;
  w.K = (int)in_features;
  w.N = (int)out_features;
  return w;
}

// FLUTE_CUDA_MAX_CTAS_PER_SM (1..4, unset = the heuristic): a tuning experiment's cap on resident
// CTAs per SM, read once per process (benchmarks/device_tune.py runs each value in its own).
int max_ctas_per_sm_from_env() {
  static const int value = [] {
    const char* s = std::getenv("FLUTE_CUDA_MAX_CTAS_PER_SM");
    if (s == nullptr || *s == '\0') return 0;
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    TORCH_CHECK(end != s && *end == '\0' && v >= 1 && v <= 4,
                "flute: FLUTE_CUDA_MAX_CTAS_PER_SM must be 1, 2, 3 or 4, got '", s, "'");
    return (int)v;
  }();
  return value;
}

const void* offsets_ptr(const Weight& w) {
  return w.offsets.has_value() ? w.offsets->data_ptr() : nullptr;
}

// The Stream-K workspace: one per (device, stream), from the torch caching allocator, sized for
// every plan on the device and zeroed once. Each launch leaves its flags zero again (the owner of
// a split tile resets the flags it consumes), so no per-call fill kernel. Per stream, because two
// launches running concurrently must not share flags. A first use inside CUDA-graph capture
// allocates from the graph's pool and records the zeroing into the graph (harmless: the memory is
// kept alive here, and the replayed memset only re-zeroes flags that are zero).
at::Tensor& stream_workspace(const at::Device& device, cudaStream_t stream) {
  static std::mutex mutex;
  // Never destroyed: freeing CUDA memory from a static destructor at exit can outlive the allocator.
  static auto* workspaces = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& ws = (*workspaces)[{(int)device.index(), stream}];
  if (!ws.defined()) {
    size_t bytes = 0;
    check_cuda(flute::qgemm_max_workspace_bytes(device.index(), &bytes), "workspace size query");
    ws = at::zeros({(int64_t)bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  }
  return ws;
}

at::Tensor dequantize_into_new(const Weight& w, cudaStream_t stream) {
  at::Tensor out = at::empty({w.N, w.K}, w.scales.options());
  check_cuda(flute::dequant_run(w.bits, dtype_id(w.scales.scalar_type()), w.qweight.data_ptr(),
                                w.scales.data_ptr(), offsets_ptr(w), w.table.data_ptr<float>(),
                                out.data_ptr(), w.N, w.K, w.group, w.ngroups, stream),
             "dequantize kernel launch");
  return out;
}

at::Tensor qgemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& offsets, const at::Tensor& table,
                      int64_t bits, int64_t group_size, int64_t in_features, int64_t out_features) {
  const Weight w = check_weight(qweight, scales, offsets, table, bits, group_size, in_features,
                                out_features);
  TORCH_CHECK(x.is_cuda() && x.device() == qweight.device(), "flute: x is on ", x.device(),
              " but the weight is on ", qweight.device());
  TORCH_CHECK(x.scalar_type() == scales.scalar_type(), "flute: on CUDA, x (", x.scalar_type(),
              ") must have the dtype of scales (", scales.scalar_type(), ")");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features,
              "flute: x must have last dimension in_features=", in_features, ", got shape ",
              x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor x2 = x.reshape({-1, in_features});
  const int64_t M = x2.size(0);
  TORCH_CHECK(M < (int64_t(1) << 31), "flute: too many rows in x: ", M);
  if (M == 0) return at::empty(out_shape, x.options());

  flute::QGemmProblem prob;
  prob.M = (int)M;
  prob.N = w.N;
  prob.K = w.K;
  prob.bits = w.bits;
  prob.group = w.group;
  prob.ngroups = w.ngroups;
  prob.has_offsets = w.offsets.has_value();
  prob.dtype = dtype_id(x.scalar_type());
  prob.max_ctas_per_sm = max_ctas_per_sm_from_env();
  flute::QGemmPlan plan;
  check_cuda(flute::qgemm_plan(prob, x.device().index(), &plan), "qgemm_plan");

  if (plan.path == flute::QGemmPlan::kDequantMatmul) {
    // Prefill / unsupported group size: dequantize into scratch, then cuBLAS.
    at::Tensor wd = dequantize_into_new(w, stream);
    return at::matmul(x2, wd.t()).reshape(out_shape);
  }

  // The kernel reads x rows with 16-byte cp.async: unit column stride, a row stride that is a
  // multiple of 8 elements, a 16-byte aligned base, and zeros in columns K..roundup(K, 8).
  const int64_t k8 = ceil_div(in_features, 8) * 8;
  if (k8 != in_features) {
    x2 = at::constant_pad_nd(x2, {0, k8 - in_features}, 0);
  } else if (x2.stride(1) != 1 || (M > 1 && x2.stride(0) % 8 != 0) || !aligned(x2, 16)) {
    x2 = x2.contiguous();
    if (!aligned(x2, 16)) x2 = x2.clone();
  }
  const int64_t ldx = M > 1 ? x2.stride(0) : k8;
  TORCH_CHECK(x2.stride(1) == 1 && ldx % 8 == 0 && aligned(x2, 16) && ldx < (int64_t(1) << 31),
              "flute: internal error preparing x");

  at::Tensor y = at::empty({M, out_features}, x.options());
  at::Tensor& ws = stream_workspace(x.device(), stream);
  TORCH_CHECK((size_t)ws.numel() >= plan.workspace_bytes, "flute: internal error: workspace of ",
              ws.numel(), " bytes, the plan needs ", plan.workspace_bytes);
  check_cuda(flute::qgemm_run(prob, plan, x2.data_ptr(), (int)ldx, w.qweight.data_ptr(),
                              w.scales.data_ptr(), offsets_ptr(w), w.table.data_ptr<float>(),
                              y.data_ptr(), ws.data_ptr(), stream),
             "qgemm kernel launch");
  return y.reshape(out_shape);
}

at::Tensor dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& offsets, const at::Tensor& table,
                           int64_t bits, int64_t group_size, int64_t in_features,
                           int64_t out_features) {
  const Weight w = check_weight(qweight, scales, offsets, table, bits, group_size, in_features,
                                out_features);
  c10::cuda::CUDAGuard guard(qweight.device());
  return dequantize_into_new(w, c10::cuda::getCurrentCUDAStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(flute, CUDA, m) {
  m.impl("qgemm", &qgemm_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

// `from . import _C` only needs a module object; the registrations above run at load time.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "flute CUDA kernels", -1, nullptr,
                            nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
