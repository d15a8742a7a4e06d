"""The CUDA kernel's tile constants and launch plan: every choice the host makes, in pure Python.

Mirrored pieces (CUDA file: function):

* ``flute_config.cuh``: :class:`Config` (tile constants), :class:`StreamK` (limits),
  :func:`choose_pipeline`, :func:`scale_words_for`, :func:`make_streamk_plan`, :class:`WorkList`,
  :class:`Cursor` (walked by :func:`streamk_schedule`).
* ``flute_launch.h``: :data:`FUSED_MAX_M`, :func:`fused_supports_group`.
* ``dispatch.cu``: :func:`scale_words`, :func:`batch_tile`, :func:`plan_qgemm` (batch tile,
  pipeline, schedule), the workspace sizes.

Apart from :mod:`flute.emulate` (what the threads compute) because this is integer arithmetic
only, with no tensors: tests/test_emulate.py compiles ``flute_config.cuh`` with the host compiler
and compares it with these functions, and :func:`flute.emulate.emulate_qgemm` runs the schedule
planned here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from .format import effective_group_size, num_groups
from .layout import ATOM_N, atom_chunks, atom_k


# -- flute_config.cuh: tile constants and limits -----------------------------------------------

@dataclass(frozen=True)
class Config:
    """``GemmConfig<kBits, kMTiles>`` (flute_config.cuh)."""
    bits: int
    m_tiles16: int = 1
    #: FLUTE_PAIR_COPIES_WIDE of the build (copies of the 3/4-bit pair tables; 32 in the product)
    pair_copies_wide: int = 32

    warps = 4
    threads = 128
    bk = 128
    steps = 8
    scale_window = 8
    min_stages = 2
    max_stages = 8

    @property
    def bm(self): return 16 * self.m_tiles16
    @property
    def bn(self): return ATOM_N * self.warps
    @property
    def atom_k(self): return atom_k(self.bits)
    @property
    def chunks(self): return atom_chunks(self.bits)
    @property
    def atoms_k(self): return self.bk // self.atom_k
    @property
    def lane_chunks(self): return self.atoms_k * self.chunks
    @property
    def warp_chunks(self): return self.lane_chunks * 32
    @property
    def code_copies_per_thread(self): return self.warps * self.warp_chunks // self.threads
    @property
    def pair_entries(self): return 1 << (2 * self.bits)
    @property
    def pair_copies(self): return 1 if self.bits == 2 else self.pair_copies_wide
    @property
    def log_pair_copies(self): return self.pair_copies.bit_length() - 1
    @property
    def x_chunks_per_row(self): return self.bk * 2 // 16
    @property
    def m_index(self): return {1: 0, 2: 1, 4: 2}[self.m_tiles16]
    @property
    def code_bytes(self): return self.warps * self.warp_chunks * 16
    @property
    def x_bytes(self): return self.bm * self.bk * 2
    @property
    def scale_bytes(self): return self.bn * self.scale_window * 2
    @property
    def pair_bytes(self): return self.pair_entries * self.pair_copies * 4
    @property
    def table_bytes(self): return (self.pair_bytes + 127) // 128 * 128
    @property
    def partial_floats(self): return self.bm * self.bn

    def stage_bytes(self, has_offsets: bool) -> int:
        return self.x_bytes + self.code_bytes + self.scale_bytes * (2 if has_offsets else 1)


class StreamK:
    """``StreamK`` limits (flute_config.cuh)."""
    max_split = 4
    min_split_iters = 8
    max_ctas_per_sm = 4
    min_stages_shared = 3


M_TILE_OPTIONS = (1, 2, 4)  # kMTileOptions
DEQUANT_WARPS = 4           # kDequantWarps


# -- GemmParams: one weight and its scale window -----------------------------------------------

@dataclass
class Problem:
    """The kernel's view of one weight (``GemmParams`` minus pointers)."""
    bits: int
    N: int
    K: int
    group: int
    ngroups: int

    @property
    def n_atoms(self): return math.ceil(self.N / ATOM_N)
    @property
    def k_atoms(self): return math.ceil(self.K / atom_k(self.bits))
    @property
    def steps_per_group(self): return (1 << 30) if self.ngroups == 1 else self.group // 16

    def n_tiles(self, cfg): return math.ceil(self.n_atoms / cfg.warps)
    def k_tiles(self, cfg): return math.ceil(self.k_atoms / cfg.atoms_k)

    @staticmethod
    def make(bits, group_size, in_features, out_features):
        return Problem(bits, out_features, in_features, effective_group_size(group_size, in_features),
                       num_groups(group_size, in_features))


def scale_words_for(group: int, ngroups: int, steps: int) -> int:
    """``scale_words`` of flute_config.cuh."""
    if ngroups == 1:
        gmax = 1
    else:
        spg = group // 16
        gmax = (steps // spg if steps % spg == 0 else
                (1 if spg % steps == 0 else (spg - 1 + steps - 1) // spg + 1))
    return (gmax + 2) // 2


def scale_words(p: Problem, cfg: Config) -> int:
    """``GemmParams::scale_words`` as ``qgemm_run`` (dispatch.cu) sets it."""
    return scale_words_for(p.group, p.ngroups, cfg.steps)


# -- flute_config.cuh: host-side choices and the Stream-K schedule ----------------------------------

def choose_pipeline(smem_per_sm: int, smem_per_block: int, table_bytes: int, stage_bytes: int,
                    min_stages: int = Config.min_stages, max_stages: int = Config.max_stages,
                    max_ctas: int = StreamK.max_ctas_per_sm):
    """``choose_pipeline``: (resident CTAs per SM, stages) from the shared memory (stages 0: no fit);
    ``max_ctas`` caps the CTAs per SM (the FLUTE_CUDA_MAX_CTAS_PER_SM experiment)."""
    reserve = 1024
    if not 1 <= max_ctas <= StreamK.max_ctas_per_sm:
        max_ctas = StreamK.max_ctas_per_sm
    for c in range(max_ctas, 0, -1):
        avail = min(smem_per_sm // c - reserve, smem_per_block) - table_bytes
        s = min(max_stages, avail // stage_bytes if avail > 0 else 0)
        if s >= StreamK.min_stages_shared or (c == 1 and s >= min_stages):
            return c, s
    return 1, 0


@dataclass(frozen=True)
class StreamKPlan:
    """``StreamKPlan`` of flute_config.cuh."""
    grid: int
    dp_tiles: int
    split: int
    sk_units: int
    partial_slots: int


def make_streamk_plan(tiles: int, iters: int, slots: int) -> StreamKPlan:
    """``make_streamk_plan``: whole tiles in full waves, the last partial wave's tiles split into
    ``min(max_split, iters // min_split_iters, slots // rem)`` parts when that is >= 2."""
    waves = tiles // slots
    rem = tiles - waves * slots
    split = 1
    if rem > 0:
        split = max(1, min(StreamK.max_split, iters // StreamK.min_split_iters, slots // rem))
    sk_tiles = rem if split > 1 else 0
    dp_tiles = tiles - sk_tiles
    sk_units = sk_tiles * split
    grid = max(min(dp_tiles, slots), sk_units)
    return StreamKPlan(grid, dp_tiles, split, sk_units, sk_tiles * (split - 1))


FUSED_MAX_M = 256  # kFusedMaxM (flute_launch.h)


def fused_supports_group(group: int, ngroups: int) -> bool:
    """``fused_supports_group`` (flute_launch.h)."""
    return ngroups == 1 or (group % 16 == 0 and group >= 32)


def batch_tile(M: int) -> int:
    """``batch_tile`` of dispatch.cu: m16 tiles per CTA tile."""
    return next((m for m in M_TILE_OPTIONS if M <= 16 * m), M_TILE_OPTIONS[-1])


@dataclass(frozen=True)
class GemmPlan:
    """What ``qgemm_plan`` (dispatch.cu) decides for the fused path."""
    m_tiles16: int
    stages: int
    smem_bytes: int
    ctas_per_sm: int
    m_tiles: int
    n_tiles: int
    k_tiles: int
    streamk: StreamKPlan

    sms: int

    @property
    def partials_offset(self) -> int:
        """The flags come first, in a region of max_slots ints fixed per device (dispatch.cu)."""
        return (max_workspace_slots(self.sms) * 4 + 255) // 256 * 256

    @property
    def workspace_bytes(self) -> int:
        return self.partials_offset + self.streamk.partial_slots * Config(4, self.m_tiles16).partial_floats * 4


def max_workspace_slots(sms: int) -> int:
    """``max_slots`` of dispatch.cu: the partial slots any plan of the device can need."""
    return sms * StreamK.max_ctas_per_sm * (StreamK.max_split - 1) // StreamK.max_split


def max_workspace_bytes(sms: int) -> int:
    """``qgemm_max_workspace_bytes`` of dispatch.cu (the binding's persistent workspace)."""
    return ((max_workspace_slots(sms) * 4 + 255) // 256 * 256
            + max_workspace_slots(sms) * Config(4, M_TILE_OPTIONS[-1]).partial_floats * 4)


def plan_qgemm(M: int, N: int, K: int, bits: int, group_size: int, has_offsets: bool, sms: int,
               smem_per_sm: int, smem_per_block: int, occupancy: Optional[int] = None,
               max_ctas: int = 0) -> Optional[GemmPlan]:
    """``qgemm_plan`` of dispatch.cu for a device with ``sms`` SMs and the given shared memory;
    ``occupancy``: what cudaOccupancyMaxActiveBlocksPerMultiprocessor reports (None: not limiting);
    ``max_ctas``: the FLUTE_CUDA_MAX_CTAS_PER_SM cap of the binding (0: none).
    None when the op takes the dequantize + matmul path."""
    p = Problem.make(bits, group_size, K, N)
    if not fused_supports_group(p.group, p.ngroups) or M > FUSED_MAX_M:
        return None
    cfg = Config(bits, batch_tile(M))
    ctas, stages = choose_pipeline(smem_per_sm, smem_per_block, cfg.table_bytes,
                                   cfg.stage_bytes(has_offsets), max_ctas=max_ctas or StreamK.max_ctas_per_sm)
    assert stages >= cfg.min_stages, "the tile does not fit in shared memory"
    if occupancy is not None:
        ctas = min(ctas, occupancy)
    m_tiles = max(1, math.ceil(M / cfg.bm))
    n_tiles, k_tiles = p.n_tiles(cfg), p.k_tiles(cfg)
    sk = make_streamk_plan(m_tiles * n_tiles, k_tiles, sms * ctas)
    assert sk.partial_slots <= max_workspace_slots(sms)
    return GemmPlan(cfg.m_tiles16, stages, cfg.table_bytes + stages * cfg.stage_bytes(has_offsets),
                    ctas, m_tiles, n_tiles, k_tiles, sk, sms)


class WorkList:
    """``WorkList`` of flute_config.cuh: the segments CTA ``cta`` processes, in order."""

    def __init__(self, plan: StreamKPlan, k_tiles: int, cta: int, grid: Optional[int] = None):
        self.cta, self.grid, self.iters, self.split = cta, plan.grid if grid is None else grid, k_tiles, plan.split
        self.n_dp = (plan.dp_tiles - 1 - cta) // self.grid + 1 if cta < plan.dp_tiles else 0
        self.sk_tile, self.sk_kbeg, self.sk_kend, self.sk_first = -1, 0, 0, False
        if cta < plan.sk_units:
            part = cta % plan.split
            self.sk_tile = plan.dp_tiles + cta // plan.split
            self.sk_kbeg = part * k_tiles // plan.split
            self.sk_kend = (part + 1) * k_tiles // plan.split
            self.sk_first = part + 1 < plan.split
        self.nseg = self.n_dp + (1 if self.sk_tile >= 0 else 0)

    def count(self) -> int:
        return self.n_dp * self.iters + (self.sk_kend - self.sk_kbeg if self.sk_tile >= 0 else 0)

    def is_split(self, seg: int) -> bool:
        return self.sk_tile >= 0 and (seg == 0 if self.sk_first else seg == self.nseg - 1)

    def is_peer(self) -> bool:
        return self.sk_first

    def peer_slot(self, q: int) -> int:
        return (self.cta // self.split) * (self.split - 1) + q

    def segment(self, seg: int) -> Tuple[int, int, int]:
        if self.is_split(seg):
            return self.sk_tile, self.sk_kbeg, self.sk_kend
        return self.cta + (seg - (1 if self.sk_first else 0)) * self.grid, 0, self.iters


class Cursor:
    """``Cursor`` of flute_config.cuh: walks a WorkList one k-tile at a time."""

    def __init__(self, wl: WorkList):
        self.wl = wl
        self.seg, self.tile, self.k, self.kbeg, self.kend = 0, 0, 0, 0, 0
        if wl.nseg > 0:
            self.tile, self.kbeg, self.kend = wl.segment(0)
            self.k = self.kbeg

    def advance(self):
        self.k += 1
        if self.k == self.kend:
            self.seg += 1
            if self.seg < self.wl.nseg:
                self.tile, self.kbeg, self.kend = self.wl.segment(self.seg)
                self.k = self.kbeg


def streamk_schedule(plan: StreamKPlan, k_tiles: int):
    """Per CTA, the list of ``(tile, kbeg, kend, role)`` segments in processing order, walked with
    :class:`Cursor` exactly as the kernel's main loop does, with role ``("peer", slot)`` (publish a
    partial into workspace slot ``slot``), ``("owner", [slots])`` (wait for those peers, add their
    partials in that order, store) or ``("full",)``."""
    out = []
    for cta in range(plan.grid):
        wl = WorkList(plan, k_tiles, cta)
        cur = Cursor(wl)
        segs = []
        for _ in range(wl.count()):
            if cur.k + 1 == cur.kend:
                if wl.is_split(cur.seg):
                    part = cta % plan.split
                    role = (("peer", wl.peer_slot(part)) if wl.is_peer() else
                            ("owner", [wl.peer_slot(q) for q in range(plan.split - 1)]))
                else:
                    role = ("full",)
                segs.append((cur.tile, cur.kbeg, cur.kend, role))
            cur.advance()
        out.append(segs)
    return out
