// 2-bit codes, fp16 activations: the fused GEMM for batch tiles of 16/32/64 rows, and the
// dequantize kernel. One translation unit per (bits, dtype) keeps builds parallel and short.
#include "flute_kernels.cuh"

namespace flute {
KernelSet kernels_b2_f16() { return make_kernel_set<__half, 2>(); }
}  // namespace flute
