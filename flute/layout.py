"""Kernel layout: the device-independent arrangement of codes that the CUDA kernel reads.

The layout depends only on ``(bits, N, K)``: never on the GPU, its SM count, the batch size or the
tile configuration the kernel picks (every tile config is a multiple of the base tile below). A
checkpoint therefore never needs repacking when it moves between GPUs; this permutation runs at
load time, on CPU or GPU, in a few vectorized torch ops.

The full picture, with a diagram, is in ``csrc/cuda/LAYOUT.md``; the short version:

``mma.sync.m16n8k16`` B fragment (B = W^T, K x N). Lane ``l = 4*g + t`` of a warp holds
``b0 = (W[n0+g, k0+2t], W[n0+g, k0+2t+1])`` and ``b1 = (W[n0+g, k0+2t+8], W[n0+g, k0+2t+9])``:
two *pairs* of adjacent k. One pair is one lookup in the pair table (one half2/bfloat162).

Base tile ("atom"): 32 rows of W (four n8 tiles, ``j = 0..3``) by ``KA`` columns (``KA/16`` k16
steps ``s``), ``KA = 64`` for 2 and 4 bits, ``KA = 128`` for 3 bits. An atom is ``C`` chunks of
``32 lanes x 16 bytes``; lane ``l`` reads chunk ``c`` with one 16-byte load at
``uint4 index (atom * C + c) * 32 + l``, and these 16 bytes hold exactly the pair indices of that
lane's B fragments for the atom's coming k-steps:

* 4 bits (C = 2): word ``w`` of chunk ``c`` is k-step ``s = 2c + w // 2``, register ``r = w % 2``
  (b0/b1); byte ``j`` of the word is n8 tile ``j``; the byte is the 8-bit pair index
  ``q_lo | q_hi << 4``.
* 2 bits (C = 1): word ``s`` is k-step ``s``; byte ``j`` = n8 tile ``j``; nibble ``r`` of the byte
  is the 4-bit pair index ``q_lo | q_hi << 2``.
* 3 bits (C = 3, KA = 128, 8 k-steps): chunks 1 and 2 are the low two bits of every code in the
  2-bit format (chunk ``1 + s // 4``, word ``s % 4``); chunk 0 is the high bit of every code: word
  ``w`` covers k-steps ``2w`` (even) and ``2w + 1`` (odd); in byte ``j`` of it, bit
  ``4 * (1 - s % 2) + 2 * r + e`` is the high bit of code ``e`` (0 = lo, 1 = hi) of pair ``r`` of
  tile ``j``. Masks and shifts in registers turn (1-bit word, 2-bit word) into four 6-bit pair
  indices per register: ``idx = lo2 | hi2 << 2 | lo_hi << 4 | hi_hi << 5``.

Atoms are stored n-atom major: ``atom = na * (K_pad // KA) + ka``, so the codes a CTA streams
along K for one n-atom are contiguous. ``N`` is padded to a multiple of 32 and ``K`` to a multiple
of ``KA`` with code 0; the kernel zero-fills the activations beyond ``K`` and never stores rows
beyond ``N``, so padding never reaches a result.

The int32 tensor is 1-D: ``N_pad * K_pad * bits / 32`` words.
"""
from __future__ import annotations

import math

import torch

from .codebooks import check_bits

#: Rows of W per atom (four n8 mma tiles); the kernel gives each warp one atom column.
ATOM_N = 32
#: Bytes each lane loads per chunk (one 16-byte vector load).
CHUNK_BYTES = 16
LANES = 32


def atom_k(bits: int) -> int:
    """Columns of W per atom: 64 for 2 and 4 bits, 128 for 3 bits (so the 1-bit slice of a lane
    fills one 16-byte chunk)."""
    check_bits(bits)
    return 128 if bits == 3 else 64


def atom_chunks(bits: int) -> int:
    """16-byte chunks per lane per atom: 2 (4-bit), 1 (2-bit), 3 (3-bit: 1-bit + 2 x 2-bit)."""
    check_bits(bits)
    return {2: 1, 3: 3, 4: 2}[bits]


def padded_shape(bits: int, in_features: int, out_features: int) -> tuple:
    """``(N_pad, K_pad)``: the weight shape rounded up to whole atoms."""
    ka = atom_k(bits)
    return (math.ceil(out_features / ATOM_N) * ATOM_N, math.ceil(in_features / ka) * ka)


def kernel_layout_shape(bits: int, in_features: int, out_features: int) -> tuple:
    """Shape of the int32 kernel-layout tensor for a weight of this size (1-D)."""
    n_pad, k_pad = padded_shape(bits, in_features, out_features)
    return (n_pad * k_pad * bits // 32,)


def _split(codes: torch.Tensor, bits: int):
    """Pad ``codes`` to whole atoms and view them as
    ``[na, j, g, ka, s, r, t, e]`` with n = 32 na + 8 j + g and k = KA ka + 16 s + 8 r + 2 t + e."""
    n, k = codes.shape
    n_pad, k_pad = padded_shape(bits, k, n)
    ka = atom_k(bits)
    c = codes
    if (n_pad, k_pad) != (n, k):
        c = torch.zeros(n_pad, k_pad, dtype=torch.uint8, device=codes.device)
        c[:n, :k] = codes
    return c.reshape(n_pad // ATOM_N, 4, 8, k_pad // ka, ka // 16, 2, 4, 2)


def to_kernel_layout(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[N, K]`` to the kernel layout (a 1-D int32 tensor), on the codes' device."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise ValueError(f"codes must be < 2**bits = {2 ** bits}, got max {int(codes.max())}")
    q = _split(codes.to(torch.uint8), bits)  # [na, j, g, ka, s, r, t, e]
    q0, q1 = q[..., 0], q[..., 1]            # [na, j, g, ka, s, r, t]
    if bits == 4:
        pair = q0 | (q1 << 4)                                   # byte: 8-bit pair index
        na, _, _, nka, _, _, _ = pair.shape
        # -> [na, ka, c, g, t, s2, r, j]; s = 2 c + s2; byte offset in lane chunk = (2 s2 + r) 4 + j
        pair = pair.reshape(na, 4, 8, nka, 2, 2, 2, 4)          # s -> (c, s2)
        out = pair.permute(0, 3, 4, 2, 7, 5, 6, 1)
    elif bits == 2:
        nib = q0 | (q1 << 2)                                    # 4-bit pair index
        byte = nib[..., 0, :] | (nib[..., 1, :] << 4)           # r = 0 low nibble: [na,j,g,ka,s,t]
        out = byte.permute(0, 3, 2, 5, 4, 1)                    # [na, ka, g, t, s, j]
    else:
        lo = (q0 & 3) | ((q1 & 3) << 2)                         # [na, j, g, ka, s(8), r, t]
        low_byte = lo[..., 0, :] | (lo[..., 1, :] << 4)         # [na, j, g, ka, s, t]
        na, _, _, nka, _, _ = low_byte.shape
        # 2-bit slices: chunk 1 + s // 4, word s % 4 -> [na, ka, c2, g, t, s4, j]
        low = low_byte.reshape(na, 4, 8, nka, 2, 4, 4).permute(0, 3, 4, 2, 6, 5, 1)
        # 1-bit slice: bit 4 (1 - s%2) + 2 r + e of byte j of word s // 2
        h = (q >> 2) & 1                                        # [na, j, g, ka, s, r, t, e]
        he = h[..., 0] | (h[..., 1] << 1)                       # [na, j, g, ka, s, r, t]
        hr = he[..., 0, :] | (he[..., 1, :] << 2)               # [na, j, g, ka, s, t]
        hs = hr.reshape(na, 4, 8, nka, 4, 2, 4)                 # s -> (w, s2)
        hbyte = (hs[..., 0, :] << 4) | hs[..., 1, :]            # [na, j, g, ka, w, t]
        high = hbyte.permute(0, 3, 2, 5, 4, 1).unsqueeze(2)     # [na, ka, 1, g, t, w, j]
        out = torch.cat([high, low], dim=2)                     # [na, ka, 3, g, t, 4, 4]
    return out.contiguous().view(torch.int32).reshape(-1)


def from_kernel_layout(qweight: torch.Tensor, bits: int, in_features: int,
                       out_features: int) -> torch.Tensor:
    """Exact inverse of :func:`to_kernel_layout`: uint8 codes ``[out_features, in_features]``."""
    check_bits(bits)
    want = kernel_layout_shape(bits, in_features, out_features)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != want:
        raise ValueError(f"qweight must be int32 of shape {want}, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n_pad, k_pad = padded_shape(bits, in_features, out_features)
    ka = atom_k(bits)
    na, nka = n_pad // ATOM_N, k_pad // ka
    b = qweight.contiguous().view(torch.uint8)
    if bits == 4:
        pair = b.reshape(na, nka, 2, 8, 4, 2, 2, 4)             # [na, ka, c, g, t, s2, r, j]
        pair = pair.permute(0, 7, 3, 1, 2, 5, 6, 4)             # [na, j, g, ka, c, s2, r, t]
        q = torch.stack([pair & 15, pair >> 4], dim=-1)         # e last
    elif bits == 2:
        byte = b.reshape(na, nka, 8, 4, 4, 4).permute(0, 5, 2, 1, 4, 3)  # [na, j, g, ka, s, t]
        nib = torch.stack([byte & 15, byte >> 4], dim=-2)       # [na, j, g, ka, s, r, t]
        q = torch.stack([nib & 3, nib >> 2], dim=-1)
    else:
        parts = b.reshape(na, nka, 3, 8, 4, 4, 4)               # [na, ka, chunk, g, t, w, j]
        low = parts[:, :, 1:].permute(0, 6, 3, 1, 2, 5, 4)      # [na, j, g, ka, c2, s4, t]
        low = low.reshape(na, 4, 8, nka, 8, 4)                  # s = 4 c2 + s4
        nib = torch.stack([low & 15, low >> 4], dim=-2)         # [na, j, g, ka, s, r, t]
        lo2 = torch.stack([nib & 3, nib >> 2], dim=-1)          # [..., e]
        hbyte = parts[:, :, 0].permute(0, 5, 2, 1, 4, 3)        # [na, j, g, ka, w, t]
        hs = torch.stack([hbyte >> 4, hbyte & 15], dim=-2)      # [na, j, g, ka, w, s2, t]
        hs = hs.reshape(na, 4, 8, nka, 8, 4)                    # s = 2 w + s2
        hr = torch.stack([hs & 3, hs >> 2], dim=-2)             # [na, j, g, ka, s, r, t]
        hb = torch.stack([hr & 1, hr >> 1], dim=-1)             # [..., e]
        q = lo2 | (hb << 2)
    codes = q.reshape(n_pad, k_pad)
    return codes[:out_features, :in_features].contiguous()


# -- the pair table -------------------------------------------------------------------------------

def pair_codes(bits: int):
    """``(lo, hi)``: for every pair index the kernel forms, the two codes it stands for.

    2 bits: ``idx = lo | hi << 2``; 4 bits: ``idx = lo | hi << 4``; 3 bits (low two bits of both
    codes first, then their high bits): ``idx = (lo & 3) | (hi & 3) << 2 | (lo >> 2) << 4 |
    (hi >> 2) << 5``. The lo code is the even k, and goes into the low half of the half2.
    """
    check_bits(bits)
    idx = torch.arange(4 ** bits)
    if bits == 2:
        return idx & 3, idx >> 2
    if bits == 4:
        return idx & 15, idx >> 4
    return (idx & 3) | (((idx >> 4) & 1) << 2), ((idx >> 2) & 3) | (((idx >> 5) & 1) << 2)


def kernel_pair_table(table: torch.Tensor, bits: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The pair table as the kernel builds it: ``[4**bits, 2]`` in ``dtype``; row ``idx`` is
    ``(table[lo], table[hi])`` for ``(lo, hi) = pair_codes(bits)``. Derived, never stored."""
    lo, hi = pair_codes(bits)
    t = table.to(dtype)
    return torch.stack([t[lo.to(t.device)], t[hi.to(t.device)]], dim=1)
