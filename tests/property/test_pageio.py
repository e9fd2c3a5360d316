"""Properties of pyvmm.migration.pageio against a per-page pure-Python encoder and decoder.

The reference below is the wire format spelled out one record at a time, slow and plain; the C
writer must produce the same bytes and the run layout the reference derives from them, and the C
reader must load what the reference decoder loads. Then the negative cases: truncated files,
altered headers, runs outside the block or the file, a full filesystem, bad fds.
"""

from __future__ import annotations

import errno
import os
import random
import re
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pyvmm.errors import FormatError, StreamError
from pyvmm.migration.container_format import IndexRecords
from pyvmm.migration.container_format import PageRun as IndexedRun
from pyvmm.migration.page_index_format import encode_page_index
from pyvmm.migration.pageio import (
    PAGE_RECORD_SIZE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    PageRun,
    PageRuns,
    read_page_runs,
    sort_index_records,
    write_page_records,
)
from pyvmm.ram import PAGE_SIZE, PageBitmap, RamBlock

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAME = "mach-virt.ram"
ZERO_PAGE = bytes(PAGE_SIZE)


# -- the reference: one record at a time -----------------------------------------------------------


def reference_encode(
    name: str,
    ram: bytes,
    pages: list[int],
    *,
    first_has_idstr: bool,
    detect_zero: bool,
    file_offset: int,
) -> tuple[bytes, list[PageRun]]:
    """The records for ``pages`` of ``ram`` and the runs of their layout, page by page."""
    out = bytearray()
    runs: list[PageRun] = []
    for i, page in enumerate(pages):
        data = ram[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
        zero = detect_zero and data == ZERO_PAGE
        first = i == 0 and first_has_idstr
        flags = (RAM_SAVE_FLAG_ZERO if zero else RAM_SAVE_FLAG_PAGE) | (
            0 if first else RAM_SAVE_FLAG_CONTINUE
        )
        out += struct.pack(">Q", page * PAGE_SIZE | flags)
        if first:
            out += bytes([len(name.encode())]) + name.encode()
        data_offset = 0
        if zero:
            out += b"\x00"  # fill byte
        else:
            data_offset = file_offset + len(out)
            out += data
        last = runs[-1] if runs else None
        if last and last.zero == zero and last.first_page + last.npages == page:
            runs[-1] = last._replace(npages=last.npages + 1)
        else:
            runs.append(PageRun(page, 1, data_offset, zero))
    return bytes(out), runs


def reference_decode(
    stream: bytes, name: str, ram: bytearray, current: str | None = None
) -> list[int]:
    """Apply every record of ``stream`` to ``ram``; the pages touched, in stream order.

    ``current`` is the block a CONTINUE record refers to before any record names one.
    """
    pos, block, loaded = 0, current, []
    while pos < len(stream):
        (word,) = struct.unpack_from(">Q", stream, pos)
        pos += 8
        offset, flags = word & ~(PAGE_SIZE - 1), word & (PAGE_SIZE - 1)
        if not flags & RAM_SAVE_FLAG_CONTINUE:
            length = stream[pos]
            block = stream[pos + 1 : pos + 1 + length].decode()
            pos += 1 + length
        assert block == name, f"record at {pos} for block {block!r}"
        if flags & RAM_SAVE_FLAG_ZERO:
            ram[offset : offset + PAGE_SIZE] = bytes([stream[pos]]) * PAGE_SIZE
            pos += 1
        elif flags & RAM_SAVE_FLAG_PAGE:
            assert pos + PAGE_SIZE <= len(stream), "truncated page"
            ram[offset : offset + PAGE_SIZE] = stream[pos : pos + PAGE_SIZE]
            pos += PAGE_SIZE
        else:
            raise AssertionError(f"record flags 0x{flags:x}")
        loaded.append(offset // PAGE_SIZE)
    return loaded


# -- strategies and helpers ------------------------------------------------------------------------

KINDS = ["zero", "first", "last", "one", "random"]
# short segments break runs; long ones cross a 512-page batch of the C writer and reader
LENGTHS = st.one_of(st.integers(1, 6), st.integers(1, 40), st.integers(500, 1100))


def fill_page(kind: str, rng: random.Random) -> bytes:
    if kind == "zero":
        return ZERO_PAGE
    if kind == "random":
        return rng.randbytes(PAGE_SIZE)
    position = {"first": 0, "last": PAGE_SIZE - 1}.get(kind, rng.randrange(PAGE_SIZE))
    page = bytearray(PAGE_SIZE)
    page[position] = rng.randrange(1, 256)
    return bytes(page)


@st.composite
def ram_and_pages(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Guest RAM contents (runs of page kinds) and a page selection (runs broken by gaps)."""
    segments = draw(st.lists(st.tuples(st.sampled_from(KINDS), LENGTHS), min_size=1, max_size=6))
    rng = random.Random(draw(st.integers(0, 2**32)))
    ram = b"".join(fill_page(kind, rng) for kind, length in segments for _ in range(length))
    npages = len(ram) // PAGE_SIZE
    pages: list[int] = []
    pos, selected = 0, draw(st.booleans())
    while pos < npages:
        length = draw(LENGTHS, label="selection segment")
        if selected:
            pages.extend(range(pos, min(pos + length, npages)))
        pos += length
        selected = not selected
    return ram, pages


def make_block(ram: bytes) -> RamBlock:
    block = RamBlock(NAME, len(ram), 0)
    block.write(0, ram)
    return block


@contextmanager
def scratch_file() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        yield f.fileno()


def file_bytes(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def written(fd: int, block: RamBlock, pages: list[int], offset: int = 0) -> list[PageRun]:
    """Write ``pages`` of ``block`` at ``offset`` (first record with idstr); the runs."""
    bitmap = PageBitmap.from_pages(block.page_count, pages)
    return list(write_page_records(fd, offset, block, bitmap, first_has_idstr=True).runs)


# -- round trips against the reference -------------------------------------------------------------


@FAST
@given(
    content=ram_and_pages(),
    first_has_idstr=st.booleans(),
    detect_zero=st.booleans(),
    file_offset=st.integers(0, 9000),
)
def test_write_matches_reference_and_reads_back(
    content: tuple[bytes, list[int]], first_has_idstr: bool, detect_zero: bool, file_offset: int
) -> None:
    ram, pages = content
    note(f"{len(ram) // PAGE_SIZE} pages, {len(pages)} selected, offset {file_offset}")
    expected, expected_runs = reference_encode(
        NAME, ram, pages, first_has_idstr=first_has_idstr, detect_zero=detect_zero,
        file_offset=file_offset,
    )
    with make_block(ram) as block, scratch_file() as fd:
        prefix = random.Random(file_offset).randbytes(file_offset)
        os.pwrite(fd, prefix, 0)
        bitmap = PageBitmap.from_pages(block.page_count, pages)
        result = write_page_records(
            fd, file_offset, block, bitmap, first_has_idstr=first_has_idstr,
            detect_zero=detect_zero,
        )
        data = file_bytes(fd)
        assert data[:file_offset] == prefix
        assert data[file_offset:] == expected
        assert result.bytes_written == len(expected)
        assert result.runs == expected_runs
        assert list(result.runs) == expected_runs
        assert result.runs.tuples() == [tuple(run) for run in expected_runs]
        # the same runs as the container's page index records, built in C: the bytes the
        # format declaration gives them
        block_runs = [IndexedRun(3, *run) for run in expected_runs]
        assert result.runs.index_records(3) == encode_page_index(0, block_runs)[12:-4]
        assert IndexRecords(result.runs.index_records(3)) == block_runs
        zero_pages = sum(run.npages for run in expected_runs if run.zero)
        assert (result.data_pages, result.zero_pages) == (len(pages) - zero_pages, zero_pages)
        assert bitmap == PageBitmap.from_pages(block.page_count, pages)  # left as it was

        # the reference decoder agrees that the records hold exactly the selected pages
        decoded = bytearray(len(ram))
        current = None if first_has_idstr else NAME
        assert reference_decode(data[file_offset:], NAME, decoded, current) == pages
        for page in pages:
            span = slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE)
            assert decoded[span] == ram[span]

        # a data run's page k sits at data_offset + k * 4104, behind its own header
        for run in result.runs:
            if run.zero:
                continue
            for k in (0, run.npages - 1):
                page = run.first_page + k
                at = run.data_offset + k * PAGE_RECORD_SIZE
                assert data[at : at + PAGE_SIZE] == ram[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
                (header,) = struct.unpack_from(">Q", data, at - 8 if k else at)
                if k:
                    assert header == page * PAGE_SIZE | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE

        # read back over a block holding other bytes: selected pages come back, the rest stay
        rng = random.Random(len(pages))
        garbage = b"".join(
            fill_page(rng.choice(KINDS), rng) for _ in range(len(ram) // PAGE_SIZE)
        )
        want = bytearray(garbage)
        for page in pages:
            want[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = ram[
                page * PAGE_SIZE : (page + 1) * PAGE_SIZE
            ]
        with make_block(garbage) as target:
            read_page_runs(fd, target, result.runs)
            assert bytes(target.mem) == bytes(want)
        with RamBlock(NAME, len(ram), 0) as fresh:
            # plain tuples work as well as the writer's PageRuns
            plain = [(r.first_page, r.npages, r.data_offset, r.zero) for r in result.runs]
            read_page_runs(fd, fresh, plain)
            for page in pages:
                assert fresh.page(page) == ram[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]


def test_expected_bytes_spelled_out() -> None:
    """Three records: a ZERO with the idstr, a PAGE with CONTINUE, a ZERO with CONTINUE."""
    with RamBlock("pc.ram", 8 * PAGE_SIZE, 0) as block, scratch_file() as fd:
        block.write(3 * PAGE_SIZE + PAGE_SIZE - 1, b"\x5a")
        runs = written(fd, block, [2, 3, 4])
        assert file_bytes(fd) == (
            bytes.fromhex("0000000000002002")  # page 2 | ZERO, no CONTINUE
            + b"\x06pc.ram"  # u8 len, idstr
            + b"\x00"  # fill byte
            + bytes.fromhex("0000000000003028")  # page 3 | PAGE | CONTINUE
            + bytes(PAGE_SIZE - 1) + b"\x5a"  # the page
            + bytes.fromhex("0000000000004022")  # page 4 | ZERO | CONTINUE
            + b"\x00"
        )
        assert runs == [(2, 1, 0, True, False), (3, 1, 24, False, False), (4, 1, 0, True, False)]


def test_empty_selection_writes_nothing() -> None:
    with RamBlock(NAME, 4 * PAGE_SIZE, 0) as block, scratch_file() as fd:
        result = write_page_records(fd, 0, block, block.new_bitmap(), first_has_idstr=True)
        assert (result.bytes_written, result.data_pages, result.zero_pages) == (0, 0, 0)
        assert list(result.runs) == [] and file_bytes(fd) == b""
        read_page_runs(fd, block, result.runs)


def test_long_zero_run_crosses_header_batches() -> None:
    """20000 ZERO records overflow the C writer's 64 KiB header scratch several times."""
    npages = 20000
    with RamBlock(NAME, npages * PAGE_SIZE, 0) as block, scratch_file() as fd:
        block.write(12345 * PAGE_SIZE, b"\x01")
        bitmap = block.new_bitmap()
        bitmap.set_all()
        result = write_page_records(fd, 7, block, bitmap, first_has_idstr=False)
        expected, runs = reference_encode(
            NAME, bytes(block.mem), list(range(npages)), first_has_idstr=False,
            detect_zero=True, file_offset=7,
        )
        assert file_bytes(fd)[7:] == expected and result.runs == runs
        assert len(runs) == 3


def test_zero_run_leaves_untouched_pages_unallocated() -> None:
    """Clearing a zero run must not allocate host memory for pages that are already zero."""
    npages = 1024  # 4 MiB: two transparent huge pages if the kernel makes them
    with RamBlock(NAME, npages * PAGE_SIZE, 0) as source, scratch_file() as fd:
        bitmap = source.new_bitmap()
        bitmap.set_all()
        runs = write_page_records(fd, 0, source, bitmap, first_has_idstr=True).runs
        assert list(runs) == [(0, npages, 0, True, False)]
        with RamBlock(NAME, npages * PAGE_SIZE, 0) as target:
            target.write(5 * PAGE_SIZE, b"\x01")  # one page that must be cleared
            read_page_runs(fd, target, runs)
            assert target.is_zero_page(5)
            assert anonymous_kib(target) <= 2048  # page 5 (maybe as one huge page), no more


def anonymous_kib(block: RamBlock) -> int:
    """The ``Anonymous:`` host memory of the block's mapping, from /proc/self/smaps."""
    start = f"{block.host_addr:x}-"
    with open("/proc/self/smaps") as smaps:
        text = smaps.read()
    entry = text[text.index(start) :]
    match = re.search(r"^Anonymous:\s+(\d+) kB", entry, re.MULTILINE)
    assert match
    return int(match.group(1))


# -- bad input -------------------------------------------------------------------------------------


def data_block(npages: int = 40, seed: int = 0) -> RamBlock:
    """A block of ``npages`` pages of random bytes."""
    rng = random.Random(seed)
    return make_block(b"".join(rng.randbytes(PAGE_SIZE) for _ in range(npages)))


@FAST
@given(cut=st.integers(0, 30 * PAGE_RECORD_SIZE))
def test_negative_truncated_file_loads_nothing(cut: int) -> None:
    with data_block() as block, scratch_file() as fd:
        runs = written(fd, block, list(range(3, 33)))
        size = os.fstat(fd).st_size
        os.ftruncate(fd, min(cut, size - 1))
        with RamBlock(NAME, block.size, 0) as target:
            with pytest.raises(FormatError, match="past the end of the file") as info:
                read_page_runs(fd, target, runs)
            assert info.value.offset == runs[0].data_offset
            assert target.zero_pages().count() == target.page_count  # nothing written


def test_negative_file_shorter_than_its_size() -> None:
    """A short read (the file ends before its reported size) is a StreamError with the offset."""
    fd = os.open("/sys/kernel/mm/transparent_hugepage/enabled", os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < PAGE_SIZE:
            pytest.skip("sysfs reports no size")
        length = len(os.pread(fd, PAGE_SIZE, 0))
        with RamBlock(NAME, 4 * PAGE_SIZE, 0) as target:
            with pytest.raises(StreamError, match="ends inside the run") as info:
                read_page_runs(fd, target, [(1, 1, 0, False)])
            assert info.value.offset == length
    finally:
        os.close(fd)


@FAST
@given(data=st.data())
def test_negative_altered_header(data: st.DataObject) -> None:
    """Any byte changed in a non-first page header of a run is found, with its offset."""
    with data_block() as block, scratch_file() as fd:
        runs = written(fd, block, list(range(1)) + list(range(2, 40)))
        assert [run.npages for run in runs] == [1, 38]
        run = runs[1]
        k = data.draw(st.integers(1, run.npages - 1), label="page in run")
        byte = data.draw(st.integers(0, 7), label="header byte")
        bit = data.draw(st.integers(0, 7), label="bit")
        at = run.data_offset + k * PAGE_RECORD_SIZE - 8 + byte
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ (1 << bit)]), at)
        with RamBlock(NAME, block.size, 0) as target:
            with pytest.raises(FormatError, match=f"header of page {run.first_page + k} ") as info:
                read_page_runs(fd, target, runs)
            assert info.value.offset == at - byte


def test_negative_header_of_other_kind_or_block_position() -> None:
    """Headers that are well-formed records, just not the ones the run promises."""
    with data_block() as block, scratch_file() as fd:
        runs = written(fd, block, list(range(10)))
        header_at = runs[0].data_offset + 3 * PAGE_RECORD_SIZE - 8
        for bad in (
            3 * PAGE_SIZE | RAM_SAVE_FLAG_PAGE,  # no CONTINUE
            3 * PAGE_SIZE | RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE,
            4 * PAGE_SIZE | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE,  # another page
        ):
            os.pwrite(fd, struct.pack(">Q", bad), header_at)
            with RamBlock(NAME, block.size, 0) as target, pytest.raises(FormatError):
                read_page_runs(fd, target, runs)


OUT_OF_RANGE_RUNS = [
    [(40, 1, 0, True)],  # first page past the block
    [(39, 2, 0, False)],  # last page past the block
    [(0, 0, 0, False)],  # an empty run: no writer makes one
    [(1, 2**64 - 1, 0, True)],  # first + npages wraps around 2**64
    [(0, 1, 2**64 - 100, False)],  # data offset + length wraps around
    [(0, 1, 10**9, False)],  # past the end of the file
    [(0, 2, 0, False), (5, 1, 0, True), (7, 40, 0, True)],  # good runs, then a bad one
]


@pytest.mark.parametrize("runs", OUT_OF_RANGE_RUNS)
def test_negative_runs_outside_block_or_file(runs: list[tuple[int, int, int, bool]]) -> None:
    with data_block() as block, scratch_file() as fd:
        written(fd, block, list(range(40)))
        with data_block(seed=1) as target:  # other bytes, none zero: every run would change them
            before = bytes(target.mem)
            with pytest.raises(FormatError):
                read_page_runs(fd, target, runs)
            assert bytes(target.mem) == before


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**40), st.integers(1, 2**32 - 1),
                          st.booleans()), max_size=50, unique_by=lambda t: t[:2]))
def test_sort_index_records_puts_runs_in_ram_order(runs: list[tuple[int, int, int, bool]]
                                                  ) -> None:
    page_runs = [IndexedRun(block, first, npages, 0 if zero else 4096 + first, zero)
                 for block, first, npages, zero in runs]
    records = encode_page_index(0, page_runs)[12:-4]
    assert list(IndexRecords(sort_index_records(records))) == sorted(page_runs)
    with pytest.raises(ValueError, match="24 bytes each"):
        sort_index_records(records + b"\0")


@pytest.mark.parametrize("block, run", [(1 << 16, (0, 1, 0, False)), (0, (0, 1 << 32, 0, True))])
def test_negative_runs_that_no_index_record_holds(block: int, run: tuple[int, int, int, bool]
                                                  ) -> None:
    with pytest.raises(ValueError, match="do not fit page index records"):
        PageRuns([(0, 1, 0, False), run]).index_records(block)


@pytest.mark.parametrize("run", [(-1, 1, 0, False), (0, 1, 2**64, False), (0, 1.5, 0, False)])
def test_negative_impossible_run_values(run: tuple[int, int, int, bool]) -> None:
    with pytest.raises(FormatError, match="impossible"):
        PageRuns([run])


def test_negative_write_to_full_filesystem(tmp_path: os.PathLike[str]) -> None:
    mount = os.path.join(tmp_path, "small")
    os.mkdir(mount)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", mount], capture_output=True, check=False
    ).returncode:
        pytest.fail("cannot mount a small tmpfs (the test needs root, as CI has)")
    try:
        with data_block(600) as block:  # 2.4 MiB of non-zero pages into 1 MiB
            bitmap = block.new_bitmap()
            bitmap.set_all()
            fd = os.open(os.path.join(mount, "chpt"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"QEVM")
                with pytest.raises(StreamError, match="No space left on device") as info:
                    write_page_records(fd, 4, block, bitmap, first_has_idstr=True)
                err = info.value
                assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
                assert err.offset is not None
                assert 4 < err.offset <= (1 << 20) and err.offset == os.fstat(fd).st_size
            finally:
                os.close(fd)
    finally:
        subprocess.run(["umount", mount], check=True)


def test_negative_bad_fds() -> None:
    with RamBlock(NAME, 4 * PAGE_SIZE, 0) as block:
        block.write(0, b"\x01")
        bitmap = block.new_bitmap()
        bitmap.set_all()
        read_fd, write_fd = os.pipe()
        try:
            with pytest.raises(StreamError, match="Illegal seek") as info:
                write_page_records(write_fd, 0, block, bitmap, first_has_idstr=True)
            assert info.value.offset == 0
        finally:
            os.close(read_fd)
            os.close(write_fd)
        with pytest.raises(StreamError, match="Bad file descriptor"):
            write_page_records(write_fd, 0, block, bitmap, first_has_idstr=True)
        with pytest.raises(StreamError, match="Bad file descriptor"):
            read_page_runs(write_fd, block, [(0, 1, 0, False)])
        with tempfile.NamedTemporaryFile() as f:
            f.write(bytes(2 * PAGE_SIZE))
            f.flush()
            fd = os.open(f.name, os.O_WRONLY)
            try:
                with pytest.raises(StreamError, match="Bad file descriptor"):
                    read_page_runs(fd, block, [(0, 1, 0, False)])
            finally:
                os.close(fd)


def test_bitmap_of_another_size_is_refused() -> None:
    with RamBlock(NAME, 4 * PAGE_SIZE, 0) as block, pytest.raises(ValueError):
        write_page_records(0, 0, block, PageBitmap(5), first_has_idstr=True)
