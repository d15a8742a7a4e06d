"""The flute op on CPU against a float64 reference built from the canonical codes."""
import pytest
import torch

import flute  # noqa: F401  (registers the op)
from flute.format import dequantize_codes
from flute.testing import RandomWeight, random_quantized, reference_qgemm
from flute.layout import from_kernel_layout, kernel_layout_shape, to_kernel_layout

SHAPES = [(192, 576), (1000, 1536), (576, 13824)]  # (N, K): odd sizes on purpose
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_qgemm_matches_float64_reference(n, k, bits, group, dtype, rng):
    codes, scales, offs, table = random_quantized(n, k, bits, group, generator=rng, offsets=(bits == 3), dtype=dtype)
    x = torch.randn(3, k, generator=rng).to(dtype)
    y = torch.ops.flute.qgemm(x, to_kernel_layout(codes, bits), scales, offs, table, bits, group, k, n)
    assert y.dtype == dtype and y.shape == (3, n)
    ref = reference_qgemm(x, RandomWeight(codes, scales, offs, table), group)
    err = (y.double() - ref).norm() / ref.norm()
    assert err < TOLERANCE[dtype], err.item()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 9), (192, 576), (33, 1000), (1000, 40)])
def test_kernel_layout_round_trip(n, k, bits, rng):
    codes = torch.randint(0, 2 ** bits, (n, k), generator=rng, dtype=torch.uint8)
    qweight = to_kernel_layout(codes, bits)
    assert qweight.dtype == torch.int32
    assert torch.equal(from_kernel_layout(qweight, bits, k, n), codes)


def test_dequantize_op_and_leading_dims(rng):
    n, k, bits, group = 64, 200, 4, 64
    codes, scales, offs, table = random_quantized(n, k, bits, group, generator=rng, offsets=True)
    qweight = to_kernel_layout(codes, bits)
    w = torch.ops.flute.dequantize(qweight, scales, offs, table, bits, group, k, n)
    assert torch.allclose(w.double(), dequantize_codes(codes, scales, offs, table, group, torch.float64))
    x = torch.randn(2, 3, 5, k, generator=rng)
    y = torch.ops.flute.qgemm(x, qweight, scales, offs, table, bits, group, k, n)
    assert y.shape == (2, 3, 5, n)
    assert torch.allclose(y, x @ w.t(), atol=1e-4, rtol=1e-4)


def test_opcheck(rng):
    n, k, bits, group = 48, 96, 3, 32
    codes, scales, offs, table = random_quantized(n, k, bits, group, generator=rng, offsets=True)
    args = (torch.randn(4, k, generator=rng), to_kernel_layout(codes, bits), scales, offs, table,
            bits, group, k, n)
    torch.library.opcheck(torch.ops.flute.qgemm, args)
    torch.library.opcheck(torch.ops.flute.dequantize, args[1:])


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(5, 7, 96, dtype=torch.bfloat16)
        q = torch.empty(kernel_layout_shape(4, 96, 40), dtype=torch.int32)
        y = torch.ops.flute.qgemm(x, q, torch.empty(40, 2, dtype=torch.bfloat16), None,
                                  torch.empty(16), 4, 64, 96, 40)
        assert y.shape == (5, 7, 40) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("change,msg", [
    (dict(bits=5), "bits must be one of"),
    (dict(group_size=0), "group_size"),
    (dict(qweight="int64"), "qweight must be int32"),
    (dict(scales="short"), "scales must be floating point of shape"),
    (dict(offsets="wrong_dtype"), "offsets must have the shape and dtype of scales"),
    (dict(table="short"), "table must be floating point with 16 entries"),
    (dict(x="wrong_k"), "last dimension in_features=128"),
    (dict(x="int"), "x must be floating point"),
])
def test_bad_arguments_are_named(change, msg, rng):
    n, k, bits, group = 32, 128, 4, 64
    codes, scales, offs, table = random_quantized(n, k, bits, group, generator=rng, offsets=True)
    a = dict(x=torch.randn(2, k), qweight=to_kernel_layout(codes, bits), scales=scales, offsets=offs,
             table=table, bits=bits, group_size=group, in_features=k, out_features=n)
    fix = {"int64": lambda: a["qweight"].long(), "short": lambda: None, "wrong_dtype": lambda: offs.half(),
           "wrong_k": lambda: torch.randn(2, k + 1), "int": lambda: torch.ones(2, k, dtype=torch.int32)}
    for key, value in change.items():
        if value == "short":
            a[key] = a[key][..., :-1]
        elif isinstance(value, str):
            a[key] = fix[value]()
        else:
            a[key] = value
    with pytest.raises((ValueError, RuntimeError), match=msg):
        torch.ops.flute.qgemm(*a.values())


def test_gradient_flows_to_the_input(rng):
    """Frozen quantized weight, trainable input: d(sum(y * g))/dx = g @ W."""
    n, k, bits, group = 40, 96, 4, 32
    codes, scales, offs, table = random_quantized(n, k, bits, group, generator=rng)
    qweight = to_kernel_layout(codes, bits)
    x = torch.randn(3, k, generator=rng, requires_grad=True)
    g = torch.randn(3, n, generator=rng)
    y = torch.ops.flute.qgemm(x, qweight, scales, offs, table, bits, group, k, n)
    (y * g).sum().backward()
    w = dequantize_codes(codes, scales, offs, table, group)
    assert torch.allclose(x.grad, g @ w, atol=1e-5, rtol=1e-5)


def test_reference_path_has_no_cache_and_works_under_inference_mode(rng):
    """The GPU layout on CPU runs the reference, which decodes the codes every call: an in-place
    change of qweight is seen at once, and inference tensors are fine (a cache keyed on the tensor
    used to break on both)."""
    from flute import ops
    assert not hasattr(ops, "_CPU_CODES") and not hasattr(ops, "decoded_codes")
    n, k, bits, group = 16, 64, 4, 32
    codes, scales, offs, table = random_quantized(n, k, bits, group, generator=rng)
    x = torch.randn(2, k, generator=rng)
    with torch.inference_mode():
        qweight = to_kernel_layout(codes, bits)
        y1 = torch.ops.flute.qgemm(x, qweight, scales, None, table, bits, group, k, n)
    new_codes = (codes + 1) % 16
    with torch.inference_mode():
        qweight.copy_(to_kernel_layout(new_codes, bits))
        y2 = torch.ops.flute.qgemm(x, qweight, scales, None, table, bits, group, k, n)
    ref1 = reference_qgemm(x, RandomWeight(codes, scales, None, table), group)
    ref2 = reference_qgemm(x, RandomWeight(new_codes, scales, None, table), group)
    assert ((y1.double() - ref1).norm() / ref1.norm()) < 1e-5
    assert ((y2.double() - ref2).norm() / ref2.norm()) < 1e-5


def test_float64_activations_keep_float64_accuracy(rng):
    """float64 callers (the vLLM loader tests, gradient checks) get float64 arithmetic on either
    device layout, not the fp32 kernel."""
    from flute.cpu_layout import device_layout
    n, k, bits, group = 96, 200, 4, 64
    w = random_quantized(n, k, bits, group, generator=rng, offsets=True, dtype=torch.float64)
    x = torch.randn(3, k, generator=rng, dtype=torch.float64)
    ref = reference_qgemm(x, w, group)
    for qweight in (device_layout(w.codes, bits, "cpu"), to_kernel_layout(w.codes, bits)):
        y = torch.ops.flute.qgemm(x, qweight, w.scales, w.offsets, w.table, bits, group, k, n)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
