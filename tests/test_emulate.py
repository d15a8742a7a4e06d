"""The executable spec (flute/emulate.py): what each emulated kernel thread decodes from the layout
must be exactly the dequantized weight; the stream-K schedule must cover every iteration once and
never wait on a CTA that waits; the whole emulated kernel must match the float64 reference."""
import math

import pytest
import torch

from flute.emulate import a_fragment_source, decode_b_fragments, emulate_qgemm, load_stage_x
from flute.kernel_plan import (DEQUANT_WARPS, M_TILE_OPTIONS, Config, Problem, StreamK, choose_pipeline,
                               make_streamk_plan, max_workspace_bytes, max_workspace_slots,
                               plan_qgemm, scale_words, scale_words_for, streamk_schedule)
from flute.format import dequantize_codes
from flute.testing import random_quantized
from flute.layout import ATOM_N, atom_chunks, atom_k, padded_shape, to_kernel_layout


def emulated_weight(qweight, scales, offs, table, bits, group, n, k):
    """Run decode_b_fragments for every CTA tile / k-tile / thread and scatter into W_pad."""
    p = Problem.make(bits, group, k, n)
    cfg = Config(bits)
    n_pad, k_pad = padded_shape(bits, k, n)
    rows = p.n_tiles(cfg) * cfg.bn
    cols = p.k_tiles(cfg) * cfg.bk
    w = torch.full((rows, cols), float("nan"))
    hits = torch.zeros(rows, cols, dtype=torch.int64)
    warp = torch.arange(4).repeat_interleave(32)
    lane = torch.arange(32).repeat(4)
    for nt in range(p.n_tiles(cfg)):
        for kt in range(p.k_tiles(cfg)):
            for nn, kk, v in decode_b_fragments(qweight, scales, offs, table, p, cfg, nt, kt, warp, lane):
                w[nn, kk] = v
                hits[nn, kk] += 1
    return w, hits


CASES = [  # (n, k, groups to try)
    (17, 40, (32, -1)),
    (192, 576, (32, 64, 128, 256, -1)),
    (1000, 1536, (128,)),
    (64, 256, (64, 256)),
    (40, 200, (48, 96, -1)),
]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,groups", CASES)
def test_threads_decode_exact_weight(bits, n, k, groups, rng):
    for group in groups:
        for offsets in (False, True):
            if n * k > 200_000 and offsets:
                continue  # keep the CPU time small; offsets are covered on the other shapes
            codes, scales, offs, table = random_quantized(n, k, bits, group, offsets=offsets, dtype=torch.float16, generator=rng)
            q = to_kernel_layout(codes, bits)
            w, hits = emulated_weight(q, scales, offs, table, bits, group, n, k)
            # every position of the kernel's tiles is produced exactly once ...
            assert bool((hits == 1).all())
            # ... and the real ones are exactly the weight
            ref = dequantize_codes(codes, scales, offs, table, group)
            assert torch.equal(w[:n, :k], ref), (bits, n, k, group, offsets)
            # padded positions only ever hold finite values (they meet zero activations or are
            # never stored), and there are exactly as many as the padding
            pad = torch.ones_like(hits, dtype=torch.bool)
            pad[:n, :k] = False
            assert bool(torch.isfinite(w[pad]).all())
            assert int(pad.sum()) == w.numel() - n * k


def test_scale_window_bound():
    """For every group size the fused path takes, the scale positions a k-tile reads stay inside
    the loaded window (asserted in decode_b_fragments) and the window fits 8 elements."""
    cfg = Config(4)
    for group in list(range(32, 1100, 16)):
        for k in (group * 3 + 16, 4096, 1000 * 16):
            p = Problem.make(4, group, k, 32)
            nw = scale_words(p, cfg)
            assert 1 <= nw <= 4
            worst = 0
            for kt in range(p.k_tiles(cfg)):
                k0 = kt * cfg.bk
                gpos = (k0 // 16) % p.steps_per_group
                widx = 0
                for s in range(1, cfg.steps):
                    gpos += 1
                    if gpos == p.steps_per_group:
                        gpos, widx = 0, widx + 1
                    # the counter agrees with plain division
                    assert widx == (k0 + 16 * s) // p.group - k0 // p.group
                worst = max(worst, widx)
            assert worst + 1 + 1 <= 2 * nw  # parity + widx < loaded elements


def test_x_swizzle_conflict_free_and_exact(rng):
    cfg = Config(4, 4)
    lane = torch.arange(32)
    for s in range(cfg.steps):
        for mt in range(cfg.m_tiles16):
            # the 8 row addresses of each ldmatrix phase: distinct 16-byte bank groups
            for phase in range(4):
                L = torch.arange(8 * phase, 8 * phase + 8)
                row = mt * 16 + (L & 15)
                ch = 2 * s + (L >> 4)
                groups = ((row * 256 + (ch ^ (row & 7)) * 16) // 16) % 8
                assert len(set(groups.tolist())) == 8
    # loaded + swizzled + ldmatrix-read data is the A fragment
    M, K = 37, 300
    x = torch.randn(M, K, generator=rng).to(torch.float16)
    p = Problem.make(4, 64, K, 64)
    for m_tile in range(math.ceil(M / cfg.bm)):
        for kt in range(math.ceil(K / 128)):
            xs = load_stage_x(x, p, cfg, M, m_tile, kt)
            for s in range(cfg.steps):
                for mt in range(cfg.m_tiles16):
                    for (row, pos, elem), (wr, wk) in a_fragment_source(cfg, s, mt, lane):
                        got = xs[row, pos, elem]
                        m = m_tile * cfg.bm + wr
                        kk = kt * 128 + wk
                        want = torch.where((m < M) & (kk < K), x[m.clamp(max=M - 1), kk.clamp(max=K - 1)],
                                           torch.zeros((), dtype=x.dtype))
                        ok = m < M  # rows >= M are not loaded (zeros from the prologue here)
                        assert torch.equal(got[ok], want[ok])


def test_pair_table_lookups_conflict_free(rng):
    for bits in (2, 3, 4):
        cfg = Config(bits)
        for _ in range(20):
            e = torch.randint(0, cfg.pair_entries, (32,), generator=rng)
            addr = (e << cfg.log_pair_copies) + (torch.arange(32) & (cfg.pair_copies - 1))
            by_bank = {}
            for a in addr.tolist():
                by_bank.setdefault(a % 32, set()).add(a)
            assert max(len(v) for v in by_bank.values()) == 1  # one address per bank: no replay


@pytest.mark.parametrize("bits,M,n,k,group,offsets,slots,mt", [
    (4, 1, 64, 256, 64, False, 5, 1),
    (3, 3, 40, 200, -1, True, 3, 1),
    (2, 17, 33, 130, 32, False, 4, 2),
    (4, 33, 96, 128, 32, True, 7, 4),
    (3, 20, 128, 384, 128, False, 2, 1),
    (4, 2, 40, 4096, 128, False, 8, 1),    # one tile split 4 ways (32 k-tiles: 8 per part)
    (2, 5, 300, 2100, 48, True, 2, 1),     # a full wave of whole tiles, the last tile split 2 ways
])
def test_emulated_kernel_matches_reference(bits, M, n, k, group, offsets, slots, mt, rng):
    check_emulated_kernel(bits, M, n, k, group, offsets, slots, mt, rng)


@pytest.mark.parametrize("bits", [3, 4])
def test_emulated_8_copies_build_matches_reference(bits, rng):
    """The pc8 tuning build's pair-table indexing (8 interleaved copies) decodes the same weights."""
    check_emulated_kernel(bits, 3, 40, 300, 64, bits == 3, 3, 1, rng, pair_copies_wide=8)


def check_emulated_kernel(bits, M, n, k, group, offsets, slots, mt, rng, pair_copies_wide=32):
    codes, scales, offs, table = random_quantized(n, k, bits, group, offsets=offsets, dtype=torch.float16, generator=rng)
    x = torch.randn(M, k, generator=rng).to(torch.float16)
    q = to_kernel_layout(codes, bits)
    y = emulate_qgemm(x, q, scales, offs, table, bits, group, k, n, slots=slots, m_tiles16=mt,
                      pair_copies_wide=pair_copies_wide)
    w = dequantize_codes(codes, scales, offs, table, group).double()  # float32 weights, as decoded
    ref = x.double() @ w.t()
    assert torch.allclose(y, ref, rtol=1e-9, atol=1e-9)


# -- Stream-K schedule: limits on the GPUs and shapes we care about --------------------------------

GPUS = {  # name: (SMs, shared memory per SM, per block opt-in)
    "H100": (132, 228 * 1024, 227 * 1024),
    "H200": (132, 228 * 1024, 227 * 1024),
    "A100": (108, 164 * 1024, 163 * 1024),
    "L40S": (142, 100 * 1024, 99 * 1024),
    "RTX4090": (128, 100 * 1024, 99 * 1024),
}
LLAMA_SHAPES = {  # (N, K) of the linear layers
    "8B": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "70B": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
}


def check_schedule(plan, tiles, iters, slots):
    """Coverage, limits and wait order of one Stream-K plan, from the segments the CTAs walk."""
    sched = streamk_schedule(plan, iters)
    assert plan.grid <= slots, "all CTAs are resident at once (owners spin on their peers)"
    covered = torch.zeros(tiles, iters, dtype=torch.int64)
    ctas_of_tile = {}
    peer_slot_cta, owners = {}, {}
    counts = []
    for cta, segs in enumerate(sched):
        assert segs, "every CTA has work"
        counts.append(sum(ke - kb for _, kb, ke, _ in segs))
        roles = [r[0] for *_, r in segs]
        assert roles.count("peer") + roles.count("owner") <= 1
        if "peer" in roles:
            assert roles[0] == "peer", "a peer part comes first: nothing waits before it publishes"
        if "owner" in roles:
            assert roles[-1] == "owner", "an owner part comes last"
        for tile, kb, ke, role in segs:
            covered[tile, kb:ke] += 1
            ctas_of_tile.setdefault(tile, set()).add(cta)
            whole = kb == 0 and ke == iters
            assert whole or ke - kb >= 8, f"CTA {cta}: {ke - kb} k-tiles of tile {tile}"
            assert whole == (role[0] == "full")
            if role[0] == "peer":
                assert role[1] not in peer_slot_cta and 0 <= role[1] < plan.partial_slots
                peer_slot_cta[role[1]] = (cta, tile, kb)
            elif role[0] == "owner":
                owners[cta] = (tile, kb, role[1])
    assert bool((covered == 1).all()), "every (tile, k-tile) exactly once"
    assert max(len(c) for c in ctas_of_tile.values()) <= 4, "at most 4 CTAs per tile"
    for cta, (tile, kb, slots_) in owners.items():
        peers = [peer_slot_cta.pop(s) for s in slots_]
        assert all(p[1] == tile and p[0] < cta for p in peers), "an owner waits on its own tile's lower CTAs"
        assert [p[2] for p in peers] == sorted(p[2] for p in peers), "partials added in k order"
        assert kb > 0 and len(peers) == plan.split - 1
    assert not peer_slot_cta, "every published partial has an owner"
    waves = tiles // slots
    assert max(counts) <= waves * iters + (iters if plan.split == 1 else -(-iters // plan.split))
    return sched, counts


@pytest.mark.parametrize("tiles,iters,slots", [
    (1, 1, 1), (1, 12, 5), (1, 64, 396), (2, 5, 10), (3, 7, 4), (16, 64, 132), (64, 64, 264),
    (7, 3, 20), (224, 64, 132), (5, 1, 3), (2, 9, 17), (13, 11, 13), (400, 32, 396),
    (397, 64, 396), (133, 16, 132), (40, 40, 396), (1000, 8, 7)])
def test_streamk_schedule(tiles, iters, slots):
    plan = make_streamk_plan(tiles, iters, slots)
    check_schedule(plan, tiles, iters, slots)


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_streamk_plans_on_gpus_and_llama_shapes(gpu):
    """Every Llama-3-8B/70B layer at M = 1..256, every bit width, on the GPUs we target: the
    schedule's limits hold, and a CTA never gets fewer than 8 k-tiles of a split tile."""
    sms, smem_sm, smem_block = GPUS[gpu]
    for model, shapes in LLAMA_SHAPES.items():
        for (n, k) in shapes:
            for bits in (2, 3, 4):
                for M in (1, 16, 32, 64, 256):
                    for offsets in (False, True):
                        gp = plan_qgemm(M, n, k, bits, 128, offsets, sms, smem_sm, smem_block)
                        assert gp is not None and gp.stages >= 3 or (gp.ctas_per_sm == 1 and gp.stages >= 2)
                        assert gp.smem_bytes * gp.ctas_per_sm + 1024 * gp.ctas_per_sm <= smem_sm
                        assert gp.smem_bytes <= smem_block
                        tiles = gp.m_tiles * gp.n_tiles
                        slots = sms * gp.ctas_per_sm
                        assert gp.streamk == make_streamk_plan(tiles, gp.k_tiles, slots)
                        if M in (1, 64):  # the full walk is slower; the plan limits hold for all
                            check_schedule(gp.streamk, tiles, gp.k_tiles, slots)
                        sk = gp.streamk
                        assert sk.split <= 4 and sk.grid <= slots
                        assert sk.split == 1 or gp.k_tiles // sk.split >= 8
                        # the persistent workspace of dispatch.cu serves every plan; the flags
                        # sit before every plan's partials (never overwritten by another plan)
                        assert sk.partial_slots <= max_workspace_slots(sms)
                        assert sk.partial_slots * 4 <= gp.partials_offset
                        assert gp.workspace_bytes <= max_workspace_bytes(sms)


# -- the header and the emulator agree ------------------------------------------------------------

HEADER_PROBE = r"""
#include <cstdio>
#include "flute_config.cuh"
using namespace flute;
template <int B, int M> void cfg() {
  using C = GemmConfig<B, M>;
  std::printf("cfg %d %d atom_n=%d atom_k=%d chunks=%d pair_entries=%d pair_copies=%d "
              "log_pair_copies=%d pair_bytes=%d warps=%d threads=%d bm=%d bn=%d bk=%d steps=%d "
              "atoms_k=%d lane_chunks=%d warp_chunks=%d code_bytes=%d x_chunks_per_row=%d "
              "x_bytes=%d scale_window=%d scale_bytes=%d table_bytes=%d stage0=%d stage1=%d "
              "partial_floats=%d min_stages=%d max_stages=%d m_index=%d code_copies_per_thread=%d\n",
              B, M, C::kAtomN, C::kAtomK, C::kChunks, C::kPairEntries, C::kPairCopies,
              C::kLogPairCopies, C::kPairBytes, C::kWarps, C::kThreads, C::kBM, C::kBN, C::kBK,
              C::kSteps, C::kAtomsK, C::kLaneChunks, C::kWarpChunks, C::kCodeBytes,
              C::kXChunksPerRow, C::kXBytes, C::kScaleWindow, C::kScaleBytes, C::kTableBytes,
              C::stage_bytes(false), C::stage_bytes(true), C::kPartialFloats, C::kMinStages,
              C::kMaxStages, C::kMIndex, C::kCodeCopiesPerThread);
}
int main() {
  cfg<2, 1>(); cfg<2, 2>(); cfg<2, 4>(); cfg<3, 1>(); cfg<3, 2>(); cfg<3, 4>();
  cfg<4, 1>(); cfg<4, 2>(); cfg<4, 4>();
  std::printf("streamk max_split=%d min_split_iters=%d max_ctas_per_sm=%d min_stages_shared=%d\n",
              StreamK::kMaxSplit, StreamK::kMinSplitIters, StreamK::kMaxCtasPerSm,
              StreamK::kMinStagesShared);
  std::printf("misc m_options=%d,%d,%d dequant_warps=%d\n", kMTileOptions[0], kMTileOptions[1],
              kMTileOptions[2], kDequantWarps);
  char op[16];
  int a, b, c, d, e, f, g;
  while (std::scanf("%15s", op) == 1) {
    if (op[0] == 'p') {  // pipeline
      std::scanf("%d %d %d %d %d %d %d", &a, &b, &c, &d, &e, &f, &g);
      PipelineChoice pc = choose_pipeline(a, b, c, d, e, f, g);
      std::printf("pipe %d %d\n", pc.ctas, pc.stages);
    } else if (op[0] == 'w' && op[1] == 's') {  // workspace layout
      std::scanf("%d", &a);
      std::printf("ws %zu %zu %zu\n", workspace_max_slots(a), workspace_partials_offset(a),
                  workspace_max_bytes(a));
    } else if (op[0] == 's') {  // scale words
      std::scanf("%d %d %d", &a, &b, &c);
      std::printf("sw %d\n", scale_words(a, b, c));
    } else {  // plan + every CTA's walk
      std::scanf("%d %d %d", &a, &b, &c);
      StreamKPlan p = make_streamk_plan(a, b, c);
      std::printf("plan %d %d %d %d %d\n", p.grid, p.dp_tiles, p.split, p.sk_units, p.partial_slots);
      for (int cta = 0; cta < p.grid; ++cta) {
        WorkList wl;
        wl.init(p.dp_tiles, p.split, p.sk_units, b, cta, p.grid);
        Cursor cur;
        cur.start(wl);
        std::printf("cta %d %d", cta, wl.count());
        for (int i = 0; i < wl.count(); ++i) {
          if (cur.k + 1 == cur.kend)
            std::printf(" %d:%d:%d:%c%d", cur.tile, cur.kbeg, cur.kend,
                        wl.is_split(cur.seg) ? (wl.is_peer() ? 'p' : 'o') : 'f',
                        wl.is_split(cur.seg) && wl.is_peer() ? wl.peer_slot(cta % p.split) : -1);
          cur.advance(wl);
        }
        std::printf("\n");
      }
    }
  }
  return 0;
}
"""


def compile_header_probe(d, defines=()):
    """flute_config.cuh compiled with the host C++ compiler (it is plain C++ too), with `defines`
    (the FLUTE_CUDA_DEFINES of a tuning build); returns a function that runs it on queries."""
    import os
    import shutil
    import subprocess
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler (c++/g++) to compile csrc/cuda/flute_config.cuh")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (d / "probe.cpp").write_text(HEADER_PROBE)
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(root, "csrc", "cuda"),
                    *[f"-D{x}" for x in defines], str(d / "probe.cpp"), "-o", str(d / "probe")],
                   check=True)

    def run(queries: str) -> str:
        return subprocess.run([str(d / "probe")], input=queries, capture_output=True, text=True,
                              check=True).stdout
    return run


@pytest.fixture(scope="module")
def header_probe(tmp_path_factory):
    return compile_header_probe(tmp_path_factory.mktemp("probe"))


def test_tile_constants_match_header(header_probe):
    check_tile_constants(header_probe(""), pair_copies_wide=32)


def test_tile_constants_of_the_8_copies_build_match_header(tmp_path):
    """The tuning build FLUTE_PAIR_COPIES_WIDE=8 (benchmarks/device_tune.py's pc8): the header's
    constants equal Config(..., pair_copies_wide=8), so the emulator below emulates that build."""
    out = compile_header_probe(tmp_path, ["FLUTE_PAIR_COPIES_WIDE=8"])("")
    check_tile_constants(out, pair_copies_wide=8)
    assert Config(4, 1, 8).pair_bytes == 8 * 1024 and Config(3, 1, 8).log_pair_copies == 3


def check_tile_constants(out, pair_copies_wide):
    seen = 0
    for line in out.splitlines():
        tag, *rest = line.split()
        if tag == "cfg":
            bits, mt = int(rest[0]), int(rest[1])
            got = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in rest[2:]}
            c = Config(bits, mt, pair_copies_wide)
            want = {
                "atom_n": ATOM_N, "atom_k": c.atom_k, "chunks": c.chunks,
                "pair_entries": c.pair_entries, "pair_copies": c.pair_copies,
                "log_pair_copies": c.log_pair_copies, "pair_bytes": c.pair_bytes,
                "warps": c.warps, "threads": c.threads, "bm": c.bm, "bn": c.bn, "bk": c.bk,
                "steps": c.steps, "atoms_k": c.atoms_k, "lane_chunks": c.lane_chunks,
                "warp_chunks": c.warp_chunks, "code_bytes": c.code_bytes,
                "x_chunks_per_row": c.x_chunks_per_row, "x_bytes": c.x_bytes,
                "scale_window": c.scale_window, "scale_bytes": c.scale_bytes,
                "table_bytes": c.table_bytes, "stage0": c.stage_bytes(False),
                "stage1": c.stage_bytes(True), "partial_floats": c.partial_floats,
                "min_stages": c.min_stages, "max_stages": c.max_stages, "m_index": c.m_index,
                "code_copies_per_thread": c.code_copies_per_thread,
            }
            assert got == want, (bits, mt, {k: (got[k], want[k]) for k in got if got[k] != want.get(k)})
            seen += 1
        elif tag == "streamk":
            got = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in rest}
            assert got == {"max_split": StreamK.max_split, "min_split_iters": StreamK.min_split_iters,
                           "max_ctas_per_sm": StreamK.max_ctas_per_sm,
                           "min_stages_shared": StreamK.min_stages_shared}
            seen += 1
        elif tag == "misc":
            got = dict(kv.split("=") for kv in rest)
            assert tuple(map(int, got["m_options"].split(","))) == M_TILE_OPTIONS
            assert int(got["dequant_warps"]) == DEQUANT_WARPS
            seen += 1
    assert seen == 11
    # the layout module agrees too (the kernel layout is built there)
    for bits in (2, 3, 4):
        assert (atom_k(bits), atom_chunks(bits)) == (Config(bits).atom_k, Config(bits).chunks)


def test_host_arithmetic_matches_header(header_probe):
    """choose_pipeline, scale_words, make_streamk_plan and the WorkList/Cursor walk of every CTA,
    compiled from the header, equal flute/kernel_plan.py's."""
    queries, want = [], []
    for sms, smem_sm, smem_block in GPUS.values():
        for bits in (2, 3, 4):
            for mt in M_TILE_OPTIONS:
                c = Config(bits, mt)
                for off in (False, True):
                    for cap in (4, 3, 2, 1, 0):  # 0: out of range, the default cap
                        args = (smem_sm, smem_block, c.table_bytes, c.stage_bytes(off), c.min_stages,
                                c.max_stages, cap)
                        queries.append("pipe " + " ".join(map(str, args)))
                        want.append("pipe %d %d" % choose_pipeline(*args))
    for sms, _, _ in GPUS.values():
        queries.append(f"ws {sms}")
        gp = plan_qgemm(1, 4096, 4096, 4, 128, False, sms, 228 * 1024, 227 * 1024)
        want.append(f"ws {max_workspace_slots(sms)} {gp.partials_offset} {max_workspace_bytes(sms)}")
    for group in list(range(32, 600, 16)) + [4096]:
        for ngroups in (1, 7):
            queries.append(f"sw {group} {ngroups} 8")
            want.append(f"sw {scale_words_for(group, ngroups, 8)}")
    cases = [(1, 1, 1), (1, 64, 396), (3, 7, 4), (32, 32, 396), (112, 32, 396), (224, 64, 132),
             (400, 32, 396), (397, 64, 396), (133, 16, 132), (13, 11, 13), (896, 64, 264),
             (40, 40, 396), (1000, 8, 7), (64, 112, 264), (5, 17, 2)]
    for tiles, iters, slots in cases:
        queries.append(f"walk {tiles} {iters} {slots}")
        p = make_streamk_plan(tiles, iters, slots)
        want.append(f"plan {p.grid} {p.dp_tiles} {p.split} {p.sk_units} {p.partial_slots}")
        for cta, segs in enumerate(streamk_schedule(p, iters)):
            cnt = sum(ke - kb for _, kb, ke, _ in segs)
            parts = []
            for tile, kb, ke, role in segs:
                kind = {"full": "f", "peer": "p", "owner": "o"}[role[0]]
                parts.append(f"{tile}:{kb}:{ke}:{kind}{role[1] if kind == 'p' else -1}")
            want.append(" ".join([f"cta {cta} {cnt}"] + parts))
    got = [l for l in header_probe("\n".join(queries) + "\n").splitlines()
           if l.split()[0] in ("pipe", "sw", "ws", "plan", "cta")]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == w


def test_gpu_tests_fail_without_the_kernel(tmp_path):
    """On a machine with a GPU, a missing or broken flute._C must FAIL tests/test_cuda_kernel.py
    (with the import error), never skip it: simulated here by reporting a GPU to pytest."""
    import os
    import subprocess
    import sys
    import flute
    if flute.ops.HAS_CUDA_KERNEL:
        pytest.skip("flute._C is loaded here; the failure path needs it missing")
    (tmp_path / "fake_gpu.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "fake_gpu", "-p", "no:cacheprovider", "-q",
                        "-rf", os.path.join(root, "tests", "test_cuda_kernel.py"), "-k", "bad_inputs"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert ("1 failed" in out or "1 error" in out) and "skipped" not in out, out  # fixture: error
    assert "did not load on a machine with a GPU" in out and flute.ops.CUDA_KERNEL_ERROR in out, out


def test_max_ctas_cap_trades_ctas_for_stages():
    """The FLUTE_CUDA_MAX_CTAS_PER_SM experiment: on an H200, a 4-bit 16-row tile gets 3 CTAs of 3
    stages by default; capped at 2 CTAs it gets 5 stages (the bytes-in-flight hypothesis of
    benchmarks/NOTES.md, v0), capped at 1 the most stages the kernel takes."""
    h200 = (132, 228 * 1024, 227 * 1024)
    assert plan_qgemm(1, 28672, 8192, 4, 128, False, *h200).ctas_per_sm == 3
    assert plan_qgemm(1, 28672, 8192, 4, 128, False, *h200).stages == 3
    two = plan_qgemm(1, 28672, 8192, 4, 128, False, *h200, max_ctas=2)
    one = plan_qgemm(1, 28672, 8192, 4, 128, False, *h200, max_ctas=1)
    assert (two.ctas_per_sm, two.stages) == (2, 5)
    assert (one.ctas_per_sm, one.stages) == (1, Config(4, 1).max_stages)
