"""The RAM save-state entry: QEMU's RAM section records over pyvmm's RAM blocks.

Saving: setup sends the MEM_SIZE block list; iterate sends the selected pages of every block
(PAGE, or ZERO for all-zero pages, or pyvmm's compressed record as the encoding says) through
the C page writer, straight from guest RAM; complete
sends what is left.  Every section body ends with EOS.  Which pages to send is the caller's
choice (:meth:`RamHandler.select`): all populated pages for a full checkpoint, dirty pages for an
incremental one.  The layout of what was written comes back as runs for the container's page index.

Loading: records are parsed in order, by C (``pyvmm_ram_walk``) for the common case of PAGE,
ZERO and compressed records of known blocks, by Python for everything else (block lists, and any record C finds
wrong, so each error has one message).  A PAGE record that starts a run of several pages known
from the page index is read, with the rest of its run, by one ``preadv`` into guest RAM (headers
checked in C).  Ids and sizes of blocks must match the machine's.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from pyvmm._native import ffi, lib

from ..errors import FormatError, StreamError
from ..ram import PAGE_SIZE, PageBitmap, RamBlock
from .container_format import IndexRecords
from .container_format import PageRun as IndexRecordRun
from .encoders import COMPRESSED_MAX, inflate_page
from .pageio import (
    PAGE_RECORD_SIZE,
    RAM_SAVE_FLAG_COMPRESSED,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    PageRun,
    read_page_runs,
    write_page_records,
)
from .seams import PageEncoding
from .stream import QEMUFile

RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_EOS = 0x10
_FLAG_MASK = PAGE_SIZE - 1
_KNOWN_FLAGS = (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_MEM_SIZE | RAM_SAVE_FLAG_PAGE |
                RAM_SAVE_FLAG_EOS | RAM_SAVE_FLAG_CONTINUE | RAM_SAVE_FLAG_COMPRESSED)
_PAGE_KINDS = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_COMPRESSED
RAM_SECTION_VERSION = 4
#: Bound on the number of RAM blocks a stream may list (each costs a lookup, nothing more).
MAX_BLOCKS = 64
#: One raw page index record, as the container stores it: block, flags, reserved, npages,
#: first page, data offset.
_INDEX_RECORD = struct.Struct(">HBBIQQ")
_INDEX_ZERO = 0x01
_INDEX_COMPRESSED = 0x02


#: A run of pages of one block, as the container's page index stores it (the index's own type:
#: the runs a save collects go into the index as they are).
IndexedRun = IndexRecordRun


@dataclasses.dataclass
class RamSaveCounters:
    """What one save sent (for stats and the container's table)."""

    data_pages: int = 0
    zero_pages: int = 0
    bytes_written: int = 0
    compressed_pages: int = 0  # of data_pages
    compressed_bytes: int = 0


class RamHandler:
    """The live entry ``ram`` (instance 0, version 4) for a list of RAM blocks."""

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        if len(blocks) > MAX_BLOCKS:
            raise ValueError(f"at most {MAX_BLOCKS} RAM blocks")
        self.blocks = list(blocks)
        self._selection: dict[str, PageBitmap] = {}
        self._records: list[bytes] = []  # page index records of the runs saved, per block
        self.counters = RamSaveCounters()
        #: How the pages of the next saves are written (the checkpointer's encoder sets it).
        self.encoding = PageEncoding()
        #: For loading: the page index of the increment being loaded, as raw records.
        self._index_records: bytes | memoryview = b""
        self._index_runs: dict[tuple[int, int], IndexedRun] | None = {}
        self._zero_runs: list[tuple[int, int, int]] | None = None
        self.pages_loaded = 0
        #: Loading parses the records but writes no page (the pages were placed already by an
        #: indexed reload, or a lazy reload fills RAM itself): indexed runs are skipped in one
        #: seek, other pages one by one; pages are still counted.
        self.skip_pages = False

    # ------------------------------------------------------------------------- saving
    def select(self, pages: Mapping[str, PageBitmap]) -> None:
        """Pages the next save sends, per block name (blocks not named send nothing)."""
        for name in pages:
            if not any(b.name == name for b in self.blocks):
                raise ValueError(f"no RAM block named {name!r}")
        self._selection = dict(pages)
        self._records = []
        self.counters = RamSaveCounters()

    def save_setup(self, f: QEMUFile) -> None:
        total = sum(b.size for b in self.blocks)
        f.put_be64(total | RAM_SAVE_FLAG_MEM_SIZE)
        for block in self.blocks:
            f.put_str8(block.name)
            f.put_be64(block.size)
        f.put_be64(RAM_SAVE_FLAG_EOS)

    def save_iterate(self, f: QEMUFile) -> bool:
        for number, block in enumerate(self.blocks):
            pages = self._selection.pop(block.name, None)
            if pages is None or not pages.count():
                continue
            if f.fd is None:
                self._save_pages_slowly(f, number, block, pages)
                continue
            f.flush()
            result = write_page_records(f.fd, f.offset, block, pages, first_has_idstr=True,
                                        detect_zero=self.encoding.detect_zero,
                                        compress_level=self.encoding.compress_level)
            f.written_externally(result.bytes_written)
            self.counters.data_pages += result.data_pages
            self.counters.zero_pages += result.zero_pages
            self.counters.bytes_written += result.bytes_written
            self.counters.compressed_pages += result.compressed_pages
            self.counters.compressed_bytes += result.compressed_bytes
            self._records.append(result.runs.index_records(number))
        f.put_be64(RAM_SAVE_FLAG_EOS)
        return True

    @property
    def runs(self) -> Sequence[IndexedRun]:
        """The page runs the saves to a file since :meth:`select` wrote (a memory stream's
        are not tracked), as the page index stores them: an increment of scattered pages has
        a run per page."""
        return IndexRecords(b"".join(self._records))

    def save_complete(self, f: QEMUFile) -> None:
        if self._selection:
            self.save_iterate(f)  # pages selected but not sent yet (no iterate round ran)
            return
        f.put_be64(RAM_SAVE_FLAG_EOS)

    def _save_pages_slowly(self, f: QEMUFile, number: int, block: RamBlock,
                           pages: PageBitmap) -> None:
        """Per-page encoding for memory streams (tests, small buffers); the C path's bytes
        without compression (a memory stream is never a checkpoint file)."""
        first = True
        zero = block.zero_pages(pages) if self.encoding.detect_zero else PageBitmap(
            block.page_count)
        for page in pages:
            cont = 0 if first else RAM_SAVE_FLAG_CONTINUE
            if page in zero:
                f.put_be64(page * PAGE_SIZE | RAM_SAVE_FLAG_ZERO | cont)
                if first:
                    f.put_str8(block.name)
                f.put_u8(0)
                self.counters.zero_pages += 1
            else:
                f.put_be64(page * PAGE_SIZE | RAM_SAVE_FLAG_PAGE | cont)
                if first:
                    f.put_str8(block.name)
                f.put_bytes(block.page(page))
                self.counters.data_pages += 1
            first = False

    # ------------------------------------------------------------------------- loading
    def set_load_index(self, runs: Sequence[IndexedRun]) -> None:
        """Runs from the container's page index of the increment about to be loaded."""
        self.set_load_index_records(b"".join(
            _INDEX_RECORD.pack(r.block, _INDEX_ZERO if r.zero else 0, 0, r.npages, r.first_page,
                               r.data_offset) for r in runs))

    def set_load_index_records(self, records: bytes | memoryview) -> None:
        """The same as raw 24-byte page index records (as the container stores them); they
        are only hints: a run is used where the stream has a record for its first page at its
        data offset."""
        if len(records) % _INDEX_RECORD.size:
            raise ValueError("page index records are 24 bytes each")
        self._index_records = records
        self._index_runs = None
        self._zero_runs = None

    @property
    def load_index(self) -> dict[tuple[int, int], IndexedRun]:
        """Data runs of the load index by (block number, absolute offset of their first page's
        data), decoded when the Python parser first needs them."""
        if self._index_runs is None:
            self._index_runs = {
                (block, data): IndexedRun(block, first, npages, data, False)
                for block, flags, _, npages, first, data in _INDEX_RECORD.iter_unpack(
                    self._index_records)
                if not flags & (_INDEX_ZERO | _INDEX_COMPRESSED)}
        return self._index_runs

    def _listed_zero(self, block: int, page: int) -> bool:
        """Whether the load index lists ``page`` of block number ``block`` in a zero run (as
        the C walk checks: the index-driven readers take zero pages from the index alone)."""
        if self._zero_runs is None:
            self._zero_runs = sorted(
                (b, first, npages) for b, flags, _, npages, first, _data in
                _INDEX_RECORD.iter_unpack(self._index_records) if flags & _INDEX_ZERO)
        runs = self._zero_runs
        i = bisect.bisect_right(runs, (block, page, 1 << 64)) - 1
        return i >= 0 and runs[i][0] == block and 0 <= page - runs[i][1] < runs[i][2]

    def load(self, f: QEMUFile, version_id: int) -> None:
        block: RamBlock | None = None
        number = -1
        walker = _Walker(self, f) if f.fd is not None else None
        while True:
            if walker is not None:
                number, done = walker.walk(number)
                if done:
                    return
                block = self.blocks[number] if number >= 0 else None
            at = f.offset
            header = f.get_be64()
            f.check()
            flags = header & _FLAG_MASK
            addr = header & ~_FLAG_MASK
            if flags & ~_KNOWN_FLAGS:
                raise FormatError(f"unknown RAM record flags 0x{flags:x}", offset=at)
            if flags & RAM_SAVE_FLAG_EOS:
                return
            if flags & RAM_SAVE_FLAG_MEM_SIZE:
                self._load_block_list(f, addr, at)
                continue
            if (flags & _PAGE_KINDS).bit_count() != 1:
                raise FormatError(f"RAM record without one type (flags 0x{flags:x})", offset=at)
            if not flags & RAM_SAVE_FLAG_CONTINUE:
                name = f.get_str8()
                f.check()
                number, block = self._block_named(name, at)
            elif block is None:
                raise FormatError("RAM record continues a block but none was named", offset=at)
            assert block is not None
            if addr + PAGE_SIZE > block.size:
                raise FormatError(f"RAM page at 0x{addr:x} is outside block {block.name} "
                                  f"({block.size} bytes)", offset=at)
            page = addr // PAGE_SIZE
            if flags & RAM_SAVE_FLAG_ZERO:
                fill = f.get_u8()
                f.check()
                if fill and (self.skip_pages or self._index_records):
                    # the page index lists the page as zero, and the index-driven reloads take
                    # it so: every reader of a checkpoint file refuses what says otherwise
                    raise FormatError(f"RAM page at 0x{addr:x} filled with 0x{fill:02x}, but "
                                      f"the page index lists it as a zero page", offset=at)
                if self._index_records and not self._listed_zero(number, page):
                    raise FormatError(f"RAM page at 0x{addr:x} of block {block.name} is a ZERO "
                                      f"record, but the page index does not list it as a zero "
                                      f"page", offset=at)
                if not self.skip_pages:
                    self._fill_page(block, page, fill)
            elif flags & RAM_SAVE_FLAG_COMPRESSED:
                self._load_compressed(f, block, page, at)
            elif self.skip_pages:
                self._skip_page(f, number, page)
            else:
                self._load_page(f, number, block, page)
            self.pages_loaded += 1

    def _load_page(self, f: QEMUFile, number: int, block: RamBlock, page: int) -> None:
        run = self.load_index.get((number, f.offset))
        if run is not None and run.first_page == page and f.fd is not None:
            read_page_runs(f.fd, block, [PageRun(run.first_page, run.npages, run.data_offset,
                                                 False)])
            f.skip((run.npages - 1) * PAGE_RECORD_SIZE + PAGE_SIZE)
            self.pages_loaded += run.npages - 1
        elif run is not None and run.first_page == page:
            self._load_run_from_memory(f, block, run)
        else:
            f.read_into(block.page(page))
        f.check()

    def _load_compressed(self, f: QEMUFile, block: RamBlock, page: int, at: int) -> None:
        """One compressed record's be16 length and frame, inflated into the page (C)."""
        length = f.get_be16()
        f.check()
        if not 0 < length <= COMPRESSED_MAX:
            raise FormatError(f"RAM block {block.name!r}: compressed page {page} does not "
                              f"inflate to one page ({length} bytes of frame, at most "
                              f"{COMPRESSED_MAX})", offset=at)
        frame = f.get_bytes(length)
        f.check()
        if not self.skip_pages and not inflate_page(frame, block.page(page)):
            raise FormatError(f"RAM block {block.name!r}: compressed page {page} does not "
                              f"inflate to one page ({length} bytes of frame)", offset=at)

    def _load_run_from_memory(self, f: QEMUFile, block: RamBlock, run: IndexedRun) -> None:
        """A run the page index lists, from a stream in memory: its record headers checked as
        read_page_runs checks them in a file (the same damage, the same error)."""
        last = run.first_page + run.npages - 1
        if last >= block.page_count:
            raise FormatError(f"RAM block {block.name!r}, page run 0: pages "
                              f"{run.first_page}..{last} are not inside its {block.page_count} "
                              f"pages")
        f.read_into(block.page(run.first_page))
        for page in range(run.first_page + 1, run.first_page + run.npages):
            at = f.offset
            found = f.get_be64()
            f.check()
            want = page * PAGE_SIZE | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
            if found != want:
                raise FormatError(f"RAM block {block.name!r}, page run 0: record header of "
                                  f"page {page} is 0x{found:016x}, expected 0x{want:016x}",
                                  offset=at)
            f.read_into(block.page(page))
        self.pages_loaded += run.npages - 1

    def _skip_page(self, f: QEMUFile, number: int, page: int) -> None:
        run = self.load_index.get((number, f.offset))
        if run is not None and run.first_page == page:
            f.skip((run.npages - 1) * PAGE_RECORD_SIZE + PAGE_SIZE)
            self.pages_loaded += run.npages - 1
        else:
            f.skip(PAGE_SIZE)
        f.check()

    @staticmethod
    def _fill_page(block: RamBlock, page: int, fill: int) -> None:
        if fill == 0:
            if not block.is_zero_page(page):
                block.page(page)[:] = bytes(PAGE_SIZE)
        else:
            block.page(page)[:] = bytes((fill,)) * PAGE_SIZE

    def _block_named(self, name: str, at: int) -> tuple[int, RamBlock]:
        for number, block in enumerate(self.blocks):
            if block.name == name:
                return number, block
        raise FormatError(f"RAM record for unknown block {name!r}", offset=at)

    def _load_block_list(self, f: QEMUFile, total: int, at: int) -> None:
        mine = sum(b.size for b in self.blocks)
        seen = 0
        for _ in range(MAX_BLOCKS):
            if seen >= total:
                break
            name = f.get_str8()
            length = f.get_be64()
            f.check()
            _, block = self._block_named(name, at)
            if length != block.size:
                raise FormatError(f"RAM size mismatch: block {name} is {length} bytes in the "
                                  f"checkpoint, {block.size} in this machine", offset=at)
            seen += length
        if seen != total or total != mine:
            raise FormatError(f"RAM size mismatch: the checkpoint has {total} bytes of RAM, "
                              f"this machine {mine}", offset=at)
        f.check()


class _Walker:
    """``pyvmm_ram_walk`` over one section body of ``f``: the C side of :meth:`RamHandler.load`."""

    def __init__(self, handler: RamHandler, f: QEMUFile) -> None:
        assert f.fd is not None
        self.handler = handler
        self.f = f
        self.fd = f.fd
        blocks = handler.blocks
        n = max(len(blocks), 1)
        self._names = [ffi.new("unsigned char[]", bytes((len(b.name.encode()),)) + b.name.encode())
                       for b in blocks]
        self._mems = [ffi.from_buffer(b.mem, require_writable=True) for b in blocks]
        self.names: Any = ffi.new("unsigned char *[]", n)
        self.bases: Any = ffi.new("void *[]", n)
        self.pages: Any = ffi.new("pyvmm_u64[]", n)
        for i, b in enumerate(blocks):
            self.names[i] = self._names[i]
            self.bases[i] = self._mems[i]
            self.pages[i] = b.page_count
        records = handler._index_records
        self.nindex = len(records) // _INDEX_RECORD.size
        self.index: Any = ffi.from_buffer(records) if self.nindex else ffi.NULL
        self.end = (f.offset + f.remaining if f.limit is not None
                    else os.fstat(self.fd).st_size)
        self.state: Any = ffi.new("struct pyvmm_ram_walk *")

    def walk(self, number: int) -> tuple[int, bool]:
        """Parse from the stream's position; (block of the next CONTINUE record, section done)."""
        f, w = self.f, self.state
        f.check()
        w.offset = f.offset
        w.end = self.end
        w.block = number
        rc = lib.pyvmm_ram_walk(self.fd, len(self.handler.blocks), self.names, self.bases,
                                self.pages, PAGE_SIZE, self.index, self.nindex,
                                int(self.handler.skip_pages), w)
        if w.offset > f.offset:
            f.skip(w.offset - f.offset)
        self.handler.pages_loaded += w.pages
        if rc < 0:
            raise StreamError(f"read failed: {os.strerror(-rc)}", offset=int(w.offset))
        return int(w.block), bool(w.eos)
