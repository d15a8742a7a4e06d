// The fused lookup-table dequantize-GEMM: y[M, N] = x[M, K] @ W[N, K]^T.
//
// One CTA per scheduling slot (grid <= SMs x resident CTAs per SM, all resident at once). The CTA
// tile is kBM x 128 (N) and it walks K in steps of 128 (one "iteration" = one k-tile). Whole
// tiles are dealt out round-robin; only the tiles of the last, partial wave are split along K
// (stream-K, at most 4 parts of >= 8 k-tiles) and their partial sums reduced through a workspace
// (see WorkList below and StreamK in flute_config.cuh). Per iteration:
//
//   global --cp.async--> shared (multi-stage ring):  x tile (swizzled), codes,
//                                                      scale/offset windows
//   shared --ldmatrix--> A fragments;  shared --lds.128--> each lane's own code words
//   codes --masks/shifts--> pair indices --one lds each--> half2 (two weights) x scale --> B reg
//   mma.sync.m16n8k16, fp32 accumulators
//
// The index arithmetic is mirrored line by line in flute/emulate.py (the executable spec),
// which is tested on CPU against flute.format.dequantize_codes. Includes only CUDA headers.
#pragma once

#include "flute_device.cuh"

namespace flute {

// The Stream-K work list (WorkList, Cursor) lives in flute_config.cuh: plain C++, so the CPU tests
// compile it and compare it with flute/emulate.py.

template <typename T, int kBits, int kMTiles>
struct GemmKernel {
  using C = GemmConfig<kBits, kMTiles>;
  using D = DType<T>;
  using T2 = typename D::T2;

  struct Smem {
    uint32_t* pair_table;
    char* stages;
    int stage_bytes;
    bool has_offsets;
    __device__ __forceinline__ char* x(int st) const { return stages + st * stage_bytes; }
    __device__ __forceinline__ char* codes(int st) const { return x(st) + C::kXBytes; }
    __device__ __forceinline__ char* scales(int st) const { return codes(st) + C::kCodeBytes; }
    __device__ __forceinline__ char* offsets(int st) const { return scales(st) + C::kScaleBytes; }
  };

  // ---- producer: issue the cp.asyncs of one iteration (tile, ktile) into stage st --------------
  static __device__ __forceinline__ void load_stage(const GemmParams& p, const Smem& sm, int st,
                                                    int tile, int ktile, int tid) {
    const int m_tile = tile % p.m_tiles;
    const int n_tile = tile / p.m_tiles;

    // Activations: rows >= M are never loaded (they only feed output rows that are never stored;
    // an mma row depends only on its own A row); columns >= K are zero-filled (padding weights).
    {
      const char* xg = static_cast<const char*>(p.x);
      const uint32_t xs = smem_addr(sm.x(st));
      const int k8 = (p.K + 7) & ~7;  // x columns K..k8 are zero in memory (binding pads)
#pragma unroll
      for (int it = 0; it < C::kXCopiesPerThread; ++it) {
        const int i = it * C::kThreads + tid;
        if (C::kBM * C::kXChunksPerRow % C::kThreads == 0 || i < C::kBM * C::kXChunksPerRow) {
          const int row = i / C::kXChunksPerRow;
          const int ch = i % C::kXChunksPerRow;
          const int m = m_tile * C::kBM + row;
          if (m < p.M) {
            const int k = ktile * C::kBK + ch * 8;
            const bool in = k < k8;
            const char* src = xg + ((size_t)m * p.ldx + (in ? k : 0)) * sizeof(T);
            const uint32_t dst = xs + row * C::kXRowBytes + ((ch ^ (row & 7)) << 4);
            FLUTE_DCHECK(row < C::kBM && ch < C::kXChunksPerRow);
            cp_async16(dst, src, in ? 16 : 0);
          }
        }
      }
    }
    // Codes: warp w's atom column na = n_tile * 4 + w; its k-tile is kWarpChunks contiguous
    // 16-byte chunks in global memory and in the stage. Atoms beyond the layout: zero-filled.
    {
      const uint4* qg = static_cast<const uint4*>(p.qweight);
      const uint32_t cs = smem_addr(sm.codes(st));
#pragma unroll
      for (int it = 0; it < C::kCodeCopiesPerThread; ++it) {
        const int i = it * C::kThreads + tid;
        const int w = i / C::kWarpChunks;
        const int off = i % C::kWarpChunks;
        const int na = n_tile * C::kWarps + w;
        const int ka = ktile * C::kAtomsK + off / (C::kChunks * 32);
        const bool in = na < p.n_atoms && ka < p.k_atoms;
        const size_t g = ((size_t)na * p.k_atoms + (size_t)ktile * C::kAtomsK) * (C::kChunks * 32) + off;
        // No L2 evict-first hint here: with `cp.async ... L2::cache_hint` ptxas 13.0 emitted, for
        // the 2-bit 16-row kernels only, an LDGSTS with a uniform-register address and an unset
        // descriptor register (`[R+UR0+imm], desc[UR1]`) that faults with "illegal instruction" on
        // an H200 (benchmarks/NOTES.md, first GPU run). .ci/sass_check.sh scans the SASS for it.
        cp_async16(cs + i * 16, in ? static_cast<const void*>(qg + g) : p.qweight, in ? 16 : 0);
      }
    }
    // Scale (and offset) windows: thread tid loads row tid of the tile, scale_words aligned words
    // starting at the even element at or below (n, g_lo). Beyond the tensor: zero-filled.
    {
      const int n = n_tile * C::kBN + tid;
      const int g_lo = (ktile * C::kBK) / p.group;
      const long long total = (long long)p.N * p.ngroups;
      const long long e0 = ((long long)n * p.ngroups + g_lo) & ~1ll;
      const uint32_t ss = smem_addr(sm.scales(st)) + tid * C::kScaleRowBytes;
      const uint32_t os = smem_addr(sm.offsets(st)) + tid * C::kScaleRowBytes;
      for (int w = 0; w < p.scale_words; ++w) {
        const long long e = e0 + 2 * w;
        const long long left = n < p.N ? total - e : 0;
        const int bytes = left >= 2 ? 4 : (left == 1 ? 2 : 0);
        const char* src = static_cast<const char*>(p.scales) + (bytes ? e * 2 : 0);
        cp_async4(ss + w * 4, src, bytes);
        if (sm.has_offsets) {
          const char* osrc = static_cast<const char*>(p.offsets) + (bytes ? e * 2 : 0);
          cp_async4(os + w * 4, osrc, bytes);
        }
      }
    }
  }

  // ---- consumer: one k-tile of MMAs for this warp ---------------------------------------------
  static __device__ __forceinline__ void compute_stage(const GemmParams& p, const Smem& sm,
                                                       int st, int tile, int ktile, int warp,
                                                       int lane, const uint32_t* pt_lane,
                                                       float (&acc)[kMTiles][4][4]) {
    const int m_tile = tile % p.m_tiles;
    const int n_tile = tile / p.m_tiles;
    const int g = lane >> 2;

    // The lane's code words for the whole k-tile: kLaneChunks 16-byte loads, conflict-free
    // (the warp's 32 lanes read 512 consecutive bytes per load).
    uint32_t w[C::kLaneChunks * 4];
    {
      const uint4* cs = reinterpret_cast<const uint4*>(sm.codes(st)) + warp * C::kWarpChunks;
#pragma unroll
      for (int c = 0; c < C::kLaneChunks; ++c) {
        const uint4 v = cs[c * 32 + lane];
        w[4 * c + 0] = v.x;
        w[4 * c + 1] = v.y;
        w[4 * c + 2] = v.z;
        w[4 * c + 3] = v.w;
      }
    }

    // Scale window positions. Row of n8 tile j: n = n_tile*128 + warp*32 + 8j + g. Its window
    // starts at the even element at or below n*ngroups + g_lo, so group g_lo + widx sits at
    // position parity + widx.
    const int g_lo = (ktile * C::kBK) / p.group;
    const T* srow[4];
    const T* orow[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nl = warp * 32 + 8 * j + g;
      const int n = n_tile * C::kBN + nl;
      const int par = (int)(((long long)n * p.ngroups + g_lo) & 1);
      srow[j] = reinterpret_cast<const T*>(sm.scales(st) + nl * C::kScaleRowBytes) + par;
      orow[j] = reinterpret_cast<const T*>(sm.offsets(st) + nl * C::kScaleRowBytes) + par;
    }
    // Group counter: position of the first step inside its group, in k16 steps.
    int gpos = ((ktile * C::kBK) / 16) % p.steps_per_group;
    int widx = 0;
    T2 sc[4], of[4];

    // Which m16 tiles hold at least one real row (the rest are skipped).
    const int rows_left = p.M - m_tile * C::kBM;
    const uint32_t xs = smem_addr(sm.x(st));

#pragma unroll
    for (int s = 0; s < C::kSteps; ++s) {
      if (s > 0 && ++gpos == p.steps_per_group) {
        gpos = 0;
        ++widx;
      }
      if (s == 0 || gpos == 0) {  // a new group starts: reload the four row scales
        FLUTE_DCHECK(widx + 1 < C::kScaleWindow);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          sc[j] = D::bcast(srow[j][widx]);
          if (sm.has_offsets) of[j] = D::bcast(orow[j][widx]);
        }
      }
      uint32_t idx0, idx1;
      step_pair_indices<kBits, C::kAtomsK>(w, s, idx0, idx1);

      // A fragments: ldmatrix.x4, lane supplies row (lane & 15), chunk 2s + (lane >> 4), swizzled.
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if (kMTiles == 1 || mt * 16 < rows_left) {
          const int row = mt * 16 + (lane & 15);
          const int ch = 2 * s + (lane >> 4);
          ldmatrix_x4(a[mt], xs + row * C::kXRowBytes + ((ch ^ (row & 7)) << 4));
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t e0 = (idx0 >> (8 * j)) & 0xFFu;
        const uint32_t e1 = (idx1 >> (8 * j)) & 0xFFu;
        FLUTE_DCHECK(e0 < (uint32_t)C::kPairEntries && e1 < (uint32_t)C::kPairEntries);
        uint32_t v0 = pt_lane[e0 << C::kLogPairCopies];
        uint32_t v1 = pt_lane[e1 << C::kLogPairCopies];
        T2 b0 = *reinterpret_cast<T2*>(&v0);
        T2 b1 = *reinterpret_cast<T2*>(&v1);
        if (sm.has_offsets) {
          b0 = __hfma2(b0, sc[j], of[j]);
          b1 = __hfma2(b1, sc[j], of[j]);
        } else {
          b0 = __hmul2(b0, sc[j]);
          b1 = __hmul2(b1, sc[j]);
        }
        const uint32_t r0 = *reinterpret_cast<uint32_t*>(&b0);
        const uint32_t r1 = *reinterpret_cast<uint32_t*>(&b1);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          if (kMTiles == 1 || mt * 16 < rows_left) D::mma(acc[mt][j], a[mt], r0, r1);
        }
      }
    }
  }

  // ---- epilogue ------------------------------------------------------------------------------
  // Accumulator acc[mt][j][2h + c]: row m_tile*kBM + 16 mt + g + 8h, column
  // n_tile*128 + 32 warp + 8j + 2t + c (mma C fragment).
  static __device__ __forceinline__ void store_tile(const GemmParams& p, int tile, int warp,
                                                    int lane, const float (&acc)[kMTiles][4][4]) {
    const int m_tile = tile % p.m_tiles;
    const int n_tile = tile / p.m_tiles;
    const int g = lane >> 2, t = lane & 3;
    T* y = static_cast<T*>(p.y);
    const bool pairs = (p.N & 1) == 0;  // half2 stores stay 4-byte aligned
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m_tile * C::kBM + mt * 16 + g + 8 * h;
        if (m >= p.M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n = n_tile * C::kBN + warp * 32 + 8 * j + 2 * t;
          const float v0 = acc[mt][j][2 * h], v1 = acc[mt][j][2 * h + 1];
          T* dst = y + (size_t)m * p.N + n;
          if (pairs && n + 1 < p.N) {
            *reinterpret_cast<T2*>(dst) = D::floats2(v0, v1);
          } else {
            if (n < p.N) dst[0] = D::from_float(v0);
            if (n + 1 < p.N) dst[1] = D::from_float(v1);
          }
        }
      }
    }
  }

  // Partial tile in workspace slot `slot`, in fragment order: float4 number ((warp*kMTiles + mt)*4 + j)*32
  // + lane holds acc[mt][j][0..3] of that lane: each warp access is 512 contiguous bytes.
  static __device__ __forceinline__ float4* partial_ptr(const GemmParams& p, int slot, int warp,
                                                        int lane, int mt, int j) {
    return reinterpret_cast<float4*>(p.partials + (size_t)slot * C::kPartialFloats) +
           ((warp * kMTiles + mt) * 4 + j) * 32 + lane;
  }

  static __device__ __forceinline__ void epilogue(const GemmParams& p, const WorkList& wl,
                                                  const Cursor& cur, int tid, int warp, int lane,
                                                  float (&acc)[kMTiles][4][4]) {
    if (wl.is_split(cur.seg)) {
      if (wl.is_peer()) {
        const int slot = wl.peer_slot(wl.cta % p.split);
        // Peer: publish the partial sum for the owner (a higher CTA index) to add.
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            __stcg(partial_ptr(p, slot, warp, lane, mt, j),
                   make_float4(acc[mt][j][0], acc[mt][j][1], acc[mt][j][2], acc[mt][j][3]));
        __syncthreads();
        if (tid == 0) {
          __threadfence();
          FLUTE_DCHECK(p.flags[slot] == 0);
          st_release(p.flags + slot, 1);
        }
        return;
      }
      // Owner: wait for all split-1 peers at once (one thread each), then add their partials in
      // part order, so the result is bitwise reproducible for a given schedule.
      if (tid < p.split - 1) {
        int* flag = p.flags + wl.peer_slot(tid);
        while (ld_acquire(flag) == 0) __nanosleep(32);
        *flag = 0;  // consumed: the flags are zero again for the next launch
      }
      __syncthreads();
      for (int peer = 0; peer + 1 < p.split; ++peer) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float4 v = __ldcg(partial_ptr(p, wl.peer_slot(peer), warp, lane, mt, j));
            acc[mt][j][0] += v.x;
            acc[mt][j][1] += v.y;
            acc[mt][j][2] += v.z;
            acc[mt][j][3] += v.w;
          }
      }
    }
    store_tile(p, cur.tile, warp, lane, acc);
  }

  // ---- the kernel body -----------------------------------------------------------------------
  static __device__ __forceinline__ void clear(float (&acc)[kMTiles][4][4]) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.f;
  }

  static __device__ __forceinline__ void run(const GemmParams& p, char* smem_raw) {
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    WorkList wl;
    wl.init(p.dp_tiles, p.split, p.sk_units, p.k_tiles, blockIdx.x, gridDim.x);
    const int count = wl.count();

    Smem sm;
    sm.pair_table = reinterpret_cast<uint32_t*>(smem_raw);
    sm.stages = smem_raw + C::kTableBytes;
    sm.has_offsets = p.offsets != nullptr;
    sm.stage_bytes = C::stage_bytes(sm.has_offsets);

    // Prologue: the first S-1 stages' loads go out first, the pair table is built while they fly.
    // Stages are not zeroed: x rows >= M are never loaded and only feed accumulator rows that are
    // never stored (an mma row depends on its own A row only); everything else is always written.
    Cursor ld, cu;
    ld.start(wl);
    cu = ld;
    const int S = p.stages;
    for (int s = 0; s < S - 1; ++s) {
      if (s < count) {
        load_stage(p, sm, s, ld.tile, ld.k, tid);
        ld.advance(wl);
      }
      cp_async_commit();
    }
    // Ordered before its first read by the barrier at the top of the main loop.
    build_pair_table<kBits, T>(sm.pair_table, p.table, tid, C::kThreads);
    const uint32_t* pt_lane = sm.pair_table + (lane & (C::kPairCopies - 1));

    float acc[kMTiles][4][4];
    clear(acc);

    int rd = 0, wr = S - 1;
    for (int f = 0; f < count; ++f) {
      cp_async_wait_dyn(S - 2);  // iteration f's group has landed (for this thread)
      __syncthreads();           // ... for all threads; and stage wr is no longer being read
      if (f + S - 1 < count) {
        load_stage(p, sm, wr, ld.tile, ld.k, tid);
        ld.advance(wl);
      }
      cp_async_commit();
      compute_stage(p, sm, rd, cu.tile, cu.k, warp, lane, pt_lane, acc);
      rd = rd + 1 == S ? 0 : rd + 1;
      wr = wr + 1 == S ? 0 : wr + 1;
      if (cu.k + 1 == cu.kend) {
        epilogue(p, wl, cu, tid, warp, lane, acc);
        clear(acc);
      }
      cu.advance(wl);
    }
    cp_async_wait<0>();
  }
};

// Resident CTAs per SM the register cap aims for: 128 threads x 255 registers fit 2 CTAs; the
// real occupancy comes from cudaOccupancyMaxActiveBlocksPerMultiprocessor at launch.
template <typename T, int kBits, int kMTiles>
__global__ void __launch_bounds__(128, 2) flute_gemm_kernel(const GemmParams p) {
  extern __shared__ __align__(128) char smem[];
  GemmKernel<T, kBits, kMTiles>::run(p, smem);
}

}  // namespace flute
