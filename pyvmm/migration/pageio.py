"""RAM page records written straight from guest RAM and read straight back into it, one C call each.

The hot path of checkpoint save and reload. :func:`write_page_records` emits QEMU RAM section
records (``be64 offset|flags``, ``u8 len, idstr`` on a first record, then a fill byte for ZERO or
the page for PAGE) for every selected page of a :class:`~pyvmm.ram.RamBlock` with ``pwritev``,
the page bytes going from guest RAM to the file without a copy in between, and reports the
layout as :class:`PageRuns`. :func:`read_page_runs` takes such runs (from the writer, or from a
page index read back from a file) and reads each data run with ``preadv`` into guest RAM,
checking the record headers between the pages as it goes. Python runs per call, never per page.

Both work on a raw fd at an explicit offset (``pwritev``/``preadv``), not on a buffered stream:
a caller that also writes through a buffer flushes it first and passes the fd's current end, and
moves its own position past ``bytes_written`` afterwards. Both run on any thread; the C part runs
with the GIL released.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pyvmm._native import ffi, lib
from pyvmm.errors import FormatError, StreamError
from pyvmm.migration.container_format import RunSequence
from pyvmm.ram import PAGE_SIZE, PageBitmap, RamBlock

RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_COMPRESSED = 0x400  # pyvmm's compressed page (compress.c, encoders.py)

RECORD_HEADER_SIZE = 8
"""The ``be64 offset|flags`` that starts every record."""
PAGE_RECORD_SIZE = RECORD_HEADER_SIZE + PAGE_SIZE
"""A PAGE record with CONTINUE; also the stride between the pages of a data run in the file."""
ZERO_RECORD_SIZE = RECORD_HEADER_SIZE + 1
"""A ZERO record with CONTINUE: the header and its fill byte."""

_U64_MAX = (1 << 64) - 1
# the run arrays are filled by C before anything reads them: zeroing megabytes first is waste
_new_uncleared = ffi.new_allocator(should_clear_after_alloc=False)

#: struct pyvmm_page_run as bytes (native order): first_page, npages, data_offset, kind, padding
_RUN_LAYOUT = struct.Struct("=QQQi4x")
assert _RUN_LAYOUT.size == ffi.sizeof("struct pyvmm_page_run") and \
    ffi.offsetof("struct pyvmm_page_run", "kind") == 24
_INDEX_RECORD_SIZE = 24  # one page index record of the container (native.h)


class PageRun(NamedTuple):
    """Consecutive pages of one kind, in page order and, for data, in file order.

    For a data run (``zero`` and ``compressed`` false) the bytes of page ``first_page + k`` are
    at file offset ``data_offset + k * PAGE_RECORD_SIZE``; the record header of every page but
    the first lies in the 8 bytes before its data. For a zero run ``data_offset`` is 0 and means
    nothing. A compressed run's records (``compress.c``) follow each other from the first one's
    ``be16`` length at ``data_offset``; their lengths vary, so the run is read whole.
    """

    first_page: int
    npages: int
    data_offset: int
    zero: bool
    compressed: bool = False


RunTuple = tuple[int, int, int, bool] | tuple[int, int, int, bool, bool]
"""``(first_page, npages, data_offset, zero[, compressed])``"""


class PageRuns(RunSequence[PageRun]):
    """An immutable sequence of :class:`PageRun`, held in a C array that C code reads directly.

    Built by :func:`write_page_records`, or from ``(first_page, npages, data_offset, zero[,
    compressed])`` tuples (e.g. a page index read from a file; one Python step per run). Items
    are made on access, so a result with many runs costs nothing until looked at.
    """

    __slots__ = ("_array", "_count")

    def __init__(self, runs: Iterable[RunTuple] = ()) -> None:
        """Pack ``runs``; ``FormatError`` for a value that no page run can hold (not a u64)."""
        items = list(runs)
        self._count = len(items)
        self._array: Any = _new_uncleared("struct pyvmm_page_run[]", max(self._count, 1))
        for i, run in enumerate(items):
            first, npages, data_offset, zero = run[:4]
            compressed = len(run) > 4 and bool(run[4])
            for value in (first, npages, data_offset):
                if isinstance(value, bool) or not isinstance(value, int) or not (
                    0 <= value <= _U64_MAX
                ):
                    raise FormatError(f"page run {i} {tuple(run)!r} holds an impossible value")
            slot = self._array[i]
            slot.first_page = first
            slot.npages = npages
            slot.data_offset = data_offset
            slot.kind = lib.PYVMM_RUN_ZERO if zero else \
                lib.PYVMM_RUN_COMPRESSED if compressed else lib.PYVMM_RUN_DATA

    @classmethod
    def _adopt(cls, array: Any, count: int) -> PageRuns:
        """Wrap a C array filled by C code; ``count`` of its entries are valid."""
        runs = cls.__new__(cls)
        runs._array = array
        runs._count = count
        return runs

    def __len__(self) -> int:
        return self._count

    def _item(self, index: int) -> PageRun:
        slot = self._array[index]
        kind = int(slot.kind)
        return PageRun(int(slot.first_page), int(slot.npages), int(slot.data_offset),
                       kind == lib.PYVMM_RUN_ZERO, kind == lib.PYVMM_RUN_COMPRESSED)

    def tuples(self) -> list[tuple[int, int, int, bool, bool]]:
        """Every run as ``(first_page, npages, data_offset, zero, compressed)``, read from the
        C array in one pass (an incremental checkpoint of scattered pages has a run per
        page)."""
        raw = ffi.buffer(self._array, self._count * _RUN_LAYOUT.size)
        zero, packed = lib.PYVMM_RUN_ZERO, lib.PYVMM_RUN_COMPRESSED
        return [(first, npages, offset, kind == zero, kind == packed)
                for first, npages, offset, kind in _RUN_LAYOUT.iter_unpack(raw)]

    def index_records(self, block: int) -> bytes:
        """The runs as page index records of RAM block number ``block`` (see
        :class:`~pyvmm.migration.container_format.IndexRecords`), built in C in one call.
        ``ValueError`` if the block number or a run's length does not fit its field."""
        out = ffi.new("unsigned char[]", max(self._count, 1) * _INDEX_RECORD_SIZE)
        if lib.pyvmm_index_records_from_runs(self._array, self._count, block, out):
            raise ValueError(f"page runs of RAM block {block} do not fit page index records "
                             "(block number over 65535 or a run over 2**32 pages)")
        records: bytes = ffi.buffer(out, self._count * _INDEX_RECORD_SIZE)[:]
        return records


@dataclass(frozen=True)
class PageWriteResult:
    """What one :func:`write_page_records` call put in the file."""

    bytes_written: int
    data_pages: int
    zero_pages: int
    runs: PageRuns
    compressed_pages: int = 0  # of data_pages, written as compressed records
    compressed_bytes: int = 0  # the bytes of their frames


def _errno_text(err: int) -> str:
    return f"{os.strerror(err)} (errno {err})"


def write_page_records(
    fd: int,
    file_offset: int,
    block: RamBlock,
    pages: PageBitmap,
    *,
    first_has_idstr: bool,
    detect_zero: bool = True,
    compress_level: int = 0,
) -> PageWriteResult:
    """Write one record per page set in ``pages``, in page order, at ``file_offset`` of ``fd``.

    The first record carries ``block.name`` as its idstr if ``first_has_idstr``, every other one
    has CONTINUE. With ``detect_zero`` an all-zero page becomes a 9-byte ZERO record (the page is
    read to tell); otherwise every page is a PAGE record. With ``compress_level`` (a zstd level,
    0: none) a page that compresses to at most 3/4 of its size becomes a compressed record. ``pages`` is copied first, so bits set
    meanwhile (by a fault handler) do not count; page bytes are whatever guest RAM holds when the
    kernel copies them. With no page set nothing is written, so no idstr was sent either.

    Raises ``StreamError`` (``offset`` = where the write stopped, the ``OSError`` as its cause)
    if the file refuses bytes; the records before that offset are in the file, the ones after
    are not, and no result is returned. Any thread; the GIL is released while writing.
    """
    if pages.npages != block.page_count:
        raise ValueError(
            f"bitmap of {pages.npages} pages used with RAM block {block.name!r} "
            f"of {block.page_count} pages"
        )
    if file_offset < 0:
        raise ValueError(f"file offset {file_offset} is negative")
    selected = pages.copy()  # private: the C scan may trust its count
    count = selected.count()
    runs = _new_uncleared("struct pyvmm_page_run[]", max(count, 1))
    stats = ffi.new("struct pyvmm_page_write_stats *")
    idstr = block.name.encode()
    # the exported buffer keeps the mapping alive should another thread close the block
    mem = ffi.from_buffer(block.mem)
    rc = lib.pyvmm_write_page_records(
        fd,
        file_offset,
        mem,
        block.page_count,
        ffi.cast("pyvmm_u64 *", selected.address),
        idstr,
        len(idstr),
        first_has_idstr,
        detect_zero,
        compress_level,
        runs,
        count,
        stats,
    )
    del mem
    if rc:
        err = -rc
        cause = OSError(err, os.strerror(err))
        raise StreamError(
            f"cannot write {count} page records of RAM block {block.name!r} to fd {fd}: "
            f"{_errno_text(err)}",
            offset=file_offset + int(stats.bytes_written),
        ) from cause
    nruns = int(stats.nruns)
    if nruns < count:
        # give back the worst-case array: a dense block has few runs and many pages
        exact = _new_uncleared("struct pyvmm_page_run[]", max(nruns, 1))
        ffi.memmove(exact, runs, nruns * ffi.sizeof("struct pyvmm_page_run"))
        runs = exact
    return PageWriteResult(
        bytes_written=int(stats.bytes_written),
        data_pages=int(stats.data_pages),
        zero_pages=int(stats.zero_pages),
        runs=PageRuns._adopt(runs, nruns),
        compressed_pages=int(stats.compressed_pages),
        compressed_bytes=int(stats.compressed_bytes),
    )


def read_page_runs(fd: int, block: RamBlock, runs: PageRuns | Iterable[RunTuple]) -> None:
    """Load ``runs`` of ``block`` from ``fd``: data runs read from the file, zero runs cleared.

    Every run is checked before anything is read or written: pages inside the block, a data
    run's bytes inside the file. Then, in the order given, a data run is read straight into
    guest RAM and the record header of each of its pages but the first compared with the one
    the writer puts there; a zero run's pages are cleared, except pages already zero, which are
    left untouched (so they cost no host memory).

    Raises ``FormatError`` for a run outside the block or the file (nothing written then) or a
    wrong record header (``offset`` = the header's); ``StreamError`` for a file that ends early
    or an I/O error. After a failure past the checks, pages of the failing run and of the runs
    before it may hold new bytes. Any thread; the GIL is released while reading.
    """
    if not isinstance(runs, PageRuns):
        runs = PageRuns(runs)
    err = ffi.new("struct pyvmm_page_read_error *")
    mem = ffi.from_buffer(block.mem, require_writable=True)
    rc = lib.pyvmm_read_page_runs(fd, mem, block.page_count, runs._array, len(runs), err)
    del mem
    if rc == 0:
        return
    where = f"RAM block {block.name!r}, page run {int(err.run)}"
    if rc < 0:
        cause = OSError(-rc, os.strerror(-rc))
        raise StreamError(
            f"cannot read {where} from fd {fd}: {_errno_text(-rc)}", offset=int(err.offset)
        ) from cause
    run = runs[int(err.run)]
    last_page = run.first_page + run.npages - 1
    if rc == lib.PYVMM_PAGEIO_RUN_OUTSIDE_BLOCK:
        raise FormatError(
            f"{where}: pages {run.first_page}..{last_page} are not inside its "
            f"{block.page_count} pages"
        )
    if rc == lib.PYVMM_PAGEIO_RUN_OUTSIDE_FILE:
        raise FormatError(
            f"{where}: {run.npages} page records from offset 0x{run.data_offset:x} run past "
            f"the end of the file (0x{int(err.offset):x} bytes)",
            offset=run.data_offset,
        )
    if rc == lib.PYVMM_PAGEIO_TRUNCATED:
        raise StreamError(f"{where}: the file ends inside the run", offset=int(err.offset))
    if rc == lib.PYVMM_PAGEIO_BAD_DATA:
        raise FormatError(f"{where}: compressed page {int(err.page)} does not inflate to one "
                          f"page ({int(err.found)} bytes of frame)", offset=int(err.offset))
    if rc == lib.PYVMM_PAGEIO_BAD_HEADER:
        page = int(err.page)
        flag = RAM_SAVE_FLAG_COMPRESSED if run.compressed else RAM_SAVE_FLAG_PAGE
        want = page * PAGE_SIZE | flag | RAM_SAVE_FLAG_CONTINUE
        raise FormatError(
            f"{where}: record header of page {page} is 0x{int(err.found):016x}, "
            f"expected 0x{want:016x}",
            offset=int(err.offset),
        )
    raise AssertionError(f"pyvmm_read_page_runs returned {rc}")  # pragma: no cover


def check_compressed_runs(fd: int, runs: Sequence[tuple[int, int, int, bool, bool]],
                          stream_end: int) -> None:
    """Walk and inflate (into a scratch page, in C) every compressed run of ``runs``
    (``(first_page, npages, data_offset, zero, compressed)``, one block's or several: nothing is
    written), reading no further than ``stream_end``: each record's header, length and frame
    (whose checksum finds damage).  FormatError naming the page and offset of the first bad
    record, StreamError for I/O errors."""
    packed = PageRuns(run for run in runs if run[4])
    if not len(packed):
        return
    err = ffi.new("struct pyvmm_page_read_error *")
    rc = lib.pyvmm_inflate_runs(fd, ffi.NULL, _U64_MAX, packed._array, len(packed), stream_end,
                                err)
    if rc == 0:
        return
    if rc < 0:
        raise StreamError(f"cannot read compressed pages: {_errno_text(-rc)}",
                          offset=int(err.offset))
    page = int(err.page)
    reason = {
        lib.PYVMM_PAGEIO_TRUNCATED: f"the stream ends inside compressed page {page}",
        lib.PYVMM_PAGEIO_BAD_DATA: f"compressed page {page} does not inflate to one page "
                                   f"({int(err.found)} bytes of frame)",
        lib.PYVMM_PAGEIO_BAD_HEADER: f"the record header of compressed page {page} is "
                                     f"0x{int(err.found):016x}, not 0x"
                                     f"{page * PAGE_SIZE | RAM_SAVE_FLAG_COMPRESSED | 0x20:016x}",
    }.get(rc, f"compressed run {int(err.run)} is bad ({rc})")
    raise FormatError(reason, offset=int(err.offset))


def index_record_counts(records: bytes, block_pages: Sequence[int], page_size: int,
                        stream_start: int, stream_end: int) -> tuple[int, int] | None:
    """``(data pages, zero pages)`` of page index ``records`` if every record lies inside its
    RAM block (``block_pages[b]`` pages), every data run inside the stream
    ``[stream_start, stream_end)``, and the runs are in RAM order without overlap (so no page
    is listed twice); else ``None``. One C pass: the container's commit check of an index that
    a save built, which the Python check then only has to explain when it fails."""
    if len(records) % _INDEX_RECORD_SIZE or not 0 <= stream_start <= stream_end:
        return None
    inc = ffi.new("struct pyvmm_chain_increment *")
    keep = ffi.from_buffer(records)
    inc.records = keep
    inc.nrecords = len(records) // _INDEX_RECORD_SIZE
    inc.stream_start = stream_start
    inc.stream_end = stream_end
    sizes = ffi.new("pyvmm_u64[]", list(block_pages) or [0])
    counts = ffi.new("struct pyvmm_chain_counts *")
    failed = ffi.new("unsigned *")
    err = ffi.new("struct pyvmm_page_read_error *")
    rc = lib.pyvmm_chain_check(inc, 1, len(block_pages), sizes, page_size, counts, failed, err)
    del keep
    if rc:
        return None
    return int(counts.data_pages), int(counts.zero_pages)


def sort_index_records(records: bytes) -> bytes:
    """Page index records (24 bytes each) in RAM order, block then first page, sorted in C."""
    if len(records) % _INDEX_RECORD_SIZE:
        raise ValueError(f"page index records are {_INDEX_RECORD_SIZE} bytes each")
    out = ffi.new("unsigned char[]", records) if records else None
    if out is None:
        return b""
    lib.pyvmm_index_records_sort(out, len(records) // _INDEX_RECORD_SIZE)
    result: bytes = ffi.buffer(out, len(records))[:]
    return result


_INDEX_RECORD = struct.Struct(">HBBIQQ")  # block, flags, reserved, npages, first page, offset
_INDEX_ZERO = 0x01


def check_data_record_headers(fd: int, records: bytes | memoryview, block_names: Sequence[str],
                              stream_start: int, stream_end: int) -> None:
    """Check that every data page a page index lists has, in front of its data in the stream,
    the record header a writer puts there: ``be64 page * PAGE_SIZE | PAGE | CONTINUE``, or, in
    front of a run's first page, ``PAGE`` followed by its RAM block's name (the first record
    of the block in its section).

    A reload that takes page data from the index (indexed, lazy, or a sequential one that reads
    a run whole) thereby relies on the same records a record-by-record parse of the stream
    sees, whichever pages it ends up reading. ``records`` are the increment's raw page index
    records, already checked (every data run inside ``[stream_start, stream_end)`` and its RAM
    block). Only the 8 header bytes of each page are touched (the stream is mapped, not read),
    and the comparison runs in C a run at a time.

    Raises FormatError naming the page and the offset of the first wrong header. Any thread.
    """
    if stream_end <= stream_start or not records:
        return
    size = os.fstat(fd).st_size
    if size < stream_end:
        raise FormatError(f"the stream ends at byte {stream_end} but the file has {size}",
                          offset=size)
    base = stream_start - stream_start % mmap.ALLOCATIONGRANULARITY
    names = [name.encode() for name in block_names]
    keep = [ffi.new("unsigned char[]", name) for name in names]
    name_ptrs = ffi.new("const unsigned char *[]", keep)
    name_lens = ffi.new("unsigned char[]", [len(name) for name in names])
    err = ffi.new("struct pyvmm_header_error *")
    with mmap.mmap(fd, stream_end - base, mmap.MAP_SHARED, mmap.PROT_READ,
                   offset=base) as mapped:
        bad = lib.pyvmm_check_record_headers(
            ffi.from_buffer(mapped), base, stream_end - base, stream_start,
            ffi.from_buffer(records), len(records) // _INDEX_RECORD.size, name_ptrs, name_lens,
            len(names), PAGE_SIZE, err)
    if bad:
        _bad_record_header(int(err.record), int(err.page), int(err.found), int(err.offset))


def _bad_record_header(run: int, page: int, found: int, offset: int) -> None:
    want = page * PAGE_SIZE | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
    raise FormatError(f"page run {run}: the record header of page {page} is 0x{found:016x}, "
                      f"not 0x{want:016x} or that page's named record", offset=offset)
