"""userfaultfd for checkpoints: the syscall wrapper, the async dirty tracker, live write-protect.

Three layers, bottom up:

* :class:`Userfaultfd` mirrors the syscalls (open, ``UFFDIO_API``, ``REGISTER``/``UNREGISTER``,
  ``WRITEPROTECT``, ``COPY``, ``ZEROPAGE``, ``WAKE``) one method each; errors become
  :class:`~pyvmm.errors.UffdError` naming the operation, and for a missing feature or privilege
  the checkpoint kind (``"incremental"`` or ``"live"``) that is therefore unavailable.
* :class:`AsyncDirtyTracker` finds the pages written since the last look, for incremental
  checkpoints: a ``WP_ASYNC`` userfaultfd lets every write through while the kernel notes it in the
  page table, and ``PAGEMAP_SCAN`` reads and re-protects those notes in one ioctl per pass.
* :class:`WriteProtectSession` is the live checkpoint of DESIGN.md section 4: RAM is
  write-protected synchronously and a C thread (``pyvmm/native/uffd.c``) resolves each write
  fault by copying the page to a shadow slot first, so the saver sees RAM exactly as it was when
  the session protected it. The thread never needs the GIL (DESIGN.md section 5).

All RAM pages here are 4 KiB, the host page size; guest and host pages coincide.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

from pyvmm._native import ffi, lib
from pyvmm.errors import UffdError
from pyvmm.migration.defaults import FAULT_MODES
from pyvmm.ram import PAGE_SIZE, PageBitmap, RamBlock

# uapi values (include/uapi/linux/userfaultfd.h)
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
_UFFDIO_WRITEPROTECT_BIT = 6  # bit of UFFDIO_WRITEPROTECT in the ioctls REGISTER reports

FEATURE_NAMES = {
    UFFD_FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP",
    UFFD_FEATURE_SIGBUS: "SIGBUS",
    UFFD_FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED",
    UFFD_FEATURE_WP_ASYNC: "WP_ASYNC",
}

INCREMENTAL = "incremental"
LIVE = "live"

INJECT_OPEN_ERRNO_ENV = "PYVMM_UFFD_INJECT_OPEN_ERRNO"
"""Tests set this to an errno number to make every userfaultfd open fail with it."""

_PAGEMAP_SCAN_VEC = 512  # regions per PAGEMAP_SCAN ioctl: 12 KiB of vector


def _feature_names(bits: int) -> str:
    names = [name for bit, name in FEATURE_NAMES.items() if bits & bit]
    unknown = bits & ~sum(FEATURE_NAMES)
    if unknown:
        names.append(f"0x{unknown:x}")
    return ", ".join(names)


def _open_fd(capability: str | None) -> tuple[int, bool]:
    """A new O_NONBLOCK|O_CLOEXEC userfaultfd and whether it is limited to user-mode faults.

    Prefers ``/dev/userfaultfd`` (its permissions, not a sysctl, decide who may use it), then the
    syscall, then the syscall with ``UFFD_USER_MODE_ONLY`` (what an unprivileged process gets).
    """
    injected = os.environ.get(INJECT_OPEN_ERRNO_ENV)
    if injected:
        raise UffdError("open", int(injected), capability=capability,
                        detail=f"injected by {INJECT_OPEN_ERRNO_ENV}")
    fd = int(lib.pyvmm_uffd_open(1, 0))
    if fd >= 0:
        return fd, False
    fd = int(lib.pyvmm_uffd_open(0, 0))
    if fd >= 0:
        return fd, False
    if fd == -errno_codes.EPERM:
        fd = int(lib.pyvmm_uffd_open(0, 1))
        if fd >= 0:
            return fd, True
    raise UffdError("open", -fd, capability=capability,
                    detail="neither /dev/userfaultfd nor the userfaultfd syscall is usable")


def kernel_features(feature_mask: int | None = None, *, capability: str | None = None) -> int:
    """The ``UFFD_FEATURE_*`` bits this kernel offers (an ``UFFDIO_API`` handshake asking for
    none), and-ed with ``feature_mask`` when given, which simulates an older kernel. Errors name
    ``capability``, the checkpoint kind that asked."""
    fd, _ = _open_fd(capability)
    try:
        out = ffi.new("pyvmm_u64[2]")
        rc = lib.pyvmm_uffd_api(fd, 0, out, out + 1)
        if rc:
            raise UffdError("UFFDIO_API", -rc, capability=capability)
        features = int(out[0])
    finally:
        os.close(fd)
    return features if feature_mask is None else features & feature_mask


class Userfaultfd:
    """An open userfaultfd, after its ``UFFDIO_API`` handshake; one method per ioctl.

    Addresses and lengths are host addresses and byte counts, page aligned. Any thread may call
    any method; the C calls release the GIL.
    """

    def __init__(self, fd: int, features: int, ioctls: int, user_mode_only: bool,
                 capability: str | None) -> None:
        self._fd = fd
        self.features = features
        """Features the handshake enabled."""
        self.ioctls = ioctls
        """Bit mask of the ioctls the handshake made available (bit = _UFFDIO_* number)."""
        self.user_mode_only = user_mode_only
        """Opened with ``UFFD_USER_MODE_ONLY``: kernel-side writes (``read()`` into a protected
        page) then fail with EFAULT instead of faulting here."""
        self.capability = capability

    @classmethod
    def open(
        cls,
        features: int = 0,
        *,
        capability: str | None = None,
        feature_mask: int | None = None,
    ) -> Userfaultfd:
        """Open a userfaultfd and enable ``features``.

        Missing features raise :class:`UffdError` naming them and ``capability``, the checkpoint
        kind that needs them. ``feature_mask`` hides kernel features (to test older kernels).
        """
        offered = kernel_features(feature_mask, capability=capability)
        missing = features & ~offered
        if missing:
            raise UffdError("UFFDIO_API", errno_codes.EOPNOTSUPP, capability=capability,
                            detail=f"kernel lacks feature {_feature_names(missing)}")
        fd, user_mode_only = _open_fd(capability)
        out = ffi.new("pyvmm_u64[2]")
        rc = lib.pyvmm_uffd_api(fd, features, out, out + 1)
        if rc:
            os.close(fd)
            raise UffdError("UFFDIO_API", -rc, capability=capability,
                            detail=f"asking for {_feature_names(features) or 'no features'}")
        return cls(fd, int(out[0]), int(out[1]), user_mode_only, capability)

    def fileno(self) -> int:
        """The file descriptor (``-1`` once closed)."""
        return self._fd

    def _check(self, op: str, rc: int) -> int:
        if rc < 0:
            raise UffdError(op, -rc)
        return rc

    def _open_fd(self) -> int:
        if self._fd < 0:
            raise UffdError("use", errno_codes.EBADF, detail="the userfaultfd is closed")
        return self._fd

    def register(self, start: int, length: int, mode: int) -> int:
        """``UFFDIO_REGISTER`` the range in ``mode`` (MISSING and/or WP); returns its ioctls."""
        out = ffi.new("pyvmm_u64 *")
        rc = lib.pyvmm_uffd_register(self._open_fd(), start, length, mode, out)
        if rc == -errno_codes.EINVAL and mode & UFFDIO_REGISTER_MODE_WP:
            raise UffdError("UFFDIO_REGISTER", -rc, capability=self.capability,
                            detail="write-protect mode refused for this memory")
        self._check("UFFDIO_REGISTER", rc)
        return int(out[0])

    def unregister(self, start: int, length: int) -> None:
        """``UFFDIO_UNREGISTER``: drops protection and wakes any thread waiting in the range."""
        self._check("UFFDIO_UNREGISTER", lib.pyvmm_uffd_unregister(self._open_fd(), start, length))

    def writeprotect(self, start: int, length: int, protect: bool, *, wake: bool = True) -> None:
        """``UFFDIO_WRITEPROTECT``: protect, or unprotect (waking writers unless ``wake=False``)."""
        mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
        if not wake and not protect:
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        self._check("UFFDIO_WRITEPROTECT",
                    lib.pyvmm_uffd_writeprotect(self._open_fd(), start, length, mode))

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> int:
        """``UFFDIO_COPY`` ``length`` bytes from host address ``src``; returns bytes copied."""
        mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE
        return self._check("UFFDIO_COPY",
                           int(lib.pyvmm_uffd_copy(self._open_fd(), dst, src, length, mode)))

    def zeropage(self, start: int, length: int, *, wake: bool = True) -> int:
        """``UFFDIO_ZEROPAGE``: map zero pages over a missing range; returns bytes mapped."""
        mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE
        return self._check("UFFDIO_ZEROPAGE",
                           int(lib.pyvmm_uffd_zeropage(self._open_fd(), start, length, mode)))

    def wake(self, start: int, length: int) -> None:
        """``UFFDIO_WAKE`` the threads waiting on faults in the range."""
        self._check("UFFDIO_WAKE", lib.pyvmm_uffd_wake(self._open_fd(), start, length))

    def close(self) -> None:
        """Close the fd (idempotent); the kernel then drops every registration."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _register_wp(uffd: Userfaultfd, blocks: Iterable[RamBlock]) -> list[RamBlock]:
    """Register every block in WP mode and protect it all; on failure undo what was done."""
    done: list[RamBlock] = []
    try:
        for block in blocks:
            ioctls = uffd.register(block.host_addr, block.size, UFFDIO_REGISTER_MODE_WP)
            done.append(block)
            if not ioctls >> _UFFDIO_WRITEPROTECT_BIT & 1:
                raise UffdError("UFFDIO_REGISTER", errno_codes.EOPNOTSUPP,
                                capability=uffd.capability,
                                detail=f"no UFFDIO_WRITEPROTECT on RAM block {block.name!r}")
            uffd.writeprotect(block.host_addr, block.size, True)
    except BaseException:
        for block in done:
            uffd.unregister(block.host_addr, block.size)
        raise
    return done


def _check_blocks(blocks: Sequence[RamBlock]) -> None:
    names = [block.name for block in blocks]
    if len(set(names)) != len(names):
        raise ValueError(f"RAM block names repeat: {names}")


class AsyncDirtyTracker:
    """Pages written since the last :meth:`collect`, by any writer: the vCPU (unicorn writes
    straight into the mapping), Python, or the kernel (``read()`` into guest RAM).

    Uses a userfaultfd with ``WP_ASYNC | WP_UNPOPULATED``: writes never block, the kernel only
    clears the page's protection, and ``PAGEMAP_SCAN`` reports the unprotected pages and protects
    them again in the same pass. A block can be watched by one userfaultfd at a time, so this and
    :class:`WriteProtectSession` exclude each other on the same RAM (DESIGN.md section 5).
    Methods are for one thread at a time; writers may run concurrently on any thread.
    """

    FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED

    def __init__(self, blocks: Sequence[RamBlock], *, feature_mask: int | None = None,
                 vec_len: int = _PAGEMAP_SCAN_VEC) -> None:
        _check_blocks(blocks)
        if vec_len < 1:
            raise ValueError(f"vec_len must be at least 1, not {vec_len}")
        self._vec_len = vec_len
        self._uffd = Userfaultfd.open(self.FEATURES, capability=INCREMENTAL,
                                      feature_mask=feature_mask)
        try:
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            self._uffd.close()
            raise UffdError("open /proc/self/pagemap", err.errno or 0,
                            capability=INCREMENTAL) from err
        try:
            self._blocks = _register_wp(self._uffd, blocks)
        except BaseException:
            self._uffd.close()
            os.close(self._pagemap)
            raise
        self.scan_ioctls = 0
        """PAGEMAP_SCAN ioctls made by the last :meth:`collect`."""

    @property
    def blocks(self) -> list[RamBlock]:
        """The blocks watched (empty once stopped)."""
        return list(self._blocks)

    def collect(self) -> dict[str, PageBitmap]:
        """Per block name, the pages written since the tracker started or last collected; the
        pages reported are protected again. One C call per block, GIL released."""
        if self._pagemap < 0:
            raise UffdError("PAGEMAP_SCAN", errno_codes.EBADF, detail="tracker stopped")
        result: dict[str, PageBitmap] = {}
        calls = ffi.new("pyvmm_u64 *")
        self.scan_ioctls = 0
        for block in self._blocks:
            bitmap = block.new_bitmap()
            rc = int(lib.pyvmm_pagemap_scan_written(
                self._pagemap, block.host_addr, block.page_count,
                ffi.cast("pyvmm_u64 *", bitmap.address), self._vec_len, calls))
            if rc < 0:
                raise UffdError("PAGEMAP_SCAN", -rc, capability=INCREMENTAL,
                                detail=f"RAM block {block.name!r}")
            self.scan_ioctls += int(calls[0])
            result[block.name] = bitmap
        return result

    def stop(self) -> None:
        """Unregister every block (its protection goes) and close the fds; idempotent."""
        try:
            for block in self._blocks:
                self._uffd.unregister(block.host_addr, block.size)
        finally:
            self._blocks = []
            self._uffd.close()
            if self._pagemap >= 0:
                os.close(self._pagemap)
                self._pagemap = -1

    def __enter__(self) -> AsyncDirtyTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class LiveRun(NamedTuple):
    """Consecutive pages of one block written by :meth:`WriteProtectSession.save`."""

    block: int
    first_page: int
    npages: int
    data_offset: int
    """File offset of the first page's data (0 for a zero run)."""
    zero: bool


class LiveSaveCounts(NamedTuple):
    """What one :meth:`WriteProtectSession.save` wrote."""

    bytes_written: int
    data_pages: int
    zero_pages: int
    from_shadow: int


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
        _check_blocks(blocks)
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
            self._registered = _register_wp(self._uffd, self._blocks)
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
             open_saved: bool = False, nice: int = 0) -> tuple[list[LiveRun], LiveSaveCounts]:
        """Write every page of ``selection`` as it was when the round began, as QEMU RAM
        records at ``offset`` of ``fd``, in one C call that never needs the GIL: queued shadow
        copies first whenever there are any, the other pages claimed and copied out of RAM,
        64 records per ``pwritev``.  Returns the page runs written and the counters.

        ``open_saved``: unprotect each page once it is copied out, so that later writes to it
        do not fault; it then counts as dirty, so only for a session that is stopped after this
        round (a live checkpoint that tracks nothing for the next one).  ``nice`` (0..19): above
        0 the work runs on a C thread of that nice value, so that writers running meanwhile (the
        vCPU) get the CPU first when they compete for it; the save then takes longer."""
        runs, nruns, counts = self._save(fd, offset, selection, open_saved, nice)
        return ([LiveRun(int(r.block), int(r.first_page), int(r.npages), int(r.data_offset),
                         bool(r.zero)) for r in runs[0:nruns]], counts)

    def save_records(self, fd: int, offset: int, selection: Mapping[str, PageBitmap], *,
                     open_saved: bool = False, nice: int = 0) -> tuple[bytes, LiveSaveCounts]:
        """:meth:`save`, with the runs as page index records (24 bytes each, see
        :class:`~pyvmm.migration.container_format.IndexRecords`) in the order written, built in
        C: a live save of scattered pages has a run per page."""
        runs, nruns, counts = self._save(fd, offset, selection, open_saved, nice)
        out = ffi.new("unsigned char[]", max(nruns, 1) * 24)
        if lib.pyvmm_index_records_from_live_runs(runs, nruns, out):
            raise ValueError("live save runs do not fit page index records "
                             "(a block number over 65535 or a run over 2**32 pages)")
        records: bytes = ffi.buffer(out, nruns * 24)[:]
        return records, counts

    def _save(self, fd: int, offset: int, selection: Mapping[str, PageBitmap], open_saved: bool,
              nice: int) -> tuple[Any, int, LiveSaveCounts]:
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
                                           int(open_saved), out))
        counts = LiveSaveCounts(int(out.bytes_written), int(out.data_pages),
                                int(out.zero_pages), int(out.from_shadow))
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

    def __enter__(self) -> WriteProtectSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
