// The fused path of the CPU op, torch side: activations prepared once per call (fp32 chunk-permuted,
// bf16, or int8 for the int8 mode), the int8 mode's table cache, the split of row tiles between
// threads, and the calls of the ISA's kernel (lut_kernel.h). Declared in binding.h.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <unordered_map>

#include "binding.h"

namespace flute_cpu::binding {
namespace {

GemmFn gemm_fn(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAvx512) return gemm_avx512;
  if (isa == kAvx2) return gemm_avx2;
#endif
  return gemm_portable;
}

// Fp32 activations, chunk-permuted and vector-major ([K_pad/16][M][16], see lut_kernel.h), zero
// beyond K; group sums of each row.
template <typename T>
void permute_x(const T* x, int64_t M, int64_t K, int64_t K_pad, int64_t G, int64_t ng, float* xp,
               float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    for (int64_t k = 0; k < K_pad; ++k) {
      const int64_t v = (k >> 5) * 2 + (k & 1), j = (k & 31) >> 1;
      xp[(v * M + m) * 16 + j] = k < K ? static_cast<float>(xr[k]) : 0.f;
    }
    if (xsum) {
      for (int64_t g = 0; g < ng; ++g) {
        float s = 0.f;
        for (int64_t k = g * G; k < std::min(K, (g + 1) * G); ++k) s += static_cast<float>(xr[k]);
        xsum[m * ng + g] = s;
      }
    }
  }
}

// bf16 activations for the bf16 mode, [K_pad/32][M][32] (natural order in a chunk), zero beyond K.
template <typename T>
void bf16_x(const T* x, int64_t M, int64_t K, int64_t K_pad, uint16_t* xb) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    for (int64_t k = 0; k < K_pad; ++k) {
      uint16_t v = 0;
      if (k < K) {
        if constexpr (std::is_same_v<T, c10::BFloat16>) v = xr[k].x;
        else v = f32_to_bf16(static_cast<float>(xr[k]));
      }
      xb[((k >> 5) * M + m) * 32 + (k & 31)] = v;
    }
  }
}

// bf16 activations widened to fp32 (the int8 mode's quantizers read fp32): the ISA's version
// (bf16_to_f32_avx2) or this one.
using Bf16ToF32Fn = void (*)(const uint16_t*, float*, int64_t);

void bf16_to_f32_portable(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// The int8 mode's activations (see Int8Args), rows [m0, m1) of M: each block of each row through the ISA's QuantXFn
// (int8 per 32-column chunk on the block's unit, in the kernel's byte order, with the int16
// corrections and chunk factors); exact group sums when there are offsets.
// False (nothing usable) when x holds a NaN or an Inf: the caller then takes the exact path, which
// propagates them as the float math would.
template <typename T>
bool int8_x(const T* x, int64_t M, int64_t m0, int64_t m1, const Weight& w, QuantXFn quant, Bf16ToF32Fn widen,
            int8_t* xq, int16_t* xcorr, int16_t* xk, float* xu, float* xsum) {
  const int bits = w.bits, P = int8_parts(bits), cols = 64 * P;
  const int64_t K = w.K, nb = w.nblocks;
  alignas(32) float xf[256];
  for (int64_t m = m0; m < m1; ++m) {
    const T* xr = x + m * K;
    for (int64_t b = 0; b < nb; ++b) {
      const float* src = xf;
      if (std::is_same_v<T, float> && (b + 1) * cols <= K) {
        src = reinterpret_cast<const float*>(xr + b * cols);  // a whole block of fp32: no copy
      } else if (std::is_same_v<T, c10::BFloat16> && (b + 1) * cols <= K) {
        widen(reinterpret_cast<const uint16_t*>(xr + b * cols), xf, cols);
      } else {
        for (int c = 0; c < cols; ++c) {
          const int64_t k = b * cols + c;
          xf[c] = k < K ? static_cast<float>(xr[k]) : 0.f;
        }
      }
      const int64_t bm = b * M + m;
      if (!quant(src, bits, xq + bm * cols, xcorr + bm * P * 16, xk + bm * P * 16, xu + bm)) return false;
    }
    if (xsum) {
      for (int64_t g = 0; g < w.ng; ++g) {
        float s = 0.f;
        for (int64_t k = g * w.G; k < std::min(K, (g + 1) * w.G); ++k) s += static_cast<float>(xr[k]);
        xsum[m * w.ng + g] = s;
      }
    }
  }
  return true;
}

// The int8 mode's table: 7-bit integers t7 (stored as u = t7 + 64) times one scale. The scale is
// max|t| / d for the d in [8, 63] (steps of 1/16) with the least squared rounding error, the
// largest d on ties: uniform tables (int, fp4) become exact (d = 8 for the int table), and NF4's
// error drops below max|t| / 126. flute.testing.reference_qgemm_int8 makes the same choice.
struct Table7 {
  uint8_t tu[16];
  float scale;
};

Table7 quantize_table7(const float* t, int n) {
  Table7 r{};
  float tmax = 0.f;
  for (int c = 0; c < n; ++c) tmax = std::max(tmax, std::fabs(t[c]));
  r.scale = 0.f;
  double best = 0.;
  for (int i = 0; i <= (63 - 8) * 16 && tmax > 0.f; ++i) {
    const float sc = static_cast<float>(tmax / (63.0 - i / 16.0));
    double err = 0.;
    for (int c = 0; c < n; ++c) {
      const float v = std::max(-63.f, std::min(63.f, std::nearbyint(t[c] / sc)));
      const double e = static_cast<double>(t[c]) - static_cast<double>(v) * sc;
      err += e * e;
    }
    if (i == 0 || err < best * (1 - 1e-9)) {  // strictly better by a margin: ties keep the larger d
      best = err;
      r.scale = sc;
    }
  }
  for (int c = 0; c < 16; ++c) {
    const float v = c < n && r.scale > 0.f ? std::nearbyint(t[c] / r.scale) : 0.f;
    r.tu[c] = static_cast<uint8_t>(64 + static_cast<int>(std::max(-63.f, std::min(63.f, v))));
  }
  return r;
}

// quantize_table7 costs ~10 us (881 candidate scales); a model reuses its tables every call, so the
// results are cached per thread by the table's bytes (a fixed-size key: no allocation per lookup).
struct TableKey {
  uint32_t words[16];
  int n;
  bool operator==(const TableKey& o) const {
    return n == o.n && std::memcmp(words, o.words, sizeof(words)) == 0;
  }
};

struct TableKeyHash {
  size_t operator()(const TableKey& k) const {
    uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(k.n);
    for (int i = 0; i < k.n; ++i) h = (h ^ k.words[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

const Table7& table7(const float* t, int n) {
  thread_local std::unordered_map<TableKey, Table7, TableKeyHash> cache;
  TableKey key{};
  key.n = n;
  std::memcpy(key.words, t, n * sizeof(float));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() > 4096) cache.clear();
  return cache.emplace(key, quantize_table7(t, n)).first->second;
}

// fn(t0, t1) over the row tiles [0, tiles), at least `grain` tiles per call of fn. Large calls:
// threads take chunks of tiles from a shared counter (dynamic balancing, as llama.cpp's CPU backend
// does) rather than one static share each, because on a shared or virtualized machine one core is
// often slowed down and a static split waits for it (measured, 14336x4096 4-bit M=1, 2 threads:
// 2.27 -> 2.12 ms on a quiet VM, 5.59 -> 4.48 ms with the other core busy). Calls with room for
// fewer than two chunks of 4 grains per thread keep the static split (smaller chunks cost more
// than they balance: 1536x576 67 -> 76 us).
template <typename F>
void for_tiles(int64_t tiles, int64_t grain, const F& fn) {
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || tiles <= grain) {
    fn(0, tiles);
    return;
  }
  // Chunks of at least 4 grains, the same number for each thread (2 to 8): 384 tiles in chunks of
  // 84 gave one of 2 threads 216 tiles, 4 chunks of 96 give each 192 (CPU_NOTES item 106).
  const int64_t per = std::min<int64_t>(8, tiles / (nt * 4 * grain));
  if (per < 2) {
    at::parallel_for(0, tiles, grain, fn);
    return;
  }
  const int64_t chunk = (tiles + nt * per - 1) / (nt * per);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t t0 = next.fetch_add(chunk); t0 < tiles; t0 = next.fetch_add(chunk))
      fn(t0, std::min(tiles, t0 + chunk));
  });
}

// fn(t, t + 1) for every task t (fn(0, tasks) on one thread): each thread takes its own contiguous
// range first, in order, then the rest of the others' ranges. For few long tasks (the blocked AMX
// kernel: ~100 us each), where a static split leaves one core waiting whenever the other runs
// slower, while a thread's consecutive tasks still share data. On this VM libgomp's spin fell from
// 14% to ~4% of a 1536 x 576 prefill profile; wall time was even with the static split in an A/B
// whose order alternated (CPU_NOTES item 116).
template <typename F>
void for_tasks_stealing(int64_t tasks, const F& fn) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), tasks);
  if (nt <= 1) {
    fn(0, tasks);
    return;
  }
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[nt]);
  for (int64_t i = 0; i < nt; ++i) next[i].store(i * tasks / nt);
  at::parallel_for(0, nt, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t v = 0; v < nt; ++v) {
        const int64_t j = (i + v) % nt, end = (j + 1) * tasks / nt;
        for (int64_t t = next[j].fetch_add(1); t < end; t = next[j].fetch_add(1)) fn(t, t + 1);
      }
  });
}

// AVX-512 VBMI and VNNI: the int8 mode's AVX-512 kernel (kernel_int8_avx512.cpp); other AVX-512
// CPUs run the AVX2 int8 kernel.
bool has_vbmi_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool v = [] {
    __builtin_cpu_init();
    return FLUTE_CPU_SUPPORTS("avx512vbmi") && FLUTE_CPU_SUPPORTS("avx512vnni") &&
           kernel_int8_avx512_built();
  }();
  return v;
#else
  return false;
#endif
}

}  // namespace

bool rows16_available(int bits, int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool built = kernel_int8_rows16_built();
  return isa == kAvx512 && built && has_vbmi_vnni();
#else
  (void)bits, (void)isa;
  return false;
#endif
}

namespace {

// Bytes from `off` rounded up to a 64-byte boundary (the int8 scratch buffer's parts).
int64_t align64(int64_t off) { return (off + 63) / 64 * 64; }

}  // namespace

char* call_scratch(int slot, int64_t bytes, at::Tensor& hold, int64_t max_cached) {
  if (bytes > max_cached) {
    hold = at::empty({bytes + 64}, at::TensorOptions().dtype(at::kByte));
    return reinterpret_cast<char*>(align64(reinterpret_cast<intptr_t>(hold.data_ptr())));
  }
  struct Buffer {
    void* p = nullptr;
    int64_t n = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer bufs[3];
  Buffer& b = bufs[slot];
  if (bytes > b.n) {
    const int64_t n = std::max<int64_t>(4096, (bytes + 4095) / 4096 * 4096);
    void* p = std::aligned_alloc(64, n);
    TORCH_CHECK(p, "flute: out of memory allocating ", n, " bytes of CPU scratch");
    std::free(b.p);
    b.p = p;
    b.n = n;
  }
  return static_cast<char*>(b.p);
}

#if defined(__x86_64__) || defined(_M_X64)
// The int8 mode's 16-row kernel (Rows16Args): the activations of int8_x (xq in the 4-row kernels'
// byte order, their chunk factors xk and units xu, times the table scale) in column order, with
// each chunk's correction and float factor.
// Column (within its 32-column chunk) of activation byte j of the chunk in the 16-row kernel's order:
// dword k = j / 4 meets the columns of weight vector k (kernel_int8_rows16_avx512.cpp's decoders).
static int rows16_col(int bits, int j) {
  if (bits == 4) return j;
  if (bits == 2) return 8 * (j / 8) + 2 * (j / 4 % 2) + (j & 1) + 4 * (j / 2 % 2);  // k = 2s + L, i
  const int k = j / 4, i = j % 4, e = k / 4, reg = (k / 2) % 2, h = k % 2;
  return 16 * reg + 8 * h + e + 2 * i;
}

// The 16-row kernel's activation buffers for M rows (scratch slot 2), filled per row range by
// rows16_prepare_avx512 with src_of.
struct Rows16Buffers {
  int8_t* x8;
  int32_t* xinit;
  float* xf;
  int32_t* cg;
  alignas(64) uint8_t src_of[256];  // byte j of a block in the kernel's order <- byte src_of[j] of xq's block
  at::Tensor hold;
};

static void rows16_buffers(const Weight& w, int64_t M, Rows16Buffers& r) {
  const int P = int8_parts(w.bits), C = chunks_per_block(w.bits), bc = 64 * P;
  const int64_t cols = w.nblocks * bc, cpr = w.nblocks * C;
  const int64_t o_init = align64(M * cols), o_f = align64(o_init + M * cpr * 4), o_cg = align64(o_f + M * cpr * 4),
                total = o_cg + cpr * 4;
  char* base = call_scratch(2, total, r.hold);
  r.x8 = reinterpret_cast<int8_t*>(base);
  r.xinit = reinterpret_cast<int32_t*>(base + o_init);
  r.xf = reinterpret_cast<float*>(base + o_f);
  r.cg = reinterpret_cast<int32_t*>(base + o_cg);
  const int16_t* pos = int8_positions(w.bits);
  for (int j = 0; j < bc; ++j) r.src_of[j] = static_cast<uint8_t>(pos[j / 32 * 32 + rows16_col(w.bits, j % 32)]);
}

static void rows16_gemm(const Weight& w, int64_t M, const Rows16Buffers& r, const float* xs, const Table7& t7,
                        float* out) {
  const int64_t nb = w.nblocks, chunks = (w.K + 31) / 32;
  int32_t* cg = r.cg;
  for (int64_t c = 0; c < chunks; ++c) cg[c] = static_cast<int32_t>(std::min<int64_t>(c * 32 / w.G, w.ng - 1));
  Rows16Args a{};
  a.qw = w.qweight.data_ptr<uint8_t>();
  a.bits = w.bits;
  a.N = w.N;
  a.N_pad = w.N_pad;
  a.nblocks = nb;
  a.M = M;
  a.chunks = chunks;
  a.x8 = r.x8;
  a.xinit = r.xinit;
  a.xf = r.xf;
  a.cg = cg;
  a.scales = w.scales.data_ptr();
  a.offsets = w.offsets.defined() ? w.offsets.data_ptr() : nullptr;
  a.stype = w.stype;
  a.ng = w.ng;
  a.xsum = xs;
  std::memcpy(a.tu, t7.tu, 16);
  a.out = out;
  const int64_t tiles = (w.N + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, task_weights() / 16 / std::max<int64_t>(w.K_pad, 1));
  for_tiles(tiles, grain, [&](int64_t t0, int64_t t1) { gemm_int8_rows16_avx512(a, t0, t1); });
}
#endif

bool int8_gemm(const at::Tensor& x2, const Weight& w_in, int isa, float* out) {
  // 2 bits (the 16-row kernel only): the activations in blocks of 256 columns, as 3 bits
  Weight w = w_in;
  if (w.bits == 2) w.nblocks = (w.K + 255) / 256;
  const int64_t M = x2.numel() / w.K, nb = w.nblocks;
  const int P = int8_parts(w.bits), C = chunks_per_block(w.bits);
  // One scratch buffer (small calls are dominated by fixed costs): activations, their corrections
  // and scales, group sums and the scale map.
  const int64_t o_corr = align64(nb * M * 64 * P), o_k = align64(o_corr + nb * M * P * 16 * 2),
                o_u = align64(o_k + nb * M * P * 16 * 2), o_sum = align64(o_u + nb * M * 4),
                o_g0 = align64(o_sum + M * w.ng * 4),
                o_gidx = align64(o_g0 + nb * 8), o_k2 = align64(o_gidx + nb * P * 8 * 4),
                o_init = align64(o_k2 + nb * M * P * 32 * 2), total = o_init + nb * M * P * 16 * 4;
  at::Tensor hold;
  char* base = call_scratch(0, total, hold);
  int8_t* xq = reinterpret_cast<int8_t*>(base);
  int16_t* xcorr = reinterpret_cast<int16_t*>(base + o_corr);
  int16_t* xk = reinterpret_cast<int16_t*>(base + o_k);
  float* xu = reinterpret_cast<float*>(base + o_u);
  float* xs = w.offsets.defined() ? reinterpret_cast<float*>(base + o_sum) : nullptr;
  int64_t* g0 = reinterpret_cast<int64_t*>(base + o_g0);
  int32_t* gidx = reinterpret_cast<int32_t*>(base + o_gidx);
  QuantXFn quant = quantize_x_int8_portable;
  Int8Fn fn = gemm_int8_portable;
  Bf16ToF32Fn widen = bf16_to_f32_portable;
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= kAvx2) {
    quant = quantize_x_int8_avx2;
    fn = gemm_int8_avx2;
    widen = bf16_to_f32_avx2;
  }
  const bool avx512 = isa == kAvx512 && has_vbmi_vnni();
  if (avx512) fn = gemm_int8_avx512;
#else
  const bool avx512 = false;
#endif
  const Table7& t7 = table7(w.table.data_ptr<float>(), 1 << w.bits);
#if defined(__x86_64__) || defined(_M_X64)
  const bool rows16 = w.bits == 2 || (M >= rows16_m(w.bits) && rows16_available(w.bits, isa));  // 2 bits: see the caller
  Rows16Buffers r16;
  if (rows16) rows16_buffers(w, M, r16);
#else
  const bool rows16 = false;
#endif
  // Activation rows in parallel (prefill: serial, this was a sixth of a 576x1536 M = 64 call at 2
  // threads, the other thread waiting; CPU_NOTES item 138), each row quantized, its units times
  // the table scale (see Int8Args::xu) and, for the 16-row kernel, put in its order while in L1.
  std::atomic<bool> finite{true};
  const int64_t rows_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(w.K, 1));
  at::parallel_for(0, M, rows_grain, [&](int64_t m0, int64_t m1) {
    bool ok;
    switch (x2.scalar_type()) {
      case at::kBFloat16: ok = int8_x(x2.data_ptr<c10::BFloat16>(), M, m0, m1, w, quant, widen, xq, xcorr, xk, xu, xs); break;
      case at::kHalf: ok = int8_x(x2.data_ptr<c10::Half>(), M, m0, m1, w, quant, widen, xq, xcorr, xk, xu, xs); break;
      default: ok = int8_x(x2.data_ptr<float>(), M, m0, m1, w, quant, widen, xq, xcorr, xk, xu, xs);
    }
    if (!ok) {
      finite.store(false, std::memory_order_relaxed);
      return;
    }
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t m = m0; m < m1; ++m) xu[b * M + m] *= t7.scale;
#if defined(__x86_64__) || defined(_M_X64)
    if (rows16) rows16_prepare_avx512(w.bits, M, nb, m0, m1, r16.src_of, xq, xk, xu, r16.x8, r16.xinit, r16.xf);
#endif
  });
  if (!finite.load()) return false;
#if defined(__x86_64__) || defined(_M_X64)
  if (rows16) {
    rows16_gemm(w, M, r16, xs, t7, out);
    return true;
  }
#endif
  // The scale map: no division per tile in the kernel.
  for (int64_t b = 0; b < nb; ++b) {
    g0[b] = std::min<int64_t>(b * C * 32 / w.G, w.ng - 1);
    for (int p = 0; p < P; ++p)
      for (int q = 0; q < 4; ++q) {
        const int64_t g = std::min<int64_t>((b * C + (P * q + p) % C) * 32 / w.G, w.ng - 1);
        gidx[(b * P + p) * 8 + q] = gidx[(b * P + p) * 8 + 4 + q] = static_cast<int32_t>(g - g0[b]);
      }
  }
  Int8Args a;
  a.qw = w.qweight.data_ptr<uint8_t>();
  a.bits = w.bits;
  a.N = w.N;
  a.nblocks = nb;
  a.M = M;
  a.xq = xq;
  a.xcorr = xcorr;
  a.xk = xk;
  a.xu = xu;
  // Parts added as int32 when their dwords meet the same weight groups: part p of dword q meets
  // chunk (P * q + p) % C, so parts 0-1 (and 2-3) of a dword cover one 64-aligned span of 64
  // columns, and parts 0-3 (2 and 3 bits) one 128-aligned span of 128.
  a.merge = 1;
  if (w.ng == 1 || w.G % 64 == 0) a.merge = 2;
  if (w.bits != 4 && (w.ng == 1 || w.G % 128 == 0)) a.merge = 4;
  a.last_half = w.K - (nb - 1) * 64 * P <= 32 * P / 2;
  a.scales = w.scales.data_ptr();
  a.offsets = w.offsets.defined() ? w.offsets.data_ptr() : nullptr;
  a.stype = w.stype;
  a.ng = w.ng;
  a.G = w.G;
  a.xsum = xs;
  a.g0 = g0;
  a.gidx = gidx;
  std::memcpy(a.tu, t7.tu, 16);
  a.out = out;
  a.tile_pairs = cpu_tile_pairs();
#if defined(__x86_64__) || defined(_M_X64)
  if (avx512) {
    int16_t* xk2 = reinterpret_cast<int16_t*>(base + o_k2);
    int32_t* xinit = reinterpret_cast<int32_t*>(base + o_init);
    int8_prepare_avx512(w.bits, a.merge, nb * M, xq, xk, xk2, xinit);
    a.xk2 = xk2;
    a.xinit = xinit;
  }
#endif
  const int64_t grain = std::max<int64_t>(1, task_weights() / 4 / std::max<int64_t>(w.K_pad, 1));
  for_tiles(w.N_pad / 4, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  return true;
}

// The weight's part of GemmArgs (activation pointers null), for M rows into out.
static GemmArgs gemm_args(const Weight& w, int64_t M, float* out) {
  GemmArgs a{};
  a.qw = w.qweight.data_ptr<uint8_t>();
  a.bits = w.bits;
  a.K = w.K;
  a.N = w.N;
  a.K_pad = w.K_pad;
  a.N_pad = w.N_pad;
  a.nblocks = w.nblocks;
  a.M = M;
  a.scales = w.scales.data_ptr();
  a.offsets = w.offsets.defined() ? w.offsets.data_ptr() : nullptr;
  a.stype = w.stype;
  a.ng = w.ng;
  a.cpg = w.ng == 1 ? w.K_pad / 32 : w.G / 32;
  a.ngp = w.K_pad / 32 / a.cpg + 2;
  a.table = w.table.data_ptr<float>();
  a.out = out;
  return a;
}

void exact_gemm(const at::Tensor& x2, const Weight& w, int isa, bool bf16, float* out) {
  const int64_t M = x2.numel() / w.K;
  // scratch: the permuted fp32 activations, their group sums (offsets), bf16 activations (bf16 mode)
  const int64_t o_sum = align64(M * w.K_pad * 4), o_xb = align64(o_sum + M * w.ng * 4);
  at::Tensor hold;
  char* base = call_scratch(0, o_xb + M * w.K_pad * 2, hold);
  float* xp = reinterpret_cast<float*>(base);
  float* xs = w.offsets.defined() ? reinterpret_cast<float*>(base + o_sum) : nullptr;
  switch (x2.scalar_type()) {
    case at::kBFloat16: permute_x(x2.data_ptr<c10::BFloat16>(), M, w.K, w.K_pad, w.G, w.ng, xp, xs); break;
    case at::kHalf: permute_x(x2.data_ptr<c10::Half>(), M, w.K, w.K_pad, w.G, w.ng, xp, xs); break;
    default: permute_x(x2.data_ptr<float>(), M, w.K, w.K_pad, w.G, w.ng, xp, xs);
  }
  GemmFn fn = gemm_fn(isa);
  bool legacy3 = w.bits == 3 && fn != gemm_portable;
  const uint16_t* xb = nullptr;
#if defined(__x86_64__) || defined(_M_X64)
  if (bf16 && isa == kAvx512) {
    auto* dst = reinterpret_cast<uint16_t*>(base + o_xb);
    xb = dst;
    switch (x2.scalar_type()) {
      case at::kBFloat16: bf16_x(x2.data_ptr<c10::BFloat16>(), M, w.K, w.K_pad, dst); break;
      case at::kHalf: bf16_x(x2.data_ptr<c10::Half>(), M, w.K, w.K_pad, dst); break;
      default: bf16_x(x2.data_ptr<float>(), M, w.K, w.K_pad, dst);
    }
    fn = gemm_avx512bf16;
    legacy3 = false;  // decodes the layout as it is
  }
#endif
  GemmArgs a = gemm_args(w, M, out);
  a.xb = xb;
  a.x = xp;
  a.xsum = xs;
  const int64_t tiles = w.N_pad / 4;
  // ~64K weights per task at least, so small layers run on one thread.
  const int64_t grain = std::max<int64_t>(1, task_weights() / 4 / std::max<int64_t>(w.K_pad, 1));
  if (legacy3) {  // the SIMD exact kernels read 3 bits in the legacy high-bit form
    for_tiles(tiles, grain, [&](int64_t t0, int64_t t1) {
      for_legacy_tiles(a.qw, a.nblocks, t0, t1, [&](const uint8_t* base, int64_t t) {
        GemmArgs at = a;
        at.qw = base;
        fn(at, t, t + 1);
      });
    });
    return;
  }
  for_tiles(tiles, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
}

bool pair_gemm(const at::Tensor& x2, const Weight& w, int isa, bool exact, float* out) {
  const int64_t M = x2.numel() / w.K, K = w.K, chunks = w.K_pad / kPairChunkCols;
  // scratch: fp32 activations (exact: [M][K_pad] zero-padded; int8 mode: [M][K], none for fp32 x),
  // the chunks' groups, the tables, their scales and the group sums of x
  const bool f32 = x2.scalar_type() == at::kFloat;
  const int64_t xcols = exact ? w.K_pad : K;
  const int64_t o_cg = align64(exact || !f32 ? M * xcols * 4 : 0), o_lut = align64(o_cg + chunks * 4),
                o_lsc = align64(o_lut + (exact ? 0 : M * chunks * kPairLutBytes)),
                o_sum = align64(o_lsc + (exact ? 0 : M * chunks * 4)), total = o_sum + M * w.ng * 4;
  at::Tensor hold;
  char* base = call_scratch(0, total, hold);
  const float* xf = f32 ? x2.data_ptr<float>() : nullptr;
  if (exact || !f32) {
    float* dst = reinterpret_cast<float*>(base);
    const auto* xb = reinterpret_cast<const uint16_t*>(x2.data_ptr());
    for (int64_t m = 0; m < M; ++m) {
      float* d = dst + m * xcols;
      if (f32) {
        std::memcpy(d, xf + m * K, K * 4);
      } else if (x2.scalar_type() == at::kBFloat16) {
#if defined(__x86_64__) || defined(_M_X64)
        if (isa >= kAvx2) bf16_to_f32_avx2(xb + m * K, d, K);
        else
#endif
          bf16_to_f32_portable(xb + m * K, d, K);
      } else {
        for (int64_t k = 0; k < K; ++k) d[k] = f16_to_f32(xb[m * K + k]);
      }
      for (int64_t k = K; k < xcols; ++k) d[k] = 0.f;
    }
    xf = dst;
  }
  int32_t* cg = reinterpret_cast<int32_t*>(base + o_cg);
  for (int64_t c = 0; c < chunks; ++c) cg[c] = static_cast<int32_t>(std::min<int64_t>(c * kPairChunkCols / w.G, w.ng - 1));
  PairArgs a{};
  a.qw = w.qweight.data_ptr<uint8_t>();
  a.N = w.N;
  a.K = K;
  a.chunks = chunks;
  a.M = M;
  a.cg = cg;
  a.scales = w.scales.data_ptr();
  a.offsets = w.offsets.defined() ? w.offsets.data_ptr() : nullptr;
  a.stype = w.stype;
  a.ng = w.ng;
  a.out = out;
  a.tile_pairs = cpu_tile_pairs();
  PairGemmFn fn = exact ? exact_pair_portable : gemm_pair_portable;
  PairLutFn lut_fn = pair_lut_portable;
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= kAvx2) {
    fn = exact ? exact_pair_avx2 : gemm_pair_avx2;
    lut_fn = pair_lut_avx2;
  }
  if (isa == kAvx512 && !exact) {
    fn = gemm_pair_avx512;
    lut_fn = pair_lut_avx2_zmm;
  }
#endif
  if (exact) {
    a.x = xf;
    a.table = w.table.data_ptr<float>();
  } else {
    int8_t* lut = reinterpret_cast<int8_t*>(base + o_lut);
    float* lsc = reinterpret_cast<float*>(base + o_lsc);
    // the tables by all threads, in parts of up to 64 chunks of a row
    const int64_t per = 64, parts = (chunks + per - 1) / per;
    std::atomic<bool> finite{true};
    const float* table = w.table.data_ptr<float>();
    at::parallel_for(0, M * parts, 4, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t m = u / parts, c0 = (u % parts) * per, nc = std::min(per, chunks - c0);
        const int64_t k0 = c0 * kPairChunkCols;
        if (!lut_fn(xf + m * K + k0, K - k0, nc, table, lut + (m * chunks + c0) * kPairLutBytes, lsc + m * chunks + c0))
          finite = false;
      }
    });
    if (!finite) return false;
    a.lut = lut;
    a.lsc = lsc;
    if (a.offsets) {
      float* xs = reinterpret_cast<float*>(base + o_sum);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < w.ng; ++g) {
          float s = 0.f;
          for (int64_t k = g * w.G; k < std::min(K, (g + 1) * w.G); ++k) s += xf[m * K + k];
          xs[m * w.ng + g] = s;
        }
      a.xsum = xs;
    }
    // the M rows' tables of a K block: ~128 KB (half of a small L2)
    a.kbc = std::max<int64_t>(8, 512 / M);
  }
  const int64_t tiles = w.N_pad / kPairTileRows;
  const int64_t grain = std::max<int64_t>(1, task_weights() / kPairTileRows / std::max<int64_t>(w.K_pad, 1));
  for_tiles(tiles, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  return true;
}

void amx_gemm(const at::Tensor& x2, const Weight& w, float* out) {
#if defined(__x86_64__) || defined(_M_X64)
  const int64_t M = x2.numel() / w.K, mbs = (M + 15) / 16;
  at::Tensor hold;
  auto* xb = reinterpret_cast<uint16_t*>(call_scratch(0, w.K_pad * mbs * 16 * 2, hold));
  amx_prepare_x(reinterpret_cast<const uint16_t*>(x2.data_ptr<c10::BFloat16>()), M, w.K, w.K_pad, xb, false);
  GemmArgs a = gemm_args(w, M, out);
  a.xb = xb;
  const int64_t blocks = (w.N_pad + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(w.K_pad, 1));
  for_tiles(blocks, grain, [&](int64_t b0, int64_t b1) { gemm_amx(a, b0, b1); });
#else
  (void)x2, (void)w, (void)out;
#endif
}

void amx_gemm_rows(const at::Tensor& x2, const Weight& w, uint16_t* out) {
#if defined(__x86_64__) || defined(_M_X64)
  const int64_t M = x2.numel() / w.K, pairs = (M + 31) / 32, chunks = w.K_pad / 32;
  at::Tensor hold;
  auto* xb = reinterpret_cast<uint16_t*>(call_scratch(0, w.K_pad * pairs * 32 * 2, hold));
  const auto* x = reinterpret_cast<const uint16_t*>(x2.data_ptr<c10::BFloat16>());
  // the activation tiles of each 32-row pair are contiguous (by_block): laid out a pair range per
  // thread (on one thread, 512 x 576 took ~1/16 of the product's time)
  at::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    amx_prepare_x(x + p0 * 32 * w.K, std::min(M, p1 * 32) - p0 * 32, w.K, w.K_pad, xb + p0 * 2 * chunks * 512, true);
  });
  GemmArgs a = gemm_args(w, M, nullptr);
  a.xb = xb;
  a.outb = out;
  // Tasks: blocks of R weight rows times S parts of the activation rows, S > 1 where the blocks
  // are under 4 per thread. R = 128 (each decoded K block serves 4 A pairs) unless 96 or 64 rows
  // give the threads less work each: 576 weight rows at 2 threads are 5 blocks of 128 in 10 tasks,
  // 5 of them one thread's (20 of 36 pair-parts), or 6 blocks of 96 in 12 tasks (18 each).
  // Beyond K = 4096, where R = 128 already spans 3+ K blocks, R = 256 when it splits as evenly:
  // each activation tile read from L3 then serves 8 A pairs, not 4 (4096 x 14336 at 512 rows:
  // +3-22%; at K = 2048-4096 its extra K blocks cost 3-9%, CPU_NOTES item 118).
  const int64_t nt = at::get_num_threads(), want = 4 * nt;
  int64_t R = 128, S = 1, best = -1;
  for (int64_t r : {256, 128, 96, 64}) {
    if (r == 256 && w.K <= 4096) continue;
    const int64_t blocks = (w.N_pad + r - 1) / r;
    const int64_t s = std::min<int64_t>(pairs, (want + blocks - 1) / blocks);
    const int64_t load = (blocks * s + nt - 1) / nt * r / s;  // weight rows x parts of a thread
    if (best < 0 || load < best) R = r, S = s, best = load;
  }
  const int64_t blocks = (w.N_pad + R - 1) / R;
  for_tasks_stealing(blocks * S, [&](int64_t t0, int64_t t1) { gemm_amx_rows(a, R, S, t0, t1); });
#else
  (void)x2, (void)w, (void)out;
#endif
}

}  // namespace flute_cpu::binding
