import pytest
import torch
from torch import nn

from flute import QuantLinear, quantize_weight
from flute.format import FORMAT_VERSION


@pytest.fixture
def linear(rng):
    lin = nn.Linear(576, 192)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(192, 576, generator=rng) * 0.05)
        lin.bias.copy_(torch.randn(192, generator=rng))
    return lin


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_forward_close_to_float_and_leading_dims(linear, bits, rng):
    q = QuantLinear.from_linear(linear, bits, 64)
    x = torch.randn(2, 3, 576, generator=rng)
    ref = x @ q.dequantize().float().t() + linear.bias
    y = q(x)
    assert y.shape == (2, 3, 192)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    # quantization error shrinks with more bits and stays bounded
    rel = ((y - linear(x)).norm() / linear(x).norm()).item()
    assert rel < {2: 0.6, 3: 0.25, 4: 0.12}[bits]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations(linear, dtype, rng):
    q = QuantLinear.from_linear(linear.to(dtype), 4, 64)
    assert q.scales.dtype == dtype and q.bias.dtype == dtype
    x = torch.randn(5, 576, generator=rng).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    ref = x.float() @ q.dequantize().float().t() + q.bias.float()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_state_dict_is_canonical_and_round_trips(linear, rng):
    q = QuantLinear.from_linear(linear, 3, 64, offsets=True)
    assert q.qcodes.numel() == 0 and q.qweight is not None  # released after prepare()
    sd = q.state_dict()
    assert sorted(sd) == ["bias", "offsets", "qcodes", "qmeta", "scales", "table"]
    assert sd["qcodes"].shape == (192, 216) and sd["qcodes"].dtype == torch.uint8
    assert sd["qmeta"].tolist() == [FORMAT_VERSION, 3, 64, 576, 192]
    assert "qweight" not in sd
    fresh = QuantLinear(576, 192, 3, 64, bias=True, offsets=True, dtype=torch.float32)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 576, generator=rng)
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.state_dict()["qcodes"], sd["qcodes"])


def test_loading_a_mismatched_checkpoint_names_the_problem(linear):
    sd = QuantLinear.from_linear(linear, 3, 64).state_dict()
    other = QuantLinear(576, 192, 4, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="3-bit.*but this QuantLinear is 192x576 4-bit"):
        other.load_state_dict(sd)


def test_meta_construction_then_load(linear, rng):
    sd = QuantLinear.from_linear(linear, 4, 128).state_dict()
    with torch.device("meta"):
        m = QuantLinear(576, 192, 4, 128, dtype=torch.float32)
    m = m.to_empty(device="cpu")
    m.load_state_dict(sd)
    x = torch.randn(2, 576, generator=rng)
    assert torch.allclose(m(x), x @ m.dequantize().t() + linear.bias, atol=1e-4)


def test_quantized_weight_and_repr(linear):
    qw = quantize_weight(linear.weight.detach(), 4, 64, scale_method="mse")
    q = QuantLinear.from_quantized(qw, linear.bias)
    assert torch.equal(q.quantized_weight().codes(), qw.codes())
    assert torch.allclose(q.dequantize(), qw.dequantize())
    r = repr(q)
    for part in ("in_features=576", "out_features=192", "bits=4", "group_size=64", "codebook=nf",
                 "bias=True"):
        assert part in r
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_compile_fullgraph(linear, rng):
    q = QuantLinear.from_linear(linear, 4, 64)
    x = torch.randn(3, 576, generator=rng)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), q(x))


def test_checkpoint_nbytes_is_what_the_state_dict_holds(linear):
    q = QuantLinear.from_linear(linear, 3, 64, offsets=True)
    sd = q.state_dict()
    assert q.checkpoint_nbytes() == sum(t.numel() * t.element_size() for k, t in sd.items() if k != "qmeta")


@pytest.mark.parametrize("dense,mv", [(4, False), (0, True), (0, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_linear_routes_few_bf16_rows_to_the_kernel(linear, dtype, bias, dense, mv, rng, monkeypatch):
    import flute.linear
    from flute.linear import GemvLinear
    if dense and not flute.ops.HAS_CPU_KERNEL:
        pytest.skip("flute._cpu not built")
    # with the kernel (up to 4 rows), and without it on AMX CPUs (mv) and on the others
    monkeypatch.setattr(flute.linear, "DENSE_MAX_ROWS", dense)
    monkeypatch.setattr(flute.linear, "MV_FOR_BF16_ROWS", mv)
    if not bias:
        linear.bias = None
    linear = linear.to(dtype)
    g = GemvLinear.sharing(linear)
    assert g.weight is linear.weight and g.bias is linear.bias
    assert set(g.state_dict()) == set(linear.state_dict())
    one = torch.randn(1, 1, 576, generator=rng).to(dtype)
    few = torch.randn(2, 2, 576, generator=rng).to(dtype)
    many = torch.randn(2, 3, 576, generator=rng).to(dtype)
    with torch.no_grad():
        y1, yf, yn = g(one), g(few), g(many)
        assert y1.shape == (1, 1, 192) and y1.dtype == dtype and yf.shape == (2, 2, 192)
        assert torch.equal(yn, linear(many))  # more rows than DENSE_MAX_ROWS: nn.Linear's own path
        b = 0 if linear.bias is None else linear.bias
        if dtype == torch.bfloat16 and dense:  # the kernel, bias added after
            assert torch.equal(y1, torch.ops.flute.bf16_gemv(one, linear.weight) + b)
            assert torch.equal(yf, torch.ops.flute.bf16_gemv(few, linear.weight) + b)
        elif dtype == torch.bfloat16 and mv:  # one row where mv is the faster: the matrix-vector product
            assert torch.equal(y1.reshape(-1), torch.mv(linear.weight, one.reshape(-1)) + b)
            assert torch.equal(yf, linear(few))
        else:
            assert torch.equal(y1, linear(one)) and torch.equal(yf, linear(few))
        exact = one.double() @ linear.weight.double().T + (linear.bias.double() if bias else 0)
        assert ((y1.double() - exact).norm() / exact.norm()).item() < 1e-2
    if dtype == torch.bfloat16 and dense:
        # float32 activations against the bf16 weight (nn.Linear refuses the mix): float32 out
        with torch.no_grad():
            y32 = g(one.float())
        assert y32.dtype == torch.float32
        assert ((y32.double() - exact).norm() / exact.norm()).item() < 1e-5
        # recording a gradient: nn.Linear's path
        xg = one.clone().requires_grad_()
        g(xg).sum().backward()
        assert xg.grad is not None and xg.grad.shape == one.shape
