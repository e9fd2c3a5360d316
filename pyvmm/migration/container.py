"""The checkpoint container: one file holding a chain of increments behind a crash-safe header.

:class:`CheckpointFile` is the only code that writes a container; the bytes themselves are
encoded, decoded and checked by :mod:`pyvmm.migration.container_format` (whose data classes this
module re-exports), from the declaration in ``formats/chpt.construct.py``.

An increment's payload is a QEMU v3 migration stream that the caller writes itself through
:attr:`CheckpointFile.fd` at :attr:`IncrementWriter.stream_offset`; the container records where
it is, which guest pages it holds (its page index) and the caller's stats, then publishes it with
a header update that a kill at any instant cannot damage:

1. stream, page index and stats are written after the last committed byte, then synced;
2. the new header (sequence + 1) is written over the *older* of the two header slots, then synced.

A reader takes the slot with the highest sequence whose CRC holds. Only a torn slot write (the
crash case) makes a slot's CRC fail, so that is the only failure that falls back to the other
slot; anything wrong in a slot whose CRC holds, or in the data it points to, is damage and raises
:class:`~pyvmm.errors.FormatError`. Bytes past the last committed increment are the remains of an
interrupted append; the next append cuts them off.

Files are untrusted input: every size is bounded (by the file size, the slot size, the RAM
layout) before anything is read or allocated, and every failure is one
:class:`~pyvmm.errors.FormatError` line (:class:`~pyvmm.errors.ChecksumError` for a checksum,
:class:`~pyvmm.errors.VersionError` for a newer format). A :class:`CheckpointFile` is not
thread-safe: one thread uses it at a time.
"""

from __future__ import annotations

import enum
import fcntl
import os
import stat
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pyvmm.errors import CheckpointWarning, ConfigError, FormatError, PyvmmError
from pyvmm.interrupts import signals_held
from pyvmm.migration.checksum_format import (
    ChecksumBlock,
    check_checksums,
    decode_checksums,
    encode_checksums,
)
from pyvmm.migration.container_format import (
    KINDS,
    PAGE_RECORD_HEADER,
    ContainerHeader,
    IncrementInfo,
    IndexRecords,
    PageRun,
    RamBlockInfo,
    load_spec,
)
from pyvmm.migration.header_format import (
    check_capabilities,
    check_header,
    decode_header_body,
    decode_header_slot,
    decode_slot_frame,
    encode_header_slot,
)
from pyvmm.migration.page_index_format import (
    check_page_runs,
    decode_page_index,
    encode_page_index,
    page_index_head_problem,
    page_index_head_size,
)
from pyvmm.migration.pageio import index_record_counts
from pyvmm.migration.stats_format import decode_stats, encode_stats

__all__ = [
    "PAGE_RECORD_HEADER",
    "CheckpointFile",
    "CheckpointWarning",
    "ChecksumBlock",
    "ContainerHeader",
    "IncrementInfo",
    "IncrementWriter",
    "IndexRecords",
    "PageRun",
    "RamBlockInfo",
    "decode_header_slot",
    "decode_page_index",
    "decode_stats",
    "encode_header_slot",
    "encode_page_index",
    "encode_stats",
    "load_spec",
    "lock_target",
    "open_regular",
]


# ----- file I/O helpers ------------------------------------------------------------------------


def _pread_exact(fd: int, length: int, offset: int, *, what: str, increment: int | None) -> bytes:
    # callers have bounded `length` by the file size already
    chunks = []
    done = 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            raise FormatError(f"{what} is cut short by the end of the file", offset=offset,
                              increment=increment)
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _sync_directory(path: Path) -> None:
    # a new file's directory entry is only durable once the directory itself is synced
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data itself is synced
    finally:
        os.close(dir_fd)


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a non-regular file is, for an error line ("a FIFO", "a directory", ...)."""
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, *, writable: bool) -> int:
    """Open an existing checkpoint file; ConfigError unless it is a regular file.

    The path is looked at before it is opened: opening a FIFO waits for a writer and opening a
    device may act on it, so neither is ever opened.  (A file swapped in between the look and
    the open is caught by fstat, and the non-blocking open cannot wait on it.)"""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise ConfigError(f"no such checkpoint file: {path}") from err
    except OSError as err:
        raise ConfigError(f"cannot open checkpoint file {path}: {err.strerror}") from err
    if not stat.S_ISREG(mode):
        raise ConfigError(f"checkpoint file {path} is {file_kind(mode)}, not a regular file")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ConfigError(f"cannot open checkpoint file {path}: {err.strerror}") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfigError(f"checkpoint file {path} is {file_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd


def lock_target(path: Path) -> int:
    """Take the writer lock of the checkpoint file at ``path`` through a descriptor of its own.

    Held by a writer that will replace the file (a new chain written aside, renamed over it
    once it holds a committed increment), so that no other writer appends to or replaces it
    meanwhile.  Returns the descriptor (closing it releases the lock); ConfigError when the
    file is locked by another writer or is not a regular file."""
    fd = open_regular(path, writable=False)
    try:
        _flock_current(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _flock_current(fd: int, path: Path) -> None:
    """Take the writer lock on ``fd`` and check that it still is the file at ``path``: a writer
    that renamed a new chain over it between our open and our lock owns the path now."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        raise ConfigError(f"checkpoint file {path} is open for writing in another process") from err
    held = os.fstat(fd)
    try:
        current = os.stat(path)
    except OSError:
        current = None
    if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
        raise ConfigError(f"checkpoint file {path} was replaced by another writer meanwhile")


class _State(enum.Enum):
    """Which calls a CheckpointFile allows."""

    READ_ONLY = "read-only"
    WRITABLE = "writable"
    WRITING = "writing an increment"
    CLOSED = "closed"


# ----- the file --------------------------------------------------------------------------------


class CheckpointFile:
    """An open checkpoint container: its header, page indexes and stats, and appends.

    Opened with :meth:`create` (new file, writable) or :meth:`open`. A writable file holds an
    exclusive ``flock`` so that two writers cannot interleave appends; readers take no lock and
    always see a consistent state (a writer only adds bytes past the committed ones and rewrites
    the slot readers do not use).
    """

    def __init__(self, path: Path, fd: int, state: _State) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self._path = path
        self._fd = fd
        self._state = state
        self._header: ContainerHeader | None = None
        self._slot = 0
        self._rejected_slot: str | None = None
        self._writer: IncrementWriter | None = None
        #: fsync data before publishing a header, and the header after it (the default).
        #: False keeps the write order, which is all a killed process needs for every committed
        #: increment to stay loadable, but not what an OS crash or power loss needs.
        self.durable = True

    # -- opening --

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        page_size: int,
        ram_blocks: Iterable[RamBlockInfo],
        machine: str,
        capabilities: Iterable[str] = (),
        vm_id: bytes | None = None,
        overwrite: bool = False,
    ) -> CheckpointFile:
        """Make a new, empty checkpoint file (no increments) and open it writable.

        Raises ConfigError for bad arguments, an existing file (unless ``overwrite``), or a
        file that cannot be made.
        """
        spec = load_spec()
        header = ContainerHeader(
            format_version=spec.FORMAT_VERSION,
            page_size=page_size,
            vm_id=uuid.uuid4().bytes if vm_id is None else bytes(vm_id),
            machine=machine,
            ram_blocks=tuple(ram_blocks),
            capabilities=tuple(capabilities),
            increments=(),
            sequence=1,
        )
        try:
            check_header(header)
            slot0 = encode_header_slot(header)
            slot1 = encode_header_slot(replace(header, sequence=0))
        except FormatError as err:
            raise ConfigError(f"cannot create checkpoint file {path}: {err.reason}") from err
        if cls._capacity(header) < 1:
            raise ConfigError(
                f"cannot create checkpoint file {path}: the RAM layout leaves no room for "
                f"increments in the {spec.SLOT_SIZE}-byte header"
            )
        file_path = Path(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if overwrite else os.O_EXCL)
        try:
            fd = os.open(file_path, flags, 0o644)
        except FileExistsError as err:
            raise ConfigError(
                f"checkpoint file {path} already exists (overwrite it explicitly)"
            ) from err
        except OSError as err:
            raise ConfigError(f"cannot create checkpoint file {path}: {err.strerror}") from err
        self = cls(file_path, fd, _State.WRITABLE)
        try:
            self._lock()
            os.ftruncate(fd, 0)
            _pwrite_all(fd, slot0.ljust(spec.SLOT_SIZE, b"\0"), 0)
            _pwrite_all(fd, slot1.ljust(spec.SLOT_SIZE, b"\0"), spec.SLOT_SIZE)
            os.fsync(fd)
        except BaseException:
            self.close()
            raise
        _sync_directory(file_path)
        self._header = header
        self._slot = 0
        return self

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False,
             lock: bool = True) -> CheckpointFile:
        """Open an existing checkpoint file and read its header.

        Raises ConfigError when the file cannot be opened (missing, a directory, a FIFO or
        device, locked by another writer) and FormatError (VersionError, ChecksumError) when it
        is not a sound checkpoint file.  When a header slot had to be passed over (damaged, or
        pointing past the end of the file) a :class:`CheckpointWarning` says which and what was
        loaded instead.  ``lock=False``: the caller already holds this file's writer lock
        through another descriptor of the same open file (see :func:`lock_target`).
        """
        file_path = Path(path)
        fd = open_regular(file_path, writable=writable)
        self = cls(file_path, fd, _State.WRITABLE if writable else _State.READ_ONLY)
        try:
            if writable and lock:
                self._lock()
            self._read_header()
        except BaseException:
            self.close()
            raise
        if self._rejected_slot is not None:
            warnings.warn(CheckpointWarning(f"{file_path}: {self._rejected_slot}"), stacklevel=2)
        return self

    def _lock(self) -> None:
        _flock_current(self._fd, self._path)

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

    def _resync(self) -> None:
        """Make the header in force the one on disk again, after a header write that may or
        may not have landed (an I/O error, an interrupt): the next write must go over the
        slot that is really the older one."""
        try:
            self._read_header()
        except PyvmmError:
            pass  # nothing readable on disk: the next header write makes it whole again

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

    def _cut(self, offset: int) -> None:
        """Cut the file to ``offset``, or to the end of what a header on disk points to when
        that is further (a header must never point past the end of its file)."""
        target = max(offset, self._committed_end())
        if target < os.fstat(self._fd).st_size:  # never grow it: zeros are no data
            os.ftruncate(self._fd, target)

    # -- reading --

    @property
    def path(self) -> Path:
        """The file's path as given."""
        return self._path

    @property
    def fd(self) -> int:
        """The open file descriptor: read streams with ``pread``, write them at
        :attr:`IncrementWriter.stream_offset` with ``pwrite``. Owned by this object."""
        self._require(_State.READ_ONLY, _State.WRITABLE, _State.WRITING)
        return self._fd

    @property
    def header(self) -> ContainerHeader:
        """The header in force: the last committed state."""
        self._require(_State.READ_ONLY, _State.WRITABLE, _State.WRITING)
        assert self._header is not None
        return self._header

    @property
    def writable(self) -> bool:
        """Whether appends are allowed (opened with ``create`` or ``writable=True``)."""
        return self._state in (_State.WRITABLE, _State.WRITING)

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
        head = _pread_exact(self._fd, min(info.index_length, page_index_head_size()),
                            info.index_offset, what="page index", increment=info.index)
        problem = page_index_head_problem(head, info.index, info.index_length)
        if problem is not None:
            raise FormatError(f"page index: {problem}", offset=info.index_offset,
                              increment=info.index)
        return _pread_exact(self._fd, info.index_length, info.index_offset, what="page index",
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
        data = _pread_exact(
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
        data = _pread_exact(
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

    # -- writing --

    def _require(self, *states: _State) -> None:
        if self._state not in states:
            state = self._state.value
            raise PyvmmError(f"checkpoint file {self._path} is {state}: not allowed now")

    def set_capabilities(self, capabilities: Iterable[str]) -> None:
        """Replace the recorded capabilities; only before the first increment."""
        self._require(_State.WRITABLE)
        header = self.header
        if header.increments:
            raise PyvmmError(
                f"{self._path}: capabilities can only change before the first increment"
            )
        new = replace(header, capabilities=tuple(capabilities), sequence=header.sequence + 1)
        try:
            check_capabilities(new.capabilities, offset=None)
        except FormatError as err:
            raise ConfigError(err.reason) from err
        self._write_header(new)

    def begin_increment(self, kind: str, *, created_ns: int | None = None) -> IncrementWriter:
        """Start appending an increment of ``kind`` ("full" or "incremental").

        An incremental increment's parent is the last increment, which must exist. The caller
        writes the stream at :attr:`IncrementWriter.stream_offset`, then calls
        :meth:`IncrementWriter.commit` (or :meth:`~IncrementWriter.abort`). ``created_ns``
        defaults to the wall clock now. Raises FormatError when the header slot is full.
        """
        self._require(_State.WRITABLE)
        spec = load_spec()
        if self._committed_end() > self.header.data_end:
            self._resync()  # a header whose write landed unrecorded is the state in force
        header = self.header
        if kind not in KINDS:
            raise ValueError(f"increment kind must be one of {KINDS}, not {kind!r}")
        if created_ns is not None and not 0 <= created_ns < 1 << 64:
            raise ValueError(f"created_ns {created_ns} does not fit 64 bits")
        if kind == "incremental" and not header.increments:
            raise PyvmmError(
                f"{self._path}: an incremental increment needs a full one before it"
            )
        index = len(header.increments)
        capacity = self._capacity(header)
        if index >= capacity:
            raise FormatError(
                f"{self._path} is full: its {spec.SLOT_SIZE}-byte header slot holds at most "
                f"{capacity} increments with this RAM layout; squash the chain or start a new file",
                increment=index,
            )
        data_end = header.data_end
        stream_offset = -(-data_end // spec.STREAM_ALIGN) * spec.STREAM_ALIGN
        # what lies past the committed data is left over from an interrupted append
        os.ftruncate(self._fd, data_end)
        writer = IncrementWriter(
            self,
            index=index,
            kind=kind,
            parent=index - 1 if kind == "incremental" else -1,
            created_ns=time.time_ns() if created_ns is None else created_ns,
            stream_offset=stream_offset,
        )
        self._writer = writer
        self._state = _State.WRITING
        return writer

    def _commit(
        self,
        writer: IncrementWriter,
        *,
        stream_length: int,
        page_runs: Sequence[PageRun],
        pages: int,
        zero_pages: int,
        stats: dict[str, Any] | None,
        stream_crc: int,
        checksums: ChecksumBlock | None,
    ) -> IncrementInfo:
        self._require(_State.WRITING)
        if writer is not self._writer:
            raise PyvmmError("this increment writer is no longer active")
        header = self.header
        if stream_length < 0 or not 0 <= stream_crc <= 0xFFFFFFFF or pages < 0 or zero_pages < 0:
            raise ValueError("stream_length, pages and zero_pages must be >= 0, stream_crc a u32")
        stream_end = writer.stream_offset + stream_length
        size = os.fstat(self._fd).st_size
        if stream_length and size < stream_end:
            raise ValueError(
                f"the stream should end at byte {stream_end} but the file has {size} bytes"
            )
        index_bytes = encode_page_index(writer.index, page_runs)
        stats_bytes = encode_stats(writer.index, stats) if stats else b""
        checksum_bytes = b""
        if checksums is not None:
            if header.format_version < 2:
                raise ValueError(
                    f"{self._path} is in format {header.format_version}, which has no checksums"
                )
            checksum_bytes = encode_checksums(writer.index, checksums)
        checksum_offset = stream_end + len(index_bytes) + len(stats_bytes)
        info = IncrementInfo(
            index=writer.index,
            kind=writer.kind,
            parent=writer.parent,
            created_ns=writer.created_ns,
            stream_offset=writer.stream_offset,
            stream_length=stream_length,
            pages=pages,
            zero_pages=zero_pages,
            stream_crc=stream_crc,
            index_offset=stream_end,
            index_length=len(index_bytes),
            stats_offset=stream_end + len(index_bytes) if stats_bytes else 0,
            stats_length=len(stats_bytes),
            checksum_offset=checksum_offset if checksum_bytes else 0,
            checksum_length=len(checksum_bytes),
        )
        new = replace(header, increments=header.increments + (info,), sequence=header.sequence + 1)
        try:
            if not self._records_sound(header, info, page_runs):
                check_page_runs(header, info, page_runs)
            if checksums is not None:
                check_checksums(info, page_runs, checksums)
            check_header(new)
        except FormatError as err:
            raise ValueError(f"cannot commit increment {writer.index}: {err.reason}") from err
        _pwrite_all(self._fd, index_bytes + stats_bytes + checksum_bytes, stream_end)
        # anything the caller wrote past stream_length is not part of the increment
        os.ftruncate(self._fd, info.end)
        if self.durable:
            os.fsync(self._fd)  # the data must be durable before a header points at it
        # from the header's write to the record of it, nothing may stop this thread: a Ctrl-C
        # in between would let the abort cut the file below the header just published
        with signals_held():
            self._write_header(new)
            self._writer = None
            self._state = _State.WRITABLE
        return info

    @staticmethod
    def _records_sound(header: ContainerHeader, info: IncrementInfo,
                       runs: Sequence[PageRun]) -> bool:
        """True when ``runs`` are records a save built and they pass ``check_page_runs`` by
        the C check (one pass, no run object); otherwise the Python check decides and names
        what is wrong."""
        if not isinstance(runs, IndexRecords):
            return False
        counts = index_record_counts(
            runs.records, [b.size // header.page_size for b in header.ram_blocks],
            header.page_size, info.stream_offset, info.stream_offset + info.stream_length)
        return counts == (info.pages, info.zero_pages)

    def _sync_increment(self, writer: IncrementWriter) -> None:
        self._require(_State.WRITING)
        if writer is not self._writer:
            raise PyvmmError("this increment writer is no longer active")
        if self.durable:
            os.fsync(self._fd)

    def _abort(self, writer: IncrementWriter) -> None:
        if writer is not self._writer:
            return
        try:
            self._cut(self.header.data_end)
        finally:
            self._writer = None
            self._state = _State.WRITABLE

    def _write_header(self, header: ContainerHeader) -> None:
        """Publish ``header`` in the older slot, durably; the newer one stays as it was."""
        spec = load_spec()
        data = encode_header_slot(header).ljust(spec.SLOT_SIZE, b"\0")
        target = 1 - self._slot
        try:
            _pwrite_all(self._fd, data, target * spec.SLOT_SIZE)
            if self.durable:
                os.fsync(self._fd)
        except BaseException:
            self._resync()  # the slot may hold the new header, the old one, or a torn one
            raise
        self._header = header
        self._slot = target
        self._rejected_slot = None

    def move_to(self, target: Path, *, replace: bool) -> None:
        """Give this file (written aside) the name ``target`` in one step, then make that
        durable.  ``replace``: over the file there (a reader sees the old file or this one,
        never a mix); else only if ``target`` does not exist (ConfigError if another writer
        made it meanwhile).  The writer lock moves with the file: it now guards ``target``."""
        self._require(_State.WRITABLE)
        if replace:
            os.replace(self._path, target)
        else:
            try:
                os.link(self._path, target)  # fails where a file appeared meanwhile
            except FileExistsError as err:
                raise ConfigError(f"{target} was created by another writer meanwhile; this "
                                  f"chain stays in {self._path}") from err
            except OSError:  # a file system without hard links
                if os.path.lexists(target):
                    raise
                os.rename(self._path, target)
            else:
                os.unlink(self._path)
        self._path = Path(target)
        if self.durable:
            _sync_directory(self._path)

    # -- closing --

    def close(self) -> None:
        """Abort an increment in progress and close the file (idempotent)."""
        if self._state is _State.CLOSED:
            return
        try:
            if self._writer is not None:
                self._abort(self._writer)
        finally:
            self._state = _State.CLOSED
            os.close(self._fd)  # releases the flock too

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        count = len(self._header.increments) if self._header else 0
        return f"<CheckpointFile {str(self._path)!r} {self._state.value}, {count} increments>"


class IncrementWriter:
    """One increment being appended to a :class:`CheckpointFile`.

    The caller writes the increment's stream at :attr:`stream_offset` (``pwrite`` on the file's
    :attr:`~CheckpointFile.fd`), then calls :meth:`commit`; :meth:`abort` (or leaving a ``with``
    block without committing) discards it. Until the commit returns, the increment does not
    exist for any reader, whatever happens to the process.
    """

    def __init__(
        self,
        owner: CheckpointFile,
        *,
        index: int,
        kind: str,
        parent: int,
        created_ns: int,
        stream_offset: int,
    ) -> None:
        """Made by :meth:`CheckpointFile.begin_increment`."""
        self._owner = owner
        self.index = index
        self.kind = kind
        self.parent = parent
        self.created_ns = created_ns
        self.stream_offset = stream_offset

    def commit(
        self,
        *,
        stream_length: int,
        page_runs: Sequence[PageRun],
        pages: int,
        zero_pages: int,
        stats: dict[str, Any] | None = None,
        stream_crc: int = 0,
        checksums: ChecksumBlock | None = None,
    ) -> IncrementInfo:
        """Publish the increment: its stream is ``stream_length`` bytes at :attr:`stream_offset`.

        Writes the page index (``page_runs``, checked: inside RAM blocks and the stream, no page
        twice, counts equal to ``pages`` / ``zero_pages``), ``stats`` and ``checksums`` (sizes
        checked against the runs; format 2 files only) after the stream,
        syncs, then writes and syncs the new header. Raises ValueError for inconsistent
        arguments (nothing is written then) and OSError for I/O failures; after either the
        increment is not committed and :meth:`abort` discards it.
        """
        return self._owner._commit(
            self,
            stream_length=stream_length,
            page_runs=page_runs,
            pages=pages,
            zero_pages=zero_pages,
            stats=stats,
            stream_crc=stream_crc,
            checksums=checksums,
        )

    def sync(self) -> None:
        """Make what was written of the increment durable now (a no-op unless the file is
        :attr:`~CheckpointFile.durable`), so that :meth:`commit`'s own sync is short: a caller
        whose guest runs again once its pages are written syncs here, with the guest running."""
        self._owner._sync_increment(self)

    def abort(self) -> None:
        """Discard the increment: the file is cut back to its committed data (idempotent; a
        no-op after a commit)."""
        self._owner._abort(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()
