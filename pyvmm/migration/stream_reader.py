"""The reading half of the migration stream: read-ahead, gets, peeks and scatter reads.

Scalar gets are served from a read-ahead buffer and return 0 after an error (the sticky error
policy of :mod:`pyvmm.migration.stream`); the bulk reads raise at once, before allocating
anything, and large ones go straight from the file into the caller's buffers (``preadv``:
guest RAM, without a copy).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyvmm.migration import stream_state
from pyvmm.migration.stream_backend import IOV_MAX, BytesLike, byte_view
from pyvmm.migration.stream_state import IO_BUF_SIZE, StreamState

# the codecs under names bound here, not by an import: CPython 3.11 compiles ``NAME.method(...)``
# on an imported NAME as an attribute load, not a method call (it takes NAME for a module), and
# that cost every get_*() a seventh of its time
_S8, _BE16, _SBE16, _BE32, _SBE32, _BE64, _SBE64 = (
    stream_state.S8, stream_state.BE16, stream_state.SBE16, stream_state.BE32,
    stream_state.SBE32, stream_state.BE64, stream_state.SBE64)

# below this many bytes a scatter read is served through the read-ahead buffer (one big read
# for many small ones) rather than by a direct preadv per call
_DIRECT_READ_MIN = IO_BUF_SIZE // 2


class StreamReader(StreamState):
    """The reading half of :class:`~pyvmm.migration.stream.QEMUFile`."""

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
        flat = byte_view(view)
        self._check_bulk(flat.nbytes)
        self._read_views([flat], flat.nbytes)

    def readv_into(self, views: Sequence[BytesLike]) -> None:
        """Scatter the next bytes of the stream over ``views`` in order (``preadv`` batches).

        Errors as :meth:`read_into`.
        """
        flats = [byte_view(v) for v in views]
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
