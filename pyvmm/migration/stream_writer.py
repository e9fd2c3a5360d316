"""The writing half of the migration stream: buffered puts and zero-copy gather writes.

Small puts (scalars, short strings) gather in a buffer of ``IO_BUF_SIZE`` bytes written in one
call; :meth:`StreamWriter.put_buffers` hands guest pages to ``pwritev`` without copying them.
A failed write becomes the stream's sticky error (:mod:`pyvmm.migration.stream`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NoReturn

from pyvmm.errors import FormatError
from pyvmm.migration.stream_backend import IOV_MAX, BytesLike, byte_view
from pyvmm.migration.stream_state import (
    BE16,
    BE32,
    BE64,
    IO_BUF_SIZE,
    S8,
    SBE16,
    SBE32,
    SBE64,
    STR8_MAX,
    U8,
    StreamState,
)

# bound here, not by the import: a method call on an imported name compiles to a slower
# attribute load in CPython 3.11 (see stream_reader)
_U8 = U8


class StreamWriter(StreamState):
    """The writing half of :class:`~pyvmm.migration.stream.QEMUFile`."""

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
        self._put(U8, value, "u8")

    def put_s8(self, value: int) -> None:
        """Put one signed byte."""
        self._put(S8, value, "s8")

    def put_be16(self, value: int) -> None:
        """Put an unsigned 16-bit big-endian integer."""
        self._put(BE16, value, "be16")

    def put_sbe16(self, value: int) -> None:
        """Put a signed 16-bit big-endian integer."""
        self._put(SBE16, value, "sbe16")

    def put_be32(self, value: int) -> None:
        """Put an unsigned 32-bit big-endian integer."""
        self._put(BE32, value, "be32")

    def put_sbe32(self, value: int) -> None:
        """Put a signed 32-bit big-endian integer."""
        self._put(SBE32, value, "sbe32")

    def put_be64(self, value: int) -> None:
        """Put an unsigned 64-bit big-endian integer."""
        self._put(BE64, value, "be64")

    def put_sbe64(self, value: int) -> None:
        """Put a signed 64-bit big-endian integer."""
        self._put(SBE64, value, "sbe64")

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
            self._append(byte_view(data))

    def put_str8(self, text: str | bytes) -> None:
        """Put a short string: ``u8 length`` then its bytes (UTF-8 for ``str``).

        Raises :class:`FormatError` if it is longer than 255 bytes.
        """
        raw = text.encode() if isinstance(text, str) else text
        if len(raw) > STR8_MAX:
            raise FormatError(
                f"{raw[:32]!r}... is {len(raw)} bytes; a length-prefixed string holds at most "
                f"{STR8_MAX}",
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
        views = [byte_view(b) for b in buffers]
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
