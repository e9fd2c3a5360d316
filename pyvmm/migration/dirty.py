"""Dirty-page trackers for incremental checkpoints: which guest pages changed since the last pause.

Two trackers, both over userfaultfd (DESIGN.md §5), selectable because the choice is a research knob:

* ``async`` — :class:`AsyncTracker`: the kernel's asynchronous write-protect (``WP_ASYNC``); a write
  only clears the page's protection in the kernel (no round trip to user space) and
  ``PAGEMAP_SCAN`` collects and re-protects the written pages.  The default: cheapest for the guest.
* ``wp`` — :class:`WpFaultTracker`: synchronous write-protect faults resolved by pyvmm's C fault
  handler, which records each page once and unprotects it.  Costs a fault round trip per first
  write, but the same session can serve a live checkpoint.

A tracker is created at a pause (the consistency point of a checkpoint); :meth:`collect` is called
at the next pause and returns the pages written in between, re-arming the tracker.  Every writer is
seen: the vCPU through unicorn, host code through memoryviews, and the kernel (``read()`` into
guest RAM).

Only one userfaultfd may watch a range, and a userfaultfd is asynchronous (``WP_ASYNC``) or not
for its whole life, so an async tracker cannot lend its RAM to a live checkpoint's synchronous
session: moving RAM from one userfaultfd to the other (unregister, register, protect) must
happen with the guest paused and costs some 25–35 ms per GiB, far over a live checkpoint's
downtime budget.  A checkpointer with the ``live`` capability therefore tracks with its live
session between checkpoints, whichever tracker was named (:func:`make_tracker` with ``live``):
one userfaultfd for its whole life.  The async tracker serves stop-and-copy incremental
checkpoints, where it is the cheapest for the guest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..ram import PageBitmap, RamBlock
from .defaults import TRACKERS
from .postcopy_uffd import WriteProtectSession
from .uffd_async_tracker import AsyncDirtyTracker


class DirtyTracker(Protocol):
    """What the checkpointer asks of a tracker; every method is called with the guest paused."""

    kind: str

    def collect(self) -> dict[str, PageBitmap]:
        """Pages written since the tracker started or last collected; re-arms it."""
        ...

    def stop(self) -> None:
        """Release the RAM (protection goes); idempotent."""
        ...


class AsyncTracker:
    """The ``async`` tracker (WP_ASYNC + PAGEMAP_SCAN)."""

    kind = "async"

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self._blocks = list(blocks)
        self._tracker: AsyncDirtyTracker | None = AsyncDirtyTracker(self._blocks)

    def collect(self) -> dict[str, PageBitmap]:
        if self._tracker is None:
            self._tracker = AsyncDirtyTracker(self._blocks)
            return {b.name: b.new_bitmap() for b in self._blocks}
        return self._tracker.collect()

    def dirty_count(self) -> int:
        """Pages written since the last collect, counted without collecting them."""
        return self._tracker.written() if self._tracker is not None else 0

    def stop(self) -> None:
        if self._tracker is not None:
            self._tracker.stop()
            self._tracker = None


class WpFaultTracker:
    """The ``wp`` tracker: a :class:`WriteProtectSession` whose pages all count as saved, so the
    C handler only marks each first-written page dirty and unprotects it.

    One session (one userfaultfd, one registration, one handler thread) serves the tracker's
    whole life, and the live checkpoints in between (:attr:`session` is re-armed for each):
    :meth:`prepare`, called before a pause while the guest runs, re-protects the pages written
    so far and remembers them, so the pause itself re-protects only what is written after it."""

    kind = "wp"

    def __init__(self, blocks: Sequence[RamBlock], *, unprotect_pages: int = 1,
                 handler_cpu: int | None = None, shadow_pages: int = 1,
                 fault_around: int | None = None, fault_mode: str = "thread") -> None:
        self._blocks = list(blocks)
        self.session = WriteProtectSession(self._blocks, shadow_pages=shadow_pages,
                                           unprotect_pages=unprotect_pages,
                                           handler_cpu=handler_cpu, tracking_only=True,
                                           fault_around=fault_around, fault_mode=fault_mode)
        #: Pages written before the last :meth:`prepare` (and since the last collect).
        self._carried = {b.name: b.new_bitmap() for b in self._blocks}
        self._stopped = False

    def prepare(self) -> int:
        """Re-protect the pages written so far, remembering them for :meth:`collect`; may run
        while the guest writes.  Returns how many pages it re-protected."""
        return self.session.reprotect(self._carried)

    def collect(self) -> dict[str, PageBitmap]:
        """Pages written since the last collect (guest paused); every page is protected again,
        at the cost of the pages written since the last :meth:`prepare`."""
        if self._stopped:
            raise ValueError("the wp tracker is stopped")
        dirty = {}
        for block in self._blocks:
            bitmap = self._carried[block.name]
            bitmap |= self.session.dirty[block.name]
            dirty[block.name] = bitmap
        self.session.reprotect()
        self._carried = {b.name: b.new_bitmap() for b in self._blocks}
        return dirty

    def dirty_count(self) -> int:
        """Pages written since the last collect, counted without collecting them."""
        if self._stopped:
            return 0
        return sum((self._carried[b.name] | self.session.dirty[b.name]).count()
                   for b in self._blocks)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.session.stop()


def make_tracker(kind: str, blocks: Sequence[RamBlock], *, unprotect_pages: int = 1,
                 handler_cpu: int | None = None, live: bool = False,
                 shadow_pages: int = 1, fault_around: int | None = None,
                 fault_mode: str = "thread") -> AsyncTracker | WpFaultTracker:
    """The tracker ``kind`` asks for; with ``live``, always the ``wp`` tracker with a pool of
    ``shadow_pages`` (see the module docstring).  ``fault_mode``: the ``wp`` tracker's, see
    :class:`~pyvmm.migration.postcopy_uffd.WriteProtectSession`."""
    if kind not in TRACKERS:
        raise ValueError(f"unknown dirty tracker {kind!r} (choose from {', '.join(TRACKERS)})")
    if kind == "async" and not live:
        return AsyncTracker(blocks)
    return WpFaultTracker(blocks, unprotect_pages=unprotect_pages, handler_cpu=handler_cpu,
                          shadow_pages=shadow_pages, fault_around=fault_around,
                          fault_mode=fault_mode)
