// Device helpers: PTX wrappers (cp.async, ldmatrix, mma.sync), dtype traits, code decoding.
// Includes only CUDA headers.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

#include "flute_config.cuh"

#ifdef FLUTE_DEBUG
#include <cassert>
#define FLUTE_DCHECK(cond) assert(cond)
#else
#define FLUTE_DCHECK(cond) ((void)0)
#endif

namespace flute {

// ---- dtype traits ------------------------------------------------------------------------------
template <typename T>
struct DType;

template <>
struct DType<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half2 bcast(__half v) { return __half2half2(v); }
  static __device__ __forceinline__ __half2 floats2(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct DType<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat162 bcast(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  static __device__ __forceinline__ __nv_bfloat162 floats2(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---- shared memory / async copy -----------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy through L2 only; bytes beyond src_bytes (0 or 16) are zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

// 4-byte copy (scales); src_bytes in {0, 2, 4}, the rest is zero-filled.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Wait until at most `pending` groups are in flight (pending is a run-time value, 0..7).
__device__ __forceinline__ void cp_async_wait_dyn(int pending) {
  switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<7>(); break;
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// ---- code decoding (flute/emulate.py: step_pair_indices) -------------------------------------
// For k16 step `s` (0..kSteps-1) of a k-tile, from the lane's code words of that k-tile, form two
// registers of four 8-bit lanes each: byte j of idx[r] is the pair-table index of B register r
// (b0 = k 2t..2t+1, b1 = k 2t+8..2t+9) of n8 tile j.
//   w: the lane's kLaneChunks chunks as 32-bit words, chunk-major (word 4c + i = chunk c, word i).
template <int kBits, int kAtomsK>
__device__ __forceinline__ void step_pair_indices(const uint32_t* w, int s, uint32_t& idx0,
                                                  uint32_t& idx1) {
  if constexpr (kBits == 4) {
    // atom a = s / 4, chunk c = (s % 4) / 2, word (s % 2) * 2 + r: one byte per (tile, r).
    const int a = s >> 2, sa = s & 3;
    const int base = (a * 2 + (sa >> 1)) * 4 + (sa & 1) * 2;
    idx0 = w[base];
    idx1 = w[base + 1];
  } else if constexpr (kBits == 2) {
    // atom a = s / 4, word s % 4; byte j = tile j, low nibble b0, high nibble b1.
    const uint32_t v = w[(s >> 2) * 4 + (s & 3)];
    idx0 = v & 0x0F0F0F0Fu;
    idx1 = (v >> 4) & 0x0F0F0F0Fu;
  } else {
    // 2-bit slice: chunk 1 + s / 4, word s % 4. 1-bit slice: chunk 0, word s / 2; bits
    // 4 * (1 - s % 2) + 2 r + e of byte j are the high bits of pair r of tile j.
    const uint32_t lo = w[(1 + (s >> 2)) * 4 + (s & 3)];
    const uint32_t hi = w[s >> 1];
    uint32_t h0, h1;
    if ((s & 1) == 0) {
      h0 = hi;
      h1 = hi >> 2;
    } else {
      h0 = hi << 4;
      h1 = hi << 2;
    }
    idx0 = (lo & 0x0F0F0F0Fu) | (h0 & 0x30303030u);
    idx1 = ((lo >> 4) & 0x0F0F0F0Fu) | (h1 & 0x30303030u);
  }
}

// The two codes a pair-table index stands for (flute/layout.py: pair_codes).
template <int kBits>
__device__ __forceinline__ void pair_codes(int idx, int& lo, int& hi) {
  if constexpr (kBits == 2) {
    lo = idx & 3;
    hi = idx >> 2;
  } else if constexpr (kBits == 4) {
    lo = idx & 15;
    hi = idx >> 4;
  } else {
    lo = (idx & 3) | (((idx >> 4) & 1) << 2);
    hi = ((idx >> 2) & 3) | (((idx >> 5) & 1) << 2);
  }
}

// Fill the shared pair table: word (e << kLogPairCopies) + c = (table[lo(e)], table[hi(e)]) for
// every copy c. Called by all threads of the block; the caller synchronizes.
template <int kBits, typename T>
__device__ __forceinline__ void build_pair_table(uint32_t* pt, const float* __restrict__ table,
                                                 int tid, int nthreads) {
  using L = LayoutTraits<kBits>;
  constexpr int kWords = L::kPairEntries * L::kPairCopies;
  for (int i = tid; i < kWords; i += nthreads) {
    const int e = i >> L::kLogPairCopies;
    int lo, hi;
    pair_codes<kBits>(e, lo, hi);
    pt[i] = DType<T>::pack(__ldg(table + lo), __ldg(table + hi));
  }
}

}  // namespace flute
