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
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..devices.pl011 import UartSink
from ..errors import ConfigError, PyvmmError
from ..interrupts import signals_held
from ..machine import Machine, RunState
from ..ram import PAGE_SIZE, PageBitmap
from .algorithms import resolve
from .chain_file import ChainFile
from .checksum import RamCrcsAhead, RamCrcTable, increment_checksums, table_from_file
from .container import (
    CheckpointFile,
    ChecksumBlock,
    IndexRecords,
    PageRun,
    RamBlockInfo,
)
from .defaults import CAPABILITIES, COMPRESS, DEFAULT_STRATEGY, FAULT_MODES, SAVER_NICE
from .encoders import PlainEncoder
from .machine_state import (
    MachineStateEntries,
    capture,
    machine_save_state,
)
from .reload import Progress, reload_file
from .seams import (
    DirtyTracker,
    EncoderOptions,
    PageEncoder,
    PageEncoding,
    PageSaver,
    SanityError,
    SavedPages,
    SaveJob,
    SaverSetup,
    TrackerOptions,
)
from .stream import QEMUFile

OutputSink = Callable[[bytes], None]
_TARGET_RE = re.compile(r"^chpt:(?:(?P<squash>squash)(?::(?P<sn>\d+))?:|(?P<n>\d+):)?(?P<file>.*)$")


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
    saver: str = ""  # the page saver's name (pyvmm.migration.algorithms)
    encoder: str = ""  # the page encoder's name
    compress_level: int = 0  # the zstd level pages were compressed with (0: none)
    compressed_pages: int = 0  # of pages, written as compressed records
    compressed_bytes: int = 0  # the bytes of their compressed frames

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
                 vm_name: str | None = None, saver: str | None = None,
                 encoder: str | None = None, compress_level: int | None = None) -> None:
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
        faster during the checkpoint, which takes longer on a busy host).
        ``tracker``, ``saver``: names in :mod:`pyvmm.migration.algorithms` (built-ins, plug-ins,
        or ``module:attribute``); ``saver`` defaults to what the capabilities say (``live``,
        ``cow``, else ``stop-and-copy``), and naming ``live`` or ``cow`` there is the same as
        the capability.
        ``encoder``: how pages are written (:meth:`set_encoder`); the ``compress`` capability
        is the encoder ``zstd``, ``compress_level`` its level (QEMU's ``compress-level``)."""
        caps = tuple(sorted(set(capabilities)))
        if COMPRESS in caps:  # the encoder's, not the file's: it may change between increments
            caps = tuple(cap for cap in caps if cap != COMPRESS)
            if encoder not in (None, "zstd"):
                raise ConfigError(f"the compress capability is the zstd encoder, not "
                                  f"{encoder}")
            encoder = "zstd"
        for cap in caps:
            if cap not in CAPABILITIES:
                raise ConfigError(f"unknown capability {cap!r} (choose from "
                                  f"{', '.join(CAPABILITIES)})")
        if "cow" in caps and "live" in caps:
            raise ConfigError("the cow and live capabilities exclude each other: both let the "
                              "guest run while RAM is saved")
        if max_increments is not None and max_increments < 1:
            raise ConfigError(f"max_increments must be at least 1, not {max_increments}")
        saver = _saver_name(caps, saver)
        if saver in ("live", "cow") and saver not in caps:
            caps = tuple(sorted((*caps, saver)))  # the saver is the capability
        tracker_factory = resolve("tracker", tracker)
        saver_factory = resolve("saver", saver)
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
        self._tracker: DirtyTracker | None = None
        self._tracker_factory = tracker_factory
        self._tracker_options = TrackerOptions(unprotect_pages=unprotect_pages,
                                               handler_cpu=self._handler_cpu,
                                               fault_mode=fault_mode)
        self.saver_name = saver
        self.encoder: PageEncoder = PlainEncoder()
        self.encoder_name = "plain"
        self.set_encoder(encoder or "plain", compress_level)
        self._saver: PageSaver = saver_factory(SaverSetup(
            machine=machine, incremental="incremental" in caps, tracker=tracker,
            tracker_options=self._tracker_options, shadow_pages=shadow_pages,
            saver_nice=saver_nice))
        #: Pages known dirty but not saved yet (a failed checkpoint leaves them here).
        self._pending: dict[str, PageBitmap] = {}
        self._lock = threading.Lock()
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

    def set_encoder(self, name: str, compress_level: int | None = None) -> None:
        """Write the pages of the next checkpoints with the encoder ``name`` (``plain``,
        ``zstd``, a plug-in of the ``pyvmm.encoders`` group, or ``module:attribute``), built with
        ``compress_level``; may change between checkpoints.  ConfigError for an unknown name or
        level, and for compression with the checksum capability (its checksums cover QEMU's
        plain records only)."""
        factory = resolve("encoder", name)
        encoder = factory(EncoderOptions(compress_level=compress_level))
        encoding = encoder.encoding()
        if encoding.compress_level and self.checksum:
            raise ConfigError("the compress and checksum capabilities do not combine: the "
                              "checksums cover QEMU's plain page records only")
        self.encoder = encoder
        self.encoder_name = name

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

    # ------------------------------------------------------------------------- checkpoint
    def checkpoint(self, cancel: threading.Event | None = None) -> CheckpointStats:
        """Take one checkpoint (full, incremental, live: as the capabilities say).

        ``cancel``: when it is set before the commit, the checkpoint ends with
        :class:`CheckpointCancelled` and commits nothing (the guest runs on)."""
        with self._lock:
            return self._checkpoint(cancel)

    def _checkpoint(self, cancel: threading.Event | None = None) -> CheckpointStats:
        """The checkpoint sequence (see :mod:`pyvmm.migration.seams`)."""
        machine, saver = self.machine, self._saver
        container = self._chain.container(self._max_increments)  # (no pause work)
        full = not (self.incremental and container.header.increments and
                    self._incremental_tracker() is not None)
        kind = "full" if full else "incremental"
        saver.before_pause(full)
        started = time.perf_counter()
        before = machine.hold(RunState.SAVE_VM)
        pause = _Pause(machine, before, started)
        ok = False
        selection: dict[str, PageBitmap] = {}
        writer = None
        ahead: RamCrcsAhead | None = None
        try:
            machine.guest_inform.checkpoint_started(len(container.header.increments))
            capture(machine, self.entries, ended=before is RunState.SHUTDOWN)
            selection = self._select(full)
            if self.on_pause is not None:
                self.on_pause(machine)
            devices_buffer = QEMUFile.memory()
            devices = self.entries.save_state.save_devices(devices_buffer)
            device_bytes = devices_buffer.getvalue()
            saver.at_pause(selection, pause.release)
            if self.incremental and self._incremental_tracker() is None:
                self._tracker = self._tracker_factory(machine.ram_blocks, self._tracker_options)
            setup_done = time.perf_counter()
            writer = container.begin_increment(kind)
            f = QEMUFile.for_writing(container.fd, writer.stream_offset)
            save_state = self.entries.save_state
            save_state.save_header(f)
            save_state.save_setup(f)
            if self.checksum and saver.ram_unchanged_after_save:
                ahead = RamCrcsAhead(machine.ram_blocks, selection)  # CRCs on another core
            encoding = self.encoder.encoding()
            if encoding.compress_level and self.checksum:
                raise ConfigError(f"the {self.encoder_name} encoder compresses, which the "
                                  f"checksum capability does not combine with")
            saved = saver.save(SaveJob(f=f, stream_offset=writer.stream_offset,
                                       selection=selection, entries=self.entries,
                                       device_bytes=device_bytes, devices=devices,
                                       release=pause.release, encoding=encoding))
            stream_length = saved.stream_length
            if stream_length is None:
                save_state.save_complete(f)
                f.put_bytes(device_bytes)
                save_state.save_trailer(f, devices, PAGE_SIZE)
                f.flush()
                stream_length = f.pos
            if self.sanity_checks:
                self._check_saved(selection, saved)
                saver.check()
            checksums = self._checksums(container, kind, writer.stream_offset, stream_length,
                                        saved.runs, device_bytes, devices, ahead)
            # stop-and-copy: the guest's state is all in the file (and its CRCs taken from
            # RAM): it runs on while the stream reaches the disk, only the header waits for it
            pause.release()
            if cancel is not None and cancel.is_set():
                raise CheckpointCancelled(f"checkpoint {writer.index} cancelled")
            writer.sync()  # the bulk of a durable commit's sync, inside total_ms
            stats = self._stats(writer.index, kind, saved, stream_length, devices,
                                started=started, setup_done=setup_done, pause=pause,
                                encoding=encoding)
            # a Ctrl-C after the commit must not make a committed increment look failed
            with signals_held():
                try:
                    writer.commit(stream_length=stream_length, page_runs=saved.runs,
                                  pages=saved.data_pages, zero_pages=saved.zero_pages,
                                  stats=stats.as_dict(),
                                  checksums=None if checksums is None else checksums[0])
                except ValueError as err:  # what a saver reported disagrees with its index
                    raise SanityError(f"the {self.saver_name} saver's increment is "
                                      f"inconsistent: {err}") from err
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
            saver.abandon()
            raise
        finally:
            machine.guest_inform.checkpoint_finished(ok)
            pause.release()
            saver.after()

    @property
    def tracker(self) -> DirtyTracker | None:
        """The dirty tracker of incremental checkpoints, once made (None before the first
        checkpoint, and without the incremental capability)."""
        return self._incremental_tracker()

    def _incremental_tracker(self) -> DirtyTracker | None:
        """The tracker of incremental checkpoints: the saver's own (live), else the named one
        (made at the first checkpoint's pause)."""
        return self._saver.tracker() or self._tracker

    def _stats(self, index: int, kind: str, saved: SavedPages, stream_length: int,
               devices: list[dict[str, Any]], *, started: float, setup_done: float,
               pause: _Pause, encoding: PageEncoding) -> CheckpointStats:
        elapsed = time.perf_counter() - started
        tracker = self._incremental_tracker()
        return CheckpointStats(
            increment=index, kind=kind, pages=saved.data_pages, zero_pages=saved.zero_pages,
            bytes_written=stream_length, total_ms=elapsed * 1e3,
            setup_ms=(setup_done - started) * 1e3, downtime_ms=pause.downtime * 1e3,
            throughput_mib_s=stream_length / max(elapsed, 1e-9) / (1 << 20),
            devices=tuple(f"{d['name']}/{d['instance_id']} v{d['version']}" for d in devices),
            capabilities=self.capabilities,
            tracker=(tracker.kind if tracker is not None else self.tracker_kind)
            if self.incremental else "",
            write_faults=saved.write_faults, shadow_copies=saved.shadow_copies,
            pages_carried=saved.pages_carried, fork_ms=saved.fork_ms, vm_name=self.vm_name,
            saver=self.saver_name, encoder=self.encoder_name,
            compress_level=encoding.compress_level, compressed_pages=saved.compressed_pages,
            compressed_bytes=saved.compressed_bytes)

    def _check_saved(self, selection: dict[str, PageBitmap], saved: SavedPages) -> None:
        """Cheap end-of-save checks (a failure aborts the increment; no page is lost): as many
        pages saved and indexed as were selected.  (That no page is indexed twice, the container
        checks at commit; the saver checks its own state.)"""
        selected = sum(bitmap.count() for bitmap in selection.values())
        if saved.data_pages + saved.zero_pages != selected:
            raise SanityError(f"{saved.data_pages} data + {saved.zero_pages} zero pages saved, "
                              f"{selected} selected")
        runs = saved.runs
        listed = runs.pages() if isinstance(runs, IndexRecords) else sum(r.npages for r in runs)
        if listed != selected:
            raise SanityError(f"the page index lists {listed} pages, {selected} were selected")

    def _select(self, full: bool) -> dict[str, PageBitmap]:
        """Pages this checkpoint saves (guest paused): all populated ones for a full checkpoint
        (or the saver's own full selection), else the tracker's dirty pages; plus any left over
        by a failed checkpoint."""
        tracker = self._incremental_tracker()
        if full:
            selection = self._saver.full_selection()
            if selection is None:
                selection = {b.name: b.populated_pages() for b in self.machine.ram_blocks}
                if tracker is not None:  # restarted chain: the tracker's news are in it
                    tracker.collect()
        else:
            assert tracker is not None
            selection = tracker.collect()
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

    def close(self) -> None:
        """Stop dirty tracking, close the file and release its lock (a new chain that got no
        increment is removed; the file it would have replaced stays as it was)."""
        if self._tracker is not None:
            self._tracker.stop()
            self._tracker = None
        self._saver.close()
        self._chain.close()


class _Pause:
    """The checkpoint's hold on the guest (Machine.hold): released once, by whoever may let the
    guest run first (the saver, or the checkpointer); the downtime runs till then."""

    def __init__(self, machine: Machine, before: RunState, started: float) -> None:
        self._machine = machine
        self._before = before
        self._started = started
        self.downtime = 0.0
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            # a pause asked for during the checkpoint (Ctrl-C, --seconds, stop) is taken here
            self._machine.release(self._before)
            self.downtime = time.perf_counter() - self._started


def _saver_name(capabilities: Sequence[str], saver: str | None) -> str:
    """The saver: the one named, or the one the capabilities say."""
    wanted = [cap for cap in ("live", "cow") if cap in capabilities]
    if saver is None:
        return wanted[0] if wanted else "stop-and-copy"
    if wanted and saver != wanted[0]:
        raise ConfigError(f"the {wanted[0]} capability is a saver of its own: it cannot be "
                          f"combined with the saver {saver!r}")
    return saver


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
