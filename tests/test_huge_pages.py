"""flute.huge_pages: which memory is advised, that contents survive, how the arena packs copies
(and frees them), that every byte of a placed copy lies in the advised 2 MiB pages, and that the
CPU layouts of large and small layers ask for huge pages (checked in the kernel's own record of the
advice)."""
import copy
import gc
import io
import sys
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flute import ops
from flute.bench.weights import flute_cpu_linear
from flute.cpu_layout import from_cpu_layout, to_cpu_layout
from flute.huge_pages import (ARENA_MIN_BYTES, HUGE_PAGE_BYTES, WEIGHT_MIN_BYTES, HugePageArena,
                              advise_huge_pages, aligned_span, huge_page_copy, place_for_streaming,
                              place_weight_for_streaming, thp_setting)
from flute.linear import GemvLinear

linux_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or thp_setting() in (None, "never"),
                               reason="needs Linux with transparent huge pages not disabled")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 1 << 40), st.integers(0, 64 << 20))
def test_aligned_span_is_the_largest_aligned_run_inside(address, nbytes):
    start, length = aligned_span(address, nbytes)
    assert start % HUGE_PAGE_BYTES == 0 and length % HUGE_PAGE_BYTES == 0 and length >= 0
    if length:
        assert address <= start and start + length <= address + nbytes
    # one more page on either side would leave the range
    assert start - HUGE_PAGE_BYTES < address or length == 0
    assert start + length + HUGE_PAGE_BYTES > address + nbytes


def test_small_and_non_cpu_tensors_are_returned_as_they_are():
    small = torch.arange(1000, dtype=torch.uint8)
    assert place_for_streaming(small) is small
    meta = torch.empty(8 << 20, dtype=torch.uint8, device="meta")
    assert place_for_streaming(meta) is meta and huge_page_copy(meta) is meta
    assert advise_huge_pages(meta) == 0
    empty = torch.empty(0, 3)
    assert huge_page_copy(empty) is empty


def _in_whole_huge_pages(t: torch.Tensor) -> bool:
    """Whether every byte of ``t`` lies in the whole 2 MiB pages of its storage (the advised ones)."""
    start, length = aligned_span(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + length


def _vm_flags(address: int):
    """VmFlags of the mapping of this process that holds ``address`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@linux_thp
def test_a_large_copy_lies_wholly_in_advised_huge_pages():
    # an allocation of its own would start and end inside 2 MiB pages that stay 4 KiB pages
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, ((5 << 20) + 3,), dtype=torch.uint8, generator=g)
    out = place_for_streaming(src)
    assert out is not src and out.data_ptr() != src.data_ptr()
    assert torch.equal(out, src)
    assert _in_whole_huge_pages(out)
    end = out.data_ptr() + out.numel() - 1
    assert "hg" in _vm_flags(out.data_ptr()) and "hg" in _vm_flags(end)


def test_huge_page_copy_is_an_exact_copy_in_memory_of_its_own():
    g = torch.Generator().manual_seed(5)
    src = torch.randn(1000, 577, generator=g).bfloat16()  # not a whole number of pages
    out = huge_page_copy(src)
    del src  # the copy does not depend on it
    gc.collect()
    src = torch.randn(1000, 577, generator=torch.Generator().manual_seed(5)).bfloat16()
    assert out.shape == src.shape and out.dtype == src.dtype and torch.equal(out, src)
    assert out.data_ptr() % HUGE_PAGE_BYTES == 0 and out.is_contiguous()
    assert out.untyped_storage().nbytes() == src.numel() * 2  # torch.save writes exactly these
    buf = io.BytesIO()
    torch.save(out, buf)
    assert buf.tell() < src.numel() * 2 + 4096
    out.add_(1)  # writable, and still alive after the mapping's Python objects went
    assert torch.equal(out, src + 1)


def test_place_weight_for_streaming_moves_large_cpu_weights_in_place():
    small = torch.nn.Parameter(torch.ones(WEIGHT_MIN_BYTES // 4 - 1), requires_grad=False)
    ptr = small.data_ptr()
    assert not place_weight_for_streaming(small) and small.data_ptr() == ptr
    big = torch.nn.Parameter(torch.arange(WEIGHT_MIN_BYTES // 4, dtype=torch.float32), requires_grad=False)
    alias = big  # a tied weight: the same Parameter object
    assert place_weight_for_streaming(big)
    assert alias.data_ptr() == big.data_ptr() and big.data_ptr() % HUGE_PAGE_BYTES == 0
    assert torch.equal(big, torch.arange(WEIGHT_MIN_BYTES // 4, dtype=torch.float32))
    meta = torch.nn.Parameter(torch.empty(WEIGHT_MIN_BYTES, device="meta"), requires_grad=False)
    assert not place_weight_for_streaming(meta)


@linux_thp
def test_huge_page_copy_is_advised():
    out = huge_page_copy(torch.ones((3 << 20) + 5, dtype=torch.uint8))
    assert "hg" in _vm_flags(out.data_ptr()) and "hg" in _vm_flags(out.data_ptr() + out.numel() - 1)


@linux_thp
def test_large_cpu_layout_asks_for_huge_pages_and_round_trips():
    N, K, bits = 2048, 4096, 4  # a 4 MiB layout
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2 ** bits, (N, K), dtype=torch.uint8, generator=g)
    layout = to_cpu_layout(codes, bits)
    assert layout.numel() == N * K * bits // 8
    assert _in_whole_huge_pages(layout) and "hg" in _vm_flags(layout.data_ptr() + layout.numel() - 1)
    assert torch.equal(from_cpu_layout(layout, bits, K, N), codes)


def test_arena_packs_copies_into_one_chunk_and_keeps_contents():
    arena = HugePageArena(4 << 20)
    g = torch.Generator().manual_seed(2)
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in (100_000, 70_001, 5)]
    srcs.append(torch.randn(3, 1000, generator=g))  # any dtype and shape
    outs = [arena.copy(s) for s in srcs]
    for s, o in zip(srcs, outs):
        assert o.shape == s.shape and o.dtype == s.dtype and torch.equal(o, s)
        assert o.is_contiguous() and o.data_ptr() % HugePageArena.ALIGN == 0
    storage = outs[0].untyped_storage().data_ptr()
    assert all(o.untyped_storage().data_ptr() == storage for o in outs)
    assert outs[0].data_ptr() % HUGE_PAGE_BYTES == 0  # a chunk's copies start on a huge page
    spans = sorted((o.data_ptr(), o.data_ptr() + o.numel() * o.element_size()) for o in outs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two copies overlap
    outs[1].fill_(7)  # writing one copy leaves the others alone
    assert torch.equal(outs[0], srcs[0]) and torch.equal(outs[2], srcs[2])


def test_arena_starts_a_new_chunk_when_full_or_when_the_newest_copy_is_gone():
    arena = HugePageArena(2 << 20)
    a = arena.copy(torch.ones(1 << 20, dtype=torch.uint8))
    b = arena.copy(torch.ones(1 << 20, dtype=torch.uint8))  # fills the chunk exactly
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    c = arena.copy(torch.ones(1, dtype=torch.uint8))  # does not fit
    assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    del c
    gc.collect()
    d = arena.copy(torch.ones(1, dtype=torch.uint8))  # the arena held c only weakly
    assert d.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() and int(d) == 1
    with pytest.raises(ValueError, match="CPU tensor"):
        arena.copy(torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="multiple of"):
        HugePageArena(1000)


def test_a_copy_larger_than_a_chunk_gets_a_chunk_sized_to_it_that_later_copies_share():
    arena = HugePageArena(2 << 20)
    small = arena.copy(torch.ones(1000, dtype=torch.uint8))
    big = arena.copy(torch.full(((3 << 20) + 1,), 5, dtype=torch.uint8))  # rounded up to 4 MiB
    assert big.untyped_storage().data_ptr() != small.untyped_storage().data_ptr()
    assert big.data_ptr() % HUGE_PAGE_BYTES == 0 and _in_whole_huge_pages(big)
    assert big.untyped_storage().nbytes() == (4 << 20) + HUGE_PAGE_BYTES
    after = arena.copy(torch.full((1000,), 3, dtype=torch.uint8))  # fits in the last page's rest
    assert after.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
    assert after.data_ptr() >= big.data_ptr() + big.numel() and _in_whole_huge_pages(after)
    assert bool((big == 5).all()) and bool((after == 3).all()) and bool((small == 1).all())


def test_arena_keeps_no_memory_alive_after_its_copies_are_gone():
    arena = HugePageArena(2 << 20)
    ref = weakref.ref(arena.copy(torch.ones(1000, dtype=torch.uint8)))
    gc.collect()
    assert ref() is None and arena._newest() is None


def test_place_for_streaming_picks_by_size():
    tiny = torch.ones(ARENA_MIN_BYTES - 1, dtype=torch.uint8)
    assert place_for_streaming(tiny) is tiny
    small = torch.arange(ARENA_MIN_BYTES, dtype=torch.int64) % 251
    placed = place_for_streaming(small.to(torch.uint8))
    assert torch.equal(placed, small.to(torch.uint8)) and placed.untyped_storage().nbytes() > 2 * HUGE_PAGE_BYTES
    meta = torch.empty(1 << 20, dtype=torch.uint8, device="meta")
    assert place_for_streaming(meta) is meta


@linux_thp
def test_small_cpu_layouts_share_an_advised_chunk_and_round_trip():
    g = torch.Generator().manual_seed(3)
    layouts, codes = [], []
    for N, K, bits in ((1536, 576, 4), (576, 1536, 3), (576, 576, 2)):  # SmolLM2's shapes
        c = torch.randint(0, 2 ** bits, (N, K), dtype=torch.uint8, generator=g)
        codes.append((c, bits, N, K))
        layouts.append(to_cpu_layout(c, bits))
    for layout, (c, bits, N, K) in zip(layouts, codes):
        assert "hg" in _vm_flags(layout.data_ptr())
        assert torch.equal(from_cpu_layout(layout, bits, K, N), c)
    assert len({t.untyped_storage().data_ptr() for t in layouts}) == 1


def test_arena_copies_made_in_and_out_of_inference_mode_share_a_chunk_and_stay_writable():
    # a model's layers may be prepared lazily under torch.inference_mode() and used outside it
    arena = HugePageArena(2 << 20)
    with torch.inference_mode():
        inside = arena.copy(torch.arange(1000, dtype=torch.int32))
    outside = arena.copy(torch.arange(10, dtype=torch.int32))
    assert outside.untyped_storage().data_ptr() == inside.untyped_storage().data_ptr()
    assert inside.is_inference() and not outside.is_inference()
    outside.add_(1)  # an ordinary tensor: in-place updates outside inference mode are allowed
    assert torch.equal(outside, torch.arange(1, 11, dtype=torch.int32))
    assert torch.equal(inside, torch.arange(1000, dtype=torch.int32))


@linux_thp
@pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built (no CPU layout to place)")
def test_deepcopy_of_prepared_layers_places_their_layouts_anew():
    """A deep copy of a prepared model gets its CPU layouts placed as prepare() places them (whole
    huge pages of the arena) instead of clones of the arena's chunks in 4 KiB pages;
    the copy computes the same bits, and a layout put in the memo on purpose stays shared."""
    layers = [flute_cpu_linear(n, k, bits, 64, torch.bfloat16, seed=n)[0].prepare()
              for n, k, bits in ((2048, 4096, 4), (4096, 2048, 3))]  # 4 MiB and 3 MiB layouts
    model = torch.nn.Sequential(*layers)
    twin = copy.deepcopy(model)
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(2)).bfloat16()
    for a, b in zip(model, twin):
        assert b.qweight.data_ptr() != a.qweight.data_ptr() and torch.equal(b.qweight, a.qweight)
        assert _in_whole_huge_pages(b.qweight)
        assert "hg" in _vm_flags(b.qweight.data_ptr()) and "hg" in _vm_flags(b.qweight.data_ptr() + b.qweight.numel() - 1)
    assert torch.equal(twin(x), model(x))
    shared = copy.deepcopy(layers[0], {id(layers[0].qweight): layers[0].qweight})
    assert shared.qweight is layers[0].qweight


@linux_thp
def test_deepcopy_of_a_gemv_linear_places_its_weight_and_keeps_it_tied():
    """gemv_unquantized's placement survives a deep copy: the copy's large bf16 weight (tied to an
    embedding, as SmolLM2's lm_head) lies in huge pages of its own and stays tied."""
    emb = torch.nn.Embedding(2048, 1024).bfloat16()  # 4 MiB: WEIGHT_MIN_BYTES
    model = torch.nn.Module()
    model.emb = emb
    model.head = GemvLinear.sharing(torch.nn.Linear(1024, 2048, bias=False, dtype=torch.bfloat16))
    model.head.weight = emb.weight
    assert place_weight_for_streaming(model.head.weight)
    twin = copy.deepcopy(model)
    w = twin.head.weight
    assert w is twin.emb.weight and w.data_ptr() != emb.weight.data_ptr() and torch.equal(w, emb.weight)
    assert w.data_ptr() % HUGE_PAGE_BYTES == 0 and "hg" in _vm_flags(w.data_ptr())
