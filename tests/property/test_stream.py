"""Properties of pyvmm.migration.stream.QEMUFile: round trips, positional I/O, short transfers,
sticky errors and bounded reads."""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.errors import FormatError, StreamError
from pyvmm.migration.stream import QEMUFile
from pyvmm.migration.stream_backend import IOV_MAX
from pyvmm.migration.stream_state import IO_BUF_SIZE

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (put method, get method, strategy of values)
SCALARS = {
    "u8": ("put_u8", "get_u8", st.integers(0, 0xFF)),
    "s8": ("put_s8", "get_s8", st.integers(-0x80, 0x7F)),
    "be16": ("put_be16", "get_be16", st.integers(0, 0xFFFF)),
    "sbe16": ("put_sbe16", "get_sbe16", st.integers(-0x8000, 0x7FFF)),
    "be32": ("put_be32", "get_be32", st.integers(0, 2**32 - 1)),
    "sbe32": ("put_sbe32", "get_sbe32", st.integers(-(2**31), 2**31 - 1)),
    "be64": ("put_be64", "get_be64", st.integers(0, 2**64 - 1)),
    "sbe64": ("put_sbe64", "get_sbe64", st.integers(-(2**63), 2**63 - 1)),
}

# one operation of a stream script: ("be32", 7), ("bytes", b"..."), ("str8", "cpu"), ("bufs", [...])
OPS = st.one_of(
    *[st.tuples(st.just(k), v[2]) for k, v in SCALARS.items()],
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    # big enough now and then to cross the 64 KiB buffer and the read-ahead boundary
    st.tuples(st.just("bytes"), st.integers(1, 3).map(lambda k: bytes(range(256)) * (k * 130))),
    st.tuples(st.just("str8"), st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)),
    st.tuples(st.just("bufs"), st.lists(st.binary(max_size=5000), max_size=8)),
)


def put_ops(f: QEMUFile, ops: Sequence[tuple[str, object]]) -> None:
    for kind, value in ops:
        if kind in SCALARS:
            getattr(f, SCALARS[kind][0])(value)
        elif kind == "bytes":
            f.put_bytes(value)  # type: ignore[arg-type]
        elif kind == "str8":
            f.put_str8(value)  # type: ignore[arg-type]
        else:
            f.put_buffers([memoryview(b) for b in value])  # type: ignore[attr-defined]


def get_ops(f: QEMUFile, ops: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    got: list[tuple[str, object]] = []
    for kind, value in ops:
        if kind in SCALARS:
            got.append((kind, getattr(f, SCALARS[kind][1])()))
        elif kind == "bytes":
            got.append((kind, f.get_bytes(len(value))))  # type: ignore[arg-type]
        elif kind == "str8":
            got.append((kind, f.get_str8()))
        else:
            views = [bytearray(len(b)) for b in value]  # type: ignore[attr-defined]
            f.readv_into(views)
            got.append((kind, [bytes(v) for v in views]))
    return got


def encoded(ops: Sequence[tuple[str, object]]) -> bytes:
    """The expected bytes, built by hand from int.to_bytes (not by the stream)."""
    sizes = {"u8": 1, "s8": 1, "be16": 2, "sbe16": 2, "be32": 4, "sbe32": 4, "be64": 8, "sbe64": 8}
    out = bytearray()
    for kind, value in ops:
        if kind in sizes:
            signed = kind.startswith("s")
            out += value.to_bytes(sizes[kind], "big", signed=signed)  # type: ignore[attr-defined]
        elif kind == "bytes":
            out += value  # type: ignore[arg-type]
        elif kind == "str8":
            raw = value.encode()  # type: ignore[attr-defined]
            out += bytes([len(raw)]) + raw
        else:
            out += b"".join(value)  # type: ignore[arg-type]
    return bytes(out)


@pytest.fixture
def tmpfd() -> Iterator[int]:
    fd, path = tempfile.mkstemp(prefix="pyvmm-stream-")
    os.unlink(path)
    try:
        yield fd
    finally:
        os.close(fd)


# -- round trips -------------------------------------------------------------------------------


@FAST
@given(ops=st.lists(OPS, max_size=40))
def test_memory_round_trip_matches_hand_encoding(ops: list[tuple[str, object]]) -> None:
    w = QEMUFile.memory()
    put_ops(w, ops)
    data = w.getvalue()
    assert data == encoded(ops)
    assert w.pos == len(data) == w.bytes_transferred
    r = QEMUFile.memory(data)
    assert get_ops(r, ops) == ops
    assert r.pos == len(data) and r.remaining == 0
    r.check()


@FAST
@given(ops=st.lists(OPS, max_size=30), start=st.integers(0, 10_000), head=st.binary(max_size=64))
def test_fd_round_trip_at_offset_never_moves_fd_offset(
    ops: list[tuple[str, object]], start: int, head: bytes
) -> None:
    fd, path = tempfile.mkstemp(prefix="pyvmm-stream-")
    try:
        os.write(fd, head)  # something before the stream that must survive
        fd_offset = os.lseek(fd, 0, os.SEEK_CUR)
        start = max(start, len(head))
        with QEMUFile.for_writing(fd, start) as w:
            put_ops(w, ops)
            expected_len = w.pos
        assert os.lseek(fd, 0, os.SEEK_CUR) == fd_offset
        assert os.pread(fd, len(head), 0) == head
        want = encoded(ops)
        assert expected_len == len(want)
        assert os.pread(fd, len(want) + 1, start) == want
        r = QEMUFile.for_reading(fd, start)
        assert r.limit == len(want)
        assert get_ops(r, ops) == ops
        assert r.offset == start + len(want)
        r.close()
        assert os.lseek(fd, 0, os.SEEK_CUR) == fd_offset
    finally:
        os.close(fd)
        os.unlink(path)


def test_put_buffers_many_memoryviews_equals_join(tmpfd: int) -> None:
    # more views than IOV_MAX so the call must batch; mixed with small puts on both sides
    ram = bytearray(os.urandom(4096 * 64))
    views: list[bytes | memoryview] = []
    for i in range(3 * IOV_MAX + 17):
        page = (i * 7) % 64
        views.append(memoryview(ram)[page * 4096 : page * 4096 + 1 + (i % 4096)])
        views.append(i.to_bytes(8, "big"))
    w = QEMUFile.for_writing(tmpfd, 3)
    w.put_be32(0x5145564D)
    w.put_buffers(views)
    w.put_u8(0x7E)
    w.close()
    want = b"\x51\x45\x56\x4d" + b"".join(views) + b"\x7e"
    assert os.pread(tmpfd, len(want) + 10, 3) == want
    assert w.pos == w.bytes_transferred == len(want)


def test_put_buffers_accepts_non_byte_formats() -> None:
    w = QEMUFile.memory()
    words = memoryview(bytearray(16)).cast("Q")
    words[1] = 0x0102030405060708
    w.put_buffers([words])
    assert w.getvalue() == bytes(8) + (0x0102030405060708).to_bytes(8, "little")


@FAST
@given(
    data=st.binary(min_size=1, max_size=200_000),
    cuts=st.lists(st.integers(0, 200_000), max_size=12),
    lead=st.integers(0, 3000),
)
def test_scatter_read_into_ram_views(data: bytes, cuts: list[int], lead: int) -> None:
    lead = min(lead, len(data))
    bounds = sorted({c for c in cuts if lead < c < len(data)} | {lead, len(data)})
    ram = mmap.mmap(-1, len(data) + 4096)
    try:
        r = QEMUFile.memory(data)
        head = r.get_bytes(lead)  # leaves part of the read-ahead buffered
        views = [memoryview(ram)[a:b] for a, b in itertools.pairwise(bounds)]
        r.readv_into(views)
        for v in views:
            v.release()
        assert head + ram[lead : len(data)] == data
        assert r.remaining == 0
    finally:
        ram.close()


def test_read_into_large_view_from_file(tmpfd: int) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 5)
    os.pwrite(tmpfd, b"junk" + payload, 0)
    r = QEMUFile.for_reading(tmpfd, 4)
    assert r.get_u8() == payload[0]
    target = bytearray(len(payload) - 1)
    r.read_into(memoryview(target))
    assert bytes(target) == payload[1:]
    assert r.bytes_transferred == len(payload) and r.remaining == 0


def test_skip_and_peek() -> None:
    data = bytes(range(256)) * 1000
    r = QEMUFile.memory(data)
    assert r.peek(3) == data[:3] and r.peek_byte(5) == 5 and r.pos == 0
    r.skip(10)
    assert r.get_u8() == 10
    r.skip(IO_BUF_SIZE * 2)  # past what the read-ahead holds
    assert r.get_u8() == data[11 + IO_BUF_SIZE * 2]
    r.skip(r.remaining)
    assert r.peek(4) == b"" and r.peek_byte() is None
    r.check()  # peeking at the end is not an error


# -- short transfers (a backend that moves at most a few bytes per call) ------------------------


class TrickleBackend:
    """In-memory positional I/O that transfers at most ``step`` bytes per call, like a pipe or
    a signal-interrupted write would."""

    def __init__(self, step: int, data: bytes = b"") -> None:
        self.step = step
        self.data = bytearray(data)
        self.calls = 0

    def write_at(self, views: Sequence[memoryview], offset: int) -> int:
        self.calls += 1
        assert len(views) <= IOV_MAX
        chunk = b"".join(bytes(v) for v in views)[: self.step]
        if len(self.data) < offset:
            self.data += bytes(offset - len(self.data))
        self.data[offset : offset + len(chunk)] = chunk
        return len(chunk)

    def read_at(self, views: Sequence[memoryview], offset: int) -> int:
        self.calls += 1
        done = 0
        for v in views:
            take = min(v.nbytes, self.step - done, max(len(self.data) - offset - done, 0))
            v[:take] = self.data[offset + done : offset + done + take]
            done += take
            if take < v.nbytes:
                break
        return done


@FAST
@given(ops=st.lists(OPS, max_size=25), step=st.integers(1, 5000))
def test_short_writes_and_reads_are_resumed(ops: list[tuple[str, object]], step: int) -> None:
    backend = TrickleBackend(step)
    w = QEMUFile(backend, writable=True)
    put_ops(w, ops)
    w.flush()
    want = encoded(ops)
    assert bytes(backend.data) == want
    r = QEMUFile(TrickleBackend(step, want), writable=False, limit=len(want))
    assert get_ops(r, ops) == ops
    r.check()


# -- sticky errors -------------------------------------------------------------------------------


def test_write_to_read_only_fd_is_sticky_until_check(tmp_path: pytest.TempPathFactory) -> None:
    path = os.path.join(str(tmp_path), "ro")
    open(path, "wb").close()
    fd = os.open(path, os.O_RDONLY)
    try:
        w = QEMUFile.for_writing(fd, 100)
        w.put_be64(1)
        w.put_buffers([b"x" * 10])  # the write happens here and fails: no exception yet
        pos = w.pos
        w.put_be32(2)  # a no-op now
        w.put_buffers([b"y" * 10])
        assert w.pos == pos
        assert isinstance(w.error, StreamError)
        with pytest.raises(StreamError) as info:
            w.check()
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.EBADF
        assert info.value.offset == 100
        assert "offset 0x64" in str(info.value)
        with pytest.raises(StreamError):
            w.flush()
        with pytest.raises(StreamError):
            w.close()
    finally:
        os.close(fd)


def test_write_to_closed_fd_raises_at_flush() -> None:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.close(fd)
    w = QEMUFile.for_writing(fd)
    w.put_be32(7)  # buffered: nothing happens yet
    with pytest.raises(StreamError) as info:
        w.flush()
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EBADF


def test_disk_full_is_sticky() -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        w = QEMUFile.for_writing(fd)
        w.put_bytes(bytes(IO_BUF_SIZE + 1))  # crosses the buffer size: the write happens now
        assert w.error is not None
        with pytest.raises(StreamError, match="No space left") as info:
            w.close()
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root")
def test_disk_full_midway_on_small_tmpfs(tmp_path: pytest.TempPathFactory) -> None:
    mnt = str(tmp_path)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt],
                      check=False).returncode:
        pytest.fail("cannot mount a tmpfs (the test needs root, as CI has)")
    try:
        fd = os.open(os.path.join(mnt, "chpt"), os.O_RDWR | os.O_CREAT)
        try:
            w = QEMUFile.for_writing(fd)
            pages = [bytes([i % 251]) * 4096 for i in range(200)]  # 800 KiB > 256 KiB
            w.put_buffers(pages)
            with pytest.raises(StreamError) as info:
                w.close()
            assert info.value.__cause__ is not None
            assert info.value.__cause__.errno == errno.ENOSPC  # type: ignore[attr-defined]
            # what was written before the error is intact: a short write was resumed
            written = w.bytes_transferred
            assert 0 < written < 200 * 4096
            assert os.pread(fd, written, 0) == b"".join(pages)[:written]
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", mnt], check=False)


def test_scalar_reads_past_the_end_return_zero_and_stick() -> None:
    r = QEMUFile.memory(b"\x01\x02\x03")
    assert r.get_be16() == 0x0102
    assert r.get_be32() == 0  # only one byte left
    assert r.get_u8() == 0  # sticky: even though a byte is there
    with pytest.raises(StreamError, match="truncated") as info:
        r.check()
    assert info.value.offset == 2
    with pytest.raises(StreamError):
        r.get_bytes(1)


# -- bounded reads ------------------------------------------------------------------------------


@FAST
@given(
    data=st.binary(max_size=100),
    size=st.one_of(st.integers(101, 2**63), st.sampled_from([2**40, 2**62, 2**64])),
)
def test_get_bytes_beyond_limit_refuses_without_allocating(data: bytes, size: int) -> None:
    r = QEMUFile.memory(data)
    with pytest.raises(StreamError):
        r.get_bytes(size)
    with pytest.raises(StreamError):
        r.check()


def test_limit_bounds_file_reads(tmpfd: int) -> None:
    os.pwrite(tmpfd, bytes(range(100)), 0)
    r = QEMUFile.for_reading(tmpfd, 10, limit=20)
    assert r.get_bytes(20) == bytes(range(10, 30))
    view = bytearray(b"untouched")
    with pytest.raises(StreamError):
        r.read_into(view)
    assert view == b"untouched"
    # a file shorter than the limit the caller claimed: reads fail, never invent data
    r2 = QEMUFile.for_reading(tmpfd, 90, limit=1 << 30)
    with pytest.raises(StreamError, match="truncated"):
        r2.get_bytes(64 * 1024)


def test_hostile_length_prefix_in_memory() -> None:
    w = QEMUFile.memory()
    w.put_be64(2**63)  # a length field a corrupt stream could carry
    r = QEMUFile.memory(w.getvalue())
    with pytest.raises(StreamError):
        r.get_bytes(r.get_be64())


def test_put_out_of_range_and_long_str8_are_format_errors() -> None:
    w = QEMUFile.memory()
    with pytest.raises(FormatError):
        w.put_be16(0x10000)
    with pytest.raises(FormatError):
        w.put_s8(200)
    with pytest.raises(FormatError):
        w.put_str8("x" * 256)
    w.put_str8("x" * 255)
    assert len(w.getvalue()) == 256


def test_one_direction_only() -> None:
    with pytest.raises(ValueError):
        QEMUFile.memory(b"abc").put_u8(1)
    with pytest.raises(ValueError):
        QEMUFile.memory().get_u8()
    w = QEMUFile.memory()
    w.close()
    with pytest.raises(ValueError):
        w.put_u8(1)


def test_non_utf8_str8_is_escaped_not_raised() -> None:
    r = QEMUFile.memory(b"\x02\xff\xfe")
    name = r.get_str8()

    assert name == "\\xff\\xfe"
    r.check()
