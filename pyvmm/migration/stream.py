"""The migration byte stream: QEMU's ``QEMUFile``, a buffered big-endian stream over a file
position or a memory buffer, with zero-copy gather writes and scatter reads for guest pages.

A stream goes one way: it is made for writing (:meth:`QEMUFile.for_writing`,
``QEMUFile.memory()``) or for reading (:meth:`QEMUFile.for_reading`, ``QEMUFile.memory(data)``).
Over a file descriptor it uses positional I/O (``pwrite``/``pwritev``/``pread``/``preadv``) at
``start_offset + pos``: a container can place a stream anywhere in its file, and the descriptor's
own offset never moves, so several streams may share one descriptor. The stream never closes the
descriptor; whoever opened it does.

Errors are sticky, as in QEMU: the first I/O error (``ENOSPC``, ``EBADF``...) or truncation is
remembered, later writes are dropped and later scalar reads return zero, and :meth:`check`
(called by :meth:`flush` and :meth:`close`) raises it as a :class:`~pyvmm.errors.StreamError`.
That keeps call sites that put or get many small fields short: one ``check()`` at the end. The
bulk reads (:meth:`get_bytes`, :meth:`read_into`, :meth:`readv_into`, :meth:`skip`) raise at
once instead, because their callers would otherwise allocate from a corrupt length or leave
guest RAM silently half-loaded.

Threads: a stream is not thread-safe. It has one owner thread at a time (the saver thread, the
loading thread, or the vCPU thread during a short pause); hand it over only with a
happens-before edge (a queue, a join).
"""

from __future__ import annotations

import os
import stat
from types import TracebackType
from typing import Self

from pyvmm.errors import StreamError
from pyvmm.migration.stream_backend import (
    BytesLike,
    FdBackend,
    MemoryBackend,
    byte_view,
)
from pyvmm.migration.stream_reader import StreamReader
from pyvmm.migration.stream_writer import StreamWriter


class QEMUFile(StreamWriter, StreamReader):
    """A one-way buffered big-endian byte stream (see the module docstring for threads/errors).

    The writing methods are :class:`~pyvmm.migration.stream_writer.StreamWriter`'s, the reading
    ones :class:`~pyvmm.migration.stream_reader.StreamReader`'s, the counters (``pos``,
    ``offset``, ``bytes_transferred``...) and :meth:`check`
    :class:`~pyvmm.migration.stream_state.StreamState`'s.
    """

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def for_writing(cls, fd: int, start_offset: int = 0) -> QEMUFile:
        """A stream that writes at ``start_offset`` of ``fd`` onwards (the fd stays open).

        Nothing is checked here: a bad descriptor shows up as a sticky error at the first
        write, raised by :meth:`check`/:meth:`flush`/:meth:`close`.
        """
        return cls(FdBackend(fd), writable=True, start_offset=start_offset)

    @classmethod
    def for_reading(cls, fd: int, start_offset: int = 0, limit: int | None = None) -> QEMUFile:
        """A stream that reads ``fd`` from ``start_offset``; at most ``limit`` bytes.

        Without ``limit``, a regular file's length past ``start_offset`` is the limit; other
        descriptors need an explicit one. Raises :class:`StreamError` if ``fd`` cannot be
        examined.
        """
        if limit is None:
            try:
                st = os.fstat(fd)
            except OSError as err:
                raise StreamError(
                    f"cannot open stream on fd {fd}: {err.strerror}", offset=start_offset
                ) from err
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("a stream over a non-regular file needs an explicit limit")
            limit = max(st.st_size - start_offset, 0)
        return cls(FdBackend(fd), writable=False, start_offset=start_offset, limit=limit)

    @classmethod
    def memory(cls, data: BytesLike | None = None) -> QEMUFile:
        """``memory()``: a writer into a growing buffer (see :meth:`getvalue`).
        ``memory(data)``: a reader over ``data`` (not copied; must not change while read)."""
        if data is None:
            return cls(MemoryBackend(bytearray()), writable=True)
        view = byte_view(data)
        return cls(MemoryBackend(view), writable=False, limit=view.nbytes)

    # -- the end of a stream -----------------------------------------------------------------

    def getvalue(self) -> bytes:
        """Everything written so far to a memory writer (flushes first)."""
        backend = self._backend
        if not isinstance(backend, MemoryBackend) or not isinstance(backend.data, bytearray):
            # a misuse, as the other wrong-direction calls: ValueError as they raise
            raise ValueError(  # noqa: TRY004
                "getvalue() needs a stream made by QEMUFile.memory()")
        self._flush_buffer()
        return bytes(backend.data)

    def close(self) -> None:
        """Flush (writer), stop further use, and :meth:`check`. The fd stays open."""
        if not self._closed:
            if self._writable:
                self._flush_buffer()
            self._closed = True
            self._writable = False
            self._readable = False
        self.check()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            # the first error is the one to see; do not mask it with a flush failure
            self._closed = True
            self._writable = False
            self._readable = False
