"""The ``hash`` dirty tracker (issue 16): pages whose bytes changed, against a plain model, and
page for page against the ``async`` and ``wp`` trackers on the same guest run.

The two kernel trackers report pages *written*, the hash tracker pages *changed*: they agree
exactly when every write changes its page (the workload's ``increment`` and ``sequential``
patterns), and the hash tracker's pages are always a subset of theirs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from pyvmm._native import ffi, lib

from pyvmm.boot import GuestSpec, boot
from pyvmm.guests.workload import WORKING_SET_OFFSET, WorkloadOptions
from pyvmm.machine import MAIN_RAM_NAME, RAM_BASE, Machine, StopReason
from pyvmm.migration.dirty import AsyncTracker, DirtyTracker, WpFaultTracker
from pyvmm.migration.hash_tracker import HashTracker
from pyvmm.ram import PAGE_SIZE, PageBitmap, RamBlock

GUEST_RAM = 16 << 20
# a page far above the workload's 4 MiB working set, for host and kernel writes
SPARE_GPA = RAM_BASE + (12 << 20)


def pages(changed: dict[str, PageBitmap]) -> dict[str, list[int]]:
    return {name: list(bitmap) for name, bitmap in changed.items()}


def write_by_kernel(view: memoryview, data: bytes) -> None:
    """Have the kernel write ``data`` into ``view`` (guest RAM), as a guest's read() does."""
    fd = os.memfd_create("hash-tracker-test")
    try:
        os.write(fd, data)
        assert os.preadv(fd, [view], 0) == len(data)
    finally:
        os.close(fd)


@contextmanager
def blocks(*npages: int) -> Iterator[list[RamBlock]]:
    made = [RamBlock(f"block{i}", n * PAGE_SIZE, i << 32) for i, n in enumerate(npages)]
    try:
        yield made
    finally:
        for block in made:
            block.close()


# -- host writes through the blocks' memoryviews ---------------------------------------------------

def test_changed_pages_are_reported_and_same_value_rewrites_are_not() -> None:
    with blocks(1000) as (block,):  # one full 2 MiB window and a short one
        block.mem[3 * PAGE_SIZE] = 7
        block.mem[600 * PAGE_SIZE:601 * PAGE_SIZE] = b"\xff" * PAGE_SIZE
        tracker: DirtyTracker = HashTracker([block])
        assert tracker.kind == "hash"
        block.mem[5 * PAGE_SIZE + 9] = 1                        # changed
        block.mem[3 * PAGE_SIZE] = 7                            # same value again: unchanged
        block.mem[600 * PAGE_SIZE:601 * PAGE_SIZE] = bytes(PAGE_SIZE)  # back to zero: changed
        block.mem[700 * PAGE_SIZE:701 * PAGE_SIZE] = bytes(PAGE_SIZE)  # zero over zero: unchanged
        block.mem[999 * PAGE_SIZE + PAGE_SIZE - 1] = 2          # the last byte of the block
        # one write across the window boundary (page 511 | page 512)
        block.mem[512 * PAGE_SIZE - 2:512 * PAGE_SIZE + 2] = b"abcd"
        assert pages(tracker.collect()) == {"block0": [5, 511, 512, 600, 999]}
        assert pages(tracker.collect()) == {"block0": []}
        block.mem[5 * PAGE_SIZE + 9] = 0  # undoing a change is a change
        block.mem[999 * PAGE_SIZE + PAGE_SIZE - 1] = 2
        assert pages(tracker.collect()) == {"block0": [5]}
        tracker.stop()


def test_a_change_undone_before_the_pause_is_no_change() -> None:
    with blocks(4) as (block,):
        tracker = HashTracker([block])
        block.mem[PAGE_SIZE] = 1
        block.mem[PAGE_SIZE] = 0
        assert pages(tracker.collect()) == {"block0": []}


def test_every_block_gets_its_own_bitmap() -> None:
    with blocks(3, 700, 1) as (small, large, single):
        tracker = HashTracker([small, large, single])
        large.mem[650 * PAGE_SIZE] = 1
        single.mem[0] = 1
        changed = tracker.collect()
        assert [bitmap.npages for bitmap in changed.values()] == [3, 700, 1]
        assert pages(changed) == {"block0": [], "block1": [650], "block2": [0]}


def test_kernel_writes_into_ram_are_seen() -> None:
    with blocks(16) as (block,):
        block.mem[2 * PAGE_SIZE:3 * PAGE_SIZE] = b"k" * PAGE_SIZE
        tracker = HashTracker([block])
        write_by_kernel(block.mem[2 * PAGE_SIZE:4 * PAGE_SIZE], b"k" * PAGE_SIZE + b"new")
        write_by_kernel(block.mem[9 * PAGE_SIZE:10 * PAGE_SIZE], b"x")
        assert pages(tracker.collect()) == {"block0": [3, 9]}


def test_a_page_the_kernel_dropped_is_a_change() -> None:
    """MADV_DONTNEED makes a page read as zero without any write: the hash tracker sees the
    change (the ``wp`` tracker does not, DESIGN.md section 5, which is why pyvmm zeroes pages
    by writing them)."""
    with blocks(8) as (block,):
        block.mem[3 * PAGE_SIZE] = 9
        block.mem[5 * PAGE_SIZE] = 0  # populated, but zero: dropping it changes nothing
        tracker = HashTracker([block])
        for page in (3, 5):
            assert lib.pyvmm_ram_discard(ffi.cast("void *", block.host_addr + page * PAGE_SIZE),
                                         PAGE_SIZE) == 0
        assert pages(tracker.collect()) == {"block0": [3]}


def test_stop_is_idempotent_and_ends_collecting() -> None:
    with blocks(4) as (block,):
        tracker = HashTracker([block])
        tracker.stop()
        tracker.stop()
        with pytest.raises(ValueError, match="stopped"):
            tracker.collect()


def test_negative_bad_arguments() -> None:
    with blocks(1, 1) as (first, second):
        second.name = first.name
        with pytest.raises(ValueError, match="names repeat"):
            HashTracker([first, second])
        with pytest.raises(ValueError, match="window_pages"):
            HashTracker([first], window_pages=0)


# -- the model: random host and kernel writes ------------------------------------------------------

class HashTrackerMachine(RuleBasedStateMachine):
    """Random writes to two small blocks; the model is a bytes copy of the RAM at the last
    collect, and the tracker must report exactly the pages whose bytes differ from it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[RamBlock] = []
        self.tracker: HashTracker | None = None
        self.at_last_collect: list[bytes] = []

    @initialize(window_pages=st.sampled_from([1, 2, 3, 4, 512]))
    def start(self, window_pages: int) -> None:
        note(f"blocks of 5 and 9 pages, window_pages={window_pages}")
        self.blocks = [RamBlock("small", 5 * PAGE_SIZE, 0), RamBlock("large", 9 * PAGE_SIZE, 1 << 32)]
        self.tracker = HashTracker(self.blocks, window_pages=window_pages)
        self.at_last_collect = [block.mem.tobytes() for block in self.blocks]

    def _span(self, data: st.DataObject, index: int) -> tuple[RamBlock, int]:
        block = self.blocks[index]
        return block, data.draw(st.integers(0, block.size - 1), label="offset")

    @rule(index=st.sampled_from([0, 1]), data=st.data(),
          payload=st.binary(min_size=1, max_size=2 * PAGE_SIZE + 10))
    def host_write(self, index: int, data: st.DataObject, payload: bytes) -> None:
        block, offset = self._span(data, index)
        payload = payload[:block.size - offset]
        note(f"host writes {len(payload)} bytes at {block.name}+{offset:#x}")
        block.mem[offset:offset + len(payload)] = payload

    @rule(index=st.sampled_from([0, 1]), data=st.data(),
          length=st.integers(1, 2 * PAGE_SIZE + 10))
    def rewrite_same_bytes(self, index: int, data: st.DataObject, length: int) -> None:
        block, offset = self._span(data, index)
        end = min(offset + length, block.size)
        note(f"host rewrites {block.name}+{offset:#x}..{end:#x} with the bytes it holds")
        block.mem[offset:end] = block.mem[offset:end].tobytes()

    @rule(index=st.sampled_from([0, 1]), data=st.data())
    def zero_page(self, index: int, data: st.DataObject) -> None:
        block = self.blocks[index]
        page = data.draw(st.integers(0, block.page_count - 1), label="page")
        note(f"host zeroes {block.name} page {page}")
        block.page(page)[:] = bytes(PAGE_SIZE)

    @rule(index=st.sampled_from([0, 1]), data=st.data(),
          payload=st.binary(min_size=1, max_size=PAGE_SIZE + 10))
    def kernel_write(self, index: int, data: st.DataObject, payload: bytes) -> None:
        block, offset = self._span(data, index)
        payload = payload[:block.size - offset]
        note(f"kernel writes {len(payload)} bytes at {block.name}+{offset:#x}")
        write_by_kernel(block.mem[offset:offset + len(payload)], payload)

    @rule()
    def collect(self) -> None:
        assert self.tracker is not None
        changed = self.tracker.collect()
        now = [block.mem.tobytes() for block in self.blocks]
        expected = {
            block.name: [page for page in range(block.page_count)
                         if before[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
                         != after[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]]
            for block, before, after in zip(self.blocks, self.at_last_collect, now)}
        note(f"collect: expect {expected}")
        assert pages(changed) == expected
        self.at_last_collect = now

    def teardown(self) -> None:
        if self.tracker is not None:
            self.tracker.stop()
        for block in self.blocks:
            block.close()


HashTrackerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestHashTrackerModel = HashTrackerMachine.TestCase


# -- the same guest run under two trackers -----------------------------------------------------------

def workload(pattern: str, report: int = 0) -> Machine:
    """A guest writing ``pattern`` over 4 MiB forever.  Its progress lines (every ``report``
    passes) push the same return addresses onto the same stack page each time: written, not
    changed, so the exact agreement tests turn them off."""
    options = WorkloadOptions.parse(
        f"pattern={pattern},working_set=4M,passes=0,touch=64,report={report}")
    return boot(GuestSpec(workload=options), ram_size=GUEST_RAM, seed=5, uart_sink=lambda _b: None)


def run_side_by_side(machine: Machine, make_kernel_tracker: Callable[[list[RamBlock]], DirtyTracker],
                     pauses: list[int]) -> list[tuple[dict[str, PageBitmap], dict[str, PageBitmap]]]:
    """Run the guest ``pauses[k]`` instructions at a time; at each pause, after a changing host
    write and a changing kernel write, collect the hash tracker and ``make_kernel_tracker``'s.
    Returns (hash, kernel) per pause."""
    blocks_ = machine.ram_blocks
    reference = HashTracker(blocks_)
    kernel = make_kernel_tracker(blocks_)
    seen = []
    try:
        for k, insns in enumerate(pauses):
            result = machine.run(max_insns=insns)
            assert result.reason is StopReason.INSN_LIMIT, result
            machine.write_memory(SPARE_GPA + k * PAGE_SIZE, b"host %d" % k)
            write_by_kernel(machine.memory_view(SPARE_GPA + (k + 64) * PAGE_SIZE, 16),
                            b"kernel %d" % k)
            seen.append((reference.collect(), kernel.collect()))
    finally:
        kernel.stop()
        reference.stop()
    return seen


def assert_subset(small: dict[str, PageBitmap], large: dict[str, PageBitmap]) -> None:
    assert small.keys() == large.keys()
    for name, changed in small.items():
        missed = changed - large[name]
        assert not missed.any(), f"{name}: pages changed but not reported written: {list(missed)}"


KERNEL_TRACKERS: dict[str, Callable[[list[RamBlock]], DirtyTracker]] = {
    "async": AsyncTracker, "wp": WpFaultTracker}


@pytest.mark.parametrize("pattern", ["increment", "sequential"])
@pytest.mark.parametrize("kind", ["async", "wp"])
def test_hash_agrees_page_for_page_when_every_write_changes_its_page(kind: str,
                                                                     pattern: str) -> None:
    # pauses mid-pass, at odd counts, and one long run over several passes
    pauses = [1, 2_000, 3_001, 40_000, 7, 150_000, 5_000]
    with workload(pattern) as machine:
        seen = run_side_by_side(machine, KERNEL_TRACKERS[kind], pauses)
    working_set = range(WORKING_SET_OFFSET // PAGE_SIZE, WORKING_SET_OFFSET // PAGE_SIZE + 1024)
    for k, (changed, written) in enumerate(seen):
        assert pages(changed) == pages(written), f"pause {k}"
        ram = changed[MAIN_RAM_NAME]
        # the host's and the kernel's page at every pause, and guest pages past the first
        assert {(SPARE_GPA - RAM_BASE) // PAGE_SIZE + k,
                (SPARE_GPA - RAM_BASE) // PAGE_SIZE + k + 64} <= set(ram)
        if k > 0:
            assert any(page in working_set for page in ram), f"pause {k}: no guest page"


@pytest.mark.parametrize("kind", ["async", "wp"])
def test_hash_is_a_subset_when_writes_repeat_bytes(kind: str) -> None:
    """A random pattern rewrites a page with its own bytes when a pass's second touch of it
    falls after a pause (and the progress lines rewrite the stack page); the host and the kernel
    do it too at every pause.  Such pages are reported by the kernel tracker, not by the hash
    tracker, and every page the hash tracker reports is reported by the kernel tracker."""
    with workload("random", report=1) as machine:
        blocks_ = machine.ram_blocks
        reference = HashTracker(blocks_)
        kernel = KERNEL_TRACKERS[kind](blocks_)
        host_page = (SPARE_GPA - RAM_BASE) // PAGE_SIZE
        machine.write_memory(SPARE_GPA, b"same bytes")
        machine.write_memory(SPARE_GPA + PAGE_SIZE, b"same kernel bytes")
        guest_rewrites = 0
        try:
            reference.collect(), kernel.collect()
            for insns in (5_000, 20_000, 60_000):
                machine.run(max_insns=insns)
                machine.write_memory(SPARE_GPA, b"same bytes")
                write_by_kernel(machine.memory_view(SPARE_GPA + PAGE_SIZE, 17),
                                b"same kernel bytes")
                changed, written = reference.collect(), kernel.collect()
                assert_subset(changed, written)
                unchanged = written[MAIN_RAM_NAME] - changed[MAIN_RAM_NAME]
                assert {host_page, host_page + 1} <= set(unchanged)
                assert changed[MAIN_RAM_NAME].count() > 0
                guest_rewrites += unchanged.count() - 2
        finally:
            kernel.stop()
            reference.stop()
    assert guest_rewrites > 0  # the run did have guest writes that changed nothing
