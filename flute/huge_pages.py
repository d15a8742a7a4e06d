"""Transparent huge pages for the CPU layout: fewer TLB misses while the kernel streams the codes.

A decode call reads each code once, front to back. With 4 KiB pages a 4096x4096 4-bit layer
(8.4 MB) is ~2,000 pages, each a TLB miss, and in a virtual machine every miss is a two-level
page walk. Backing the stream with 2 MiB pages made the cache-cold M = 1 calls 3-7% faster on
this project's AVX2 VM (benchmarks/CPU_NOTES.md item 68). Linux only hands huge pages to
anonymous memory that asks for them when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``madvise`` (the usual default); :func:`huge_page_copy` asks, with ``madvise(MADV_HUGEPAGE)``,
before the memory is first written.

Only the 2 MiB-aligned part of an allocation is advised: nothing is over-allocated, so memory stays
the layout's size, and a layout under ~4 MiB may get no huge page at all. Elsewhere (another OS,
THP disabled, madvise refused) the copy is plain memory with the same contents.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Optional

import torch

#: Size of an x86-64 / arm64 transparent huge page.
HUGE_PAGE_BYTES = 2 << 20
#: ``MADV_HUGEPAGE`` from Linux's ``<sys/mman.h>`` (the same value on every architecture).
_MADV_HUGEPAGE = 14
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=None)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def thp_setting() -> Optional[str]:
    """The system's transparent huge page mode (``"always"``, ``"madvise"`` or ``"never"``), or
    ``None`` where there is none to read (not Linux, no THP support)."""
    try:
        with open(_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def aligned_span(address: int, nbytes: int) -> tuple:
    """``(start, length)`` of the whole 2 MiB pages inside ``[address, address + nbytes)``
    (``length`` 0 when there is none)."""
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return start, max(0, end - start)


def advise_huge_pages(t: torch.Tensor) -> int:
    """Ask Linux to back the 2 MiB-aligned part of CPU tensor ``t``'s memory with transparent huge
    pages (pages already written keep their size until the kernel's background collapse). Returns
    the number of bytes advised: 0 when ``t`` is not on the CPU, spans no aligned 2 MiB page, or
    the system refused or cannot."""
    if t.device.type != "cpu" or t.numel() == 0:
        return 0
    start, length = aligned_span(t.data_ptr(), t.numel() * t.element_size())
    fn = _madvise()
    if fn is None or length == 0:
        return 0
    return length if fn(start, length, _MADV_HUGEPAGE) == 0 else 0


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor ``t`` whose memory was advised for huge pages before it was
    written (:func:`advise_huge_pages`); ``t`` itself when it is on another device or smaller than
    two huge pages (its copy could hold no whole aligned one, or too little to matter)."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < 2 * HUGE_PAGE_BYTES:
        return t
    out = torch.empty(t.shape, dtype=t.dtype)
    advise_huge_pages(out)
    out.copy_(t)
    return out
