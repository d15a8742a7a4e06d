"""flute::bf16_gemv (csrc/cpu/dense_gemv.h): an unquantized bf16 weight's product with a few
activation rows, against the float64 product, the same bits on every ISA path, thread count and row
order, and its argument checks."""
import pytest
import torch

from flute import ops

from cpu_kernel_common import ISAS, available, isa, threads  # noqa: F401  (isa, threads: fixtures)

pytestmark = pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built")

# (M, N, K): odd N and K, K below, at and above one 32-column chunk, N not a multiple of a row block
SHAPES = [(1, 1, 1), (1, 7, 5), (1, 33, 31), (2, 5, 32), (1, 9, 33), (3, 64, 576), (1, 101, 1000),
          (5, 77, 130), (1, 4099, 96), (16, 40, 67)]


def exact(x, w):
    return x.double() @ w.double().t()


def relative(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def run_everywhere(x, w):
    """The op's result on every ISA this CPU has, with and without two row streams, at 1 and 2
    threads."""
    outs = {}
    old = torch.get_num_threads()
    try:
        for name in ISAS:
            if not available(name):
                continue
            ops.set_cpu_isa(name)
            for two in (False, True):
                torch.ops.flute.cpu_set_tile_pairs(two)
                for t in (1, 2):
                    torch.set_num_threads(t)
                    outs[(name, two, t)] = torch.ops.flute.bf16_gemv(x, w)
    finally:
        ops.set_cpu_isa("auto")
        torch.ops.flute.cpu_set_tile_pairs(True)
        torch.set_num_threads(old)
    return outs


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_fp32_x_matches_float64_and_every_path_gives_the_same_bits(M, N, K, rng):
    x = torch.randn(M, K, generator=rng)
    w = torch.randn(N, K, generator=rng).to(torch.bfloat16)
    outs = run_everywhere(x, w)
    first = next(iter(outs.values()))
    assert first.dtype == torch.float32 and first.shape == (M, N)
    assert relative(first, exact(x, w)) < 1e-6
    for key, y in outs.items():
        assert torch.equal(y, first), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_x_is_the_fp32_result_rounded_once(dtype, rng, isa, threads):
    x = torch.randn(2, 3, 300, generator=rng).to(dtype)  # leading dimensions kept
    w = torch.randn(45, 300, generator=rng).to(torch.bfloat16)
    y = torch.ops.flute.bf16_gemv(x, w)
    assert y.dtype == dtype and y.shape == (2, 3, 45)
    assert torch.equal(y, torch.ops.flute.bf16_gemv(x.float(), w).to(dtype))
    assert relative(y, exact(x, w)) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_non_contiguous_inputs_and_empty_shapes(rng):
    x = torch.randn(40, 3, generator=rng).t()  # [3, 40], not contiguous
    wbig = torch.randn(20, 80, generator=rng).to(torch.bfloat16)
    w = wbig[:, ::2]  # [20, 40], not contiguous
    assert not x.is_contiguous() and not w.is_contiguous()
    assert torch.equal(torch.ops.flute.bf16_gemv(x, w),
                       torch.ops.flute.bf16_gemv(x.contiguous(), w.contiguous()))
    assert torch.ops.flute.bf16_gemv(torch.randn(0, 40), w).shape == (0, 20)
    assert torch.ops.flute.bf16_gemv(torch.randn(3, 40), w[:0]).shape == (3, 0)
    z = torch.ops.flute.bf16_gemv(torch.randn(2, 0), torch.empty(5, 0, dtype=torch.bfloat16))
    assert z.shape == (2, 5) and torch.equal(z, torch.zeros(2, 5))


def test_non_finite_values_propagate(rng):
    x = torch.randn(1, 70, generator=rng)
    w = torch.randn(6, 70, generator=rng).to(torch.bfloat16)
    x[0, 3] = float("inf")
    w[2, 3] = 0
    w[4, 3] = -1
    ref = x.double() @ w.double().t()
    y = torch.ops.flute.bf16_gemv(x, w)
    assert torch.equal(torch.isnan(y), torch.isnan(ref.float()))
    assert torch.isnan(y[0, 2]) and y[0, 4] == float("-inf")


def test_bad_arguments_name_the_problem():
    w = torch.randn(4, 8).to(torch.bfloat16)
    with pytest.raises(ValueError, match="weight must be a 2-D bfloat16"):
        torch.ops.flute.bf16_gemv(torch.randn(1, 8), w.float())
    with pytest.raises(ValueError, match="last dimension 8"):
        torch.ops.flute.bf16_gemv(torch.randn(1, 9), w)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        torch.ops.flute.bf16_gemv(torch.randn(1, 8, dtype=torch.float64), w)


def test_fake_tensor_shape_for_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        y = torch.ops.flute.bf16_gemv(torch.empty(2, 5, 8, dtype=torch.bfloat16),
                                      torch.empty(3, 8, dtype=torch.bfloat16))
    assert y.shape == (2, 5, 3) and y.dtype == torch.bfloat16
