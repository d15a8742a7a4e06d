import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flute.format import (FORMAT_VERSION, QuantizedWeight, dequantize_codes, pack_codes,
                          packed_row_bytes, parse_qmeta, unpack_codes)

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_format_v1.safetensors")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (5, 8), (192, 576), (17, 1000), (2, 13824)])
def test_pack_unpack_is_exact(bits, n, k, rng):
    codes = torch.randint(0, 2 ** bits, (n, k), generator=rng, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (k * bits + 7) // 8)
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_pack_is_dense_little_endian():
    # codes 1, 2, 3, 4, 5, 6, 7, 0 at 3 bits: bit stream LSB first
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    stream = sum(c << (3 * i) for i, c in enumerate(codes[0].tolist()))
    assert pack_codes(codes, 3)[0].tolist() == [(stream >> (8 * b)) & 0xFF for b in range(3)]
    # a row of 3 codes at 4 bits takes 2 bytes, tail bits zero
    assert pack_codes(torch.tensor([[0xA, 0xB, 0xC]], dtype=torch.uint8), 4)[0].tolist() == [0xBA, 0x0C]


def test_row_shards_are_byte_slices(rng):
    codes = torch.randint(0, 8, (6, 64), generator=rng, dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    # rows: a plain slice; columns: 8-code-aligned ranges are byte ranges
    assert torch.equal(packed[2:4], pack_codes(codes[2:4], 3))
    assert torch.equal(packed[:, 3 * 2:3 * 5], pack_codes(codes[:, 16:40], 3))


def _golden_weight() -> QuantizedWeight:
    """A fixed 3-bit weight with offsets, 5 x 19, group 8 (last group short), built by formula."""
    n, k, bits = 5, 19, 3
    codes = ((torch.arange(n * k) * 5 + 3) % 8).to(torch.uint8).view(n, k)
    scales = (torch.arange(n * 3, dtype=torch.float32).view(n, 3) / 8 + 0.5).to(torch.float16)
    offsets = (torch.arange(n * 3, dtype=torch.float32).view(n, 3) / 16 - 0.25).to(torch.float16)
    table = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.125, 0.375, 0.75, 1.0])
    return QuantizedWeight(pack_codes(codes, bits), scales, table, bits, 8, k, n, offsets, "custom")


def test_golden_file_pins_the_format():
    """The committed file was written by format version 1: reading it and re-writing must agree."""
    sd = load_file(GOLDEN)
    assert sorted(sd) == ["offsets", "qcodes", "qmeta", "scales", "table"]
    assert sd["qmeta"].tolist() == [1, 3, 8, 19, 5]
    qw = QuantizedWeight.from_state_dict(sd)
    ref = _golden_weight()
    for key, value in ref.state_dict().items():
        assert torch.equal(sd[key], value), key
    # one element by hand: row 1, column 17 is in group 2 (the short last group)
    code = ((1 * 19 + 17) * 5 + 3) % 8
    expected = ref.table[code] * ref.scales[1, 2].float() + ref.offsets[1, 2].float()
    assert qw.dequantize()[1, 17].item() == pytest.approx(expected.item(), abs=0)


def test_save_load_round_trip(tmp_path, rng):
    for bits in (2, 3, 4):
        codes = torch.randint(0, 2 ** bits, (33, 130), generator=rng, dtype=torch.uint8)
        qw = QuantizedWeight(pack_codes(codes, bits), torch.rand(33, 3, generator=rng).to(torch.bfloat16),
                             torch.randn(2 ** bits, generator=rng), bits, 64, 130, 33)
        path = str(tmp_path / f"w{bits}.safetensors")
        save_file(qw.state_dict(), path)
        back = QuantizedWeight.from_state_dict(load_file(path))
        assert torch.equal(back.codes(), codes)
        assert torch.equal(back.scales, qw.scales) and torch.equal(back.table, qw.table)
        assert back.offsets is None and back.group_size == 64


def test_corrupt_checkpoints_are_named():
    sd = _golden_weight().state_dict()
    with pytest.raises(KeyError, match="scales"):
        QuantizedWeight.from_state_dict({k: v for k, v in sd.items() if k != "scales"})
    bad = dict(sd, qmeta=torch.tensor([FORMAT_VERSION + 1, 3, 8, 19, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="format version 2"):
        QuantizedWeight.from_state_dict(bad)
    with pytest.raises(ValueError, match="table has 4 entries; a 3-bit table needs 8"):
        QuantizedWeight.from_state_dict(dict(sd, table=torch.zeros(4)))
    with pytest.raises(ValueError, match=r"qcodes has shape \(5, 7\)"):
        QuantizedWeight.from_state_dict(dict(sd, qcodes=sd["qcodes"][:, :-1]))
    with pytest.raises(ValueError, match=r"scales has shape \(5, 2\)"):
        QuantizedWeight.from_state_dict(dict(sd, scales=sd["scales"][:, :2]))
    # dtypes and values (issue #10): an int table, a float qmeta, NaN/Inf in scales/offsets/table
    with pytest.raises(ValueError, match="table must be a float tensor.*got int64"):
        QuantizedWeight.from_state_dict(dict(sd, table=torch.arange(8)))
    with pytest.raises(ValueError, match="qmeta must be an integer tensor"):
        QuantizedWeight.from_state_dict(dict(sd, qmeta=sd["qmeta"].float()))
    with pytest.raises(ValueError, match="qcodes must be uint8, got int8"):
        QuantizedWeight.from_state_dict(dict(sd, qcodes=sd["qcodes"].to(torch.int8)))
    for key in ("scales", "offsets", "table"):
        bad = sd[key].clone()
        bad.view(-1)[-1] = float("nan") if key != "table" else float("inf")
        with pytest.raises(ValueError, match=f"^{key} holds a non-finite value"):
            QuantizedWeight.from_state_dict(dict(sd, **{key: bad}))
    with pytest.raises(ValueError, match=r"scales holds a non-finite value \(nan at row 4, group 2\)"):
        bad = sd["scales"].clone()
        bad[4, 2] = float("nan")
        QuantizedWeight.from_state_dict(dict(sd, scales=bad))
    with pytest.raises(ValueError, match="must hold 5 integers"):
        parse_qmeta(torch.tensor([1, 2, 3]))


def test_dequantize_formula_with_partial_group(rng):
    codes = torch.randint(0, 16, (4, 10), generator=rng, dtype=torch.uint8)
    table, scales = torch.randn(16, generator=rng), torch.rand(4, 3, generator=rng)
    w = dequantize_codes(codes, scales, None, table, 4, torch.float64)
    for n in range(4):
        for k in range(10):
            assert w[n, k].item() == pytest.approx(table[int(codes[n, k])].item() * scales[n, k // 4].item())
    assert packed_row_bytes(10, 3) == 4
