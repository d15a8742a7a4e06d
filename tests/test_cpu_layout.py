"""The CPU layout (flute.cpu_layout): exact round trip, streaming order, device-layout helpers."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import flute
from flute.cpu_layout import (block_cols, codes_from_layout, cpu_layout_shape,
                              cpu_padded_shape, device_layout, from_cpu_layout, layout_dtype,
                              to_cpu_layout)
from flute.layout import from_kernel_layout, to_kernel_layout


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), n=st.integers(1, 70), k=st.integers(1, 700),
       seed=st.integers(0, 2 ** 31 - 1))
def test_round_trip_is_the_identity(bits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    q = to_cpu_layout(codes, bits)
    assert q.dtype == torch.uint8 and q.dim() == 1
    assert tuple(q.shape) == cpu_layout_shape(bits, k, n)
    n_pad, k_pad = cpu_padded_shape(bits, k, n)
    kb = block_cols(bits)
    tail = k - (k_pad - kb)  # columns of K in the last block
    if bits == 2 or tail > kb // 2:  # dense: bits per weight, padding included
        assert q.numel() * 8 == n_pad * k_pad * bits
    else:  # the short last block: 32 bytes a row (48 for a 3-bit tail of 65-128 columns)
        short = 48 if bits == 3 and tail > 64 else 32
        assert q.numel() == n_pad * ((k_pad - kb) * bits // 8 + short)
    assert torch.equal(from_cpu_layout(q, bits, k, n), codes)


@pytest.mark.parametrize("bits,tail,kept", [(4, 1, 32), (4, 64, 32), (3, 1, 32), (3, 64, 32),
                                            (3, 65, 48), (3, 128, 48)])
def test_short_last_block_keeps_the_bytes_that_hold_codes(bits, tail, kept, rng):
    """A last block with at most half a block of columns keeps only the bytes that can hold their
    codes (3 bits: dwords 0, 2, 4, 6 of each 32-byte register, R2's too past 64 columns; 4 bits:
    bytes 0 and 2 of each lane), in order; the whole block's other bytes are zero."""
    kb = block_cols(bits)
    bb = kb * bits // 8
    k = kb + tail
    codes = torch.randint(0, 2 ** bits, (4, k), generator=rng, dtype=torch.uint8)
    whole = torch.zeros(4, 2 * kb, dtype=torch.uint8)
    whole[:, :k] = codes
    w = to_cpu_layout(whole, bits).view(2, 4, bb)  # [block, row, bytes]: both blocks whole
    q = to_cpu_layout(codes, bits)
    assert q.numel() == 4 * (bb + kept)
    assert torch.equal(q[:4 * bb].view(4, bb), w[0])
    if bits == 4:
        keep = [b for b in range(bb) if b % 4 in (0, 2)]
    else:
        keep = [b for b in range(bb) if (b % 32) // 4 % 2 == 0 and (b < 64 or tail > 64)]
    assert len(keep) == kept
    assert torch.equal(q[4 * bb:].view(4, kept), w[1][:, keep])
    dropped = [b for b in range(bb) if b not in keep]
    assert int(w[1][:, dropped].count_nonzero()) == 0


def _code_3bit(row_block, j, s):
    """Code of lane j, slot s of one 3-bit block row (96 bytes R0 | R1 | R2), written out from the
    layout's contract (flute/cpu_layout.py) independently of pack_3bit_registers."""
    reg, p = j >> 3, s & 3
    b = 16 * ((j >> 2) & 1) + 4 * (s >> 2) + (j & 3)
    r0, r1, r2 = row_block[:, b], row_block[:, 32 + b], row_block[:, 64 + b]
    if p == 0:
        return (r0 >> (4 * reg)) & 7
    if p == 1:
        return (r1 >> (1 + 4 * reg)) & 7
    if p == 2:
        return ((r2 >> (4 * reg)) & 3) | ((r0 >> (3 + 4 * reg)) & 1) << 2
    return ((r2 >> (2 + 4 * reg)) & 3) | ((r1 >> (4 * reg)) & 1) << 2


@pytest.mark.parametrize("bits", [3, 4])
def test_slot_order_matches_the_kernel_contract(bits, rng):
    """Slot s of lane j of a row block holds column 32 (s % C) + 2 j + s // C (lut_kernel.h)."""
    kb = block_cols(bits)
    c_chunks = kb // 32
    codes = torch.randint(0, 2 ** bits, (4, kb), generator=rng, dtype=torch.uint8)
    q = to_cpu_layout(codes, bits).view(4, kb * bits // 8).long()
    lane = q[:, :64].view(4, 16, 4)
    lane = lane[..., 0] | lane[..., 1] << 8 | lane[..., 2] << 16 | lane[..., 3] << 24
    sh = 4 if bits == 4 else 2
    for s in range(2 * c_chunks):
        cols = [32 * (s % c_chunks) + 2 * j + s // c_chunks for j in range(16)]
        if bits == 3:
            got = torch.stack([_code_3bit(q, j, s) for j in range(16)], 1)
        else:
            got = (lane >> (sh * s)) & (2 ** sh - 1)
        assert torch.equal(got, codes[:, cols].long()), s


def test_pair_layout_matches_the_kernel_contract(rng):
    """2 bits (csrc/cpu/pair_lut.h): 16-row tiles, 32-column chunks, 128 bytes per tile and chunk;
    byte 16 L + i of step s holds, from bit 0 up, row i's codes of the chunk's columns 8s + 2L,
    8s + 2L + 1, 8s + 2L + 4, 8s + 2L + 5 (so each nibble is one column pair's 4-bit index)."""
    codes = torch.randint(0, 4, (35, 70), generator=rng, dtype=torch.uint8)
    q = to_cpu_layout(codes, 2)
    n_pad, k_pad = cpu_padded_shape(2, 70, 35)
    assert (n_pad, k_pad) == (48, 96)
    full = torch.zeros(n_pad, k_pad, dtype=torch.uint8)
    full[:35, :70] = codes
    b = q.view(3, 3, 4, 2, 16).long()  # [tile, chunk, step, L, row]
    for t in range(3):
        for c in range(3):
            for s in range(4):
                for L in range(2):
                    cols = [32 * c + 8 * s + 2 * L + d for d in (0, 1, 4, 5)]
                    want = full[16 * t:16 * t + 16, cols].long()
                    got = torch.stack([(b[t, c, s, L] >> (2 * f)) & 3 for f in range(4)], 1)
                    assert torch.equal(got, want), (t, c, s, L)


def test_3bit_registers_use_every_bit(rng):
    """3 bits are dense: every one of the 768 bits of a block row carries a code bit, so flipping
    any one of them changes exactly one code (by one of its bits)."""
    codes = torch.randint(0, 8, (4, 256), generator=rng, dtype=torch.uint8)
    q = to_cpu_layout(codes, 3).view(4, 96)
    for byte in range(0, 96, 7):
        for bit in range(8):
            flipped = q.clone().reshape(-1)
            flipped.view(4, 96)[0, byte] ^= 1 << bit
            diff = from_cpu_layout(flipped, 3, 256, 4).int() ^ codes.int()
            assert int((diff != 0).sum()) == 1, (byte, bit)
            assert int(diff.max()) in (1, 2, 4)


def test_padding_is_code_zero_and_rows_stream_in_tiles(rng):
    codes = torch.randint(1, 16, (5, 130), generator=rng, dtype=torch.uint8)
    q = to_cpu_layout(codes, 4)
    n_pad, k_pad = cpu_padded_shape(4, 130, 5)
    assert (n_pad, k_pad) == (8, 256)
    full = torch.zeros(n_pad, k_pad, dtype=torch.uint8)
    full[:5, :130] = codes
    assert torch.equal(from_cpu_layout(q, 4, 130, 5), codes)
    # tile 0, block 0 = rows 0..3 of columns 0..127, 64 bytes each, then block 1 (short: 32 bytes a
    # row), then tile 1
    assert q.numel() == 2 * 4 * (64 + 32)
    assert torch.equal(q[:256], to_cpu_layout(full[:4, :128], 4))
    assert torch.equal(q[384:640], to_cpu_layout(full[4:, :128], 4))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="codes must be < 2"):
        to_cpu_layout(torch.full((2, 2), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="uint8 of shape"):
        from_cpu_layout(torch.zeros(3, dtype=torch.uint8), 4, 128, 4)
    with pytest.raises(ValueError, match="device layout"):
        codes_from_layout(torch.zeros(4, dtype=torch.int64), 4, 128, 4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_device_layout_and_codes_from_layout(bits, rng):
    codes = torch.randint(0, 2 ** bits, (33, 100), generator=rng, dtype=torch.uint8)
    q = device_layout(codes, bits, "cpu")
    assert q.dtype == layout_dtype("cpu")
    assert q.dtype == (torch.uint8 if flute.ops.HAS_CPU_KERNEL else torch.int32)
    assert torch.equal(codes_from_layout(q, bits, 100, 33), codes)
    gpu = to_kernel_layout(codes, bits)  # what device_layout builds for a CUDA device
    assert layout_dtype("cuda") == torch.int32
    assert torch.equal(codes_from_layout(gpu, bits, 100, 33), codes)
    # CPU -> GPU layout -> CPU layout is lossless
    back = to_cpu_layout(from_kernel_layout(gpu, bits, 100, 33), bits)
    assert torch.equal(back, to_cpu_layout(codes, bits))


def test_quant_linear_rebuilds_qweight_when_the_device_kind_changes(monkeypatch, rng):
    """CUDA-free stand-in for .cuda()/.cpu(): flip which layout the CPU wants and re-apply."""
    lin = torch.nn.Linear(200, 36)
    q = flute.QuantLinear.from_linear(lin, 3, 64)
    x = torch.randn(3, 200, generator=rng)
    y = q(x)
    first = q.qweight.clone()
    monkeypatch.setattr(flute.ops, "HAS_CPU_KERNEL", not flute.ops.HAS_CPU_KERNEL)
    q.to("cpu")  # _apply: the layout no longer matches the device -> rebuilt
    assert q.qweight.dtype == layout_dtype("cpu") != first.dtype
    assert torch.allclose(q(x), y, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    q.float()
    assert torch.equal(q.qweight, first)  # round trip through the other layout is exact
    assert torch.equal(q(x), y)
    assert torch.equal(q.quantized_weight().codes(), flute.QuantLinear.from_linear(lin, 3, 64)
                       .quantized_weight().codes())
