"""The executable spec of the CUDA kernel: a pure-torch emulation of what its threads compute.

Every function here mirrors a piece of ``csrc/cuda`` line by line (same names, same index
arithmetic, same loop structure), vectorized over threads with torch. The tests run it on CPU and
compare what the emulated threads decode with :func:`flute.format.dequantize_codes`, so an error
in the index arithmetic shows up here, without a GPU.

Mirrored pieces (CUDA file: function):

* ``flute_device.cuh``: :func:`step_pair_indices`, :func:`build_pair_table`.
* ``flute_gemm.cuh``: :func:`load_stage_codes`, :func:`load_stage_scales`,
  :func:`load_stage_x`, :func:`decode_b_fragments` (the B half of ``compute_stage``),
  :func:`a_fragment_source` (the ldmatrix addressing), the epilogue's reduction order, and
  :func:`emulate_qgemm` (the whole kernel).

The tile constants, the problem description and the launch plan these run under (pipeline,
Stream-K schedule, dispatch) are in :mod:`flute.kernel_plan`.

Numerics are not mirrored: the emulation dequantizes in float32 (as the reference does) and
multiplies in float64; the kernel uses half2/bfloat162 and fp32 accumulation.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .kernel_plan import Config, Problem, make_streamk_plan, scale_words, streamk_schedule
from .layout import kernel_layout_shape, pair_codes

U32 = 0xFFFFFFFF


# -- flute_device.cuh ----------------------------------------------------------------------------

def step_pair_indices(bits: int, atoms_k: int, w: List[torch.Tensor], s: int):
    """``step_pair_indices<kBits, kAtomsK>``: byte j of idx[r] = pair index of b_r of n8 tile j.

    ``w``: the lane's 32-bit words as int64 tensors holding uint32 values, chunk-major."""
    if bits == 4:
        a, sa = s >> 2, s & 3
        base = (a * 2 + (sa >> 1)) * 4 + (sa & 1) * 2
        return w[base], w[base + 1]
    if bits == 2:
        v = w[(s >> 2) * 4 + (s & 3)]
        return v & 0x0F0F0F0F, (v >> 4) & 0x0F0F0F0F
    lo = w[(1 + (s >> 2)) * 4 + (s & 3)]
    hi = w[s >> 1]
    if (s & 1) == 0:
        h0, h1 = hi, hi >> 2
    else:
        h0, h1 = (hi << 4) & U32, (hi << 2) & U32
    return (lo & 0x0F0F0F0F) | (h0 & 0x30303030), ((lo >> 4) & 0x0F0F0F0F) | (h1 & 0x30303030)


def build_pair_table(table: torch.Tensor, cfg: Config) -> torch.Tensor:
    """``build_pair_table``: shared words ``[entries * copies, 2]`` (lo, hi value), float32."""
    bits = cfg.bits
    i = torch.arange(cfg.pair_entries * cfg.pair_copies)
    e = i >> cfg.log_pair_copies
    lo, hi = pair_codes(bits)
    t = table.to(torch.float32).cpu()
    return torch.stack([t[lo[e]], t[hi[e]]], dim=1)


# -- flute_gemm.cuh: producer -------------------------------------------------------------------

def load_stage_codes(qweight: torch.Tensor, p: Problem, cfg: Config, n_tile: int, ktile: int):
    """The code part of ``load_stage``: the stage's 16-byte chunks as int64 ``[chunks, 4]`` uint32
    words, written exactly where the CUDA cp.asyncs write them (asserting no overlap)."""
    q = qweight.view(-1, 4).to(torch.int64) & U32  # uint4 view of the layout
    total = cfg.warps * cfg.warp_chunks
    smem = torch.full((total, 4), -1, dtype=torch.int64)  # -1: never written
    tid = torch.arange(cfg.threads)
    written = torch.zeros(total, dtype=torch.int64)
    for it in range(cfg.code_copies_per_thread):
        i = it * cfg.threads + tid
        w = i // cfg.warp_chunks
        off = i % cfg.warp_chunks
        na = n_tile * cfg.warps + w
        ka = ktile * cfg.atoms_k + off // (cfg.chunks * 32)
        inb = (na < p.n_atoms) & (ka < p.k_atoms)
        g = (na * p.k_atoms + ktile * cfg.atoms_k) * (cfg.chunks * 32) + off
        if inb.any():
            assert int(g[inb].max()) < q.shape[0], "code reads stay inside qweight"
        val = torch.zeros(cfg.threads, 4, dtype=torch.int64)
        val[inb] = q[g[inb]]
        smem[i] = val
        written[i] += 1
    assert bool((written == 1).all()), "every code chunk of the stage is written exactly once"
    return smem


def lane_words(smem_codes: torch.Tensor, cfg: Config, warp, lane) -> List[torch.Tensor]:
    """The lds.128 loads of ``compute_stage``: word 4c + x of the lane = chunk c, component x."""
    base = warp * cfg.warp_chunks
    return [smem_codes[base + c * 32 + lane, x] for c in range(cfg.lane_chunks) for x in range(4)]


def load_stage_scales(scales: torch.Tensor, p: Problem, cfg: Config, n_tile: int, ktile: int):
    """The scale part of ``load_stage``: window ``[bn, 8]`` (float32 values; NaN = not loaded)."""
    flat = scales.reshape(-1).to(torch.float32)
    total = p.N * p.ngroups
    smem = torch.full((cfg.bn, cfg.scale_window), float("nan"))
    tid = torch.arange(cfg.threads)
    n = n_tile * cfg.bn + tid
    g_lo = (ktile * cfg.bk) // p.group
    e0 = (n * p.ngroups + g_lo) & ~1
    nw = scale_words(p, cfg)
    assert 1 <= nw <= 4
    for w in range(nw):
        e = e0 + 2 * w
        left = torch.where(n < p.N, total - e, torch.zeros_like(e))
        nbytes = torch.where(left >= 2, 4, torch.where(left == 1, 2, 0))
        for half in range(2):  # the two elements of the 4-byte word; zero-filled past src bytes
            ok = nbytes >= 2 * (half + 1)
            v = torch.zeros(cfg.threads)
            v[ok] = flat[(e + half)[ok]]
            smem[tid, 2 * w + half] = v
    return smem


def load_stage_x(x: torch.Tensor, p: Problem, cfg: Config, M: int, m_tile: int, ktile: int,
                 smem: Optional[torch.Tensor] = None):
    """The activation part of ``load_stage``: swizzled rows ``[bm, 16 chunks, 8]``; rows >= M
    keep whatever the stage held (never zeroed: they only reach output rows that are not stored)."""
    if smem is None:
        smem = torch.zeros(cfg.bm, cfg.x_chunks_per_row, 8, dtype=x.dtype)
    k8 = (p.K + 7) & ~7
    xp = torch.zeros(x.shape[0], k8, dtype=x.dtype)
    xp[:, :p.K] = x
    tid = torch.arange(cfg.threads)
    n_copies = -(-cfg.bm * cfg.x_chunks_per_row // cfg.threads)
    for it in range(n_copies):
        i = it * cfg.threads + tid
        i = i[i < cfg.bm * cfg.x_chunks_per_row]
        row, ch = i // cfg.x_chunks_per_row, i % cfg.x_chunks_per_row
        m = m_tile * cfg.bm + row
        keep = m < M
        row, ch, m = row[keep], ch[keep], m[keep]
        k = ktile * cfg.bk + ch * 8
        inb = k < k8
        vals = torch.zeros(len(m), 8, dtype=x.dtype)
        if inb.any():
            cols = k[inb].unsqueeze(1) + torch.arange(8)
            vals[inb] = xp[m[inb].unsqueeze(1), cols]
        smem[row, ch ^ (row & 7)] = vals
    return smem


# -- flute_gemm.cuh: consumer -------------------------------------------------------------------

def decode_b_fragments(qweight, scales, offsets, table, p: Problem, cfg: Config, n_tile: int,
                       ktile: int, warp, lane):
    """What ``compute_stage`` puts into the B registers of thread (warp, lane) for every k16 step
    of k-tile ``ktile`` of column tile ``n_tile``: a list of ``(n, k, value)`` tensors (one entry
    per (step, n8 tile j, register r, element e)) with the weight coordinates the mma reads them
    as (B fragment: n = 8j + g, k = 16s + 8r + 2t + e) and the dequantized value (float32)."""
    warp = torch.as_tensor(warp)
    lane = torch.as_tensor(lane)
    g, t = lane >> 2, lane & 3
    codes = load_stage_codes(qweight, p, cfg, n_tile, ktile)
    sc_smem = load_stage_scales(scales, p, cfg, n_tile, ktile)
    of_smem = None if offsets is None else load_stage_scales(offsets, p, cfg, n_tile, ktile)
    pt = build_pair_table(table, cfg)
    pt_lane = lane & (cfg.pair_copies - 1)
    w = lane_words(codes, cfg, warp, lane)

    g_lo = (ktile * cfg.bk) // p.group
    par, nl = [], []
    for j in range(4):
        nl_j = warp * 32 + 8 * j + g
        n = n_tile * cfg.bn + nl_j
        par.append((n * p.ngroups + g_lo) & 1)
        nl.append(nl_j)
    gpos = ((ktile * cfg.bk) // 16) % p.steps_per_group
    widx = 0
    out = []
    sc = [None] * 4
    of = [None] * 4
    for s in range(cfg.steps):
        if s > 0:
            gpos += 1
            if gpos == p.steps_per_group:
                gpos = 0
                widx += 1
        if s == 0 or gpos == 0:
            assert widx + 1 < cfg.scale_window
            for j in range(4):
                pos = par[j] + widx
                assert int(pos.max()) < 2 * scale_words(p, cfg), "read inside the loaded window"
                sc[j] = sc_smem[nl[j], pos]
                if of_smem is not None:
                    of[j] = of_smem[nl[j], pos]
        idx = step_pair_indices(p.bits, cfg.atoms_k, w, s)
        for j in range(4):
            for r in range(2):
                e = (idx[r] >> (8 * j)) & 0xFF
                assert int(e.max()) < cfg.pair_entries
                word = pt[(e << cfg.log_pair_copies) + pt_lane]  # [threads, 2]
                for el in range(2):
                    v = word[..., el] * sc[j]
                    if of_smem is not None:
                        v = v + of[j]
                    n = n_tile * cfg.bn + warp * 32 + 8 * j + g
                    k = ktile * cfg.bk + 16 * s + 8 * r + 2 * t + el
                    out.append((n, k, v))
    return out


def a_fragment_source(cfg: Config, s: int, mt: int, lane):
    """The ldmatrix.x4 addressing of ``compute_stage``: for each of the 4 result registers and its
    2 halves, the (row, chunk-position, element) of the swizzled x stage the lane receives, and the
    (row, k) of the A fragment it must be (a_i: row g + 8 (i & 1), k 2t + 8 (i >> 1) + e)."""
    lane = torch.as_tensor(lane)
    res = []
    for i in range(4):  # matrix i is addressed by lanes 8i..8i+7
        for e in range(2):
            src_lane = 8 * i + (lane >> 2)           # lane that supplied this row's address
            row = mt * 16 + (src_lane & 15)
            ch = 2 * s + (src_lane >> 4)
            pos = ch ^ (row & 7)
            elem = 2 * (lane & 3) + e
            want_row = mt * 16 + (lane >> 2) + 8 * (i & 1)
            want_k = 16 * s + 2 * (lane & 3) + 8 * (i >> 1) + e
            res.append(((row, pos, elem), (want_row, want_k)))
    return res


# -- the whole kernel ----------------------------------------------------------------------------

def emulate_qgemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  offsets: Optional[torch.Tensor], table: torch.Tensor, bits: int, group_size: int,
                  in_features: int, out_features: int, slots: int, m_tiles16: int = 1,
                  pair_copies_wide: int = 32) -> torch.Tensor:
    """Run the fused kernel's algorithm on CPU: Stream-K schedule for ``slots`` resident CTAs,
    stage loads, per-thread B decode, ldmatrix A fragments, fp64 "mma", fixed-order reduction,
    predicated stores into a NaN-poisoned output. Returns y [M, N] (float64). Slow: for small
    shapes only. ``pair_copies_wide``: the FLUTE_PAIR_COPIES_WIDE of the build emulated."""
    assert qweight.shape == kernel_layout_shape(bits, in_features, out_features)
    p = Problem.make(bits, group_size, in_features, out_features)
    cfg = Config(bits, m_tiles16, pair_copies_wide)
    M = x.shape[0]
    m_tiles = max(1, math.ceil(M / cfg.bm))
    n_tiles, k_tiles = p.n_tiles(cfg), p.k_tiles(cfg)
    plan = make_streamk_plan(m_tiles * n_tiles, k_tiles, slots)
    y = torch.full((M, p.N), float("nan"), dtype=torch.float64)
    stores = torch.zeros(M, p.N, dtype=torch.int64)
    warp = torch.arange(4).repeat_interleave(32)
    lane = torch.arange(32).repeat(4)
    schedule = streamk_schedule(plan, k_tiles)
    partials = {}  # workspace slot -> (tile, fp32 partial)

    def tile_partial(tile, kbeg, kend):
        m_tile, n_tile = tile % m_tiles, tile // m_tiles
        acc = torch.zeros(cfg.bm, cfg.bn, dtype=torch.float64)
        # shared memory is never zeroed: rows >= M hold garbage (NaN here) that must not leak
        xs = torch.full((cfg.bm, cfg.x_chunks_per_row, 8), float("nan"), dtype=x.dtype)
        for kt in range(kbeg, kend):
            xs = load_stage_x(x, p, cfg, M, m_tile, kt, xs)
            b = torch.zeros(cfg.bk, cfg.bn, dtype=torch.float64)  # B[k, n] of the tile
            for n, k, v in decode_b_fragments(qweight, scales, offsets, table, p, cfg, n_tile, kt,
                                              warp, lane):
                b[k - kt * cfg.bk, n - n_tile * cfg.bn] = v.to(torch.float64)
            a = torch.zeros(cfg.bm, cfg.bk, dtype=torch.float64)
            for s in range(cfg.steps):
                for mt in range(cfg.m_tiles16):
                    for (row, pos, elem), (wr, wk) in a_fragment_source(cfg, s, mt, torch.arange(32)):
                        a[wr, wk] = xs[row, pos, elem].to(torch.float64)
            acc += a @ b
        return acc

    # The kernel runs CTAs concurrently; here peers are computed first (they never wait).
    for cta, segs in enumerate(schedule):
        for tile, kbeg, kend, role in segs:
            if role[0] == "peer":
                assert role[1] not in partials, "a workspace slot is written once per launch"
                partials[role[1]] = (tile, tile_partial(tile, kbeg, kend))
    for cta, segs in enumerate(schedule):
        for tile, kbeg, kend, role in segs:
            if role[0] == "peer":
                continue
            acc = tile_partial(tile, kbeg, kend)
            if role[0] == "owner":
                for slot in role[1]:  # part order, as the kernel adds them
                    ptile, pacc = partials.pop(slot)
                    assert ptile == tile
                    acc = acc + pacc
            m_tile, n_tile = tile % m_tiles, tile // m_tiles
            rows = torch.arange(cfg.bm) + m_tile * cfg.bm
            cols = torch.arange(cfg.bn) + n_tile * cfg.bn
            rm, cm = rows < M, cols < p.N
            sub = acc[rm][:, cm]
            y[rows[rm].unsqueeze(1), cols[cm]] = sub
            stores[rows[rm].unsqueeze(1), cols[cm]] += 1
    assert not partials, "every published partial is consumed"
    assert bool((stores == 1).all()), "every output element is stored exactly once"
    return y
