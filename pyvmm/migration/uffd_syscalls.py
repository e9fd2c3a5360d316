"""userfaultfd through cffi, one method per syscall or ioctl, errors naming what they cost.

:class:`Userfaultfd` mirrors the syscalls (open, ``UFFDIO_API``, ``REGISTER``/``UNREGISTER``,
``WRITEPROTECT``, ``COPY``, ``ZEROPAGE``, ``WAKE``) one method each; errors become
:class:`~pyvmm.errors.UffdError` naming the operation, and for a missing feature or privilege the
checkpoint kind (:data:`INCREMENTAL` or :data:`LIVE`) that is therefore unavailable.  Policy lives
above it: the async dirty tracker (:mod:`~pyvmm.migration.uffd_async_tracker`), live
write-protect (:mod:`~pyvmm.migration.postcopy_uffd`) and lazy reload
(:mod:`~pyvmm.migration.lazy`).  Any thread may call any method; the C calls release the GIL.

All RAM pages here are 4 KiB, the host page size; guest and host pages coincide.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Self

from pyvmm._native import ffi, lib
from pyvmm.errors import UffdError
from pyvmm.ram import RamBlock

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def register_wp(uffd: Userfaultfd, blocks: Iterable[RamBlock]) -> list[RamBlock]:
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


def check_block_names(blocks: Sequence[RamBlock]) -> None:
    """ValueError when two of ``blocks`` share a name (the trackers key pages by it)."""
    names = [block.name for block in blocks]
    if len(set(names)) != len(names):
        raise ValueError(f"RAM block names repeat: {names}")
