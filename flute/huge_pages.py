"""Transparent huge pages for the CPU layout: fewer TLB misses while the kernel streams the codes.

A decode call reads each code once, front to back. With 4 KiB pages a 4096x4096 4-bit layer
(8.4 MB) is ~2,000 pages, each a TLB miss, and in a virtual machine every miss is a two-level
page walk. Backing the stream with 2 MiB pages made the cache-cold M = 1 calls 3-7% faster on
this project's AVX2 VM (benchmarks/CPU_NOTES.md item 68). Linux only hands huge pages to
anonymous memory that asks for them when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``madvise`` (the usual default); :class:`HugePageArena` asks, with ``madvise(MADV_HUGEPAGE)``,
before the memory is first written.

An allocation of its own would hold huge pages only between its first and last 2 MiB boundary
(malloc's large blocks start at no particular one): ~47% of a 4.5 MB layout, 71% of 8.9 MB, 94%
of 31 MB, and the rest streamed 10% / 3.5% / 1% slower at 1 thread on the Zen 5 VM
(CPU_NOTES item 288). So :func:`place_for_streaming` packs every layout, small or large, one after
another into chunks that start on a 2 MiB boundary (:class:`HugePageArena`): all of a copy is in
huge pages, and what memory costs beyond the layouts' own bytes is at most the unwritten rest of
the last huge page each chunk touches. Elsewhere (another OS, THP disabled, madvise refused) the
copies are plain memory with the same contents. Weights that stay parameters (a bf16 ``lm_head``
read by ``flute::bf16_gemv``) get memory of their own instead, whole huge pages from a 2 MiB
boundary (:func:`huge_page_copy`), so that nothing else shares their storage.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import threading
import weakref
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


class HugePageArena:
    """Copies of CPU tensors packed one after another into shared chunks whose memory is advised
    for huge pages, so that every page a copy touches is a huge page: layouts too small to hold a
    2 MiB page of their own, and the ends of larger ones, which an allocation of their own would
    leave on 4 KiB pages (a decode step reads every layer of the model once).

    Each chunk is one allocation of ``max(chunk_bytes, the copy rounded up to 2 MiB)`` plus 2 MiB;
    copies start at its first 2 MiB boundary, 64-byte aligned. The head before that boundary and
    the chunk's unused end are never written, so Linux gives them no memory (beyond the copies, at
    most the rest of the last huge page they touch). A copy is a view of its chunk: the chunk is
    freed when the last of its views is. The arena itself holds only a weak reference to the newest
    view, so it keeps no memory alive; when that view is gone, or the next copy does not fit, the
    next copy starts a new chunk (the old chunk's unused end is then never filled)."""

    ALIGN = 64

    def __init__(self, chunk_bytes: int = 64 << 20):
        if chunk_bytes <= 0 or chunk_bytes % HUGE_PAGE_BYTES:
            raise ValueError(f"chunk_bytes must be a positive multiple of {HUGE_PAGE_BYTES}, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._newest = None  # weakref to the newest view, or None
        self._end = 0  # storage byte offset just past the newest view
        self._limit = 0  # storage byte offset where the newest view's chunk ends

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of CPU tensor ``t`` placed in the arena (in a chunk of its own, sized
        to it, when it is larger than ``chunk_bytes``)."""
        if t.device.type != "cpu":
            raise ValueError(f"HugePageArena.copy: needs a CPU tensor, got one on {t.device}")
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        with self._lock:
            newest = self._newest() if self._newest is not None else None
            start = -(-self._end // self.ALIGN) * self.ALIGN
            if newest is None or start + nbytes > self._limit:
                size = max(self.chunk_bytes, -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES)
                base = torch.empty(size + HUGE_PAGE_BYTES, dtype=torch.uint8)
                advise_huge_pages(base)
                start = aligned_span(base.data_ptr(), base.numel())[0] - base.data_ptr()
                self._limit = start + size
                storage = base.untyped_storage()
            else:
                storage = newest.untyped_storage()
            out = torch.empty(0, dtype=torch.uint8).set_(storage, start, (nbytes,))
            out = out.view(t.dtype).view(t.shape)
            self._newest = weakref.ref(out)  # the tensor handed out: it lives as long as the copy
            self._end = start + nbytes
        return out.copy_(t)


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor ``t`` in memory of its own (an anonymous mapping) that starts
    on a 2 MiB boundary and was advised for huge pages before it was written, so that every byte of
    it lies in huge pages; ``t`` itself when it is on another device or empty.

    For weights that stay parameters (e.g. a bf16 ``lm_head`` read by ``flute::bf16_gemv``), where a
    :class:`HugePageArena` view would not do: the copy's storage is exactly its own bytes, so
    ``torch.save`` and ``state_dict`` see nothing else. Its memory is the copy rounded up to whole
    2 MiB pages (the unwritten rest of the last one)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes == 0:
        return t
    span = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    mapping = mmap.mmap(-1, span + HUGE_PAGE_BYTES)
    anchor = ctypes.c_char.from_buffer(mapping)  # the mapping's address (an export, released below)
    address = ctypes.addressof(anchor)
    del anchor
    offset = -address % HUGE_PAGE_BYTES
    fn = _madvise()
    if fn is not None:
        fn(address + offset, span, _MADV_HUGEPAGE)  # refused: plain pages, the same contents
    # the tensor's storage keeps the mapping alive (frombuffer holds the buffer)
    out = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)
    return out.view(t.dtype).view(t.shape).copy_(t)


#: Smallest weight :func:`place_weight_for_streaming` moves into huge pages of its own: that memory
#: is the weight rounded up to whole 2 MiB pages, more than a small weight's 4 KiB pages cost.
WEIGHT_MIN_BYTES = 4 << 20


def place_weight_for_streaming(param: torch.Tensor) -> bool:
    """Move CPU tensor ``param`` (a parameter: its ``.data`` is replaced, so tied parameters stay
    tied) into memory of its own wholly in huge pages (:func:`huge_page_copy`) when it holds
    :data:`WEIGHT_MIN_BYTES` or more; return whether it moved. For an unquantized weight that a
    decoding step streams, e.g. a bf16 ``lm_head`` read by ``flute::bf16_gemv``: 0.90-0.95 of the
    time for SmolLM2's 57 MB one at 2 threads (CPU_NOTES item 289)."""
    if param.device.type != "cpu" or param.numel() * param.element_size() < WEIGHT_MIN_BYTES:
        return False
    param.data = huge_page_copy(param.data)
    return True


_ARENA = HugePageArena()
#: Smallest tensor :func:`place_for_streaming` puts in the arena: below a few pages the TLB misses
#: saved do not matter.
ARENA_MIN_BYTES = 64 << 10


def place_for_streaming(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a CPU layout the kernel will stream) copied into huge-page memory, the shared
    :class:`HugePageArena`, from :data:`ARENA_MIN_BYTES` up; else (and for tensors on other
    devices) ``t`` itself."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < ARENA_MIN_BYTES:
        return t
    return _ARENA.copy(t)
