"""Helpers and fixtures shared by the CPU kernel tests (test_cpu_kernel.py, test_cpu_int8.py): the
ISA paths, thread counts, one call of the op on the CPU layout and the normwise error measure."""
import pytest
import torch

from flute import ops
from flute.cpu_layout import to_cpu_layout
from flute.testing import reference_qgemm


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


ISAS = [i for i in ("avx512", "avx2", "portable")]


def available(isa):
    try:
        ops.set_cpu_isa(isa)
        return True
    except RuntimeError:
        return False
    finally:
        ops.set_cpu_isa("auto")


@pytest.fixture(params=ISAS)
def isa(request):
    if not available(request.param):
        pytest.skip(f"this CPU lacks {request.param}")
    ops.set_cpu_isa(request.param)
    yield request.param
    ops.set_cpu_isa("auto")


@pytest.fixture(params=[1, 2])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def run(x, w, bits, group, n, k, q=None):
    q = to_cpu_layout(w.codes, bits) if q is None else q
    return torch.ops.flute.qgemm(x, q, w.scales, w.offsets, w.table, bits, group, k, n)


def normwise_error(y, ref, x, w, group):
    """``||y - ref|| / || |x| @ |W|^T ||``: against ``|ref|`` a single output (n = m = 1) can cancel
    to near zero, and then float32 rounding of the summands is large relative to it."""
    wabs = w._replace(table=w.table.abs(), scales=w.scales.abs(),
                      offsets=None if w.offsets is None else w.offsets.abs())
    return float((y.double() - ref.double()).norm() / reference_qgemm(x.abs(), wabs, group).norm())


def at_thread_counts(call, counts):
    """``call()``'s result at each torch thread count in ``counts``, in order (the count restored)."""
    old = torch.get_num_threads()
    try:
        outs = []
        for t in counts:
            torch.set_num_threads(t)
            outs.append(call())
        return outs
    finally:
        torch.set_num_threads(old)
