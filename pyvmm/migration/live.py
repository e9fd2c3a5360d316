"""The saver of a live checkpoint: RAM pages as they were at the pause, while the guest runs on.

At the pause the checkpointer arms a :class:`~pyvmm.migration.postcopy_uffd.WriteProtectSession`
(every page protected) and resumes the guest.  This saver then writes the selected pages as QEMU
RAM records, all in one C call (:meth:`WriteProtectSession.save`, GIL released): first any shadow
copy the C fault handler made of a page the guest was about to change (those have priority: they
hold pool slots), then the remaining pages, each claimed and copied out of RAM, framed and
written with ``pwritev`` 64 records at a time.  A faulting writer never waits for Python, so a
writer holding the GIL cannot deadlock it.  Each page is saved exactly once, and the result is
RAM exactly as at the pause.

Runs on one thread (the checkpointer's), never the vCPU's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ..ram import PageBitmap, RamBlock
from .container_format import IndexRecords
from .pageio import sort_index_records
from .postcopy_uffd import WriteProtectSession
from .ram_handler import IndexedRun
from .stream import QEMUFile


@dataclasses.dataclass
class LiveSaveResult:
    #: in RAM order (the saver writes shadow copies first): the order the page index keeps
    runs: Sequence[IndexedRun] = dataclasses.field(default_factory=IndexRecords)
    data_pages: int = 0
    zero_pages: int = 0
    from_shadow: int = 0
    compressed_pages: int = 0
    compressed_bytes: int = 0


def save_pages_live(f: QEMUFile, session: WriteProtectSession, blocks: Sequence[RamBlock],
                    selection: Mapping[str, PageBitmap], *,
                    open_saved: bool = False, nice: int = 0,
                    compress_level: int = 0) -> LiveSaveResult:
    """Write every selected page (as of the session's round start) to ``f``; shadows first.
    ``open_saved``, ``nice``, ``compress_level``: see :meth:`WriteProtectSession.save`.

    ``blocks`` must be the session's blocks in its order (block numbers in the runs index it)."""
    fd = f.fd
    if fd is None:
        raise ValueError("a live save writes to a file stream")
    f.flush()
    records, counts = session.save_records(fd, f.offset, selection, open_saved=open_saved,
                                           nice=nice, compress_level=compress_level)
    f.written_externally(counts.bytes_written)
    return LiveSaveResult(
        runs=IndexRecords(sort_index_records(records)),
        data_pages=counts.data_pages, zero_pages=counts.zero_pages,
        from_shadow=counts.from_shadow, compressed_pages=counts.compressed_pages,
        compressed_bytes=counts.compressed_bytes)
