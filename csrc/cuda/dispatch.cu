// Config choice and launch: a heuristic over (M, N, K, bits, group, SM count, shared memory).
// No online tuning, no device synchronization, nothing allocated here (the binding passes a
// workspace from the torch allocator), so launches are CUDA-graph safe.
#include <algorithm>
#include <atomic>

#include "flute_kernels.cuh"
#include "flute_launch.h"

namespace flute {
namespace {

const KernelSet& kernel_set(int bits, DTypeId dtype) {
  static const KernelSet sets[3][2] = {
      {kernels_b2_f16(), kernels_b2_bf16()},
      {kernels_b3_f16(), kernels_b3_bf16()},
      {kernels_b4_f16(), kernels_b4_bf16()},
  };
  return sets[bits - 2][static_cast<int>(dtype)];
}

// Per-device cache of the attributes the heuristic reads (the only host state; -1 = unknown).
struct DeviceInfo {
  int sms, smem_per_sm, smem_per_block;
};
constexpr int kMaxDevices = 64;
std::atomic<int> g_sms[kMaxDevices], g_smem_sm[kMaxDevices], g_smem_block[kMaxDevices];

cudaError_t device_info(int device, DeviceInfo* info) {
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  int sms = g_sms[device].load(std::memory_order_relaxed);
  if (sms <= 0) {
    int v[3];
    cudaError_t e = cudaDeviceGetAttribute(&v[0], cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess)
      e = cudaDeviceGetAttribute(&v[1], cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    if (e == cudaSuccess)
      e = cudaDeviceGetAttribute(&v[2], cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess) return e;
    g_smem_sm[device].store(v[1]);
    g_smem_block[device].store(v[2]);
    g_sms[device].store(v[0]);
  }
  info->sms = g_sms[device].load();
  info->smem_per_sm = g_smem_sm[device].load();
  info->smem_per_block = g_smem_block[device].load();
  return cudaSuccess;
}

struct TileSizes {
  int bm, bn, bk, atom_k, atoms_k, table_bytes, stage_bytes, code_bytes, partial_floats;
};

template <int kBits, int kMTiles>
TileSizes tile_sizes_t(bool has_offsets) {
  using C = GemmConfig<kBits, kMTiles>;
  return {C::kBM, C::kBN, C::kBK, C::kAtomK, C::kAtomsK, C::kTableBytes,
          C::stage_bytes(has_offsets), C::kCodeBytes, C::kPartialFloats};
}

template <int kBits>
TileSizes tile_sizes_b(int mt, bool has_offsets) {
  return mt == 1 ? tile_sizes_t<kBits, 1>(has_offsets)
                 : (mt == 2 ? tile_sizes_t<kBits, 2>(has_offsets) : tile_sizes_t<kBits, 4>(has_offsets));
}

TileSizes tile_sizes(int bits, int mt, bool has_offsets) {
  return bits == 2 ? tile_sizes_b<2>(mt, has_offsets)
                   : (bits == 3 ? tile_sizes_b<3>(mt, has_offsets) : tile_sizes_b<4>(mt, has_offsets));
}

int mt_index(int mt) { return mt == 1 ? 0 : (mt == 2 ? 1 : 2); }
int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

}  // namespace

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
  DeviceInfo dev;
  cudaError_t err = device_info(device, &dev);
  if (err != cudaSuccess) return err;

  // Batch tile: the smallest of 16/32/64 rows that holds M; above 64 rows, 64-row tiles.
  const int mt = prob.M <= 16 ? 1 : (prob.M <= 32 ? 2 : 4);
  const TileSizes ts = tile_sizes(prob.bits, mt, prob.has_offsets);
  const int n_atoms = ceil_div(prob.N, 32);
  const int k_atoms = ceil_div(prob.K, ts.atom_k);
  plan->m_tiles16 = mt;
  plan->m_tiles = std::max(1, ceil_div(prob.M, ts.bm));
  plan->n_tiles = ceil_div(n_atoms, ts.bn / 32);
  plan->k_tiles = ceil_div(k_atoms, ts.atoms_k);
  const long long total = (long long)plan->m_tiles * plan->n_tiles * plan->k_tiles;
  if (total >= (1ll << 31)) return cudaErrorInvalidValue;

  // Pipeline depth and CTAs per SM: the most CTAs per SM (4, 3, 2, 1) that still get >= 3 stages
  // (>= 2 k-tiles in flight while one is consumed); within that, as many stages as fit, up to 8.
  // 1 KB of each CTA's shared memory is reserved by the system on sm_80+.
  const int reserve = 1024;
  int ctas = 1, stages = 0;
  for (int c = 4; c >= 1; --c) {
    const int avail = std::min(dev.smem_per_sm / c - reserve, dev.smem_per_block) - ts.table_bytes;
    const int s = std::min(GemmConfig<4, 1>::kMaxStages, avail / ts.stage_bytes);
    if (s >= 3 || (c == 1 && s >= GemmConfig<4, 1>::kMinStages)) {
      ctas = c;
      stages = s;
      break;
    }
  }
  if (stages < GemmConfig<4, 1>::kMinStages) return cudaErrorInvalidConfiguration;
  plan->stages = stages;
  plan->smem_bytes = ts.table_bytes + stages * ts.stage_bytes;

  int occ = 0;
  err = kernel_set(prob.bits, prob.dtype).occupancy[mt_index(mt)](plan->smem_bytes, &occ);
  if (err != cudaSuccess) return err;
  if (occ < 1) return cudaErrorInvalidConfiguration;
  occ = std::min(occ, ctas);
  // Every CTA gets at least one iteration; no more CTAs than can be resident at once (the
  // stream-K reduction waits on lower-index CTAs only, so residency is not needed for progress,
  // but a persistent grid is what balances the work).
  plan->grid = (int)std::min<long long>(total, (long long)dev.sms * occ);
  plan->flags_offset = (size_t)plan->grid * ts.partial_floats * sizeof(float);
  plan->workspace_bytes = plan->flags_offset + (size_t)plan->grid * sizeof(int);
  return cudaSuccess;
}

cudaError_t qgemm_run(const QGemmProblem& prob, const QGemmPlan& plan, const void* x, int ldx,
                      const void* qweight, const void* scales, const void* offsets,
                      const float* table, void* y, void* workspace, cudaStream_t stream) {
  if (plan.path != QGemmPlan::kFused || plan.grid < 1) return cudaErrorInvalidValue;
  if (prob.M == 0) return cudaSuccess;
  const TileSizes ts = tile_sizes(prob.bits, plan.m_tiles16, prob.has_offsets);
  GemmParams p;
  p.x = x;
  p.qweight = qweight;
  p.scales = scales;
  p.offsets = prob.has_offsets ? offsets : nullptr;
  p.table = table;
  p.y = y;
  p.partials = static_cast<float*>(workspace);
  p.flags = reinterpret_cast<int*>(static_cast<char*>(workspace) + plan.flags_offset);
  p.M = prob.M;
  p.N = prob.N;
  p.K = prob.K;
  p.ldx = ldx;
  p.group = prob.group;
  p.ngroups = prob.ngroups;
  p.steps_per_group = prob.ngroups == 1 ? (1 << 30) : prob.group / 16;
  // Groups one k-tile can touch: exactly 128/G when G divides 128, 1 when 128 divides G (k-tiles
  // start on group boundaries), else at most (G/16 - 1 + 7) / (G/16) + 1. Plus one element for
  // the even alignment of the window; 4-byte words, rounded up.
  int gmax;
  if (prob.ngroups == 1) {
    gmax = 1;
  } else {
    const int spg = prob.group / 16, steps = ts.bk / 16;
    gmax = steps % spg == 0 ? steps / spg : (spg % steps == 0 ? 1 : (spg - 1 + steps - 1) / spg + 1);
  }
  p.scale_words = (gmax + 1 + 1) / 2;
  if (p.scale_words > 4) return cudaErrorInvalidValue;  // excluded by fused_supports_group
  p.n_atoms = ceil_div(prob.N, 32);
  p.k_atoms = ceil_div(prob.K, ts.atom_k);
  p.m_tiles = plan.m_tiles;
  p.n_tiles = plan.n_tiles;
  p.k_tiles = plan.k_tiles;
  p.stages = plan.stages;
  const int total = plan.m_tiles * plan.n_tiles * plan.k_tiles;
  p.iters_q = total / plan.grid;
  p.iters_r = total % plan.grid;
  return kernel_set(prob.bits, prob.dtype).gemm[mt_index(plan.m_tiles16)](p, plan.grid,
                                                                            plan.smem_bytes, stream);
}

cudaError_t dequant_run(int bits, DTypeId dtype, const void* qweight, const void* scales,
                        const void* offsets, const float* table, void* w, int N, int K, int group,
                        int ngroups, cudaStream_t stream) {
  if (bits < 2 || bits > 4 || N < 1 || K < 1 || group < 1) return cudaErrorInvalidValue;
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
  p.n_atoms = ceil_div(N, 32);
  p.k_atoms = ceil_div(K, bits == 3 ? 128 : 64);
  return kernel_set(bits, dtype).dequant(p, stream);
}

}  // namespace flute
