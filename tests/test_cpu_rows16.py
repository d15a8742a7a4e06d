"""The int8 mode's 16-row kernel (csrc/cpu/kernel_int8_rows16_avx512.cpp, AVX-512 VBMI + VNNI):
against the int8 spec (flute.testing.reference_qgemm_int8) and the portable path, its activation
blocks, and the binding's row chunks of large batches (csrc/cpu/binding.cpp)."""
import random
import zlib

import pytest
import torch

from flute import ops
from flute.cpu_layout import to_cpu_layout
from flute.testing import int8_uses_pair_tables, random_quantized, reference_qgemm, reference_qgemm_int8, relative_error
from cpu_kernel_common import TOL, normwise_error, run, threads  # noqa: F401  (threads: a fixture)

pytestmark = [pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built"),
              pytest.mark.skipif(ops.HAS_CPU_KERNEL and not torch.ops.flute.cpu_rows16_m(4),
                                 reason="this CPU or build has no 16-row int8 kernel (AVX-512 VBMI + VNNI)")]


@pytest.fixture
def int8_mode():
    ops.set_cpu_mode("int8")
    yield
    ops.set_cpu_mode("exact")


@pytest.fixture
def no_amx():
    """AMX off for one test: on AMX CPUs bf16 batches from 16 rows take the AMX kernels
    (kernel_amx.cpp), not the 16-row int8 kernel that a test of its bf16 output means."""
    was = ops.get_cpu_amx()
    if was:
        ops.set_cpu_amx(False)
    yield
    if was:
        ops.set_cpu_amx(True)


def test_int8_rows16_kernel_matches_spec_and_portable(threads, int8_mode):
    """Every bit width from cpu_rows16_m(bits) rows runs on the 16-row kernel where the CPU has
    AVX-512 VBMI + VNNI (weight rows along the vector, each K block decoded once for up to 16
    activation rows; 2 bits read from the pair layout, with the int8 activations of 3 and 4 bits):
    against the spec and the portable int8 path (3 and 4 bits: the same integers, float32 sums in
    another order),
    for N not a multiple of 16 (a partial tile, layout tiles past N), K with partial blocks and
    chunks past K, every group kind, offsets, every scale and activation dtype, and activation rows
    in passes of 1 to 16 (M up to 511: 32 passes)."""
    r = random.Random(zlib.crc32(f"rows16-{threads}".encode()))
    g = torch.Generator().manual_seed(16)
    for i in range(36):
        bits = 2 + i % 3
        m_min = int(torch.ops.flute.cpu_rows16_m(bits))
        n, k = r.choice([1, 5, 16, 17, 67, 301]), r.choice([32, 100, 128, 544, 1000, 1312])
        group, m = r.choice([32, 64, 128, -1]), r.choice([m_min, 8, 16, 17, 31, 40, 255]) if i > 2 else 511
        dtype = r.choice([torch.float32, torch.bfloat16, torch.float16])
        w = random_quantized(n, k, bits, group, offsets=r.random() < 0.4,
                             dtype=r.choice([torch.float32, torch.bfloat16, torch.float16]), generator=g)
        x = torch.randn(m, k, generator=g).to(dtype)
        q = to_cpu_layout(w.codes, bits)
        y = run(x, w, bits, group, n, k, q)
        case = (bits, n, k, group, m, dtype, w.scales.dtype, w.offsets is not None)
        assert not int8_uses_pair_tables(bits, m)
        assert normwise_error(y, reference_qgemm_int8(x, w, group), x, w, group) < TOL[dtype], case
        if dtype == torch.float32 and m < 32 and bits != 2:  # portable: int8 to 32 rows, 2 bits on pairs
            ops.set_cpu_isa("portable")
            try:
                yp = run(x, w, bits, group, n, k, q)
            finally:
                ops.set_cpu_isa("auto")
            assert relative_error(y, yp) < 1e-6, case
        if dtype == torch.float32 and k >= 64:  # really the int8 arithmetic, not the exact path
            assert normwise_error(y, reference_qgemm(x, w, group), x, w, group) > 1e-5, case


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rows16_activation_blocks_of_long_rows(bits, threads, int8_mode):
    """Many rows of long rows run in blocks of activation rows and K ranges (rows16_tiles: 64 rows,
    at most 1 MB of int8 activations, so 128 rows of 12700 columns take 2 x 2 blocks, the sums of the
    first K block kept in the output between them), with the short last block and a partial tile:
    against the int8 spec, and every row bit for bit that of the same rows in calls of 16 rows
    (one block each)."""
    g = torch.Generator().manual_seed(bits)
    n, k, m = 37, 12700, 128
    for group, offsets, dtype in ((64, False, torch.float32), (128, True, torch.bfloat16), (-1, False, torch.float16)):
        w = random_quantized(n, k, bits, group, offsets=offsets, generator=g)
        x = torch.randn(m, k, generator=g).to(dtype)
        q = to_cpu_layout(w.codes, bits)
        y = run(x, w, bits, group, n, k, q)
        case = (bits, group, offsets, dtype)
        assert normwise_error(y, reference_qgemm_int8(x, w, group), x, w, group) < TOL[dtype], case
        parts = torch.cat([run(x[i:i + 16], w, bits, group, n, k, q) for i in range(0, m, 16)])
        assert torch.equal(y, parts), case


@pytest.mark.parametrize("bits", [2, 4])
def test_rows16_large_batches_in_row_chunks(bits, threads, int8_mode):
    """A batch whose fp32 results would pass the kept scratch (16 MB) runs in chunks of rows
    (bf16 x, N = 16400: chunks of at most 192 rows, so 400 rows take three): the output is the
    int8 spec's and each row's bits are those of the same rows in a call of its own; no row count
    takes the panel path in the int8 mode here (cpu_panel_m 0)."""
    assert torch.ops.flute.cpu_panel_m(bits) == 0
    g = torch.Generator().manual_seed(40 + bits)
    n, k, m = 16400, 96, 400
    w = random_quantized(n, k, bits, 32, dtype=torch.bfloat16, generator=g)
    x = torch.randn(m, k, generator=g).bfloat16()
    q = to_cpu_layout(w.codes, bits)
    y = run(x, w, bits, 32, n, k, q)
    assert normwise_error(y, reference_qgemm_int8(x, w, 32), x, w, 32) < TOL[torch.bfloat16]
    for r0, r1 in ((0, 133), (133, 266), (266, 400), (0, 150), (380, 400)):
        assert torch.equal(y[r0:r1], run(x[r0:r1], w, bits, 32, n, k, q)), (r0, r1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rows16_bf16_results_rounded_once_in_the_kernel(bits, threads, int8_mode, no_amx):
    """With bf16 activations the 16-row kernel rounds its results to bf16 in its last store
    (Rows16Args::out_bf16) instead of a pass over fp32 results after the call: every value is the
    fp32 result of the same activations rounded once (nearest even), with one K block and with two
    (12700 columns at 128 rows: the first block's sums kept in fp32 between them), a partial tile,
    and a NaN scale row (NaN in both). fp16 activations keep the conversion after the kernel: the
    same check. AMX off (no_amx), so that bf16 batches take this kernel on AMX CPUs too."""
    g = torch.Generator().manual_seed(70 + bits)
    for n, k, m in ((37, 1000, 40), (37, 12700, 128)):
        w = random_quantized(n, k, bits, 64, dtype=torch.bfloat16, generator=g)
        w.scales[5] = float("nan")
        q = to_cpu_layout(w.codes, bits)
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, generator=g).to(dtype)
            y = run(x, w, bits, 64, n, k, q)
            y32 = run(x.float(), w, bits, 64, n, k, q)
            assert y.dtype == dtype and y32.dtype == torch.float32
            assert torch.equal(y.isnan(), y32.isnan()) and y[:, 5].isnan().all(), (n, k, dtype)
            assert torch.equal(y.nan_to_num(), y32.to(dtype).nan_to_num()), (n, k, dtype)
