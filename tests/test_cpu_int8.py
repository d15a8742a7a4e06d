"""The CPU kernels' int8 mode (csrc/cpu/int8_gemm.cpp and the int8 kernels): against its executable
spec (flute.testing.reference_qgemm_int8, pair_tables), the portable path, and the exact mode where
it must fall back to it; tile pairs. The 16-row kernel: tests/test_cpu_rows16.py."""
import os
import random
import subprocess
import sys
import zlib

import pytest
import torch

from flute import ops
from flute.cpu_layout import to_cpu_layout
from flute.testing import (int8_uses_pair_tables, random_quantized, reference_qgemm, reference_qgemm_int8,
                           relative_error)
from cpu_kernel_common import (ISAS, TOL, at_thread_counts, available, isa, normwise_error, run,  # noqa: F401
                                threads)  # isa, threads: fixtures

pytestmark = pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built")


@pytest.fixture
def int8_mode():
    ops.set_cpu_mode("int8")
    yield
    ops.set_cpu_mode("exact")


def test_int8_mode_matches_its_spec(isa, threads, int8_mode):
    """The int8 mode (groups of a multiple of 32 or -1, every bit width): equal to its executable
    spec (int8 activations per 32-column chunk, scales k * u on one unit per block, 7-bit table) up
    to float32 sums, and really rounding (not silently exact); the AVX-512 path runs the VBMI + VNNI
    int8 kernel where the CPU has them, else the AVX2 one."""
    g = torch.Generator().manual_seed(11)
    r = random.Random(zlib.crc32(f"int8-{isa}-{threads}".encode()))
    for _ in range(40):
        bits, group = r.choice([2, 3, 4]), r.choice([32, 64, 128, 256, -1])
        n, k, m = r.choice([1, 3, 17, 40, 67]), r.choice([1, 31, 64, 130, 333, 576]), r.choice([1, 2, 3, 4, 5, 9, 17])
        dtype = r.choice([torch.float32, torch.bfloat16, torch.float16])
        # scales: bf16 and fp32 are read in place except in the last tiles, fp16 always converted
        w = random_quantized(n, k, bits, group, offsets=r.random() < 0.5,
                             dtype=r.choice([torch.float32, torch.bfloat16, torch.float16]), generator=g)
        x = torch.randn(m, k, generator=g).to(dtype)
        y = run(x, w, bits, group, n, k)
        assert y.dtype == dtype and y.shape == (m, n)
        case = (bits, group, n, k, m, dtype)
        assert normwise_error(y, reference_qgemm_int8(x, w, group), x, w, group) < TOL[dtype], case
        if k >= 64 and dtype == torch.float32:  # fp32 rounding alone is ~1e-7; int8's ~1e-4..1e-2
            assert normwise_error(y, reference_qgemm(x, w, group), x, w, group) > 1e-5, case


def test_int8_mode_groups_of_64_every_block_kind(int8_mode, rng):
    """Groups of 64 (the default) take their scales by a broadcast of the block's 2 or 4 groups:
    against the spec for every bit width, scale dtype (bf16 and fp32 read in place, fp16 and the
    last tiles buffered), K with whole and partial last blocks (the partial one on the general
    path) and M = 1..5 (every row-tile shape of the kernel)."""
    for bits in (2, 3, 4):
        for sdtype in (torch.bfloat16, torch.float32, torch.float16):
            for k in (64, 130, 576, 1000):
                w = random_quantized(67, k, bits, 64, offsets=False, dtype=sdtype, generator=rng)
                for m in (1, 2, 3, 4, 5):
                    x = torch.randn(m, k, generator=rng)
                    err = normwise_error(run(x, w, bits, 64, 67, k), reference_qgemm_int8(x, w, 64), x, w, 64)
                    assert err < TOL[torch.float32], (bits, sdtype, k, m, err)


def test_int8_chunk_scales_follow_each_chunk(int8_mode, rng):
    """Each 32-column chunk is rounded on its own scale (k * u, k fitted to the chunk), not one
    scale per block: with one large chunk per block and the others 100x smaller, the small chunks'
    contribution (the difference of two products) keeps the accuracy it has alone (~1%: int8 and
    7-bit-table rounding); one scale per block would leave those chunks ~2 levels of int8."""
    k = 1024
    for bits in (2, 3, 4):
        cols = 128 if bits == 4 else 256
        w = random_quantized(67, k, bits, 64, generator=rng)
        x = torch.randn(3, k, generator=rng)
        big = (torch.arange(k) % cols) < 32  # the first chunk of each block
        x_mixed = torch.where(big, x, x * 1e-2)
        x_big = torch.where(big, x, torch.zeros_like(x))
        small = run(x_mixed, w, bits, 64, 67, k) - run(x_big, w, bits, 64, 67, k)
        exact = reference_qgemm(x_mixed - x_big, w, 64)
        assert relative_error(small, exact) < 0.02, bits
        assert relative_error(run(x_mixed, w, bits, 64, 67, k), reference_qgemm_int8(x_mixed, w, 64)) < 1e-5


def _last_row_nan(*shape, generator):
    x = torch.randn(*shape, generator=generator)
    x[-1, 7] = float("nan")
    return x


def test_int8_mode_other_formats_stay_exact(int8_mode, rng):
    """Groups that are not a multiple of 32, non-finite activations and M >= the panel threshold
    (where there is one: not on the 16-row kernel, cpu_panel_m 0) take the exact path in int8
    mode: bitwise the exact mode's result."""
    cases = [(3, 48, 2, torch.randn), (4, 48, 2, torch.randn), (2, 100, 1, torch.randn),
             # M >= the panel threshold (32 rows; none on the 16-row kernel's CPUs)
             (2, 64, 600, torch.randn), (3, 64, 600, torch.randn), (4, 64, 600, torch.randn),
             (4, 64, 1, lambda *s, generator: torch.full(s, float("nan"))),
             (4, 64, 20, lambda *s, generator: torch.full(s, float("inf"))),
             # one NaN in the last of 20 rows of 4096: quantized by another task than row 0 (rows
             # of 4096 columns 4 to a task at 2 threads, int8_gemm.cpp)
             (4, 64, 20, _last_row_nan, 4096), (3, 64, 20, _last_row_nan, 4096)]
    for bits, group, m, make, *k in cases:
        if m == 600 and torch.ops.flute.cpu_panel_m(bits) == 0:
            continue
        n, k = 40, (k or [333])[0]
        w = random_quantized(n, k, bits, group, generator=rng)
        x = make(m, k, generator=rng)
        q = to_cpu_layout(w.codes, bits)
        y8 = run(x, w, bits, group, n, k, q)
        ops.set_cpu_mode("exact")
        ye = run(x, w, bits, group, n, k, q)
        ops.set_cpu_mode("int8")
        assert torch.equal(y8.isnan(), ye.isnan()) and torch.equal(y8.nan_to_num(), ye.nan_to_num()), (bits, group, m)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_one_row_split_over_threads(bits, int8_mode, rng):
    """One activation row over 2 threads, each preparing it into its own scratch (3/4 bits:
    int8_gemm_row's quantized row; 2 bits: pair_gemm's pair tables, rows up to 2048 columns):
    bitwise the 1-thread result, finite or not (a NaN sends every thread's share to the exact
    path), for fp32, bf16 and fp16 activations and with offsets. A bf16 / fp16 result, which each
    thread converts from fp32 for its own columns (binding.h: HalfOut), is exactly the fp32 result
    of the same values rounded once."""
    n, k, group = 301, 2048, 64  # split at 2 threads: 76 tiles 8 to a task (3/4 bits), 19 tiles 2 to a task (2 bits)
    for offsets in (False, True):
        w = random_quantized(n, k, bits, group, offsets=offsets, generator=rng)
        q = to_cpu_layout(w.codes, bits)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(1, k, generator=rng).to(dtype)
            outs = at_thread_counts(lambda: run(x, w, bits, group, n, k, q), (1, 2, 2))
            assert all(torch.equal(outs[0], o) for o in outs[1:]), (offsets, dtype)
            assert outs[0].dtype == dtype
            if dtype != torch.float32:
                y32 = at_thread_counts(lambda: run(x.float(), w, bits, group, n, k, q), (2,))[0]
                assert torch.equal(outs[0], y32.to(dtype)), (offsets, dtype)
            ref = reference_qgemm_int8(x.float(), w, group)
            assert relative_error(outs[0].float(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, k, generator=rng).to(dtype)
            x[0, 2000] = float("nan")
            y8 = at_thread_counts(lambda: run(x, w, bits, group, n, k, q), (2,))[0]
            ops.set_cpu_mode("exact")
            ye = run(x, w, bits, group, n, k, q)
            ops.set_cpu_mode("int8")
            assert y8.dtype == dtype
            assert torch.equal(y8.isnan(), ye.isnan()) and torch.equal(y8.nan_to_num(), ye.nan_to_num())


def test_pair_kernel_bf16_scales_bitwise_equal_to_fp32(int8_mode, restore_tile_pairs, rng):
    """The AVX-512 2-bit pair kernel transposes each tile's bf16 scales as bf16 words
    (tile16_rows_bf16, widened per group) where a K block holds more than 16 groups, and other
    scales as floats (tile16_rows): the same scale values given in bf16 and in float32 give the
    same bits. Every kind of run of groups per tile (1 and 9 groups: floats; 17, 31, 32, 33, 64, 65
    and 100: whole and ragged runs of 32, one and several K blocks), a ragged last tile, 1-3
    activation rows, tile pairs on and off, offsets or none, 1 and 2 threads."""
    if not available("avx512"):
        pytest.skip("this CPU lacks AVX-512")
    n = 301  # 19 tiles, the last of 13 rows
    try:
        ops.set_cpu_isa("avx512")
        for k, group in ((32, 32), (576, 64), (1088, 64), (992, 32), (1024, 32), (1056, 32), (4096, 64), (2080, 32),
                         (6400, 64)):
            for offsets in (False, True):
                w = random_quantized(n, k, 2, group, offsets=offsets, dtype=torch.bfloat16, generator=rng)
                w32 = w._replace(scales=w.scales.float(), offsets=None if w.offsets is None else w.offsets.float())
                q = to_cpu_layout(w.codes, 2)
                for m in (1, 2, 3):
                    assert int8_uses_pair_tables(2, m)
                    x = torch.randn(m, k, generator=rng)
                    for pairs in (False, True):
                        torch.ops.flute.cpu_set_tile_pairs(pairs)
                        y16 = at_thread_counts(lambda: run(x, w, 2, group, n, k, q), (1, 2))
                        y32 = at_thread_counts(lambda: run(x, w32, 2, group, n, k, q), (1, 2))
                        case = (k, group, offsets, m, pairs)
                        assert torch.isfinite(y16[0]).all(), case
                        assert all(torch.equal(a, b) for a, b in zip(y16, y32)), case
    finally:
        ops.set_cpu_isa("auto")


@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_int8_mode_simd_paths_equal_portable(group, int8_mode, rng):
    """The integer sums are identical on every path (AVX2; AVX-512, which runs its VBMI + VNNI
    kernel where the CPU has them; portable); only float32 summation order differs. Every merge
    width (groups of 32: one part per float FMA, 64: two, 128 and one group: four) and every
    configuration of activation rows (1-4, 5 = 4 + 1, 17). K = 544 leaves 32 columns in the last
    block, whose parts that meet only padding the AVX-512 and AVX2 kernels skip
    (Int8Args::last_half). 2 bits where the AVX-512 path runs its 16-row kernel (int8 activations,
    not the pair tables of the other paths): against that spec instead."""
    isas = [i for i in ("avx512", "avx2") if available(i)]
    if not isas:
        pytest.skip("this CPU lacks AVX2")
    for bits in (2, 3, 4):
        for m, k in ((1, 1000), (2, 1000), (3, 1000), (5, 1000), (17, 1000), (1, 544), (5, 544)):
            w = random_quantized(203, k, bits, group, offsets=m == 5, dtype=torch.bfloat16, generator=rng)
            x = torch.randn(m, k, generator=rng)
            q = to_cpu_layout(w.codes, bits)
            ys, pair = {}, {}
            for isa in isas + ["portable"]:
                ops.set_cpu_isa(isa)
                ys[isa], pair[isa] = run(x, w, bits, group, 203, k, q), int8_uses_pair_tables(bits, m)
            ops.set_cpu_isa("auto")
            for isa in isas:
                case = (isa, bits, group, m, k)
                if pair[isa] == pair["portable"]:
                    assert relative_error(ys[isa], ys["portable"]) < 1e-6, case
                else:
                    ref = reference_qgemm_int8(x, w, group, pair=False)
                    assert normwise_error(ys[isa], ref, x, w, group) < TOL[torch.float32], case


@pytest.mark.parametrize("codebook", ["int", "fp4"])
def test_int8_mode_uniform_tables_are_exact(codebook, int8_mode, rng):
    """The table scale search puts uniform tables (int, fp4) on the 7-bit grid exactly, so with
    activations that int8 represents exactly (integers, each 32-column chunk reaching 127) the int8
    mode equals the exact one."""
    from flute.codebooks import get_table
    from flute.testing import table7_scale
    table = get_table(codebook, 4).float()
    s = table7_scale(table)
    assert torch.equal(torch.round(table / s) * s, table)
    n, k = 40, 256
    w = random_quantized(n, k, 4, 64, generator=rng)._replace(table=table)
    x = torch.randint(-127, 128, (3, k), generator=rng).float()
    x[:, ::32] = 127.0
    q = to_cpu_layout(w.codes, 4)
    y8 = run(x, w, 4, 64, n, k, q)
    ops.set_cpu_mode("exact")
    ye = run(x, w, 4, 64, n, k, q)
    ops.set_cpu_mode("int8")
    assert relative_error(y8, ye) < 1e-6


def test_default_mode_is_int8_below_the_panel_threshold():
    """Without FLUTE_CPU_MODE the kernel runs the int8 mode (its spec, not the exact result) for
    small batches, and exactly from the panel threshold on (32 rows; none, 0, where 3 and 4 bits run
    on the 16-row kernel: torch.ops.flute.cpu_panel_m); FLUTE_CPU_MODE=exact restores exact everywhere."""
    code = ("import torch, flute\n"
            "from flute.cpu_layout import to_cpu_layout\n"
            "from flute.testing import random_quantized, reference_qgemm, reference_qgemm_int8, relative_error\n"
            "print(flute.get_cpu_mode(), torch.ops.flute.cpu_rows16_m(4), torch.ops.flute.cpu_panel_m(4))\n"
            "w = random_quantized(96, 512, 4, 64, seed=3)\n"
            "q = to_cpu_layout(w.codes, 4)\n"
            "for m in (1, 16, 40, 300, 600):\n"
            "    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))\n"
            "    y = torch.ops.flute.qgemm(x, q, w.scales, None, w.table, 4, 64, 512, 96)\n"
            "    print(m, relative_error(y, reference_qgemm(x, w, 64)), relative_error(y, reference_qgemm_int8(x, w, 64)))\n")
    for env_mode, want in ((None, "int8"), ("exact", "exact")):
        env = {k: v for k, v in os.environ.items() if k != "FLUTE_CPU_MODE"}
        if env_mode:
            env["FLUTE_CPU_MODE"] = env_mode
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=env).stdout.split("\n")
        mode, rows16, panel = out[0].split()
        assert mode == want
        assert int(panel) == (0 if int(rows16) and want == "int8" else 32), out[0]
        for line in out[1:6]:
            m, exact_err, int8_err = line.split()
            if want == "int8" and (int(panel) == 0 or int(m) < int(panel)):
                assert float(int8_err) < 1e-6 < 1e-4 < float(exact_err), line
            else:
                assert float(exact_err) < 1e-6, line


def test_pair_tables_spec_rounds_each_chunk_on_its_own_scale(rng):
    """The 2-bit int8 mode's spec (flute.testing.pair_tables): each 32-column chunk's 256 entries on
    the scale max|v| / 127 of that chunk alone, integers of magnitude at most 127, and a chunk's
    largest entry exactly 127 steps; 2-bit weights through them stay within int8 rounding (~1%) of
    the exact product, not the exact product itself."""
    from flute.testing import pair_tables, reference_qgemm_pair
    x = torch.randn(3, 70, generator=rng)
    x[:, 32:64] *= 1e-3  # one chunk far below the others keeps its own resolution
    t = torch.randn(4, generator=rng)
    e = pair_tables(x, t).reshape(3, 3, 256)  # [rows, chunks, 16 pairs x 16 entries]
    step = e.abs().amax(-1, keepdim=True) / 127
    q = e / step
    assert torch.allclose(q, q.round(), atol=1e-3) and float(q.abs().max()) <= 127 + 1e-3
    exact = (t[torch.arange(16) & 3, None] * x[:, None, 0:64:2] + t[torch.arange(16) >> 2, None] * x[:, None, 1:64:2])
    assert torch.allclose(e[:, 1].reshape(3, 16, 16).double(), exact.permute(0, 2, 1)[:, 16:].double(),
                          rtol=0, atol=float(step[:, 1].max()) * 0.5 + 1e-12)
    w = random_quantized(40, 70, 2, 32, generator=rng)._replace(table=t)
    err = relative_error(reference_qgemm_pair(x, w, 32), reference_qgemm(x, w, 32))
    assert 1e-5 < err < 0.05, err


@pytest.fixture
def restore_tile_pairs():
    old = torch.ops.flute.cpu_tile_pairs()
    yield
    torch.ops.flute.cpu_set_tile_pairs(old)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tile_pairs_bitwise_equal_to_single_tiles(bits, int8_mode, restore_tile_pairs, rng):
    """At M = 1 the int8-mode kernels may read two tiles far apart in one pass (on by default on
    Intel CPUs only: cpu_tile_pairs, FLUTE_CPU_TILE_PAIRS); each row's sums are the same operations
    in the same order, so both ways give the same bits on every ISA and thread count, and the spec's
    result. The shapes hold several tiles per thread (pairs need two), an odd number of them, and
    a ragged last tile; with offsets the kernels never pair (equal all the same)."""
    isas = [i for i in ISAS if available(i)]
    try:
        for n, k, group, sdtype, offsets in [(203, 1100, 64, torch.bfloat16, False),
                                             (96, 512, 128, torch.float32, False),
                                             (131, 333, 32, torch.bfloat16, False),
                                             (64, 256, 64, torch.float16, True)]:
            w = random_quantized(n, k, bits, group, offsets=offsets, dtype=sdtype, generator=rng)
            x = torch.randn(1, k, generator=rng)
            q = to_cpu_layout(w.codes, bits)
            for isa in isas:
                ops.set_cpu_isa(isa)
                outs = []
                for pairs in (False, True):
                    assert torch.ops.flute.cpu_set_tile_pairs(pairs) is pairs
                    assert torch.ops.flute.cpu_tile_pairs() is pairs
                    outs += at_thread_counts(lambda: run(x, w, bits, group, n, k, q), [1, 2])
                case = (isa, n, k, group, sdtype, offsets)
                for y in outs[1:]:
                    assert torch.equal(y, outs[0]), case
                ref = reference_qgemm_int8(x, w, group, pair=int8_uses_pair_tables(bits, 1))
                assert normwise_error(outs[0], ref, x, w, group) < TOL[torch.float32], case
    finally:
        ops.set_cpu_isa("auto")


@pytest.fixture
def restore_compact_k():
    old = torch.ops.flute.cpu_compact_k()
    yield
    torch.ops.flute.cpu_set_compact_k(old)


@pytest.mark.parametrize("bits", [3, 4])
def test_compact_activations_bitwise_equal_to_plain(bits, int8_mode, restore_compact_k, restore_tile_pairs, rng):
    """One activation row with long rows takes the AVX-512 int8 kernel's compact activations
    (Int8Args::xkq: the chunk factors broadcast from a qword per part, each merge's start value
    computed per block): the same integers as the plain form, so the same bits at every threshold,
    thread count and tile-pair setting, and the spec's result; more rows never take it. Shapes:
    ragged last tiles and blocks (the half last block), groups of 64 (the fast scale path), 128, 96
    and one group, offsets, each scale dtype."""
    with pytest.raises(RuntimeError, match="positive"):
        torch.ops.flute.cpu_set_compact_k(0)
    assert torch.ops.flute.cpu_compact_k() == 4097  # rows longer than 4096 columns (CPU_NOTES item 144)
    isas = [i for i in ("avx512", "avx2") if available(i)]
    try:
        for n, k, group, sdtype, offsets, m in [(203, 1100, 64, torch.bfloat16, False, 1),
                                                (60, 4672, 64, torch.bfloat16, False, 1),
                                                (96, 896, 128, torch.float32, False, 1),
                                                (44, 576, 96, torch.bfloat16, False, 1),
                                                (37, 640, -1, torch.float16, False, 1),
                                                (64, 320, 64, torch.float16, True, 1),
                                                (24, 1024, 64, torch.bfloat16, False, 3)]:
            w = random_quantized(n, k, bits, group, offsets=offsets, dtype=sdtype, generator=rng)
            x = torch.randn(m, k, generator=rng)
            q = to_cpu_layout(w.codes, bits)
            ref = reference_qgemm_int8(x, w, group)
            for isa in isas:  # (the setting changes nothing on the other paths)
                ops.set_cpu_isa(isa)
                outs = []
                for compact_k in (1, 1 << 30):
                    torch.ops.flute.cpu_set_compact_k(compact_k)
                    for pairs in (False, True):
                        torch.ops.flute.cpu_set_tile_pairs(pairs)
                        outs += at_thread_counts(lambda: run(x, w, bits, group, n, k, q), [1, 2])
                case = (isa, n, k, group, sdtype, offsets, m)
                for y in outs[1:]:
                    assert torch.equal(y, outs[0]), case
                assert normwise_error(outs[0], ref, x, w, group) < TOL[torch.float32], case
    finally:
        ops.set_cpu_isa("auto")


@pytest.mark.parametrize("bits", [3, 4])
def test_int8_rows_of_a_batch_equal_one_row_calls(bits, int8_mode, rng):
    """Up to 4 activation rows at a time, the 4-row int8 kernels decode each tile once for all of
    them and reduce each row's sums as a one-row call does, so every row of a small batch (below
    the 16-row kernel's threshold, cpu_rows16_m) has the bits of that row alone: a decode step's
    result does not depend on what else is in its batch. Shapes: a ragged last tile and block,
    groups of 64 (the fast scale path), 128 and 32, offsets, long rows (compact activations at one
    row, the plain form at more), each scale dtype; 1 and 2 threads."""
    isas = [i for i in ("avx512", "avx2") if available(i)]
    try:
        for n, k, group, sdtype, offsets in [(203, 1100, 64, torch.bfloat16, False),
                                             (96, 512, 128, torch.float32, False),
                                             (37, 333, 32, torch.bfloat16, False),
                                             (64, 320, 64, torch.float16, True),
                                             (60, 4672, 64, torch.bfloat16, False)]:
            w = random_quantized(n, k, bits, group, offsets=offsets, dtype=sdtype, generator=rng)
            q = to_cpu_layout(w.codes, bits)
            x = torch.randn(9, k, generator=rng)
            for isa in isas:
                ops.set_cpu_isa(isa)
                rows16 = torch.ops.flute.cpu_rows16_m(bits)
                ms = [m for m in (2, 3, 4, 5, 9) if rows16 == 0 or m < rows16]
                assert ms, isa
                def calls():
                    one = torch.cat([run(x[i:i + 1], w, bits, group, n, k, q) for i in range(9)])
                    return one, [run(x[:m], w, bits, group, n, k, q) for m in ms]
                for t, (one, batches) in zip((1, 2), at_thread_counts(calls, [1, 2])):
                    for m, y in zip(ms, batches):
                        assert torch.equal(y, one[:m]), (isa, t, m, n, k, group, sdtype, offsets)
    finally:
        ops.set_cpu_isa("auto")


@pytest.fixture
def restore_vnni():
    old = ops.get_cpu_vnni()
    yield
    ops.set_cpu_vnni(old)


INT16_EVEX = "avx512bw_ymm"  # the int16 step EVEX encoded (AVX-512 CPUs)


def best_forms(forms):
    """(the best VNNI form or None, the best int16 form) among ``forms`` (get_cpu_vnni_forms)."""
    vnni = "avx512vnni_ymm" if "avx512vnni_ymm" in forms else "avxvnni" if "avxvnni" in forms else None
    return vnni, INT16_EVEX if INT16_EVEX in forms else ""


@pytest.mark.parametrize("bits", [3, 4])
def test_int8_every_avx2_form_bitwise_equal_to_the_vex_int16_form(bits, int8_mode, restore_vnni, rng):
    """The AVX2 int8 kernel's VNNI forms (int8_avx2_kernel.h: each merge's int32 sum starting at
    its correction, Int8Args::xinit, then one `vpdpwssd` per register) compute the int16 form's
    integers, and its EVEX build (kernel_int8_avx512bw_ymm.cpp) is the same source on more
    registers, so all their results are bitwise those of the VEX int16 build: every merge width
    (groups of 32, 64, 96, 128, one group), ragged last tiles and half last blocks (K = 544, 576),
    offsets, each scale and activation dtype, activation rows 1-5 and 17, 1 and 2 threads; each
    form the CPU has (all four on AVX-512 CPUs with AVX-VNNI, e.g. Zen 5; natively, or in the
    emulated AVX-512 build)."""
    if not available("avx2"):
        pytest.skip("this CPU lacks AVX2")
    forms = ops.get_cpu_vnni_forms()
    vnni, int16 = best_forms(forms)
    assert set(forms) <= {"avxvnni", "avx512vnni_ymm", INT16_EVEX}
    assert ops.get_cpu_vnni() == (vnni or int16)  # the default: the best form
    if vnni is None:
        with pytest.raises(RuntimeError, match="no VNNI form"):
            ops.set_cpu_vnni(True)
    if not forms:
        pytest.skip("this CPU (or build) has neither VNNI nor AVX-512")
    ops.set_cpu_isa("avx2")
    try:
        for n, k, group, sdtype, offsets, m, xdtype in [
                (203, 1000, 64, torch.bfloat16, False, 1, torch.bfloat16),
                (203, 1000, 32, torch.float32, False, 2, torch.float32),
                (96, 544, 128, torch.bfloat16, False, 3, torch.float32),
                (67, 576, 64, torch.float16, True, 4, torch.bfloat16),
                (44, 576, 96, torch.bfloat16, False, 5, torch.float16),
                (37, 640, -1, torch.float32, False, 17, torch.float32),
                (60, 4672, 64, torch.bfloat16, False, 1, torch.float32)]:
            w = random_quantized(n, k, bits, group, offsets=offsets, dtype=sdtype, generator=rng)
            x = (torch.randn(m, k, generator=rng) * torch.rand(1, k, generator=rng) * 4).to(xdtype)
            q = to_cpu_layout(w.codes, bits)
            outs = {}
            for form in [""] + forms:
                assert ops.set_cpu_vnni(form) == form == ops.get_cpu_vnni()
                outs[form] = at_thread_counts(lambda: run(x, w, bits, group, n, k, q), [1, 2])
            case = (n, k, group, sdtype, offsets, m, xdtype)
            for y in [y for f in forms for y in outs[f]] + outs[""][1:]:
                assert torch.equal(y, outs[""][0]), case
            assert normwise_error(outs[forms[0]][0], reference_qgemm_int8(x, w, group), x, w, group) < TOL[xdtype], case
    finally:
        ops.set_cpu_isa("auto")


def test_cpu_vnni_setting_by_name_and_default(restore_vnni):
    """``set_cpu_vnni``: True gives the best VNNI form (AVX512-VNNI on ymm where the CPU has both,
    for its 32 registers), False the best int16 form (EVEX encoded on AVX-512 CPUs), "" the VEX
    int16 form, a name that form; an unknown name, or a form the CPU lacks, raises naming the forms
    it has."""
    forms = ops.get_cpu_vnni_forms()
    vnni, int16 = best_forms(forms)
    assert ops.set_cpu_vnni(False) == int16 == ops.get_cpu_vnni()
    assert ops.set_cpu_vnni("") == "" == ops.get_cpu_vnni()
    with pytest.raises(RuntimeError, match="unknown form 'vnni512'"):
        ops.set_cpu_vnni("vnni512")
    for name in ("avxvnni", "avx512vnni_ymm", INT16_EVEX):
        if name in forms:
            assert ops.set_cpu_vnni(name) == name == ops.get_cpu_vnni()
        else:
            with pytest.raises(RuntimeError, match=f"'{name}' is not available"):
                ops.set_cpu_vnni(name)
    if vnni:
        assert ops.set_cpu_vnni(True) == vnni
    else:
        with pytest.raises(RuntimeError, match="no VNNI form"):
            ops.set_cpu_vnni(True)


def test_cpu_vnni_environment_variable_names_a_form():
    """``FLUTE_CPU_VNNI`` read at import: ``0`` the best int16 form, a form's name that form where
    the CPU has it; a name it lacks keeps the best form and warns, naming the forms there are."""
    code = "import flute; print(repr(flute.get_cpu_vnni()), flute.get_cpu_vnni_forms())"
    def run(value):
        env = dict(os.environ, FLUTE_CPU_VNNI=value)
        r = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                           timeout=120, check=True)
        return r.stdout.strip().splitlines()[-1], r.stderr
    forms = ops.get_cpu_vnni_forms()
    vnni, int16 = best_forms(forms)
    out, err = run("0")
    assert out.startswith(repr(int16) + " ") and "FLUTE_CPU_VNNI" not in err, out
    for name in forms:
        out, err = run(name)
        assert out.startswith(repr(name)) and "FLUTE_CPU_VNNI" not in err
    out, err = run("vnni512")
    assert out.startswith(repr(vnni or int16) + " "), out
    assert "FLUTE_CPU_VNNI='vnni512' names no form" in err, err

def _near_half_integer_activations(rows, bits, blocks, rng):
    """Activations whose quotients x / (k * u) (the int8 mode's rounding, as its spec computes k and
    u) lie on or within a few float32 steps of half-integers: where rounding x times the reciprocal
    of a chunk scale would differ from rounding x divided by it. Each 32-column chunk holds its max
    |x| once (chunk maxima within 100x of each other, so every k >= 81), the rest (n + 1/2) * scale,
    |n| <= 120, moved 0-3 float32 steps up or down."""
    cols = 128 if bits == 4 else 256
    cm = 10 ** (torch.rand(rows, blocks, cols // 32, generator=rng) * 2 - 1)
    bmax = cm.amax(-1, keepdim=True)
    d, u = bmax / 8191, bmax / 127 / 8191
    cs = (torch.ceil(cm / d).clamp(max=8191) * u).unsqueeze(-1)
    n = torch.randint(-120, 120, (rows, blocks, cols // 32, 32), generator=rng).float()
    x = (n + 0.5) * cs
    steps = torch.randint(-3, 4, x.shape, generator=rng)
    for s in range(3):
        x = torch.where(steps > s, torch.nextafter(x, torch.tensor(float("inf"))), x)
        x = torch.where(steps < -s, torch.nextafter(x, torch.tensor(float("-inf"))), x)
    x[..., 0] = cm * torch.where(torch.rand(cm.shape, generator=rng) < 0.5, -1.0, 1.0)
    return x.reshape(rows, blocks * cols)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_rounding_near_half_integers_matches_spec(bits, int8_mode, rng):
    """Every quantizer (AVX-512, AVX2, portable, the 16-row kernel's) rounds x / (k * u) as the spec
    does, ties to even: with every activation's quotient on or a few float32 steps from a
    half-integer, each ISA path and 1, 2 and 8 activation rows (one-row calls take the AVX-512
    quantizer where it runs, 8 rows the 16-row kernel's; 2 bits only there, their smaller batches
    run on pair tables) give the spec's integers. One activation rounded the other way moves the
    result by ~1e-4 of its norm, 10x the tolerance; rounding x times the reciprocal of the scale
    instead of dividing fails this test (CPU_NOTES item 238), and random activations would hardly
    ever show it."""
    k = 3 * (128 if bits == 4 else 256)
    w = random_quantized(96, k, bits, 64, dtype=torch.float32, generator=rng)
    q = to_cpu_layout(w.codes, bits)
    rows16 = torch.ops.flute.cpu_rows16_m(bits)
    if bits == 2 and not 0 < rows16 <= 8:
        pytest.skip("2 bits compute with the int8 activations only on the 16-row kernel")
    for m in (8,) if bits == 2 else (1, 2, 8):
        x = _near_half_integer_activations(m, bits, 3, rng)
        ref = reference_qgemm_int8(x, w, 64)
        for isa in ["auto"] if bits == 2 else [i for i in ISAS if available(i)]:
            ops.set_cpu_isa(isa)
            try:
                err = normwise_error(run(x, w, bits, 64, 96, k, q), ref, x, w, 64)
            finally:
                ops.set_cpu_isa("auto")
            assert err < 1e-5, (isa, bits, m, err)
