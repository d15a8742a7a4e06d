// The fused path of the CPU op, torch side: activations prepared once per call (fp32 chunk-permuted
// or bf16) and the calls of the ISA's exact, bf16, pair-table and AMX kernels (lut_kernel.h,
// pair_lut.h); the int8 mode is int8_gemm.cpp, the split of row tiles between threads
// (for_tiles) binding.h. Declared in binding.h.
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

}  // namespace

void bf16_to_f32_portable(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

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


// The weight's part of GemmArgs (activation pointers null), for M rows into out.
static GemmArgs gemm_args(const Weight& w, int64_t M, float* out) {
  GemmArgs a{};
  a.qw = w.qweight->data_ptr<uint8_t>();
  a.bits = w.bits;
  a.K = w.K;
  a.N = w.N;
  a.K_pad = w.K_pad;
  a.N_pad = w.N_pad;
  a.nblocks = w.nblocks;
  a.M = M;
  a.scales = w.scales->data_ptr();
  a.offsets = w.offsets->defined() ? w.offsets->data_ptr() : nullptr;
  a.stype = w.stype;
  a.ng = w.ng;
  a.cpg = w.ng == 1 ? w.K_pad / 32 : w.G / 32;
  a.ngp = w.K_pad / 32 / a.cpg + 2;
  a.table = w.table->data_ptr<float>();
  a.out = out;
  a.tile_bytes = w.tile_bytes;
  a.last_bytes = w.last_bytes;
  return a;
}

void exact_gemm(const at::Tensor& x2, const Weight& w, int isa, bool bf16, float* out) {
  const int64_t M = x2.numel() / w.K;
  // scratch: the permuted fp32 activations, their group sums (offsets), bf16 activations (bf16 mode)
  const int64_t o_sum = align64(M * w.K_pad * 4), o_xb = align64(o_sum + M * w.ng * 4);
  at::Tensor hold;
  char* base = call_scratch(0, o_xb + M * w.K_pad * 2, hold);
  float* xp = reinterpret_cast<float*>(base);
  float* xs = w.offsets->defined() ? reinterpret_cast<float*>(base + o_sum) : nullptr;
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
  // The SIMD exact kernels read a short last block themselves at 4 bits, 3 bits through the legacy
  // high-bit form (for_legacy_tiles, whole blocks); the bf16 and portable ones take tiles with whole
  // last blocks (for_whole_tiles).
  const int64_t whole = 4 * w.nblocks * block_bytes(w.bits);
  if (legacy3) {
    for_tiles(tiles, grain, [&](int64_t t0, int64_t t1) {
      for_legacy_tiles(a.qw, a.nblocks, w.tile_bytes, w.last_bytes, t0, t1, [&](const uint8_t* base, int64_t t) {
        GemmArgs al = a;
        al.qw = base;
        al.tile_bytes = whole;
        al.last_bytes = block_bytes(3);
        fn(al, t, t + 1);
      });
    });
    return;
  }
  const bool native = w.bits == 4 && fn != gemm_portable && xb == nullptr;
  for_tiles(tiles, grain, [&](int64_t t0, int64_t t1) {
    if (native) {
      fn(a, t0, t1);
      return;
    }
    for_whole_tiles(w, t0, t1, [&](const uint8_t* tw, int64_t ta, int64_t tb) {
      GemmArgs at = a;
      at.qw = tw;
      at.tile_bytes = whole;
      at.last_bytes = block_bytes(w.bits);
      fn(at, ta, tb);
    });
  });
}

bool pair_gemm(const at::Tensor& x2, const Weight& w, int isa, bool exact, float* out, HalfOut* half) {
  const int64_t M = x2.numel() / w.K, K = w.K, chunks = w.K_pad / kPairChunkCols;
  // scratch: fp32 activations (exact: [M][K_pad] zero-padded; int8 mode: [M][K], none for fp32 x),
  // the chunks' groups, the tables, their scales and the group sums of x
  const bool f32 = x2.scalar_type() == at::kFloat;
  const int64_t xcols = exact ? w.K_pad : K;
  const int64_t o_cg = align64(exact || !f32 ? M * xcols * 4 : 0), o_lut = align64(o_cg + chunks * 4),
                o_lsc = align64(o_lut + (exact ? 0 : M * chunks * kPairLutBytes)),
                o_sum = align64(o_lsc + (exact ? 0 : M * chunks * 4)), total = o_sum + M * w.ng * 4;
  PairArgs a0{};
  a0.qw = w.qweight->data_ptr<uint8_t>();
  a0.N = w.N;
  a0.K = K;
  a0.chunks = chunks;
  a0.M = M;
  a0.scales = w.scales->data_ptr();
  a0.offsets = w.offsets->defined() ? w.offsets->data_ptr() : nullptr;
  a0.stype = w.stype;
  a0.ng = w.ng;
  a0.out = out;
  a0.tile_pairs = cpu_tile_pairs();
  PairGemmFn fn = exact ? exact_pair_portable : gemm_pair_portable;
  PairLutFn lut_fn = pair_lut_portable;
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= kAvx2) {
    fn = exact ? exact_pair_avx2 : gemm_pair_avx2;
    lut_fn = pair_lut_avx2;
  }
  if (isa == kAvx512 && !exact) {
    fn = gemm_pair_avx512;
    lut_fn = pair_lut_avx512;
  }
#endif
  // The tables are built in parts of up to 64 chunks of a row (by all threads when there are several)
  const int64_t per = 64, parts = (chunks + per - 1) / per;
  // Everything the kernels read besides the weight, into `base`: the activations in fp32, each
  // chunk's group, and in int8 mode the pair tables, their scales and x's group sums. False when x
  // is not finite (int8 mode).
  auto prepare = [&](char* base, PairArgs& a, TileRange first) {
    a = a0;
    const float* xf = f32 ? x2.data_ptr<float>() : nullptr;
    if (exact || !f32) {
      float* dst = reinterpret_cast<float*>(base);
      const auto* xb = reinterpret_cast<const uint16_t*>(x2.data_ptr());
      for (int64_t m = 0; m < M; ++m) {
        float* d = dst + m * xcols;
        if (f32) {
          std::memcpy(d, xf + m * K, K * 4);
        } else if (x2.scalar_type() == at::kBFloat16) {
          bf16_to_f32_fn(isa)(xb + m * K, d, K);
        } else {
          for (int64_t k = 0; k < K; ++k) d[k] = f16_to_f32(xb[m * K + k]);
        }
        for (int64_t k = K; k < xcols; ++k) d[k] = 0.f;
      }
      xf = dst;
    }
    int32_t* cg = reinterpret_cast<int32_t*>(base + o_cg);
    // Counted along the row (groups here are whole chunks, or one group), not divided out: 48 integer
    // divisions were ~0.25 us of each thread's set-up of a one-row 576x1536 call.
    const int64_t per_group = w.ng == 1 ? INT64_MAX : w.G / kPairChunkCols;
    for (int64_t c = 0, grp = 0, left = per_group; c < chunks; ++c) {
      cg[c] = static_cast<int32_t>(std::min<int64_t>(grp, w.ng - 1));
      if (--left == 0) {
        ++grp;
        left = per_group;
      }
    }
    a.cg = cg;
    if (exact) {
      a.x = xf;
      a.table = w.table->data_ptr<float>();
      return true;
    }
    int8_t* lut = reinterpret_cast<int8_t*>(base + o_lut);
    float* lsc = reinterpret_cast<float*>(base + o_lsc);
    std::atomic<bool> finite{true};
    const float* table = w.table->data_ptr<float>();
    if (M == 1 && parts == 1 && first.t1 > first.t0) {
      // This thread's own tables, built 4 chunks at a time; in between, the first kPairPrefetchBytes
      // of each of its weight streams (pair_tile_loop's: its range, or its two halves with tile
      // pairs) are requested a few lines at a time: the lines no kernel prefetch covers, which
      // arrive while the tables are built instead of after. A burst of them before the build gained
      // nothing (CPU_NOTES item 173); spread, 2 threads from DRAM: 576x1536 18.3 -> 17.3 us,
      // 1536x576 16.5 -> 15.9 (item 216).
      const int64_t tb = chunks * kPairChunkBytes, n = first.t1 - first.t0;
      const int64_t H = a0.tile_pairs ? n / 2 : 0;
      const char* sa = reinterpret_cast<const char*>(pair_tile(a0.qw, chunks, first.t0));
      const char* sb = reinterpret_cast<const char*>(pair_tile(a0.qw, chunks, first.t0 + H));
      StreamWarm warm;
      warm.stream[0] = sa;
      if (H > 0) warm.stream[1] = sb;
      warm.lines = std::min<int64_t>(kPairPrefetchBytes, (H > 0 ? H : n) * tb) / 64;
      constexpr int64_t kStep = 4;
      for (int64_t c0 = 0; c0 < chunks; c0 += kStep) {
        warm.step((warm.lines * kStep + chunks - 1) / chunks);
        const int64_t nc = std::min(kStep, chunks - c0), k0 = c0 * kPairChunkCols;
        if (!lut_fn(xf + k0, K - k0, nc, table, lut + c0 * kPairLutBytes, lsc + c0)) finite = false;
      }
    } else {
      at::parallel_for(0, M * parts, 4, [&](int64_t u0, int64_t u1) {  // inline inside a parallel region
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t m = u / parts, c0 = (u % parts) * per, nc = std::min(per, chunks - c0);
          const int64_t k0 = c0 * kPairChunkCols;
          if (!lut_fn(xf + m * K + k0, K - k0, nc, table, lut + (m * chunks + c0) * kPairLutBytes,
                      lsc + m * chunks + c0))
            finite = false;
        }
      });
    }
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
    return true;
  };
  const int64_t tiles = w.N_pad / kPairTileRows;
  const int64_t grain = std::max<int64_t>(1, task_weights() / kPairTileRows / std::max<int64_t>(w.K_pad, 1));
  // One activation row with tile pairs (Intel CPUs): one contiguous range per thread, each read as
  // two streams (its halves), rather than for_tiles' dynamic chunks, which cut a thread's streams
  // into runs of a few tiles (576x1536: chunks of 9 tiles, streams of 4). On session 31's Xeon VM,
  // 2 threads, from DRAM, alternating processes: 576x1536 22.1-22.2 -> 20.4-20.6 us, 8192x2048
  // 218-229 -> 208-215 us, 14336x4096 732-746 -> 707-722 us, the other shapes equal or faster
  // (CPU_NOTES item 154). The 4-row int8 kernel showed no such gain, and keeps for_tiles.
  const bool contiguous = !exact && a0.tile_pairs && M == 1;
  if (!exact && M == 1 && parts == 1) {
    // One row's tables (up to 2048 columns, one part: built by one thread anyway): each thread
    // builds its own copy and runs its tiles (for_tiles_prepared; CPU_NOTES item 174).
    const bool ok = for_tiles_prepared<PairArgs>(
        tiles, grain, contiguous,
        [&](PairArgs& a, TileRange first) {
          at::Tensor hold;
          return prepare(call_scratch(0, total, hold), a, first);
        },
        [&](const PairArgs& a, int64_t t0, int64_t t1) {
          fn(a, t0, t1);
          if (half) to_half(out, *half, t0 * kPairTileRows, std::min(w.N, t1 * kPairTileRows));
        });
    if (ok && half) half->done = true;
    return ok;
  }
  at::Tensor hold;
  PairArgs a;
  if (!prepare(call_scratch(0, total, hold), a, TileRange{})) return false;
  if (contiguous)
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  else
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
