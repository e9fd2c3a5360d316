"""Reloading the first N increments of a checkpoint file into a new machine, three ways.

All three strategies give the same machine; they differ in what they read:

``sequential``
    every increment's whole stream, in order (the original QEMU fork's behaviour): RAM records
    of increment k overwrite those of k-1, device sections are loaded every time;
``partial``
    RAM records of every increment as ``sequential``; the device sections of the non-last
    increments are parsed (checked) into scratch state and dropped (the original's ``-EINTR``
    shortcut skipped them, so it took damage there that the others refuse); only the last
    increment's device sections are loaded;
``indexed`` (default)
    each guest page is read exactly once, from the newest increment that holds it, using the
    increments' page indexes (in C, a few MiB of RAM at a time through every increment, newest
    first: each huge page of guest RAM is filled while it is still cached; pages next to each
    other in the file share one ``preadv``, and a gap of up to ``sieve_pages`` records a newer
    increment holds is read into a scratch buffer rather than splitting the read); then every
    increment's stream is parsed without reading page data (the last one's device sections
    loaded, the others' checked and dropped). With checksums, each batch of pages read is
    compared with its CRCs by a second thread while the next batch is read (by the reading
    thread itself when that one is still busy).

Whatever the strategy, every reload makes the same structural checks of every increment of the
chain (:func:`check_increment_structure`, shared with the lazy reload and ``checkpoint
verify``): the whole stream parses, it holds as many page records as its page index lists, and
every data page the index lists has its own record header in front of it. So a damaged file is
refused by all of them or by none, and when none refuses, all load the same machine.

Whatever the strategy, device state comes from increment N-1 and device ``post_load`` runs
once, after the last increment (:attr:`ReloadReport.post_load` counts it per device); the
machine-level restore (CPU registers, Linux process, guest-inform) also happens once, at the end.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyvmm._native import ffi, lib

from ..devices.pl011 import UartSink
from ..errors import ChecksumError, ConfigError, FormatError, PyvmmError, StreamError
from ..machine import MAIN_RAM_NAME, Machine, RunState
from ..ram import PAGE_SIZE, PageBitmap, RamBlock
from .checksum_reload import check_before_load, check_reloaded_ram, reload_blocks
from .checksum_table import RamCrcTable
from .container import CheckpointFile, IncrementInfo, RamBlockInfo
from .container_format import MAX_MAIN_RAM, ContainerHeader
from .defaults import DEFAULT_STRATEGY, STRATEGIES
from .machine_state import (
    MachineStateEntries,
    apply,
    linux_state_from,
    machine_save_state,
)
from .page_index_format import page_index_records
from .pageio import check_data_record_headers
from .savevm import SaveStateEntry
from .stream import QEMUFile

OutputSink = Callable[[bytes], None]
#: Called as ``progress(done, total)`` in bytes of the file read so far.
Progress = Callable[[int, int], None]

#: Indexed reload: the largest gap (in page records a newer increment holds) read through rather
#: than split into two preadv calls. Measured with bench_reload (scattered single-page writes):
#: 1-2 records save 3-5 % of the page reading; larger gaps read more than they save.
DEFAULT_SIEVE_PAGES = 2
MAX_SIEVE_PAGES = 64


@dataclasses.dataclass
class ReloadReport:
    """What one reload read and did (for tests, benchmarks and ``--incoming`` summaries)."""

    path: str
    strategy: str
    increments: int
    #: page records whose data was copied from the file into guest RAM
    pages_read: int = 0
    #: indexed: preadv calls made for page data, and bytes read only to bridge a gap between
    #: two pages to read (``sieve_pages``)
    reads: int = 0
    sieved_bytes: int = 0
    #: streams parsed to load what they hold (RAM records or device sections)
    streams: int = 0
    #: streams parsed only to check their structure (indexed: all but the last)
    streams_checked: int = 0
    #: device post_load phases run, per ``idstr/instance``: 1 each after a correct reload
    post_load: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    #: the file had checksums and the reloaded RAM matched them
    checksums_verified: bool = False


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown reload strategy {strategy!r} (choose from "
                          f"{', '.join(STRATEGIES)})")
    return strategy


def main_ram_size(blocks: tuple[RamBlockInfo, ...], path: str) -> int:
    """The size of the main RAM block, FormatError when there is none or it is larger than any
    machine pyvmm builds (the header's layout as a whole was bounded when it was read)."""
    for block in blocks:
        if block.name == MAIN_RAM_NAME:
            if block.size > MAX_MAIN_RAM:
                raise FormatError(f"{path}: main RAM of {block.size} bytes is more than the "
                                  f"{MAX_MAIN_RAM >> 30} GiB pyvmm builds")
            return block.size
    raise FormatError(f"{path} has no {MAIN_RAM_NAME} RAM block")


def new_machine(header: ContainerHeader, path: str, uart_sink: UartSink | None = None) -> Machine:
    """A machine (PRELAUNCH, RAM untouched) with the RAM layout of ``header``."""
    machine = Machine(main_ram_size(header.ram_blocks, path), uart_sink=uart_sink,
                      name=header.machine or "guest")
    try:
        for block in header.ram_blocks:
            if block.name != MAIN_RAM_NAME:
                machine.add_ram_block(block.name, block.gpa, block.size)
    except ConfigError as err:
        machine.close()
        raise FormatError(f"{path}: {err}") from err
    except BaseException:
        machine.close()
        raise
    return machine


def scratch_entries(machine: Machine) -> MachineStateEntries:
    """Save-state entries over ``machine``'s RAM blocks whose device state is a private copy:
    a stream loaded into them puts its RAM records into the machine (unless the RAM handler
    skips pages) but changes none of its devices. For the streams whose device sections a
    reload checks but does not apply."""
    entries = machine_save_state(machine, with_linux=True)
    for entry in entries.save_state.device_entries:
        entry.opaque = copy.deepcopy(entry.opaque)
    return entries


def check_increment_structure(container: CheckpointFile, info: IncrementInfo,
                              entries: MachineStateEntries, records: bytes | memoryview, *,
                              final: bool, skip_pages: bool = True,
                              on_device: Callable[[SaveStateEntry], None] | None = None
                              ) -> int:
    """Parse increment ``info``'s whole stream into ``entries``, with the checks every reader
    of the file makes, whatever it reads (see the module docstring); returns the page records
    seen.

    ``records``: the increment's raw page index records (checked). Its stats blob must be
    sound (``checkpoint info`` shows it, so every reader refuses it alike). Every data page they list
    must have its record header in front of it; the stream must parse (sections, RAM records,
    device sections, with ``post_load`` when ``final``) and hold as many page records as the
    index lists. With ``skip_pages`` (default) no page data is read: RAM comes from elsewhere,
    or nowhere (``checkpoint verify``). FormatError (located at the increment) otherwise.
    """
    names = [block.name for block in container.header.ram_blocks]
    container.stats(info.index)  # small and CRC-checked: damage there is damage to the file
    try:
        check_data_record_headers(container.fd, records, names, info.stream_offset,
                                  info.stream_offset + info.stream_length)
    except FormatError as err:
        raise err.located(increment=info.index) from err
    ram = entries.ram
    ram.set_load_index_records(records)
    ram.skip_pages = skip_pages
    before = ram.pages_loaded
    f = QEMUFile.for_reading(container.fd, info.stream_offset, info.stream_length)
    try:
        entries.save_state.load(f, post_load=final, on_device=on_device)
    except FormatError as err:
        raise err.located(increment=info.index) from err
    finally:
        ram.skip_pages = False
    listed = info.pages + info.zero_pages
    seen = ram.pages_loaded - before
    if seen != listed:
        raise FormatError(f"stream holds {seen} page records, its page index {listed}",
                          increment=info.index)
    return seen


def reload_file(path: str, count: int | None = None, *, strategy: str = DEFAULT_STRATEGY,
                uart_sink: UartSink | None = None, stdout: OutputSink | None = None,
                stderr: OutputSink | None = None, progress: Progress | None = None,
                sieve_pages: int = DEFAULT_SIEVE_PAGES) -> tuple[Machine, ReloadReport]:
    """A new PAUSED machine holding the state of the first ``count`` (default all) increments.

    The machine is SHUTDOWN instead if the guest had powered off when it was saved.  Raises
    FormatError (one line: file, increment, section) for a damaged or foreign file and
    ConfigError for a count the file does not have.
    """
    check_strategy(strategy)
    if not 0 <= sieve_pages <= MAX_SIEVE_PAGES:
        raise ConfigError(f"sieve_pages must be 0..{MAX_SIEVE_PAGES}, not {sieve_pages}")
    started = time.perf_counter()
    with CheckpointFile.open(path) as container:
        header = container.header
        available = len(header.increments)
        if available == 0:
            raise FormatError(f"{path} holds no checkpoint yet")
        n = available if count is None else count
        if not 1 <= n <= available:
            raise ConfigError(f"{path} holds {available} increment(s), not {n}")
        increments = header.increments[:n]
        check_chain(increments, path)
        # with checksums: streams checked now, the reloaded RAM after loading (never run);
        # the indexed loader reads page data first and then parses only the last stream, so
        # the stream gaps are checked while it loads RAM (the last stream's before it is
        # parsed), and it checks each page it reads against the table as it goes
        indexed = strategy == "indexed"
        expected = check_before_load(container, increments, defer_gaps=indexed)
        machine = new_machine(header, path, uart_sink)
        report = ReloadReport(path=str(path), strategy=strategy, increments=n)
        try:
            _Loader(machine, container, increments, report, progress, sieve_pages,
                    expected).run(header.ram_blocks, stdout, stderr)
            if expected is not None:
                check_reloaded_ram(reload_blocks(machine.ram_blocks, header.ram_blocks),
                                   expected, n - 1, ram_checked=indexed)
                report.checksums_verified = True
        except BaseException:
            machine.close()
            raise
    report.seconds = time.perf_counter() - started
    return machine, report


def check_chain(increments: tuple[IncrementInfo, ...], path: str) -> None:
    """The increments must form one chain: 0 is full, each incremental's parent the one before."""
    for info in increments:
        if info.kind == "full":
            if info.parent != -1:
                raise FormatError(f"{path}: full increment {info.index} names parent "
                                  f"{info.parent}", increment=info.index)
        elif info.parent != info.index - 1:
            raise FormatError(f"{path}: incremental increment {info.index} has parent "
                              f"{info.parent}, not {info.index - 1}", increment=info.index)
    if increments and increments[0].kind != "full":
        raise FormatError(f"{path}: the first increment is not a full checkpoint", increment=0)


class _Loader:
    def __init__(self, machine: Machine, container: CheckpointFile,
                 increments: tuple[IncrementInfo, ...], report: ReloadReport,
                 progress: Progress | None, sieve_pages: int = DEFAULT_SIEVE_PAGES,
                 expected: RamCrcTable | None = None) -> None:
        self.machine = machine
        self.container = container
        self.increments = increments
        self.report = report
        self.progress = progress
        self.total = sum(i.stream_length for i in increments)
        self.done = 0
        self.sieve_pages = sieve_pages
        #: with checksums: the CRC every page must have, checked as pages are read (indexed)
        self.expected = expected
        self.post_load: collections.Counter[str] = collections.Counter()
        #: raw page index records per increment; the checks before the load read them already
        self._records: dict[int, memoryview] = dict(expected.index_records) if expected else {}

    def _index_records(self, increment: int) -> memoryview:
        """Increment ``increment``'s page index as raw records (magic, length and CRC checked),
        read once per reload; each record is checked where it is used (in C)."""
        records = self._records.get(increment)
        if records is None:
            records = page_index_records(self.container.page_index_blob(increment), increment)
            if records is None:
                self.container.page_index(increment)  # names what is wrong with the blob
                raise FormatError("malformed page index", increment=increment)
            self._records[increment] = records
        return records

    def _advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    def run(self, layout: tuple[RamBlockInfo, ...], stdout: OutputSink | None,
            stderr: OutputSink | None) -> None:
        machine = self.machine
        machine.set_state(RunState.INMIGRATE)
        entries = machine_save_state(machine, with_linux=True)
        strategy = self.report.strategy
        last = len(self.increments) - 1
        scratch: MachineStateEntries | None = None
        if strategy == "indexed":
            self._read_pages_newest_first(layout)
            if self.expected is not None:  # the stream gaps, checked while the RAM loaded
                self.expected.finish_checks()
            for info in self.increments[:-1]:
                # page data is in RAM already: the older streams are parsed for their checks
                scratch = scratch or scratch_entries(machine)
                check_increment_structure(self.container, info, scratch,
                                          self._index_records(info.index), final=False)
                self.report.streams_checked += 1
            self._load_stream(entries, self.increments[last], skip_ram=True, final=True)
        else:
            for k, info in enumerate(self.increments):
                final = k == last
                target = entries
                if strategy == "partial" and not final:
                    # RAM records into the machine, device sections checked into a copy
                    scratch = scratch or scratch_entries(machine)
                    target = scratch
                self._load_stream(target, info, final=final)
        self.report.post_load = dict(self.post_load)
        restore_machine(machine, entries, stdout, stderr)

    def _load_stream(self, entries: MachineStateEntries, info: IncrementInfo, *,
                     final: bool, skip_ram: bool = False) -> None:
        def device_loaded(entry: SaveStateEntry) -> None:
            if final:
                self.post_load[f"{entry.idstr}/{entry.instance_id}"] += 1

        check_increment_structure(self.container, info, entries,
                                  self._index_records(info.index), final=final,
                                  skip_pages=skip_ram, on_device=device_loaded)
        if not skip_ram:
            self.report.pages_read += info.pages
        self.report.streams += 1
        self._advance(info.stream_length)

    def _read_pages_newest_first(self, layout: tuple[RamBlockInfo, ...]) -> None:
        """Every page from the newest increment that holds it, each read once (and, with
        checksums, compared with the CRC it must have as it is read)."""
        blocks = reload_blocks(self.machine.ram_blocks, layout)  # the index numbers them so
        n = max(len(blocks), 1)
        claim = _ClaimArrays(blocks)
        bases, sizes, bits = claim.bases, claim.sizes, claim.bits
        options = ffi.new("struct pyvmm_claim_options *")
        options.sieve_pages = self.sieve_pages
        options.second_reader = _SECOND_READER
        expected = self.expected
        if expected is not None:
            tables = [ffi.from_buffer("unsigned int[]", t) for t in expected.blocks]
            crcs = ffi.new("unsigned int *[]", n)
            for i, table in enumerate(tables):
                crcs[i] = table
            options.crcs = crcs
            options.zero_crc = expected.zero_crc
            options.check_thread = _CHECK_THREAD
        windowed = _WINDOWED and self._read_window_by_window(len(blocks), bases, sizes, bits,
                                                             options)
        if not windowed:
            for info in reversed(self.increments):
                # checked record by record in C: no Python step per run
                self._claim_read(info, self._index_records(info.index), len(blocks), bases,
                                 sizes, bits, options)
                self._advance(info.stream_length if info is not self.increments[-1] else 0)
        if expected is not None:
            err = ffi.new("struct pyvmm_page_read_error *")
            rc = lib.pyvmm_claim_check_unclaimed(len(blocks), sizes, bits, options, err)
            if rc != 0:
                raise self._crc_error(err, None)

    def _read_window_by_window(self, nblocks: int, bases: Any, sizes: Any, bits: Any,
                               options: Any) -> bool:
        """Every increment's pages at once, a few MiB of RAM at a time (each huge page filled
        while cached: see chain_read.c); False, having read nothing, when an increment's runs are
        not in RAM order (then each is read in turn)."""
        increments = self.increments
        n = len(increments)
        raws = [ffi.from_buffer(self._index_records(info.index)) for info in increments]
        incs = ffi.new("struct pyvmm_chain_increment[]", n)
        for k, (info, raw) in enumerate(zip(increments, raws)):
            incs[k].records = raw
            incs[k].nrecords = len(raw) // _RECORD
            incs[k].stream_start = info.stream_offset
            incs[k].stream_end = info.stream_offset + info.stream_length
        counts = ffi.new("struct pyvmm_chain_counts[]", n)
        failed = ffi.new("unsigned *")
        err = ffi.new("struct pyvmm_page_read_error *")
        rc = lib.pyvmm_chain_check(incs, n, nblocks, sizes, PAGE_SIZE, counts, failed, err)
        if rc == lib.PYVMM_CHAIN_UNORDERED:
            return False
        if rc != 0:
            raise _claim_error(rc, err, increments[failed[0]])
        if any(counts[k].compressed_pages for k in range(n)):
            return False  # compressed runs are inflated whole, increment by increment
        for k in reversed(range(n)):
            info = increments[k]
            if counts[k].data_pages != info.pages or counts[k].zero_pages != info.zero_pages:
                raise FormatError(f"page index lists {counts[k].data_pages} data + "
                                  f"{counts[k].zero_pages} zero pages, the increment "
                                  f"{info.pages} + {info.zero_pages}", increment=info.index)
        handle = lib.pyvmm_chain_read_new(self.container.fd, incs, n, nblocks, bases, sizes,
                                          bits, PAGE_SIZE, options)
        if handle == ffi.NULL:
            raise MemoryError("cannot allocate the chain reader")
        total_pages = sum(sizes[b] for b in range(nblocks)) or 1
        streams = sum(info.stream_length for info in increments[:-1])
        progress = ffi.new("struct pyvmm_chain_progress *")
        start = self.done
        try:
            while True:
                rc = lib.pyvmm_chain_read_step(handle, _WINDOW_STEP_PAGES, progress, err)
                if rc == lib.PYVMM_CLAIM_BAD_CRC:
                    raise self._crc_error(err, increments[progress.failed])
                if rc != 0:
                    raise _claim_error(rc, err, increments[progress.failed])
                if progress.done:
                    break
                covered = min(int(progress.covered), total_pages)
                self._advance(start + streams * covered // total_pages - self.done)
        finally:
            lib.pyvmm_chain_read_free(handle)
        del raws
        self._advance(start + streams - self.done)
        self.report.pages_read += int(progress.pages_read)
        self.report.reads += int(progress.reads)
        self.report.sieved_bytes += int(progress.sieved_bytes)
        return True

    def _claim_read(self, info: IncrementInfo, records: memoryview, nblocks: int, bases: Any,
                    sizes: Any, bits: Any, options: Any) -> None:
        result = ffi.new("struct pyvmm_claim_result *")
        err = ffi.new("struct pyvmm_page_read_error *")
        raw = ffi.from_buffer(records)
        rc = lib.pyvmm_claim_read_index(
            self.container.fd, raw, len(records) // _RECORD, nblocks, bases, sizes, bits,
            PAGE_SIZE, info.stream_offset, info.stream_offset + info.stream_length,
            options, result, err)
        del raw
        if rc == lib.PYVMM_CLAIM_BAD_CRC:
            raise self._crc_error(err, info)
        if rc != 0:
            raise _claim_error(rc, err, info)
        if result.data_pages != info.pages or result.zero_pages != info.zero_pages:
            raise FormatError(f"page index lists {result.data_pages} data + {result.zero_pages} "
                              f"zero pages, the increment {info.pages} + {info.zero_pages}",
                              increment=info.index)
        self.report.pages_read += int(result.pages_read)
        self.report.reads += int(result.reads)
        self.report.sieved_bytes += int(result.sieved_bytes)

    def _crc_error(self, err: Any, info: IncrementInfo | None) -> ChecksumError:
        """A page read (``info``'s) or left zero (``info`` None) whose CRC is not the one the
        checksums say it must have."""
        expected = self.expected
        assert expected is not None
        block, page, found = int(err.run), int(err.page), int(err.found)
        where = expected.layout[block]
        gpa = where.gpa + page * expected.page_size
        want = expected.blocks[block][page]
        if info is not None and err.offset:
            return ChecksumError(
                f"page data does not match its checksum: RAM block {where.name!r} page {page} "
                f"(GPA 0x{gpa:x}) has CRC-32C 0x{found:08x}, not 0x{want:08x}",
                increment=info.index, offset=int(err.offset))
        # a zero run's page (info), or a page no increment holds
        source = info.index if info is not None else expected.source(block, page)
        return ChecksumError(
            f"reloaded RAM does not match the checksums: RAM block {where.name!r} page {page} "
            f"(GPA 0x{gpa:x}) is zero, its checksum 0x{want:08x} is not a zero page's",
            increment=len(self.increments) - 1 if source is None else source)


#: Read the chain window by window (False: increment by increment, as for an index whose runs
#: are out of order; tests compare the two).
_WINDOWED = True
#: With checksums and one reading thread (_SECOND_READER 0, or an index read increment by
#: increment), a second thread checks the CRCs of a batch of pages while the next is read
#: (indexed.c's struct pyvmm_claim_options: 1; 2 waits for it, 0 checks on the reading thread).
_CHECK_THREAD = 1
#: The window-by-window reader hands every other window to a second thread, which reads all the
#: increments' pages of it (and checks their CRCs): the kernel's zeroing and copying, most of a
#: reload, then use two cores (chain_read.c's pyvmm_claim_options.second_reader, which overrides
#: _CHECK_THREAD; 0: one thread reads all).
_SECOND_READER = 1
_RECORD = 24  # bytes of one page index record
_WINDOW_STEP_PAGES = 16384  # RAM pages per C call of the chain reader (64 MiB): progress between


class _ClaimArrays:
    """What the C claim readers take for ``blocks``: their RAM, page counts and a fresh claimed
    bitmap each (kept alive here as long as the arrays are used)."""

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        n = max(len(blocks), 1)
        self.claimed = [PageBitmap(b.page_count) for b in blocks]
        self.bases = ffi.new("void *[]", n)
        self.sizes = ffi.new("pyvmm_u64[]", n)
        self.bits = ffi.new("pyvmm_u64 *[]", n)
        self.mems = [ffi.from_buffer(b.mem, require_writable=True) for b in blocks]
        for i, block in enumerate(blocks):
            self.bases[i] = self.mems[i]
            self.sizes[i] = block.page_count
            self.bits[i] = ffi.cast("pyvmm_u64 *", self.claimed[i].address)


def holds_compressed(records: bytes | memoryview) -> bool:
    """Whether raw page index ``records`` list a compressed run (flags byte 0x02)."""
    return any(flags & 0x02 for flags in bytes(memoryview(records)[2::_RECORD]))


def inflate_compressed(machine: Machine, layout: tuple[RamBlockInfo, ...],
                       container: CheckpointFile, increments: Sequence[IncrementInfo],
                       records: Sequence[bytes | memoryview]) -> int:
    """Every page whose newest copy in the chain is a compressed record, inflated into RAM
    (C, newest increment first; data and zero runs only shadow older pages): a lazy reload's
    compressed pages, which its fault handler cannot find by offset, are there before it starts.
    Returns the pages inflated; FormatError for a record that does not inflate."""
    if not any(holds_compressed(r) for r in records):
        return 0
    blocks = reload_blocks(machine.ram_blocks, layout)
    claim = _ClaimArrays(blocks)
    options = ffi.new("struct pyvmm_claim_options *")
    options.compressed_only = 1
    result = ffi.new("struct pyvmm_claim_result *")
    err = ffi.new("struct pyvmm_page_read_error *")
    inflated = 0
    for info, raw_records in reversed(list(zip(increments, records))):
        raw = ffi.from_buffer(raw_records)
        rc = lib.pyvmm_claim_read_index(
            container.fd, raw, len(raw_records) // _RECORD, len(blocks), claim.bases,
            claim.sizes, claim.bits, PAGE_SIZE, info.stream_offset,
            info.stream_offset + info.stream_length, options, result, err)
        if rc != 0:
            raise _claim_error(rc, err, info)
        inflated += int(result.pages_read)
    return inflated


def _claim_error(rc: int, err: Any, info: IncrementInfo) -> PyvmmError:
    run, at = int(err.run), int(err.offset)
    if rc < 0:
        return StreamError(f"cannot read page run {run}: {os.strerror(-rc)}", offset=at)
    message = {
        lib.PYVMM_CLAIM_BAD_RECORD: "has a reserved byte set, unknown flags, a data "
                                    "offset on a zero run, or compressed pages where "
                                    "checksums are expected",
        lib.PYVMM_PAGEIO_RUN_OUTSIDE_BLOCK: "lies outside its RAM block",
        lib.PYVMM_PAGEIO_RUN_OUTSIDE_FILE: "has page data outside the increment's stream",
        lib.PYVMM_PAGEIO_TRUNCATED: "ends past the end of the file",
        lib.PYVMM_PAGEIO_BAD_HEADER: f"has a wrong record header at page {int(err.page)} "
                                     f"(0x{int(err.found):016x})",
        lib.PYVMM_PAGEIO_BAD_DATA: f"holds compressed page {int(err.page)}, which does not "
                                   f"inflate to one page ({int(err.found)} bytes of frame)",
    }.get(rc, f"failed ({rc})")
    return FormatError(f"page run {run} {message}", offset=at or None, increment=info.index)


def restore_machine(machine: Machine, entries: MachineStateEntries, stdout: OutputSink | None,
             stderr: OutputSink | None) -> None:
    """The machine-level post_load: registers, Linux process, run state (once per reload)."""
    apply(machine, entries)
    machine.seed = entries.machine_section.seed
    linux_state = linux_state_from(entries)
    if linux_state is not None:
        from ..linux import attach_process  # only Linux guests need the layer

        try:
            attach_process(machine, linux_state, stdout=stdout, stderr=stderr)
        except PyvmmError as err:
            raise FormatError(f"cannot restore the Linux process: {err}",
                              section="linux-user") from err
    machine.guest_inform.restored()
    machine.guest_inform.checkpoint_finished(True)  # the checkpoint we came from completed
    machine.set_state(RunState.PAUSED)
    if entries.machine_section.ended:
        machine.mark_shutdown(entries.machine_section.exit_code)
