"""A pyvmm dirty tracker that reports the pages whose bytes changed, at the cost of those written.

pyvmm's ``async`` tracker reports every page *written* since the last pause, also when the write
left the page as it was (a buffer read again from the same file, memory zeroed that was zero, a
counter set back); its ``hash`` tracker reports only pages *changed*, but compares all of RAM
at every pause.  ``changed`` asks ``async`` which pages were written, then compares only those
with its copy of them from the last pause: an increment as small as ``hash`` makes it, at a cost
that follows the pages written, not the RAM.

Memory: a copy of every non-zero page (as ``hash``).  Threads: as every tracker, the guest
paused for the constructor and :meth:`ChangedPagesTracker.collect`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyvmm.migration.algorithms import resolve
from pyvmm.migration.seams import DirtyTracker, TrackerOptions
from pyvmm.ram import PAGE_SIZE, PageBitmap, RamBlock

__version__ = "0.1.0"
ZERO = bytes(PAGE_SIZE)


class ChangedPagesTracker:
    """Pages changed since the last pause, looked for among those written (cost: the writes)."""

    kind = "changed"

    def __init__(self, blocks: Sequence[RamBlock], options: TrackerOptions) -> None:
        """Start tracking ``blocks``: the RAM as it is now is what the first collect compares with."""
        # first the writes tracker, so that no write between the copy and it goes unseen
        self._written: DirtyTracker = resolve("tracker", "async")(blocks, options)
        self._blocks = list(blocks)
        #: per block, per non-zero page, its bytes at the last pause (absent: zero)
        self._copies = {
            block.name: {page: bytes(block.page(page)) for page in block.nonzero_pages()}
            for block in self._blocks
        }

    def collect(self) -> dict[str, PageBitmap]:
        """Per block name, the pages written since the last collect that changed; re-arms."""
        written = self._written.collect()
        changed = {}
        for block in self._blocks:
            bitmap, copies = block.new_bitmap(), self._copies[block.name]
            for page in written[block.name]:
                now = block.page(page)
                # startswith: a memcmp of the view in place (both are a page long)
                if not copies.get(page, ZERO).startswith(now):
                    bitmap.set(page)
                    if ZERO.startswith(now):
                        copies.pop(page, None)
                    else:
                        copies[page] = bytes(now)
            changed[block.name] = bitmap
        return changed

    def stop(self) -> None:
        """Stop the writes tracker and drop the copies; idempotent."""
        self._written.stop()
        self._copies = {}
