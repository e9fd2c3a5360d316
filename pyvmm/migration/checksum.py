"""CRC-32C checksums of checkpoints: the ``checksum`` capability's computing and checking.

What an increment's checksum block holds is described in ``formats/chpt.construct.py``: a CRC-32C
per data page, one per stream gap (the stream bytes outside the data runs' extents: section
headers, zero records, device sections), and the RAM digest, a CRC-32C over the per-page CRC
table of the whole RAM at the pause.

The writer side (:func:`increment_checksums`) runs after an increment's stream is in the file,
whatever wrote it (stop-and-copy, live, cow): it reads the stream back (page cache) in one C pass
and keeps the :class:`RamCrcTable` of the whole RAM up to date. The reader side checks a reload
(:func:`check_before_load`, :func:`check_reloaded_ram`) and a whole file
(:mod:`pyvmm.migration.verify`). Every CRC is computed in C with the GIL released
(``pyvmm/native/crc.c``: the SSE4.2 instruction, three pages at a time, or slicing-by-8); before
a reload each increment's raw page index is checked and applied to the table in C too
(``pyvmm/native/crcindex.c``), Python naming the problem only when C does not accept the file.
"""

from __future__ import annotations

import array
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyvmm._native import ffi, lib
from pyvmm.errors import ChecksumError, FormatError, StreamError
from pyvmm.ram import PAGE_SIZE, PageBitmap, RamBlock

from .checksum_format import DeviceSectionCrc, check_checksum_counts, decode_checksums
from .checksum_table import (
    IMPLEMENTATIONS,
    MAX_TABLE_PAGES,
    RECORD_SIZE,
    RamCrcTable,
    available_implementations,
    crc32c,
    hardware,
    implementation,
    portable_only,
    ram_page_crcs,
    ram_run_crcs,
    u32_array,
    u64_array,
    using,
    zero_page_crc,
)
from .container import (
    PAGE_RECORD_HEADER,
    CheckpointFile,
    ChecksumBlock,
    IncrementInfo,
    PageRun,
)
from .container_format import IndexRecords, RamBlockInfo
from .page_index_format import page_index_records

__all__ = [
    "ALGORITHM",
    "CAPABILITY",
    "IMPLEMENTATIONS",
    "MAX_TABLE_PAGES",
    "ChecksumBlock",
    "DeviceSectionCrc",
    "RamBlockInfo",
    "RamCrcTable",
    "StreamCrcs",
    "available_implementations",
    "check_before_load",
    "check_reloaded_ram",
    "compare_stream",
    "crc32c",
    "device_sections",
    "hardware",
    "implementation",
    "increment_checksums",
    "page_location",
    "portable_only",
    "ram_page_crcs",
    "reload_blocks",
    "stream_crcs",
    "table_from_file",
    "using",
    "zero_page_crc",
]

ALGORITHM = "crc32c"
CAPABILITY = "checksum"
MAX_DEVICE_GAP = 64 << 20
"""Largest last gap searched for the device sections (it holds them, the trailer and the zero
records after the last data run)."""
_SECTION_FULL = 0x04
_RAM_CHUNK = 4096  # pages per piece of a long run when RAM CRCs are shared out between threads
# ----- reading a stream's CRCs -------------------------------------------------------------------


@dataclass(frozen=True)
class StreamCrcs:
    """CRCs of one increment's stream as read from the file: ``page_crcs`` in page-index order
    (``None`` when page data was skipped) and ``gap_crcs`` with ``gaps`` (offset, length) in
    file order."""

    page_crcs: array.array[int] | None
    gap_crcs: array.array[int]
    gaps: list[tuple[int, int]]


PARALLEL_PAGES = 16384
"""Streams with at least this many data pages are read back by two threads (the pread copy out
of the page cache is CPU-bound: two cores halve it)."""


class _Part:
    """One C pass over a byte range of a stream holding some of its (sorted) data runs."""

    def __init__(self, start: int, end: int,
                 runs: list[tuple[int, int, int, int]]) -> None:
        self.start, self.end, self.runs = start, end, runs
        self.gap_crcs = u32_array(len(runs) + 1)
        self.rc = 0
        self.err = ffi.new("struct pyvmm_crc_error *")

    def run(self, fd: int, page_size: int, page_ptr: object) -> None:
        c_runs = ffi.new("struct pyvmm_crc_run[]", max(len(self.runs), 1))
        for i, (offset, npages, first, out_index) in enumerate(self.runs):
            c_runs[i].data_offset = offset
            c_runs[i].npages = npages
            c_runs[i].first_page = first
            c_runs[i].out_index = out_index
        self.rc = lib.pyvmm_crc32c_stream(
            fd, self.start, self.end - self.start, c_runs, len(self.runs), page_size,
            PAGE_RECORD_HEADER + page_size, page_ptr,
            ffi.from_buffer("unsigned int[]", self.gap_crcs, require_writable=True), self.err)

    def check(self, info: IncrementInfo, page_size: int) -> None:
        rc, err = self.rc, self.err
        at = int(err.offset) or None
        if rc < 0:
            raise StreamError(f"cannot read the stream: {os.strerror(-rc)} (errno {-rc})",
                              increment=info.index, offset=at) from OSError(-rc,
                                                                            os.strerror(-rc))
        if rc == lib.PYVMM_CRC_TRUNCATED:
            raise FormatError("the stream is cut short by the end of the file",
                              increment=info.index, offset=at)
        if rc == lib.PYVMM_CRC_BAD_RUNS:
            raise FormatError(f"data run at 0x{self.runs[int(err.run)][0]:x} overlaps another "
                              f"or lies outside the stream", increment=info.index)
        if rc == lib.PYVMM_CRC_BAD_HEADER:
            _, _, first, _ = self.runs[int(err.run)]
            _bad_header(info, first + int(err.page), int(err.found), int(err.offset),
                        page_size)
        assert rc == 0, rc


def _bad_header(info: IncrementInfo, page: int, found: int, offset: int,
                page_size: int) -> None:
    want = page * page_size | 0x28
    raise FormatError(f"record header of page {page} is 0x{found:016x}, expected "
                      f"0x{want:016x}", increment=info.index, offset=offset)


def stream_crcs(fd: int, info: IncrementInfo, runs: Sequence[PageRun], *,
                page_size: int = PAGE_SIZE, pages: bool = True) -> StreamCrcs:
    """C passes over increment ``info``'s stream: its page CRCs (with ``pages``; the record
    headers inside data runs are compared with the expected ones too) and its gap CRCs (without
    ``pages``, the page data is not read at all). A long stream is cut in two at a page boundary
    and read by two threads (GIL released). FormatError for runs that do not fit the stream or
    a wrong record header, StreamError for I/O errors. Any thread."""
    stride = PAGE_RECORD_HEADER + page_size
    data_runs = []
    position = 0
    for run in runs:
        if not run.zero:
            data_runs.append((run.data_offset, run.npages, run.first_page, position))
            position += run.npages
    data_runs.sort()
    stream_end = info.stream_offset + info.stream_length
    page_crcs = u32_array(position) if pages else None
    page_ptr = (ffi.from_buffer("unsigned int[]", page_crcs, require_writable=True)
                if page_crcs is not None and position else
                ffi.new("unsigned int[]", 1) if pages else ffi.NULL)
    split_header: tuple[int, int] | None = None  # (file offset, page) of a header between parts
    if pages and position >= PARALLEL_PAGES:
        # cut where half the pages are on each side, inside a run if need be
        left = position // 2
        r = 0
        while data_runs[r][1] <= left:
            left -= data_runs[r][1]
            r += 1
        offset, npages, first, out_index = data_runs[r]
        if left == 0:
            parts = [_Part(info.stream_offset, offset, data_runs[:r]),
                     _Part(offset, stream_end, data_runs[r:])]
        else:
            second = offset + left * stride
            parts = [_Part(info.stream_offset, second - PAGE_RECORD_HEADER,
                           data_runs[:r] + [(offset, left, first, out_index)]),
                     _Part(second, stream_end, [(second, npages - left, first + left,
                                                 out_index + left)] + data_runs[r + 1:])]
            split_header = (second - PAGE_RECORD_HEADER, first + left)
        helper = threading.Thread(target=parts[1].run, args=(fd, page_size, page_ptr),
                                  name="pyvmm-crc")
        helper.start()
        try:
            parts[0].run(fd, page_size, page_ptr)
        finally:
            helper.join()
        for part in parts:
            part.check(info, page_size)
        # the first part's last gap is empty when cut inside a run; the second's first always
        head = parts[0].gap_crcs if split_header is None else parts[0].gap_crcs[:-1]
        gap_crcs = head + parts[1].gap_crcs[1:]
        if split_header is not None:
            header_offset, page = split_header
            raw = os.pread(fd, PAGE_RECORD_HEADER, header_offset)
            found = int.from_bytes(raw, "big") if len(raw) == PAGE_RECORD_HEADER else -1
            if found != page * page_size | 0x28:
                _bad_header(info, page, found, header_offset, page_size)
    else:
        part = _Part(info.stream_offset, stream_end, data_runs)
        part.run(fd, page_size, page_ptr)
        part.check(info, page_size)
        gap_crcs = part.gap_crcs
    gaps = []
    start = info.stream_offset
    for offset, npages, _, _ in data_runs:
        gaps.append((start, offset - start))
        start = offset + (npages - 1) * stride + page_size
    gaps.append((start, stream_end - start))
    return StreamCrcs(page_crcs, gap_crcs, gaps)


def page_location(header_blocks: Sequence[RamBlockInfo], runs: Sequence[PageRun],
                  position: int, page_size: int = PAGE_SIZE) -> str:
    """'RAM block NAME page P (GPA 0x...)' of the data page at ``position`` in page-index order."""
    for run in runs:
        if run.zero:
            continue
        if position < run.npages:
            block = header_blocks[run.block]
            page = run.first_page + position
            return f"RAM block {block.name!r} page {page} (GPA 0x{block.gpa + page * page_size:x})"
        position -= run.npages
    return f"data page {position}"


def _section_crc(fd: int, section: DeviceSectionCrc) -> int:
    data = os.pread(fd, section.length, section.offset)  # checked inside the stream
    return crc32c(data) if len(data) == section.length else -1


def device_sections(fd: int, gap: tuple[int, int], device_bytes: bytes,
                    devices: Sequence[Mapping[str, object]]) -> tuple[DeviceSectionCrc, ...]:
    """The device sections of a stream whose last gap is ``gap`` (offset, length) and which
    holds ``device_bytes``, the FULL sections of ``devices`` (the savevm descriptions, in
    order): found by their headers, each with its CRC. ``()`` when they cannot be found."""
    offset, length = gap
    if not device_bytes or not devices or length > MAX_DEVICE_GAP:
        return ()
    where = os.pread(fd, length, offset).rfind(device_bytes)
    if where < 0:
        return ()
    starts: list[tuple[str, int, int]] = []
    position = 0
    for device in devices:
        name, instance = device.get("name"), device.get("instance_id")
        if not isinstance(name, str) or not isinstance(instance, int):
            return ()
        idstr = name.encode()
        tail = bytes([len(idstr)]) + idstr + struct.pack(">I", instance)
        found = device_bytes.find(tail, position + 5)
        if found < 5 or device_bytes[found - 5] != _SECTION_FULL:
            return ()
        starts.append((name, instance, found - 5))
        position = found
    sections = []
    for number, (name, instance, start) in enumerate(starts):
        end = starts[number + 1][2] if number + 1 < len(starts) else len(device_bytes)
        sections.append(DeviceSectionCrc(name, instance, offset + where + start, end - start,
                                         crc32c(device_bytes[start:end])))
    return tuple(sections)


def compare_stream(fd: int, info: IncrementInfo, runs: Sequence[PageRun],
                   layout: Sequence[RamBlockInfo], block: ChecksumBlock,
                   crcs: StreamCrcs) -> list[ChecksumError]:
    """Every disagreement between a stream's CRCs and its checksum block (first gap, first few
    pages), as ChecksumErrors naming the increment and the device section, page or byte
    range."""
    problems = []
    for number, (want, have) in enumerate(zip(block.gap_crcs, crcs.gap_crcs)):
        if want != have:
            offset, length = crcs.gaps[number]
            last = number == len(crcs.gaps) - 1
            damaged = [d for d in block.sections if last and _section_crc(fd, d) != d.crc]
            if damaged:
                d = damaged[0]
                problems.append(ChecksumError(
                    f"device section {d.name!r} instance {d.instance_id} (bytes "
                    f"0x{d.offset:x}..0x{d.offset + d.length:x}) does not match its checksum",
                    increment=info.index, offset=d.offset, section=d.name))
                break
            what = "after the RAM pages (device sections, trailer)" if last else \
                "outside page data"
            problems.append(ChecksumError(
                f"stream bytes 0x{offset:x}..0x{offset + length:x} {what} do not match their "
                f"checksum", increment=info.index, offset=offset))
            break
    if crcs.page_crcs is not None and crcs.page_crcs != block.page_crcs:
        bad = [i for i, (a, b) in enumerate(zip(block.page_crcs, crcs.page_crcs)) if a != b]
        shown = ", ".join(page_location(layout, runs, i) for i in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        problems.append(ChecksumError(
            f"page data of {shown}{more} does not match its checksum", increment=info.index))
    return problems


# ----- writing ---------------------------------------------------------------------------------


class RamCrcsAhead:
    """Page CRCs of the pages a stop-and-copy save is about to write, computed from RAM on a
    thread of their own while the save writes them (RAM does not change until the guest runs
    again): the checksums then cost the CPU time of a second core, not a pass after the write.

    One C call per RAM block (the GIL released); pages not selected are not read.
    """

    def __init__(self, blocks: Sequence[RamBlock], selection: Mapping[str, PageBitmap]) -> None:
        self.tables: list[array.array[int] | None] = [
            u32_array(b.page_count) if b.name in selection else None for b in blocks]
        jobs = [(b, selection[b.name], t) for b, t in zip(blocks, self.tables) if t is not None]
        self._thread = threading.Thread(target=self._run, args=(jobs,), name="pyvmm-crc-ahead",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _run(jobs: Sequence[tuple[RamBlock, PageBitmap, array.array[int]]]) -> None:
        for block, pages, table in jobs:
            lib.pyvmm_crc32c_pages(ffi.from_buffer(block.mem), block.size // block.page_count,
                                   block.page_count, ffi.cast("pyvmm_u64 *", pages.address),
                                   ffi.from_buffer("unsigned int[]", table,
                                                   require_writable=True))

    def result(self) -> list[array.array[int] | None]:
        """Per block (None: not selected), each page's CRC; waits for the thread."""
        self._thread.join()
        return self.tables


def increment_checksums(container: CheckpointFile, kind: str, stream_offset: int,
                        stream_length: int, runs: Sequence[PageRun], table: RamCrcTable,
                        device_bytes: bytes = b"",
                        devices: Sequence[Mapping[str, object]] = (),
                        from_ram: Sequence[RamBlock] | None = None,
                        ahead: RamCrcsAhead | None = None
                        ) -> tuple[ChecksumBlock, RamCrcTable]:
    """The checksum block of an increment whose stream is in the file, and the RAM table after
    it (``table`` is left as it is: the caller keeps the new one once the commit succeeded).
    ``device_bytes`` and ``devices`` (what savevm's ``save_devices`` wrote and returned) let the
    block name each device section.  ``from_ram``: the machine's RAM blocks, unchanged since the
    pause (stop-and-copy): page CRCs come from RAM (``ahead``: computed already, while the
    stream was written), and only the stream bytes around the page data are read back."""
    if from_ram is not None:
        done = _increment_checksums_in_c(container, kind, stream_offset, stream_length, runs,
                                         table, from_ram, ahead)
        if done is not None:
            page_crcs, gap_crcs, last_gap, after = done
            sections = device_sections(container.fd, last_gap, device_bytes, devices)
            return ChecksumBlock(ALGORITHM, after.digest(), page_crcs, gap_crcs,
                                 sections), after
    info = IncrementInfo(index=len(container.header.increments), kind=kind, parent=-1,
                         created_ns=0, stream_offset=stream_offset, stream_length=stream_length,
                         pages=0, zero_pages=0, stream_crc=0, index_offset=0, index_length=0,
                         stats_offset=0, stats_length=0)
    crcs = stream_crcs(container.fd, info, runs, page_size=container.header.page_size,
                       pages=from_ram is None)
    if from_ram is not None:
        crcs = StreamCrcs(ram_run_crcs(from_ram, runs), crcs.gap_crcs, crcs.gaps)
    assert crcs.page_crcs is not None
    after = table.copy()
    after.apply(kind, runs, crcs.page_crcs)
    sections = device_sections(container.fd, crcs.gaps[-1], device_bytes, devices)
    return ChecksumBlock(ALGORITHM, after.digest(), crcs.page_crcs, crcs.gap_crcs,
                         sections), after


_RUN_RECORD = struct.Struct(">HBBIQQ")  # a raw page index record (container_format's layout)


def _increment_checksums_in_c(container: CheckpointFile, kind: str, stream_offset: int,
                              stream_length: int, runs: Sequence[PageRun], table: RamCrcTable,
                              from_ram: Sequence[RamBlock], ahead: RamCrcsAhead | None = None
                              ) -> tuple[array.array[int], array.array[int], tuple[int, int],
                                         RamCrcTable] | None:
    """:func:`increment_checksums` of a stop-and-copy save without a Python step per run: the
    runs packed as raw page index records, page CRCs from RAM (``pyvmm_crcindex_ram_crcs``)
    while a helper thread reads the gaps (``pyvmm_crcindex_gap_crcs``), then the table applied
    in C. (page CRCs, gap CRCs, the last gap, the table after) or ``None`` if C declines (the
    Python path then does it)."""
    page_size = container.header.page_size
    if len(from_ram) != len(table.blocks) or any(
            block.page_count != len(t) for block, t in zip(from_ram, table.blocks)):
        return None
    if isinstance(runs, IndexRecords):  # a save's runs: the records already
        records = runs.records
        data_runs, data_pages = runs.data_counts()
    else:
        try:
            records = b"".join([_RUN_RECORD.pack(r.block, 1 if r.zero else 0, 0, r.npages,
                                                 r.first_page, r.data_offset) for r in runs])
        except struct.error:
            return None
        data_pages = sum(r.npages for r in runs if not r.zero)
        data_runs = sum(1 for r in runs if not r.zero)
    nblocks = len(from_ram)
    page_crcs = u32_array(data_pages)
    gap_crcs = u32_array(data_runs + 1)
    mems = [ffi.from_buffer(block.mem) for block in from_ram]
    bases = ffi.new("void *[]", mems or [ffi.NULL])
    c_pages = ffi.new("pyvmm_u64[]", [len(t) for t in table.blocks] or [0])
    raw = ffi.from_buffer(records)
    out = ffi.from_buffer("unsigned int[]", page_crcs, require_writable=True)
    last = ffi.new("pyvmm_u64 *")
    results = [0, 0, 0]

    def ram_part(slot: int, first: int, count: int, position: int, npages: int) -> None:
        err = ffi.new("struct pyvmm_crcindex_error *")
        results[slot] = lib.pyvmm_crcindex_ram_crcs(ram_records + first * RECORD_SIZE, count,
                                                    nblocks, bases, c_pages, page_size,
                                                    out + position, npages, err)

    def gap_part() -> None:
        err = ffi.new("struct pyvmm_crcindex_error *")
        results[2] = lib.pyvmm_crcindex_gap_crcs(
            container.fd, raw, len(runs), page_size, stream_offset, stream_offset + stream_length,
            ffi.from_buffer("unsigned int[]", gap_crcs, require_writable=True), len(gap_crcs),
            last, err)

    # the RAM CRCs in two halves by pages: long runs cut in _RAM_CHUNK pieces (for RAM only:
    # the gaps and the table take the runs as they are)
    ram_records, split, before = raw, len(runs), data_pages
    ram_keep = None
    if data_pages >= PARALLEL_PAGES:
        pieces: list[bytes] = []
        before = 0
        for block, flags, _, npages, first_page, _ in _RUN_RECORD.iter_unpack(records):
            if flags & 1:  # a zero run
                continue
            for done in range(0, npages, _RAM_CHUNK):
                count = min(_RAM_CHUNK, npages - done)
                if before < data_pages // 2:
                    split = len(pieces) + 1
                    before += count
                pieces.append(_RUN_RECORD.pack(block, 0, 0, count, first_page + done, 0))
        ram_keep = b"".join(pieces)
        ram_records = ffi.from_buffer(ram_keep)
        nram = len(pieces)
    else:
        nram = len(runs)

    def helper_work() -> None:
        gap_part()
        if split < nram:
            ram_part(1, split, nram - split, before, data_pages - before)

    if ahead is not None:  # the page CRCs were taken while the stream was written
        tables_ahead = ahead.result()
        keep = [ffi.NULL if t is None else ffi.from_buffer("unsigned int[]", t)
                for t in tables_ahead]
        block_crcs = ffi.new("unsigned int *[]", keep or [ffi.NULL])
        err = ffi.new("struct pyvmm_crcindex_error *")
        results[0] = lib.pyvmm_crcindex_gather(raw, len(runs), nblocks, block_crcs, c_pages,
                                               out, data_pages, err)
        gap_part()
    else:
        helper = threading.Thread(target=helper_work, name="pyvmm-crc")
        helper.start()
        try:
            ram_part(0, 0, split, 0, before)
        finally:
            helper.join()
    if any(results):
        return None
    after = table.copy()
    if kind == "full":
        for t in after.blocks:
            t[:] = u32_array(len(t), after.zero_crc)
        after.sources = []
    tables = [ffi.from_buffer("unsigned int[]", t, require_writable=True) for t in after.blocks]
    c_tables = ffi.new("unsigned int *[]", tables or [ffi.NULL])
    seen = [u64_array((len(t) + 63) // 64) for t in after.blocks]
    c_seen_keep = [ffi.from_buffer("pyvmm_u64[]", b, require_writable=True) for b in seen]
    c_seen = ffi.new("pyvmm_u64 *[]", c_seen_keep or [ffi.NULL])
    result = ffi.new("struct pyvmm_crcindex_result *")
    err = ffi.new("struct pyvmm_crcindex_error *")
    rc = lib.pyvmm_crcindex_apply(raw, len(runs), nblocks, c_tables, c_pages, c_seen, page_size,
                                  stream_offset, stream_offset + stream_length, out, data_pages,
                                  after.zero_crc, result, err)
    if rc:
        return None
    after.sources.append((-1, runs))
    return page_crcs, gap_crcs, (int(last[0]), stream_offset + stream_length - int(last[0])), after


def table_from_file(container: CheckpointFile, count: int | None = None) -> RamCrcTable:
    """The RAM CRC table after the first ``count`` (default all) increments, from their checksum
    blocks; ChecksumError if one since the last full increment has none."""
    header = container.header
    increments = header.increments[:count] if count is not None else header.increments
    table = RamCrcTable(header.ram_blocks, header.page_size)
    start = 0
    for info in increments:
        if info.kind == "full":
            start = info.index
    for info in increments[start:]:
        runs = container.page_index(info.index)
        block = container.checksums(info.index, runs)
        if block is None:
            raise ChecksumError(f"{container.path}: increment {info.index} has no checksum block",
                                increment=info.index)
        table.apply(info.kind, runs, block.page_crcs, info.index)
        if table.digest() != block.ram_digest:
            raise ChecksumError("the RAM digest does not match the page checksums",
                                increment=info.index, offset=info.checksum_offset)
    return table


# ----- reload ------------------------------------------------------------------------------------


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
