// Compile-time tile configuration of the flute kernels, derived from a few parameters.
//
// Includes only CUDA headers: this file compiles with nvcc on a machine without a GPU or torch.
// Every number here has a twin in flute/kernel_plan.py (the executable spec); keep them in sync.
// Plain C++ as well: tests/test_emulate.py compiles this header with the host compiler and checks
// the constants, the pipeline choice and the Stream-K schedule against flute/kernel_plan.py.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define FLUTE_HD __host__ __device__ __forceinline__
#else
#define FLUTE_HD inline
#endif

#ifndef FLUTE_PAIR_COPIES_WIDE
#define FLUTE_PAIR_COPIES_WIDE 32  // copies of the 3- and 4-bit pair tables (LayoutTraits)
#endif
static_assert(FLUTE_PAIR_COPIES_WIDE >= 1 && FLUTE_PAIR_COPIES_WIDE <= 32,
              "FLUTE_PAIR_COPIES_WIDE: 1 to 32 copies");

namespace flute {

// ---------------------------------------------------------------------------------------------
// The kernel layout (see csrc/cuda/LAYOUT.md and flute/layout.py). It depends only on the bit
// width: every tile configuration below is a multiple of one atom.
// ---------------------------------------------------------------------------------------------
template <int kBits>
struct LayoutTraits {
  static_assert(kBits == 2 || kBits == 3 || kBits == 4, "flute supports 2, 3 and 4-bit codes");
  static constexpr int kNumBits = kBits;
  // Rows of W per atom: four n8 mma tiles. One warp owns one atom column of the CTA tile.
  static constexpr int kAtomN = 32;
  static constexpr int kN8PerAtom = kAtomN / 8;  // 4
  // Columns of W per atom: a lane's 16-byte chunk holds 16 codes per k16 step per 4 n8 tiles,
  // i.e. 64 bits (4-bit), 32 bits (2-bit) or 16 bits (the 1-bit slice of 3-bit) per k16 step.
  // 3-bit needs 8 k16 steps to fill the 1-bit chunk, so its atom is 128 wide; 2/4-bit use 64.
  static constexpr int kAtomK = kBits == 3 ? 128 : 64;
  static constexpr int kStepsPerAtom = kAtomK / 16;
  // 16-byte chunks per lane per atom: 4-bit 2 (4 k-steps x 64 bits = 256 bits), 2-bit 1
  // (4 x 32 bits), 3-bit 3 (one 1-bit chunk of 8 x 16 bits, two 2-bit chunks of 4 x 32 bits).
  static constexpr int kChunks = kBits == 2 ? 1 : (kBits == 3 ? 3 : 2);
  static constexpr int kAtomBytes = kChunks * 32 * 16;
  static_assert(kAtomBytes * 8 == kAtomN * kAtomK * kBits, "an atom holds exactly its codes");
  // Pair table: one 32-bit half2/bfloat162 per ordered pair of codes.
  static constexpr int kPairEntries = 1 << (2 * kBits);  // 16, 64, 256
  // Copies of the pair table, interleaved word by word: entry e of copy c is word e * copies + c
  // and lane L reads copy L % copies. With 32 copies every lane reads its own bank, so a warp's
  // 32 lookups never conflict. 2-bit needs none: its 16 entries already sit in 16 distinct banks.
  // FLUTE_PAIR_COPIES_WIDE (default 32; a tuning experiment builds 8 or 16, benchmarks/NOTES.md):
  // fewer copies free shared memory for pipeline stages at the price of bank conflicts.
  static constexpr int kPairCopies = kBits == 2 ? 1 : FLUTE_PAIR_COPIES_WIDE;
  static constexpr int kLogPairCopies = kPairCopies >= 32 ? 5 : kPairCopies >= 16 ? 4 : kPairCopies >= 8 ? 3
                                        : kPairCopies >= 4 ? 2 : kPairCopies >= 2 ? 1 : 0;
  static_assert((1 << kLogPairCopies) == kPairCopies, "copies must be a power of two");
  static constexpr int kPairBytes = kPairEntries * kPairCopies * 4;  // 64 B, 8 KB, 32 KB
};

// ---------------------------------------------------------------------------------------------
// The fused GEMM's CTA tile: kMTiles x 16 rows of X, 4 warps x 32 rows of W, 128 columns of K.
// ---------------------------------------------------------------------------------------------
template <int kBits_, int kMTiles_>
struct GemmConfig : LayoutTraits<kBits_> {
  using L = LayoutTraits<kBits_>;
  static constexpr int kBits = kBits_;
  static constexpr int kMTiles = kMTiles_;  // m16 mma tiles per CTA tile: 1, 2, 4
  static_assert(kMTiles == 1 || kMTiles == 2 || kMTiles == 4, "batch tiles of 16, 32, 64 rows");

  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBM = 16 * kMTiles;
  // Each warp owns one atom column: 32 rows of W = four n8 tiles, all k of the tile. Warps
  // never share weights, so every weight is dequantized exactly once per CTA tile.
  static constexpr int kBN = L::kAtomN * kWarps;  // 128
  // 128 columns of K per pipeline stage: eight k16 steps; a whole number of atoms of any width.
  static constexpr int kBK = 128;
  static constexpr int kSteps = kBK / 16;
  static_assert(kBK % L::kAtomK == 0, "a k-tile is a whole number of atoms");
  static constexpr int kAtomsK = kBK / L::kAtomK;        // 2 (2/4-bit) or 1 (3-bit)
  static constexpr int kLaneChunks = kAtomsK * L::kChunks;  // 16-byte chunks per lane per k-tile
  static constexpr int kWarpChunks = kLaneChunks * 32;     // contiguous in global memory
  static constexpr int kCodeBytes = kWarps * kWarpChunks * 16;  // 8 KB, 4 KB, 6 KB
  static_assert(kCodeBytes * 8 == kBN * kBK * kBits, "a stage holds exactly the tile's codes");
  static_assert((kWarps * kWarpChunks) % kThreads == 0, "code copies divide evenly");
  static constexpr int kCodeCopiesPerThread = kWarps * kWarpChunks / kThreads;

  // Activations: kBM rows of kBK halves = 16 chunks of 16 bytes per row. Chunk c of row r is
  // stored at chunk position c ^ (r & 7), so the 8 row addresses of each ldmatrix phase fall in
  // 8 different 16-byte bank groups.
  static constexpr int kXChunksPerRow = kBK * 2 / 16;  // 16
  static constexpr int kXRowBytes = kBK * 2;           // 256
  static constexpr int kXBytes = kBM * kXRowBytes;     // 4, 8, 16 KB
  static_assert(kXChunksPerRow >= 8, "the XOR swizzle needs 8 chunks per row");
  static constexpr int kXCopiesPerThread = (kBM * kXChunksPerRow + kThreads - 1) / kThreads;

  // Scales (and offsets): per row of the tile a window of 8 elements (16 bytes), loaded as up to
  // 4 aligned 4-byte words starting at the even element at or below the row's first group. A
  // k-tile touches at most 5 groups when the group size is >= 32 (4 when it divides 128), plus one
  // element for the even alignment: 6 <= 8.
  static constexpr int kScaleWindow = 8;
  static constexpr int kScaleRowBytes = kScaleWindow * 2;
  static constexpr int kScaleBytes = kBN * kScaleRowBytes;  // 2 KB
  static_assert(kBN == kThreads, "one thread loads the scale window of one row");

  static constexpr int kTableBytes = (L::kPairBytes + 127) / 128 * 128;
  // Bytes of one pipeline stage (offsets region only when offsets are present).
  static constexpr int stage_bytes(bool has_offsets) {
    return kXBytes + kCodeBytes + kScaleBytes * (has_offsets ? 2 : 1);
  }
  static_assert(kXBytes % 128 == 0 && kCodeBytes % 128 == 0 && kScaleBytes % 128 == 0,
                "stage regions stay 128-byte aligned");
  // Floats of one CTA's partial tile in the stream-K workspace.
  static constexpr int kPartialFloats = kBM * kBN;
  static constexpr int kMinStages = 2;
  static constexpr int kMaxStages = 8;
  // Index of this batch tile among the compiled ones (KernelSet::gemm[kMIndex]).
  static constexpr int kMIndex = kMTiles == 1 ? 0 : (kMTiles == 2 ? 1 : 2);
};

// The batch tiles that are compiled, in KernelSet order.
constexpr int kNumMTileConfigs = 3;
constexpr int kMTileOptions[kNumMTileConfigs] = {1, 2, 4};

// ---------------------------------------------------------------------------------------------
// Stream-K schedule limits (dispatch.cu: make_streamk_plan; flute/kernel_plan.py: make_streamk_plan).
// Whole tiles first; only the tiles of the last, partial wave are split along K, into at most
// kMaxSplit parts of at least kMinSplitIters k-tiles each.
// ---------------------------------------------------------------------------------------------
struct StreamK {
  static constexpr int kMaxSplit = 4;        // CTAs sharing one output tile
  static constexpr int kMinSplitIters = 8;   // k-tiles of a CTA's part of a split tile
  static constexpr int kMaxCtasPerSm = 4;    // resident CTAs per SM the heuristic considers
  static constexpr int kMinStagesShared = 3; // pipeline depth needed to share an SM with others
  static_assert(kMaxSplit - 1 <= 32, "the owner waits for its peers with one thread each");
};

// The dequantize kernel: one warp per atom, this many warps per block.
constexpr int kDequantWarps = 4;

// Kernel arguments. All sizes in elements unless said otherwise.
struct GemmParams {
  const void* x;         // [M, ldx] fp16/bf16, 16-byte aligned rows, columns >= K are 0 up to K8
  const void* qweight;   // the kernel layout (int32, 16-byte aligned)
  const void* scales;    // [N, ngroups], 4-byte aligned
  const void* offsets;   // [N, ngroups] or nullptr
  const float* table;    // [2^bits] float32
  void* y;               // [M, N] contiguous
  int* flags;            // [partial slots], zero at launch; each set flag is reset by its consumer
  float* partials;       // [partial slots, kPartialFloats] stream-K partial sums (fp32)
  int M, N, K, ldx;
  int group;             // effective group size (>= 1)
  int ngroups;           // ceil(K / group)
  int steps_per_group;   // group / 16, or 1 << 30 when ngroups == 1
  int scale_words;       // 4-byte words per scale-window row to load (1..4)
  int n_atoms, k_atoms;  // N_pad / 32, K_pad / atom_k
  int m_tiles, n_tiles, k_tiles;
  int stages;            // pipeline depth, kMinStages..kMaxStages
  // Stream-K schedule (see StreamK and flute_gemm.cuh: WorkList): tiles [0, dp_tiles) are whole
  // tiles, tile t done by CTA t % grid; tiles [dp_tiles, m_tiles * n_tiles) are split into
  // `split` parts along K, part u % split of tile dp_tiles + u / split done by CTA u, for
  // u < sk_units = (tiles - dp_tiles) * split.
  int dp_tiles, split, sk_units;
};

// ---------------------------------------------------------------------------------------------
// Host-side choices, pure arithmetic (dispatch.cu; flute/kernel_plan.py mirrors each one).
// ---------------------------------------------------------------------------------------------

// Pipeline depth and resident CTAs per SM from the shared memory: the most CTAs per SM
// (kMaxCtasPerSm..1) that still get kMinStagesShared stages; within that, as many stages as fit,
// up to kMaxStages. One CTA alone may run with kMinStages. 1 KB per CTA is reserved by the system
// on sm_80+. stages == 0: the tile does not fit. `max_ctas` (1..kMaxCtasPerSm; other values: no
// cap) lowers the first count tried: fewer CTAs per SM, more stages each (the
// FLUTE_CUDA_MAX_CTAS_PER_SM experiment).
struct PipelineChoice {
  int ctas, stages;
};
inline PipelineChoice choose_pipeline(int smem_per_sm, int smem_per_block, int table_bytes,
                                      int stage_bytes, int min_stages, int max_stages,
                                      int max_ctas = StreamK::kMaxCtasPerSm) {
  const int reserve = 1024;
  if (max_ctas < 1 || max_ctas > StreamK::kMaxCtasPerSm) max_ctas = StreamK::kMaxCtasPerSm;
  for (int c = max_ctas; c >= 1; --c) {
    int avail = smem_per_sm / c - reserve;
    if (avail > smem_per_block) avail = smem_per_block;
    avail -= table_bytes;
    int s = avail > 0 ? avail / stage_bytes : 0;
    if (s > max_stages) s = max_stages;
    if (s >= StreamK::kMinStagesShared || (c == 1 && s >= min_stages)) return {c, s};
  }
  return {1, 0};
}

// 4-byte words of the scale window one row loads per k-tile (GemmParams::scale_words). Groups a
// k-tile of `steps` k16 steps can touch: steps / spg when spg divides steps, 1 when steps divides
// spg (k-tiles start on group boundaries), else at most (spg - 1 + steps - 1) / spg + 1; plus one
// element for the even alignment of the window.
inline int scale_words(int group, int ngroups, int steps) {
  int gmax;
  if (ngroups == 1) {
    gmax = 1;
  } else {
    const int spg = group / 16;
    gmax = steps % spg == 0 ? steps / spg : (spg % steps == 0 ? 1 : (spg - 1 + steps - 1) / spg + 1);
  }
  return (gmax + 1 + 1) / 2;
}

// The Stream-K schedule of `tiles` output tiles of `iters` k-tiles each over `slots` resident
// CTAs: full waves of whole tiles; the tiles of the last, partial wave (rem of them) are split
// into `split` = min(kMaxSplit, iters / kMinSplitIters, slots / rem) parts when that is >= 2.
struct StreamKPlan {
  int grid;           // CTAs launched (<= slots: all resident)
  int dp_tiles;       // tiles done whole
  int split;          // parts per split tile (1: none split)
  int sk_units;       // split parts = (tiles - dp_tiles) * split
  int partial_slots;  // workspace partial tiles (and flags) = (tiles - dp_tiles) * (split - 1)
};
inline StreamKPlan make_streamk_plan(int tiles, int iters, int slots) {
  StreamKPlan p;
  const int waves = tiles / slots;
  const int rem = tiles - waves * slots;
  int split = 1;
  if (rem > 0) {
    split = StreamK::kMaxSplit;
    if (iters / StreamK::kMinSplitIters < split) split = iters / StreamK::kMinSplitIters;
    if (slots / rem < split) split = slots / rem;
    if (split < 1) split = 1;
  }
  const int sk_tiles = split > 1 ? rem : 0;
  p.dp_tiles = tiles - sk_tiles;
  p.split = split;
  p.sk_units = sk_tiles * split;
  p.partial_slots = sk_tiles * (split - 1);
  const int dp_grid = p.dp_tiles < slots ? p.dp_tiles : slots;
  p.grid = dp_grid > p.sk_units ? dp_grid : p.sk_units;
  return p;
}

// The Stream-K workspace, one layout for every plan of a device with `sms` SMs: the flags first
// (a fixed region of workspace_max_slots ints, so that no plan's partials ever land on another
// plan's flags, which must stay zero between launches), then the fp32 partial tiles. Partial
// slots = split tiles x (split - 1) with split tiles x split <= grid <= SMs x kMaxCtasPerSm, so at
// most (kMaxSplit - 1) / kMaxSplit of the largest grid; each slot one tile of the largest batch.
inline size_t workspace_max_slots(int sms) {
  return (size_t)sms * StreamK::kMaxCtasPerSm * (StreamK::kMaxSplit - 1) / StreamK::kMaxSplit;
}
inline size_t workspace_partials_offset(int sms) {
  return (workspace_max_slots(sms) * sizeof(int) + 255) / 256 * 256;
}
inline size_t workspace_max_bytes(int sms) {
  static_assert(GemmConfig<2, 4>::kPartialFloats == GemmConfig<4, 4>::kPartialFloats &&
                    GemmConfig<4, 2>::kPartialFloats < GemmConfig<4, 4>::kPartialFloats,
                "the 64-row tile has the largest partial");
  return workspace_partials_offset(sms) +
         workspace_max_slots(sms) * GemmConfig<4, 4>::kPartialFloats * sizeof(float);
}

// What CTA `cta` of `grid` processes, in order (flute/kernel_plan.py: WorkList):
//   * its split part, if cta < sk_units: part cta % split of tile dp_tiles + cta / split. Parts
//     0..split-2 are "peers" (publish a partial sum), part split-1 is the "owner" (waits for its
//     split-1 peers, which all have lower CTA indices, adds their partials in part order, stores);
//   * whole tiles cta, cta + grid, cta + 2 grid, ... below dp_tiles.
// Order: a peer part first (nothing waits before it publishes), then the whole tiles, then an
// owner part last (its peers have had the whole-tile time to finish).
struct WorkList {
  int cta, grid, iters, split;
  int n_dp;         // whole tiles of this CTA
  int sk_tile;      // tile of the split part, or -1
  int sk_kbeg, sk_kend;
  bool sk_first;    // the split part is a peer part (processed first)
  int nseg;

  FLUTE_HD void init(int dp_tiles, int split_, int sk_units, int k_tiles, int c, int g) {
    cta = c;
    grid = g;
    iters = k_tiles;
    split = split_;
    n_dp = c < dp_tiles ? (dp_tiles - 1 - c) / g + 1 : 0;
    sk_tile = -1;
    sk_kbeg = sk_kend = 0;
    sk_first = false;
    if (c < sk_units) {
      const int part = c % split;
      sk_tile = dp_tiles + c / split;
      sk_kbeg = part * iters / split;
      sk_kend = (part + 1) * iters / split;
      sk_first = part + 1 < split;
    }
    nseg = n_dp + (sk_tile >= 0 ? 1 : 0);
  }
  FLUTE_HD int count() const { return n_dp * iters + (sk_tile >= 0 ? sk_kend - sk_kbeg : 0); }
  // Whether segment `seg` (0..nseg-1, processing order) is the split part.
  FLUTE_HD bool is_split(int seg) const {
    return sk_tile >= 0 && (sk_first ? seg == 0 : seg == nseg - 1);
  }
  FLUTE_HD bool is_peer() const { return sk_first; }
  // Workspace slot of part q (< split - 1) of this CTA's split tile.
  FLUTE_HD int peer_slot(int q) const { return (cta / split) * (split - 1) + q; }
  FLUTE_HD void segment(int seg, int& tile, int& kbeg, int& kend) const {
    if (is_split(seg)) {
      tile = sk_tile;
      kbeg = sk_kbeg;
      kend = sk_kend;
    } else {
      tile = cta + (seg - (sk_first ? 1 : 0)) * grid;
      kbeg = 0;
      kend = iters;
    }
  }
};

// Walks a WorkList one k-tile at a time.
struct Cursor {
  int seg, tile, k, kbeg, kend;

  FLUTE_HD void start(const WorkList& wl) {
    seg = 0;
    tile = k = kbeg = kend = 0;
    if (wl.nseg > 0) {
      wl.segment(0, tile, kbeg, kend);
      k = kbeg;
    }
  }
  FLUTE_HD void advance(const WorkList& wl) {
    if (++k == kend && ++seg < wl.nseg) {
      wl.segment(seg, tile, kbeg, kend);
      k = kbeg;
    }
  }
};

struct DequantParams {
  const void* qweight;
  const void* scales;
  const void* offsets;
  const float* table;
  void* w;               // [N, K] contiguous
  int N, K, group, ngroups, n_atoms, k_atoms;
};

}  // namespace flute
