"""Lazy reload: the guest starts at once and its RAM comes from the checkpoint file on demand.

:func:`lazy_reload` builds the machine as :func:`~pyvmm.migration.checkpoint.reload` does, but
registers every RAM block with userfaultfd in MISSING mode before anything touches it, loads the
CPU, devices and Linux layer from the last increment's stream without writing a RAM page, and
starts two C threads (``pyvmm/native/lazy.c``):

* the fault handler serves each first touch of a page (by the vCPU, by Python device or syscall
  code, by the kernel) with one ``UFFDIO_COPY`` of the missing pages around it, inside an aligned
  window of ``fault_run`` pages, whose records follow each other in the file (or one
  ``UFFDIO_ZEROPAGE`` of the zero pages around it). It never takes the GIL, so a thread that holds the GIL and touches RAM is served
  like any other (DESIGN.md section 5);
* the fill thread copies every data page not yet there, in page order, ``fill_run`` pages per
  read; zero pages are left alone (once the RAM is unregistered they read as zero anyway).

Which bytes a page gets comes from a page source table built from the container's page indexes
of the first N increments, newer increments overriding older ones: the newest data of each page,
or zero. When the fill is done, a watcher thread unregisters the RAM and stops the C threads:
from then on the machine is an ordinary one (it can be checkpointed, its RAM scanned).

Before the guest starts, every increment of the chain gets the structural checks every reload
makes (:func:`~pyvmm.migration.reload.check_increment_structure`: the whole stream parses, holds
the page records its index lists, and each listed data page has its own record header), so a
file the other reloads refuse is refused here too, before anything runs on it.

With the ``checksum`` capability, everything but page data is checked before the guest starts
(:func:`~pyvmm.migration.checksum_reload.check_before_load`), and each page read is compared
with its CRC-32C by the C thread before it is installed.

If the file cannot be read (an I/O error, the file cut short, a page record header that is not
where the index says, page data that does not match its checksum), the failure is recorded; faults are then served with zero pages so that no
thread hangs, and the watcher stops the machine into ``internal-error``: it never runs on. The
error is :attr:`LazyLoader.error` (one line naming file, increment, offset and page), raised by
:meth:`LazyLoader.wait_filled`.
"""

from __future__ import annotations

import dataclasses
import errno as errno_codes
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Self

from unicorn import UC_HOOK_CODE
from unicorn import arm64_const as a64

from pyvmm._native import ffi, lib

from ..devices.pl011 import UartSink
from ..errors import (
    ChecksumError,
    ConfigError,
    FormatError,
    PyvmmError,
    RunStateError,
    UffdError,
)
from ..machine import Machine, RunState, StopReason
from ..ram import PAGE_SIZE, PageBitmap, RamBlock
from .checkpoint import CheckpointTarget, parse_target
from .checksum_reload import check_before_load
from .checksum_table import RamCrcTable
from .container import PAGE_RECORD_HEADER, CheckpointFile, IncrementInfo, RamBlockInfo
from .machine_state import machine_save_state
from .page_index_format import page_index_records
from .reload import (
    check_chain,
    check_increment_structure,
    holds_compressed,
    inflate_compressed,
    new_machine,
    restore_machine,
    scratch_entries,
)
from .uffd_syscalls import UFFDIO_REGISTER_MODE_MISSING, Userfaultfd

OutputSink = Callable[[bytes], None]

_UFFDIO_COPY_BIT, _UFFDIO_ZEROPAGE_BIT = 3, 4  # bits of the ioctls REGISTER reports
_STRIDE = PAGE_RECORD_HEADER + PAGE_SIZE
MAX_RUN = 1024  # bound of fault_run and fill_run (lazy.c: MAX_RUN)


@dataclasses.dataclass(frozen=True)
class LazyStats:
    """What a lazy reload did so far.

    ``fault_pages + fill_pages == data_pages`` once ``filled``: every data page is installed
    exactly once, by whichever thread came first (``exists`` counts the losers).
    ``setup_ms`` is how long :func:`lazy_reload` took; ``first_insn_ms`` the time from its start
    to the first guest instruction (None until the guest runs); ``filled_ms`` the time from its
    start until every data page was in RAM (None until then).
    """

    faults: int
    fault_pages: int
    zero_pages: int
    fill_pages: int
    data_pages: int
    exists: int
    filled: bool
    setup_ms: float
    first_insn_ms: float | None
    filled_ms: float | None


_INDEX_RECORD = 24  # bytes of one raw page index record


class _SourceTables:
    """Per RAM block, the file offset of each page's newest data (-1: the page is zero)."""

    def __init__(self, layout: tuple[RamBlockInfo, ...]) -> None:
        self.npages = [block.size // PAGE_SIZE for block in layout]
        self.tables: list[Any] = []
        allocate = ffi.new_allocator(should_clear_after_alloc=False)  # every entry set below
        for npages in self.npages:
            table = allocate("long long[]", npages)
            everything = ffi.new("struct pyvmm_page_run *", {"first_page": 0, "npages": npages,
                                                             "data_offset": 0,
                                                             "kind": lib.PYVMM_RUN_ZERO})
            lib.pyvmm_lazy_table_apply(table, npages, everything, 1)
            self.tables.append(table)

    def apply_index(self, records: memoryview, info: IncrementInfo) -> bool:
        """Lay one increment's page index, as raw records, over the tables, every record checked
        in C; False when C refuses it (the container's decoder then names what is wrong)."""
        n = max(len(self.tables), 1)
        tables = ffi.new("long long *[]", n)
        pages = ffi.new("pyvmm_u64[]", n)
        for i, (table, npages) in enumerate(zip(self.tables, self.npages)):
            tables[i] = table
            pages[i] = npages
        counts = ffi.new("pyvmm_u64[2]")
        bad = ffi.new("pyvmm_u64 *")
        rc = lib.pyvmm_lazy_table_apply_index(
            tables, pages, len(self.tables), ffi.from_buffer(records),
            len(records) // _INDEX_RECORD, info.stream_offset,
            info.stream_offset + info.stream_length, counts, bad)
        if rc == -errno_codes.ENOMEM:
            raise MemoryError("page index tables")
        return rc == 0 and (counts[0], counts[1]) == (info.pages, info.zero_pages)

    def discard_data_pages(self, blocks: list[RamBlock]) -> None:
        """Make every page the tables read from the file missing again (see
        ``pyvmm_lazy_table_discard``: a huge page may have come in with an inflated page)."""
        for block, table, npages in zip(blocks, self.tables, self.npages):
            rc = lib.pyvmm_lazy_table_discard(ffi.cast("void *", block.host_addr), table, npages)
            if rc:
                raise UffdError("lazy reload", -rc, detail=f"cannot discard RAM block "
                                                             f"{block.name!r} before loading it")

    def data_end(self) -> int:
        """One past the last file byte any table refers to."""
        count = ffi.new("pyvmm_u64 *")
        return max((int(lib.pyvmm_lazy_table_end(table, npages, count))
                    for table, npages in zip(self.tables, self.npages)), default=0)


class LazyLoader:
    """The C threads filling a lazily reloaded machine's RAM, and what they did.

    Created by :func:`lazy_reload`. :meth:`close` (or leaving a ``with`` block) waits for the
    fill to finish, so the machine stays correct: close the loader before the machine. A
    checkpoint of the machine waits for the fill too (at its pause), and fails with the loader's
    error if the reload failed.
    Methods may be called from any thread but the vCPU's.
    """

    def __init__(self, machine: Machine, container: CheckpointFile, uffd: Userfaultfd,
                 tables: _SourceTables, started: float, *, fault_run: int, fill_run: int,
                 fill_nice: int, crcs: RamCrcTable | None = None) -> None:
        self.machine = machine
        self._crcs = crcs  # the per-page CRCs every page read must have (file block order)
        self._crc_buffers: list[Any] = []
        self.path = container.path
        self._container = container
        self._uffd = uffd
        self._tables = tables
        self._increments = container.header.increments
        self._started = started
        self._blocks: list[RamBlock] = []
        self._present: list[PageBitmap] = []
        handle = lib.pyvmm_lazy_new(uffd.fileno(), container.fd, len(machine.ram_blocks),
                                    fault_run, fill_run, fill_nice)
        if handle == ffi.NULL:
            raise PyvmmError("lazy reload: out of memory for the loader")
        self._handle: Any = handle
        self._free = weakref.finalize(self, lib.pyvmm_lazy_free, handle)
        self._lock = threading.Lock()
        self._close_requested = threading.Event()
        self._released = False
        self._released_event = threading.Event()
        self._fill_started = False
        self._final: Any = None
        self._error: PyvmmError | None = None
        self._error_set = threading.Event()  # set once the watcher has built self._error
        self._setup_ms = 0.0
        self._first_insn: float | None = None
        self._filled_at: float | None = None
        self._hook: int | None = None
        self._hook_callbacks: list[Any] = []
        self._watcher = threading.Thread(target=self._watch, name="lazy-reload-watcher",
                                         daemon=True)

    # ----------------------------------------------------------------------------- setup
    def _register(self, handler_cpu: int | None) -> None:
        """Register every block in MISSING mode and start the fault handler (RAM untouched)."""
        for block, table in zip(self.machine.ram_blocks, self._tables.tables):
            ioctls = self._uffd.register(block.host_addr, block.size,
                                         UFFDIO_REGISTER_MODE_MISSING)
            self._blocks.append(block)
            if not (ioctls >> _UFFDIO_COPY_BIT & 1 and ioctls >> _UFFDIO_ZEROPAGE_BIT & 1):
                raise UffdError("UFFDIO_REGISTER", errno_codes.EOPNOTSUPP,
                                detail=f"no UFFDIO_COPY/ZEROPAGE on RAM block {block.name!r}")
            present = block.new_bitmap()
            self._present.append(present)
            rc = lib.pyvmm_lazy_add_block(self._handle, block.host_addr, block.page_count, table,
                                          ffi.cast("pyvmm_u64 *", present.address))
            if not rc and self._crcs is not None:
                crcs = self._crcs.blocks[len(self._blocks) - 1]
                if len(crcs) != block.page_count:
                    raise FormatError(f"RAM block {block.name!r} has {block.page_count} pages, "
                                      f"its checksums {len(crcs)}")
                # pinned, and kept for as long as the loader (so the C threads) lives
                self._crc_buffers.append(ffi.from_buffer("unsigned int[]", crcs))
                rc = lib.pyvmm_lazy_set_block_crcs(self._handle, len(self._blocks) - 1,
                                                   self._crc_buffers[-1])
            if rc:
                raise UffdError("lazy reload", -rc, detail=f"RAM block {block.name!r}")
        rc = lib.pyvmm_lazy_start_handler(self._handle, -1 if handler_cpu is None else
                                          handler_cpu)
        if rc:
            raise UffdError("lazy reload", -rc, detail="cannot start the fault handler")

    def _start(self, fill: bool) -> None:
        if fill:
            self.start_fill()
        self._setup_ms = (time.perf_counter() - self._started) * 1e3
        self._watcher.start()
        self.machine.add_state_listener(self._on_state)

    def _hook_first_instruction(self) -> None:
        """Note when the guest executes its first instruction (then the hook goes away)."""
        uc = self.machine.uc
        pc = uc.reg_read(a64.UC_ARM64_REG_PC)

        def first(_uc: Any, _address: int, _size: int, _ud: Any) -> None:
            if self._first_insn is None:
                self._first_insn = time.perf_counter()
            hook = self._hook
            if hook is not None:
                self._hook = None
                # the ctypes thunk running this call must outlive it: keep it before deleting
                self._hook_callbacks.append(getattr(uc, "_callbacks", {}).get(hook))
                uc.hook_del(hook)

        self._hook = uc.hook_add(UC_HOOK_CODE, first, None, pc, pc)

    # ----------------------------------------------------------------------------- running
    def _watch(self) -> None:
        """The watcher thread: release the RAM once filled, or stop the guest on a failure."""
        result = int(lib.pyvmm_lazy_wait(self._handle, -1))
        if result == 1:
            self._filled_at = time.perf_counter()
        elif result == 2:
            try:
                self._fail()
            finally:
                self._error_set.set()
            self._close_requested.wait()  # go on serving faults (with zeros) until closed
        with self._lock:
            self._release()

    def _fail(self) -> None:
        self._error = self._describe(self._raw_stats())
        machine = self.machine
        try:
            # the guest must not run on what could not be loaded
            if machine.state is RunState.RUNNING:
                machine.pause(RunState.INTERNAL_ERROR, reason=StopReason.ERROR)
            if machine.state not in (RunState.SHUTDOWN, RunState.GUEST_PANICKED,
                                     RunState.INTERNAL_ERROR):
                try:
                    machine.set_state(RunState.INTERNAL_ERROR)
                except RunStateError:
                    # a paused machine reaches internal-error through finish-migrate, as a
                    # failed incoming migration ends
                    machine.set_state(RunState.FINISH_MIGRATE)
                    machine.set_state(RunState.INTERNAL_ERROR)
        except RunStateError:
            pass  # the machine was closed under the loader: nothing can run on it any more

    def _raw_stats(self) -> Any:
        stats = ffi.new("struct pyvmm_lazy_stats *")
        lib.pyvmm_lazy_get_stats(self._handle, stats)
        return stats

    def _on_state(self, _old: RunState, new: RunState) -> None:
        """Machine state listener: a checkpoint (SAVE_VM) waits until all RAM is loaded and
        unregistered (a full checkpoint skips pages not populated yet; dirty tracking needs the
        range). Runs on the checkpointing thread, holding the machine's lock: it waits for the C
        threads and the watcher's release, neither of which needs that lock."""
        if new is not RunState.SAVE_VM or self._released_event.is_set():
            return
        self.start_fill()
        if int(lib.pyvmm_lazy_wait(self._handle, -1)) == 2:
            raise self._describe(self._raw_stats())
        self._released_event.wait()

    def _describe(self, stats: Any) -> PyvmmError:
        kind = int(stats.error_kind)
        offset = int(stats.error_offset)
        increment = next((info.index for info in self._increments
                          if info.stream_offset <= offset < info.stream_offset +
                          info.stream_length), None)
        block = self._blocks[stats.error_block].name if stats.error_block < len(self._blocks) \
            else str(stats.error_block)
        where = f"page {int(stats.error_page)} of RAM block {block}"
        if kind == lib.PYVMM_LAZY_TRUNCATED:
            return FormatError(f"lazy reload of {self.path}: the page data of {where} is cut "
                               f"short by the end of the file", offset=offset,
                               increment=increment)
        if kind == lib.PYVMM_LAZY_BAD_HEADER:
            return FormatError(f"lazy reload of {self.path}: the record header of {where} reads "
                               f"0x{int(stats.error_found):016x}, not that page's", offset=offset,
                               increment=increment)
        if kind == lib.PYVMM_LAZY_BAD_CRC:
            gpa = self._blocks[stats.error_block].gpa + int(stats.error_page) * PAGE_SIZE \
                if stats.error_block < len(self._blocks) else None
            return ChecksumError(f"lazy reload of {self.path}: the page data of {where}"
                                 f"{'' if gpa is None else f' (GPA 0x{gpa:x})'} does not match "
                                 f"its checksum (CRC-32C 0x{int(stats.error_found):08x}); it was "
                                 f"not loaded", offset=offset, increment=increment)
        if kind == lib.PYVMM_LAZY_READ_FAILED:
            return FormatError(f"lazy reload of {self.path}: cannot read {where}: "
                               f"{os.strerror(stats.error)}", offset=offset, increment=increment)
        return UffdError("lazy reload", int(stats.error), detail=f"serving {where}")

    def _release(self) -> None:
        """Unregister the RAM and stop the C threads (under self._lock; idempotent)."""
        if self._released:
            return
        self._released = True
        for block in self._blocks:
            try:
                self._uffd.unregister(block.host_addr, block.size)
            except UffdError:
                pass  # the machine closed its RAM already
        lib.pyvmm_lazy_stop(self._handle)
        final = ffi.new("struct pyvmm_lazy_stats *")
        lib.pyvmm_lazy_get_stats(self._handle, final)
        self._final = final
        self._uffd.close()
        self._container.close()
        self._released_event.set()

    # ----------------------------------------------------------------------------- public
    def start_fill(self) -> None:
        """Start the fill thread (lazy_reload does, unless asked not to); idempotent."""
        with self._lock:
            if self._fill_started or self._released:
                return
            rc = lib.pyvmm_lazy_start_fill(self._handle)
            if rc:
                raise UffdError("lazy reload", -rc, detail="cannot start the fill thread")
            self._fill_started = True

    @property
    def error(self) -> PyvmmError | None:
        """Why the reload failed (the machine is then in ``internal-error``), or None."""
        return self._error

    def wait_filled(self, timeout: float | None = None) -> bool:
        """Wait until every data page is in RAM; False if ``timeout`` seconds passed first.

        Raises the loader's error (a FormatError naming file, increment and offset) if it
        failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._error is not None:
                raise self._error
            with self._lock:
                if self._released:
                    done = self._final.fill_done
                else:
                    remaining = 200 if deadline is None else \
                        max(0, min(200, int((deadline - time.monotonic()) * 1e3)))
                    done = None
            if done is None:
                result = int(lib.pyvmm_lazy_wait(self._handle, remaining))
                if result == 2:
                    # the watcher builds the error (then serves faults until closed)
                    self._error_set.wait(5.0)
                    if self._error is None:
                        stats = ffi.new("struct pyvmm_lazy_stats *")
                        lib.pyvmm_lazy_get_stats(self._handle, stats)
                        raise self._describe(stats)
                    raise self._error
                done = result == 1
            if done:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def stats(self) -> LazyStats:
        """The counters so far (final ones once released)."""
        with self._lock:
            if self._final is not None:
                raw = self._final
            else:
                raw = ffi.new("struct pyvmm_lazy_stats *")
                lib.pyvmm_lazy_get_stats(self._handle, raw)
        return LazyStats(
            faults=int(raw.faults), fault_pages=int(raw.fault_pages),
            zero_pages=int(raw.zero_pages), fill_pages=int(raw.fill_pages),
            data_pages=int(raw.data_pages), exists=int(raw.exists),
            filled=bool(raw.fill_done), setup_ms=self._setup_ms,
            first_insn_ms=None if self._first_insn is None else
            (self._first_insn - self._started) * 1e3,
            filled_ms=None if self._filled_at is None else
            (self._filled_at - self._started) * 1e3)

    def close(self) -> None:
        """Wait for the fill to finish, then unregister the RAM and stop the C threads.

        Afterwards the machine is an ordinary machine, unless the reload failed: it is then in
        ``internal-error`` and its RAM incomplete. Idempotent; does not raise the loader's error.
        """
        self._close_requested.set()
        self.start_fill()
        if self._watcher.is_alive() or self._watcher.ident is not None:
            self._watcher.join()
        with self._lock:
            self._release()
        self._free()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lazy_reload(target: CheckpointTarget | str, *, uart_sink: UartSink | None = None,
                stdout: OutputSink | None = None, stderr: OutputSink | None = None,
                fault_run: int = 64, fill_run: int = 256, fill_nice: int = 0,
                handler_cpu: int | None = None, fill: bool = True) -> tuple[Machine, LazyLoader]:
    """A new machine holding the state of the target's first N (default all) increments, whose
    RAM is loaded while it runs.

    Same machine and errors as :func:`~pyvmm.migration.checkpoint.reload`; in addition
    UffdError when userfaultfd cannot be used. ``fault_run``: pages served per fault (an
    aligned window, a power of two); ``fill_run``: pages per fill read; ``fill_nice``: niceness
    added to the fill thread; ``handler_cpu``: host CPU of the fault handler (default any);
    ``fill``: start the fill thread now (else pages come only by faults until
    :meth:`LazyLoader.start_fill` or :meth:`LazyLoader.close`).
    """
    started = time.perf_counter()
    if isinstance(target, str):
        target = parse_target(target)
    if target.squash:
        raise ConfigError("a lazy reload cannot squash: reload with chpt:[N:]FILE")
    if not 1 <= fault_run <= MAX_RUN or fault_run & (fault_run - 1):
        raise ConfigError(f"fault_run must be a power of two from 1 to {MAX_RUN}, "
                          f"not {fault_run}")
    if not 1 <= fill_run <= MAX_RUN:
        raise ConfigError(f"fill_run must be 1 to {MAX_RUN}, not {fill_run}")
    container = CheckpointFile.open(target.path)
    machine: Machine | None = None
    loader: LazyLoader | None = None
    uffd: Userfaultfd | None = None
    try:
        header = container.header
        available = len(header.increments)
        if available == 0:
            raise FormatError(f"{target.path} holds no checkpoint yet")
        count = available if target.count is None else target.count
        if count > available:
            raise ConfigError(f"{target.path} holds {available} increment(s), not {count}")
        increments = header.increments[:count]
        check_chain(increments, target.path)
        # with checksums: index, checksum blocks, device sections and the stream bytes around
        # the page data are checked before the guest starts; page data (and the record
        # headers of the older increments' pages) as the C threads read it
        crcs = check_before_load(container, increments, by_index=True)
        tables = _SourceTables(header.ram_blocks)
        index_records: list[memoryview] = []
        for info in increments:  # each page index checked and applied in C, in one call
            records = page_index_records(container.page_index_blob(info.index), info.index)
            if records is None or not tables.apply_index(records, info):
                container.page_index(info.index)  # names what is wrong with it
                raise FormatError("malformed page index", increment=info.index)
            index_records.append(records)
        size = os.fstat(container.fd).st_size
        end = tables.data_end()
        if end > size:
            raise FormatError(f"{target.path} is cut short: page data reaches byte {end}, the "
                              f"file has {size}")
        machine = new_machine(header, target.path, uart_sink)
        if [b.name for b in machine.ram_blocks] != [b.name for b in header.ram_blocks]:
            raise FormatError(f"{target.path}: RAM blocks {[b.name for b in header.ram_blocks]} "
                              f"are not in the order this machine builds them")
        # the checks every reload makes of every increment (the last one's when its device
        # sections are loaded below), before the guest can run on what they would refuse
        scratch = scratch_entries(machine)
        for info, records in zip(increments[:-1], index_records[:-1]):
            check_increment_structure(container, info, scratch, records, final=False)
        if crcs is not None and any(holds_compressed(r) for r in index_records):
            raise FormatError(f"{target.path} lists compressed pages and checksums: pyvmm "
                              f"writes no such file (checksums cover plain records only)")
        # pages kept compressed cannot be found by offset: they go into RAM now, before it is
        # registered (present pages never fault), and their table entries say so
        if inflate_compressed(machine, header.ram_blocks, container, increments,
                              index_records):
            tables.discard_data_pages(machine.ram_blocks)
        uffd = Userfaultfd.open(0)
        if uffd.user_mode_only:
            raise UffdError("open", errno_codes.EPERM,
                            detail="a lazy reload needs a userfaultfd that also serves kernel "
                                   "accesses: use /dev/userfaultfd or "
                                   "vm.unprivileged_userfaultfd=1")
        loader = LazyLoader(machine, container, uffd, tables, started, fault_run=fault_run,
                            fill_run=fill_run, fill_nice=fill_nice, crcs=crcs)
        loader._register(handler_cpu)
        _load_devices(machine, container, increments[-1], index_records[-1], stdout, stderr)
        if machine.state is not RunState.SHUTDOWN:
            loader._hook_first_instruction()
        loader._start(fill)
    except BaseException:
        if loader is not None:
            with loader._lock:
                loader._release()
            loader._free()
        else:
            if uffd is not None:
                uffd.close()
            container.close()
        if machine is not None:
            machine.close()
        raise
    return machine, loader


def _load_devices(machine: Machine, container: CheckpointFile, info: IncrementInfo,
                  records: memoryview, stdout: OutputSink | None,
                  stderr: OutputSink | None) -> None:
    """CPU, devices and the Linux layer from the last increment's stream; RAM records are
    parsed and skipped (RAM comes from the loader), as the indexed reload's last increment."""
    machine.set_state(RunState.INMIGRATE)
    entries = machine_save_state(machine, with_linux=True)
    check_increment_structure(container, info, entries, records, final=True)
    restore_machine(machine, entries, stdout, stderr)  # the same machine-level post_load


__all__ = ["LazyLoader", "LazyStats", "lazy_reload"]
