"""The saver of a live checkpoint: RAM pages as they were at the pause, while the guest runs on.

At the pause the checkpointer arms a :class:`~pyvmm.migration.postcopy_uffd.WriteProtectSession`
(every page protected) and resumes the guest.  This saver then writes the selected pages as QEMU
RAM records: first any shadow copy the C fault handler made of a page the guest was about to
change (those have priority: they hold pool slots), then the remaining pages, each claimed and
copied out of RAM in one C call so that a faulting writer never waits for Python.  Each page is
saved exactly once, and the result is RAM exactly as at the pause.

Runs on one thread (the checkpointer's), never the vCPU's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ..ram import PAGE_SIZE, PageBitmap, RamBlock
from .pageio import PAGE_RECORD_SIZE, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO
from .postcopy_uffd import WriteProtectSession
from .ram_handler import IndexedRun
from .stream import QEMUFile

_ZERO_PAGE = bytes(PAGE_SIZE)
#: Pages claimed from RAM between two looks at the shadow queue.
_SHADOW_POLL_EVERY = 64


@dataclasses.dataclass
class LiveSaveResult:
    runs: list[IndexedRun] = dataclasses.field(default_factory=list)
    data_pages: int = 0
    zero_pages: int = 0
    from_shadow: int = 0


class _RecordWriter:
    """Appends RAM records to a stream and keeps the page-index runs of what it wrote."""

    def __init__(self, f: QEMUFile, blocks: Sequence[RamBlock]) -> None:
        self.f = f
        self.numbers = {b.name: i for i, b in enumerate(blocks)}
        self.last_block = -1
        self.result = LiveSaveResult()
        self._run: list[int] | None = None  # [block, first, npages, data_offset, zero]

    def page(self, block: str, page: int, data: bytes | memoryview) -> None:
        number = self.numbers[block]
        zero = data == _ZERO_PAGE
        flags = RAM_SAVE_FLAG_ZERO if zero else RAM_SAVE_FLAG_PAGE
        same_block = number == self.last_block
        if same_block:
            flags |= RAM_SAVE_FLAG_CONTINUE
        self.f.put_be64(page * PAGE_SIZE | flags)
        if not same_block:
            self.f.put_str8(block)
            self.last_block = number
        offset = 0 if zero else self.f.offset
        if zero:
            self.f.put_u8(0)
            self.result.zero_pages += 1
        else:
            self.f.put_bytes(data)
            self.result.data_pages += 1
        self._add_run(number, page, offset, zero, same_block)

    def batch(self, number: int, data: bytes, pages: list[int], zeros: list[bool]) -> None:
        """Append ready CONTINUE records (from the C saver) for block ``number``."""
        assert number == self.last_block, "a record naming the block must come first"
        base = self.f.offset
        self.f.put_bytes(data)
        pos = 0
        for page, zero in zip(pages, zeros):
            if zero:
                self._add_run(number, page, 0, True, True)
                pos += 9
                self.result.zero_pages += 1
            else:
                self._add_run(number, page, base + pos + 8, False, True)
                pos += PAGE_RECORD_SIZE
                self.result.data_pages += 1

    def _add_run(self, number: int, page: int, offset: int, zero: bool, same_block: bool) -> None:
        run = self._run
        if run is not None and run[0] == number and run[1] + run[2] == page and \
                bool(run[4]) == zero and same_block and \
                (zero or run[3] + run[2] * PAGE_RECORD_SIZE == offset):
            run[2] += 1
            return
        self._flush_run()
        self._run = [number, page, 1, offset, int(zero)]

    def _flush_run(self) -> None:
        if self._run is not None:
            block, first, npages, offset, zero = self._run
            self.result.runs.append(IndexedRun(block, first, npages, offset, bool(zero)))
            self._run = None

    def finish(self) -> LiveSaveResult:
        self._flush_run()
        return self.result


def save_pages_live(f: QEMUFile, session: WriteProtectSession, blocks: Sequence[RamBlock],
                    selection: Mapping[str, PageBitmap]) -> LiveSaveResult:
    """Write every selected page (as of the session's start) to ``f``; shadows first."""
    writer = _RecordWriter(f, blocks)

    def drain() -> None:
        while (shadow := session.next_shadow()) is not None:
            try:
                writer.page(shadow.block, shadow.page, bytes(shadow.data))
                writer.result.from_shadow += 1
            finally:
                session.release_shadow(shadow.slot)

    for number, block in enumerate(blocks):
        pages = selection.get(block.name)
        if pages is None:
            continue
        nxt = 0
        while nxt < block.page_count:
            drain()
            if writer.last_block != number:
                # The first record of a block names it: save one page the per-page way.
                page = pages.find_next_set(nxt)
                if page >= block.page_count:
                    break
                data = session.take_page_for_saving(block.name, page)
                if data is not None:
                    writer.page(block.name, page, data)
                nxt = page + 1
                continue
            nxt, data, taken, zeros = session.take_records(block.name, pages, nxt,
                                                           _SHADOW_POLL_EVERY)
            if taken:
                writer.batch(number, data, taken, zeros)
    drain()
    return writer.finish()
