"""The checkpoint container: one file holding a chain of increments behind a crash-safe header.

:class:`CheckpointFile` is the only code that writes a container: it creates one and appends
increments to it; reading (the header in force, page indexes, stats, checksums) is its base
:class:`~pyvmm.migration.container_reader.ContainerReader`'s, and the file-system side (regular
files only, the writer lock) :mod:`pyvmm.migration.container_files`'s. The bytes themselves are
encoded, decoded and checked by :mod:`pyvmm.migration.container_format` and its codec modules
(whose data classes this module re-exports), from the declaration in
``formats/chpt.construct.py``.

An increment's payload is a QEMU v3 migration stream that the caller writes itself through
:attr:`CheckpointFile.fd` at :attr:`IncrementWriter.stream_offset`; the container records where
it is, which guest pages it holds (its page index) and the caller's stats, then publishes it with
a header update that a kill at any instant cannot damage:

1. stream, page index and stats are written after the last committed byte, then synced;
2. the new header (sequence + 1) is written over the *older* of the two header slots, then synced.

A reader takes the slot with the highest sequence whose CRC holds (see
:mod:`~pyvmm.migration.container_reader`). Bytes past the last committed increment are the
remains of an interrupted append; the next append cuts them off.

Files are untrusted input: every size is bounded (by the file size, the slot size, the RAM
layout) before anything is read or allocated, and every failure is one
:class:`~pyvmm.errors.FormatError` line (:class:`~pyvmm.errors.ChecksumError` for a checksum,
:class:`~pyvmm.errors.VersionError` for a newer format). A :class:`CheckpointFile` is not
thread-safe: one thread uses it at a time.
"""

from __future__ import annotations

import os
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
    encode_checksums,
)
from pyvmm.migration.container_files import flock_current, open_regular, sync_directory
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
from pyvmm.migration.container_reader import ContainerReader, FileState
from pyvmm.migration.header_format import (
    check_capabilities,
    check_header,
    decode_header_slot,
    encode_header_slot,
)
from pyvmm.migration.page_index_format import (
    check_page_runs,
    decode_page_index,
    encode_page_index,
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
]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


# ----- the file --------------------------------------------------------------------------------


class CheckpointFile(ContainerReader):
    """An open checkpoint container: its header, page indexes and stats, and appends.

    Opened with :meth:`create` (new file, writable) or :meth:`open`. A writable file holds an
    exclusive ``flock`` so that two writers cannot interleave appends; readers take no lock and
    always see a consistent state (a writer only adds bytes past the committed ones and rewrites
    the slot readers do not use).
    """

    def __init__(self, path: Path, fd: int, state: FileState) -> None:
        """Use :meth:`create` or :meth:`open`."""
        super().__init__(path, fd, state)
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
        self = cls(file_path, fd, FileState.WRITABLE)
        try:
            self._lock()
            os.ftruncate(fd, 0)
            _pwrite_all(fd, slot0.ljust(spec.SLOT_SIZE, b"\0"), 0)
            _pwrite_all(fd, slot1.ljust(spec.SLOT_SIZE, b"\0"), spec.SLOT_SIZE)
            os.fsync(fd)
        except BaseException:
            self.close()
            raise
        sync_directory(file_path)
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
        self = cls(file_path, fd, FileState.WRITABLE if writable else FileState.READ_ONLY)
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
        flock_current(self._fd, self._path)

    def _resync(self) -> None:
        """Make the header in force the one on disk again, after a header write that may or
        may not have landed (an I/O error, an interrupt): the next write must go over the
        slot that is really the older one."""
        try:
            self._read_header()
        except PyvmmError:
            pass  # nothing readable on disk: the next header write makes it whole again

    def _cut(self, offset: int) -> None:
        """Cut the file to ``offset``, or to the end of what a header on disk points to when
        that is further (a header must never point past the end of its file)."""
        target = max(offset, self._committed_end())
        if target < os.fstat(self._fd).st_size:  # never grow it: zeros are no data
            os.ftruncate(self._fd, target)

    # -- writing --

    def set_capabilities(self, capabilities: Iterable[str]) -> None:
        """Replace the recorded capabilities; only before the first increment."""
        self._require(FileState.WRITABLE)
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
        self._require(FileState.WRITABLE)
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
        self._state = FileState.WRITING
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
        self._require(FileState.WRITING)
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
            self._state = FileState.WRITABLE
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
        self._require(FileState.WRITING)
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
            self._state = FileState.WRITABLE

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
        self._require(FileState.WRITABLE)
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
            sync_directory(self._path)

    # -- closing --

    def close(self) -> None:
        """Abort an increment in progress and close the file (idempotent)."""
        if self._state is FileState.CLOSED:
            return
        try:
            if self._writer is not None:
                self._abort(self._writer)
        finally:
            self._state = FileState.CLOSED
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
