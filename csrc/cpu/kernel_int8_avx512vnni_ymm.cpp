// flute CPU kernel, int8 mode, AVX2 with AVX512-VNNI on ymm registers (int8_avx2_kernel.h, its
// `vpdpwssd` form, EVEX encoded): the path of AVX-512 CPUs with VNNI but without VBMI (Cascade
// Lake), and the same instructions as the AVX-VNNI unit wherever AVX512-VNNI is (its tests run
// natively on AVX-512 machines without AVX-VNNI). Built with -mavx2 -mfma -mavx512vl -mavx512vnni
// (an optional unit; kernel_fallbacks.cpp stands in for it).
#if defined(__x86_64__) || defined(_M_X64)
#include "int8_avx2_kernel.h"

#if !FLUTE_INT8_VNNI
#error "kernel_int8_avx512vnni_ymm.cpp needs -mavx512vl -mavx512vnni (setup.py)"
#endif

namespace flute_cpu {

bool kernel_int8_avx512vnni_ymm_built() { return true; }

void gemm_int8_avx512vnni_ymm(const Int8Args& a, int64_t t0, int64_t t1) { gemm_int8_dispatch<Avx2Int8>(a, t0, t1); }

}  // namespace flute_cpu
#endif
