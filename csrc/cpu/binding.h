// Shared by the two translation units of the CPU op's torch binding: binding.cpp (settings,
// argument checks, the panel path, op registration) and fused_gemm.cpp (the fused kernel's calls).
// Not a kernel header: it includes ATen (the kernels' interface is lut_kernel.h, torch-free).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "lut_kernel.h"

namespace flute_cpu::binding {

// __builtin_cpu_supports(feature), except in a test build whose AVX-512 units run in software
// (setup.py with FLUTE_CPU_EMULATE_AVX512=1, csrc/cpu/emulation/immintrin.h): there every AVX-512
// feature counts as present, so that the AVX-512 paths run and are tested on an AVX2 CPU.
#ifdef FLUTE_CPU_EMULATED_AVX512
#define FLUTE_CPU_SUPPORTS(feature) \
  (__builtin_strncmp(feature, "avx512", 6) == 0 || __builtin_cpu_supports(feature))
#else
#define FLUTE_CPU_SUPPORTS(feature) __builtin_cpu_supports(feature)
#endif

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

// 3 bits on the SIMD exact kernels (gemm_avx2/avx512, decode_avx2/avx512), which read
// the older 3-bit form (the 2-bit block of the low bits, then lane masks of the high bits): tiles
// [t0, t1) one at a time, each converted into a buffer (legacy_3bit_tile_avx2), fn(base, t) with a
// layout base pointer that places tile t at the buffer (the kernels address tile t at base + t *
// tile bytes; the base itself is never dereferenced). The conversion is ~8% of those kernels'
// instructions for 3 bits at M = 1 (callgrind, 512x1024 exact AVX2; ~6% when it only converted
// the high plane), less at larger M; the int8 mode, the bf16 decoders (avx512bf16_common.h) and the
// portable kernels read the layout as it is.
template <typename F>
void for_legacy_tiles(const uint8_t* qw, int64_t nblocks, int64_t t0, int64_t t1, const F& fn) {
#if defined(__x86_64__) || defined(_M_X64)
  const int64_t tile_bytes = 4 * nblocks * block_bytes(3);
  at::Tensor buf = at::empty({tile_bytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* b = buf.data_ptr<uint8_t>();
  for (int64_t t = t0; t < t1; ++t) {
    legacy_3bit_tile_avx2(qw + t * tile_bytes, b, 4 * nblocks);
    fn(reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(b) - static_cast<uintptr_t>(t * tile_bytes)), t);
  }
#else
  (void)qw, (void)nblocks, (void)t0, (void)t1, (void)fn;
#endif
}

// Least weights (rows x K_pad) per task of the fused kernels' thread split (binding.cpp).
int64_t task_weights();

// The fused kernel's int8 mode into out [M, N] fp32 (x2: contiguous fp32, bf16 or fp16 with last
// dimension K, M rows in all); false, with out unwritten, when x is not finite: the caller then
// takes the exact path.
bool int8_gemm(const at::Tensor& x2, const Weight& w, int isa, float* out);

// The fused kernel's exact (fp32) mode, or with bf16 = true on an AVX-512 path its bf16 mode
// (AVX512_BF16 CPUs), into out [M, N] fp32 (x2 as for int8_gemm).
void exact_gemm(const at::Tensor& x2, const Weight& w, int isa, bool bf16, float* out);

// The AMX path (kernel_amx.cpp) into out [M, N] fp32: x2 contiguous bf16 with last dimension K, M
// rows in all; groups of a multiple of 32 columns or one group; only where g_has_amx (binding.cpp) is true.
void amx_gemm(const at::Tensor& x2, const Weight& w, float* out);
void amx_gemm_rows(const at::Tensor& x2, const Weight& w, uint16_t* out);

// Per-call temporaries (slot 0: the fused path's activations, fused_gemm.cpp; slot 1: the
// fp32 output before its conversion to bf16 or fp16; slot 2: the panel path's decoded panel,
// binding.cpp): `bytes` from a grow-only buffer of the calling thread, 64-byte aligned, or above
// max_cached from a tensor put in `hold`. Each
// at::empty and its release cost ~2.5K instructions, and a small decode call (4x128) made three of
// them in ~16K (callgrind). The buffer is only used during the call (the kernels never call back
// into torch), and each thread calling the op has its own.
char* call_scratch(int slot, int64_t bytes, at::Tensor& hold, int64_t max_cached = int64_t(16) << 20);

}  // namespace flute_cpu::binding
