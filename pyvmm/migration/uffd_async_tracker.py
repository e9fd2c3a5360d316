"""The async dirty tracker: the pages written since the last look, for incremental checkpoints.

A ``WP_ASYNC`` userfaultfd (:mod:`~pyvmm.migration.uffd_syscalls`) lets every write through while
the kernel notes it in the page table, and ``PAGEMAP_SCAN`` reads and re-protects those notes in
one ioctl per pass.  Errors are :class:`~pyvmm.errors.UffdError` naming the ``incremental``
checkpoint kind.  Offered by :mod:`pyvmm.migration.postcopy_uffd` too.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from pyvmm._native import ffi, lib
from pyvmm.errors import UffdError
from pyvmm.migration.uffd_syscalls import (
    INCREMENTAL,
    UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_UNPOPULATED,
    Userfaultfd,
    check_block_names,
    register_wp,
)
from pyvmm.ram import PageBitmap, RamBlock

_PAGEMAP_SCAN_VEC = 512  # regions per PAGEMAP_SCAN ioctl: 12 KiB of vector


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
        check_block_names(blocks)
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
            self._blocks = register_wp(self._uffd, blocks)
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

    def written(self) -> int:
        """How many pages were written since the tracker started or last collected, without
        collecting them (nothing is re-protected: the next :meth:`collect` still reports them).
        Any thread, while the guest runs."""
        if self._pagemap < 0:
            raise UffdError("PAGEMAP_SCAN", errno_codes.EBADF, detail="tracker stopped")
        total = 0
        for block in self._blocks:
            rc = int(lib.pyvmm_pagemap_written(self._pagemap, block.host_addr, block.page_count,
                                               ffi.NULL, self._vec_len, ffi.NULL, 0))
            if rc < 0:
                raise UffdError("PAGEMAP_SCAN", -rc, capability=INCREMENTAL,
                                detail=f"RAM block {block.name!r}")
            total += rc
        return total

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
