"""Properties of pyvmm.ram: PageBitmap against a set of pages, RamBlock zero pages against bytes."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pyvmm.errors import ConfigError, GuestMemoryError
from pyvmm.ram import PAGE_SHIFT, PAGE_SIZE, PageBitmap, RamBlock

# sizes around word boundaries, where off-by-one errors in the C word loops live
NPAGES = st.sampled_from([1, 2, 63, 64, 65, 127, 128, 129, 200, 320])

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def model_runs(pages: set[int], start: int, end: int) -> list[tuple[int, int]]:
    """Maximal runs of consecutive pages of ``pages`` inside ``start..end-1``, the slow way."""
    runs: list[tuple[int, int]] = []
    for page in sorted(p for p in pages if start <= p < end):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def check_against_model(
    bitmap: PageBitmap, model: set[int], data: st.DataObject | None = None
) -> None:
    """Every query of ``bitmap`` answers as the same query on the set ``model`` would."""
    n = bitmap.npages
    assert len(bitmap) == n
    assert bitmap.count() == len(model)
    assert list(bitmap) == sorted(model)
    assert bitmap.any() == bool(model)
    assert list(bitmap.runs()) == model_runs(model, 0, n)
    assert PageBitmap.from_pages(n, model) == bitmap
    assert PageBitmap.from_bytes(n, bitmap.to_bytes()) == bitmap
    assert set(bitmap.complement()) == set(range(n)) - model
    if data is None:
        return
    start = data.draw(st.integers(0, n), label="start")
    end = data.draw(st.integers(start, n), label="end")
    max_run = data.draw(st.integers(1, 70), label="max_run")
    in_range = {p for p in model if start <= p < end}
    assert bitmap.count(start, end) == len(in_range)
    assert bitmap.find_next_set(start) == min((p for p in model if p >= start), default=n)
    first_clear = min((p for p in range(start, n) if p not in model), default=n)
    assert bitmap.find_next_clear(start) == first_clear
    maximal = list(bitmap.runs(start, end))
    assert maximal == model_runs(model, start, end)
    pieces = list(bitmap.runs(start, end, max_run=max_run))
    assert all(1 <= count <= max_run for _, count in pieces)
    assert [p for first, count in pieces for p in range(first, first + count)] == sorted(in_range)
    # cutting runs must not merge or reorder: every piece lies inside one maximal run
    assert all(
        any(f <= first and first + count <= f + c for f, c in maximal) for first, count in pieces
    )


class BitmapMachine(RuleBasedStateMachine):
    """A PageBitmap and a set[int] driven by the same operations must always agree."""

    def __init__(self) -> None:
        super().__init__()
        self.bitmap = PageBitmap(1)
        self.model: set[int] = set()

    @initialize(npages=NPAGES)
    def make(self, npages: int) -> None:
        note(f"bitmap = PageBitmap({npages})")
        self.bitmap = PageBitmap(npages)

    def page(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, self.bitmap.npages - 1), label="page")

    def span(self, data: st.DataObject) -> tuple[int, int]:
        start = data.draw(st.integers(0, self.bitmap.npages), label="start")
        return start, data.draw(st.integers(0, self.bitmap.npages - start), label="count")

    @rule(data=st.data())
    def set(self, data: st.DataObject) -> None:
        page = self.page(data)
        note(f"bitmap.set({page})")
        self.bitmap.set(page)
        self.model.add(page)

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        page = self.page(data)
        note(f"bitmap.clear({page})")
        self.bitmap.clear(page)
        self.model.discard(page)

    @rule(data=st.data())
    def test_and_set(self, data: st.DataObject) -> None:
        page = self.page(data)
        note(f"bitmap.test_and_set({page})")
        assert self.bitmap.test_and_set(page) == (page in self.model)
        self.model.add(page)

    @rule(data=st.data())
    def test_and_clear(self, data: st.DataObject) -> None:
        page = self.page(data)
        note(f"bitmap.test_and_clear({page})")
        assert self.bitmap.test_and_clear(page) == (page in self.model)
        self.model.discard(page)

    @rule(data=st.data())
    def set_range(self, data: st.DataObject) -> None:
        start, count = self.span(data)
        note(f"bitmap.set_range({start}, {count})")
        self.bitmap.set_range(start, count)
        self.model |= set(range(start, start + count))

    @rule(data=st.data())
    def clear_range(self, data: st.DataObject) -> None:
        start, count = self.span(data)
        note(f"bitmap.clear_range({start}, {count})")
        self.bitmap.clear_range(start, count)
        self.model -= set(range(start, start + count))

    @precondition(lambda self: len(self.model) % 5 == 0)  # rarely, or everything is all-set
    @rule()
    def set_all(self) -> None:
        note("bitmap.set_all()")
        self.bitmap.set_all()
        self.model = set(range(self.bitmap.npages))

    @rule()
    def clear_all(self) -> None:
        note("bitmap.clear_all()")
        self.bitmap.clear_all()
        self.model = set()

    @rule(data=st.data(), op=st.sampled_from(["|=", "&=", "-="]))
    def combine(self, data: st.DataObject, op: str) -> None:
        n = self.bitmap.npages
        other = data.draw(st.sets(st.integers(0, n - 1)), label="other")
        note(f"bitmap {op} PageBitmap.from_pages({n}, {sorted(other)})")
        before = self.bitmap
        if op == "|=":
            self.bitmap |= PageBitmap.from_pages(n, other)
            self.model |= other
        elif op == "&=":
            self.bitmap &= PageBitmap.from_pages(n, other)
            self.model &= other
        else:
            self.bitmap -= PageBitmap.from_pages(n, other)
            self.model -= other
        assert self.bitmap is before  # in place

    @rule(data=st.data())
    def queries(self, data: st.DataObject) -> None:
        check_against_model(self.bitmap, self.model, data)

    @invariant()
    def agrees(self) -> None:
        assert self.bitmap.count() == len(self.model)
        assert list(self.bitmap) == sorted(self.model)


TestBitmapMachine = BitmapMachine.TestCase
TestBitmapMachine.settings = settings(
    max_examples=80,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(npages=NPAGES, data=st.data())
def test_bitmap_from_pages_matches_model(npages: int, data: st.DataObject) -> None:
    pages = data.draw(st.sets(st.integers(0, npages - 1)))
    bitmap = PageBitmap.from_pages(npages, pages)
    check_against_model(bitmap, pages, data)
    copy = bitmap.copy()
    assert copy == bitmap and copy is not bitmap
    copy.set_all()
    assert bitmap.count() == len(pages)  # the copy is independent
    assert (bitmap | copy) == copy and (bitmap & copy) == bitmap and not (bitmap - copy).any()


@FAST
@given(npages=NPAGES, data=st.data())
def test_bitmap_out_of_range(npages: int, data: st.DataObject) -> None:
    bitmap = PageBitmap(npages)
    bad = data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=npages)))
    for call in (bitmap.set, bitmap.clear, bitmap.test, bitmap.test_and_set, bitmap.test_and_clear):
        with pytest.raises(IndexError):
            call(bad)
    assert bad not in bitmap
    with pytest.raises(IndexError):
        bitmap.set_range(max(bad, 0), npages + 1 - max(bad, 0))
    with pytest.raises(IndexError):
        bitmap.clear_range(0, -1)
    if bad > npages or bad < 0:  # npages itself is a legal start for find_next_*
        with pytest.raises(IndexError):
            bitmap.find_next_set(bad)
        with pytest.raises(IndexError):
            bitmap.find_next_clear(bad)
    with pytest.raises(IndexError):
        bitmap.count(0, npages + 1)
    with pytest.raises(ValueError):
        bitmap |= PageBitmap(npages + 1)
    assert not bitmap.any()


def test_bitmap_edges() -> None:
    empty = PageBitmap(0)
    assert len(empty) == 0 and empty.count() == 0 and list(empty.runs()) == []
    assert empty.find_next_set(0) == 0 and empty.find_next_clear(0) == 0
    full = PageBitmap(130)
    full.set_all()
    assert full.find_next_clear(0) == 130  # tail bits past npages must not count as clear
    assert list(full.runs(max_run=64)) == [(0, 64), (64, 64), (128, 2)]
    assert full.to_bytes()[-8:] == (3).to_bytes(8, sys.byteorder)  # 2 pages in the last word
    with pytest.raises(ValueError):
        PageBitmap.from_bytes(130, b"\xff" * 24)  # bits past page 129
    with pytest.raises(ValueError):
        list(full.runs(max_run=0))
    assert full.address % 8 == 0
    with pytest.raises(TypeError):
        hash(full)


def test_bitmap_concurrent_set_loses_nothing() -> None:
    """Two threads set interleaved bits of the same words; the C calls release the GIL, so a
    non-atomic read-modify-write would lose some."""
    npages = 64 * 64
    bitmap = PageBitmap(npages)

    def setter(parity: int) -> None:
        for page in range(parity, npages, 2):
            bitmap.set(page)

    threads = [threading.Thread(target=setter, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bitmap.count() == npages


# -- RAM blocks ------------------------------------------------------------------------------

# (page, where in the page, value): offsets 0 and PAGE_SIZE-1 are the early-exit and the last byte
WRITES = st.lists(
    st.tuples(
        st.integers(0, 1 << 20),
        st.one_of(st.just(0), st.just(PAGE_SIZE - 1), st.integers(0, PAGE_SIZE - 1)),
        st.integers(0, 255),
    ),
    max_size=30,
)


@FAST
@given(npages=st.sampled_from([1, 3, 64, 65, 130]), writes=WRITES, data=st.data())
def test_zero_pages_match_bytes_model(
    npages: int, writes: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    with RamBlock("test.ram", npages * PAGE_SIZE, 0x4000_0000) as block:
        model = bytearray(block.size)
        assert block.resident_pages().count() == 0
        for page, offset, value in writes:
            where = (page % npages) * PAGE_SIZE + offset
            note(f"block.write(0x{where:x}, {value})")
            block.write(where, bytes([value]))
            model[where] = value
        expected_zero = {
            p for p in range(npages) if not any(model[p * PAGE_SIZE : (p + 1) * PAGE_SIZE])
        }
        assert block.mem.tobytes() == bytes(model)
        assert set(block.zero_pages()) == expected_zero
        assert set(block.nonzero_pages()) == set(range(npages)) - expected_zero
        assert {p for p in range(npages) if block.is_zero_page(p)} == expected_zero
        selection = data.draw(st.sets(st.integers(0, npages - 1)), label="selection")
        chosen = PageBitmap.from_pages(npages, selection)
        assert set(block.zero_pages(chosen)) == selection & expected_zero
        # every written page is populated (a zero byte written still populates it)
        written = {(page % npages) for page, _, _ in writes}
        assert written <= set(block.populated_pages())
        assert written <= set(block.resident_pages())


def test_zero_scan_does_not_touch_untouched_pages() -> None:
    # 8 MiB: several transparent huge pages, most of them never touched
    npages = (8 << 20) // PAGE_SIZE
    with RamBlock("big.ram", npages * PAGE_SIZE, 0) as block:
        for page in (5, 700, npages - 1):
            block.mem[page * PAGE_SIZE + PAGE_SIZE - 1] = 0xAA
        resident_before = block.resident_pages()
        assert {5, 700, npages - 1} <= set(resident_before)
        assert resident_before.count() < npages  # some pages were never touched
        assert list(block.nonzero_pages()) == [5, 700, npages - 1]
        assert block.resident_pages() == resident_before  # the scan faulted nothing in


def test_four_gib_block_is_instant_and_scans_fast() -> None:
    started = time.perf_counter()
    block = RamBlock("mach-virt.ram", 4 << 30, 0x4000_0000)
    created = time.perf_counter() - started
    try:
        # generous bound: eager touching of 4 GiB would take seconds, not this
        assert created < 1.0, f"creating a 4 GiB block took {created:.3f} s"
        assert block.page_count == 1 << 20 and block.host_addr % (2 << 20) == 0
        pages = [0, 123_456, block.page_count - 1]
        for page in pages:
            block.write(page * PAGE_SIZE + 17, b"\x01")
        assert list(block.nonzero_pages()) == pages
        end = 0x4000_0000 + (4 << 30)
        assert block.contains(end - 1) and not block.contains(end)
        assert not block.contains(end - 1, 2)
    finally:
        block.close()


def test_negative_bad_block_config() -> None:
    for size in (0, -PAGE_SIZE, PAGE_SIZE - 1, PAGE_SIZE + 1, 3 * PAGE_SIZE // 2):
        with pytest.raises(ConfigError, match="size"):
            RamBlock("mach-virt.ram", size, 0)
    for gpa in (1, PAGE_SIZE - 1, -PAGE_SIZE):
        with pytest.raises(ConfigError, match="address"):
            RamBlock("mach-virt.ram", PAGE_SIZE, gpa)
    for name in ("", "x" * 256):
        with pytest.raises(ConfigError, match="name"):
            RamBlock(name, PAGE_SIZE, 0)


@FAST
@given(
    npages=st.integers(1, 4),
    offset=st.integers(-(1 << 14), 1 << 15),
    length=st.integers(0, 1 << 14),
)
def test_negative_out_of_bounds_access(npages: int, offset: int, length: int) -> None:
    with RamBlock("mach-virt.ram", npages * PAGE_SIZE, 1 << PAGE_SHIFT) as block:
        inside = offset >= 0 and offset + length <= block.size
        data = b"\x5a" * length
        if inside:
            block.write(offset, data)
            assert block.read(offset, length) == data
        else:
            with pytest.raises(GuestMemoryError, match="mach-virt.ram"):
                block.write(offset, data)
            where = f"0x{offset:x}" if offset >= 0 else "mach-virt.ram"
            with pytest.raises(GuestMemoryError, match=where):
                block.read(offset, length)
            assert not any(block.mem)  # a refused write wrote nothing
        assert block.contains(block.gpa + offset, length) == inside
        with pytest.raises(IndexError):
            block.page(npages)
        with pytest.raises(IndexError):
            block.is_zero_page(-1)
        with pytest.raises(ValueError):
            block.zero_pages(PageBitmap(npages + 1))


def test_close_with_live_views() -> None:
    block = RamBlock("mach-virt.ram", 4 << 20, 0)
    page = block.page(3)
    mem_slice = block.mem[10:20]
    page[0] = 7
    assert block.read(3 * PAGE_SIZE, 1) == b"\x07"
    block.close()
    block.close()  # idempotent
    assert block.closed
    # views that outlive the block stay memory-safe: the pages were discarded and read as zero
    assert page[0] == 0 and not any(mem_slice)
    page[1] = 1
    assert page[1] == 1
    for call in (lambda: block.mem, lambda: block.read(0, 1), lambda: block.write(0, b"x"),
                 block.nonzero_pages, block.resident_pages):
        with pytest.raises(GuestMemoryError, match="closed"):
            call()
    del page, mem_slice
    with RamBlock("other.ram", PAGE_SIZE, 0) as other:
        other.write(0, memoryview(bytes(range(8))).cast("Q"))  # any contiguous buffer
        assert other.read(0, 8) == bytes(range(8))
    assert other.closed
