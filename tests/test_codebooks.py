import pytest
import torch

from flute.codebooks import (CODEBOOKS, NF4_BITSANDBYTES, as_table, get_table, nf_construction,
                             nf_table, pair_table)


def test_nf4_is_the_bitsandbytes_table():
    assert torch.equal(nf_table(4), torch.tensor(NF4_BITSANDBYTES))
    # our own construction reproduces it to float32 rounding
    assert torch.allclose(nf_construction(4), nf_table(4), atol=3e-7, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_tables_are_sorted_normalized_with_exact_zero(bits):
    t = nf_table(bits)
    assert t.numel() == 2 ** bits and t.dtype == torch.float32
    assert torch.all(t[1:] > t[:-1])
    assert t[0].item() == -1.0 and t[-1].item() == 1.0
    assert (t == 0).sum().item() == 1
    # one more positive than negative entry, as in QLoRA
    assert (t > 0).sum().item() == 2 ** (bits - 1)


def test_other_codebooks():
    assert get_table("int", 3).tolist() == [-4, -3, -2, -1, 0, 1, 2, 3]
    assert sorted(set(get_table("fp4", 4).abs().tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert get_table("ternary", 2).tolist() == [-1, 0, 1, 0]
    for name in CODEBOOKS:
        bits = {"fp4": 4, "ternary": 2}.get(name, 3)
        assert get_table(name, bits).numel() == 2 ** bits


@pytest.mark.parametrize("bad,msg", [
    (("nope", 4), "unknown codebook"),
    (("fp4", 3), "bits=4"),
    (("ternary", 3), "bits=2"),
    (("nf", 5), "bits must be one of"),
    (([1.0, 2.0, 3.0], 2), "needs 4 values"),
    (([0.0, 1.0, 2.0, 3.0], 2), "both positive and negative"),
    (([-1.0, float("nan"), 0.0, 1.0], 2), "non-finite"),
])
def test_bad_tables_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        get_table(*bad)


def test_user_table_and_pair_table():
    t = as_table([-2.0, -0.5, 0.25, 3.0], 2)
    p = pair_table(t)
    assert p.shape == (16, 2)
    for i in range(4):
        for j in range(4):
            assert p[i * 4 + j].tolist() == [t[i].item(), t[j].item()]
