"""GPU tests of the CUDA kernels against the float64 CPU reference (skipped without a GPU; on a
machine with a GPU a missing or broken ``flute._C`` FAILS every test, with the import error).

Fresh random data (never zeros), outputs poisoned where the kernel writes, every bits x group x
dtype x offsets combination over a ladder of batch sizes and odd shapes; determinism across
streams, CUDA-graph capture, torch.compile, and clear errors on bad inputs.
"""
import itertools
import os

import pytest
import torch

import flute
from flute.testing import RandomWeight, random_quantized, reference_qgemm
from flute.layout import to_kernel_layout

pytestmark = pytest.mark.cuda

DEV = "cuda"
BITS = (2, 3, 4)  # FLUTE_TEST_BITS selects some (tests/conftest.py); tests without a bits parameter carry @pytest.mark.bits
GROUPS = (32, 48, 64, 96, 128, 192, 256, -1)  # 48/96/192: scale windows straddle k-tiles
DTYPES = (torch.float16, torch.bfloat16)
MS = (1, 2, 3, 7, 16, 17, 31, 33, 64, 65, 127, 128, 255, 512, 1024)
SMALL_SHAPES = ((192, 576), (1000, 1536))       # (N, K)
LARGE_SHAPES = ((4096, 14336), (28672, 8192))
FULL = os.environ.get("FLUTE_FULL_MATRIX", "0") == "1"


@pytest.fixture(autouse=True)
def _need_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not flute.ops.HAS_CUDA_KERNEL:  # a GPU but no kernel: a broken build, never a skip
        pytest.fail("flute._C (the CUDA kernels) did not load on a machine with a GPU: "
                    f"{flute.ops.CUDA_KERNEL_ERROR or 'not built'}", pytrace=False)


def poison_allocator(numel, dtype):
    """Fill a block of the size the op is about to allocate with NaN and free it: the caching
    allocator hands the same memory to the op's output, so any element the kernel fails to write
    stays NaN and fails the finiteness check."""
    torch.full((numel,), float("nan"), dtype=dtype, device=DEV)  # freed at once, NaNs stay
    torch.cuda.synchronize()


def run_qgemm(x, codes, scales, offs, table, bits, group, q=None):
    n, k = codes.shape
    if q is None:
        q = to_kernel_layout(codes.to(DEV), bits)
    poison_allocator(x.numel() // k * n, x.dtype)
    return torch.ops.flute.qgemm(x, q, scales.to(DEV), None if offs is None else offs.to(DEV),
                                 table.to(DEV), bits, group, k, n)


def check_close(y, ref, dtype, k):
    assert y.shape == ref.shape
    y = y.double().cpu()
    assert bool(torch.isfinite(y).all()), "NaN/Inf in output (unwritten or corrupted elements)"
    # fp32 accumulation; the error is dominated by rounding of the weights/activations/output
    eps = 2 ** -10 if dtype == torch.float16 else 2 ** -7
    scale = ref.abs().mean() + 1e-6
    err = (y - ref).abs()
    assert float(err.max()) <= 8 * eps * float(ref.abs().max() + scale), float(err.max())
    assert float(err.mean()) <= 2 * eps * float(scale), float(err.mean())


def matrix():
    shapes = SMALL_SHAPES
    for bits, group, dtype, offsets in itertools.product(BITS, GROUPS, DTYPES, (False, True)):
        ms = MS if FULL else (1, 3, 16, 17, 33, 65, 255, 512)
        for (n, k) in shapes:
            yield bits, group, dtype, offsets, n, k, ms


@pytest.mark.parametrize("bits,group,dtype,offsets,n,k,ms", list(matrix()),
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else "Ms")
def test_qgemm_matches_reference(bits, group, dtype, offsets, n, k, ms):
    codes, scales, offs, table = random_quantized(n, k, bits, group, dtype=dtype, offsets=offsets, seed=bits * 1000 + n)
    q = to_kernel_layout(codes.to(DEV), bits)
    for M in ms:
        x = (torch.randn(M, k, generator=torch.Generator().manual_seed(M)) ).to(dtype)
        y = run_qgemm(x.to(DEV), codes, scales, offs, table, bits, group, q)
        torch.cuda.synchronize()
        check_close(y, reference_qgemm(x.to(DEV), RandomWeight(codes, scales, offs, table), group).cpu(), dtype, k)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k", LARGE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qgemm_large_shapes(bits, n, k, dtype):
    codes, scales, offs, table = random_quantized(n, k, bits, 128, dtype=dtype, offsets=False, seed=7)
    q = to_kernel_layout(codes.to(DEV), bits)
    for M in ((1, 16, 64, 300) if FULL or bits == 4 else (1, 33)):
        x = torch.randn(M, k, generator=torch.Generator().manual_seed(M)).to(dtype)
        y = run_qgemm(x.to(DEV), codes, scales, offs, table, bits, 128, q)
        check_close(y, reference_qgemm(x.to(DEV), RandomWeight(codes, scales, None, table), 128).cpu(), dtype, k)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offsets", (False, True))
@pytest.mark.parametrize("group", (32, 128, -1, 40))
def test_dequantize_bit_exact(bits, dtype, offsets, group):
    n, k = 1000, 1536 if group != 40 else 1000
    codes, scales, offs, table = random_quantized(n, k, bits, group, dtype=dtype, offsets=offsets, seed=3)
    q = to_kernel_layout(codes, bits)
    ref = torch.ops.flute.dequantize(q, scales, offs, table, bits, group, k, n)  # CPU reference
    got = torch.ops.flute.dequantize(q.to(DEV), scales.to(DEV), None if offs is None else offs.to(DEV),
                                     table.to(DEV), bits, group, k, n)
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), ref)


@pytest.mark.bits(4)
def test_leading_dims_and_odd_k():
    bits, n, k = 4, 130, 1000  # K % 8 != 0 is padded by the binding; N odd tiles
    codes, scales, _, table = random_quantized(n, k, bits, -1, dtype=torch.float16, offsets=False)
    x = torch.randn(2, 3, k).to(torch.float16)
    y = run_qgemm(x.to(DEV), codes, scales, None, table, bits, -1)
    assert y.shape == (2, 3, n)
    check_close(y.reshape(6, n), reference_qgemm(x.reshape(6, k).to(DEV), RandomWeight(codes, scales, None, table), -1).cpu(),
                torch.float16, k)
    # a non-contiguous x
    xt = torch.randn(k, 5).to(torch.float16).to(DEV).t()
    y = run_qgemm(xt, codes, scales, None, table, bits, -1)
    check_close(y, reference_qgemm(xt, RandomWeight(codes, scales, None, table), -1).cpu(), torch.float16, k)


@pytest.mark.bits(3)
def test_unsupported_group_uses_dequant_path():
    bits, n, k, group = 3, 96, 200, 24  # 24 % 16 != 0: dequantize + matmul
    codes, scales, _, table = random_quantized(n, k, bits, group, dtype=torch.float16, offsets=False)
    x = torch.randn(5, k).to(torch.float16)
    y = run_qgemm(x.to(DEV), codes, scales, None, table, bits, group)
    check_close(y, reference_qgemm(x.to(DEV), RandomWeight(codes, scales, None, table), group).cpu(), torch.float16, k)


@pytest.mark.bits(4)
def test_deterministic_across_streams():
    bits, n, k = 4, 4096, 4096
    codes, scales, _, table = random_quantized(n, k, bits, 128, dtype=torch.float16, offsets=False)
    q = to_kernel_layout(codes.to(DEV), bits)
    s, t = scales.to(DEV), table.to(DEV)
    for M in (1, 16, 40):
        x = torch.randn(M, k).to(torch.float16).to(DEV)
        outs = []
        for _ in range(2):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())  # x was made on the default stream
            with torch.cuda.stream(stream):
                outs.append(torch.ops.flute.qgemm(x, q, s, None, t, bits, 128, k, n))
            stream.synchronize()
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("bits,n,k,group,offsets", [
    (4, 256, 16384, 128, False),   # 2 tiles of 128 k-tiles: split 4 ways on any GPU
    (3, 40, 8192, 48, True),       # 1 tile: split, straddling scale windows, offsets
    (2, 4096, 4096, 128, False),   # 32 tiles: split 4 ways (8 k-tiles per part)
])
def test_streamk_split_tiles(bits, n, k, group, offsets):
    """Shapes whose tiles are split across CTAs (the Stream-K reduction through the persistent
    workspace): correct, bitwise reproducible across calls, and the flags are left zero (a
    second and third call would hang or add stale partials otherwise)."""
    codes, scales, offs, table = random_quantized(n, k, bits, group, dtype=torch.float16, offsets=offsets, seed=11)
    q = to_kernel_layout(codes.to(DEV), bits)
    for M in (1, 16, 40):
        x = torch.randn(M, k, generator=torch.Generator().manual_seed(M)).to(torch.float16)
        ys = [run_qgemm(x.to(DEV), codes, scales, offs, table, bits, group, q) for _ in range(3)]
        torch.cuda.synchronize()
        check_close(ys[0], reference_qgemm(x.to(DEV), RandomWeight(codes, scales, offs, table), group).cpu(),
                    torch.float16, k)
        assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


@pytest.mark.bits(3)
def test_cuda_graph_capture_and_replay():
    bits, n, k = 3, 2048, 1536
    codes, scales, _, table = random_quantized(n, k, bits, 64, dtype=torch.bfloat16, offsets=False)
    q = to_kernel_layout(codes.to(DEV), bits)
    s, t = scales.to(DEV), table.to(DEV)
    x = torch.randn(8, k).to(torch.bfloat16).to(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        torch.ops.flute.qgemm(x, q, s, None, t, bits, 64, k, n)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.flute.qgemm(x, q, s, None, t, bits, 64, k, n)
    for _ in range(3):
        x.copy_(torch.randn(8, k).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        check_close(y, reference_qgemm(x.cpu().to(DEV), RandomWeight(codes, scales, None, table), 64).cpu(), torch.bfloat16, k)


@pytest.mark.bits(4)
def test_torch_compile_quantlinear():
    lin = torch.nn.Linear(576, 192, bias=True).half()
    ql = flute.QuantLinear.from_linear(lin, bits=4, group_size=64).to(DEV)
    x = torch.randn(3, 576, dtype=torch.float16, device=DEV)
    eager = ql(x)
    compiled = torch.compile(ql, fullgraph=True)
    out = compiled(x)
    assert torch.allclose(out, eager, rtol=1e-2, atol=1e-2)


@pytest.mark.bits(4)
def test_bad_inputs_raise_clear_errors():
    bits, n, k = 4, 64, 128
    codes, scales, _, table = random_quantized(n, k, bits, 64, dtype=torch.float16, offsets=False)
    q = to_kernel_layout(codes, bits).to(DEV)
    s, t = scales.to(DEV), table.to(DEV)
    x = torch.randn(2, k, dtype=torch.float16, device=DEV)
    op = torch.ops.flute.qgemm
    with pytest.raises(Exception, match="dtype|float16|bfloat16"):
        op(x.float(), q, s, None, t, bits, 64, k, n)           # x dtype != scales dtype
    with pytest.raises(Exception, match="qweight"):
        op(x, q[:-4], s, None, t, bits, 64, k, n)               # wrong layout size
    with pytest.raises(Exception, match="last dimension|in_features"):
        op(x[:, :64], q, s, None, t, bits, 64, k, n)
    with pytest.raises(Exception, match="scales"):
        op(x, q, s[:, :1], None, t, bits, 64, k, n)
    with pytest.raises(Exception, match="device|cuda|CUDA"):
        op(x, q.cpu(), s, None, t, bits, 64, k, n)
    with pytest.raises(Exception, match="bits"):
        op(x, q, s, None, t, 5, 64, k, n)
