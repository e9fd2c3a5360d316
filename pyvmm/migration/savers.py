"""The built-in page savers: stop-and-copy, live (write-protect + shadow copies), cow (fork).

Each implements :class:`~pyvmm.migration.seams.PageSaver`: how the pages a checkpoint selected
reach its stream, and when the guest may run again.

* ``stop-and-copy`` writes every page with the guest paused; the checkpointer lets it run once
  the stream (and its checksums) are written.
* ``live`` write-protects RAM at the pause and lets the guest run at once; the C saver writes the
  pages (zero pages always as ZERO records), a page the guest is about to change being copied
  to a shadow buffer first (:mod:`pyvmm.migration.live`).  Its write-protect session is also the incremental tracker
  (one userfaultfd for the checkpointer's life: see :mod:`pyvmm.migration.dirty`).
* ``cow`` forks at the pause; a child writes the pages from its copy-on-write view while the
  guest runs on (:mod:`pyvmm.migration.cow`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..ram import PAGE_SIZE, PageBitmap
from .container import IndexRecords
from .cow import CowSnapshot, start_cow_snapshot
from .dirty import WpFaultTracker, make_tracker
from .live import save_pages_live
from .pageio import sort_index_records
from .postcopy_uffd import WriteProtectStats
from .ram_handler import RAM_SAVE_FLAG_EOS
from .savevm import QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_PART
from .seams import (
    DirtyTracker,
    PageEncoding,
    SanityError,
    SavedPages,
    SaveJob,
    SaverSetup,
)
from .stream import QEMUFile

# pages a live-only checkpoint may open per fault of a sequential writer: a 2 MiB huge page, so
# that its runs keep transparent huge pages whole (live_saver.c)
LIVE_FAULT_AROUND = 512


class _Saver:
    """Defaults: a saver that needs no hook does nothing there."""

    name = ""
    ram_unchanged_after_save = False

    def __init__(self, setup: SaverSetup) -> None:
        self.setup = setup

    def tracker(self) -> DirtyTracker | None:
        return None

    def before_pause(self, full: bool) -> None:
        pass

    def full_selection(self) -> dict[str, PageBitmap] | None:
        return None

    def at_pause(self, selection: dict[str, PageBitmap], release: Callable[[], None]) -> None:
        pass

    def check(self) -> None:
        pass

    def abandon(self) -> None:
        pass

    def after(self) -> None:
        pass

    def close(self) -> None:
        pass


class StopAndCopySaver(_Saver):
    """Every selected page written with the guest paused (QEMU's savevm)."""

    name = "stop-and-copy"
    ram_unchanged_after_save = True

    def save(self, job: SaveJob) -> SavedPages:
        ram = job.entries.ram
        ram.select(job.selection)
        ram.encoding = job.encoding
        try:
            job.entries.save_state.save_iterate(job.f)
        finally:
            ram.encoding = PageEncoding()
        counters = ram.counters
        return SavedPages(runs=ram.runs, data_pages=counters.data_pages,
                          zero_pages=counters.zero_pages,
                          compressed_pages=counters.compressed_pages,
                          compressed_bytes=counters.compressed_bytes)


class LiveSaver(_Saver):
    """RAM as at the pause, saved while the guest runs: write-protect, shadow copies."""

    name = "live"

    def __init__(self, setup: SaverSetup) -> None:
        super().__init__(setup)
        #: the incremental tracker: one write-protect session for the checkpointer's life
        self._tracking: WpFaultTracker | None = None
        self._live: WpFaultTracker | None = None  # this checkpoint's session's tracker
        self._populated: dict[str, PageBitmap] | None = None
        self._armed: WriteProtectStats | None = None

    def tracker(self) -> DirtyTracker | None:
        return self._tracking

    def before_pause(self, full: bool) -> None:
        """Guest running: the session that will save this checkpoint, tracking already (the
        incremental tracker's, or one for this checkpoint only), with the pages written so far
        protected again; for a full checkpoint also the populated pages.  The pause is then
        left with the pages written after this."""
        setup = self.setup
        blocks = setup.machine.ram_blocks
        live = self._tracking
        if live is None:
            # A live-only session tracks nothing for later, so a sequential writer may have runs
            # of up to 512 pages opened per fault; a tracker keeps its dirty pages exact.
            options = setup.tracker_options
            # the session is the tracker, whatever tracker was named (see dirty.py): its wp
            made = make_tracker("wp", blocks, unprotect_pages=options.unprotect_pages,
                                handler_cpu=options.handler_cpu, live=True,
                                shadow_pages=setup.shadow_pages,
                                fault_around=None if setup.incremental else
                                max(LIVE_FAULT_AROUND, options.unprotect_pages),
                                fault_mode=options.fault_mode)
            assert isinstance(made, WpFaultTracker)
            live = made
            if setup.incremental:
                self._tracking = live
        try:
            live.prepare()
            self._populated = {b.name: b.populated_pages() for b in blocks} if full else None
            live.prepare()  # what was written during the scan
        except BaseException:
            if live is not self._tracking:
                live.stop()
            raise
        self._live = live

    def full_selection(self) -> dict[str, PageBitmap] | None:
        """The populated pages found before the pause, and those written since (a page
        populated after the scan was written, so the session has it)."""
        assert self._live is not None and self._populated is not None
        selection = self._populated
        for name, pages in self._live.collect().items():
            selection[name] |= pages
        return selection

    def at_pause(self, selection: dict[str, PageBitmap], release: Callable[[], None]) -> None:
        assert self._live is not None
        session = self._live.session
        session.rearm(selection)
        self._armed = session.stats()  # a re-armed session's counters run on
        release()  # RAM is protected as at the pause: the guest runs while pages are saved

    def save(self, job: SaveJob) -> SavedPages:
        assert self._live is not None and self._armed is not None
        session = self._live.session
        f = job.f
        section_id = _begin_ram_part(job)
        result = save_pages_live(f, session, self.setup.machine.ram_blocks, job.selection,
                                 open_saved=self._live is not self._tracking,
                                 nice=self.setup.saver_nice,
                                 compress_level=job.encoding.compress_level)
        f.put_be64(RAM_SAVE_FLAG_EOS)
        f.put_u8(QEMU_VM_SECTION_FOOTER)
        f.put_be32(section_id)
        job.entries.ram.select({})
        wp = session.stats()
        carried = sum(b.count() for b in session.dirty.values()) \
            if self._live is self._tracking else 0  # a live-only session tracks nothing further
        return SavedPages(runs=result.runs, data_pages=result.data_pages,
                          zero_pages=result.zero_pages,
                          write_faults=wp.faults - self._armed.faults,
                          shadow_copies=wp.shadow_copies - self._armed.shadow_copies,
                          pages_carried=carried, compressed_pages=result.compressed_pages,
                          compressed_bytes=result.compressed_bytes)

    def check(self) -> None:
        assert self._live is not None
        wp = self._live.session.stats()
        if wp.queued or wp.handler_errno:
            raise SanityError(f"live save ended with {wp.queued} shadow copies unsaved, "
                              f"handler errno {wp.handler_errno}")

    def abandon(self) -> None:
        if self._live is not None:  # the handler must not wait for a saver that is gone
            self._live.session.abandon_round()

    def after(self) -> None:
        live, self._live = self._live, None
        self._populated = self._armed = None
        if live is not None and live is not self._tracking:
            live.stop()  # a live-only checkpointer tracks nothing between checkpoints

    def close(self) -> None:
        self.after()
        if self._tracking is not None:
            self._tracking.stop()
            self._tracking = None


class CowSaver(_Saver):
    """A forked child writes the pages (as at the fork) while the guest runs on."""

    name = "cow"

    def save(self, job: SaveJob) -> SavedPages:
        machine = self.setup.machine
        cow = self._start(job)
        job.release()  # the child has its copy of RAM: the guest runs on
        result = cow.wait()
        # the index in RAM order (the child writes block by block; a live saver sorts its own,
        # a stop-and-copy save writes in RAM order): the indexed reload then takes the chain
        # window by window
        numbers = {block.name: number for number, block in enumerate(machine.ram_blocks)}
        runs = IndexRecords(sort_index_records(b"".join(
            block_result.runs.index_records(numbers[name])
            for name, block_result in zip(self._blocks, result.blocks))))
        return SavedPages(runs=runs, data_pages=result.data_pages, zero_pages=result.zero_pages,
                          stream_length=job.f.offset - job.stream_offset + result.bytes_written,
                          fork_ms=result.fork_ms, compressed_pages=result.compressed_pages,
                          compressed_bytes=result.compressed_bytes)

    def _start(self, job: SaveJob) -> CowSnapshot:
        """Fork a child that writes the RAM pages (as at the fork) and the rest of the stream.

        ``job.f`` holds the stream's beginning; the PART header goes there, everything after
        the pages is built here as the child's ``tail``."""
        save_state = job.entries.save_state
        f = job.f
        section_id = _begin_ram_part(job)
        f.flush()
        tail = QEMUFile.memory()
        tail.put_be64(RAM_SAVE_FLAG_EOS)
        tail.put_u8(QEMU_VM_SECTION_FOOTER)
        tail.put_be32(section_id)
        job.entries.ram.select({})
        save_state.save_complete(tail)
        tail.put_bytes(job.device_bytes)
        save_state.save_trailer(tail, job.devices, PAGE_SIZE)
        jobs: list[Any] = [(block, job.selection[block.name], True)
                           for block in self.setup.machine.ram_blocks
                           if block.name in job.selection and job.selection[block.name].count()]
        self._blocks = [block.name for block, _, _ in jobs]
        fd = f.fd
        assert fd is not None
        return start_cow_snapshot(fd, f.offset, jobs, tail.getvalue(),
                                  detect_zero=job.encoding.detect_zero,
                                  compress_level=job.encoding.compress_level)


def _begin_ram_part(job: SaveJob) -> int:
    """The PART section header of the RAM entry, written to ``job.f``; its section id (a
    saver that writes pages outside save_iterate frames them itself)."""
    entry = job.entries.save_state.find("ram", 0)
    assert entry is not None
    job.f.put_u8(QEMU_VM_SECTION_PART)
    job.f.put_be32(entry.section_id)
    return int(entry.section_id)
