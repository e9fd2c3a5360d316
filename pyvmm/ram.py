"""Guest RAM: RAM blocks backed by private anonymous host mappings, and one-bit-per-page bitmaps.

A :class:`RamBlock` is one contiguous piece of guest-physical memory (QEMU's ``RAMBlock``): a host
mapping that unicorn maps with ``mem_map_ptr`` and that Python reads and writes through a
``memoryview``. A :class:`PageBitmap` holds one bit per guest page of a block (dirty, sent, zero,
resident...). Bulk work — scanning bitmaps, finding zero pages, asking the kernel which pages are
populated — is done in C (``pyvmm/native/bitmap.c``) in one call per bitmap or per run of pages,
never one Python call per page. This module knows nothing of migration.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from pyvmm._native import ffi, lib
from pyvmm.errors import ConfigError, GuestMemoryError, PyvmmError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
"""Guest page size: the unit of every bitmap, zero check and checkpoint page record."""

_WORD_BITS = 64
_WORD_BYTES = 8
_HUGE_PAGE_SIZE = 2 << 20  # x86-64 / arm64 (4 KiB granule) transparent huge page size
_MAX_IDSTR = 255  # a block's name travels in the migration stream behind a u8 length


class PageBitmap:
    """A fixed-size set of guest page numbers, one bit per page in uint64 words (host order).

    The words live in a ``bytearray`` whose address (:attr:`address`) C code may use for as long as
    the bitmap object is alive; every C access, including the single-bit operations here, is an
    atomic operation, so a C thread (the userfaultfd fault handler) may set and test bits while
    Python threads scan. Bits past ``npages`` are always clear.

    ``len()`` is the number of pages the bitmap covers, not the number of set pages: use
    :meth:`count` or :meth:`any` for that. Page numbers outside ``0..npages-1`` raise ``IndexError``
    (``in`` answers ``False`` instead, like ``range``). Every method may run on any thread; the C
    calls release the GIL.
    """

    __slots__ = ("_npages", "_nwords", "_words", "_buffer", "_ptr")

    def __init__(self, npages: int) -> None:
        """Make an all-clear bitmap of ``npages`` pages (``npages >= 0``)."""
        if npages < 0:
            raise ValueError(f"a page bitmap cannot have {npages} pages")
        self._npages = npages
        self._nwords = (npages + _WORD_BITS - 1) // _WORD_BITS
        # one spare word for an empty bitmap so that `address` is always a real address
        self._words = bytearray(max(self._nwords, 1) * _WORD_BYTES)
        # the export pins the bytearray: it can no longer be resized, so the address stays valid
        self._buffer: Any = ffi.from_buffer(self._words)
        self._ptr: Any = ffi.cast("pyvmm_u64 *", self._buffer)
        # __atomic operations need naturally aligned words; CPython's allocators give 16 bytes
        if self.address % _WORD_BYTES:
            raise RuntimeError("bytearray storage is not 8-byte aligned")

    @property
    def npages(self) -> int:
        """Number of pages the bitmap covers."""
        return self._npages

    @property
    def address(self) -> int:
        """Host address of the word array; valid while this object is alive."""
        return int(ffi.cast("uintptr_t", self._ptr))

    @property
    def nwords(self) -> int:
        """Number of uint64 words that hold the bits (``ceil(npages / 64)``)."""
        return self._nwords

    def __len__(self) -> int:
        return self._npages

    def __repr__(self) -> str:
        return f"PageBitmap(npages={self._npages}, count={self.count()})"

    # -- single pages -------------------------------------------------------------------------

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self._npages:
            raise IndexError(f"page {page} outside bitmap of {self._npages} pages")

    def set(self, page: int) -> None:
        """Set the bit of ``page`` (atomically)."""
        self._check_page(page)
        lib.pyvmm_bitmap_set_bit(self._ptr, page)

    def clear(self, page: int) -> None:
        """Clear the bit of ``page`` (atomically)."""
        self._check_page(page)
        lib.pyvmm_bitmap_clear_bit(self._ptr, page)

    def test(self, page: int) -> bool:
        """Whether the bit of ``page`` is set."""
        self._check_page(page)
        return bool(lib.pyvmm_bitmap_test_bit(self._ptr, page))

    def test_and_set(self, page: int) -> bool:
        """Set the bit of ``page`` and return whether it was already set, as one atomic step."""
        self._check_page(page)
        return bool(lib.pyvmm_bitmap_test_and_set_bit(self._ptr, page))

    def test_and_clear(self, page: int) -> bool:
        """Clear the bit of ``page`` and return whether it was set, as one atomic step."""
        self._check_page(page)
        return bool(lib.pyvmm_bitmap_test_and_clear_bit(self._ptr, page))

    def __contains__(self, page: object) -> bool:
        if not isinstance(page, int) or not 0 <= page < self._npages:
            return False
        return bool(lib.pyvmm_bitmap_test_bit(self._ptr, page))

    # -- ranges ---------------------------------------------------------------------------------

    def _check_range(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self._npages:
            raise IndexError(
                f"pages {start}..{start + count - 1} outside bitmap of {self._npages} pages"
            )

    def _bounds(self, start: int, end: int | None) -> int:
        """Check ``0 <= start <= end <= npages`` and return ``end`` (``None`` means ``npages``)."""
        stop = self._npages if end is None else end
        if not 0 <= start <= stop <= self._npages:
            raise IndexError(f"page range {start}..{stop} outside bitmap of {self._npages} pages")
        return stop

    def set_range(self, start: int, count: int) -> None:
        """Set pages ``start .. start+count-1``."""
        self._check_range(start, count)
        lib.pyvmm_bitmap_set_range(self._ptr, start, count)

    def clear_range(self, start: int, count: int) -> None:
        """Clear pages ``start .. start+count-1``."""
        self._check_range(start, count)
        lib.pyvmm_bitmap_clear_range(self._ptr, start, count)

    def set_all(self) -> None:
        """Set every page."""
        lib.pyvmm_bitmap_set_range(self._ptr, 0, self._npages)

    def clear_all(self) -> None:
        """Clear every page."""
        lib.pyvmm_bitmap_clear_range(self._ptr, 0, self._npages)

    # -- queries -----------------------------------------------------------------------------------

    def count(self, start: int = 0, end: int | None = None) -> int:
        """Number of set pages in ``start .. end-1`` (default: the whole bitmap)."""
        stop = self._bounds(start, end)
        return int(lib.pyvmm_bitmap_count(self._ptr, start, stop))

    def any(self) -> bool:
        """Whether any page is set."""
        return self.find_next_set(0) < self._npages

    def find_next_set(self, start: int) -> int:
        """The first set page at or after ``start`` (``0 <= start <= npages``), or ``npages``."""
        self._bounds(start, None)
        return int(lib.pyvmm_bitmap_find_next_set(self._ptr, self._npages, start))

    def find_next_clear(self, start: int) -> int:
        """The first clear page at or after ``start`` (``0 <= start <= npages``), or ``npages``."""
        self._bounds(start, None)
        return int(lib.pyvmm_bitmap_find_next_clear(self._ptr, self._npages, start))

    def runs(
        self, start: int = 0, end: int | None = None, max_run: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """Yield ``(first_page, npages)`` for each run of consecutive set pages in ``start..end-1``.

        Runs come in page order. Without ``max_run`` each run is maximal; with it, a longer run is
        cut into pieces of ``max_run`` pages (the last one shorter). Costs two C calls per run.
        Bits changed while iterating may or may not be seen.
        """
        stop = self._bounds(start, end)
        if max_run is not None and max_run < 1:
            raise ValueError(f"max_run must be at least 1, not {max_run}")
        ptr, npages = self._ptr, self._npages
        pos = start
        while pos < stop:
            first = int(lib.pyvmm_bitmap_find_next_set(ptr, npages, pos))
            if first >= stop:
                return
            after = min(int(lib.pyvmm_bitmap_find_next_clear(ptr, npages, first)), stop)
            if max_run is None:
                yield first, after - first
            else:
                for piece in range(first, after, max_run):
                    yield piece, min(max_run, after - piece)
            pos = after

    def __iter__(self) -> Iterator[int]:
        """Yield the set pages in increasing order."""
        for first, count in self.runs():
            yield from range(first, first + count)

    # -- whole-bitmap operations -------------------------------------------------------------------

    def copy(self) -> PageBitmap:
        """A new bitmap with the same pages set."""
        other = PageBitmap(self._npages)
        other._words[:] = self._words
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageBitmap):
            return NotImplemented
        return self._npages == other._npages and self._words == other._words

    __hash__ = None  # type: ignore[assignment]  # mutable, like set

    def _check_same_size(self, other: PageBitmap) -> None:
        if not isinstance(other, PageBitmap):
            raise TypeError(f"expected a PageBitmap, got {type(other).__name__}")
        if other._npages != self._npages:
            raise ValueError(
                f"page bitmaps differ in size: {self._npages} and {other._npages} pages"
            )

    def update(self, other: PageBitmap) -> None:
        """Set every page set in ``other`` (``self |= other``); sizes must match."""
        self._check_same_size(other)
        lib.pyvmm_bitmap_or(self._ptr, other._ptr, self._nwords)

    def intersection_update(self, other: PageBitmap) -> None:
        """Keep only pages also set in ``other`` (``self &= other``); sizes must match."""
        self._check_same_size(other)
        lib.pyvmm_bitmap_and(self._ptr, other._ptr, self._nwords)

    def difference_update(self, other: PageBitmap) -> None:
        """Clear every page set in ``other`` (``self &= ~other``); sizes must match."""
        self._check_same_size(other)
        lib.pyvmm_bitmap_andnot(self._ptr, other._ptr, self._nwords)

    def __ior__(self, other: PageBitmap) -> PageBitmap:
        self.update(other)
        return self

    def __iand__(self, other: PageBitmap) -> PageBitmap:
        self.intersection_update(other)
        return self

    def __isub__(self, other: PageBitmap) -> PageBitmap:
        self.difference_update(other)
        return self

    def __or__(self, other: PageBitmap) -> PageBitmap:
        result = self.copy()
        result.update(other)
        return result

    def __and__(self, other: PageBitmap) -> PageBitmap:
        result = self.copy()
        result.intersection_update(other)
        return result

    def __sub__(self, other: PageBitmap) -> PageBitmap:
        result = self.copy()
        result.difference_update(other)
        return result

    def complement(self) -> PageBitmap:
        """A new bitmap holding exactly the pages clear in this one."""
        result = PageBitmap(self._npages)
        result.set_all()
        result.difference_update(self)
        return result

    # -- conversions -------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The words as bytes, ``ceil(npages / 64) * 8`` of them, in host byte order."""
        return bytes(self._words[: self._nwords * _WORD_BYTES])

    @classmethod
    def from_bytes(cls, npages: int, data: bytes) -> PageBitmap:
        """The inverse of :meth:`to_bytes`; bits past ``npages`` in ``data`` must be clear."""
        bitmap = cls(npages)
        if len(data) != bitmap._nwords * _WORD_BYTES:
            raise ValueError(
                f"a bitmap of {npages} pages takes {bitmap._nwords * _WORD_BYTES} bytes, "
                f"not {len(data)}"
            )
        bitmap._words[: len(data)] = data
        tail = npages % _WORD_BITS
        if tail and int.from_bytes(data[-_WORD_BYTES:], sys.byteorder) >> tail:
            raise ValueError(f"bits set past page {npages - 1}")
        return bitmap

    @classmethod
    def from_pages(cls, npages: int, pages: Iterable[int]) -> PageBitmap:
        """A bitmap of ``npages`` pages with exactly ``pages`` set (one Python call per page)."""
        bitmap = cls(npages)
        for page in pages:
            bitmap.set(page)
        return bitmap


def _errno_text(err: int) -> str:
    return f"{os.strerror(err)} (errno {err})"


class _Unmapper:
    """The destructor of a block's host mapping: cffi calls it when the last reference goes.

    Held by the mapping's cffi owner object and by the block, never referring back to the block,
    so that no reference cycle delays the unmap.
    """

    __slots__ = ("length", "unmapped")

    def __init__(self, length: int) -> None:
        self.length = length
        self.unmapped = False

    def __call__(self, ptr: Any) -> None:
        lib.pyvmm_ram_munmap(ptr, self.length)
        self.unmapped = True


def _swap_active() -> bool:
    """Whether the host may have swapped pages out (unknown counts as yes)."""
    try:
        with open("/proc/swaps", encoding="ascii", errors="replace") as swaps:
            return len(swaps.read().splitlines()) > 1
    except OSError:
        return True


class RamBlock:
    """One contiguous block of guest RAM, like QEMU's ``RAMBlock``, in its own host mapping.

    The mapping is private and anonymous (a ``fork()``-based snapshot child sees it copy-on-write),
    ``MAP_NORESERVE`` and never touched here: a page costs host memory only once it is written, so a
    4 GiB block is created at once. It starts on a 2 MiB boundary and asks for transparent huge
    pages (best effort).

    Offsets are relative to the start of the block; ``gpa`` is where the block sits in the guest's
    physical address space. Methods may run on any thread; nothing here locks, so callers that
    write concurrently with a scan get whichever bytes the scan saw.
    """

    def __init__(self, name: str, size: int, gpa: int) -> None:
        """Map a block of ``size`` bytes (a positive multiple of :data:`PAGE_SIZE`) for ``gpa``.

        Raises :class:`~pyvmm.errors.ConfigError` on a bad name, size or address, or if the host
        refuses the mapping.
        """
        if not isinstance(name, str) or not name or len(name.encode()) > _MAX_IDSTR:
            raise ConfigError(f"RAM block name {name!r} must be 1 to {_MAX_IDSTR} bytes of text")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
            raise ConfigError(
                f"RAM block {name!r}: size {size!r} is not a positive multiple of the "
                f"{PAGE_SIZE}-byte page size"
            )
        if isinstance(gpa, bool) or not isinstance(gpa, int) or gpa < 0 or gpa % PAGE_SIZE:
            raise ConfigError(
                f"RAM block {name!r}: guest-physical address {gpa!r} is not a page-aligned "
                "non-negative address"
            )
        self.name = name
        self.size = size
        self.gpa = gpa
        self.page_count = size // PAGE_SIZE
        align = max(_HUGE_PAGE_SIZE if size >= _HUGE_PAGE_SIZE else PAGE_SIZE, mmap.PAGESIZE)
        ptr = lib.pyvmm_ram_mmap(size, align)
        if ptr == ffi.NULL:
            raise ConfigError(
                f"RAM block {name!r}: cannot map {size} bytes of host memory: "
                f"{_errno_text(ffi.errno)}"
            )
        self._unmapper = _Unmapper(size)
        # Ownership: the cffi owner unmaps when collected; the buffer and every memoryview made
        # from it (slices included) keep it alive, so no view can outlive the mapping.
        self._owner: Any = ffi.gc(ptr, self._unmapper)
        self._mem: memoryview | None = memoryview(ffi.buffer(self._owner, size))
        self.host_addr: int = int(ffi.cast("uintptr_t", ptr))
        """Host address of the mapping (for unicorn's ``mem_map_ptr``); invalid after close()."""

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Give the block's memory back to the host. Idempotent.

        Any memoryview still alive (a slice of :attr:`mem`, a :meth:`page`) stays safe to use: the
        address range is unmapped only when the last of them goes, and until then its pages are
        discarded (they read as zero). ``host_addr`` must no longer be used for anything new;
        unmap it from unicorn before closing.
        """
        mem = self._mem
        if mem is None:
            return
        self._mem = None
        try:
            mem.release()
        except BufferError:
            pass  # someone holds a buffer exported from `mem`; it keeps the mapping alive
        del mem
        self._owner = None  # unmaps now, through _Unmapper, unless some view still refers to it
        if not self._unmapper.unmapped:
            lib.pyvmm_ram_discard(ffi.cast("void *", self.host_addr), self.size)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._mem is None

    def __enter__(self) -> RamBlock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<RamBlock {self.name!r} gpa=0x{self.gpa:x} size=0x{self.size:x}{state}>"

    def _open_mem(self) -> memoryview:
        if self._mem is None:
            raise GuestMemoryError(f"RAM block {self.name!r} is closed")
        return self._mem

    # -- access ------------------------------------------------------------------------------

    @property
    def mem(self) -> memoryview:
        """The whole block as a writable ``memoryview`` of format ``'B'``."""
        return self._open_mem()

    def _check_access(self, offset: int, length: int) -> memoryview:
        mem = self._open_mem()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise GuestMemoryError(
                f"RAM block {self.name!r}: {length} bytes at offset 0x{offset:x} "
                f"(gpa 0x{self.gpa + offset:x}) are outside its 0x{self.size:x} bytes"
            )
        return mem

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.page_count:
            raise IndexError(
                f"page {index} outside RAM block {self.name!r} of {self.page_count} pages"
            )

    def page(self, index: int) -> memoryview:
        """A writable view of page ``index`` (``IndexError`` outside the block)."""
        mem = self._open_mem()
        self._check_index(index)
        return mem[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]

    def read(self, offset: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``offset``; ``GuestMemoryError`` if not all inside."""
        mem = self._check_access(offset, length)
        return mem[offset : offset + length].tobytes()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` (any C-contiguous buffer) to ``offset``; ``GuestMemoryError`` if it
        does not fit, in which case nothing is written."""
        src = memoryview(data).cast("B")
        mem = self._check_access(offset, src.nbytes)
        mem[offset : offset + src.nbytes] = src

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Whether the guest-physical range ``gpa .. gpa+length-1`` lies inside this block."""
        return length >= 0 and self.gpa <= gpa and gpa + length <= self.gpa + self.size

    # -- page queries ------------------------------------------------------------------------

    def new_bitmap(self) -> PageBitmap:
        """An all-clear bitmap with one bit per page of this block."""
        return PageBitmap(self.page_count)

    def _check_bitmap(self, bitmap: PageBitmap) -> None:
        if bitmap.npages != self.page_count:
            raise ValueError(
                f"bitmap of {bitmap.npages} pages used with RAM block {self.name!r} "
                f"of {self.page_count} pages"
            )

    def is_zero_page(self, index: int) -> bool:
        """Whether page ``index`` holds only zero bytes (reads it; stops at the first non-zero)."""
        self._open_mem()
        self._check_index(index)
        page = ffi.cast("unsigned char *", self._owner) + index * PAGE_SIZE
        return bool(lib.pyvmm_page_is_zero(page, PAGE_SIZE))

    def resident_pages(self) -> PageBitmap:
        """Pages in host RAM right now, from ``mincore()``; reads no guest memory.

        A page never written (nor read) is not resident. A page the host swapped out is not
        resident either, yet holds data: use :meth:`populated_pages` to tell which pages may be
        non-zero.
        """
        self._open_mem()
        bitmap = self.new_bitmap()
        rc = lib.pyvmm_mincore_bitmap(self._owner, self.page_count, PAGE_SIZE, mmap.PAGESIZE,
                                      bitmap._ptr)
        if rc:
            raise PyvmmError(f"RAM block {self.name!r}: mincore failed: {_errno_text(-rc)}")
        return bitmap

    def populated_pages(self) -> PageBitmap:
        """Pages that may hold data: resident or swapped out. Reads no guest memory.

        A page outside this set has never been populated (or was discarded) and reads as zero.
        Uses ``/proc/self/pagemap``; without it, falls back to :meth:`resident_pages` when no swap
        is active, else to every page (correct, only slower to scan).
        """
        self._open_mem()
        bitmap = self.new_bitmap()
        rc = lib.pyvmm_pagemap_bitmap(self._owner, self.page_count, PAGE_SIZE, mmap.PAGESIZE,
                                      bitmap._ptr)
        if rc == 0:
            return bitmap
        if not _swap_active():
            return self.resident_pages()
        bitmap.set_all()
        return bitmap

    def zero_pages(self, pages: PageBitmap | None = None) -> PageBitmap:
        """Which of ``pages`` (default: all) hold only zero bytes, as a new bitmap.

        Pages never populated count as zero without being read: reading them would fault in
        (and, under userfaultfd, trap on) memory the guest never touched. One C call scans the
        whole block, with the GIL released.
        """
        self._open_mem()
        if pages is not None:
            self._check_bitmap(pages)
        populated = self.populated_pages()
        zero = self.new_bitmap()
        lib.pyvmm_scan_zero_pages(
            self._owner,
            PAGE_SIZE,
            self.page_count,
            ffi.NULL if pages is None else pages._ptr,
            populated._ptr,
            zero._ptr,
        )
        return zero

    def nonzero_pages(self) -> PageBitmap:
        """The pages holding at least one non-zero byte (the complement of :meth:`zero_pages`)."""
        return self.zero_pages().complement()
