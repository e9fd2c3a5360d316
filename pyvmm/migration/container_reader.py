"""Reading a checkpoint container: the header slot in force, page indexes, stats, checksums.

:class:`ContainerReader` is the reading half of :class:`~pyvmm.migration.container.CheckpointFile`
(which adds creating and appending): it chooses the header in force and reads, bounded and
checked, what that header points to.  The bytes are decoded by the ``*_format`` modules.

A reader takes the header slot with the highest sequence whose CRC holds. Only a torn slot write
(the crash case) makes a slot's CRC fail, so that is the only failure that falls back to the other
slot, as is a slot whose data runs past the end of the file (a header published by a writer
stopped before its file was whole); anything else wrong in the slot chosen, or in the data it
points to, is damage and raises :class:`~pyvmm.errors.FormatError`.  Readers take no lock: a
writer only adds bytes past the committed ones and rewrites the slot readers do not use.  Not
thread-safe: one thread uses a file at a time.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyvmm.errors import FormatError, PyvmmError
from pyvmm.migration.checksum_format import (
    ChecksumBlock,
    check_checksums,
    decode_checksums,
)
from pyvmm.migration.container_files import pread_exact
from pyvmm.migration.container_format import (
    ContainerHeader,
    IncrementInfo,
    PageRun,
    load_spec,
)
from pyvmm.migration.header_format import (
    decode_header_body,
    decode_slot_frame,
    encode_header_slot,
)
from pyvmm.migration.page_index_format import (
    check_page_runs,
    decode_page_index,
    page_index_head_problem,
    page_index_head_size,
)
from pyvmm.migration.stats_format import decode_stats

__all__ = ["ContainerReader", "FileState"]


class FileState(enum.Enum):
    """Which calls a CheckpointFile allows."""

    READ_ONLY = "read-only"
    WRITABLE = "writable"
    WRITING = "writing an increment"
    CLOSED = "closed"


class ContainerReader:
    """An open checkpoint container's header in force and what it points to, read on demand.

    The base of :class:`~pyvmm.migration.container.CheckpointFile`, which opens it.
    """

    def __init__(self, path: Path, fd: int, state: FileState) -> None:
        """Use :meth:`CheckpointFile.create <pyvmm.migration.container.CheckpointFile.create>`
        or :meth:`~pyvmm.migration.container.CheckpointFile.open`."""
        self._path = path
        self._fd = fd
        self._state = state
        self._header: ContainerHeader | None = None
        self._slot = 0
        self._rejected_slot: str | None = None

    # -- the header in force --

    def _read_slots(self) -> tuple[list[tuple[int, int, int, bytes]], list[str]]:
        """The header slots on disk whose frame (magic, length, CRC) holds, newest first, as
        (sequence, slot, version, body); and why each other slot was passed over."""
        spec = load_spec()
        size = os.fstat(self._fd).st_size
        frames: list[tuple[int, int, int, bytes]] = []
        problems: list[str] = []
        magic_seen = False
        for slot in range(spec.SLOT_COUNT):
            offset = slot * spec.SLOT_SIZE
            data = os.pread(self._fd, spec.SLOT_SIZE, offset) if size > offset else b""
            if data[: len(spec.MAGIC)] != spec.MAGIC:
                state = "bad magic" if data.strip(bytes(1)) else "empty"
                problems.append(f"slot {slot}: {state}")
                continue
            magic_seen = True
            try:
                version, sequence, body = decode_slot_frame(data, offset=offset)
            except FormatError as err:
                # a torn write (the crash case) lands here: the other slot holds the state
                problems.append(f"slot {slot}: {err}")
                continue
            frames.append((sequence, slot, version, body))
        if not magic_seen:
            raise FormatError(f"{self._path} is not a pyvmm checkpoint file (bad magic)", offset=0)
        if not frames:
            raise FormatError(
                f"{self._path} has no intact header slot ({'; '.join(problems)})", offset=0
            )
        # highest sequence first; on a (hostile) tie the first slot does
        frames.sort(key=lambda f: (-f[0], f[1]))
        return frames, problems

    def _read_header(self) -> None:
        """Pick the newest intact header slot whose data is all in the file, and check it.

        A slot whose frame is torn, or whose data runs past the end of the file (a header
        published by a writer that was stopped before its file was whole), is passed over for
        the other one; :attr:`rejected_slot` then says why.  Anything else wrong in the slot
        chosen, or in what it points to, is damage: FormatError."""
        spec = load_spec()
        size = os.fstat(self._fd).st_size
        frames, problems = self._read_slots()
        chosen: tuple[ContainerHeader, int] | None = None
        for sequence, slot, version, body in frames:
            offset = slot * spec.SLOT_SIZE
            header = decode_header_body(version, sequence, body, offset=offset)
            if size >= spec.DATA_START and header.data_end <= size:
                chosen = (header, slot)
                break
            # fall back only to a slot that holds something: "no increments" would hide the cut
            if slot != frames[0][1] or not self._older_has_increments(frames):
                last = header.increments[-1].index if header.increments else None
                raise FormatError(
                    f"{self._path} is truncated: its data ends at byte {header.data_end} but "
                    f"the file has {size} bytes",
                    offset=size,
                    increment=last,
                )
            problems.append(
                f"slot {slot} (sequence {sequence}, {len(header.increments)} increments) points "
                f"past the end of the file (its data ends at byte {header.data_end}, the file has "
                f"{size} bytes)"
            )
        assert chosen is not None
        header, slot = chosen
        self._header = header
        self._slot = slot
        rejected = [p for p in problems if not p.endswith("empty")]
        self._rejected_slot = (
            f"{'; '.join(rejected)}: using slot {slot} (sequence {header.sequence}, "
            f"{len(header.increments)} increments)" if rejected else None
        )

    @staticmethod
    def _older_has_increments(frames: list[tuple[int, int, int, bytes]]) -> bool:
        if len(frames) < 2:
            return False
        sequence, slot, version, body = frames[1]
        try:
            header = decode_header_body(version, sequence, body,
                                        offset=slot * load_spec().SLOT_SIZE)
        except FormatError:
            return False
        return bool(header.increments)

    def _committed_end(self) -> int:
        """The furthest any intact header on disk points into the file: no cut may go below
        it (a header whose write landed unrecorded must keep its data)."""
        end = self.header.data_end
        try:
            frames, _ = self._read_slots()
        except FormatError:
            return end
        spec = load_spec()
        for sequence, slot, version, body in frames:
            try:
                header = decode_header_body(version, sequence, body, offset=slot * spec.SLOT_SIZE)
            except FormatError:
                continue
            end = max(end, header.data_end)
        return end

    # -- reading --

    @property
    def path(self) -> Path:
        """The file's path as given."""
        return self._path

    @property
    def fd(self) -> int:
        """The open file descriptor: read streams with ``pread``, write them at
        :attr:`~pyvmm.migration.container.IncrementWriter.stream_offset` with ``pwrite``.
        Owned by this object."""
        self._require(FileState.READ_ONLY, FileState.WRITABLE, FileState.WRITING)
        return self._fd

    @property
    def header(self) -> ContainerHeader:
        """The header in force: the last committed state."""
        self._require(FileState.READ_ONLY, FileState.WRITABLE, FileState.WRITING)
        assert self._header is not None
        return self._header

    @property
    def writable(self) -> bool:
        """Whether appends are allowed (opened with ``create`` or ``writable=True``)."""
        return self._state in (FileState.WRITABLE, FileState.WRITING)

    @property
    def rejected_slot(self) -> str | None:
        """Why the other header slot was not used, when it holds a damaged header (a torn
        write from an interrupted append, or corruption); ``None`` when all is well."""
        return self._rejected_slot

    @property
    def max_increments(self) -> int:
        """How many increments this file's header slot can hold."""
        return self._capacity(self.header)

    @staticmethod
    def _capacity(header: ContainerHeader) -> int:
        spec = load_spec()
        empty = encode_header_slot(replace(header, increments=()))
        entry_size: int = spec.INCREMENT_ENTRY_SIZES[header.format_version]
        fit: int = (spec.SLOT_SIZE - len(empty)) // entry_size
        return max(0, fit)

    def _increment(self, increment: int) -> IncrementInfo:
        increments = self.header.increments
        if not 0 <= increment < len(increments):
            raise IndexError(f"{self._path} has no increment {increment} ({len(increments)} saved)")
        return increments[increment]

    def _read_page_index(self, info: IncrementInfo) -> bytes:
        """The page index blob of ``info``, read only once its first bytes (magic, increment,
        run count) agree with its length: a hostile length over a sparse hole is refused
        before it is read, not after."""
        head = pread_exact(self._fd, min(info.index_length, page_index_head_size()),
                            info.index_offset, what="page index", increment=info.index)
        problem = page_index_head_problem(head, info.index, info.index_length)
        if problem is not None:
            raise FormatError(f"page index: {problem}", offset=info.index_offset,
                              increment=info.index)
        return pread_exact(self._fd, info.index_length, info.index_offset, what="page index",
                            increment=info.index)

    def page_index(self, increment: int) -> list[PageRun]:
        """The page runs increment ``increment`` holds, checked (CRC, bounds) before use."""
        info = self._increment(increment)
        data = self._read_page_index(info)
        runs = decode_page_index(data, increment=increment, offset=info.index_offset)
        try:
            check_page_runs(self.header, info, runs)
        except FormatError as err:
            raise err.located(offset=info.index_offset) from err
        return runs

    def page_index_blob(self, increment: int) -> bytes:
        """The raw page index blob of increment ``increment`` (bounded by the header, not
        decoded: see ``page_index_format.page_index_records``)."""
        return self._read_page_index(self._increment(increment))

    def stats(self, increment: int) -> dict[str, Any]:
        """The stats the writer stored with increment ``increment``; ``{}`` when none."""
        info = self._increment(increment)
        if not info.stats_length:
            return {}
        data = pread_exact(
            self._fd, info.stats_length, info.stats_offset, what="stats", increment=increment
        )
        return decode_stats(data, increment=increment, offset=info.stats_offset)

    def checksums(
        self, increment: int, runs: Sequence[PageRun] | None = None
    ) -> ChecksumBlock | None:
        """The checksum block of increment ``increment`` (CRC checked, sizes checked against its
        page index, ``runs`` when the caller has read it already); ``None`` when it has none."""
        info = self._increment(increment)
        if not info.checksum_length:
            return None
        data = pread_exact(
            self._fd, info.checksum_length, info.checksum_offset, what="checksum block",
            increment=increment,
        )
        block = decode_checksums(data, increment=increment, offset=info.checksum_offset)
        check_checksums(info, self.page_index(increment) if runs is None else runs, block)
        return block

    def verify(self) -> None:
        """Read and check every increment's page index, stats and checksum block (not the
        stream: see :mod:`pyvmm.migration.verify`); FormatError if one is bad."""
        for info in self.header.increments:
            runs = self.page_index(info.index)
            self.stats(info.index)
            self.checksums(info.index, runs)

    def _require(self, *states: FileState) -> None:
        """PyvmmError unless the file is in one of ``states``."""
        if self._state not in states:
            state = self._state.value
            raise PyvmmError(f"checkpoint file {self._path} is {state}: not allowed now")
