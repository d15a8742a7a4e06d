"""flute.huge_pages: which memory is advised, that contents survive, and that the CPU layout of a
large layer asks for huge pages (checked in the kernel's own record of the advice)."""
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flute.cpu_layout import from_cpu_layout, to_cpu_layout
from flute.huge_pages import (HUGE_PAGE_BYTES, advise_huge_pages, aligned_span, huge_page_copy,
                              thp_setting)

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
    assert huge_page_copy(small) is small
    meta = torch.empty(8 << 20, dtype=torch.uint8, device="meta")
    assert huge_page_copy(meta) is meta
    assert advise_huge_pages(meta) == 0


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
def test_huge_page_copy_keeps_contents_and_advises_its_aligned_span():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (5 << 20,), dtype=torch.uint8, generator=g)
    out = huge_page_copy(src)
    assert out is not src and out.data_ptr() != src.data_ptr()
    assert torch.equal(out, src)
    start, length = aligned_span(out.data_ptr(), out.numel())
    assert length >= HUGE_PAGE_BYTES  # 5 MiB always holds a whole aligned 2 MiB page
    assert "hg" in _vm_flags(start) and "hg" in _vm_flags(start + length - 1)


@linux_thp
def test_large_cpu_layout_asks_for_huge_pages_and_round_trips():
    N, K, bits = 2048, 4096, 4  # a 4 MiB layout
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2 ** bits, (N, K), dtype=torch.uint8, generator=g)
    layout = to_cpu_layout(codes, bits)
    assert layout.numel() == N * K * bits // 8
    start, length = aligned_span(layout.data_ptr(), layout.numel())
    assert length > 0 and "hg" in _vm_flags(start)
    assert torch.equal(from_cpu_layout(layout, bits, K, N), codes)
