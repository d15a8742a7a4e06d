"""The CPU kernel's AMX paths (csrc/cpu/kernel_amx.cpp): bf16 activations from 16 rows, streamed
(gemm_amx, up to 64 rows) or blocked (gemm_amx_rows, more)."""
import itertools
import subprocess
import sys

import pytest
import torch

from flute import ops
from flute.cpu_layout import to_cpu_layout
from flute.testing import random_quantized, reference_qgemm, relative_error

pytestmark = pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built")
needs_amx = pytest.mark.skipif(not ops.get_cpu_amx(), reason="no AMX-BF16 tiles on this CPU")


def both_paths(x, w, bits, group, n, k):
    """(AMX, panel or fused path) outputs of one call; the AMX state is restored."""
    q = to_cpu_layout(w.codes, bits)
    args = (q, w.scales, w.offsets, w.table, bits, group, k, n)
    try:
        ops.set_cpu_amx(True)
        ya = torch.ops.flute.qgemm(x, *args)
        ops.set_cpu_amx(False)
        yo = torch.ops.flute.qgemm(x, *args)
    finally:
        ops.set_cpu_amx(True)
    return ya, yo


@needs_amx
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits,group,offsets", [
    (b, g, o) for b, g, o in itertools.product([2, 3, 4], [32, 64, 128, -1], [False, True])])
def test_amx_matches_reference(bits, group, offsets, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # odd N and K (row and column padding); the streamed path (16-64 rows) and the blocked
        # one: an odd number of 16-row blocks (65, 81), rows split across tasks (13 x 100 at 300
        # rows), several 128-row blocks with a short last one (300 x 2600, 97 rows) and K beyond
        # one 2048-column K block (2600)
        for (n, k), m in [((37, 300), 16), ((130, 515), 17), ((64, 256), 64), ((13, 100), 65),
                          ((40, 333), 81), ((300, 2600), 97), ((13, 100), 300)]:
            w = random_quantized(n, k, bits, group, offsets=offsets, dtype=torch.bfloat16,
                                 seed=1000 * bits + n + k + m)
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(torch.bfloat16)
            ref = reference_qgemm(x, w, group)
            ya, yo = both_paths(x, w, bits, group, n, k)
            assert ya.dtype == torch.bfloat16 and ya.shape == (m, n)
            err_a, err_o = relative_error(ya, ref), relative_error(yo, ref)
            # bf16 weights and output: the same rounding as the panel path, never much worse
            assert err_a < 1e-2, (n, k, m, err_a)
            assert err_a <= 1.5 * err_o + 1e-3, (n, k, m, err_a, err_o)
    finally:
        torch.set_num_threads(old)


@needs_amx
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_amx_long_k_blocks_of_256_rows(bits):
    """Beyond K = 4096 the blocked path takes 256 weight rows per task where that splits as evenly
    (fused_gemm.cpp: 1024 rows at 1 and 2 threads): matches the reference, with the K blocks and
    the ragged last one (4160 = 4 x 1024 + 64), and is bitwise equal across thread counts."""
    n, k, m = 1024, 4160, 70
    w = random_quantized(n, k, bits, 64, offsets=bits == 3, dtype=torch.bfloat16, seed=77 + bits)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)
    ref = reference_qgemm(x, w, 64)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            ya, yo = both_paths(x, w, bits, 64, n, k)
            err_a, err_o = relative_error(ya, ref), relative_error(yo, ref)
            assert err_a < 1e-2 and err_a <= 1.5 * err_o + 1e-3, (t, err_a, err_o)
            outs.append(ya)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


@needs_amx
@pytest.mark.parametrize("m", [48, 200])
def test_amx_deterministic_across_threads_and_calls(m):
    """Bitwise equal across calls and thread counts (the blocked path's task split, which depends
    on the thread count, never changes the order of a sum)."""
    w = random_quantized(300, 2500, 4, 64, dtype=torch.bfloat16, seed=3)
    x = torch.randn(m, 2500).to(torch.bfloat16)
    q = to_cpu_layout(w.codes, 4)
    outs = []
    old = torch.get_num_threads()
    try:
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            outs.append(torch.ops.flute.qgemm(x, q, w.scales, None, w.table, 4, 64, 2500, 300))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_amx
def test_amx_leaves_other_dtypes_and_sizes_alone():
    """fp32 and fp16 activations and bf16 ones under 16 rows never take an AMX path: their results
    do not depend on the switch."""
    w = random_quantized(70, 256, 4, 64, dtype=torch.bfloat16, seed=5)
    for dtype, m in [(torch.float32, 32), (torch.float16, 32), (torch.float32, 300), (torch.bfloat16, 15)]:
        x = torch.randn(m, 256).to(dtype)
        ya, yo = both_paths(x, w, 4, 64, 70, 256)
        assert torch.equal(ya, yo), (dtype, m)
    # and a bf16 batch inside the range does take it: at 20 rows the other path is the int8 mode
    x = torch.randn(20, 256).to(torch.bfloat16)
    ya, yo = both_paths(x, w, 4, 64, 70, 256)
    assert not torch.equal(ya, yo)
    # 2 bits (the pair layout) take it too, streamed and blocked; under 16 rows they do not. In
    # the int8 mode, since at 100 rows the exact mode's other path is the bf16 panel path, whose
    # weights and output round as the blocked AMX kernel's (equal bits at K = 256)
    w2 = random_quantized(70, 256, 2, 64, dtype=torch.bfloat16, seed=6)
    mode = ops.get_cpu_mode()
    try:
        ops.set_cpu_mode("int8")
        for m, taken in ((20, True), (100, True), (15, False)):
            x = torch.randn(m, 256).to(torch.bfloat16)
            ya, yo = both_paths(x, w2, 2, 64, 70, 256)
            assert torch.equal(ya, yo) != taken, m
    finally:
        ops.set_cpu_mode(mode)


def test_set_cpu_amx_state_and_error():
    if ops.get_cpu_amx():
        assert ops.set_cpu_amx(False) is False and ops.get_cpu_amx() is False
        assert ops.set_cpu_amx(True) is True and ops.get_cpu_amx() is True
    else:
        with pytest.raises(RuntimeError, match="AMX"):
            ops.set_cpu_amx(True)
        assert ops.set_cpu_amx(False) is False


@needs_amx
def test_amx_env_switch_off():
    code = "import flute; print(flute.get_cpu_amx())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "FLUTE_CPU_AMX": "0"})
    assert out.stdout.strip() == "False"
