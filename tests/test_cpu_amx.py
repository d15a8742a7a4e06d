"""The CPU kernel's AMX path (csrc/cpu/kernel_amx.cpp): bf16 activations, 16 to 192 rows."""
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
        # odd N and K (row and column padding), one pass (16-80 rows) and two (81-160 rows)
        for (n, k), m in [((37, 300), 16), ((130, 515), 17), ((64, 256), 80), ((13, 100), 81),
                          ((40, 333), 192)]:
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
def test_amx_deterministic_across_threads_and_calls():
    w = random_quantized(300, 1000, 4, 64, dtype=torch.bfloat16, seed=3)
    x = torch.randn(48, 1000).to(torch.bfloat16)
    q = to_cpu_layout(w.codes, 4)
    outs = []
    old = torch.get_num_threads()
    try:
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            outs.append(torch.ops.flute.qgemm(x, q, w.scales, None, w.table, 4, 64, 1000, 300))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_amx
def test_amx_leaves_other_dtypes_and_sizes_alone():
    """fp32 activations, and bf16 ones outside 16..192 rows, never take the AMX path: their
    results do not depend on the switch."""
    w = random_quantized(70, 256, 4, 64, dtype=torch.bfloat16, seed=5)
    for dtype, m in [(torch.float32, 32), (torch.float16, 32), (torch.bfloat16, 15), (torch.bfloat16, 193)]:
        x = torch.randn(m, 256).to(dtype)
        ya, yo = both_paths(x, w, 4, 64, 70, 256)
        assert torch.equal(ya, yo), (dtype, m)
    # and a bf16 batch inside the range does take it: at 20 rows the other path is the int8 mode
    x = torch.randn(20, 256).to(torch.bfloat16)
    ya, yo = both_paths(x, w, 4, 64, 70, 256)
    assert not torch.equal(ya, yo)


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
