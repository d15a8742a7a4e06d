// 4-bit codes, fp16 activations: the fused GEMM for batch tiles of 16/32/64 rows, and the
// dequantize kernel. One translation unit per (bits, dtype) keeps builds parallel and short.
#include "flute_kernels.cuh"

namespace flute {
KernelSet kernels_b4_f16() { return make_kernel_set<__half, 4>(); }
}  // namespace flute
