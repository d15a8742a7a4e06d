// Glue between the per-(bits, dtype) translation units and the dispatcher: each gemm_b*_*.cu
// instantiates its kernels and exports one KernelSet. Includes only CUDA headers.
#pragma once

#include "flute_dequant.cuh"
#include "flute_gemm.cuh"

namespace flute {

struct KernelSet {
  // Index GemmConfig<bits, m>::kMIndex: batch tiles of 16, 32, 64 rows.
  cudaError_t (*gemm[kNumMTileConfigs])(const GemmParams&, int grid, int smem, cudaStream_t);
  // Raise the kernel's dynamic shared-memory limit to max_smem (once per device: the dispatcher
  // caches it) and report how many CTAs of `smem` bytes fit on one SM.
  cudaError_t (*prepare[kNumMTileConfigs])(int max_smem, int smem, int* blocks_per_sm);
  cudaError_t (*dequant)(const DequantParams&, cudaStream_t);
};

template <typename T, int kBits, int kMTiles>
cudaError_t launch_gemm(const GemmParams& p, int grid, int smem, cudaStream_t stream) {
  flute_gemm_kernel<T, kBits, kMTiles><<<grid, GemmConfig<kBits, kMTiles>::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kBits, int kMTiles>
cudaError_t prepare_gemm(int max_smem, int smem, int* blocks) {
  auto kernel = flute_gemm_kernel<T, kBits, kMTiles>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem);
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel,
                                                       GemmConfig<kBits, kMTiles>::kThreads, smem);
}

template <typename T, int kBits>
cudaError_t launch_dequant(const DequantParams& p, cudaStream_t stream) {
  constexpr int kWarpsPerBlock = kDequantWarps;  // one warp per atom
  const long long atoms = (long long)p.n_atoms * p.k_atoms;
  const long long blocks = (atoms + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks == 0) return cudaSuccess;
  flute_dequant_kernel<T, kBits><<<(unsigned)blocks, 32 * kWarpsPerBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kBits, int... kMs>
KernelSet make_kernel_set_impl() {
  KernelSet s;
  ((s.gemm[GemmConfig<kBits, kMs>::kMIndex] = launch_gemm<T, kBits, kMs>), ...);
  ((s.prepare[GemmConfig<kBits, kMs>::kMIndex] = prepare_gemm<T, kBits, kMs>), ...);
  s.dequant = launch_dequant<T, kBits>;
  return s;
}

// The one place that lists the compiled batch tiles (kMTileOptions).
template <typename T, int kBits>
KernelSet make_kernel_set() {
  static_assert(kNumMTileConfigs == 3 && kMTileOptions[0] == 1 && kMTileOptions[1] == 2 &&
                    kMTileOptions[2] == 4,
                "make_kernel_set instantiates batch tiles 1, 2, 4");
  return make_kernel_set_impl<T, kBits, 1, 2, 4>();
}

// Defined in gemm_b{2,3,4}_{f16,bf16}.cu.
KernelSet kernels_b2_f16();
KernelSet kernels_b2_bf16();
KernelSet kernels_b3_f16();
KernelSet kernels_b3_bf16();
KernelSet kernels_b4_f16();
KernelSet kernels_b4_bf16();

}  // namespace flute
