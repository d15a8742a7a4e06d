"""flute._cpu.qgemm (csrc/cpu/python_entry.cpp), the direct Python entry to flute::qgemm that
QuantLinear's eager forward calls: the same results as torch.ops.flute.qgemm, and everything it
does not handle itself (subclasses, torch function modes, bad arguments) handed to torch.ops."""
import sys
import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode

from flute import ops
from flute.cpu_layout import to_cpu_layout
from flute.layout import to_kernel_layout
from flute.linear import QuantLinear
from flute.testing import random_quantized

pytestmark = pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built")
OP = torch.ops.flute.qgemm


def direct():
    from flute import _cpu
    return _cpu.qgemm


def weight_args(n, k, bits, group, offsets, dtype, seed, layout=to_cpu_layout):
    w = random_quantized(n, k, bits, group, offsets=offsets, dtype=dtype, seed=seed)
    return (layout(w.codes, bits), w.scales, w.offsets, w.table, bits, group, k, n)


def outcome(f, *args):
    """f(*args)'s result, or its exception's type and message."""
    try:
        return f(*args)
    except Exception as e:  # noqa: BLE001 - compared between the two entries
        return type(e), str(e)


def test_eager_forward_uses_the_direct_entry():
    """On Linux with torch's Python library loaded the direct entry must be active, or every
    small layer quietly pays the boxed call again."""
    if sys.platform != "linux":
        pytest.skip("the direct entry finds torch's symbols with dlopen on Linux")
    assert ops.QGEMM_EAGER is direct()


@pytest.mark.parametrize("group", [64, -1])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [0, 1, 3, 17])
def test_same_result_as_torch_ops(bits, dtype, m, group):
    n, k = 67, 200
    args = weight_args(n, k, bits, group, bits == 3, dtype, seed=bits * 10 + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    for xin in (x, x.unsqueeze(0), torch.randn(k, 2 * m + 1).to(dtype).t()[::2]):  # leading dims, strided
        y = direct()(xin, *args)
        assert y.dtype == xin.dtype and y.shape == (*xin.shape[:-1], n)
        assert torch.equal(y, OP(xin, *args))


def test_gpu_layout_and_parameters():
    """The GPU layout (int32) on CPU (the reference, through the same dispatcher) and nn.Parameter
    arguments (plain tensors to C++) give torch.ops' result."""
    args = weight_args(40, 96, 4, 32, True, torch.float32, seed=3, layout=to_kernel_layout)
    x = torch.randn(2, 96)
    assert torch.equal(direct()(x, *args), OP(x, *args))
    pargs = (args[0],) + tuple(torch.nn.Parameter(t, requires_grad=False) for t in args[1:4]) + args[4:]
    assert torch.equal(direct()(x, *pargs), OP(x, *args))


def test_gradient_through_the_direct_entry():
    args = weight_args(40, 96, 4, 32, False, torch.float32, seed=4)
    x1 = torch.randn(3, 96, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(3, 40)
    (direct()(x1, *args) * g).sum().backward()
    (OP(x2, *args) * g).sum().backward()
    assert x1.grad is not None and torch.equal(x1.grad, x2.grad)


class Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


class Tagged(torch.Tensor):
    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.flute.qgemm.default:
            cls.calls += 1
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_torch_function_modes_and_subclasses_see_the_call():
    args = weight_args(33, 64, 4, 64, False, torch.float32, seed=5)
    x = torch.randn(2, 64)
    with Recorder() as rec:
        y = direct()(x, *args)
    assert torch.ops.flute.qgemm.default in rec.seen
    assert torch.equal(y, OP(x, *args))
    Tagged.calls = 0
    y = direct()(x.as_subclass(Tagged), *args)
    assert Tagged.calls == 1 and torch.equal(y.as_subclass(torch.Tensor), OP(x, *args))


@pytest.mark.parametrize("change", ["bits", "bool_bits", "wrong_k", "int_x", "short_scales",
                                    "no_table", "too_few", "too_many", "string"])
def test_bad_arguments_fail_as_through_torch_ops(change):
    args = list(weight_args(32, 128, 4, 64, True, torch.float32, seed=6))
    x = torch.randn(2, 128)
    call = [x] + args
    if change == "bits":
        call[5] = 5
    elif change == "bool_bits":
        call[5] = True
    elif change == "wrong_k":
        call[0] = torch.randn(2, 129)
    elif change == "int_x":
        call[0] = torch.ones(2, 128, dtype=torch.int32)
    elif change == "short_scales":
        call[2] = call[2][:, :-1]
    elif change == "no_table":
        call[4] = None
    elif change == "too_few":
        call = call[:-1]
    elif change == "too_many":
        call = call + [1]
    elif change == "string":
        call[6] = "64"
    got, want = outcome(direct(), *call), outcome(OP, *call)
    assert isinstance(want, tuple) and issubclass(want[0], Exception), want  # each change is an error
    assert got == want


def test_meta_tensors_through_the_dispatcher():
    x = torch.empty(5, 96, device="meta", dtype=torch.bfloat16)
    from flute.cpu_layout import cpu_layout_shape
    q = torch.empty(cpu_layout_shape(4, 96, 40), device="meta", dtype=torch.uint8)
    scales = torch.empty(40, 2, device="meta", dtype=torch.bfloat16)
    y = direct()(x, q, scales, None, torch.empty(16, device="meta"), 4, 64, 96, 40)
    assert y.device.type == "meta" and y.shape == (5, 40) and y.dtype == torch.bfloat16


def test_threads_call_it_at_once():
    """The entry releases the GIL while the op runs; two Python threads get each its own result."""
    args = weight_args(300, 512, 4, 64, False, torch.bfloat16, seed=7)
    xs = [torch.randn(1, 512, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(2)]
    want = [OP(x, *args) for x in xs]
    bad = []

    def work(i):
        for _ in range(200):
            if not torch.equal(direct()(xs[i], *args), want[i]):
                bad.append(i)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


@pytest.mark.parametrize("offsets", [False, True])
def test_the_kernel_borrows_the_callers_tensors(offsets):
    """A C++ copy of a tensor that only Python holds takes a reference to its Python object as
    well (torch's PyObject preservation), and with the GIL released each such reference and its
    release acquire the GIL: ~10 GIL round trips per call were a third of a small call's
    instructions (CPU_NOTES item 214). The kernel borrows the caller's tensors instead. Watched
    from a second Python thread, which runs while the op has released the GIL: beyond the one
    reference the calling frame may hold for the call, none may appear."""
    n, k = 4096, 4096  # a few ms per call: time for the watcher to look many times
    args = list(weight_args(n, k, 4, 64, offsets, torch.bfloat16, seed=11))
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    f = direct()
    q, s, o, t = args[:4]
    watched = [u for u in (x, q, s, o, t) if isinstance(u, torch.Tensor)]

    def counts():
        return [sys.getrefcount(u) for u in watched]

    base = counts()
    calling, stop = threading.Event(), threading.Event()
    extra, looks = [0] * len(watched), [0]

    def watch():
        while not stop.is_set():
            if calling.is_set():
                looks[0] += 1
                extra[:] = [max(e, c - b) for e, c, b in zip(extra, counts(), base)]

    w = threading.Thread(target=watch)
    w.start()
    try:
        for _ in range(200):
            calling.set()
            f(x, q, s, o, t, 4, 64, k, n)
            calling.clear()
            if looks[0] >= 2000:
                break
    finally:
        stop.set()
        w.join()
    if looks[0] < 100:
        pytest.skip(f"the watching thread ran only {looks[0]} times during the calls")
    assert max(extra) <= 1, f"references taken during the call, per tensor: {extra}"

def test_quantlinear_compiles_to_the_op():
    """Under torch.compile the forward calls torch.ops.flute.qgemm (Dynamo cannot trace the C
    function): one graph, the op in it, the eager result."""
    from flute.bench.weights import flute_cpu_linear
    q, _ = flute_cpu_linear(64, 128, 4, 64, torch.float32, seed=8)
    x = torch.randn(3, 128)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    y = torch.compile(q, fullgraph=True, backend=backend)(x)
    assert len(graphs) == 1
    assert any(node.target in (OP, OP.default) for node in graphs[0].graph.nodes)
    assert torch.equal(y, q(x))


def test_public_qgemm_eager_and_compiled():
    """flute.qgemm: the direct entry in eager code, torch.ops.flute.qgemm under torch.compile."""
    import flute
    args = weight_args(48, 96, 3, 32, True, torch.float32, seed=9)
    x = torch.randn(2, 96)
    want = OP(x, *args)
    assert torch.equal(flute.qgemm(x, *args), want)
    torch._dynamo.reset()
    got = torch.compile(lambda t: flute.qgemm(t, *args), fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, want)
