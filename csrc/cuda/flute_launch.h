// Plain C++ interface to the flute CUDA kernels: the torch binding (flute_ops.cpp) includes this and
// nothing else from csrc/cuda, so kernel files never see torch headers and vice versa. Every
// geometric number behind it comes from LayoutTraits / GemmConfig (flute_config.cuh).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace flute {

enum class DTypeId : int { kHalf = 0, kBFloat16 = 1 };

// One qgemm problem: y[M, N] = x[M, K] @ W[N, K]^T.
struct QGemmProblem {
  int M, N, K;
  int bits;            // 2, 3, 4
  int group;           // effective group size (K when the op got -1)
  int ngroups;         // ceil(K / group)
  bool has_offsets;
  DTypeId dtype;
  // Tuning experiment: at most this many resident CTAs per SM (1..4; 0 = the heuristic's own).
  // The binding reads it once per process from FLUTE_CUDA_MAX_CTAS_PER_SM: the per-device cache of
  // pipeline choices assumes it never changes within a process.
  int max_ctas_per_sm = 0;
};

// What qgemm_plan decided; pass it unchanged to qgemm_run.
struct QGemmPlan {
  enum Path : int { kFused = 0, kDequantMatmul = 1 };
  Path path = kFused;
  int m_tiles16 = 1;        // m16 tiles per CTA tile: 1, 2, 4 (batch tile of 16, 32, 64 rows)
  int stages = 0;           // cp.async pipeline depth
  int grid = 0;             // CTAs (all resident at once)
  int smem_bytes = 0;       // dynamic shared memory per CTA
  int m_tiles = 0, n_tiles = 0, k_tiles = 0;
  int dp_tiles = 0, split = 1, sk_units = 0, partial_slots = 0;  // Stream-K (flute_config.cuh)
  size_t workspace_bytes = 0;  // flags (partial_slots ints at offset 0), then fp32 partials
  size_t partials_offset = 0;  // byte offset of the partials: fixed per device (flags never move)
  const char* reason = "";     // why the dequantize + matmul path was chosen
};

// Above this many rows of x, dequantize into a scratch W and call cuBLAS (prefill): the fused
// kernel re-dequantizes the weights for every 64-row tile, cuBLAS does not.
constexpr int kFusedMaxM = 256;

// Whether the fused kernel handles this group size: one group per row (any K), or a multiple of
// 16 (so a k16 mma step never straddles two groups) that is at least 32 (at most 6 scale
// elements per row and k-tile). Other group sizes go through the dequantize path.
inline bool fused_supports_group(int group, int ngroups) {
  return ngroups == 1 || (group % 16 == 0 && group >= 32);
}

// int32 words of the kernel layout of an N x K weight (flute/layout.py: kernel_layout_shape);
// -1 for an unsupported bit width.
int64_t layout_words(int bits, int64_t K, int64_t N);

// Choose the path, the tile configuration and the Stream-K schedule from (M, N, K, bits, group,
// the device's SM count and shared memory). The device is queried once per device and kernel
// configuration (cached, including the kernels' shared-memory attribute and occupancy); after
// that a plan is pure arithmetic: no CUDA calls, no synchronization (CUDA-graph safe). `device`
// must be the current device. Returns cudaSuccess or a CUDA error.
cudaError_t qgemm_plan(const QGemmProblem& prob, int device, QGemmPlan* plan);

// Bytes of a workspace that serves every plan on `device` (the binding keeps one per device and
// stream, zeroed once: each launch leaves its flags zero again).
cudaError_t qgemm_max_workspace_bytes(int device, size_t* bytes);

// Launch the fused kernel on `stream`. `workspace` holds at least plan.workspace_bytes bytes
// whose flag region (the first plan.partial_slots ints) is zero; the kernel leaves it zero. x rows are `ldx` elements apart (ldx % 8 == 0, 16-byte aligned; columns K..roundup(K, 8)
// zero), y is [M, N] contiguous.
cudaError_t qgemm_run(const QGemmProblem& prob, const QGemmPlan& plan, const void* x, int ldx,
                      const void* qweight, const void* scales, const void* offsets,
                      const float* table, void* y, void* workspace, cudaStream_t stream);

// W[N, K] (contiguous, dtype) from the kernel layout; any group size.
cudaError_t dequant_run(int bits, DTypeId dtype, const void* qweight, const void* scales,
                        const void* offsets, const float* table, void* w, int N, int K, int group,
                        int ngroups, cudaStream_t stream);

}  // namespace flute
