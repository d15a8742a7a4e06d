"""CPU layout: the uint8 arrangement of codes that the CPU lookup-table kernel (``flute._cpu``) streams.

Derived at load time from the canonical codes (nothing on disk changes), like the GPU layout of
:mod:`flute.layout`; the two are told apart by dtype (GPU: int32, CPU: uint8). Table, scales and
offsets are not in it. It depends only on ``(bits, N, K)``, never on the ISA: the AVX-512, AVX2 and
portable kernels read the same bytes (the SIMD exact kernels read 3-bit tiles through a per-tile
copy whose high plane is in an older lane-mask form, see below).

* Rows are taken in **tiles of 4** (``N`` padded to a multiple of 4 with code 0); ``K`` is cut into
  **blocks** of ``KB`` columns (128 for 4 bits, 256 for 2 and 3 bits; ``K`` padded with code 0).
  The stream is ``[tile][k-block][row of tile][block bytes]``: one thread reads one contiguous run
  of memory for its rows, 4 rows interleaved block by block (4 independent accumulator chains).
* A block of one row is 16 little-endian uint32 **lanes** ``j = 0..15`` with ``S`` code **slots**
  each (8 nibbles for 4 bits, 16 2-bit fields for 2 and 3 bits): slot ``s`` of lane ``j`` holds the
  code of column ``32 * (s % C) + 2 * j + s // C`` of the block, ``C = KB / 32`` (4 or 8). Slot
  ``s`` across the 16 lanes is one 16-wide vector: shift the lanes right by ``bits * s`` and the
  low bits index the table (``vpermps`` ignores the higher bits; the 2/3-bit tables are repeated).
  Slots ``s`` and ``s + C`` are the even and odd columns of one 32-column chunk, so a chunk never
  straddles a group of 32 or more columns, and one shift gives the pair (low word, high word) of
  adjacent columns for a 16-bit lookup (``vpermw``) in natural column order.
* 3 bits: 96 bytes per block row, three 32-byte registers ``R0 | R1 | R2`` in the byte order of
  the int8 kernel's index registers. Write ``c[p][reg]`` for the 3-bit codes of part ``p`` (the
  2-bit field of the 2-bit layout's code bytes, slot ``s = 4 q + p``) and 32-byte half ``reg`` of
  the block (lane ``j = 8 reg + 4 h + i``), byte ``16 h + 4 q + i`` of each register
  (``csrc/cpu/lut_kernel.h``, Int8Args). ``R0`` holds ``c[0][0]`` at bits 0-2 and ``c[0][1]`` at
  bits 4-6, ``R1`` holds ``c[1][0]`` at bits 1-3 and ``c[1][1]`` at bits 5-7, ``R2`` the low two bits
  of ``c[2][0]``, ``c[3][0]``, ``c[2][1]``, ``c[3][1]`` at bits 0-1, 2-3, 4-5, 6-7, and their high bits
  fill the four spare bits: ``R0`` bits 3 and 7, ``R1`` bits 0 and 4. So four of the eight index
  registers are one AND (and a shared 4-bit shift) of ``R0`` or ``R1``, the other four an AND of
  ``R2``, an AND of a spare bit and an OR (CPU_NOTES item 80). Dense: 3 bits per weight. (The SIMD
  exact kernels convert each tile to an older form: the 2-bit block above of the low two bits, then
  16 uint16 lane masks of the high bits, ``uint16 s`` bit ``j``.)

* 2 bits: the **pair layout** (``csrc/cpu/pair_lut.h``; CPU_NOTES items 129-130): rows in tiles of
  16, ``K`` in chunks of 32 columns, stream ``[tile][chunk][step 0..3][32 bytes]``. Byte ``16 L + i``
  of step ``s`` is row ``i``'s index of pair ``4 s + L`` of the chunk in bits 0-3 and of pair
  ``4 s + 2 + L`` in bits 4-7, pair ``p`` being the chunk's columns ``2 p`` (index bits 0-1) and
  ``2 p + 1`` (bits 2-3): one ``vpshufb`` of a pair's 16-entry table looks up 16 rows at once.

* **Short last block** (3 and 4 bits): where a row's last block holds at most half a block of
  columns of ``K`` (a tail of up to 128 columns at 3 bits, 64 at 4), only the bytes that can hold
  their codes are stored, so the padding of ``K`` costs little (1536x576 at 3 bits: 240 bytes a
  row instead of 288). Those columns are the slots ``s = P q + p`` with ``q`` even, i.e. bytes
  ``(h, q, i)`` with ``q`` = 0 or 2: at 3 bits dwords 0, 2, 4, 6 of each 32-byte register (16
  bytes each; ``R2``'s left out as well for a tail of up to 64 columns, where it only holds codes of
  padding: 32 or 48 bytes a row), at 4 bits bytes 0 and 2 of each lane (32 bytes). The tile is
  then ``[block 0 .. nb - 2][row][block bytes]`` followed by ``[row][last block bytes]``, and the
  int8 kernels load each kept dword or byte back to its place with one zero-extending load
  (``csrc/cpu/lut_kernel.h``, ``last_block_bytes``).

Size: ``N_pad * K_pad * bits / 8`` bytes, 1-D uint8, less the short last blocks' left-out bytes.
"""
from __future__ import annotations

import math

import torch

from .codebooks import check_bits
from .huge_pages import place_for_streaming

#: Rows of W interleaved in the stream (3 and 4 bits; 2 bits: :data:`PAIR_TILE_ROWS`).
TILE_ROWS = 4
#: Rows per tile and columns per chunk of the 2-bit pair layout.
PAIR_TILE_ROWS = 16
PAIR_CHUNK_COLS = 32
#: Lanes (uint32 words) per block row.
LANES = 16


def block_cols(bits: int) -> int:
    """Columns of W per block: 128 (4 bits), 256 (3 bits) or 32 (2 bits: a pair-layout chunk)."""
    check_bits(bits)
    return {4: 128, 3: 256, 2: PAIR_CHUNK_COLS}[bits]


def block_bytes(bits: int) -> int:
    """Bytes of one row's block: 64 (4 bits), 96 (3 bits: 64 low-bit + 32 high-bit) or 8 (2 bits)."""
    return block_cols(bits) * bits // 8


def tile_rows(bits: int) -> int:
    """Rows per tile: 16 for 2 bits (the pair layout), 4 for 3 and 4 bits."""
    check_bits(bits)
    return PAIR_TILE_ROWS if bits == 2 else TILE_ROWS


def cpu_padded_shape(bits: int, in_features: int, out_features: int) -> tuple:
    """``(N_pad, K_pad)``: the weight shape rounded up to whole row tiles and blocks."""
    kb, tr = block_cols(bits), tile_rows(bits)
    return (math.ceil(out_features / tr) * tr, math.ceil(in_features / kb) * kb)


def last_block_bytes(bits: int, in_features: int) -> int:
    """Bytes of a row's last block (3 and 4 bits): :func:`block_bytes`, or fewer where the block
    holds at most half a block of columns of ``K`` (see the module docstring, *short last block*):
    32 for a tail of up to 64 columns, 48 at 3 bits for up to 128."""
    kb = block_cols(bits)
    tail = in_features - (in_features - 1) // kb * kb
    if bits == 2 or tail > kb // 2:
        return block_bytes(bits)
    return 32 if tail <= 64 else 48


def cpu_layout_shape(bits: int, in_features: int, out_features: int) -> tuple:
    """Shape of the uint8 CPU-layout tensor (1-D) of a ``[out_features, in_features]`` weight."""
    n_pad, k_pad = cpu_padded_shape(bits, in_features, out_features)
    if bits == 2:
        return (n_pad * k_pad * bits // 8,)
    nb = k_pad // block_cols(bits)
    return (n_pad * ((nb - 1) * block_bytes(bits) + last_block_bytes(bits, in_features)),)


def _short_positions(bits: int, lb: int) -> torch.Tensor:
    """Byte positions in a whole last block row of the ``lb`` bytes a short one keeps, in order:
    3 bits, dwords 0, 2, 4, 6 of each 32-byte register; 4 bits, bytes 0 and 2 of each lane."""
    if bits == 4:
        return torch.arange(lb) * 2
    m = torch.arange(lb // 4)
    return ((m * 8).unsqueeze(1) + torch.arange(4)).reshape(-1)


def _slots(bits: int):
    """``(C, S)``: 32-column chunks per block and code slots per lane."""
    c = block_cols(bits) // 32
    return c, 2 * c


def pack_3bit_registers(c: torch.Tensor) -> torch.Tensor:
    """3 bits: uint8 codes ``[..., p, reg, 32]`` (part, 32-byte half, byte in the index registers'
    order) to the block row's 96 bytes ``R0 | R1 | R2`` (see the module docstring)."""
    c00, c01, c10, c11 = c[..., 0, 0, :], c[..., 0, 1, :], c[..., 1, 0, :], c[..., 1, 1, :]
    c20, c21, c30, c31 = c[..., 2, 0, :], c[..., 2, 1, :], c[..., 3, 0, :], c[..., 3, 1, :]
    r0 = c00 | c01 << 4 | (c20 >> 2) << 3 | (c21 >> 2) << 7
    r1 = c10 << 1 | c11 << 5 | c30 >> 2 | (c31 >> 2) << 4
    r2 = (c20 & 3) | (c30 & 3) << 2 | (c21 & 3) << 4 | (c31 & 3) << 6
    return torch.cat([r0, r1, r2], dim=-1)


def unpack_3bit_registers(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_3bit_registers`: 96 bytes ``[..., 96]`` to codes ``[..., 4, 2, 32]``."""
    r0, r1, r2 = b[..., :32], b[..., 32:64], b[..., 64:]
    c = [[r0 & 7, (r0 >> 4) & 7],
         [(r1 >> 1) & 7, r1 >> 5],
         [(r2 & 3) | ((r0 >> 3) & 1) << 2, ((r2 >> 4) & 3) | (r0 >> 7) << 2],
         [((r2 >> 2) & 3) | (r1 & 1) << 2, (r2 >> 6) | ((r1 >> 4) & 1) << 2]]
    return torch.stack([torch.stack(pair, dim=-2) for pair in c], dim=-3)


def _to_pair_layout(c: torch.Tensor) -> torch.Tensor:
    """Padded 2-bit codes ``[N_pad, K_pad]`` to the pair layout (1-D uint8, see the module docstring)."""
    n_pad, k_pad = c.shape
    nt, nc = n_pad // PAIR_TILE_ROWS, k_pad // PAIR_CHUNK_COLS
    # column 32 c + 8 s + 4 hi + 2 L + odd of row 16 t + i -> [t, c, s, L, i, hi, odd]
    q = c.reshape(nt, PAIR_TILE_ROWS, nc, 4, 2, 2, 2).permute(0, 2, 3, 5, 1, 4, 6)
    b = q[..., 0, 0] | q[..., 0, 1] << 2 | q[..., 1, 0] << 4 | q[..., 1, 1] << 6
    return b.reshape(-1).contiguous()


def _from_pair_layout(qweight: torch.Tensor, n_pad: int, k_pad: int) -> torch.Tensor:
    """Inverse of :func:`_to_pair_layout`: uint8 codes ``[N_pad, K_pad]``."""
    nt, nc = n_pad // PAIR_TILE_ROWS, k_pad // PAIR_CHUNK_COLS
    b = qweight.reshape(nt, nc, 4, 2, PAIR_TILE_ROWS)                 # [t, c, s, L, i]
    q = torch.stack([(b >> (2 * f)) & 3 for f in range(4)], dim=-1)   # [.., i, (hi, odd)]
    q = q.reshape(nt, nc, 4, 2, PAIR_TILE_ROWS, 2, 2)                 # [t, c, s, L, i, hi, odd]
    return q.permute(0, 4, 1, 2, 5, 3, 6).reshape(n_pad, k_pad)


def to_cpu_layout(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[N, K]`` to the CPU layout (1-D uint8), on the codes' device. On the CPU the
    layout is placed in memory advised for transparent huge pages (:func:`flute.huge_pages.place_for_streaming`:
    from 64 KiB, in chunks shared with other layouts that start on a 2 MiB boundary)."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise ValueError(f"codes must be < 2**bits = {2 ** bits}, got max {int(codes.max())}")
    n, k = codes.shape
    n_pad, k_pad = cpu_padded_shape(bits, k, n)
    c = codes.to(torch.uint8)
    if (n_pad, k_pad) != (n, k):
        c = torch.zeros(n_pad, k_pad, dtype=torch.uint8, device=codes.device)
        c[:n, :k] = codes
    if bits == 2:
        return place_for_streaming(_to_pair_layout(c))
    nc, ns = _slots(bits)
    nt, nb = n_pad // TILE_ROWS, k_pad // block_cols(bits)
    # [tile, row, block, chunk, lane j, parity e] -> [tile, block, row, lane j, slot s = e*C + chunk]
    q = c.reshape(nt, TILE_ROWS, nb, nc, LANES, 2).permute(0, 2, 1, 4, 5, 3)
    q = q.reshape(nt, nb, TILE_ROWS, LANES, ns)
    if bits == 4:  # byte 4j + s//2 of the lane: slots 2i (low nibble) and 2i+1 (high nibble)
        q = q.reshape(nt, nb, TILE_ROWS, LANES, 4, 2)
        out = q[..., 0] | (q[..., 1] << 4)
    else:
        # lane j = (reg, h, i), slot s = (q, p) -> part p, register reg, byte (h, q, i)
        c3 = q.reshape(nt, nb, TILE_ROWS, 2, 2, 4, 4, 4)       # [.., reg, h, i, q, p]
        c3 = c3.permute(0, 1, 2, 7, 3, 4, 6, 5).reshape(nt, nb, TILE_ROWS, 4, 2, 32)
        out = pack_3bit_registers(c3)
    out = out.reshape(nt, nb, TILE_ROWS, block_bytes(bits))
    lb = last_block_bytes(bits, k)
    if lb < block_bytes(bits):  # the short last block: only the bytes that can hold codes of K
        last = out[:, nb - 1].index_select(-1, _short_positions(bits, lb).to(out.device))
        out = torch.cat([out[:, :nb - 1].reshape(nt, -1), last.reshape(nt, -1)], dim=1)
    return place_for_streaming(out.reshape(-1).contiguous())


def from_cpu_layout(qweight: torch.Tensor, bits: int, in_features: int,
                    out_features: int) -> torch.Tensor:
    """Exact inverse of :func:`to_cpu_layout`: uint8 codes ``[out_features, in_features]``."""
    check_bits(bits)
    want = cpu_layout_shape(bits, in_features, out_features)
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != want:
        raise ValueError(f"qweight must be uint8 of shape {want} (the CPU layout of a "
                         f"{out_features}x{in_features} {bits}-bit weight), got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n_pad, k_pad = cpu_padded_shape(bits, in_features, out_features)
    if bits == 2:
        return _from_pair_layout(qweight, n_pad, k_pad)[:out_features, :in_features].contiguous()
    nc, ns = _slots(bits)
    nt, nb = n_pad // TILE_ROWS, k_pad // block_cols(bits)
    bb, lb = block_bytes(bits), last_block_bytes(bits, in_features)
    if lb < bb:  # the short last block back to whole, zeros in the bytes it leaves out
        t = qweight.reshape(nt, -1)
        last = torch.zeros(nt, TILE_ROWS, bb, dtype=torch.uint8, device=qweight.device)
        last[..., _short_positions(bits, lb).to(qweight.device)] = t[:, (nb - 1) * TILE_ROWS * bb:].reshape(nt, TILE_ROWS, lb)
        qweight = torch.cat([t[:, :(nb - 1) * TILE_ROWS * bb], last.reshape(nt, -1)], dim=1)
    b = qweight.reshape(nt, nb, TILE_ROWS, bb)
    if bits == 4:
        lane = b.reshape(nt, nb, TILE_ROWS, LANES, 4)
        q = torch.stack([lane & 15, lane >> 4], dim=-1)       # [..., j, s//2, s%2]
    elif bits == 3:
        c3 = unpack_3bit_registers(b).reshape(nt, nb, TILE_ROWS, 4, 2, 2, 4, 4)  # [.., p, reg, h, q, i]
        q = c3.permute(0, 1, 2, 4, 5, 7, 6, 3)                                # [.., reg, h, i, q, p]
    else:
        lane = b.reshape(nt, nb, TILE_ROWS, LANES, 4)
        q = torch.stack([(lane >> (2 * i)) & 3 for i in range(4)], dim=-1)
    q = q.reshape(nt, nb, TILE_ROWS, LANES, 2, nc)            # s = e*C + chunk
    q = q.permute(0, 2, 1, 5, 3, 4)                           # [tile, row, block, chunk, j, e]
    codes = q.reshape(n_pad, k_pad)
    return codes[:out_features, :in_features].contiguous()


# -- device layouts: the one the op takes on each device ------------------------------------------

def layout_dtype(device) -> torch.dtype:
    """The dtype of the device layout the op takes on ``device``: ``torch.uint8`` (CPU layout) on
    a CPU device when ``flute._cpu`` is loaded, ``torch.int32`` (GPU kernel layout) otherwise."""
    from .ops import HAS_CPU_KERNEL
    return torch.uint8 if torch.device(device).type == "cpu" and HAS_CPU_KERNEL else torch.int32


def device_layout(codes: torch.Tensor, bits: int, device=None) -> torch.Tensor:
    """The ``qweight`` the op takes on ``device`` (default: the codes' device), from uint8 codes
    ``[N, K]``: the CPU layout (uint8) on a CPU device when the CPU kernel ``flute._cpu`` is loaded,
    the GPU kernel layout (int32, :func:`flute.layout.to_kernel_layout`) otherwise."""
    from .layout import to_kernel_layout
    device = torch.device(device) if device is not None else codes.device
    codes = codes.to(device)
    if layout_dtype(device) == torch.uint8:
        return to_cpu_layout(codes, bits)
    return to_kernel_layout(codes, bits)


def codes_from_layout(qweight: torch.Tensor, bits: int, in_features: int,
                      out_features: int) -> torch.Tensor:
    """uint8 codes ``[out_features, in_features]`` of a ``qweight`` in either device layout (told
    apart by dtype: uint8 = CPU layout, int32 = GPU layout)."""
    from .layout import from_kernel_layout
    if qweight.dtype == torch.uint8:
        return from_cpu_layout(qweight, bits, in_features, out_features)
    if qweight.dtype == torch.int32:
        return from_kernel_layout(qweight, bits, in_features, out_features)
    raise ValueError(f"qweight must be a device layout: uint8 (CPU layout) or int32 (GPU kernel "
                     f"layout), got {qweight.dtype}")
