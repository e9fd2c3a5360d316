"""Checkpoint orchestration: ``chpt:`` targets, taking a checkpoint of a machine, reloading one.

Grammar of targets (as in the original QEMU fork)::

    chpt:FILE              save increments into FILE / reload every increment of FILE
    chpt:N:FILE            reload the first N increments of FILE
    chpt:squash[:N]:FILE   fold the first N (default all) increments into one full checkpoint

A checkpoint here is stop-and-copy: the vCPU is paused (run state ``save-vm``), every populated
RAM page, the CPU and the devices are written as one QEMU v3 stream appended to the container as
an increment, and the machine goes back to the state it was in.  A reload builds a machine with
the file's RAM layout, loads the chosen increments in order and leaves it PAUSED, ready to run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..devices.pl011 import UartSink
from ..errors import ConfigError, PyvmmError
from ..machine import Machine, RunState
from ..ram import PAGE_SIZE, PageBitmap
from ..interrupts import signals_held
from .chain_file import ChainFile
from .checksum import RamCrcsAhead, RamCrcTable, increment_checksums, table_from_file
from .container import (
    CheckpointFile,
    ChecksumBlock,
    IndexRecords,
    PageRun,
    RamBlockInfo,
)
from .cow import CowSnapshot, start_cow_snapshot
from .defaults import CAPABILITIES, DEFAULT_STRATEGY, FAULT_MODES, SAVER_NICE, TRACKERS
from .dirty import AsyncTracker, WpFaultTracker, make_tracker
from .live import LiveSaveResult, save_pages_live
from .machine_state import (
    MachineStateEntries,
    capture,
    machine_save_state,
)
from .pageio import sort_index_records
from .postcopy_uffd import WriteProtectSession
from .ram_handler import RAM_SAVE_FLAG_EOS
from .reload import Progress, reload_file
from .savevm import QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_PART
from .stream import QEMUFile

OutputSink = Callable[[bytes], None]
# pages a live-only checkpoint may open per fault of a sequential writer: a 2 MiB huge page, so
# that its runs keep transparent huge pages whole (uffd.c)
_LIVE_FAULT_AROUND = 512
_TARGET_RE = re.compile(r"^chpt:(?:(?P<squash>squash)(?::(?P<sn>\d+))?:|(?P<n>\d+):)?(?P<file>.*)$")


class SanityError(PyvmmError):
    """A checkpoint's own consistency check failed (a bug, not bad input); nothing committed."""


class CheckpointCancelled(PyvmmError):
    """A checkpoint was cancelled (a monitor's ``migrate_cancel``) before its commit: nothing
    of it is in the file, and its pages are still dirty for the next checkpoint."""


@dataclasses.dataclass(frozen=True)
class CheckpointTarget:
    """A parsed ``chpt:`` URI."""

    path: str  # "" until resolved: the VM's default destination (pyvmm.identity)
    count: int | None = None  # reload only the first N increments
    squash: bool = False

    def resolved(self) -> CheckpointTarget:
        """This target with its path, ``chpt:`` alone meaning this VM's default destination
        (its directory made and checked: see :func:`pyvmm.identity.default_checkpoint_path`)."""
        if self.path:
            return self
        from ..identity import default_checkpoint_path

        return dataclasses.replace(self, path=str(default_checkpoint_path()))

    def __str__(self) -> str:
        if self.squash:
            return f"chpt:squash{'' if self.count is None else f':{self.count}'}:{self.path}"
        return f"chpt:{'' if self.count is None else f'{self.count}:'}{self.path}"


def parse_target(uri: str) -> CheckpointTarget:
    """Parse ``chpt:[N:]FILE`` or ``chpt:squash[:N]:FILE``; ConfigError naming what is wrong.
    No FILE (``chpt:``, ``chpt:2:``) is the VM's default destination: see
    :meth:`CheckpointTarget.resolved`."""
    if not uri.startswith("chpt:"):
        raise ConfigError(f"invalid checkpoint target {uri!r}: expected chpt:FILE, chpt:N:FILE "
                          f"or chpt:squash[:N]:FILE")
    match = _TARGET_RE.match(uri)
    if match is None:
        raise ConfigError(f"invalid checkpoint target {uri!r}")
    count_text = match.group("n") or match.group("sn")
    count = int(count_text) if count_text is not None else None
    if count is not None and count < 1:
        raise ConfigError(f"invalid checkpoint target {uri!r}: N must be at least 1")
    return CheckpointTarget(path=match.group("file"), count=count,
                            squash=match.group("squash") is not None)




@dataclasses.dataclass(frozen=True)
class CheckpointStats:
    """What one checkpoint cost and wrote; stored with the increment and shown by ``info``.

    Times are host milliseconds.  ``downtime_ms`` is how long the guest was paused;
    ``pages_carried`` are pages dirtied during this checkpoint (they belong to the next one).
    """

    increment: int
    kind: str
    pages: int
    zero_pages: int
    bytes_written: int
    total_ms: float
    setup_ms: float
    downtime_ms: float
    throughput_mib_s: float
    devices: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    tracker: str = ""
    write_faults: int = 0
    shadow_copies: int = 0
    pages_carried: int = 0
    fork_ms: float = 0.0
    vm_name: str = ""  # the VM id of the machine saved (pyvmm.identity)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Checkpointer:
    """Takes checkpoints of one machine into one container file.

    ``capabilities`` (as QEMU's migration capabilities, fixed for the file):

    * ``incremental``: the first checkpoint is full, each later one holds only the pages written
      since the previous checkpoint's pause, found by the ``tracker`` (``async`` or ``wp``, see
      :mod:`pyvmm.migration.dirty`; with ``live`` the live session itself tracks, one
      userfaultfd for the checkpointer's life, and the stats say ``wp``);
    * ``live``: the guest is paused only to serialise CPU and devices and to write-protect RAM;
      pages are saved while it runs, a page it is about to change being copied first, so the
      checkpoint holds RAM exactly as at the pause.

    :meth:`checkpoint` may be called from any thread but the vCPU's, while the guest runs or not.
    A failed checkpoint commits nothing, leaves the guest running, and loses no dirty page: the
    next checkpoint still saves every page dirtied since the last successful one.
    """

    def __init__(self, machine: Machine, path: str | Path, *, append: bool = False,
                 durable: bool = True, capabilities: Iterable[str] = (),
                 tracker: str = "async", shadow_pages: int = 4096,
                 unprotect_pages: int = 1, handler_cpu: int | None = None,
                 max_increments: int | None = None, sanity_checks: bool = True,
                 fault_mode: str = "thread", saver_nice: int = SAVER_NICE,
                 vm_name: str | None = None) -> None:
        """``path`` is claimed here, before the guest runs: checked (ConfigError for a
        directory, FIFO, device, missing directory, no permission, or a file another writer
        holds) and locked until :meth:`close`.  An existing file is replaced by the new chain
        only once that holds a committed increment (it is written aside till then); with
        ``append`` the chain in it grows instead (see :mod:`pyvmm.migration.chain_file`).
        ``durable``: fsync each increment and header (see :attr:`CheckpointFile.durable`).
        ``sanity_checks``: after each save, check that the pages saved are exactly the pages
        selected, each once, and that no page is left under processing (cheap; on by default).
        ``max_increments``: when the file holds that many increments, the next checkpoint is a
        full one that replaces the file (a new chain; the original fork did so after 99).
        ``handler_cpu``: host CPU of the C fault-handler thread (default: the CPU the vCPU is
        pinned to, if it is; DESIGN.md §8: same-CPU fault handling is several times faster).
        ``fault_mode``: who resolves write faults of the ``wp`` tracker and live checkpoints,
        ``"thread"`` or ``"signal"`` (~1.7x the faults per second when faults are all a writer
        does, no better guest speed in bench_live; kernel-side writes into guest RAM then fail
        with EFAULT: see :class:`~pyvmm.migration.postcopy_uffd.WriteProtectSession`).
        ``vm_name``: the VM id recorded with each increment (default: this process's,
        :func:`pyvmm.identity.vm_id`).
        ``saver_nice``: nice value (0..19) of the thread that saves a live checkpoint's RAM
        while the guest runs; above 0 the vCPU wins when both want the same CPU (the guest runs
        faster during the checkpoint, which takes longer on a busy host)."""
        caps = tuple(sorted(set(capabilities)))
        for cap in caps:
            if cap not in CAPABILITIES:
                raise ConfigError(f"unknown capability {cap!r} (choose from "
                                  f"{', '.join(CAPABILITIES)})")
        if "cow" in caps and "live" in caps:
            raise ConfigError("the cow and live capabilities exclude each other: both let the "
                              "guest run while RAM is saved")
        if max_increments is not None and max_increments < 1:
            raise ConfigError(f"max_increments must be at least 1, not {max_increments}")
        if tracker not in TRACKERS:
            raise ConfigError(f"unknown dirty tracker {tracker!r} (choose from "
                              f"{', '.join(TRACKERS)})")
        from ..identity import vm_id

        self.vm_name = vm_id() if vm_name is None else vm_name
        self.machine = machine
        self.path = Path(path)
        self.capabilities = caps
        self.tracker_kind = tracker
        self._shadow_pages = shadow_pages
        self._unprotect_pages = unprotect_pages
        self._handler_cpu = handler_cpu if handler_cpu is not None else machine.vcpu_cpu
        if fault_mode not in FAULT_MODES:
            raise ConfigError(f"unknown fault mode {fault_mode!r} (choose from "
                              f"{', '.join(FAULT_MODES)})")
        self._fault_mode = fault_mode
        if not 0 <= saver_nice <= 19:
            raise ConfigError(f"saver_nice must be 0..19, not {saver_nice}")
        self._saver_nice = saver_nice
        self._max_increments = max_increments
        self.sanity_checks = sanity_checks
        self._tracker: AsyncTracker | WpFaultTracker | None = None
        #: Pages known dirty but not saved yet (a failed checkpoint leaves them here).
        self._pending: dict[str, PageBitmap] = {}
        self._lock = threading.Lock()
        self._cow_blocks: list[str] = []
        self._crc_table: RamCrcTable | None = None  # per-page CRCs of RAM at the last checkpoint
        self.entries: MachineStateEntries = machine_save_state(machine)
        self.history: list[CheckpointStats] = []
        #: Called with the machine while it is paused at each checkpoint's consistency point
        #: (tests and experiments record the state the checkpoint must reproduce).
        self.on_pause: Callable[[Machine], None] | None = None
        # last: the target is checked and claimed (its writer lock taken) before the guest runs
        self._chain = ChainFile(self.path, append=append, durable=durable,
                                create=self._create_file, check=self._check_file)

    @property
    def incremental(self) -> bool:
        return "incremental" in self.capabilities

    @property
    def live(self) -> bool:
        return "live" in self.capabilities

    @property
    def cow(self) -> bool:
        return "cow" in self.capabilities

    @property
    def checksum(self) -> bool:
        return "checksum" in self.capabilities

    def _checksums(self, container: CheckpointFile, kind: str, stream_offset: int,
                   stream_length: int, runs: Sequence[PageRun], device_bytes: bytes,
                   devices: list[dict[str, Any]], ahead: RamCrcsAhead | None = None
                   ) -> tuple[ChecksumBlock, RamCrcTable] | None:
        """The ``checksum`` capability: CRCs of the stream just written (read back from the
        file) and the RAM CRC table after it (kept once the increment is committed)."""
        if not self.checksum:
            return None
        table = self._crc_table
        if kind == "full" or not container.header.increments:
            table = RamCrcTable(container.header.ram_blocks, container.header.page_size)
        elif table is None:  # appending to a file written by another process
            table = table_from_file(container)
        # stop-and-copy: RAM is still as saved, its CRCs need no read-back of the page data
        still = None if self.live or self.cow else self.machine.ram_blocks
        return increment_checksums(container, kind, stream_offset, stream_length, runs, table,
                                   device_bytes, devices, from_ram=still,
                                   ahead=ahead if still is not None else None)

    def _create_file(self, path: Path) -> CheckpointFile:
        layout = tuple(RamBlockInfo(b.name, b.gpa, b.size) for b in self.machine.ram_blocks)
        return CheckpointFile.create(path, page_size=PAGE_SIZE, ram_blocks=layout,
                                     machine=self.machine.name, capabilities=self.capabilities,
                                     overwrite=path != self.path)

    def _check_file(self, file: CheckpointFile) -> None:
        """An existing chain this machine appends to must have its RAM layout and formats."""
        layout = tuple(RamBlockInfo(b.name, b.gpa, b.size) for b in self.machine.ram_blocks)
        if file.header.ram_blocks != layout:
            raise ConfigError(f"{self.path} holds a machine with another RAM layout; write the "
                              f"checkpoint to a new file")
        if self.checksum and file.header.format_version < 2:
            raise ConfigError(f"{self.path} is in format {file.header.format_version}, which has "
                              f"no checksums; write the checkpoint to a new file")

    # ------------------------------------------------------------------------- pausing
    def _pause(self) -> tuple[bool, RunState]:
        """Stop the vCPU into SAVE_VM (Machine.hold); returns (was running, state to go back
        to)."""
        before = self.machine.hold(RunState.SAVE_VM)
        return before is RunState.RUNNING, before

    def _unpause(self, was_running: bool, before: RunState) -> None:
        # a pause asked for during the checkpoint (Ctrl-C, --seconds, stop) is taken here
        self.machine.release(before)

    # ------------------------------------------------------------------------- checkpoint
    def checkpoint(self, cancel: threading.Event | None = None) -> CheckpointStats:
        """Take one checkpoint (full, incremental, live: as the capabilities say).

        ``cancel``: when it is set before the commit, the checkpoint ends with
        :class:`CheckpointCancelled` and commits nothing (the guest runs on)."""
        with self._lock:
            return self._checkpoint(cancel)

    def _checkpoint(self, cancel: threading.Event | None = None) -> CheckpointStats:
        machine = self.machine
        # creating a file (truncate, fsync) is no pause work
        container = self._chain.container(self._max_increments)
        kind = "incremental" if self.incremental and container.header.increments and \
            self._tracker is not None else "full"
        live: WpFaultTracker | None = None
        populated: dict[str, PageBitmap] | None = None
        if self.live:  # guest running: whatever can be done before the pause is done here
            live, populated = self._prepare_live(kind)
        started = time.perf_counter()
        was_running, before = self._pause()
        paused = True
        ok = False
        selection: dict[str, PageBitmap] = {}
        writer = None
        session: WriteProtectSession | None = None
        ahead: RamCrcsAhead | None = None
        try:
            machine.guest_inform.checkpoint_started(len(container.header.increments))
            capture(machine, self.entries, ended=before is RunState.SHUTDOWN)
            selection = self._select(kind, live, populated)
            if self.on_pause is not None:
                self.on_pause(machine)
            devices_buffer = QEMUFile.memory()
            devices = self.entries.save_state.save_devices(devices_buffer)
            device_bytes = devices_buffer.getvalue()
            if live is not None:
                session = live.session
                session.rearm(selection)
                armed_stats = session.stats()  # a re-armed session's counters run on
            elif self.incremental and self._tracker is None:
                self._tracker = make_tracker(self.tracker_kind, machine.ram_blocks,
                                             unprotect_pages=self._unprotect_pages,
                                             handler_cpu=self._handler_cpu,
                                             fault_mode=self._fault_mode)
            setup_done = time.perf_counter()
            if self.live:
                self._unpause(was_running, before)
                paused = False
            downtime_end = time.perf_counter()
            writer = container.begin_increment(kind)
            f = QEMUFile.for_writing(container.fd, writer.stream_offset)
            save_state = self.entries.save_state
            ram = self.entries.ram
            save_state.save_header(f)
            save_state.save_setup(f)
            fork_ms = 0.0
            runs: Sequence[PageRun]
            if self.cow:
                cow = self._save_cow(f, selection, device_bytes, devices)
                self._unpause(was_running, before)
                paused = False
                downtime_end = time.perf_counter()
                result_cow = cow.wait()
                fork_ms = result_cow.fork_ms
                # the index in RAM order (the child writes block by block; a live saver sorts
                # its own, a stop-and-copy save writes in RAM order): the indexed reload then
                # takes the chain window by window
                runs = IndexRecords(sort_index_records(b"".join(
                    block_result.runs.index_records(self._block_number(job_block))
                    for job_block, block_result in zip(self._cow_blocks, result_cow.blocks))))
                data_pages, zero_pages = result_cow.data_pages, result_cow.zero_pages
                stream_length = f.offset - writer.stream_offset + result_cow.bytes_written
            elif session is not None:
                result = self._save_live_part(f, session, selection,
                                              open_saved=live is not self._tracker)
                runs, data_pages, zero_pages = result.runs, result.data_pages, result.zero_pages
            else:
                if self.checksum:  # page CRCs from RAM on another core while pages are written
                    ahead = RamCrcsAhead(machine.ram_blocks, selection)
                ram.select(selection)
                save_state.save_iterate(f)
                runs = ram.runs
                data_pages, zero_pages = ram.counters.data_pages, ram.counters.zero_pages
            if not self.cow:
                save_state.save_complete(f)
                f.put_bytes(device_bytes)
                save_state.save_trailer(f, devices, PAGE_SIZE)
                f.flush()
                stream_length = f.pos
            page_runs = runs  # IndexedRun is PageRun
            if self.sanity_checks:
                self._check_saved(selection, data_pages, zero_pages, page_runs, session)
            checksums = self._checksums(container, kind, writer.stream_offset, stream_length,
                                        page_runs, device_bytes, devices, ahead)
            faults = shadows = carried = 0
            if session is not None:
                wp = session.stats()
                faults = wp.faults - armed_stats.faults
                shadows = wp.shadow_copies - armed_stats.shadow_copies
                if live is self._tracker:  # a live-only session tracks nothing further
                    carried = sum(b.count() for b in session.dirty.values())
            if paused:
                # stop-and-copy: the guest's state is all in the file (and its CRCs taken from
                # RAM): it runs on while the stream reaches the disk, only the header's
                # publication waits for that
                self._unpause(was_running, before)
                paused = False
                downtime_end = time.perf_counter()
            if cancel is not None and cancel.is_set():
                raise CheckpointCancelled(f"checkpoint {writer.index} cancelled")
            writer.sync()  # the bulk of a durable commit's sync, inside total_ms
            elapsed = time.perf_counter() - started
            downtime = downtime_end - started
            stats = CheckpointStats(
                increment=writer.index, kind=kind, pages=data_pages, zero_pages=zero_pages,
                bytes_written=stream_length, total_ms=elapsed * 1e3,
                setup_ms=(setup_done - started) * 1e3, downtime_ms=downtime * 1e3,
                throughput_mib_s=stream_length / max(elapsed, 1e-9) / (1 << 20),
                devices=tuple(f"{d['name']}/{d['instance_id']} v{d['version']}"
                              for d in devices),
                capabilities=self.capabilities,
                tracker=(self._tracker.kind if self._tracker is not None else
                         self.tracker_kind) if self.incremental else "",
                write_faults=faults, shadow_copies=shadows, pages_carried=carried,
                fork_ms=fork_ms, vm_name=self.vm_name)
            # a Ctrl-C after the commit must not make a committed increment look failed
            with signals_held():
                writer.commit(stream_length=stream_length, page_runs=page_runs,
                              pages=data_pages, zero_pages=zero_pages, stats=stats.as_dict(),
                              checksums=None if checksums is None else checksums[0])
                if checksums is not None:
                    self._crc_table = checksums[1]
                ok = True
                self.history.append(stats)
                self._chain.committed()  # a chain written aside replaces the file now
            return stats
        except BaseException:
            if ahead is not None:  # no thread left reading RAM behind a failed checkpoint
                ahead.result()
            if writer is not None and not ok:
                writer.abort()
            if not ok:
                self._chain.failed()
            # Nothing was saved: whatever was selected is still dirty for the next checkpoint.
            self._remember(selection)
            if live is not None:  # the handler must not wait for a saver that is gone
                live.session.abandon_round()
            raise
        finally:
            machine.guest_inform.checkpoint_finished(ok)
            if paused:
                self._unpause(was_running, before)
            if live is not None and live is not self._tracker:
                live.stop()  # a live-only checkpointer tracks nothing between checkpoints

    def _check_saved(self, selection: dict[str, PageBitmap], data_pages: int, zero_pages: int,
                     runs: Sequence[PageRun], session: WriteProtectSession | None) -> None:
        """Cheap end-of-save checks (a failure aborts the increment; no page is lost): as many
        pages saved and indexed as were selected, and no page left under processing.  (That no
        page is indexed twice, the container checks at commit.)"""
        selected = sum(bitmap.count() for bitmap in selection.values())
        if data_pages + zero_pages != selected:
            raise SanityError(f"{data_pages} data + {zero_pages} zero pages saved, "
                              f"{selected} selected")
        listed = runs.pages() if isinstance(runs, IndexRecords) else sum(r.npages for r in runs)
        if listed != selected:
            raise SanityError(f"the page index lists {listed} pages, {selected} were selected")
        if session is not None:
            wp = session.stats()
            if wp.queued or wp.handler_errno:
                raise SanityError(f"live save ended with {wp.queued} shadow copies unsaved, "
                                  f"handler errno {wp.handler_errno}")

    def _select(self, kind: str, live: WpFaultTracker | None,
                populated: dict[str, PageBitmap] | None) -> dict[str, PageBitmap]:
        """Pages this checkpoint saves (guest paused): all populated ones for a full checkpoint,
        else the tracker's dirty pages plus any left over by a failed checkpoint.

        A live checkpoint found the populated pages before the pause, with ``live`` already
        tracking: the pages written since are or-ed in (a page populated after the scan was
        written, so ``live`` has it)."""
        blocks = self.machine.ram_blocks
        if kind == "full":
            if live is not None and populated is not None:
                selection = populated
                for name, pages in live.collect().items():
                    selection[name] |= pages
            else:
                selection = {b.name: b.populated_pages() for b in blocks}
                if self._tracker is not None:  # restarted chain: the tracker's news are in it
                    self._tracker.collect()
        else:
            assert self._tracker is not None
            selection = self._tracker.collect()
        for name, pages in self._pending.items():
            if name in selection:
                selection[name] |= pages
        self._pending = {}
        return selection

    def _remember(self, selection: dict[str, PageBitmap]) -> None:
        for name, pages in selection.items():
            if name in self._pending:
                self._pending[name] |= pages
            else:
                self._pending[name] = pages.copy()

    def _prepare_live(self, kind: str) -> tuple[WpFaultTracker, dict[str, PageBitmap] | None]:
        """Before a live checkpoint's pause, guest running: the session that will save it,
        tracking already (the incremental tracker's, or a new one for this checkpoint only), with
        the pages written so far protected again; for a full checkpoint also the populated pages.
        The pause is then left with the pages written after this."""
        blocks = self.machine.ram_blocks
        live = self._tracker if self.incremental else None
        if live is None:
            # A live-only session tracks nothing for later, so a sequential writer may have runs
            # of up to 64 pages opened per fault; a tracker keeps its dirty pages exact.
            live = make_tracker(self.tracker_kind, blocks, unprotect_pages=self._unprotect_pages,
                                handler_cpu=self._handler_cpu, live=True,
                                shadow_pages=self._shadow_pages,
                                fault_around=None if self.incremental else
                                max(_LIVE_FAULT_AROUND, self._unprotect_pages),
                                fault_mode=self._fault_mode)
            if self.incremental:
                self._tracker = live
        assert isinstance(live, WpFaultTracker)
        try:
            live.prepare()
            populated = {b.name: b.populated_pages() for b in blocks} if kind == "full" else None
            live.prepare()  # what was written during the scan
        except BaseException:
            if live is not self._tracker:
                live.stop()
            raise
        return live, populated

    def _block_number(self, name: str) -> int:
        for number, block in enumerate(self.machine.ram_blocks):
            if block.name == name:
                return number
        raise KeyError(name)

    def _save_cow(self, f: QEMUFile, selection: dict[str, PageBitmap], device_bytes: bytes,
                  devices: list[dict[str, Any]]) -> CowSnapshot:
        """Fork a child that writes the RAM pages (as at the fork) and the rest of the stream.

        ``f`` holds the stream's beginning; the PART header goes there, everything after the
        pages is built here as the child's ``tail``.  The guest may run once this returns.
        """
        save_state = self.entries.save_state
        entry = save_state.find("ram", 0)
        assert entry is not None
        f.put_u8(QEMU_VM_SECTION_PART)
        f.put_be32(entry.section_id)
        f.flush()
        tail = QEMUFile.memory()
        tail.put_be64(RAM_SAVE_FLAG_EOS)
        tail.put_u8(QEMU_VM_SECTION_FOOTER)
        tail.put_be32(entry.section_id)
        self.entries.ram.select({})
        save_state.save_complete(tail)
        tail.put_bytes(device_bytes)
        save_state.save_trailer(tail, devices, PAGE_SIZE)
        jobs = [(block, selection[block.name], True) for block in self.machine.ram_blocks
                if block.name in selection and selection[block.name].count()]
        self._cow_blocks = [block.name for block, _, _ in jobs]
        fd = f.fd
        assert fd is not None
        return start_cow_snapshot(fd, f.offset, jobs, tail.getvalue())

    def _save_live_part(self, f: QEMUFile, session: WriteProtectSession,
                        selection: dict[str, PageBitmap], *, open_saved: bool) -> LiveSaveResult:
        """The PART section of a live checkpoint, written while the guest runs."""
        save_state = self.entries.save_state
        entry = save_state.find("ram", 0)
        assert entry is not None
        f.put_u8(QEMU_VM_SECTION_PART)
        f.put_be32(entry.section_id)
        result = save_pages_live(f, session, self.machine.ram_blocks, selection,
                                 open_saved=open_saved, nice=self._saver_nice)
        f.put_be64(RAM_SAVE_FLAG_EOS)
        f.put_u8(QEMU_VM_SECTION_FOOTER)
        f.put_be32(entry.section_id)
        self.entries.ram.select({})
        return result

    def close(self) -> None:
        """Stop dirty tracking, close the file and release its lock (a new chain that got no
        increment is removed; the file it would have replaced stays as it was)."""
        if self._tracker is not None:
            self._tracker.stop()
            self._tracker = None
        self._chain.close()


def reload(target: CheckpointTarget | str, *, strategy: str = DEFAULT_STRATEGY,
           uart_sink: UartSink | None = None, stdout: OutputSink | None = None,
           stderr: OutputSink | None = None, progress: Progress | None = None) -> Machine:
    """A new machine holding the state of the target's first N (default all) increments.

    The machine is PAUSED (or SHUTDOWN, if the guest had powered off when it was saved), ready
    for :meth:`Machine.run`.  ``strategy``: ``indexed`` (default), ``partial`` or
    ``sequential`` (see :mod:`pyvmm.migration.reload`; same result).  Raises FormatError (one
    line, naming file, increment and section) for a damaged or foreign file, ConfigError for a
    bad target.  :func:`pyvmm.migration.reload.reload_file` also returns what was read.
    """
    if isinstance(target, str):
        target = parse_target(target)
    target = target.resolved()
    if target.squash:
        raise ConfigError(f"{target} squashes a chain into a new file; it does not reload "
                          f"(use squash() or 'pyvmm checkpoint squash')")
    machine, _ = reload_file(target.path, target.count, strategy=strategy, uart_sink=uart_sink,
                             stdout=stdout, stderr=stderr, progress=progress)
    return machine
