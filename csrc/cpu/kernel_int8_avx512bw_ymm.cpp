// flute CPU kernel, int8 mode, AVX2 with its int16 step (int8_avx2_kernel.h, as
// kernel_int8_avx2.cpp) but EVEX encoded: -mavx512vl -mavx512bw let the compiler use all 32 ymm
// registers for the same 256-bit instructions, where the VEX build has 16 and keeps the one-row
// loop's accumulators and table halves partly on the stack. The path of AVX-512 CPUs without VBMI
// and VNNI (Skylake-SP/X/W) and of every AVX-512 CPU whose AVX2 int8 kernel is set to the int16
// step. 256-bit only, so no 512-bit frequency licence either. In the emulated AVX-512 test build
// (an AVX2 host) it is compiled with AVX2 flags alone.
// On the Zen 5 VM with the AVX2 path forced, one thread, in cache: this build / the VEX one 0.87
// (3 bits) and 0.99 (4 bits) at one row, 0.81-0.84 and 0.89-0.94 at 2-4 rows (CPU_NOTES item 255).
#if defined(__x86_64__) || defined(_M_X64)
#include "int8_avx2_kernel.h"

#if FLUTE_INT8_VNNI
#error "kernel_int8_avx512bw_ymm.cpp is the int16 form: no VNNI flags (setup.py)"
#endif

namespace flute_cpu {

void gemm_int8_avx512bw_ymm(const Int8Args& a, int64_t t0, int64_t t1) { gemm_int8_dispatch<Avx2Int8>(a, t0, t1); }

}  // namespace flute_cpu
#endif
