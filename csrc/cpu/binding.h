// Shared by the translation units of the CPU op's torch binding: settings.cpp (run-time settings),
// binding.cpp (argument checks, the panel path, op registration), fused_gemm.cpp (the fused
// kernel's calls), int8_gemm.cpp (its int8 mode) and int8_table.cpp (that mode's table).
// Not a kernel header: it includes ATen (the kernels' interface is lut_kernel.h, torch-free).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/MaybeOwned.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lut_kernel.h"
#include "pair_lut.h"

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
  // The op's own tensors borrowed (no reference taken), or the converted copies owned. A copy of
  // an at::Tensor that Python holds alone takes a reference to its Python object as well (torch's
  // PyObject preservation, c10/util/intrusive_ptr.h), and with the GIL released each such
  // increment and its later decrement acquire the GIL: four tensors copied per call were ~10 GIL
  // round trips, a third of a small call's instructions (CPU_NOTES item 214).
  c10::MaybeOwned<at::Tensor> scales, offsets, table, qweight;
  int stype;
  // 3/4 bits: one 4-row tile's bytes and a row's last block's (lut_kernel.h, last_block_bytes:
  // less than block_bytes where the last block is stored short)
  int64_t tile_bytes = 0;
  int last_bytes = 0;
};

// fn(base, ta, tb) over tiles [t0, t1) of w (3/4 bits) in the form of the readers that take whole
// last blocks (the bf16 mode's, the portable and the decode kernels), which address tile t at base + t *
// 4 * nblocks * block_bytes: the layout itself (one call), or where its last blocks are stored
// short, batches of tiles expanded (expand_tiles) into a buffer of the calling thread (up to 64 KB:
// cache-resident; base never dereferenced outside the batch). The copy is not overlapped with the
// kernels' arithmetic: the exact mode's 4-bit 1536x576 call from DRAM took 37 -> 56 us at 2
// threads this way, so the exact SIMD kernels read the short block themselves (CPU_NOTES item 189).
template <typename F>
void for_whole_tiles(const Weight& w, int64_t t0, int64_t t1, const F& fn) {
  const uint8_t* qw = w.qweight->data_ptr<uint8_t>();
  if (w.bits == 2 || w.last_bytes == block_bytes(w.bits)) {
    fn(qw, t0, t1);
    return;
  }
  const int64_t whole = 4 * w.nblocks * block_bytes(w.bits);
  const int64_t batch = std::max<int64_t>(1, (int64_t(64) << 10) / whole);
  thread_local std::vector<uint8_t> buf;
  if (static_cast<int64_t>(buf.size()) < batch * whole) buf.resize(batch * whole);
  for (int64_t ta = t0; ta < t1; ta += batch) {
    const int64_t tb = std::min(t1, ta + batch);
    expand_tiles(qw, w.bits, w.K, w.nblocks, ta, tb, buf.data());
    fn(reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(buf.data()) - static_cast<uintptr_t>(ta * whole)),
       ta, tb);
  }
}

// 3 bits on the SIMD exact kernels (gemm_avx2/avx512, decode_avx2/avx512), which read
// the older 3-bit form (the 2-bit block of the low bits, then lane masks of the high bits): tiles
// [t0, t1) one at a time, each converted into a buffer (legacy_3bit_tile_avx2), fn(base, t) with a
// layout base pointer that places tile t at the buffer (the kernels address tile t at base + t *
// tile bytes; the base itself is never dereferenced). The conversion is ~8% of those kernels'
// instructions for 3 bits at M = 1 (callgrind, 512x1024 exact AVX2; ~6% when it only converted
// the high plane), less at larger M; the int8 mode, the bf16 decoders (avx512bf16_common.h) and the
// portable kernels read the layout as it is. src_tile / last: the layout's tile and last-block
// bytes (a short last block's 4 rows are expanded, then converted; the buffer's tiles are whole).
template <typename F>
void for_legacy_tiles(const uint8_t* qw, int64_t nblocks, int64_t src_tile, int last, int64_t t0, int64_t t1,
                      const F& fn) {
#if defined(__x86_64__) || defined(_M_X64)
  constexpr int BB = 12 * 8;  // block_bytes(3)
  const int64_t tile_bytes = 4 * nblocks * BB;
  at::Tensor buf = at::empty({tile_bytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* b = buf.data_ptr<uint8_t>();
  alignas(64) uint8_t rows[4 * BB];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* src = qw + t * src_tile;
    if (last == BB) {
      legacy_3bit_tile_avx2(src, b, 4 * nblocks);
    } else {
      legacy_3bit_tile_avx2(src, b, 4 * (nblocks - 1));
      expand_last_rows(3, src, nblocks, last, rows);
      legacy_3bit_tile_avx2(rows, b + (nblocks - 1) * 4 * BB, 4);
    }
    fn(reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(b) - static_cast<uintptr_t>(t * tile_bytes)), t);
  }
#else
  (void)qw, (void)nblocks, (void)src_tile, (void)last, (void)t0, (void)t1, (void)fn;
#endif
}

// Run-time settings, decided once in settings.cpp.
// Arithmetic mode of the fused kernel: exact (fp32), bf16 (opt-in, AVX512_BF16 CPUs) or int8 (the
// default: int8 activations and a 7-bit table; see Int8Args).
enum Mode : int { kModeExact = 0, kModeBf16 = 1, kModeInt8 = 2 };
int active_isa();          // Isa in use (flute.set_cpu_isa, FLUTE_CPU_ISA; the best by default)
int active_mode();         // Mode in use (flute.set_cpu_mode, FLUTE_CPU_MODE)
bool has_native_bf16();    // AVX512_BF16 and VBMI on an AVX-512 CPU
bool has_bf16_kernel();    // ... and the bf16 mode's kernel built
int64_t task_weights();    // least weights (rows x K_pad) per task of the fused kernels' thread split
int64_t rows16_m(int bits);  // activation rows from which the int8 mode runs the 16-row kernel
int64_t rows16_large_m();    // ... and up to which (not included) it runs instead of the panel path
constexpr int64_t kNoPanel = INT64_MAX;  // rows16_large_m() and panel_m() when no row count takes the panel path
bool rows16_available(int bits, int isa);  // the 16-row kernel built and supported on this path
int64_t cpu_rows16_m(int64_t bits);  // rows16_m(bits) where it runs on the active path, else 0
int64_t panel_m(int bits, int isa);  // activation rows from which the panel path runs (the mode in use, that path)
int64_t cpu_panel_m(int64_t bits);   // panel_m(bits) on the active path, 0 for none
int64_t large_m();         // activation rows from which the panel path (decode + at::mm) is used
int64_t panel_bytes();     // bytes of one decoded panel
int64_t amx_m();           // activation rows from which bf16 activations take the AMX path
// The op's settings as flute._cpu exposes them (torch.ops.flute.cpu_*; flute/ops.py wraps them).
std::string cpu_isa();
std::string cpu_set_isa(const std::string& name);
std::string cpu_mode();
std::string cpu_set_mode(const std::string& name);
bool cpu_amx();
bool cpu_set_amx(bool on);
bool cpu_tile_pairs();  // whether the M = 1 int8 kernels read tile pairs (Int8Args::tile_pairs)
bool cpu_set_tile_pairs(bool on);
// The AVX2 int8 kernel's form: 0 its int16 one (gemm_int8_avx2), 1 AVX-VNNI (gemm_int8_avxvnni),
// 2 AVX512-VNNI on ymm (gemm_int8_avx512vnni_ymm), 3 the int16 one EVEX encoded
// (gemm_int8_avx512bw_ymm): the CPU's best, unless set otherwise.
int vnni_form();
std::string cpu_vnni();  // "", "avxvnni", "avx512vnni_ymm" or "avx512bw_ymm" (vnni_form's name)
std::vector<std::string> cpu_vnni_forms();  // the forms this CPU and build can run
std::vector<std::string> cpu_units();  // the optional kernel units this build holds (flute info)
std::string cpu_set_vnni(bool on);  // the best VNNI form, or the best int16 one
std::string cpu_set_vnni_form(const std::string& name);  // a form by its name ("": the VEX int16 one)
int64_t cpu_compact_k();  // columns from which M = 1 int8 calls use compact activations (Int8Args::xkq)
int64_t cpu_set_compact_k(int64_t k);

// Activation rows up to which bf16 activations take the AMX path that streams the weights once
// (gemm_amx, one pass of up to 4 C tiles); beyond, the blocked AMX kernel (gemm_amx_rows). In one
// process at 2 threads, 14336x4096 4-bit, x bf16 matmul: M = 80 1.40 vs 1.14, M = 128 1.04 vs
// 0.78, M = 192 1.05 vs 0.66 (gemm_amx_rows vs gemm_amx; CPU_NOTES item 112).
constexpr int64_t kAmxMaxM = 64;
// The panel path's buffer is kept by the calling thread between calls (call_scratch slot 2) up to
// this size: a fresh 117 MB buffer costs ~28 ms of page faults on this project's VM, more than its
// decode (~11 ms). A larger one, from a few panels of a large layer at a large M, is allocated per
// call; this holds a 14336x4096 bf16 weight whole.
constexpr int64_t kPanelCachedBytes = int64_t(128) << 20;

// The op's bf16 or fp16 result of a one-row call, converted by each thread from its own fp32
// columns right after computing them: when the calling thread converted all of them at the end, it
// read the other threads' halves from their cores' caches, ~0.8 us of a 16 us call (4-bit 1536x576,
// 2 threads, in cache; CPU_NOTES item 177). `done` is set by the callee that wrote dst.
struct HalfOut {
  void* dst = nullptr;  // [N] bf16 (bf16 = true) or fp16
  bool bf16 = true;
  int isa = 0;
  bool done = false;
};
// Columns [c0, c1) of src (fp32) into h.dst, rounded to nearest even.
void to_half(const float* src, const HalfOut& h, int64_t c0, int64_t c1);

// The fused kernel's int8 mode into out [M, N] fp32 (x2: contiguous fp32, bf16 or fp16 with last
// dimension K, M rows in all); false, with out unwritten, when x is not finite: the caller then
// takes the exact path. With `half`, it also writes half->dst (HalfOut), each thread the columns
// it computed, and sets half->done.
bool int8_gemm(const at::Tensor& x2, const Weight& w, int isa, float* out, HalfOut* half = nullptr);

// The int8 mode's table: 7-bit integers t7 (stored as u = t7 + 64) times one scale. The scale is
// max|t| / d for the d in [8, 63] (steps of 1/16) with the least squared rounding error, the
// largest d on ties: uniform tables (int, fp4) become exact (d = 8 for the int table), and NF4's
// error drops below max|t| / 126. flute.testing.reference_qgemm_int8 makes the same choice.
struct Table7 {
  uint8_t tu[16];
  float scale;
};
// The Table7 of table t (n entries; int8_table.cpp), cached per thread: the choice of scale costs
// ~10 us and a model reuses its tables every call.
const Table7& table7(const float* t, int n);

// The fused kernel's exact (fp32) mode, or with bf16 = true on an AVX-512 path its bf16 mode
// (AVX512_BF16 CPUs), into out [M, N] fp32 (x2 as for int8_gemm).
void exact_gemm(const at::Tensor& x2, const Weight& w, int isa, bool bf16, float* out);

// 2 bits (the pair layout, pair_lut.h) into out [M, N] fp32, x2 as for int8_gemm: the int8 mode's
// pair tables (exact = false; false, with out unwritten, when x is not finite) or the exact mode.
bool pair_gemm(const at::Tensor& x2, const Weight& w, int isa, bool exact, float* out, HalfOut* half = nullptr);

// The AMX path (kernel_amx.cpp) into out [M, N] fp32: x2 contiguous bf16 with last dimension K, M
// rows in all; groups of a multiple of 32 columns or one group; only where cpu_amx() is true.
void amx_gemm(const at::Tensor& x2, const Weight& w, float* out);
void amx_gemm_rows(const at::Tensor& x2, const Weight& w, uint16_t* out);

// flute::qgemm's typed dispatcher handle (binding.cpp): for calls below the autograd key and for
// the direct Python entry (python_entry.cpp).
using QgemmHandle = const c10::TypedOperatorHandle<at::Tensor(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, int64_t, int64_t, int64_t, int64_t)>&;
QgemmHandle qgemm_handle();

// Per-call temporaries (slot 0: the fused path's activations, fused_gemm.cpp; slot 1: the
// fp32 output before its conversion to bf16 or fp16; slot 2: the panel path's decoded panel,
// binding.cpp): `bytes` from a grow-only buffer of the calling thread, 64-byte aligned, or above
// max_cached from a tensor put in `hold`. Each
// at::empty and its release cost ~2.5K instructions, and a small decode call (4x128) made three of
// them in ~16K (callgrind). The buffer is only used during the call (the kernels never call back
// into torch), and each thread calling the op has its own.
constexpr int64_t kScratchCachedBytes = int64_t(16) << 20;
char* call_scratch(int slot, int64_t bytes, at::Tensor& hold, int64_t max_cached = kScratchCachedBytes);

// Bytes from `off` rounded up to a 64-byte boundary (the scratch buffers' parts).
inline int64_t align64(int64_t off) { return (off + 63) / 64 * 64; }

// bf16 activations widened to fp32 (the int8 mode's quantizers read fp32): the ISA's version
// (bf16_to_f32_avx2) or bf16_to_f32_portable (fused_gemm.cpp).
using Bf16ToF32Fn = void (*)(const uint16_t*, float*, int64_t);
void bf16_to_f32_portable(const uint16_t* src, float* dst, int64_t n);
inline Bf16ToF32Fn bf16_to_f32_fn(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= kAvx2) return bf16_to_f32_avx2;
#endif
  (void)isa;
  return bf16_to_f32_portable;
}

// A read of the line at p requested ahead of use (into all cache levels); never faults.
inline void prefetch_line(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// Row tiles [t0, t1) (empty where t1 <= t0).
struct TileRange {
  int64_t t0 = 0, t1 = 0;
};

// The first `lines` cache lines of up to two weight streams, requested a few at a time (step) while
// a thread prepares its call: the lines that no prefetch of the kernel covers, since it prefetches
// a distance ahead of where it reads. Spread over the set-up rather than one burst, which stalls
// the thread on the cache's fill buffers (a burst gained nothing: CPU_NOTES item 173).
struct StreamWarm {
  const char* stream[2] = {nullptr, nullptr};
  int64_t lines = 0, done = 0;
  void step(int64_t n) {
    for (const int64_t end = std::min(lines, done + n); done < end; ++done)
      for (const char* s : stream)
        if (s) prefetch_line(s + 64 * done);
  }
};

// Each thread's share of the row tiles, [lo, hi) packed into one word so that its owner (taking
// steps from the front) and another thread (taking the back half) change it with one
// compare-and-swap each. Its own cache line: the owner updates it every step.
struct alignas(64) TileShare {
  std::atomic<uint64_t> v{0};
  static uint64_t pack(int64_t lo, int64_t hi) { return static_cast<uint64_t>(hi) << 32 | static_cast<uint64_t>(lo); }
  static int64_t lo(uint64_t v) { return static_cast<int64_t>(v & 0xFFFFFFFFu); }
  static int64_t hi(uint64_t v) { return static_cast<int64_t>(v >> 32); }
  // The next tiles from the front into r: `step`, or near the end half of what is left (at least
  // `least`), so that the back half stays for a thread that runs out; false when none are left.
  bool take_front(int64_t step, int64_t least, TileRange& r) {
    uint64_t cur = v.load(std::memory_order_relaxed);
    while (lo(cur) < hi(cur)) {
      const int64_t left = hi(cur) - lo(cur);
      const int64_t end = lo(cur) + std::min(left, std::max(least, std::min(step, left / 2)));
      if (v.compare_exchange_weak(cur, pack(end, hi(cur)), std::memory_order_acq_rel, std::memory_order_relaxed)) {
        r = {lo(cur), end};
        return true;
      }
    }
    return false;
  }
};

// The back half of the largest share of another thread with at least `least` tiles left, made the
// share of thread `me` (whose own is empty); false when no share has that many.
inline bool steal_back_half(TileShare* shares, int64_t n, int64_t me, int64_t least) {
  for (int tries = 0; tries < 8; ++tries) {
    int64_t victim = -1, most = least - 1;
    uint64_t seen = 0;
    for (int64_t j = 0; j < n; ++j) {
      const uint64_t w = shares[j].v.load(std::memory_order_relaxed);
      if (j != me && TileShare::hi(w) - TileShare::lo(w) > most) {
        most = TileShare::hi(w) - TileShare::lo(w);
        victim = j;
        seen = w;
      }
    }
    if (victim < 0) return false;
    const int64_t lo = TileShare::lo(seen), hi = TileShare::hi(seen), mid = hi - (hi - lo) / 2;
    if (shares[victim].v.compare_exchange_strong(seen, TileShare::pack(lo, mid), std::memory_order_acq_rel,
                                                 std::memory_order_relaxed)) {
      shares[me].v.store(TileShare::pack(mid, hi), std::memory_order_release);
      return true;
    }
  }
  return false;
}

// fn(ctx, t0, t1) over the row tiles [0, tiles), at least `grain` tiles per call of fn, after
// setup(ctx, first) (ctx = Ctx{}) once in every thread that takes tiles (once in all when the call
// runs on one thread); `first` is the first range the thread will run (empty if none), so that a
// setup can start reading its weights (StreamWarm). False, with no tile run by that thread, where a
// setup returned false (every thread sees the same input, so all of them do).
// - Per-thread preparation (one activation row quantized, its lookup tables): it then runs in
//   parallel rather than before the threads start, and each thread reads its own copy from its own
//   cache instead of one thread's from another core (CPU_NOTES item 171).
// - Large calls: each thread streams one contiguous share of the tiles in steps, and a thread
//   whose share is done takes the back half of the largest share left (work stealing), so that a
//   core slowed down on a shared or virtualized machine does not hold the call: with another
//   process busy on one of 2 cores, 14336x4096 4-bit M=1 took 0.92x the mean time of the
//   shared-counter chunks used before and a static split 1.01x (CPU_NOTES item 293). Those chunks
//   (8 per thread) made each a new weight stream for its thread: in the VM's fast memory state
//   4096x4096 and 14336x4096 took 7-10% longer with them than with one range per thread.
//   Steps of share / 8 (each call of fn costs ~0.1-0.5 us at M=1: steps of one grain were 3-5%
//   slower, steps of 16 grains 2-4% slower than share / 8 on 14336x4096 at M=1 and 4; batches
//   re-read their activations per call), near a share's end half of what is left, so that its
//   back half stays to be stolen, and never less than 4 grains (the chunks' least before); shares
//   with fewer than 4 grains left are not stolen from.
// - Calls with fewer than 16 grains per thread (with steps of 1 grain there 576x1536 and 1536x576
//   at 64 and 512 rows took 1.01-1.06x the chunks' time, static ranges 0.98-0.99x), and every call with
//   `contiguous`, keep a static split, one range per thread, as at::parallel_for(0, tiles, grain)
//   cuts it.
template <typename Ctx, typename S, typename F>
bool for_tiles_prepared(int64_t tiles, int64_t grain, bool contiguous, const S& setup, const F& fn) {
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || tiles <= grain) {
    Ctx ctx{};
    if (!setup(ctx, TileRange{0, tiles})) return false;
    fn(ctx, 0, tiles);
    return true;
  }
  std::atomic<bool> ok{true};
  if (contiguous || tiles < nt * 16 * grain || tiles >= (int64_t{1} << 31)) {  // (TileShare packs 32-bit bounds)
    const int64_t tasks = std::min(nt, (tiles + grain - 1) / grain), chunk = (tiles + tasks - 1) / tasks;
    at::parallel_for(0, tasks, 1, [&](int64_t i0, int64_t i1) {
      Ctx ctx{};
      if (!setup(ctx, TileRange{i0 * chunk, std::min(tiles, (i0 + 1) * chunk)})) {
        ok.store(false, std::memory_order_relaxed);
        return;
      }
      for (int64_t i = i0; i < i1; ++i) fn(ctx, i * chunk, std::min(tiles, (i + 1) * chunk));
    });
    return ok.load();
  }
  const int64_t share = (tiles + nt - 1) / nt;
  const int64_t least = 4 * grain, step = std::max<int64_t>(least, share / 8);
  std::vector<TileShare> shares(nt);
  for (int64_t i = 0; i < nt; ++i)
    shares[i].v.store(TileShare::pack(std::min(tiles, i * share), std::min(tiles, (i + 1) * share)),
                      std::memory_order_relaxed);
  at::parallel_for(0, nt, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t me = i0; me < i1; ++me) {
      Ctx ctx{};
      const uint64_t own = shares[me].v.load(std::memory_order_relaxed);
      const int64_t lo = TileShare::lo(own);
      if (!setup(ctx, TileRange{lo, std::min(TileShare::hi(own), lo + step)})) {
        ok.store(false, std::memory_order_relaxed);
        return;
      }
      TileRange r;
      do {
        while (shares[me].take_front(step, least, r)) fn(ctx, r.t0, r.t1);
      } while (steal_back_half(shares.data(), nt, me, least));
    }
  });
  return ok.load();
}

// fn(t0, t1) over the row tiles, split as for_tiles_prepared splits them; no preparation.
template <typename F>
void for_tiles(int64_t tiles, int64_t grain, const F& fn) {
  struct None {};
  for_tiles_prepared<None>(tiles, grain, false, [](None&, TileRange) { return true; },
                           [&](const None&, int64_t t0, int64_t t1) { fn(t0, t1); });
}

}  // namespace flute_cpu::binding
