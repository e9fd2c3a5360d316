"""The named seams of a checkpoint: the parts a researcher swaps without touching pyvmm.

One checkpoint (:meth:`pyvmm.migration.checkpoint.Checkpointer.checkpoint`) is one sequence::

    saver.before_pause      guest running: what can be done early (a live saver arms its session)
    pause                   the consistency point (run state save-vm)
    capture devices         CPU, devices, machine section
    select                  full: every populated page (or the saver's own full selection);
                            incremental: the DirtyTracker's pages written since the last pause
    saver.at_pause          guest paused, pages chosen (a live saver re-arms protection and
                            lets the guest run: release())
    saver.save              the selected pages into the stream, each record as the PageEncoder
                            says (job.encoding); the saver calls job.release()
                            when the guest may run again (after the fork for cow; never for
                            stop-and-copy: the checkpointer releases it after the stream)
    stream end, checks      the shared parts: device sections, sanity checks, checksums
    release, commit         the increment is published in the container

The protocols below are those seams (a PageEncoder is declarative: see its docstring); :mod:`pyvmm.migration.algorithms` names their
implementations (built-in and third-party, through entry points).  Every method of a tracker is
called with the guest paused; a saver's methods on the checkpointer's thread (never the vCPU's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import PyvmmError
from ..ram import PageBitmap, RamBlock

if TYPE_CHECKING:
    from ..machine import Machine
    from .container_format import PageRun
    from .machine_state import MachineStateEntries
    from .stream import QEMUFile


class SanityError(PyvmmError):
    """A checkpoint's own consistency check failed (a bug, not bad input); nothing committed."""


class DirtyTracker(Protocol):
    """Which pages changed since the last pause."""

    kind: str

    def collect(self) -> dict[str, PageBitmap]:
        """Pages written since the tracker started or last collected (a bitmap per RAM block,
        by name); re-arms it.  Guest paused."""
        ...

    def stop(self) -> None:
        """Release the RAM (protection goes); idempotent."""
        ...


@dataclasses.dataclass(frozen=True)
class TrackerOptions:
    """What a tracker is built with (each tracker uses what it needs)."""

    unprotect_pages: int = 1
    handler_cpu: int | None = None
    fault_mode: str = "thread"


TrackerFactory = Callable[[Sequence[RamBlock], TrackerOptions], DirtyTracker]


@dataclasses.dataclass(frozen=True)
class SaverSetup:
    """What a saver is built with, once per checkpointer."""

    machine: Machine
    incremental: bool
    tracker: str  # the tracker's name (a saver that tracks itself may honour it)
    tracker_options: TrackerOptions
    shadow_pages: int = 4096
    saver_nice: int = 10


@dataclasses.dataclass(frozen=True)
class PageEncoding:
    """How the C writers put each page into the stream (no Python runs per page).

    ``detect_zero``: an all-zero page becomes QEMU's 9-byte ZERO record.  ``compress_level``: a
    zstd level (0: none); a page that shrinks to at most 3/4 of its size becomes pyvmm's
    compressed record (``formats/chpt.construct.py``), the others stay QEMU PAGE records.
    """

    detect_zero: bool = True
    compress_level: int = 0


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    """What an encoder is built with: ``compress_level`` is QEMU's ``compress-level``
    parameter (None: the encoder's own default)."""

    compress_level: int | None = None


class PageEncoder(Protocol):
    """How a page is written in the stream: a choice among the records every pyvmm reads.

    Declarative on purpose: a checkpoint file must reload wherever pyvmm is installed, so an
    encoder (built-in or plug-in) picks the records and their parameters, and pyvmm's C writers
    and readers do the per-page work.  The checkpointer asks for the encoding at each
    checkpoint, so an encoder may change its choice between increments (a chain may mix
    compressed and plain increments).
    """

    name: str

    def encoding(self) -> PageEncoding:
        """The records of the next checkpoint's pages."""
        ...


EncoderFactory = Callable[[EncoderOptions], PageEncoder]


@dataclasses.dataclass
class SaveJob:
    """One checkpoint's pages to save, handed to :meth:`PageSaver.save` with the guest paused."""

    f: QEMUFile  # the increment's stream, after its setup section
    stream_offset: int  # where the stream starts in the file
    selection: dict[str, PageBitmap]
    entries: MachineStateEntries
    device_bytes: bytes  # the device sections, already serialised at the pause
    devices: list[dict[str, Any]]
    release: Callable[[], None]  # the guest may run from now on (idempotent)
    encoding: PageEncoding = PageEncoding()  # how each page is written


@dataclasses.dataclass
class SavedPages:
    """What a saver wrote: the page index runs, the counts, and its own statistics."""

    runs: Sequence[PageRun]
    data_pages: int
    zero_pages: int
    #: set when the saver wrote the stream's end itself (device sections, trailer): its length
    stream_length: int | None = None
    write_faults: int = 0
    shadow_copies: int = 0
    pages_carried: int = 0
    fork_ms: float = 0.0
    compressed_pages: int = 0  # of data_pages, written as compressed records
    compressed_bytes: int = 0  # the bytes of their compressed frames


class PageSaver(Protocol):
    """How the selected pages reach the file, and when the guest may run again."""

    name: str
    #: whether RAM is still exactly as saved when save() returns (the guest has not run): the
    #: checksum capability then takes page CRCs from RAM instead of reading the file back
    ram_unchanged_after_save: bool

    def tracker(self) -> DirtyTracker | None:
        """The tracker this saver keeps for incremental checkpoints (a live saver's
        write-protect session tracks), or None: the checkpointer makes the named one."""
        ...

    def before_pause(self, full: bool) -> None:
        """Guest running, just before the pause."""
        ...

    def full_selection(self) -> dict[str, PageBitmap] | None:
        """Guest paused, full checkpoint: the pages to save, or None for every populated
        page."""
        ...

    def at_pause(self, selection: dict[str, PageBitmap], release: Callable[[], None]) -> None:
        """Guest paused, the selection made and the devices captured; ``release()`` lets the
        guest run from now on (a live saver, once RAM is protected)."""
        ...

    def save(self, job: SaveJob) -> SavedPages:
        """Write the selected pages (QEMU RAM records) into ``job.f``; call ``job.release()``
        as soon as the guest may run."""
        ...

    def check(self) -> None:
        """Sanity checks of the saver's own after save() (SanityError)."""
        ...

    def abandon(self) -> None:
        """The checkpoint failed after before_pause (nothing will be committed)."""
        ...

    def after(self) -> None:
        """Always, last, once the guest runs again."""
        ...

    def close(self) -> None:
        """The checkpointer closes."""
        ...


SaverFactory = Callable[[SaverSetup], PageSaver]
