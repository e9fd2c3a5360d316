"""A migration stream's common core: its backend, position, limit and sticky error.

:class:`StreamState` is the base of both halves of
:class:`~pyvmm.migration.stream.QEMUFile` (:mod:`~pyvmm.migration.stream_writer`,
:mod:`~pyvmm.migration.stream_reader`): the counters and the first-error-wins failure they share,
and the big-endian scalar codecs both use. The error policy and the threading rule are the
stream's (see :mod:`pyvmm.migration.stream`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NoReturn

from pyvmm.errors import StreamError
from pyvmm.migration.stream_backend import Backend, FdBackend

IO_BUF_SIZE = 64 * 1024
"""Small puts are gathered up to this many bytes before one write; reads fetch this much ahead."""

# the wire's scalars, all big-endian
U8 = struct.Struct(">B")
S8 = struct.Struct(">b")
BE16 = struct.Struct(">H")
SBE16 = struct.Struct(">h")
BE32 = struct.Struct(">I")
SBE32 = struct.Struct(">i")
BE64 = struct.Struct(">Q")
SBE64 = struct.Struct(">q")

STR8_MAX = 255


@dataclass(frozen=True)
class Failure:
    """The first error a stream met: what, where (absolute offset) and the OS error if any."""

    reason: str
    offset: int
    cause: OSError | None


class StreamState:
    """What both halves of a stream share (see the module docstring): the backend, where the
    stream is, its limit, and its sticky error.

    Counters: :attr:`pos` is how many bytes this stream has produced (writer, buffered bytes
    included) or consumed (reader); :attr:`bytes_transferred` is how many bytes actually went to
    (writer) or came from (reader, read-ahead included) the backend. :attr:`offset` is the
    absolute offset of ``pos`` in the file (``start_offset + pos``).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        writable: bool,
        start_offset: int = 0,
        limit: int | None = None,
    ) -> None:
        """Use QEMUFile's class methods; this is the common constructor behind them."""
        if start_offset < 0:
            raise ValueError(f"negative stream start offset {start_offset}")
        self._backend = backend
        self._writable = writable
        self._readable = not writable
        self._start = start_offset
        self._limit = limit
        self._done = 0  # bytes written to / fetched from the backend, relative to start
        self._wbuf = bytearray()
        # read-ahead: a bytearray, so a fill hands over what it read without another copy
        self._rbuf = bytearray()
        self._ridx = 0
        self._error: Failure | None = None
        self._closed = False

    # -- counters and state ------------------------------------------------------------------

    @property
    def fd(self) -> int | None:
        """The file descriptor behind the stream, or None for a memory stream."""
        backend = self._backend
        return backend.fd if isinstance(backend, FdBackend) else None

    @property
    def writable(self) -> bool:
        """True for a writer, False for a reader."""
        return self._writable

    @property
    def pos(self) -> int:
        """Bytes produced (writer) or consumed (reader) by this stream so far."""
        if self._writable:
            return self._done + len(self._wbuf)
        return self._done - (len(self._rbuf) - self._ridx)

    @property
    def bytes_transferred(self) -> int:
        """Bytes handed to (writer) or fetched from (reader) the file or buffer so far."""
        return self._done

    @property
    def start_offset(self) -> int:
        """Absolute offset of the stream's first byte in its file."""
        return self._start

    @property
    def offset(self) -> int:
        """Absolute offset in the file of the next byte to put or get."""
        return self._start + self.pos

    @property
    def limit(self) -> int | None:
        """Length of the stream (reader): no read goes past it. ``None`` for a writer."""
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        if not self._readable:
            raise ValueError("only a reading stream has a limit")
        # the read-ahead may already hold bytes up to _done: the limit cannot cut them off
        if value < self._done:
            raise ValueError(f"limit {value} is below what was already read ({self._done})")
        self._limit = value

    @property
    def remaining(self) -> int:
        """Bytes left before the limit (reader); 0 for a writer."""
        if self._limit is None:
            return 0
        return self._limit - self.pos

    @property
    def error(self) -> StreamError | None:
        """The sticky error as an exception object (not raised), or ``None``."""
        failure = self._error
        if failure is None:
            return None
        err = StreamError(failure.reason, offset=failure.offset)
        err.__cause__ = failure.cause
        return err

    def check(self) -> None:
        """Raise the sticky error, if any, as :class:`StreamError` from the OS error."""
        if self._error is not None:
            self._raise()

    def _raise(self) -> NoReturn:
        failure = self._error
        assert failure is not None
        raise StreamError(failure.reason, offset=failure.offset) from failure.cause

    def _fail(self, reason: str, cause: OSError | None = None, offset: int | None = None) -> None:
        """Remember the first error only: later ones are consequences of it."""
        if self._error is None:
            self._error = Failure(reason, self.offset if offset is None else offset, cause)
