"""Properties of pyvmm.migration.cow: the fork child writes RAM as it was at the fork.

The reference is pageio.write_page_records run on a copy of the original RAM taken before the
fork; the child's file must hold exactly those bytes followed by the tail, with the same runs,
although the parent overwrites every page as soon as the fork returns. Then the failures: a
child whose writes fail reports its errno, a killed child is reported with the signal's name.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pyvmm.migration.cow import (
    CHILD_DELAY_ENV,
    CowError,
    CowJob,
    CowResult,
    start_cow_snapshot,
)
from pyvmm.migration.pageio import write_page_records
from pyvmm.ram import PAGE_SIZE, PageBitmap, RamBlock

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def tmpfd() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        yield f.fileno()


def _new_fd() -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    return fd


def _fill(block: RamBlock, rng: random.Random) -> None:
    """Random pages: zero, random bytes, or mostly zero with one byte set at the end."""
    for page in range(block.page_count):
        kind = rng.randrange(3)
        if kind == 1:
            block.write(page * PAGE_SIZE, rng.randbytes(PAGE_SIZE))
        elif kind == 2:
            block.write(page * PAGE_SIZE + PAGE_SIZE - 1, b"\x01")


def _clone(block: RamBlock) -> RamBlock:
    copy = RamBlock(block.name, block.size, block.gpa)
    copy.write(0, block.mem)
    return copy


def _read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


def _reference(
    jobs: list[CowJob], file_offset: int, tail: bytes, detect_zero: bool = True
) -> tuple[bytes, list[list[tuple[int, int, int, bool]]]]:
    """The bytes and runs pageio writes for the same jobs (on copies of their blocks)."""
    fd = _new_fd()
    try:
        os.pwrite(fd, b"H" * file_offset, 0)
        offset = file_offset
        runs = []
        for block, pages, first_has_idstr in jobs:
            res = write_page_records(fd, offset, block, pages, first_has_idstr=first_has_idstr,
                                     detect_zero=detect_zero)
            offset += res.bytes_written
            runs.append([tuple(r) for r in res.runs])
        os.pwrite(fd, tail, offset)
        return _read_all(fd), runs  # type: ignore[return-value]
    finally:
        os.close(fd)


def _check_snapshot(
    blocks: list[RamBlock],
    selections: list[PageBitmap],
    idstr_flags: list[bool],
    tail: bytes,
    file_offset: int,
    child_delay: float,
    rng: random.Random,
    detect_zero: bool = True,
) -> CowResult:
    copies = [_clone(b) for b in blocks]
    want, want_runs = _reference(
        [(c, s, f) for c, s, f in zip(copies, selections, idstr_flags)], file_offset, tail,
        detect_zero)
    fd = _new_fd()
    try:
        os.pwrite(fd, b"H" * file_offset, 0)
        snap = start_cow_snapshot(fd, file_offset,
                                  [(b, s, f) for b, s, f in zip(blocks, selections, idstr_flags)],
                                  tail, detect_zero=detect_zero, child_delay=child_delay)
        # the guest runs on: every page changes, zero pages become data and back
        new_contents = []
        for block in blocks:
            data = rng.randbytes(block.size)
            for page in range(0, block.page_count, 3):
                data = data[:page * PAGE_SIZE] + bytes(PAGE_SIZE) + data[(page + 1) * PAGE_SIZE:]
            block.write(0, data)
            new_contents.append(data)
        result = snap.wait(timeout=30)
        got = _read_all(fd)
    finally:
        os.close(fd)
    assert got == want
    assert result.bytes_written == len(want) - file_offset
    assert [[tuple(r) for r in b.runs] for b in result.blocks] == want_runs
    assert result.data_pages + result.zero_pages == sum(s.count() for s in selections)
    assert result.blocks[0].runs == want_runs[0]  # PageRuns compares with plain sequences
    # the child only read: the parent's RAM holds what the parent wrote
    for block, data in zip(blocks, new_contents):
        assert bytes(block.mem) == data
    for c in copies:
        c.close()
    return result


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    tail=st.binary(max_size=300),
    file_offset=st.integers(0, 5000),
    detect_zero=st.booleans(),
)
def test_child_writes_ram_as_at_fork(
    seed: int, sizes: list[int], tail: bytes, file_offset: int, detect_zero: bool
) -> None:
    rng = random.Random(seed)
    blocks = [RamBlock(f"block{i}.ram", n * PAGE_SIZE, 0) for i, n in enumerate(sizes)]
    try:
        selections = []
        for block in blocks:
            _fill(block, rng)
            sel = block.new_bitmap()
            for page in range(block.page_count):
                if rng.random() < 0.6:
                    sel.set(page)
            selections.append(sel)
        flags = [rng.random() < 0.7 for _ in blocks]
        result = _check_snapshot(blocks, selections, flags, tail, file_offset, 0.0, rng,
                                 detect_zero)
        note(f"fork {result.fork_ms:.3f} ms, {result.data_pages} data pages, "
             f"{result.zero_pages} zero pages")
    finally:
        for block in blocks:
            block.close()


def test_parent_writes_before_child_reads() -> None:
    """With the child held back, every parent write surely lands before the child's reads."""
    rng = random.Random(7)
    with RamBlock("mach-virt.ram", 256 * PAGE_SIZE, 0x4000_0000) as block:
        _fill(block, rng)
        sel = block.new_bitmap()
        sel.set_all()
        _check_snapshot([block], [sel], [True], b"\x10" + b"tail" * 100, 123, 0.2, rng)


def test_no_pages_writes_only_the_tail(tmpfd: int) -> None:
    with RamBlock("ram", 4 * PAGE_SIZE, 0) as block:
        result = start_cow_snapshot(tmpfd, 3, [(block, block.new_bitmap(), True)], b"END").wait()
    assert result.bytes_written == 3 and result.data_pages == result.zero_pages == 0
    assert list(result.blocks[0].runs) == []
    assert os.pread(tmpfd, 10, 3) == b"END"


def test_negative_bad_fd_reports_errno() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with RamBlock("ram", 8 * PAGE_SIZE, 0) as block:
            block.write(0, b"x")
            sel = block.new_bitmap()
            sel.set_all()
            snap = start_cow_snapshot(fd, 0, [(block, sel, True)], b"tail")
            with pytest.raises(CowError) as info:
                snap.wait(timeout=30)
    finally:
        os.close(fd)
    err = info.value
    assert err.errno == errno.EBADF and err.signal is None
    assert err.stage == "block 'ram'"
    assert os.strerror(errno.EBADF) in str(err) and "errno 9" in str(err)
    with pytest.raises(CowError):  # the same outcome again
        snap.wait()


def test_negative_tail_write_failure_names_the_tail() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with RamBlock("ram", 8 * PAGE_SIZE, 0) as block:
            snap = start_cow_snapshot(fd, 0, [(block, block.new_bitmap(), True)], b"tail")
            with pytest.raises(CowError, match="tail") as info:
                snap.wait(timeout=30)
    finally:
        os.close(fd)
    assert info.value.errno == errno.EBADF and info.value.stage == "tail"


def test_negative_killed_child_is_reported(tmpfd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHILD_DELAY_ENV, "20000")  # the hook through the environment
    with RamBlock("ram", 8 * PAGE_SIZE, 0) as block:
        sel = block.new_bitmap()
        sel.set_all()
        snap = start_cow_snapshot(tmpfd, 0, [(block, sel, True)], b"tail")
        assert not snap.poll()
        os.kill(snap.pid, signal.SIGKILL)
        with pytest.raises(CowError, match="SIGKILL") as info:
            snap.wait(timeout=30)
    assert info.value.signal == signal.SIGKILL and info.value.errno is None
    assert snap.poll()


def test_wait_times_out_then_cancel(tmpfd: int) -> None:
    with RamBlock("ram", 8 * PAGE_SIZE, 0) as block:
        snap = start_cow_snapshot(tmpfd, 0, [(block, block.new_bitmap(), True)], b"t",
                                  child_delay=20.0)
        with pytest.raises(TimeoutError):
            snap.wait(timeout=0.05)
        snap.cancel()
        with pytest.raises(CowError, match="cancelled"):
            snap.wait()
    with pytest.raises(ChildProcessError):
        os.waitpid(snap.pid, os.WNOHANG)  # reaped: no zombie left


def test_negative_bitmap_of_another_block(tmpfd: int) -> None:
    with RamBlock("ram", 8 * PAGE_SIZE, 0) as block:
        with pytest.raises(ValueError, match="bitmap of 4 pages"):
            start_cow_snapshot(tmpfd, 0, [(block, PageBitmap(4), True)], b"")
