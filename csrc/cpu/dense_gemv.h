// flute::bf16_gemv's kernels (dense_gemv_op.cpp is the op): y = x W^T for an unquantized bf16
// weight W [N, K] (row-major, as nn.Linear holds it) and a few activation rows, the decoding
// step's product of the layers quantization leaves in 16 bits (an lm_head: SmolLM2's is 57 MB in
// bf16, as many bytes per token as all its 4-bit layers together). Without AVX512_BF16 or AMX,
// torch's CPU mm read it at ~12 GB/s (CPU_NOTES item 205); these read it at the memory's rate.
//
// The arithmetic, which every ISA's kernel follows to the bit (gemv_bf16_portable is the spec):
// K is zero-padded to a multiple of 32 (kDenseChunk); column 32 c + 2 j + h (j < 16, h < 2) goes to
// lane j of accumulator h, by fused multiply-add in the order of c; then per lane the even and odd
// accumulators are added (e + o), and the 16 lanes are halved: s8[j] = s[j] + s[j + 8], then
// s4[j] = s8[j] + s8[j + 4], s2[j] = s4[j] + s4[j + 2], and y = s2[0] + s2[1]. The order fits the
// bf16 layout: one 32-bit load holds columns 2 j and 2 j + 1, and one shift or one AND widens
// each to fp32 with no shuffle, so x is read in the same even / odd order (dense_permute_x).
// Torch-free: included by the kernel units (each compiles its own version with its own flags).
#pragma once
#include <cstdint>
#include <cstring>

namespace flute_cpu {

constexpr int64_t kDenseChunk = 32;  // columns per step: 16 lanes x (even, odd)
// Software prefetch distance in each row the SIMD kernels read: 2 threads on this project's Intel
// VM (no AMX), a 49152 x 576 weight from DRAM, 3 alternating runs: none 2.7 ms, 2 KB 2.1-2.3,
// 4 KB 2.1 (CPU_NOTES item 205).
constexpr int kDensePrefetchBytes = 4096;

// The row blocks of rows [n0, n1) in the order the SIMD kernels run them: block(rows) for blocks of
// R rows, then one(n) for the rest. two_streams (Intel CPUs: cpu_tile_pairs): each block's rows
// half from the range's first half and half from its second, so that a thread reads two runs at
// once, as the quantized kernels' tile pairs do (49152 x 576 from DRAM at 2 threads: 2.2-2.4 ->
// 2.1 ms, 26-27 GB/s against 28.6 for the best plain reader; CPU_NOTES item 205).
template <int R, class Block, class One>
inline void dense_row_blocks(int64_t n0, int64_t n1, bool two_streams, const Block& block, const One& one) {
  int64_t n = n0;
  if (two_streams) {
    constexpr int hr = R / 2;
    const int64_t H = (n1 - n0) / R * hr;  // rows in each half run through in blocks
    for (; n < n0 + H; n += hr) {
      int64_t rows[R];
      for (int r = 0; r < hr; ++r) {
        rows[r] = n + r;
        rows[hr + r] = n + H + r;
      }
      block(rows);
    }
    n = n0 + 2 * H;
  }
  for (; n + R <= n1; n += R) {
    int64_t rows[R];
    for (int r = 0; r < R; ++r) rows[r] = n + r;
    block(rows);
  }
  for (; n < n1; ++n) one(n);
}

// Padded row length of x as the kernels read it.
inline int64_t dense_k_pad(int64_t K) { return (K + kDenseChunk - 1) / kDenseChunk * kDenseChunk; }

// Row x [K] (fp32) into dst [dense_k_pad(K)] in the kernels' order: per chunk of 32 columns its 16
// even columns, then its 16 odd ones; zeros past K.
inline void dense_permute_x(const float* x, int64_t K, float* dst) {
  const int64_t kp = dense_k_pad(K);
  for (int64_t c = 0; c < kp; c += kDenseChunk)
    for (int j = 0; j < 16; ++j)
      for (int h = 0; h < 2; ++h) {
        const int64_t k = c + 2 * j + h;
        dst[c + 16 * h + j] = k < K ? x[k] : 0.f;
      }
}

// Rows [n0, n1) of y [M, N] (row m at y + m * N): y[m][n] = sum_k W[n][k] x[m][k] for bf16 W [N, K]
// (as raw uint16) and x [M, dense_k_pad(K)] from dense_permute_x. two_streams: the order of the
// rows (dense_row_blocks), never the results.
void gemv_bf16_portable(const uint16_t* w, int64_t K, const float* x, int64_t M, int64_t N, int64_t n0,
                        int64_t n1, float* y, bool two_streams);
#if defined(__x86_64__) || defined(_M_X64)
void gemv_bf16_avx2(const uint16_t* w, int64_t K, const float* x, int64_t M, int64_t N, int64_t n0, int64_t n1,
                    float* y, bool two_streams);
void gemv_bf16_avx512(const uint16_t* w, int64_t K, const float* x, int64_t M, int64_t N, int64_t n0, int64_t n1,
                      float* y, bool two_streams);
#endif

}  // namespace flute_cpu
