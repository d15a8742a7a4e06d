// Config choice and launch: a heuristic over (M, N, K, bits, group, SM count, shared memory).
// No online tuning, no device synchronization, nothing allocated here (the binding passes a
// persistent workspace), so launches are CUDA-graph safe. Every geometric number comes from
// LayoutTraits / GemmConfig (flute_config.cuh) through one runtime-to-template dispatcher.
#include <algorithm>
#include <mutex>
#include <type_traits>

#include "flute_kernels.cuh"
#include "flute_launch.h"

namespace flute {
namespace {

// ---- the one runtime -> template dispatcher ----------------------------------------------------
// Calls f(GemmConfig<bits, m_tiles16>{}) (f(LayoutTraits<bits>{}) for with_layout); returns
// `fallback` for a combination that is not compiled.
template <typename F, typename R>
R with_config(int bits, int m_tiles16, R fallback, F&& f) {
  switch (bits * 8 + m_tiles16) {
    case 2 * 8 + 1: return f(GemmConfig<2, 1>{});
    case 2 * 8 + 2: return f(GemmConfig<2, 2>{});
    case 2 * 8 + 4: return f(GemmConfig<2, 4>{});
    case 3 * 8 + 1: return f(GemmConfig<3, 1>{});
    case 3 * 8 + 2: return f(GemmConfig<3, 2>{});
    case 3 * 8 + 4: return f(GemmConfig<3, 4>{});
    case 4 * 8 + 1: return f(GemmConfig<4, 1>{});
    case 4 * 8 + 2: return f(GemmConfig<4, 2>{});
    case 4 * 8 + 4: return f(GemmConfig<4, 4>{});
    default: return fallback;
  }
}
template <typename F, typename R>
R with_layout(int bits, R fallback, F&& f) {
  return with_config(bits, 1, fallback, [&](auto cfg) {
    return f(static_cast<const typename decltype(cfg)::L&>(cfg));
  });
}

const KernelSet& kernel_set(int bits, DTypeId dtype) {
  static const KernelSet sets[3][2] = {
      {kernels_b2_f16(), kernels_b2_bf16()},
      {kernels_b3_f16(), kernels_b3_bf16()},
      {kernels_b4_f16(), kernels_b4_bf16()},
  };
  return sets[bits - 2][static_cast<int>(dtype)];
}

long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

// ---- per-device cache: attributes, and per kernel configuration the pipeline and occupancy ----
// Filled on the first call for a (device, bits, dtype, batch tile, offsets) and read without any
// CUDA call afterwards, so that qgemm_plan is pure arithmetic in steady state (and under capture).
struct KernelConfig {
  bool ready = false;
  int stages = 0, smem = 0, ctas = 0;  // ctas: resident CTAs per SM (heuristic, capped by occupancy)
};
struct DeviceCache {
  bool ready = false;
  int sms = 0, smem_per_sm = 0, smem_per_block = 0;
  KernelConfig cfg[3][2][kNumMTileConfigs][2];  // [bits - 2][dtype][kMIndex][has_offsets]
};
constexpr int kMaxDevices = 64;
std::mutex g_mutex;
DeviceCache g_cache[kMaxDevices];

cudaError_t device_cache(int device, DeviceCache** out) {
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  DeviceCache& d = g_cache[device];
  if (!d.ready) {
    int v[3];
    cudaError_t e = cudaDeviceGetAttribute(&v[0], cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&v[1], cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&v[2], cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess) return e;
    d.sms = v[0];
    d.smem_per_sm = v[1];
    d.smem_per_block = v[2];
    d.ready = true;
  }
  *out = &d;
  return cudaSuccess;
}

// Pipeline choice for one configuration, both offset variants at once: the kernel's shared-memory
// limit is raised once, to the larger of the two.
template <typename C>
cudaError_t kernel_config(DeviceCache& d, DTypeId dtype, bool has_offsets, int max_ctas,
                          KernelConfig* out) {
  KernelConfig* both = d.cfg[C::kBits - 2][static_cast<int>(dtype)][C::kMIndex];
  if (!both[has_offsets].ready) {
    int max_smem = 0;
    for (int o = 0; o < 2; ++o) {
      const PipelineChoice pc = choose_pipeline(d.smem_per_sm, d.smem_per_block, C::kTableBytes,
                                                C::stage_bytes(o == 1), C::kMinStages, C::kMaxStages,
                                                max_ctas);  // 0: no cap
      if (pc.stages < C::kMinStages) return cudaErrorInvalidConfiguration;
      both[o].stages = pc.stages;
      both[o].smem = C::kTableBytes + pc.stages * C::stage_bytes(o == 1);
      both[o].ctas = pc.ctas;
      if (both[o].smem > max_smem) max_smem = both[o].smem;
    }
    const KernelSet& ks = kernel_set(C::kBits, dtype);
    for (int o = 0; o < 2; ++o) {
      int occ = 0;
      cudaError_t err = ks.prepare[C::kMIndex](max_smem, both[o].smem, &occ);
      if (err != cudaSuccess) return err;
      if (occ < 1) return cudaErrorInvalidConfiguration;
      if (occ < both[o].ctas) both[o].ctas = occ;
    }
    both[0].ready = both[1].ready = true;
  }
  *out = both[has_offsets];
  return cudaSuccess;
}

// The smallest compiled batch tile that holds M rows; above the largest, tiles of the largest.
int batch_tile(int M) {
  static_assert(GemmConfig<4, 1>::kBM == 16, "a batch tile is kMTiles m16 mma tiles");
  for (int i = 0; i < kNumMTileConfigs; ++i)
    if (M <= 16 * kMTileOptions[i]) return kMTileOptions[i];
  return kMTileOptions[kNumMTileConfigs - 1];
}

}  // namespace

int64_t layout_words(int bits, int64_t K, int64_t N) {
  return with_layout(bits, (int64_t)-1, [&](const auto& L) -> int64_t {
    using Lt = std::decay_t<decltype(L)>;
    const int64_t n_pad = ceil_div(N, Lt::kAtomN) * Lt::kAtomN;
    const int64_t k_pad = ceil_div(K, Lt::kAtomK) * Lt::kAtomK;
    static_assert(Lt::kAtomN * Lt::kAtomK * Lt::kNumBits % 32 == 0, "an atom is whole int32 words");
    return n_pad * k_pad * Lt::kNumBits / 32;
  });
}

cudaError_t qgemm_max_workspace_bytes(int device, size_t* bytes) {
  DeviceCache* d = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    cudaError_t err = device_cache(device, &d);
    if (err != cudaSuccess) return err;
  }
  *bytes = workspace_max_bytes(d->sms);
  return cudaSuccess;
}

cudaError_t qgemm_plan(const QGemmProblem& prob, int device, QGemmPlan* plan) {
  *plan = QGemmPlan();
  if (prob.bits < 2 || prob.bits > 4 || prob.M < 0 || prob.N < 1 || prob.K < 1 || prob.group < 1)
    return cudaErrorInvalidValue;
  if (!fused_supports_group(prob.group, prob.ngroups)) {
    plan->path = QGemmPlan::kDequantMatmul;
    plan->reason = "group size not a multiple of 16 that is >= 32";
    return cudaSuccess;
  }
  if (prob.M > kFusedMaxM) {
    plan->path = QGemmPlan::kDequantMatmul;
    plan->reason = "large M";
    return cudaSuccess;
  }
  const int mt = batch_tile(prob.M);
  return with_config(prob.bits, mt, cudaErrorInvalidValue, [&](auto cfg) -> cudaError_t {
    using C = decltype(cfg);
    DeviceCache* d = nullptr;
    KernelConfig kc;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      cudaError_t err = device_cache(device, &d);
      if (err == cudaSuccess)
        err = kernel_config<C>(*d, prob.dtype, prob.has_offsets, prob.max_ctas_per_sm, &kc);
      if (err != cudaSuccess) return err;
    }
    plan->m_tiles16 = C::kMTiles;
    plan->stages = kc.stages;
    plan->smem_bytes = kc.smem;
    plan->m_tiles = (int)std::max<long long>(1, ceil_div(prob.M, C::kBM));
    const long long n_atoms = ceil_div(prob.N, C::kAtomN);
    const long long k_atoms = ceil_div(prob.K, C::kAtomK);
    plan->n_tiles = (int)ceil_div(n_atoms, C::kBN / C::kAtomN);
    plan->k_tiles = (int)ceil_div(k_atoms, C::kAtomsK);
    const long long tiles = (long long)plan->m_tiles * plan->n_tiles;
    if (tiles * plan->k_tiles >= (1ll << 31)) return cudaErrorInvalidValue;

    const StreamKPlan sk = make_streamk_plan((int)tiles, plan->k_tiles, d->sms * kc.ctas);
    plan->grid = sk.grid;
    plan->dp_tiles = sk.dp_tiles;
    plan->split = sk.split;
    plan->sk_units = sk.sk_units;
    plan->partial_slots = sk.partial_slots;
    if ((size_t)sk.partial_slots > workspace_max_slots(d->sms)) return cudaErrorInvalidConfiguration;
    plan->partials_offset = workspace_partials_offset(d->sms);
    plan->workspace_bytes = plan->partials_offset + (size_t)sk.partial_slots * C::kPartialFloats * sizeof(float);
    return cudaSuccess;
  });
}

cudaError_t qgemm_run(const QGemmProblem& prob, const QGemmPlan& plan, const void* x, int ldx,
                      const void* qweight, const void* scales, const void* offsets,
                      const float* table, void* y, void* workspace, cudaStream_t stream) {
  if (plan.path != QGemmPlan::kFused || plan.grid < 1) return cudaErrorInvalidValue;
  if (prob.M == 0) return cudaSuccess;
  return with_config(prob.bits, plan.m_tiles16, cudaErrorInvalidValue, [&](auto cfg) -> cudaError_t {
    using C = decltype(cfg);
    GemmParams p;
    p.x = x;
    p.qweight = qweight;
    p.scales = scales;
    p.offsets = prob.has_offsets ? offsets : nullptr;
    p.table = table;
    p.y = y;
    p.flags = static_cast<int*>(workspace);
    p.partials = reinterpret_cast<float*>(static_cast<char*>(workspace) + plan.partials_offset);
    p.M = prob.M;
    p.N = prob.N;
    p.K = prob.K;
    p.ldx = ldx;
    p.group = prob.group;
    p.ngroups = prob.ngroups;
    p.steps_per_group = prob.ngroups == 1 ? (1 << 30) : prob.group / 16;
    p.scale_words = scale_words(prob.group, prob.ngroups, C::kSteps);
    static_assert(2 * 4 <= C::kScaleWindow, "4 words fill the scale window");
    if (p.scale_words > C::kScaleWindow / 2) return cudaErrorInvalidValue;  // excluded by fused_supports_group
    p.n_atoms = (int)ceil_div(prob.N, C::kAtomN);
    p.k_atoms = (int)ceil_div(prob.K, C::kAtomK);
    p.m_tiles = plan.m_tiles;
    p.n_tiles = plan.n_tiles;
    p.k_tiles = plan.k_tiles;
    p.stages = plan.stages;
    p.dp_tiles = plan.dp_tiles;
    p.split = plan.split;
    p.sk_units = plan.sk_units;
    return kernel_set(prob.bits, prob.dtype).gemm[C::kMIndex](p, plan.grid, plan.smem_bytes, stream);
  });
}

cudaError_t dequant_run(int bits, DTypeId dtype, const void* qweight, const void* scales,
                        const void* offsets, const float* table, void* w, int N, int K, int group,
                        int ngroups, cudaStream_t stream) {
  if (N < 1 || K < 1 || group < 1) return cudaErrorInvalidValue;
  return with_layout(bits, cudaErrorInvalidValue, [&](const auto& L) -> cudaError_t {
    using Lt = std::decay_t<decltype(L)>;
    DequantParams p;
    p.qweight = qweight;
    p.scales = scales;
    p.offsets = offsets;
    p.table = table;
    p.w = w;
    p.N = N;
    p.K = K;
    p.group = group;
    p.ngroups = ngroups;
    p.n_atoms = (int)ceil_div(N, Lt::kAtomN);
    p.k_atoms = (int)ceil_div(K, Lt::kAtomK);
    return kernel_set(Lt::kNumBits, dtype).dequant(p, stream);
  });
}

}  // namespace flute
