// Dequantize the kernel layout to a dense W[N, K] (the `flute::dequantize` op, and the large-M
// path: dequantize into scratch, then a cuBLAS GEMM). One warp per atom; each lane decodes its own
// chunks with the same step_pair_indices as the GEMM, so this kernel is also a cheap on-device
// check of the layout. Arithmetic in float32 with explicit roundings (no FMA contraction), so the
// result equals the CPU reference (table[q] * scale (+ offset) in float32, then cast) bit for bit.
// Any group size works here (the group is looked up per element). Includes only CUDA headers.
#pragma once

#include "flute_device.cuh"

namespace flute {

template <typename T, int kBits>
__global__ void __launch_bounds__(32 * kDequantWarps) flute_dequant_kernel(const DequantParams p) {
  using L = LayoutTraits<kBits>;
  __shared__ float table[1 << kBits];
  if (threadIdx.x < (1 << kBits)) table[threadIdx.x] = p.table[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const long long atom = (long long)blockIdx.x * kDequantWarps + (threadIdx.x >> 5);
  if (atom >= (long long)p.n_atoms * p.k_atoms) return;
  const int na = (int)(atom / p.k_atoms), ka = (int)(atom % p.k_atoms);
  const int g = lane >> 2, t = lane & 3;

  uint32_t w[L::kChunks * 4];
  const uint4* q = static_cast<const uint4*>(p.qweight) + atom * L::kChunks * 32 + lane;
#pragma unroll
  for (int c = 0; c < L::kChunks; ++c) {
    const uint4 v = __ldg(q + c * 32);
    w[4 * c] = v.x;
    w[4 * c + 1] = v.y;
    w[4 * c + 2] = v.z;
    w[4 * c + 3] = v.w;
  }
  const T* scales = static_cast<const T*>(p.scales);
  const T* offsets = static_cast<const T*>(p.offsets);
  T* out = static_cast<T*>(p.w);
  const bool pairs = (p.K & 1) == 0;

#pragma unroll
  for (int s = 0; s < L::kStepsPerAtom; ++s) {
    uint32_t idx[2];
    step_pair_indices<kBits, 1>(w, s, idx[0], idx[1]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = na * 32 + 8 * j + g;
      if (n >= p.N) continue;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int k = ka * L::kAtomK + 16 * s + 8 * r + 2 * t;
        if (k >= p.K) continue;
        int lo, hi;
        pair_codes<kBits>((idx[r] >> (8 * j)) & 0xFF, lo, hi);
        float v[2] = {table[lo], table[hi]};
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (k + e < p.K) {
            const size_t gi = (size_t)n * p.ngroups + (k + e) / p.group;
            v[e] = __fmul_rn(v[e], DType<T>::to_float(scales[gi]));
            if (offsets != nullptr) v[e] = __fadd_rn(v[e], DType<T>::to_float(offsets[gi]));
          }
        }
        T* dst = out + (size_t)n * p.K + k;
        if (pairs) {  // k even and K even: k + 1 < K, 4-byte aligned
          *reinterpret_cast<typename DType<T>::T2*>(dst) = DType<T>::floats2(v[0], v[1]);
        } else {
          dst[0] = DType<T>::from_float(v[0]);
          if (k + 1 < p.K) dst[1] = DType<T>::from_float(v[1]);
        }
      }
    }
  }
}

}  // namespace flute
