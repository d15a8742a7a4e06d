"""The CPU lookup-table kernel (flute._cpu) against the float64 reference, on every ISA path."""
import os
import random
import subprocess
import sys
import zlib

import pytest
import torch

import flute
from flute import ops
from flute.cpu_layout import to_cpu_layout
from flute.format import dequantize_codes
from flute.testing import (int8_uses_pair_tables, random_quantized, reference_qgemm,
                           reference_qgemm_int8, relative_error)

from cpu_kernel_common import (ISAS, TOL, at_thread_counts, available, isa, normwise_error, run,  # noqa: F401
                                threads)  # isa, threads: fixtures

pytestmark = pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built")


def fuzz_cases(seed, count):
    r = random.Random(seed)
    for _ in range(count):
        bits = r.choice([2, 3, 4])
        n, k = r.choice([1, 3, 17, 40, 67]), r.choice([1, 31, 64, 130, 333, 576])
        group = r.choice([32, 64, 128, 256, -1, 48, 100])  # 48, 100: not multiples of 32
        yield dict(bits=bits, n=n, k=k, group=group, offsets=r.random() < 0.5,
                   table=r.choice(["random", "uniform", "sdtype"]),
                   dtype=r.choice([torch.float32, torch.bfloat16, torch.float16]),
                   sdtype=r.choice([torch.float32, torch.bfloat16, torch.float16]),
                   m=r.choice([0, 1, 2, 3, 5, 8, 16, 17, 300]), noncontig=r.random() < 0.3)


def check_case(c, g):
    bits, n, k, group = c["bits"], c["n"], c["k"], c["group"]
    w = random_quantized(n, k, bits, group, offsets=c["offsets"], dtype=c["sdtype"], generator=g)
    if c["table"] == "uniform":
        w = w._replace(table=torch.linspace(-1, 1, 2 ** bits))
    elif c["table"] == "sdtype":  # a table in another float dtype
        w = w._replace(table=w.table.to(c["sdtype"]))
    m = c["m"]
    if c["noncontig"]:
        x = torch.randn(k, 2 * m + 1, generator=g).to(c["dtype"]).t()[:2 * m:2]  # strided rows/cols
    else:
        x = torch.randn(m, k, generator=g).to(c["dtype"])
    y = run(x, w, bits, group, n, k)
    assert y.dtype == c["dtype"] and y.shape == (m, n), c
    if m == 0:
        return
    err = normwise_error(y, reference_qgemm(x, w, group), x, w, group)
    assert err < TOL[c["dtype"]], (c, err)


def test_fuzz_every_isa_and_thread_count(isa, threads):
    g = torch.Generator().manual_seed(7)
    # crc32, not hash(): str hashes change with PYTHONHASHSEED, so hash() drew new cases every run.
    for c in fuzz_cases(zlib.crc32(f"{isa}-{threads}".encode()), 45):
        check_case(c, g)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 300])
def test_larger_layer_fp32_exact(bits, m, isa, rng):
    n, k, group = 203, 1000, 64  # odd N, ragged last group (1000 = 15 * 64 + 40)
    w = random_quantized(n, k, bits, group, offsets=(bits == 3), generator=rng)
    x = torch.randn(m, k, generator=rng)
    assert relative_error(run(x, w, bits, group, n, k), reference_qgemm(x, w, group)) < 1e-5


def test_leading_dims_and_group_minus_one(rng):
    n, k, bits = 40, 250, 4
    w = random_quantized(n, k, bits, -1, offsets=True, generator=rng)
    x = torch.randn(2, 3, 5, k, generator=rng)
    y = run(x, w, bits, -1, n, k)
    assert y.shape == (2, 3, 5, n)
    assert relative_error(y.reshape(-1, n), reference_qgemm(x.reshape(-1, k), w, -1)) < 1e-5


@pytest.mark.parametrize("m", [1, 5, 16])
def test_bitwise_deterministic_across_calls_and_threads(m, isa, rng):
    n, k, bits, group = 301, 777, 3, 128
    w = random_quantized(n, k, bits, group, offsets=True, generator=rng)
    x = torch.randn(m, k, generator=rng)
    q = to_cpu_layout(w.codes, bits)
    outs = at_thread_counts(lambda: run(x, w, bits, group, n, k, q), (1, 2, 1, 2))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("mode", ["exact", "int8"])
def test_work_stealing_tile_split_is_bitwise_the_one_thread_result(mode, bits, rng):
    """Layers large enough for the stealing split (each thread streams its own share of the row
    tiles in steps and takes the back half of another's when done: 2403 rows x 4096 columns, 601
    tiles at 4 bits) give the 1-thread bits call after call, at 2 threads and at 3 and 5 threads on
    this machine's cores (more threads than cores: descheduled threads leave shares to steal), for
    float32 and bfloat16 activations, and match the reference; with tile pairs on and off (on, the
    AVX-512 int8 kernel reads each step's two halves at once; 2405 rows: an odd number of whole
    tiles, so a step's range may end on a tile left alone)."""
    k, group = 4096, 64
    pairs_were = torch.ops.flute.cpu_tile_pairs()
    ops.set_cpu_mode(mode)
    try:
        for n, pairs in ((2403, True), (2403, False), (2405, True)):
            torch.ops.flute.cpu_set_tile_pairs(pairs)
            w = random_quantized(n, k, bits, group, generator=rng)
            x = torch.randn(1, k, generator=rng)
            q = to_cpu_layout(w.codes, bits)
            outs = at_thread_counts(lambda: run(x, w, bits, group, n, k, q), (1, 2, 2, 3, 5, 5, 2))
            outs_bf16 = at_thread_counts(lambda: run(x.bfloat16(), w, bits, group, n, k, q), (1, 2, 5, 3))
            assert all(torch.equal(outs[0], o) for o in outs[1:]), (n, pairs)
            assert all(torch.equal(outs_bf16[0], o) for o in outs_bf16[1:]), (n, pairs)
            ref = reference_qgemm_int8(x, w, group) if mode == "int8" else reference_qgemm(x, w, group)
            assert relative_error(outs[0], ref) < 1e-5, (n, pairs)
    finally:
        ops.set_cpu_mode("exact")
        torch.ops.flute.cpu_set_tile_pairs(pairs_were)


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_cpu_layout(bits, sdtype, isa, rng):
    n, k = 37, 300
    for group in (64, 100, -1):
        w = random_quantized(n, k, bits, group, offsets=True, dtype=sdtype, generator=rng)
        got = torch.ops.flute.dequantize(to_cpu_layout(w.codes, bits), w.scales, w.offsets, w.table,
                                         bits, group, k, n)
        want = dequantize_codes(w.codes, w.scales, w.offsets, w.table, group).to(sdtype)
        assert got.dtype == sdtype and got.shape == (n, k)
        assert torch.allclose(got.float(), want.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits,k", [(3, 296), (3, 356), (3, 456), (3, 40), (4, 168), (4, 228), (4, 60)])
def test_short_last_block_on_every_path(bits, k, isa, rng):
    """K whose last block holds 1-64 columns (3 bits: 32 bytes a row's last block; 4 bits: 32),
    65-128 (3 bits: 48), more (whole), and a single short block: every reader of the layout (the
    int8 mode's 4-row kernels at 1 and 5 rows and 16-row kernel, the AMX kernels for bf16 from 16
    rows, the exact mode's kernels, the dequantize) against the reference on that ISA path."""
    n = 37
    w = random_quantized(n, k, bits, 64, offsets=True, dtype=torch.bfloat16, generator=rng)
    q = to_cpu_layout(w.codes, bits)
    deq = torch.ops.flute.dequantize(q, w.scales, w.offsets, w.table, bits, 64, k, n)
    want = dequantize_codes(w.codes, w.scales, w.offsets, w.table, 64).to(torch.bfloat16)
    assert torch.equal(deq, want), (bits, k)
    old = ops.get_cpu_mode()
    try:
        for mode in ("int8", "exact"):
            ops.set_cpu_mode(mode)
            for m, dtype in ((1, torch.float32), (5, torch.float32), (16, torch.float32), (1, torch.bfloat16),
                             (16, torch.bfloat16), (70, torch.bfloat16)):
                x = torch.randn(m, k, generator=rng).to(dtype)
                y = run(x, w, bits, 64, n, k, q)
                ref = reference_qgemm_int8(x, w, 64) if mode == "int8" and m < 32 else reference_qgemm(x, w, 64)
                tol = TOL[dtype] if mode == "exact" or m < 16 or dtype == torch.float32 else 1e-2
                assert normwise_error(y, ref, x, w, 64) < tol, (bits, k, mode, m, dtype)
    finally:
        ops.set_cpu_mode(old)


def test_stale_weight_after_in_place_copy(rng):
    """No cache: after qweight.copy_(other) the op computes with the new codes (both layouts)."""
    n, k, bits, group = 24, 128, 4, 64
    a = random_quantized(n, k, bits, group, generator=rng)
    b = a._replace(codes=(a.codes + 5) % 16)
    x = torch.randn(2, k, generator=rng)
    from flute.layout import to_kernel_layout
    for layout in (to_cpu_layout, to_kernel_layout):
        q = layout(a.codes, bits)
        y1 = torch.ops.flute.qgemm(x, q, a.scales, None, a.table, bits, group, k, n)
        q.copy_(layout(b.codes, bits))
        y2 = torch.ops.flute.qgemm(x, q, a.scales, None, a.table, bits, group, k, n)
        assert relative_error(y1, reference_qgemm(x, a, group)) < 1e-5
        assert relative_error(y2, reference_qgemm(x, b, group)) < 1e-5


def test_forward_inside_and_after_inference_mode(rng):
    lin = torch.nn.Linear(192, 40)
    q = flute.QuantLinear.from_linear(lin, 4, 64)
    assert q.qweight.dtype == torch.uint8
    x = torch.randn(3, 192, generator=rng)
    with torch.inference_mode():
        y_inf = q(x)
        y_inf2 = q(x)
    y = q(x)
    assert torch.equal(y_inf, y) and torch.equal(y_inf2, y)
    with torch.inference_mode():  # a module built under inference mode too
        q2 = flute.QuantLinear.from_linear(lin, 4, 64)
        assert torch.equal(q2(x), y)
    assert torch.equal(q2(x), y)


def test_gradient_through_the_cpu_layout(rng):
    n, k, bits, group = 40, 96, 4, 32
    w = random_quantized(n, k, bits, group, generator=rng)
    x = torch.randn(3, k, generator=rng, requires_grad=True)
    gy = torch.randn(3, n, generator=rng)
    (run(x, w, bits, group, n, k) * gy).sum().backward()
    wt = dequantize_codes(w.codes, w.scales, None, w.table, group)
    assert torch.allclose(x.grad, gy @ wt, atol=1e-5, rtol=1e-5)


def test_opcheck_and_fake_with_the_cpu_layout(rng):
    n, k, bits, group = 48, 96, 3, 32
    w = random_quantized(n, k, bits, group, offsets=True, generator=rng)
    args = (torch.randn(4, k, generator=rng), to_cpu_layout(w.codes, bits), w.scales, w.offsets,
            w.table, bits, group, k, n)
    torch.library.opcheck(torch.ops.flute.qgemm, args)
    torch.library.opcheck(torch.ops.flute.dequantize, args[1:])
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        y = torch.ops.flute.qgemm(torch.empty(5, 7, k, dtype=torch.bfloat16),
                                  torch.empty(args[1].shape, dtype=torch.uint8), torch.empty(n, 3),
                                  None, torch.empty(8), bits, group, k, n)
        assert y.shape == (5, 7, n) and y.dtype == torch.bfloat16


def test_errors_name_the_layout(rng):
    n, k, bits, group = 32, 128, 4, 64
    w = random_quantized(n, k, bits, group, generator=rng)
    q = to_cpu_layout(w.codes, bits)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match=r"uint8 of shape \(2048,\) \(the CPU layout of a 32x128"):
        torch.ops.flute.qgemm(x, q[:-1], w.scales, None, w.table, bits, group, k, n)
    with pytest.raises(ValueError, match="int32 of shape .* or uint8 of shape"):
        torch.ops.flute.qgemm(x, q.long(), w.scales, None, w.table, bits, group, k, n)
    # the Python CUDA path (no flute._C) refuses the CPU layout by name
    with pytest.raises(ValueError, match="uint8, the CPU layout"):
        ops._qgemm_cuda_fallback(x, q, w.scales, None, w.table, bits, group, k, n)


def test_reference_fallback_without_the_extension(monkeypatch, rng):
    n, k, bits, group = 20, 100, 2, 32
    w = random_quantized(n, k, bits, group, offsets=True, generator=rng)
    x = torch.randn(3, k, generator=rng)
    fast = run(x, w, bits, group, n, k)
    monkeypatch.setattr(ops, "HAS_CPU_KERNEL", False)
    slow = run(x, w, bits, group, n, k)  # uint8 layout decoded in pure torch
    assert relative_error(slow, fast) < 1e-6


@pytest.fixture
def bf16_mode():
    if not torch.ops.flute.cpu_has_bf16():
        pytest.skip("this CPU lacks AVX512_BF16 or VBMI: the bf16 mode computes exactly")
    ops.set_cpu_isa("avx512")
    ops.set_cpu_mode("bf16")
    yield
    ops.set_cpu_mode("exact")
    ops.set_cpu_isa("auto")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bf16_mode_close_and_deterministic(bits, bf16_mode, rng):
    """Opt-in bf16 mode: activations and table values rounded to bf16, fp32 sums: about the error
    of torch's bf16 matmul; still bitwise deterministic across calls and thread counts."""
    n, k = 67, 1000
    for group, offsets, m in [(64, False, 1), (128, True, 2), (-1, True, 3), (64, True, 16)]:
        w = random_quantized(n, k, bits, group, offsets=offsets, generator=rng)
        x = torch.randn(m, k, generator=rng).bfloat16()
        q = to_cpu_layout(w.codes, bits)
        y = run(x, w, bits, group, n, k, q)
        assert relative_error(y, reference_qgemm(x, w, group)) < 1e-2
        (y2,) = at_thread_counts(lambda: run(x, w, bits, group, n, k, q), (2,))
        assert torch.equal(y, y2)
    assert ops.get_cpu_mode() == "bf16"
    with pytest.raises(RuntimeError, match="unknown CPU mode"):
        ops.set_cpu_mode("int3")


def test_a_missing_extension_is_reported_as_not_built(tmp_path):
    import importlib.machinery
    exc = ImportError("cannot import name '_cpu' from partially initialized module 'flute' "
                      "(most likely due to a circular import)")
    assert ops.cpu_extension_file(str(tmp_path)) is None
    msg = ops.cpu_extension_error(exc, str(tmp_path))
    assert msg.startswith("not built") and "circular" not in msg
    (tmp_path / ("_cpu" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    assert ops.cpu_extension_file(str(tmp_path)).startswith(str(tmp_path))
    assert ops.cpu_extension_error(OSError("bad ELF"), str(tmp_path)) == "OSError: bad ELF"
    if ops.HAS_CPU_KERNEL:  # this install's own extension is found
        assert ops.cpu_extension_file(os.path.dirname(ops.__file__)) is not None


def test_import_without_the_extension_warns_once_and_falls_back():
    code = ("import sys, warnings; sys.modules['flute._cpu'] = None\n"
            "import torch, flute\n"
            "from flute.testing import random_quantized, reference_qgemm, relative_error\n"
            "lin = flute.QuantLinear.from_linear(torch.nn.Linear(64, 8), 4, 32)\n"
            "assert lin.qweight.dtype == torch.int32 and flute.ops.get_cpu_isa() == 'reference'\n"
            "x = torch.randn(2, 64)\n"
            "assert torch.allclose(lin(x), x @ lin.dequantize().t() + lin.bias, atol=1e-5)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    lines = [ln for ln in out.stderr.splitlines() if "flute._cpu not available" in ln]
    assert len(lines) == 1, out.stderr


def test_isa_selection():
    assert ops.get_cpu_isa() in ("avx512", "avx2", "portable")
    with pytest.raises(RuntimeError, match="unknown CPU ISA"):
        ops.set_cpu_isa("sse9")
    best = ops.set_cpu_isa("auto")
    assert ops.set_cpu_isa("portable") == "portable" == ops.get_cpu_isa()
    assert ops.set_cpu_isa("auto") == best
    env = dict(os.environ, FLUTE_CPU_ISA="portable")
    code = "import torch, flute._cpu; print(torch.ops.flute.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "portable"


def test_panel_path_many_panels_match_the_reference():
    """The panel path (M >= 32) writes each decoded panel's product into its columns of the
    output (an ldc of N) from a panel buffer kept between calls. With 64 KB panels
    (FLUTE_CPU_PANEL_KB, read once per process) and 32 rows (at most N / 128 panels), a
    1000 x 200 weight takes 7 panels of 144 (fp32) or 164 rows (bf16), the last one shorter:
    every column of every panel, fp32 / bf16 / fp16
    activations (AMX off, so that bf16 takes bf16 panels too), with offsets, and a larger weight
    then a smaller one again (the kept buffer reused), against the float64 reference."""
    code = """
import torch, flute
from flute.testing import random_quantized, reference_qgemm, relative_error
from flute.cpu_layout import to_cpu_layout
g = torch.Generator().manual_seed(3)
worst = {}
for n, k in ((1000, 200), (1500, 200), (1000, 200)):
    for bits in (2, 3, 4):
        w = random_quantized(n, k, bits, 64, offsets=bits == 3, dtype=torch.bfloat16, generator=g)
        q = to_cpu_layout(w.codes, bits)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(32, k, generator=g).to(dtype)
            y = torch.ops.flute.qgemm(x, q, w.scales, w.offsets, w.table, bits, 64, k, n)
            assert y.shape == (32, n) and y.dtype == dtype
            e = relative_error(y, reference_qgemm(x, w, 64))
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), e)
print(worst)
"""
    env = dict(os.environ, FLUTE_CPU_PANEL_KB="64", FLUTE_CPU_AMX="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    worst = eval(out.stdout.strip().splitlines()[-1])
    assert worst["torch.float32"] < TOL[torch.float32], worst
    assert worst["torch.float16"] < TOL[torch.float16], worst
    assert worst["torch.bfloat16"] < TOL[torch.bfloat16], worst


@pytest.mark.parametrize("mode", ["int8", "exact"])
def test_call_scratch_reused_across_sizes(mode, rng):
    """The per-thread scratch (activations, fp32 output of bf16 calls) grows, shrinks and is
    reused call after call; an output above its 16 MB cache (31 x 135300 fp32) comes from a
    tensor. Every call matches the reference, so no call reads another's leftovers."""
    old = ops.get_cpu_mode()
    ops.set_cpu_mode(mode)
    ref = reference_qgemm_int8 if mode == "int8" else reference_qgemm
    try:
        sizes = [(1, 37, 192), (5, 301, 777), (1, 37, 192), (31, 135300, 40), (3, 64, 130)]
        for m, n, k in sizes if mode == "int8" else sizes[:3]:
            w = random_quantized(n, k, 4, 64 if k % 64 == 0 else -1, generator=rng)
            g = 64 if k % 64 == 0 else -1
            x = torch.randn(m, k, generator=rng).to(torch.bfloat16)
            y = run(x, w, 4, g, n, k)
            assert y.dtype == torch.bfloat16 and y.shape == (m, n)
            assert relative_error(y.float(), ref(x.float(), w, g)) < 1e-2, (mode, m, n, k)
    finally:
        ops.set_cpu_mode(old)


@pytest.mark.parametrize("mode", ["int8", "exact"])
def test_bf16_output_is_the_fp32_result_rounded(isa, mode, rng):
    """bf16 activations give the fp32 result of the same values rounded to nearest even (the
    output conversion is vectorized on AVX2: 16 at a time, then a scalar tail)."""
    old = ops.get_cpu_mode()
    ops.set_cpu_mode(mode)
    try:
        for n, m in [(37, 1), (16, 3), (5, 2)]:
            w = random_quantized(n, 192, 4, 64, generator=rng)
            xb = torch.randn(m, 192, generator=rng).to(torch.bfloat16)
            y = run(xb, w, 4, 64, n, 192)
            assert y.dtype == torch.bfloat16
            assert torch.equal(y, run(xb.float(), w, 4, 64, n, 192).to(torch.bfloat16)), (n, m)
    finally:
        ops.set_cpu_mode(old)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decode_bitwise_equal_on_every_path(bits, rng):
    """The panel path's decode (fp32 and bf16 out) gives the portable path's bits on every ISA:
    ragged K (a last chunk of 28 columns), one group, groups of several chunks, groups splitting a
    chunk (48: the 2-bit decoder's general path; whole-chunk groups take its fast one), offsets, a tile of fewer
    than 16 rows and several tiles."""
    k = 700
    for n, group, sdtype in [(13, 64, torch.float32), (13, 64, torch.bfloat16), (13, -1, torch.bfloat16),
                             (13, 32, torch.float16), (37, 128, torch.bfloat16), (37, 128, torch.float32),
                             (21, 48, torch.bfloat16)]:
        w = random_quantized(n, k, bits, group, offsets=True, dtype=sdtype, generator=rng)
        q = to_cpu_layout(w.codes, bits)
        outs = {}
        for isa in ISAS:
            if available(isa):
                ops.set_cpu_isa(isa)
                outs[isa] = torch.ops.flute.cpu_lut_dequantize(q, w.scales, w.offsets, w.table, bits,
                                                               group, k, n)
        ops.set_cpu_isa("auto")
        for isa, out in outs.items():
            assert torch.equal(out, outs["portable"]), (isa, n, group, sdtype)


@pytest.mark.parametrize("mode", ["int8", "exact"])
def test_pair_layout_kernels_equal_bitwise_on_every_path(mode, rng):
    """2 bits run on the pair layout (csrc/cpu/pair_lut.h), whose portable, AVX2 and AVX-512 kernels
    make the same float operations in the same order: the same bits on every ISA and thread count,
    equal to the spec (int8 mode: the pair tables of reference_qgemm_pair). The cases cover a tile
    with fewer than 16 rows, several tiles (read two at once at M = 1 where tile pairs are on; both
    ways: test_tile_pairs_bitwise_equal_to_single_tiles),
    K blocks (17 rows: 30 chunks of the tables per block, so K = 1100 takes two), a ragged last
    chunk, groups spanning several chunks or one, every scale dtype and offsets. Batches that the
    AVX-512 path runs on the 16-row kernel instead (int8 mode, from cpu_rows16_m(2) rows) are left
    to test_int8_rows16_kernel_matches_spec_and_portable."""
    old_mode = ops.get_cpu_mode()
    ops.set_cpu_mode(mode)
    isas = [i for i in ISAS if available(i)]
    try:
        for n, k, group, m, sdtype, offsets in [(5, 33, 32, 1, torch.float32, False),
                                                (203, 1100, 64, 17, torch.bfloat16, True),
                                                (203, 1100, 64, 1, torch.bfloat16, False),
                                                (64, 512, 128, 2, torch.float16, True),
                                                (33, 300, -1, 3, torch.bfloat16, False),
                                                (48, 96, 96, 31, torch.float32, True),
                                                (40, 1100, 64, 1, "bf16 x", False),
                                                (40, 67, 32, 1, "bf16 x", False)]:
            # "bf16 x": bf16 activations, widened to fp32 before the tables are built (a ragged last
            # chunk at K = 1100 and 67)
            bf16_x = sdtype == "bf16 x"
            if bf16_x:
                sdtype = torch.bfloat16
            w = random_quantized(n, k, 2, group, offsets=offsets, dtype=sdtype, generator=rng)
            x = torch.randn(m, k, generator=rng)
            if bf16_x:
                x = x.to(torch.bfloat16)
            q = to_cpu_layout(w.codes, 2)
            outs = []
            for isa in isas:
                ops.set_cpu_isa(isa)
                if mode == "int8" and not int8_uses_pair_tables(2, m):
                    continue
                outs += at_thread_counts(lambda: run(x, w, 2, group, n, k, q), [1, 2])
            ops.set_cpu_isa("auto")
            case = (mode, n, k, group, m, sdtype, offsets)
            for y in outs[1:]:
                assert torch.equal(y, outs[0]), case
            ref = reference_qgemm_int8(x, w, group, pair=True) if mode == "int8" else reference_qgemm(x, w, group)
            assert normwise_error(outs[0], ref, x, w, group) < TOL[x.dtype], case
            if bf16_x:  # the same tables as from the fp32 copy of the row: its result, rounded once
                assert torch.equal(outs[0], run(x.float(), w, 2, group, n, k, q).to(torch.bfloat16)), case
    finally:
        ops.set_cpu_isa("auto")
        ops.set_cpu_mode(old_mode)


def test_pair_tables_edge_values_equal_on_every_path(rng):
    """The AVX-512 pair-table builder takes a chunk's max |entry| from the table's largest and
    smallest entries rather than from all 256 entries (kernel_pair_avx512.cpp), which is exact
    because rounding is monotonic. Chunks of zeros, of negative zeros, with one nonzero column, of
    one sign, of large and of subnormal values, with tables of one sign or with repeated entries
    give the portable builder's bits. (Sums past float32's range, where the builder falls back to
    the entries themselves, differ between the paths as they did before: NaN against -inf.)"""
    old_mode = ops.get_cpu_mode()
    ops.set_cpu_mode("int8")
    isas = [i for i in ISAS if available(i)]
    n, k, group = 40, 320, 64
    x = torch.randn(1, k, generator=rng)
    x[0, 0:32] = 0.0
    x[0, 32:64] = -0.0
    x[0, 64:96] = 0.0
    x[0, 70] = -1.5
    x[0, 96:128] = x[0, 96:128].abs()
    x[0, 128:160] = -x[0, 128:160].abs()
    x[0, 160:192] *= 1e30
    x[0, 200:232] *= 1e-39  # subnormal products
    tables = [None, torch.tensor([0.1, 0.25, 0.5, 1.0]), torch.tensor([-1.0, -0.5, -0.25, -0.1]),
              torch.tensor([0.5, 0.5, -0.5, -0.5]), torch.tensor([0.0, 0.0, 0.0, 1.0])]
    try:
        for table in tables:
            w = random_quantized(n, k, 2, group, generator=rng)
            if table is not None:
                w = w._replace(table=table)
            q = to_cpu_layout(w.codes, 2)
            outs = []
            for isa_name in isas:
                ops.set_cpu_isa(isa_name)
                outs += at_thread_counts(lambda: run(x, w, 2, group, n, k, q), [1, 2])
            ops.set_cpu_isa("auto")
            assert all(torch.equal(y, outs[0]) for y in outs[1:]), table
            ref = reference_qgemm_int8(x, w, group, pair=True)
            assert normwise_error(outs[0], ref, x, w, group) < TOL[torch.float32], table
    finally:
        ops.set_cpu_isa("auto")
        ops.set_cpu_mode(old_mode)

