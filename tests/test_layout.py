"""The kernel layout (flute/layout.py): exact round trip, shapes, padding, the pair table."""
import time

import pytest
import torch

from flute.format import pack_codes, unpack_codes
from flute.layout import (ATOM_N, atom_k, from_kernel_layout, kernel_layout_shape,
                          kernel_pair_table, pair_codes, padded_shape, to_kernel_layout)

SHAPES = [(1, 1), (17, 40), (32, 64), (33, 65), (192, 576), (1000, 1536), (64, 130), (96, 128)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_round_trip(bits, n, k, rng):
    codes = torch.randint(0, 2 ** bits, (n, k), generator=rng, dtype=torch.uint8)
    q = to_kernel_layout(codes, bits)
    assert q.dtype == torch.int32 and q.dim() == 1
    assert tuple(q.shape) == kernel_layout_shape(bits, k, n)
    back = from_kernel_layout(q, bits, k, n)
    assert back.dtype == torch.uint8 and back.shape == (n, k)
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_shape_depends_only_on_bits_n_k(bits):
    n_pad, k_pad = padded_shape(bits, 576, 1000)
    assert n_pad % ATOM_N == 0 and k_pad % atom_k(bits) == 0
    assert (n_pad, k_pad) == (1024, 640 if bits == 3 else 576)
    assert kernel_layout_shape(bits, 576, 1000) == (n_pad * k_pad * bits // 32,)
    # 16-byte chunks: the int32 count is a multiple of 4 (and of 128: 32 lanes x 4 words)
    assert kernel_layout_shape(bits, 40, 17)[0] % 128 == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_padding_is_code_zero_and_ignored(bits, rng):
    n, k = 17, 40
    codes = torch.randint(0, 2 ** bits, (n, k), generator=rng, dtype=torch.uint8)
    n_pad, k_pad = padded_shape(bits, k, n)
    padded = torch.zeros(n_pad, k_pad, dtype=torch.uint8)
    padded[:n, :k] = codes
    # the layout of the zero-padded matrix is the layout of the matrix itself
    assert torch.equal(to_kernel_layout(codes, bits), to_kernel_layout(padded, bits))
    # junk in the padded region never comes back as a real code
    junk = padded.clone()
    junk[n:, :] = 2 ** bits - 1
    junk[:, k:] = 2 ** bits - 1
    assert torch.equal(from_kernel_layout(to_kernel_layout(junk, bits), bits, k, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_code_moves(bits):
    """Each code lands in its own bits: flipping one code changes exactly `bits` bits."""
    n, k = 64, 256
    base = torch.zeros(n, k, dtype=torch.uint8)
    q0 = to_kernel_layout(base, bits)
    seen = set()
    for (i, j) in [(0, 0), (0, 1), (1, 0), (7, 9), (8, 8), (31, 63), (32, 64), (63, 255), (5, 130)]:
        c = base.clone()
        c[i, j] = 2 ** bits - 1
        diff = (to_kernel_layout(c, bits) ^ q0)
        pos = tuple(diff.nonzero().flatten().tolist())
        nbits = sum(bin(int(v) & 0xFFFFFFFF).count("1") for v in diff[diff != 0])
        assert nbits == bits
        assert pos not in seen or len(pos) == 0
        seen.add((pos, tuple(int(v) for v in diff[diff != 0])))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_canonical_round_trip(bits, rng):
    n, k = 48, 200
    codes = torch.randint(0, 2 ** bits, (n, k), generator=rng, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    q = to_kernel_layout(unpack_codes(packed, bits, k), bits)
    assert torch.equal(pack_codes(from_kernel_layout(q, bits, k, n), bits), packed)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        to_kernel_layout(torch.full((4, 4), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        to_kernel_layout(torch.zeros(4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        from_kernel_layout(torch.zeros(5, dtype=torch.int32), 4, 64, 32)
    with pytest.raises(ValueError):
        to_kernel_layout(torch.zeros(4, 4, dtype=torch.uint8), 5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pair_codes_bijective(bits):
    lo, hi = pair_codes(bits)
    assert lo.numel() == 4 ** bits
    assert int(lo.max()) < 2 ** bits and int(hi.max()) < 2 ** bits
    assert len(set(zip(lo.tolist(), hi.tolist()))) == 4 ** bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_pair_table(bits, rng):
    table = torch.randn(2 ** bits, generator=rng)
    pt = kernel_pair_table(table, bits, torch.float32)
    assert pt.shape == (4 ** bits, 2)
    assert pt.shape[0] * 4 == {2: 64, 3: 256, 4: 1024}[bits]  # bytes as one half2 per pair
    lo, hi = pair_codes(bits)
    assert torch.equal(pt[:, 0], table[lo]) and torch.equal(pt[:, 1], table[hi])


def test_repack_speed():
    codes = torch.randint(0, 16, (4096, 4096), dtype=torch.uint8)
    for bits in (2, 3, 4):
        c = codes & (2 ** bits - 1)
        t = time.perf_counter()
        q = to_kernel_layout(c, bits)
        from_kernel_layout(q, bits, 4096, 4096)
        assert time.perf_counter() - t < 10.0
