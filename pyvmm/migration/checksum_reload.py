"""A reload checked against the checksums: the file before it loads, the RAM after.

Before a reload (:func:`check_before_load`) each increment's page index, checksum block and
stream gaps are checked and the RAM CRC table the reloaded machine must match is built, in C
(``pyvmm/native/crcindex.c``), Python naming the problem only when C does not accept the file;
after it, :func:`check_reloaded_ram` compares the machine's RAM with that table. ChecksumError
or FormatError naming the increment otherwise: a damaged file is found, never loaded.
"""

from __future__ import annotations

import array
import os
import threading
from collections.abc import Sequence

from pyvmm._native import ffi, lib
from pyvmm.errors import ChecksumError, FormatError
from pyvmm.ram import RamBlock

from .checksum_format import check_checksum_counts, decode_checksums
from .checksum_stream import compare_stream, stream_crcs
from .checksum_table import (
    RECORD_SIZE,
    RamCrcTable,
    ram_page_crcs,
    u32_array,
    u64_array,
)
from .container import CheckpointFile
from .container_format import IncrementInfo, RamBlockInfo
from .page_index_format import page_index_records


def check_before_load(container: CheckpointFile,
                      increments: Sequence[IncrementInfo], *,
                      pages: bool = False, by_index: bool = False,
                      defer_gaps: bool = False) -> RamCrcTable | None:
    """Before a reload of ``increments``: ``None`` when the last has no checksum block (no
    checks); else check every one's page index, checksum block and stream gaps (``pages``: and
    page data) and return the RAM table the reloaded machine must match. ChecksumError or
    FormatError naming the increment otherwise.

    The checks run in C, one call per increment (:func:`_checked_in_c`); when that does not
    accept the file, the same checks run again in Python, which names what is wrong.

    ``by_index`` (for a loader that reads the page data of the increments before the last by
    their page indexes and parses only the last increment's stream, as the indexed and the
    lazy reload do): those increments' page records are the loader's. It finds page data by
    the index and compares each page it loads with its CRC; the record headers are not used
    (the ones it reads along with their pages are checked), and a page it does not read is not
    loaded. So a gap that is only the 8-byte record header of the next run's first page is not
    read when the checksum block has the CRC of the header that page must have (as the headers
    between the pages of one run never are here). In a 16-increment chain of scattered writes
    nearly every gap is such a header, one per 4 KiB page: reading them all took a third of
    what checksums add to its indexed reload, and 45 ms before a lazy reload's first
    instruction.

    ``defer_gaps`` (implies ``by_index``; for a loader that reads page data first and then
    parses the last stream, as the indexed reload does): the stream gaps are checked on a
    background thread while the RAM loads, the last increment's first; the loader waits for
    them (:meth:`RamCrcTable.finish_checks`, which raises their error) before it parses that
    stream, and :func:`check_reloaded_ram` waits if it did not (the container must still be
    open then)."""
    if not increments or not increments[-1].checksum_length:
        return None
    if not pages:
        table = _checked_in_c(container, increments, by_index or defer_gaps, defer_gaps)
        if table is not None:
            return table
    table = _checked_in_python(container, increments, pages=pages)
    if not pages:  # C found something the Python checks do not: still never load the file
        raise FormatError("the checksum checks in C rejected the file, those in Python did not")
    return table


def _checked_in_c(container: CheckpointFile, increments: Sequence[IncrementInfo],
                  by_index: bool = False, defer_gaps: bool = False) -> RamCrcTable | None:
    """:func:`check_before_load` without page data, in C: the RAM table, or ``None`` for
    anything not accepted (then the Python checks name it). Each increment's page index is
    checked and applied to the table in order (``pyvmm_crcindex_apply``, no I/O), then the
    stream gaps of all of them are read and compared on two threads (``pyvmm_crcindex_gaps``,
    the GIL released)."""
    header = container.header
    try:
        table = RamCrcTable(header.ram_blocks, header.page_size)
    except FormatError:
        return None
    start = max((i for i, info in enumerate(increments) if info.kind == "full"), default=0)
    nblocks = len(table.blocks)
    counts = [len(t) for t in table.blocks]
    seen = [u64_array((n + 63) // 64) for n in counts]
    c_tables = ffi.new("unsigned int *[]", max(nblocks, 1))
    c_seen = ffi.new("pyvmm_u64 *[]", max(nblocks, 1))
    keep = []  # cffi buffers alive for the calls
    for b in range(nblocks):
        keep.append(ffi.from_buffer("unsigned int[]", table.blocks[b], require_writable=True))
        keep.append(ffi.from_buffer("pyvmm_u64[]", seen[b], require_writable=True))
        c_tables[b], c_seen[b] = keep[-2], keep[-1]
    c_pages = ffi.new("pyvmm_u64[]", counts or [0])
    result = ffi.new("struct pyvmm_crcindex_result *")
    err = ffi.new("struct pyvmm_crcindex_error *")
    gap_jobs: list[tuple[IncrementInfo, memoryview, array.array[int]]] = []
    applied = False
    for number, info in enumerate(increments):
        if not info.checksum_length:
            if number >= start:
                return None
            try:
                container.page_index(info.index)  # RAM comes from the full increment on
            except FormatError:
                return None
            continue
        try:
            blob = container.page_index_blob(info.index)
            records = page_index_records(blob, info.index)
            data = os.pread(container.fd, info.checksum_length, info.checksum_offset)
            if records is None or len(data) != info.checksum_length:
                return None
            block = decode_checksums(data, increment=info.index, offset=info.checksum_offset)
        except FormatError:
            return None
        if info.kind == "full" and applied:  # the table is all zero pages until the first
            for t in table.blocks:
                t[:] = u32_array(len(t), table.zero_crc)
            table.sources = []
        applied = True
        raw = ffi.from_buffer(records)
        page_crcs = ffi.from_buffer("unsigned int[]", block.page_crcs)
        rc = lib.pyvmm_crcindex_apply(
            raw, len(records) // RECORD_SIZE, nblocks, c_tables, c_pages, c_seen, header.page_size,
            info.stream_offset, info.stream_offset + info.stream_length, page_crcs,
            len(block.page_crcs), table.zero_crc, result, err)
        del raw, page_crcs
        if rc or result.data_pages != info.pages or result.zero_pages != info.zero_pages:
            return None
        try:
            check_checksum_counts(info, int(result.data_runs), block)
        except FormatError:
            return None
        gap_jobs.append((info, records, block.gap_crcs))
        table.index_records[info.index] = records
        if number < start:
            continue
        table.sources.append((info.index, blob))
        if lib.pyvmm_crcindex_digest(nblocks, c_tables, c_pages) != block.ram_digest:
            return None
    del keep
    if defer_gaps and gap_jobs:
        table.pending = _DeferredGaps(container, increments, gap_jobs)
        return table
    if by_index:
        return table if _stream_gaps_match(container.fd, header.page_size, gap_jobs,
                                           threads=2) else None
    return table if _gaps_match(container.fd, header.page_size, gap_jobs) else None


class _DeferredGaps:
    """Stream gap checks running on a background thread (one thread: the loader runs
    meanwhile), on a duplicate of the container's descriptor, closed when done whether or not
    anyone waits (a loader that failed does not)."""

    def __init__(self, container: CheckpointFile, increments: Sequence[IncrementInfo],
                 jobs: Sequence[tuple[IncrementInfo, memoryview, array.array[int]]]) -> None:
        self._container = container
        self._increments = increments
        self._fd = os.dup(container.fd)
        self._ok = False
        self._thread = threading.Thread(target=self._run, args=(container.header.page_size,
                                                                jobs),
                                        name="pyvmm-crc-gaps", daemon=True)
        self._thread.start()

    def _run(self, page_size: int,
             jobs: Sequence[tuple[IncrementInfo, memoryview, array.array[int]]]) -> None:
        try:
            self._ok = _stream_gaps_match(self._fd, page_size, jobs, threads=1)
        finally:
            os.close(self._fd)

    def check(self) -> None:
        """Wait for the checks; raise what the Python checks say about the file if they
        failed."""
        self._thread.join()
        if not self._ok:
            _checked_in_python(self._container, self._increments, pages=False)
            raise FormatError("the checksum checks in C rejected the file, those in Python "
                              "did not")


def _stream_gaps_match(fd: int, page_size: int,
                       jobs: Sequence[tuple[IncrementInfo, memoryview, array.array[int]]],
                       threads: int) -> bool:
    """:func:`_gaps_match` for a loader that reads page data by the page indexes and parses
    the last job's stream: that one wholly first, then the others, whose page record headers
    between runs are left to the loader."""
    return (_gaps_match(fd, page_size, jobs[-1:], threads=1) and
            _gaps_match(fd, page_size, jobs[:-1], threads=threads, skip_headers=True))


def _gaps_match(fd: int, page_size: int,
                jobs: Sequence[tuple[IncrementInfo, memoryview, array.array[int]]],
                threads: int = 2, skip_headers: bool = False) -> bool:
    """Whether every increment's stream gaps have the CRCs of its checksum block: increments
    taken in turn by ``threads`` (1 or 2) threads (C calls, GIL released). ``skip_headers``: a
    gap that is only the record header of the next run's first page is taken as checked when
    the block has the CRC of the header that page must have (pyvmm_crcindex_gaps)."""
    todo = iter(range(len(jobs)))
    failed: list[int] = []

    def work() -> None:
        err = ffi.new("struct pyvmm_crcindex_error *")
        for number in todo:  # next() on a range iterator is atomic under the GIL
            info, records, gap_crcs = jobs[number]
            raw = ffi.from_buffer(records)
            crcs = ffi.from_buffer("unsigned int[]", gap_crcs)
            if lib.pyvmm_crcindex_gaps(fd, raw, len(records) // RECORD_SIZE, page_size,
                                       info.stream_offset,
                                       info.stream_offset + info.stream_length, crcs,
                                       len(gap_crcs), int(skip_headers), err):
                failed.append(number)
                return

    helper = threading.Thread(target=work, name="pyvmm-crc") \
        if len(jobs) > 1 and threads > 1 else None
    if helper is not None:
        helper.start()
    try:
        work()
    finally:
        if helper is not None:
            helper.join()
    return not failed


def _checked_in_python(container: CheckpointFile, increments: Sequence[IncrementInfo], *,
                       pages: bool) -> RamCrcTable:
    """:func:`check_before_load` for a file whose last increment has checksums, decoding each
    page index in Python."""
    header = container.header
    table = RamCrcTable(header.ram_blocks, header.page_size)
    start = max((i for i, info in enumerate(increments) if info.kind == "full"), default=0)
    for number, info in enumerate(increments):
        runs = container.page_index(info.index)
        block = container.checksums(info.index, runs)
        if block is None:
            if number < start:
                continue  # RAM comes from the full increment on; its devices are overwritten
            raise ChecksumError(f"increment {info.index} has no checksum block",
                                increment=info.index)
        crcs = stream_crcs(container.fd, info, runs, page_size=header.page_size, pages=pages)
        problems = compare_stream(container.fd, info, runs, header.ram_blocks, block, crcs)
        if problems:
            raise problems[0]
        if number < start:
            continue
        table.apply(info.kind, runs, block.page_crcs, info.index)
        if table.digest() != block.ram_digest:
            raise ChecksumError("the RAM digest does not match the page checksums",
                                increment=info.index, offset=info.checksum_offset)
    return table


def check_reloaded_ram(blocks: Sequence[RamBlock], expected: RamCrcTable,
                       increment: int, *, ram_checked: bool = False) -> None:
    """Raise ChecksumError naming the increment that holds the first bad page (else
    ``increment``, the last loaded) and the first bad pages unless the reloaded RAM ``blocks``
    (in file order) hold exactly what the checksums say. Waits for the checks
    :func:`check_before_load` deferred first, and raises their error. ``ram_checked``: the
    loader compared every page with ``expected`` already (the indexed reload does, as it reads
    them): only the deferred checks are waited for."""
    expected.finish_checks()
    if ram_checked:
        return
    actual = [ram_page_crcs(block) for block in blocks]
    bad = expected.first_mismatches(actual)
    if not bad:
        return
    page_size = expected.page_size
    shown = ", ".join(
        f"RAM block {expected.layout[b].name!r} page {p} "
        f"(GPA 0x{expected.layout[b].gpa + p * page_size:x})" for b, p in bad)
    source = expected.source(*bad[0])
    raise ChecksumError(f"reloaded RAM does not match the checksums: {shown}",
                        increment=increment if source is None else source)


def reload_blocks(machine_blocks: Sequence[RamBlock],
                  layout: Sequence[RamBlockInfo]) -> list[RamBlock]:
    """The machine's RAM blocks in the file's order."""
    by_name = {block.name: block for block in machine_blocks}
    return [by_name[info.name] for info in layout]
