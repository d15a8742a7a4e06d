// flute::bf16_gemv on CPU (the schema is flute/ops.py's): x @ weight.T for an unquantized bf16
// weight, in fp32 (dense_gemv.h: the kernels and their arithmetic). For the one-row products of the
// layers quantization leaves in 16 bits (flute.linear.GemvLinear); any M works, each row reading
// the weight again, so large M belongs to torch's mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "binding.h"
#include "dense_gemv.h"
#include "lut_kernel.h"

namespace {
using namespace flute_cpu;
using namespace flute_cpu::binding;

using GemvFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*, bool);

GemvFn gemv_fn(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAvx512) return gemv_bf16_avx512;
  if (isa >= kAvx2) return gemv_bf16_avx2;
#endif
  (void)isa;
  return gemv_bf16_portable;
}

at::Tensor bf16_gemv_cpu(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2,
                    "flute: bf16_gemv's weight must be a 2-D bfloat16 tensor, got ", weight.scalar_type(), " ",
                    weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  const auto xt = x.scalar_type();
  TORCH_CHECK_VALUE(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
                    "flute: bf16_gemv's x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "flute: bf16_gemv's x must have last dimension ", K,
                    " (the weight's columns), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(),
                    "flute: bf16_gemv's CPU kernel takes CPU tensors, got x on ", x.device(), " and the weight on ",
                    weight.device());
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  int64_t M = 1;  // rows: the leading dimensions (x.numel() / K fails at K = 0)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  // borrowed where contiguous (no reference taken: see binding.h, Weight)
  const c10::MaybeOwned<at::Tensor> wm = weight.expect_contiguous(), xm = x.expect_contiguous();
  const at::Tensor &wc = *wm, &xc = *xm;
  const int64_t kp = dense_k_pad(K);
  // scratch: x as fp32 in the kernels' order [M][kp], a row of it widened first (16-bit x), and
  // the fp32 result of a 16-bit x
  const int64_t o_row = align64(M * kp * 4), o_out = align64(o_row + K * 4);
  at::Tensor hold;
  char* base = call_scratch(0, o_out + (xt == at::kFloat ? 0 : M * N * 4), hold);
  float* xp = reinterpret_cast<float*>(base);
  float* row = reinterpret_cast<float*>(base + o_row);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = row;
    if (xt == at::kFloat) {
      src = xc.data_ptr<float>() + m * K;
    } else if (xt == at::kBFloat16) {
      bf16_to_f32_fn(active_isa())(reinterpret_cast<const uint16_t*>(xc.data_ptr()) + m * K, row, K);
    } else {
      const c10::Half* xh = xc.data_ptr<c10::Half>() + m * K;
      for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(xh[k]);
    }
    dense_permute_x(src, K, xp + m * kp);
  }
  float* out = xt == at::kFloat ? y.data_ptr<float>() : reinterpret_cast<float*>(base + o_out);
  const GemvFn fn = gemv_fn(active_isa());
  const auto* w = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  // rows per task: at least 128 KB of the weight (each task's start costs more than its rows)
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 16) / K);
  const bool two = cpu_tile_pairs();
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fn(w, K, xp, M, N, n0, n1, out, two); });
  if (xt != at::kFloat) {
    HalfOut h;
    h.dst = y.data_ptr();
    h.bf16 = xt == at::kBFloat16;
    h.isa = active_isa();
    to_half(out, h, 0, M * N);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(flute, CPU, m) { m.impl("bf16_gemv", &bf16_gemv_cpu); }
