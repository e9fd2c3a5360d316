"""A guest file's bytes in the overlay, stored sparsely: holes cost no host memory.

:class:`FileData` holds a file of ``size`` bytes as fixed-size chunks (``CHUNK_SIZE``), keyed by
chunk index; chunk ``k`` stores the bytes ``[k*CHUNK_SIZE, k*CHUNK_SIZE + len(chunk))``, and
every byte below ``size`` that no chunk stores is a hole, which reads as zeros.  So ``truncate -s
2G`` or a write far past the end allocates nothing for the gap.  :attr:`FileData.allocated`
counts stored bytes by pages, as tmpfs counts a file's pages: it is what the overlay's limit
charges (see :mod:`pyvmm.linux.vfs`) and what ``st_blocks`` shows.

Invariants (checked when a saved state is loaded, :func:`check_file_data`): every chunk is
non-empty, at most ``CHUNK_SIZE`` long, and ends at or before ``size``; ``size`` is at most
``MAX_FILE_SIZE``.  Plain data apart from its methods; no errno policy here (the callers have it).
Runs on the vCPU thread.
"""

from __future__ import annotations

import dataclasses

#: Bytes per stored chunk: a page, as tmpfs stores a file, so a write into a hole stores (and
#: is charged) exactly the pages it touches, as on Linux.  (64 KiB chunks made sequential I/O of
#: big blocks a little faster, but a 4 KiB write into a hole then cost up to 64 KiB.)
CHUNK_SIZE = 4096
#: Largest file size: Linux's MAX_LFS_FILESIZE, tmpfs's s_maxbytes on 64-bit (writes at or past
#: it give EFBIG).  A sparse file this large costs nothing here.
MAX_FILE_SIZE = (1 << 63) - 1
_PAGE = 4096  # the unit of allocation charged, as tmpfs charges pages


def page_up(length: int) -> int:
    return (length + _PAGE - 1) & ~(_PAGE - 1)


@dataclasses.dataclass
class FileData:
    """A regular file's (or a symlink target's) bytes: ``size`` and the chunks that hold data."""

    size: int = 0
    chunks: dict[int, bytearray] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, data: bytes | bytearray) -> FileData:
        """A file holding exactly ``data`` (all of it stored, zeros included)."""
        out = cls(len(data))
        for start in range(0, len(data), CHUNK_SIZE):
            out.chunks[start // CHUNK_SIZE] = bytearray(data[start:start + CHUNK_SIZE])
        return out

    def __bytes__(self) -> bytes:
        return self.read(0, self.size)

    @property
    def allocated(self) -> int:
        """Bytes charged for the stored data: each chunk's length rounded up to whole pages."""
        return sum(page_up(len(chunk)) for chunk in self.chunks.values())

    # ------------------------------------------------------------------------ reading
    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer at the end of the file); holes read as
        zeros.  The caller bounds ``length``: this allocates what it returns."""
        end = offset + length
        end = min(end, self.size)
        if offset >= end:
            return b""
        first = offset // CHUNK_SIZE
        base = first * CHUNK_SIZE
        chunk = self.chunks.get(first)
        if chunk is not None and end - base <= len(chunk):  # the common case: one slice
            return bytes(chunk[offset - base:end - base])
        pieces: list[bytes | memoryview] = []
        for index in range(first, (end - 1) // CHUNK_SIZE + 1):
            base = index * CHUNK_SIZE
            start, stop = max(offset, base) - base, min(end, base + CHUNK_SIZE) - base
            chunk = self.chunks.get(index)
            piece = memoryview(chunk)[start:stop] if chunk is not None else memoryview(b"")
            pieces.append(piece)
            if len(piece) < stop - start:
                pieces.append(bytes(stop - start - len(piece)))
        return b"".join(pieces)

    def next_data(self, offset: int) -> int | None:
        """The first stored byte at or after ``offset`` (lseek SEEK_DATA), None if none."""
        for index in sorted(k for k in self.chunks if (k + 1) * CHUNK_SIZE > offset):
            if index * CHUNK_SIZE + len(self.chunks[index]) > offset:
                return max(offset, index * CHUNK_SIZE)
        return None

    def next_hole(self, offset: int) -> int:
        """The first byte at or after ``offset`` (below ``size``) in a hole, or ``size``
        (lseek SEEK_HOLE: the end of the file counts as a hole)."""
        while offset < self.size:
            index = offset // CHUNK_SIZE
            chunk = self.chunks.get(index)
            if chunk is None or offset >= index * CHUNK_SIZE + len(chunk):
                return offset
            if len(chunk) < CHUNK_SIZE:
                return min(self.size, index * CHUNK_SIZE + len(chunk))
            offset = (index + 1) * CHUNK_SIZE
        return self.size

    # ------------------------------------------------------------------------ changing
    def write(self, offset: int, data: bytes | bytearray | memoryview,
              room: int) -> tuple[int, int]:
        """Write ``data`` at ``offset``, as much of it as fits in ``room`` more allocated bytes.

        Returns (bytes written: a prefix of ``data``, 0 if not one byte fits; growth of
        :attr:`allocated`, at most ``room``).  The caller keeps ``offset + len(data)`` within
        MAX_FILE_SIZE and charges the growth.
        """
        index, start = divmod(offset, CHUNK_SIZE)
        chunk = self.chunks.get(index)
        length = len(data)
        end = start + length
        if chunk is not None and end <= CHUNK_SIZE and start <= len(chunk):
            # The common case: overwrite or append inside one stored chunk (page_up inlined:
            # this runs once per write system call).
            have = len(chunk)
            growth = ((end + 4095) & ~4095) - ((have + 4095) & ~4095) if end > have else 0
            if growth <= room:
                chunk[start:end] = data
                self.size = max(self.size, offset + length)
                return length, growth
        view = memoryview(data).cast("B")
        pos, done, grown = offset, 0, 0
        while done < len(view):
            index, start = divmod(pos, CHUNK_SIZE)
            stop = min(CHUNK_SIZE, start + len(view) - done)
            chunk = self.chunks.get(index)
            have = len(chunk) if chunk is not None else 0
            growth = page_up(max(have, stop)) - page_up(have)
            if growth > room:
                # Fill the pages already paid for and the ones that still fit, then stop.
                stop = min(stop, page_up(have) + room // _PAGE * _PAGE)
                if stop <= start:
                    break
                growth = page_up(max(have, stop)) - page_up(have)
            piece = view[done:done + stop - start]
            if chunk is None:
                if start:
                    chunk = self.chunks[index] = bytearray(start)
                    chunk += piece
                else:
                    self.chunks[index] = bytearray(piece)
            elif start >= have:
                if start > have:
                    chunk.extend(bytes(start - have))
                chunk += piece
            else:
                chunk[start:stop] = piece
            room -= growth
            grown += growth
            done += stop - start
            pos += stop - start
        self.size = max(self.size, pos) if done else self.size
        return done, grown

    def truncate(self, length: int) -> int:
        """Set the size to ``length``: bytes past it go; growing adds a hole (no allocation).
        Returns how much :attr:`allocated` shrank."""
        freed = 0
        if length < self.size:
            last = length // CHUNK_SIZE
            for index in [k for k in self.chunks if k >= last]:
                chunk = self.chunks[index]
                keep = max(0, length - index * CHUNK_SIZE)
                if keep < len(chunk):
                    freed += page_up(len(chunk)) - page_up(keep)
                    if keep:
                        del chunk[keep:]
                    else:
                        del self.chunks[index]
        self.size = length
        return freed


def check_file_data(data: FileData) -> str | None:
    """What breaks the invariants in ``data`` (a loaded, untrusted state), or None."""
    if not 0 <= data.size <= MAX_FILE_SIZE:
        return f"size {data.size} is outside [0, {MAX_FILE_SIZE}]"
    for index, chunk in data.chunks.items():
        if index < 0 or not 0 < len(chunk) <= CHUNK_SIZE or \
                index * CHUNK_SIZE + len(chunk) > data.size:
            return (f"chunk {index} ({len(chunk)} bytes) does not lie in a file of "
                    f"{data.size} bytes in pieces of at most {CHUNK_SIZE}")
    return None
