"""CRC-32C primitives of the ``checksum`` capability and the per-page CRC table of the whole RAM.

The layer under :mod:`pyvmm.migration.checksum`: CRCs of buffers and of guest RAM (C, GIL
released, ``pyvmm/native/crc.c``) and :class:`RamCrcTable`, which every checksum block's RAM
digest is computed from.
"""

from __future__ import annotations

import array
import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from pyvmm._native import ffi, lib
from pyvmm.errors import ConfigError, FormatError
from pyvmm.ram import PAGE_SIZE, RamBlock

from .container_format import PageRun, RamBlockInfo
from .page_index_format import decode_page_index

__all__ = [
    "MAX_TABLE_PAGES",
    "PARALLEL_PAGES",
    "RECORD_SIZE",
    "PendingCheck",
    "RamCrcTable",
    "crc32c",
    "hardware",
    "portable_only",
    "ram_page_crcs",
    "ram_run_crcs",
    "u32_array",
    "u64_array",
    "zero_page_crc",
]

PARALLEL_PAGES = 16384
"""RAM ranges with at least this many pages are CRC'd by two threads (two cores halve it)."""
RECORD_SIZE = 24
"""Bytes of one raw page index record (see ``page_index_format.page_index_records``)."""


class PendingCheck(Protocol):
    """Checks of a file still running when its reload loads RAM (see ``check_before_load``)."""

    def check(self) -> None: ...


def u64_array(count: int) -> array.array[int]:
    """``count`` (at least one) zero 64-bit words: a page bitmap C code may write."""
    return array.array("Q", bytes(8 * max(count, 1)))


MAX_TABLE_PAGES = 1 << 26
"""Most guest pages a RAM CRC table covers (256 GiB of 4 KiB pages, a 256 MiB table): the RAM
layout comes from an untrusted header, so the table it sizes is bounded."""


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing ``crc`` (zlib style: 0 to start)."""
    view = memoryview(data).cast("B")
    return int(lib.pyvmm_crc32c(crc, ffi.from_buffer(view), view.nbytes))


IMPLEMENTATIONS = ("portable", "sse4.2", "pclmul", "vpclmulqdq")
"""The CRC-32C implementations, slowest first: slicing-by-8 tables, the SSE4.2 ``crc32``
instruction (three pages at once), carry-less multiply folding over 128-bit and over 256-bit
registers. All give the same results; the best the CPU has is the default."""


def hardware() -> bool:
    """Whether a CPU instruction computes the CRCs (else the portable tables do)."""
    return bool(lib.pyvmm_crc32c_hardware())


def implementation() -> str:
    """The CRC-32C implementation in use (one of :data:`IMPLEMENTATIONS`)."""
    return IMPLEMENTATIONS[lib.pyvmm_crc32c_hardware()]


def available_implementations() -> tuple[str, ...]:
    """The implementations this CPU can run, slowest first (the last is the default)."""
    return IMPLEMENTATIONS[:lib.pyvmm_crc32c_best_level() + 1]


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """Compute CRCs with implementation ``name`` inside the block (tests, benchmarks; not
    thread-safe). ConfigError if this CPU cannot run it."""
    if name not in available_implementations():
        raise ConfigError(f"CRC-32C implementation {name!r} is not available here "
                          f"(available: {', '.join(available_implementations())})")
    before = lib.pyvmm_crc32c_set_hardware(IMPLEMENTATIONS.index(name))
    try:
        yield
    finally:
        lib.pyvmm_crc32c_set_hardware(before)


def portable_only() -> contextlib.AbstractContextManager[None]:
    """Use the portable implementation inside the block (tests, benchmarks; not thread-safe)."""
    return using("portable")


def u32_array(count: int, value: int = 0) -> array.array[int]:
    return array.array("I", [value]) * count


def zero_page_crc(page_size: int = PAGE_SIZE) -> int:
    """CRC-32C of an all-zero page: the CRC of every page never saved."""
    return crc32c(bytes(page_size))


def ram_page_crcs(block: RamBlock) -> array.array[int]:
    """The CRC-32C of every page of ``block`` as it is now; pages never populated are not read
    (they are zero). C calls with the GIL released: a large block is cut in two halves, the
    second done by a helper thread (two cores halve it)."""
    out = u32_array(block.page_count)
    if not block.page_count:
        return out
    populated = block.populated_pages()
    mem = ffi.from_buffer(block.mem)
    bits = ffi.cast("pyvmm_u64 *", populated.address)
    dst = ffi.from_buffer("unsigned int[]", out, require_writable=True)

    def work(first: int, count: int) -> None:  # first: a multiple of 64 (a bitmap word)
        lib.pyvmm_crc32c_pages(mem + first * PAGE_SIZE, PAGE_SIZE, count, bits + first // 64,
                               dst + first)

    half = block.page_count // 2 // 64 * 64
    if block.page_count < PARALLEL_PAGES or not half:
        work(0, block.page_count)
    else:
        helper = threading.Thread(target=work, args=(half, block.page_count - half),
                                  name="pyvmm-crc")
        helper.start()
        try:
            work(0, half)
        finally:
            helper.join()
    return out


_RAM_CHUNK = 4096  # pages per C call of ram_run_crcs (16 MiB), shared out between two threads


def ram_run_crcs(blocks: Sequence[RamBlock], runs: Sequence[PageRun]) -> array.array[int]:
    """The CRC-32C of every data page of ``runs`` (in page-index order, as a checksum block
    lists them), computed from guest RAM: for a save whose RAM has not changed since its pause
    (stop-and-copy), the same values as a read-back of the file, without reading it. One C call
    per run, GIL released."""
    total = sum(run.npages for run in runs if not run.zero)
    out = u32_array(total)
    if not total:
        return out
    out_ptr = ffi.from_buffer("unsigned int[]", out, require_writable=True)
    position = 0
    mems = [ffi.from_buffer(block.mem) for block in blocks]
    chunks: list[tuple[Any, int, Any]] = []  # (first page's bytes, pages, first CRC's slot)
    for run in runs:
        if run.zero:
            continue
        block = blocks[run.block]
        if run.first_page + run.npages > block.page_count:
            raise FormatError(f"page run {run.first_page}+{run.npages} lies outside RAM block "
                              f"{block.name!r}")
        for done in range(0, run.npages, _RAM_CHUNK):
            count = min(_RAM_CHUNK, run.npages - done)
            chunks.append((mems[run.block] + (run.first_page + done) * PAGE_SIZE, count,
                           out_ptr + position + done))
        position += run.npages

    def work(mine: list[tuple[Any, int, Any]]) -> None:
        for src, count, dst in mine:
            lib.pyvmm_crc32c_pages(src, PAGE_SIZE, count, ffi.NULL, dst)

    if total >= PARALLEL_PAGES:  # two cores: the second half on a helper thread
        helper = threading.Thread(target=work, args=(chunks[1::2],), name="pyvmm-crc")
        helper.start()
        try:
            work(chunks[0::2])
        finally:
            helper.join()
    else:
        work(chunks)
    del mems
    return out


# ----- the table of the whole RAM ----------------------------------------------------------------


class RamCrcTable:
    """Per-page CRC-32C of every page of every RAM block, in the file's block order."""

    def __init__(self, layout: Sequence[RamBlockInfo], page_size: int = PAGE_SIZE) -> None:
        """All pages zero (a machine before its first checkpoint, or before a full one).
        FormatError when the layout has more than :data:`MAX_TABLE_PAGES` pages."""
        total = sum(b.size // page_size for b in layout)
        if total > MAX_TABLE_PAGES:
            raise FormatError(f"{total} RAM pages are more than the {MAX_TABLE_PAGES} whose "
                              f"checksums pyvmm keeps")
        self.layout = tuple(layout)
        self.page_size = page_size
        self.zero_crc = zero_page_crc(page_size)
        self.blocks = [u32_array(b.size // page_size, self.zero_crc) for b in self.layout]
        #: (increment, its runs or its raw page index blob, decoded when asked) applied since
        #: the last full increment: who wrote which page
        self.sources: list[tuple[int, Sequence[PageRun] | bytes]] = []
        #: checks of the file still running, which the reloaded RAM waits for
        self.pending: PendingCheck | None = None
        #: raw page index records (magic, length and CRC checked) of the increments checked,
        #: for a loader to use rather than read again
        self.index_records: dict[int, memoryview] = {}

    def finish_checks(self) -> None:
        """Wait for the checks of the file still running (if any) and raise their error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.check()

    def copy(self) -> RamCrcTable:
        other = RamCrcTable.__new__(RamCrcTable)
        other.layout = self.layout
        other.page_size = self.page_size
        other.zero_crc = self.zero_crc
        other.blocks = [array.array("I", b) for b in self.blocks]
        other.sources = list(self.sources)
        other.pending = None
        other.index_records = dict(self.index_records)
        return other

    def apply(self, kind: str, runs: Sequence[PageRun], page_crcs: Sequence[int],
              increment: int = -1) -> None:
        """Update with one increment: its data pages take ``page_crcs`` (page-index order), its
        zero runs the zero-page CRC; a full increment starts from an all-zero RAM."""
        if kind == "full":
            for table in self.blocks:
                table[:] = u32_array(len(table), self.zero_crc)
            self.sources = []
        self.sources.append((increment, runs))
        position = 0
        for run in runs:
            table = self.blocks[run.block]
            end = run.first_page + run.npages
            if run.zero:
                table[run.first_page:end] = u32_array(run.npages, self.zero_crc)
            else:
                table[run.first_page:end] = array.array(
                    "I", page_crcs[position:position + run.npages])
                position += run.npages

    def digest(self) -> int:
        """CRC-32C of the table: every block's CRCs as little-endian u32, blocks in order."""
        crc = 0
        for table in self.blocks:
            data = table
            if sys.byteorder != "little":
                data = array.array("I", table)
                data.byteswap()
            crc = crc32c(memoryview(data).cast("B"), crc)
        return crc

    def first_mismatches(self, actual: Sequence[array.array[int]],
                         limit: int = 3) -> list[tuple[int, int]]:
        """Up to ``limit`` (block number, page) whose CRC in ``actual`` differs from this table."""
        found: list[tuple[int, int]] = []
        for number, (want, have) in enumerate(zip(self.blocks, actual)):
            if want.tobytes() == have.tobytes():  # memcmp, not a compare per item
                continue
            for page, (a, b) in enumerate(zip(want, have)):
                if a != b:
                    found.append((number, page))
                    if len(found) >= limit:
                        return found
        return found

    def source(self, block: int, page: int) -> int | None:
        """The increment whose data (or zero run) set ``page`` of ``block``; None: never saved."""
        for increment, runs in reversed(self.sources):
            if isinstance(runs, bytes):  # checked before it was applied
                runs = decode_page_index(runs, increment=increment)
            for run in runs:
                if run.block == block and run.first_page <= page < run.first_page + run.npages:
                    return increment
        return None
