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
guest RAM).  Only one userfaultfd may watch a range, so a live checkpoint suspends an async
tracker (:meth:`suspend`) and the checkpointer re-arms it afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..ram import PageBitmap, RamBlock
from .postcopy_uffd import AsyncDirtyTracker, WriteProtectSession

TRACKERS = ("async", "wp")


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

    def suspend(self) -> None:
        """Stop watching (a live checkpoint needs the range); :meth:`collect` re-arms later."""
        if self._tracker is not None:
            self._tracker.stop()
            self._tracker = None

    def rearm(self) -> None:
        """Start watching again from now."""
        if self._tracker is None:
            self._tracker = AsyncDirtyTracker(self._blocks)

    def stop(self) -> None:
        self.suspend()


class WpFaultTracker:
    """The ``wp`` tracker: a :class:`WriteProtectSession` whose pages all count as saved, so the
    C handler only marks each first-written page dirty and unprotects it."""

    kind = "wp"

    def __init__(self, blocks: Sequence[RamBlock], *, unprotect_pages: int = 1,
                 handler_cpu: int | None = None) -> None:
        self._blocks = list(blocks)
        self._unprotect = unprotect_pages
        self._handler_cpu = handler_cpu
        self.session: WriteProtectSession | None = self._new_session()

    def _new_session(self) -> WriteProtectSession:
        session = WriteProtectSession(self._blocks, shadow_pages=1,
                                      unprotect_pages=self._unprotect,
                                      handler_cpu=self._handler_cpu)
        for block in self._blocks:
            session.mark_sent_unselected(block.name, block.new_bitmap())
        return session

    def adopt(self, session: WriteProtectSession) -> None:
        """Keep tracking with a live checkpoint's session (its dirty pages so far count)."""
        if self.session is not None:
            self.session.stop()
        self.session = session

    def collect(self) -> dict[str, PageBitmap]:
        if self.session is None:
            self.session = self._new_session()
            return {b.name: b.new_bitmap() for b in self._blocks}
        dirty = {name: bitmap.copy() for name, bitmap in self.session.dirty.items()}
        self.session.stop()
        self.session = self._new_session()
        return dirty

    def hand_over(self) -> tuple[dict[str, PageBitmap], WriteProtectSession | None]:
        """What was dirtied so far, and the session itself for a live checkpoint to re-arm
        (the tracker keeps none until it adopts one back)."""
        if self.session is None:
            return {b.name: b.new_bitmap() for b in self._blocks}, None
        dirty = {name: bitmap.copy() for name, bitmap in self.session.dirty.items()}
        session, self.session = self.session, None
        return dirty, session

    def suspend(self) -> dict[str, PageBitmap]:
        """Stop watching and return what was dirtied so far (a live checkpoint takes over)."""
        if self.session is None:
            return {b.name: b.new_bitmap() for b in self._blocks}
        dirty = {name: bitmap.copy() for name, bitmap in self.session.dirty.items()}
        self.session.stop()
        self.session = None
        return dirty

    def stop(self) -> None:
        if self.session is not None:
            self.session.stop()
            self.session = None


def make_tracker(kind: str, blocks: Sequence[RamBlock], *, unprotect_pages: int = 1,
                 handler_cpu: int | None = None) -> AsyncTracker | WpFaultTracker:
    if kind == "async":
        return AsyncTracker(blocks)
    if kind == "wp":
        return WpFaultTracker(blocks, unprotect_pages=unprotect_pages, handler_cpu=handler_cpu)
    raise ValueError(f"unknown dirty tracker {kind!r} (choose from {', '.join(TRACKERS)})")
