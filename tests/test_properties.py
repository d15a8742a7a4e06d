"""Property-based tests (hypothesis) of the core invariants, for any bits, shape, group size,
offsets and dtype:

- quantize -> pack -> device layout (CPU and GPU) -> unpack is the identity on codes;
- ``torch.ops.flute.qgemm`` equals the float64 reference;
- save -> load -> forward of a ``QuantLinear`` is bitwise equal;
- corrupting any one tensor of a saved layer (shape, dtype, NaN, truncation) is an error naming it.

The example count comes from the hypothesis profile in tests/conftest.py: ``ci`` by default
(bounded), ``HYPOTHESIS_PROFILE=long`` for a longer run by hand.
"""
import io

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402
from safetensors.torch import load as st_load, save as st_save  # noqa: E402

from flute import QuantLinear, quantize_weight  # noqa: E402
from flute.cpu_layout import codes_from_layout, to_cpu_layout  # noqa: E402
from flute.format import QuantizedWeight, dequantize_codes, pack_codes, unpack_codes  # noqa: E402
from flute.layout import from_kernel_layout, to_kernel_layout  # noqa: E402
from flute.testing import random_quantized, reference_qgemm  # noqa: E402

BITS = st.sampled_from([2, 3, 4])
GROUPS = st.sampled_from([-1, 1, 7, 32, 64, 100, 128])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SEEDS = st.integers(0, 2 ** 31 - 1)


@st.composite
def configs(draw, max_n=48, max_k=300):
    return dict(bits=draw(BITS), n=draw(st.integers(1, max_n)), k=draw(st.integers(1, max_k)),
                group_size=draw(GROUPS), offsets=draw(st.booleans()), seed=draw(SEEDS))


@given(cfg=configs(), scale_method=st.sampled_from(["absmax", "mse"]))
def test_codes_survive_pack_and_both_device_layouts(cfg, scale_method):
    g = torch.Generator().manual_seed(cfg["seed"])
    w = torch.randn(cfg["n"], cfg["k"], generator=g)
    qw = quantize_weight(w, cfg["bits"], cfg["group_size"], scale_method=scale_method,
                         offsets=cfg["offsets"], scale_dtype=torch.float32)
    codes = qw.codes()
    bits, n, k = cfg["bits"], cfg["n"], cfg["k"]
    assert codes.shape == (n, k) and int(codes.max()) < 2 ** bits
    assert torch.equal(pack_codes(codes, bits), qw.qcodes)
    assert torch.equal(unpack_codes(qw.qcodes, bits, k), codes)
    assert torch.equal(from_kernel_layout(to_kernel_layout(codes, bits), bits, k, n), codes)
    assert torch.equal(codes_from_layout(to_cpu_layout(codes, bits), bits, k, n), codes)
    assert torch.isfinite(qw.scales).all()


# Error bound per output element, relative to sum_k |x_k| |W[n, k]|: float32 accumulation
# (k * 2**-24 worst case), half dtypes: the rounding of W's elements and of the output.
_TOL = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@given(cfg=configs(max_n=64, max_k=400), m=st.integers(1, 9), dtype=DTYPES,
       layout=st.sampled_from(["cpu", "gpu"]))
def test_qgemm_equals_the_float64_reference(cfg, m, dtype, layout):
    bits, n, k, group = cfg["bits"], cfg["n"], cfg["k"], cfg["group_size"]
    g = torch.Generator().manual_seed(cfg["seed"])
    w = random_quantized(n, k, bits, group, offsets=cfg["offsets"], dtype=dtype, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    qweight = to_cpu_layout(w.codes, bits) if layout == "cpu" else to_kernel_layout(w.codes, bits)
    y = torch.ops.flute.qgemm(x, qweight, w.scales, w.offsets, w.table, bits, group, k, n)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = reference_qgemm(x, w, group)
    w64 = dequantize_codes(w.codes, w.scales, w.offsets, w.table, group, torch.float64)
    bound = _TOL[dtype] * (x.double().abs() @ w64.abs().t()) + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), (err - bound).max().item()


def _layer(cfg, dtype, bias):
    g = torch.Generator().manual_seed(cfg["seed"])
    w = (torch.randn(cfg["n"], cfg["k"], generator=g) * 0.05).to(dtype)
    qw = quantize_weight(w, cfg["bits"], cfg["group_size"], offsets=cfg["offsets"])
    b = torch.randn(cfg["n"], generator=g).to(dtype) if bias else None
    return QuantLinear.from_quantized(qw, b), torch.randn(3, cfg["k"], generator=g).to(dtype)


@given(cfg=configs(), dtype=DTYPES, bias=st.booleans())
def test_save_load_forward_is_bitwise_equal(cfg, dtype, bias):
    layer, x = _layer(cfg, dtype, bias)
    blob = st_save(layer.state_dict())
    fresh = QuantLinear(cfg["k"], cfg["n"], cfg["bits"], cfg["group_size"], bias=bias,
                        offsets=cfg["offsets"], dtype=dtype)
    fresh.load_state_dict(st_load(blob))
    assert torch.equal(fresh(x), layer(x))
    again = fresh.state_dict()
    for key, value in layer.state_dict().items():
        assert torch.equal(again[key], value), key
    buf = io.BytesIO()  # torch.save / torch.load (a .bin checkpoint) too
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), layer(x))


def _corrupt(sd, name, kind):
    """``sd`` with tensor ``name`` damaged by ``kind``; None if that damage does not apply."""
    t = sd[name]
    if kind == "nan":
        if not t.is_floating_point():
            return None
        t = t.clone()
        t.view(-1)[t.numel() // 2] = float("nan")
    elif kind == "dtype":
        t = t.to(torch.int32) if t.is_floating_point() else t.to(torch.float32)
    elif kind == "shape":
        t = t.unsqueeze(0)
    elif kind == "truncate":  # the tail of the tensor is lost
        t = t[:-1]
    return dict(sd, **{name: t})


@given(cfg=configs(max_n=24, max_k=200), dtype=DTYPES,
       name=st.sampled_from(["qcodes", "scales", "offsets", "table", "qmeta", "bias"]),
       kind=st.sampled_from(["nan", "dtype", "shape", "truncate"]),
       strict=st.booleans())
def test_corrupting_one_tensor_is_an_error_that_names_it(cfg, dtype, name, kind, strict):
    cfg = dict(cfg, offsets=True)
    layer, x = _layer(cfg, dtype, bias=True)
    sd = st_load(st_save(layer.state_dict()))
    bad = _corrupt(sd, name, kind)
    hypothesis.assume(bad is not None)
    fresh = QuantLinear(cfg["k"], cfg["n"], cfg["bits"], cfg["group_size"], bias=True,
                        offsets=True, dtype=dtype)
    fresh.load_state_dict(sd)
    before = fresh(x)
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(bad, strict=strict)
    assert str(info.value).startswith(f"{name} "), str(info.value)
    assert torch.equal(fresh(x), before)  # the layer is unchanged
    if name != "bias":  # the standalone format check names it too
        tensors = {k: v for k, v in bad.items() if k != "bias"}
        with pytest.raises(ValueError, match=name):
            QuantizedWeight.from_state_dict(tensors)
