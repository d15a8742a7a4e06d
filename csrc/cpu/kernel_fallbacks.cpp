// Stand-ins for the ISA translation units a compiler could not build. setup.py probes each
// optional unit's flags (kernel_amx.cpp: -mamx-tile -mamx-bf16, GCC 11 / Clang 12;
// kernel_avx512bf16.cpp: -mavx512bf16, GCC 10 / Clang 9; kernel_int8_avx512.cpp and
// kernel_int8_rows16_avx512.cpp: -mavx512vnni -mavx512vbmi; kernel_int8_avxvnni.cpp: -mavxvnni,
// GCC 11 / Clang 12; kernel_int8_avx512vnni_ymm.cpp: -mavx512vnni -mavx512vl) and, for each one
// the compiler rejects, leaves the unit out and compiles this file with its FLUTE_WITHOUT_* macro. The unit's *_built() then says false, so the binding takes the
// other paths (fp32 and the AVX2 int8 kernel) and never calls the stand-ins below; the extension
// still builds and links instead of failing whole. Plain C++: no ISA flags.
#include "lut_kernel.h"

#if defined(__x86_64__) || defined(_M_X64)
namespace flute_cpu {

#if defined(FLUTE_WITHOUT_KERNEL_AMX)
bool kernel_amx_built() { return false; }
void amx_prepare_x(const uint16_t*, int64_t, int64_t, int64_t, uint16_t*, bool) {}
void gemm_amx(const GemmArgs&, int64_t, int64_t) {}
void gemm_amx_rows(const GemmArgs&, int64_t, int64_t, int64_t, int64_t) {}
#endif

#if defined(FLUTE_WITHOUT_KERNEL_AVX512BF16)
bool kernel_avx512bf16_built() { return false; }
void gemm_avx512bf16(const GemmArgs&, int64_t, int64_t) {}
#endif

#if defined(FLUTE_WITHOUT_KERNEL_INT8_AVX512)
bool kernel_int8_avx512_built() { return false; }
void gemm_int8_avx512(const Int8Args&, int64_t, int64_t) {}
void int8_prepare_avx512(int, int, int64_t, int8_t*, const int16_t*, int16_t*, int32_t*, bool) {}
void int8_prepare_compact_avx512(int, int64_t, int8_t*, const int16_t*, uint64_t*, bool) {}
void int8_prepare_tail_avx512(const Int8Args&, int8_t*) {}
bool quantize_x_int8_avx512(const float*, int, int8_t*, int16_t*, int16_t*, float*) { return false; }
#endif

#if defined(FLUTE_WITHOUT_KERNEL_INT8_ROWS16)
bool kernel_int8_rows16_built() { return false; }
bool rows16_quantize_avx512(int, const float*, const uint8_t*, float, int8_t*, int32_t*, float*) { return false; }
void bf16_to_f32_avx512(const uint16_t*, float*, int64_t) {}
void gemm_int8_rows16_avx512(const Rows16Args&, int64_t, int64_t) {}
#endif

#if defined(FLUTE_WITHOUT_KERNEL_INT8_AVXVNNI)
bool kernel_int8_avxvnni_built() { return false; }
void gemm_int8_avxvnni(const Int8Args&, int64_t, int64_t) {}
#endif

#if defined(FLUTE_WITHOUT_KERNEL_INT8_AVX512VNNI_YMM)
bool kernel_int8_avx512vnni_ymm_built() { return false; }
void gemm_int8_avx512vnni_ymm(const Int8Args&, int64_t, int64_t) {}
#endif

}  // namespace flute_cpu
#endif
