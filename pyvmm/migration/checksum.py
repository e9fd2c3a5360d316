"""CRC-32C checksums of checkpoints: the ``checksum`` capability's writer side, and the face.

What an increment's checksum block holds is described in ``formats/chpt.construct.py``: a CRC-32C
per data page, one per stream gap (the stream bytes outside the data runs' extents: section
headers, zero records, device sections), and the RAM digest, a CRC-32C over the per-page CRC
table of the whole RAM at the pause.

The writer side (:func:`increment_checksums`) runs after an increment's stream is in the file,
whatever wrote it (stop-and-copy, live, cow): it reads the stream back (page cache) in one C pass
(:mod:`~pyvmm.migration.checksum_stream`) and keeps the :class:`RamCrcTable` of the whole RAM up
to date. The reader side checks a reload (:mod:`~pyvmm.migration.checksum_reload`) and a whole
file (:mod:`pyvmm.migration.verify`). Every CRC is computed in C with the GIL released
(``pyvmm/native/crc.c``: the SSE4.2 instruction, three pages at a time, or slicing-by-8); which
implementation is chosen here too (:func:`using`, :func:`available_implementations`, from
:mod:`~pyvmm.migration.checksum_table`).
"""

from __future__ import annotations

import array
import struct
import threading
from collections.abc import Mapping, Sequence

from pyvmm._native import ffi, lib
from pyvmm.errors import ChecksumError
from pyvmm.ram import PageBitmap, RamBlock

from .checksum_format import ChecksumBlock, DeviceSectionCrc
from .checksum_stream import PARALLEL_PAGES, StreamCrcs, device_sections, stream_crcs
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
from .container import CheckpointFile
from .container_format import IncrementInfo, IndexRecords, PageRun, RamBlockInfo

__all__ = [
    "ALGORITHM",
    "CAPABILITY",
    "IMPLEMENTATIONS",
    "MAX_TABLE_PAGES",
    "ChecksumBlock",
    "DeviceSectionCrc",
    "RamBlockInfo",
    "RamCrcTable",
    "RamCrcsAhead",
    "available_implementations",
    "crc32c",
    "hardware",
    "implementation",
    "increment_checksums",
    "portable_only",
    "ram_page_crcs",
    "table_from_file",
    "using",
    "zero_page_crc",
]

ALGORITHM = "crc32c"
CAPABILITY = "checksum"
_RAM_CHUNK = 4096  # pages per piece of a long run when RAM CRCs are shared out between threads


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
