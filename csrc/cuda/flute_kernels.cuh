// Glue between the per-(bits, dtype) translation units and the dispatcher: each gemm_b*_*.cu
// instantiates its kernels and exports one KernelSet. Includes only CUDA headers.
#pragma once

#include "flute_dequant.cuh"
#include "flute_gemm.cuh"

namespace flute {

struct KernelSet {
  // Index 0, 1, 2: batch tiles of 16, 32, 64 rows.
  cudaError_t (*gemm[3])(const GemmParams&, int grid, int smem, cudaStream_t);
  cudaError_t (*occupancy[3])(int smem, int* blocks_per_sm);
  cudaError_t (*dequant)(const DequantParams&, cudaStream_t);
};

template <typename T, int kBits, int kMTiles>
cudaError_t launch_gemm(const GemmParams& p, int grid, int smem, cudaStream_t stream) {
  auto kernel = flute_gemm_kernel<T, kBits, kMTiles>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, GemmConfig<kBits, kMTiles>::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kBits, int kMTiles>
cudaError_t gemm_occupancy(int smem, int* blocks) {
  auto kernel = flute_gemm_kernel<T, kBits, kMTiles>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel,
                                                       GemmConfig<kBits, kMTiles>::kThreads, smem);
}

template <typename T, int kBits>
cudaError_t launch_dequant(const DequantParams& p, cudaStream_t stream) {
  const long long atoms = (long long)p.n_atoms * p.k_atoms;
  const long long blocks = (atoms + 3) / 4;  // one warp per atom, 4 warps per block
  if (blocks == 0) return cudaSuccess;
  flute_dequant_kernel<T, kBits><<<(unsigned)blocks, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kBits>
KernelSet make_kernel_set() {
  KernelSet s;
  s.gemm[0] = launch_gemm<T, kBits, 1>;
  s.gemm[1] = launch_gemm<T, kBits, 2>;
  s.gemm[2] = launch_gemm<T, kBits, 4>;
  s.occupancy[0] = gemm_occupancy<T, kBits, 1>;
  s.occupancy[1] = gemm_occupancy<T, kBits, 2>;
  s.occupancy[2] = gemm_occupancy<T, kBits, 4>;
  s.dequant = launch_dequant<T, kBits>;
  return s;
}

// Defined in gemm_b{2,3,4}_{f16,bf16}.cu.
KernelSet kernels_b2_f16();
KernelSet kernels_b2_bf16();
KernelSet kernels_b3_f16();
KernelSet kernels_b3_bf16();
KernelSet kernels_b4_f16();
KernelSet kernels_b4_bf16();

}  // namespace flute
