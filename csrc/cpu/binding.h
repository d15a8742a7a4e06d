// Shared by the two translation units of the CPU op's torch binding: binding.cpp (settings,
// argument checks, the panel path, op registration) and fused_gemm.cpp (the fused kernel's calls).
// Not a kernel header: it includes ATen (the kernels' interface is lut_kernel.h, torch-free).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "lut_kernel.h"

namespace flute_cpu::binding {

// The kernel paths, best last (FLUTE_CPU_ISA / flute.set_cpu_isa pick one).
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// A CPU-layout weight after check_weight (binding.cpp): shapes, padding, groups (G: the effective
// group size, ng groups per row) and the tensors as the kernels read them (contiguous; scales and
// offsets fp32, bf16 or fp16 = stype; the table fp32).
struct Weight {
  int bits;
  int64_t K, N, K_pad, N_pad, nblocks, G, ng;
  at::Tensor scales, offsets, table, qweight;
  int stype;
};

// The fused kernel's int8 mode into out [M, N] fp32 (x2: [M, K] contiguous fp32, bf16 or fp16);
// false, with out unwritten, when x is not finite: the caller then takes the exact path.
bool int8_gemm(const at::Tensor& x2, const Weight& w, int isa, at::Tensor& out);

// The fused kernel's exact (fp32) mode, or with bf16 = true on an AVX-512 path its bf16 mode
// (AVX512_BF16 CPUs), into out [M, N] fp32.
void exact_gemm(const at::Tensor& x2, const Weight& w, int isa, bool bf16, at::Tensor& out);

}  // namespace flute_cpu::binding
