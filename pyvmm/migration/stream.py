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
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn, Protocol

from pyvmm.errors import FormatError, StreamError

IO_BUF_SIZE = 64 * 1024
"""Small puts are gathered up to this many bytes before one write; reads fetch this much ahead."""


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        value = -1
    # -1 means "no limit reported"; Linux has said 1024 for decades
    return value if value > 0 else 1024


IOV_MAX = _iov_max()
"""Most buffers one ``pwritev``/``preadv`` call may take (the kernel refuses more with EINVAL)."""

# below this many bytes a scatter read is served through the read-ahead buffer (one big read
# for many small ones) rather than by a direct preadv per call
_DIRECT_READ_MIN = IO_BUF_SIZE // 2

_U8 = struct.Struct(">B")
_S8 = struct.Struct(">b")
_BE16 = struct.Struct(">H")
_SBE16 = struct.Struct(">h")
_BE32 = struct.Struct(">I")
_SBE32 = struct.Struct(">i")
_BE64 = struct.Struct(">Q")
_SBE64 = struct.Struct(">q")

_STR8_MAX = 255

BytesLike = bytes | bytearray | memoryview
"""What the bulk calls accept: anything exporting a C-contiguous buffer."""


def _byte_view(data: BytesLike) -> memoryview:
    """A flat unsigned-byte view of ``data``, whatever its item format or shape."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class _Backend(Protocol):
    """Positional I/O with ``pwritev``/``preadv`` semantics: transfers may be short; a read of 0
    bytes means end of data. Raises ``OSError``."""

    def write_at(self, views: Sequence[memoryview], offset: int) -> int: ...

    def read_at(self, views: Sequence[memoryview], offset: int) -> int: ...


class _FdBackend:
    """A file descriptor, addressed by absolute file offsets."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write_at(self, views: Sequence[memoryview], offset: int) -> int:
        if len(views) == 1:
            return os.pwrite(self.fd, views[0], offset)
        return os.pwritev(self.fd, views, offset)

    def read_at(self, views: Sequence[memoryview], offset: int) -> int:
        return os.preadv(self.fd, views, offset)


class _MemoryBackend:
    """A bytearray (writing) or a read-only buffer (reading), addressed from 0."""

    def __init__(self, data: bytearray | memoryview) -> None:
        self.data = data

    def write_at(self, views: Sequence[memoryview], offset: int) -> int:
        data = self.data
        assert isinstance(data, bytearray)
        total = sum(v.nbytes for v in views)
        if offset == len(data):
            for view in views:
                data += view
        else:
            data[offset : offset + total] = b"".join(views)
        return total

    def read_at(self, views: Sequence[memoryview], offset: int) -> int:
        done = 0
        for view in views:
            chunk = self.data[offset + done : offset + done + view.nbytes]
            view[: len(chunk)] = chunk
            done += len(chunk)
            if len(chunk) < view.nbytes:
                break
        return done


@dataclass(frozen=True)
class _Failure:
    """The first error a stream met: what, where (absolute offset) and the OS error if any."""

    reason: str
    offset: int
    cause: OSError | None


class QEMUFile:
    """A one-way buffered big-endian byte stream (see the module docstring for threads/errors).

    Counters: :attr:`pos` is how many bytes this stream has produced (writer, buffered bytes
    included) or consumed (reader); :attr:`bytes_transferred` is how many bytes actually went to
    (writer) or came from (reader, read-ahead included) the backend. :attr:`offset` is the
    absolute offset of ``pos`` in the file (``start_offset + pos``).
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        writable: bool,
        start_offset: int = 0,
        limit: int | None = None,
    ) -> None:
        """Use the class methods; this is the common constructor behind them."""
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
        self._error: _Failure | None = None
        self._closed = False

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def for_writing(cls, fd: int, start_offset: int = 0) -> QEMUFile:
        """A stream that writes at ``start_offset`` of ``fd`` onwards (the fd stays open).

        Nothing is checked here: a bad descriptor shows up as a sticky error at the first
        write, raised by :meth:`check`/:meth:`flush`/:meth:`close`.
        """
        return cls(_FdBackend(fd), writable=True, start_offset=start_offset)

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
        return cls(_FdBackend(fd), writable=False, start_offset=start_offset, limit=limit)

    @classmethod
    def memory(cls, data: BytesLike | None = None) -> QEMUFile:
        """``memory()``: a writer into a growing buffer (see :meth:`getvalue`).
        ``memory(data)``: a reader over ``data`` (not copied; must not change while read)."""
        if data is None:
            return cls(_MemoryBackend(bytearray()), writable=True)
        view = _byte_view(data)
        return cls(_MemoryBackend(view), writable=False, limit=view.nbytes)

    # -- counters and state ------------------------------------------------------------------

    @property
    def fd(self) -> int | None:
        """The file descriptor behind the stream, or None for a memory stream."""
        backend = self._backend
        return backend.fd if isinstance(backend, _FdBackend) else None

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
            self._error = _Failure(reason, self.offset if offset is None else offset, cause)

    # -- writing -----------------------------------------------------------------------------

    def _append(self, data: bytes | memoryview) -> None:
        if not self._writable:
            self._misuse()
        if self._error is not None:
            return
        self._wbuf += data
        if len(self._wbuf) >= IO_BUF_SIZE:
            self._flush_buffer()

    def _misuse(self) -> NoReturn:
        if self._closed:
            raise ValueError("put on a closed stream")
        raise ValueError("put on a stream opened for reading")

    def put_u8(self, value: int) -> None:
        """Put one unsigned byte."""
        self._put(_U8, value, "u8")

    def put_s8(self, value: int) -> None:
        """Put one signed byte."""
        self._put(_S8, value, "s8")

    def put_be16(self, value: int) -> None:
        """Put an unsigned 16-bit big-endian integer."""
        self._put(_BE16, value, "be16")

    def put_sbe16(self, value: int) -> None:
        """Put a signed 16-bit big-endian integer."""
        self._put(_SBE16, value, "sbe16")

    def put_be32(self, value: int) -> None:
        """Put an unsigned 32-bit big-endian integer."""
        self._put(_BE32, value, "be32")

    def put_sbe32(self, value: int) -> None:
        """Put a signed 32-bit big-endian integer."""
        self._put(_SBE32, value, "sbe32")

    def put_be64(self, value: int) -> None:
        """Put an unsigned 64-bit big-endian integer."""
        self._put(_BE64, value, "be64")

    def put_sbe64(self, value: int) -> None:
        """Put a signed 64-bit big-endian integer."""
        self._put(_SBE64, value, "sbe64")

    def _put(self, codec: struct.Struct, value: int, what: str) -> None:
        try:
            data = codec.pack(value)
        except struct.error as err:
            # a caller bug, but one that would otherwise corrupt the stream silently
            raise FormatError(f"{value!r} does not fit a {what}", offset=self.offset) from err
        self._append(data)

    def put_bytes(self, data: BytesLike) -> None:
        """Put raw bytes (copied into the buffer; use :meth:`put_buffers` for pages)."""
        if isinstance(data, bytes):
            self._append(data)
        else:
            self._append(_byte_view(data))

    def put_str8(self, text: str | bytes) -> None:
        """Put a short string: ``u8 length`` then its bytes (UTF-8 for ``str``).

        Raises :class:`FormatError` if it is longer than 255 bytes.
        """
        raw = text.encode() if isinstance(text, str) else text
        if len(raw) > _STR8_MAX:
            raise FormatError(
                f"{raw[:32]!r}... is {len(raw)} bytes; a length-prefixed string holds at most "
                f"{_STR8_MAX}",
                offset=self.offset,
            )
        self._append(_U8.pack(len(raw)) + raw)

    def put_buffers(self, buffers: Sequence[BytesLike]) -> None:
        """Write ``buffers`` in order without copying them (``pwritev``, at most IOV_MAX each).

        Pending small puts go first, in the same system call. When this returns, the buffers
        have been handed to the kernel and the caller may change them (guest RAM may be
        written again). Short writes are resumed; an error becomes the sticky error.
        """
        if not self._writable:
            self._misuse()
        if self._error is not None:
            return
        views = [_byte_view(b) for b in buffers]
        if self._wbuf:
            with memoryview(self._wbuf) as pending:
                views.insert(0, pending)
                self._write_views(views)
                del views
            self._wbuf = bytearray()
        else:
            self._write_views(views)

    def _flush_buffer(self) -> None:
        if not self._wbuf or self._error is not None:
            self._wbuf = bytearray()
            return
        with memoryview(self._wbuf) as pending:
            self._write_views([pending])
        # a fresh bytearray: the old one may still be pinned by a failed call's traceback
        self._wbuf = bytearray()

    def _write_views(self, views: list[memoryview]) -> None:
        """Write every view at the stream's backend position, resuming short writes."""
        i = 0
        n = len(views)
        while i < n:
            batch = views[i : i + IOV_MAX]
            wanted = sum(v.nbytes for v in batch)
            if wanted == 0:
                i += len(batch)
                continue
            try:
                written = self._backend.write_at(batch, self._start + self._done)
            except OSError as err:
                self._fail(f"write failed: {err.strerror}", err, self._start + self._done)
                return
            if written <= 0:
                # pwrite returning 0 for a non-empty request never makes progress
                self._fail("write made no progress", None, self._start + self._done)
                return
            self._done += written
            # skip the views written completely, trim the one written in part
            while i < n and written >= views[i].nbytes:
                written -= views[i].nbytes
                i += 1
            if written:
                views[i] = views[i][written:]

    def written_externally(self, size: int) -> None:
        """Account ``size`` bytes that another writer (the C page writer) put at :attr:`offset`.

        Call :meth:`flush` before handing :attr:`offset` to that writer, and this right after,
        so the stream's own next bytes follow them.
        """
        if not self._writable:
            self._misuse()
        if self._wbuf:
            raise ValueError("flush() before writing at the stream's offset from outside")
        if size < 0:
            raise ValueError(f"negative size {size}")
        self._done += size

    def flush(self) -> None:
        """Write the buffered small puts, then :meth:`check`."""
        if self._writable:
            self._flush_buffer()
        self.check()

    def getvalue(self) -> bytes:
        """Everything written so far to a memory writer (flushes first)."""
        backend = self._backend
        if not isinstance(backend, _MemoryBackend) or not isinstance(backend.data, bytearray):
            raise ValueError("getvalue() needs a stream made by QEMUFile.memory()")
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

    def __enter__(self) -> QEMUFile:
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

    # -- reading -----------------------------------------------------------------------------

    def _available(self) -> int:
        return len(self._rbuf) - self._ridx

    def _limit_left(self) -> int:
        """Bytes the backend may still be asked for before the limit."""
        assert self._limit is not None
        return self._limit - self._done

    def _fill(self, need: int) -> bool:
        """Make at least ``need`` unread bytes available in the read-ahead buffer.

        Returns False (without recording an error) when the limit or the data ends first.
        """
        if not self._readable:
            if self._closed:
                raise ValueError("get on a closed stream")
            raise ValueError("get on a stream opened for writing")
        have = self._available()
        fetch = max(min(max(need, IO_BUF_SIZE) - have, self._limit_left()), 0)
        if have + fetch < need:
            return False
        chunk = bytearray(fetch)
        got = 0
        with memoryview(chunk) as view:
            while got < fetch:
                try:
                    n = self._backend.read_at([view[got:]], self._start + self._done + got)
                except OSError as err:
                    self._fail(f"read failed: {err.strerror}", err)
                    return False
                if n <= 0:
                    break
                got += n
        self._done += got
        del chunk[got:]
        self._rbuf = chunk if have == 0 else self._rbuf[self._ridx :] + chunk
        self._ridx = 0
        return len(self._rbuf) >= need

    def _claim(self, size: int) -> int:
        """Index in the read-ahead buffer of the next ``size`` bytes, consumed; -1 on error."""
        if self._error is not None:
            return -1
        if self._available() < size and not self._fill(size):
            self._fail(self._short_reason(size))
            return -1
        i = self._ridx
        self._ridx = i + size
        return i

    def _short_reason(self, size: int) -> str:
        left = max(self.remaining, 0) if self._error is None else 0
        return f"stream truncated: {size} bytes needed, {left} left"

    def get_u8(self) -> int:
        """Get one unsigned byte (0 after an error)."""
        i = self._claim(1)
        return self._rbuf[i] if i >= 0 else 0

    def get_s8(self) -> int:
        """Get one signed byte (0 after an error)."""
        i = self._claim(1)
        return int(_S8.unpack_from(self._rbuf, i)[0]) if i >= 0 else 0

    def get_be16(self) -> int:
        """Get an unsigned big-endian 16-bit integer (0 after an error)."""
        i = self._claim(2)
        return int(_BE16.unpack_from(self._rbuf, i)[0]) if i >= 0 else 0

    def get_sbe16(self) -> int:
        """Get a signed big-endian 16-bit integer (0 after an error)."""
        i = self._claim(2)
        return int(_SBE16.unpack_from(self._rbuf, i)[0]) if i >= 0 else 0

    def get_be32(self) -> int:
        """Get an unsigned big-endian 32-bit integer (0 after an error)."""
        i = self._claim(4)
        return int(_BE32.unpack_from(self._rbuf, i)[0]) if i >= 0 else 0

    def get_sbe32(self) -> int:
        """Get a signed big-endian 32-bit integer (0 after an error)."""
        i = self._claim(4)
        return int(_SBE32.unpack_from(self._rbuf, i)[0]) if i >= 0 else 0

    def get_be64(self) -> int:
        """Get an unsigned big-endian 64-bit integer (0 after an error)."""
        i = self._claim(8)
        return int(_BE64.unpack_from(self._rbuf, i)[0]) if i >= 0 else 0

    def get_sbe64(self) -> int:
        """Get a signed big-endian 64-bit integer (0 after an error)."""
        i = self._claim(8)
        return int(_SBE64.unpack_from(self._rbuf, i)[0]) if i >= 0 else 0

    def get_str8(self) -> str:
        """Get a ``u8 length`` + bytes string, decoded as UTF-8 ("" after an error).

        Bytes that are not UTF-8 come back backslash-escaped, so a hostile name can be shown
        in an error message but never matches a real one.
        """
        length = self.get_u8()
        i = self._claim(length)
        if i < 0:
            return ""
        return self._rbuf[i : i + length].decode("utf-8", "backslashreplace")

    def peek(self, size: int, offset: int = 0) -> bytes:
        """Up to ``size`` bytes starting ``offset`` bytes ahead, without consuming them.

        Fewer (possibly none) come back at the end of the stream or after an error; that alone
        is not an error. ``offset + size`` may be at most :data:`IO_BUF_SIZE`.
        """
        if offset + size > IO_BUF_SIZE:
            raise ValueError(f"cannot peek {offset + size} bytes ahead")
        if self._error is not None:
            return b""
        if self._available() < offset + size:
            self._fill(min(offset + size, self._available() + self._limit_left()))
        start = self._ridx + offset
        return bytes(self._rbuf[start : start + size])

    def peek_byte(self, offset: int = 0) -> int | None:
        """The byte ``offset`` bytes ahead, not consumed; ``None`` at the end or after an error."""
        ahead = self.peek(1, offset)
        return ahead[0] if ahead else None

    def get_bytes(self, size: int) -> bytes:
        """Get exactly ``size`` bytes.

        Raises :class:`StreamError` — before allocating anything — when ``size`` is more than
        what is left before the limit, when the data ends early, or after an earlier error.
        """
        if size < 0:
            raise ValueError(f"negative read size {size}")
        if size <= self._available() and self._error is None:
            i = self._ridx
            self._ridx = i + size
            return bytes(self._rbuf[i : i + size])
        self._check_bulk(size)
        if size <= IO_BUF_SIZE:
            i = self._claim(size)
            if i < 0:
                self._raise()
            return bytes(self._rbuf[i : i + size])
        out = bytearray(size)
        self._read_views([memoryview(out)], size)
        return bytes(out)

    def read_into(self, view: BytesLike) -> None:
        """Fill ``view`` (e.g. a memoryview of guest RAM) with the next bytes of the stream.

        Large reads go straight from the file into ``view`` (``preadv``). Raises
        :class:`StreamError` like :meth:`get_bytes`; ``view`` is then left untouched when the
        request passes the limit, and partly written when the data ended early.
        """
        flat = _byte_view(view)
        self._check_bulk(flat.nbytes)
        self._read_views([flat], flat.nbytes)

    def readv_into(self, views: Sequence[BytesLike]) -> None:
        """Scatter the next bytes of the stream over ``views`` in order (``preadv`` batches).

        Errors as :meth:`read_into`.
        """
        flats = [_byte_view(v) for v in views]
        total = sum(v.nbytes for v in flats)
        self._check_bulk(total)
        self._read_views(flats, total)

    def skip(self, size: int) -> None:
        """Consume ``size`` bytes without reading them when they are not buffered yet.

        Raises :class:`StreamError` like :meth:`get_bytes`.
        """
        if size < 0:
            raise ValueError(f"negative skip {size}")
        self._check_bulk(size)
        buffered = min(size, self._available())
        self._ridx += buffered
        if size > buffered:
            self._rbuf = bytearray()
            self._ridx = 0
            self._done += size - buffered

    def _check_bulk(self, size: int) -> None:
        """Raise at once if a bulk read of ``size`` bytes cannot be satisfied within the limit."""
        if not self._readable:
            if self._closed:
                raise ValueError("get on a closed stream")
            raise ValueError("get on a stream opened for writing")
        if self._error is not None:
            self._raise()
        if size > self.remaining:
            self._fail(self._short_reason(size))
            self._raise()

    def _read_views(self, views: list[memoryview], total: int) -> None:
        """Fill ``views`` (``total`` bytes, already checked against the limit) from the stream."""
        views = [v for v in views if v.nbytes]
        n = len(views)
        i, total = self._copy_buffered(views, 0, total)
        if i == n:
            return
        if total < _DIRECT_READ_MIN:
            # many small reads in a row (headers between pages) share one read-ahead
            if not self._fill(total):
                self._fail(self._short_reason(total))
                self._raise()
            i, total = self._copy_buffered(views, i, total)
            assert i == n
            return
        self._rbuf = bytearray()
        self._ridx = 0
        while i < n:
            batch = views[i : i + IOV_MAX]
            try:
                got = self._backend.read_at(batch, self._start + self._done)
            except OSError as err:
                self._fail(f"read failed: {err.strerror}", err, self._start + self._done)
                self._raise()
            if got <= 0:
                self._fail(self._short_reason(total), None, self._start + self._done)
                self._raise()
            self._done += got
            total -= got
            while i < n and got >= views[i].nbytes:
                got -= views[i].nbytes
                i += 1
            if got:
                views[i] = views[i][got:]

    def _copy_buffered(self, views: list[memoryview], i: int, total: int) -> tuple[int, int]:
        """Copy read-ahead bytes into ``views[i:]`` (non-empty views); trim a view filled in
        part. Returns the first view not yet filled and the bytes still wanted."""
        n = len(views)
        while i < n and self._available():
            view = views[i]
            take = min(view.nbytes, self._available())
            view[:take] = self._rbuf[self._ridx : self._ridx + take]
            self._ridx += take
            total -= take
            if take < view.nbytes:
                views[i] = view[take:]
            else:
                i += 1
        return i, total
