"""Live write-protect: a checkpoint saves RAM as it was when protected while writers go on.

:class:`WriteProtectSession` is the live checkpoint of DESIGN.md section 4: RAM is
write-protected synchronously (through :mod:`~pyvmm.migration.uffd_syscalls`) and a C thread
(``pyvmm/native/wp_fault.c``) resolves each write fault by copying the page to a shadow slot first, so
the saver sees RAM exactly as it was when the session protected it. The thread never needs the
GIL (DESIGN.md section 5).  Errors are :class:`~pyvmm.errors.UffdError` naming the ``live``
checkpoint kind when a feature or privilege is missing.

This module also offers :class:`~pyvmm.migration.uffd_async_tracker.AsyncDirtyTracker`, the
other userfaultfd tracker (the two exclude each other on the same RAM).  All RAM pages here are
4 KiB, the host page size; guest and host pages coincide.
"""

from __future__ import annotations

import errno as errno_codes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Self

from pyvmm._native import ffi, lib
from pyvmm.errors import UffdError
from pyvmm.migration.defaults import FAULT_MODES
from pyvmm.migration.uffd_async_tracker import AsyncDirtyTracker
from pyvmm.migration.uffd_syscalls import (
    LIVE,
    UFFD_FEATURE_SIGBUS,
    UFFD_FEATURE_WP_UNPOPULATED,
    Userfaultfd,
    check_block_names,
    register_wp,
)
from pyvmm.ram import PAGE_SIZE, PageBitmap, RamBlock

__all__ = ["AsyncDirtyTracker", "LiveRun", "LiveSaveCounts", "ShadowCopy", "WriteProtectSession",
           "WriteProtectStats"]


class LiveRun(NamedTuple):
    """Consecutive pages of one block written by :meth:`WriteProtectSession.save`."""

    block: int
    first_page: int
    npages: int
    data_offset: int
    """File offset of the first page's data (0 for a zero run; a compressed run: its first
    record's length)."""
    zero: bool
    compressed: bool = False


class LiveSaveCounts(NamedTuple):
    """What one :meth:`WriteProtectSession.save` wrote."""

    bytes_written: int
    data_pages: int
    zero_pages: int
    from_shadow: int
    compressed_pages: int = 0  # of data_pages
    compressed_bytes: int = 0


class ShadowCopy(NamedTuple):
    """A page the fault handler copied before letting a write through."""

    block: str
    page: int
    slot: int
    data: memoryview
    """The 4 KiB copy, in the C shadow pool: valid until :meth:`WriteProtectSession.release_shadow`."""


@dataclass(frozen=True)
class WriteProtectStats:
    """Counters of a :class:`WriteProtectSession`, read at one moment."""

    faults: int
    """Write faults the C thread resolved."""
    shadow_copies: int
    """Pages copied to the shadow pool before their write went on."""
    pool_waits: int
    """Times the handler found the pool full (it then waited for :meth:`WriteProtectSession.save`,
    or took an extra page when none was running)."""
    queued: int
    """Shadow copies not yet taken by :meth:`WriteProtectSession.next_shadow`."""
    handler_errno: int
    """Last error of the C thread (0: none)."""


class WriteProtectSession:
    """A live checkpoint's view of RAM: protected at construction, then saved page by page while
    writers go on; whatever the saver gets is RAM as it was at construction.

    A C thread (never touching Python) handles each write fault on page p: unless p is already
    saved, it copies p to a free slot of a pool of ``shadow_pages`` 4 KiB slots and queues
    ``(p, slot)``; then it marks p in :attr:`dirty` (the next increment's pages) and unprotects
    ``unprotect_pages`` pages around p (an aligned run: every page of it is secured and counted
    dirty first, since later writes to it no longer fault), which wakes the writer.

    The saver saves each page exactly once.  :meth:`save` does it all in one C call (what a
    checkpoint uses).  A Python saver (any one thread) takes first everything :meth:`next_shadow`
    yields (then :meth:`release_shadow`), and every other page with :meth:`take_page_for_saving`,
    which claims the page and copies it from RAM in one C call: a writer faulting on it meanwhile
    waits only for that memcpy, never for Python. Pages that need no saving are claimed with
    :meth:`mark_sent`.

    When the pool is full while :meth:`save` runs, the handler waits for it to release a slot
    (the faulting writer waits with it: this bounds the memory); :meth:`save` drains the pool
    in C and never needs the GIL, so a writer that holds the GIL (a device model, a Python copy)
    cannot deadlock it.  When the pool is full and no :meth:`save` runs (before it starts, or
    with a Python saver using :meth:`next_shadow`), the handler copies to an extra page of its
    own instead of waiting for a thread that may need the GIL; such a page is freed once
    released.  :attr:`WriteProtectStats.pool_waits` counts the times the pool was full.

    The session can serve many rounds (:meth:`rearm`); between rounds every page counts as
    saved and the handler only marks written pages in :attr:`dirty`, so it is also a dirty
    tracker, and :meth:`reprotect` re-protects what was written while writers run.

    Kernel-side writes (``read()`` into guest RAM) fault here like any other, unless the
    userfaultfd had to be opened user-mode-only (no privilege): they then fail with EFAULT, so
    such a session refuses to start rather than break device I/O later.

    ``fault_mode`` says who resolves a fault.  ``"thread"`` (the default): the C thread above,
    blocked in ``read()`` on the userfaultfd (switched to blocking for it; stopping it writes to
    a protected page of its own) and woken by the kernel for each fault; the writer sleeps
    meanwhile (two context switches per fault, fastest when both share a CPU: ``handler_cpu``).  ``"signal"``: the userfaultfd has
    ``UFFD_FEATURE_SIGBUS`` and the faulting thread itself resolves its fault, in a C ``SIGBUS``
    handler (process-wide; other ``SIGBUS`` go to the handler installed before it), then retries
    its write: no wakeup, no thread placement, about 1.5x the faults per second.  Same policy and
    guarantees for every user-mode writer (the vCPU, Python, C); but a kernel-side write into a
    protected page (``read()``/``preadv`` straight into guest RAM) then fails with EFAULT instead
    of faulting, so choose it only where RAM is written from user space alone.
    """

    FEATURES = UFFD_FEATURE_WP_UNPOPULATED

    def __init__(
        self,
        blocks: Sequence[RamBlock],
        *,
        shadow_pages: int = 1024,
        unprotect_pages: int = 1,
        handler_cpu: int | None = None,
        feature_mask: int | None = None,
        tracking_only: bool = False,
        fault_around: int | None = None,
        fault_mode: str = "thread",
    ) -> None:
        """``tracking_only``: start with every page counted as saved (no round open: the
        handler only marks written pages dirty until :meth:`rearm`).  ``fault_around``: when a
        writer faults on the page right after the run its last fault opened, the handler
        doubles the run, up to this many pages (default ``unprotect_pages``: no growth): a
        sequential writer then faults a few times per ``fault_around`` pages instead of once
        per page, at the price of up to ``fault_around - 1`` pages counted dirty unwritten."""
        check_block_names(blocks)
        if fault_mode not in FAULT_MODES:
            raise ValueError(f"unknown fault_mode {fault_mode!r} (choose from "
                             f"{', '.join(FAULT_MODES)})")
        self.fault_mode = fault_mode
        if shadow_pages < 1 or unprotect_pages < 1:
            raise ValueError("shadow_pages and unprotect_pages must be at least 1")
        if fault_around is not None and fault_around < unprotect_pages:
            raise ValueError(f"fault_around {fault_around} is below unprotect_pages "
                             f"{unprotect_pages}")
        features = self.FEATURES | (UFFD_FEATURE_SIGBUS if fault_mode == "signal" else 0)
        self._uffd = Userfaultfd.open(features, capability=LIVE, feature_mask=feature_mask)
        if self._uffd.user_mode_only:
            self._uffd.close()
            raise UffdError("open", errno_codes.EPERM, capability=LIVE,
                            detail="only UFFD_USER_MODE_ONLY is allowed: kernel writes into "
                            "protected RAM would fail with EFAULT")
        self._blocks = list(blocks)
        self._index = {block.name: i for i, block in enumerate(self._blocks)}
        self.dirty = {block.name: block.new_bitmap() for block in self._blocks}
        """Per block, the pages written (or opened to writing) since protection: the next
        increment's dirty pages. The C thread sets bits while Python reads."""
        handle = lib.pyvmm_wp_session_new(self._uffd.fileno(), len(self._blocks), shadow_pages,
                                          unprotect_pages)
        if handle == ffi.NULL:
            self._uffd.close()
            raise MemoryError("no memory for the write-protect session's shadow pool")
        self._session: Any = ffi.gc(handle, lib.pyvmm_wp_session_free)
        lib.pyvmm_wp_session_set_fault_around(self._session, fault_around or unprotect_pages)
        lib.pyvmm_wp_session_set_mode(self._session, FAULT_MODES.index(fault_mode))
        self._page_out = ffi.new("char[]", PAGE_SIZE)
        try:
            for block in self._blocks:
                rc = lib.pyvmm_wp_session_add_block(
                    self._session, block.host_addr, block.page_count,
                    ffi.cast("pyvmm_u64 *", self.dirty[block.name].address))
                if rc:
                    raise UffdError("session setup", -rc, capability=LIVE)
                if tracking_only:  # before any write can fault
                    nothing = block.new_bitmap()
                    lib.pyvmm_wp_session_mark_sent_unselected(
                        self._session, self._index[block.name],
                        ffi.cast("pyvmm_u64 *", nothing.address))
            rc = lib.pyvmm_wp_session_start(self._session, -1 if handler_cpu is None
                                            else handler_cpu)
            if rc:
                raise UffdError("fault handler start", -rc, capability=LIVE)
            self._registered = register_wp(self._uffd, self._blocks)
            lib.pyvmm_wp_session_arm(self._session)
        except BaseException:
            lib.pyvmm_wp_session_stop(self._session)
            self._uffd.close()
            raise

    def _block_index(self, block: str) -> int:
        try:
            return self._index[block]
        except KeyError:
            raise KeyError(f"no RAM block {block!r} in this session") from None

    def set_handler_cpu(self, cpu: int | None) -> None:
        """Pin the fault-handler thread to ``cpu`` (``None``: any CPU). A handler on the
        faulting thread's CPU resolves faults about ten times faster (DESIGN.md section 8)."""
        rc = lib.pyvmm_wp_session_set_cpu(self._session, -1 if cpu is None else cpu)
        if rc:
            raise UffdError("pin fault handler", -rc)

    def next_shadow(self) -> ShadowCopy | None:
        """The oldest shadow copy not yet taken, or ``None``; take these before RAM pages."""
        block = ffi.new("unsigned int *")
        page = ffi.new("pyvmm_u64 *")
        slot = ffi.new("unsigned int *")
        if not lib.pyvmm_wp_session_next_shadow(self._session, block, page, slot):
            return None
        addr = lib.pyvmm_wp_session_slot_addr(self._session, slot[0])
        data = memoryview(ffi.buffer(addr, PAGE_SIZE))
        return ShadowCopy(self._blocks[block[0]].name, int(page[0]), int(slot[0]), data)

    def release_shadow(self, slot: int) -> None:
        """Give a slot back to the pool once its copy is saved (its memoryview goes stale)."""
        rc = lib.pyvmm_wp_session_release_shadow(self._session, slot)
        if rc:
            raise ValueError(f"shadow slot {slot} is not in use")

    def take_page_for_saving(self, block: str, page: int) -> bytes | None:
        """The protect-time bytes of ``page``, copied from RAM, if no one saved or shadowed it
        yet (it is then sent), else ``None``."""
        index = self._block_index(block)
        rc = lib.pyvmm_wp_session_take_page(self._session, index, page, self._page_out)
        if rc < 0:
            raise IndexError(f"page {page} outside RAM block {block!r}")
        return ffi.buffer(self._page_out, PAGE_SIZE)[:] if rc else None

    def mark_sent(self, block: str, start: int, count: int) -> int:
        """Claim pages ``start..start+count-1`` as saved without copying them (e.g. pages an
        incremental checkpoint skips); returns how many were not claimed before."""
        return int(lib.pyvmm_wp_session_mark_sent(self._session, self._block_index(block),
                                                  start, count))

    def rearm(self, selection: Mapping[str, PageBitmap]) -> None:
        """Begin a new round on this session (guest paused, previous round finished): the
        pages in ``selection`` need saving again, all others count as saved, :attr:`dirty` is
        cleared and the pages it held are write-protected again (every other page still is: the
        handler unprotects a page only after setting its dirty bit, under one lock with
        :meth:`reprotect`).  Costs in proportion to the pages written since the last
        :meth:`reprotect`, not to RAM: read :attr:`dirty` first if it matters."""
        if self.stats().queued:
            raise ValueError("rearm with shadow copies still queued")
        for number, block in enumerate(self._blocks):
            selected = selection.get(block.name) or block.new_bitmap()
            rc = int(lib.pyvmm_wp_session_rearm(self._session, number,
                                                ffi.cast("pyvmm_u64 *", selected.address)))
            if rc:
                raise UffdError("UFFDIO_WRITEPROTECT", -rc, capability=LIVE,
                                detail=f"re-arming RAM block {block.name!r}")

    def reprotect(self, carried: Mapping[str, PageBitmap] | None = None) -> int:
        """Write-protect again every page in :attr:`dirty` and clear those bits, or-ing them
        into ``carried`` (per block name) when given; safe while writers run.  Returns the
        pages protected again.  Done before a pause, it leaves the pause only what is written
        after it."""
        total = 0
        for number, block in enumerate(self._blocks):
            into = ffi.NULL
            if carried is not None:
                bitmap = carried[block.name]
                if bitmap.npages != block.page_count:
                    raise ValueError(f"bitmap of {bitmap.npages} pages for block "
                                     f"{block.name!r}")
                into = ffi.cast("pyvmm_u64 *", bitmap.address)
            rc = int(lib.pyvmm_wp_session_reprotect(self._session, number, into))
            if rc < 0:
                raise UffdError("UFFDIO_WRITEPROTECT", -rc, capability=LIVE,
                                detail=f"re-protecting RAM block {block.name!r}")
            total += rc
        return total

    def abandon_round(self) -> None:
        """Give up the current round (its save failed): pages not saved yet count as saved
        and queued shadow copies are dropped, so the handler only tracks from now on."""
        lib.pyvmm_wp_session_abandon_round(self._session)

    def save(self, fd: int, offset: int, selection: Mapping[str, PageBitmap], *,
             open_saved: bool = False, nice: int = 0,
             compress_level: int = 0) -> tuple[list[LiveRun], LiveSaveCounts]:
        """Write every page of ``selection`` as it was when the round began, as QEMU RAM
        records at ``offset`` of ``fd``, in one C call that never needs the GIL: queued shadow
        copies first whenever there are any, the other pages claimed and copied out of RAM,
        64 records per ``pwritev``.  Returns the page runs written and the counters.

        ``open_saved``: unprotect each page once it is copied out, so that later writes to it
        do not fault; it then counts as dirty, so only for a session that is stopped after this
        round (a live checkpoint that tracks nothing for the next one).  ``nice`` (0..19): above
        0 the work runs on a C thread of that nice value, so that writers running meanwhile (the
        vCPU) get the CPU first when they compete for it; the save then takes longer.
        ``compress_level``: a zstd level, pages that compress well become compressed records
        (0: QEMU's PAGE records only)."""
        runs, nruns, counts = self._save(fd, offset, selection, open_saved, nice, compress_level)
        zero, packed = lib.PYVMM_RUN_ZERO, lib.PYVMM_RUN_COMPRESSED
        return ([LiveRun(int(r.block), int(r.first_page), int(r.npages), int(r.data_offset),
                         r.kind == zero, r.kind == packed) for r in runs[0:nruns]], counts)

    def save_records(self, fd: int, offset: int, selection: Mapping[str, PageBitmap], *,
                     open_saved: bool = False, nice: int = 0,
                     compress_level: int = 0) -> tuple[bytes, LiveSaveCounts]:
        """:meth:`save`, with the runs as page index records (24 bytes each, see
        :class:`~pyvmm.migration.container_format.IndexRecords`) in the order written, built in
        C: a live save of scattered pages has a run per page."""
        runs, nruns, counts = self._save(fd, offset, selection, open_saved, nice, compress_level)
        out = ffi.new("unsigned char[]", max(nruns, 1) * 24)
        if lib.pyvmm_index_records_from_live_runs(runs, nruns, out):
            raise ValueError("live save runs do not fit page index records "
                             "(a block number over 65535 or a run over 2**32 pages)")
        records: bytes = ffi.buffer(out, nruns * 24)[:]
        return records, counts

    def _save(self, fd: int, offset: int, selection: Mapping[str, PageBitmap], open_saved: bool,
              nice: int, compress_level: int = 0) -> tuple[Any, int, LiveSaveCounts]:
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be 0..19, not {nice}")
        lib.pyvmm_wp_session_set_saver_nice(self._session, nice)
        specs = ffi.new("struct pyvmm_live_block[]", max(1, len(self._blocks)))
        keep: list[Any] = []
        max_runs = 1
        for number, block in enumerate(self._blocks):
            selected = selection.get(block.name)
            if selected is None:
                continue
            if selected.npages != block.page_count:
                raise ValueError(f"bitmap of {selected.npages} pages for block {block.name!r}")
            name = ffi.new("unsigned char[]", block.name.encode())
            keep.append(name)
            specs[number].select = ffi.cast("pyvmm_u64 *", selected.address)
            specs[number].idstr = name
            specs[number].idstr_len = len(block.name.encode())
            max_runs += selected.count()
        runs = ffi.new("struct pyvmm_live_run[]", max_runs)
        out = ffi.new("struct pyvmm_live_save_stats *")
        rc = int(lib.pyvmm_wp_session_save(self._session, fd, offset, specs, runs, max_runs,
                                           int(open_saved), compress_level, out))
        counts = LiveSaveCounts(int(out.bytes_written), int(out.data_pages),
                                int(out.zero_pages), int(out.from_shadow),
                                int(out.compressed_pages), int(out.compressed_bytes))
        if rc:
            raise UffdError("live save", -rc, capability=LIVE,
                            detail=f"after {counts.bytes_written} bytes at offset {offset}")
        return runs, int(out.nruns), counts

    def mark_sent_unselected(self, block: str, selected: PageBitmap) -> int:
        """Claim, in one C call, every page of ``block`` NOT set in ``selected`` as needing no
        saving (what :meth:`mark_sent` does run by run); returns how many were claimed."""
        number = self._block_index(block)
        if selected.npages != self._blocks[number].page_count:
            raise ValueError(f"bitmap of {selected.npages} pages for block {block!r}")
        return int(lib.pyvmm_wp_session_mark_sent_unselected(
            self._session, number, ffi.cast("pyvmm_u64 *", selected.address)))

    def is_sent(self, block: str, page: int) -> bool:
        """Whether ``page`` is saved (from RAM, by its shadow copy, or by :meth:`mark_sent`)."""
        state = int(lib.pyvmm_wp_session_page_state(self._session, self._block_index(block),
                                                    page))
        if state < 0:
            raise IndexError(f"page {page} outside RAM block {block!r}")
        return state == 2

    def stats(self) -> WriteProtectStats:
        """The counters now."""
        out = ffi.new("pyvmm_u64[5]")
        lib.pyvmm_wp_session_counters(self._session, out)
        return WriteProtectStats(*(int(v) for v in out))

    def stop(self) -> None:
        """Stop the C thread, unregister RAM (writers waiting are woken and go on unprotected) and
        close the userfaultfd; idempotent. Stopping before every page is saved gives up the
        protect-time guarantee for the pages left. Raises :class:`UffdError` if the handler
        thread failed."""
        # the thread first, so that it cannot race the unregister; writers still waiting in a
        # fault it did not read are woken by the unregister
        lib.pyvmm_wp_session_stop(self._session)
        try:
            for block in self._registered:
                self._uffd.unregister(block.host_addr, block.size)
        finally:
            self._registered = []
            self._uffd.close()
        err = self.stats().handler_errno
        if err:
            raise UffdError("fault handler", err, capability=LIVE)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
