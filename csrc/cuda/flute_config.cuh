// Compile-time tile configuration of the flute kernels, derived from a few parameters.
//
// Includes only CUDA headers: this file compiles with nvcc on a machine without a GPU or torch.
// Every number here has a twin in flute/emulate.py (the executable spec); keep them in sync.
#pragma once

#include <cstdint>

namespace flute {

// ---------------------------------------------------------------------------------------------
// The kernel layout (see csrc/cuda/LAYOUT.md and flute/layout.py). It depends only on the bit
// width: every tile configuration below is a multiple of one atom.
// ---------------------------------------------------------------------------------------------
template <int kBits>
struct LayoutTraits {
  static_assert(kBits == 2 || kBits == 3 || kBits == 4, "flute supports 2, 3 and 4-bit codes");
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
  static constexpr int kPairCopies = kBits == 2 ? 1 : 32;
  static constexpr int kLogPairCopies = kBits == 2 ? 0 : 5;
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
};

// Kernel arguments. All sizes in elements unless said otherwise.
struct GemmParams {
  const void* x;         // [M, ldx] fp16/bf16, 16-byte aligned rows, columns >= K are 0 up to K8
  const void* qweight;   // the kernel layout (int32, 16-byte aligned)
  const void* scales;    // [N, ngroups], 4-byte aligned
  const void* offsets;   // [N, ngroups] or nullptr
  const float* table;    // [2^bits] float32
  void* y;               // [M, N] contiguous
  float* partials;       // [grid, kPartialFloats] stream-K partial sums (fp32)
  int* flags;            // [grid], zero at launch; each set flag is reset by its consumer
  int M, N, K, ldx;
  int group;             // effective group size (>= 1)
  int ngroups;           // ceil(K / group)
  int steps_per_group;   // group / 16, or 1 << 30 when ngroups == 1
  int scale_words;       // 4-byte words per scale-window row to load (1..4)
  int n_atoms, k_atoms;  // N_pad / 32, K_pad / atom_k
  int m_tiles, n_tiles, k_tiles;
  int stages;            // pipeline depth, kMinStages..kMaxStages
  int iters_q, iters_r;  // stream-K split: CTA c gets iters_q + (c < iters_r) iterations
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
