"""Positional I/O under the migration stream: a file descriptor or a memory buffer.

A backend moves bytes at absolute offsets with ``pwritev``/``preadv`` semantics (transfers may be
short; a read of 0 bytes means the end) and keeps no position of its own, so several streams may
share one descriptor. :class:`~pyvmm.migration.stream.QEMUFile` adds buffering, the position and
the sticky error on top. Raises ``OSError`` only; not thread-safe (its stream's owner uses it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        value = -1
    # -1 means "no limit reported"; Linux has said 1024 for decades
    return value if value > 0 else 1024


IOV_MAX = _iov_max()
"""Most buffers one ``pwritev``/``preadv`` call may take (the kernel refuses more with EINVAL)."""

BytesLike = bytes | bytearray | memoryview
"""What the bulk calls accept: anything exporting a C-contiguous buffer."""


def byte_view(data: BytesLike) -> memoryview:
    """A flat unsigned-byte view of ``data``, whatever its item format or shape."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class Backend(Protocol):
    """Positional I/O with ``pwritev``/``preadv`` semantics: transfers may be short; a read of 0
    bytes means end of data. Raises ``OSError``."""

    def write_at(self, views: Sequence[memoryview], offset: int) -> int: ...

    def read_at(self, views: Sequence[memoryview], offset: int) -> int: ...


class FdBackend:
    """A file descriptor, addressed by absolute file offsets."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write_at(self, views: Sequence[memoryview], offset: int) -> int:
        if len(views) == 1:
            return os.pwrite(self.fd, views[0], offset)
        return os.pwritev(self.fd, views, offset)

    def read_at(self, views: Sequence[memoryview], offset: int) -> int:
        return os.preadv(self.fd, views, offset)


class MemoryBackend:
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
