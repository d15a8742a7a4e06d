// flute CPU kernel, int8 mode, AVX2 with AVX-VNNI (int8_avx2_kernel.h, its `vpdpwssd` form, VEX
// encoded): the path of CPUs with AVX-VNNI but without AVX-512 VBMI + VNNI (Alder Lake and later
// client cores, Sierra Forest). Built with -mavx2 -mfma -mavxvnni (an optional unit: GCC 11 /
// Clang 12; kernel_fallbacks.cpp stands in for it).
#if defined(__x86_64__) || defined(_M_X64)
#include "int8_avx2_kernel.h"

#if !FLUTE_INT8_VNNI
#error "kernel_int8_avxvnni.cpp needs -mavxvnni (setup.py)"
#endif

namespace flute_cpu {

bool kernel_int8_avxvnni_built() { return true; }

void gemm_int8_avxvnni(const Int8Args& a, int64_t t0, int64_t t1) { gemm_int8_dispatch<Avx2Int8>(a, t0, t1); }

}  // namespace flute_cpu
#endif
