"""Properties of pyvmm.migration.postcopy_uffd: feature detection, the async dirty tracker against
the set of pages written (by Python, by the kernel, by a unicorn vCPU), and the live write-protect
session against RAM as it was at protect time, with a GIL-holding writer."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pyvmm.errors import UffdError
from pyvmm.migration.container_format import IndexRecords
from pyvmm.migration.pageio import sort_index_records
from pyvmm.migration.postcopy_uffd import (
    AsyncDirtyTracker,
    WriteProtectSession,
    WriteProtectStats,
)
from pyvmm.migration.uffd_syscalls import (
    INJECT_OPEN_ERRNO_ENV,
    UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_UNPOPULATED,
    Userfaultfd,
    kernel_features,
)
from pyvmm.ram import PAGE_SIZE, RamBlock

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
NPAGES = 600  # > 512: crosses a 2 MiB huge page boundary


@pytest.fixture
def block() -> Iterator[RamBlock]:
    with RamBlock("ram", NPAGES * PAGE_SIZE, 0) as ram:
        yield ram


def test_kernel_offers_what_checkpoints_need() -> None:
    features = kernel_features()
    assert features & UFFD_FEATURE_WP_ASYNC
    assert features & UFFD_FEATURE_WP_UNPOPULATED
    assert kernel_features(feature_mask=~UFFD_FEATURE_WP_ASYNC) & UFFD_FEATURE_WP_ASYNC == 0


def test_negative_masked_wp_async_names_incremental(block: RamBlock) -> None:
    with pytest.raises(UffdError) as info:
        AsyncDirtyTracker([block], feature_mask=~UFFD_FEATURE_WP_ASYNC)
    err = info.value
    assert (err.op, err.errno, err.capability) == ("UFFDIO_API", errno.EOPNOTSUPP, "incremental")
    assert "WP_ASYNC" in str(err) and "\n" not in str(err)


def test_negative_masked_wp_unpopulated_names_live(block: RamBlock) -> None:
    with pytest.raises(UffdError) as info:
        WriteProtectSession([block], feature_mask=~UFFD_FEATURE_WP_UNPOPULATED)
    assert info.value.capability == "live"
    assert "WP_UNPOPULATED" in str(info.value)


def test_negative_open_failure(block: RamBlock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_OPEN_ERRNO_ENV, str(errno.EPERM))
    with pytest.raises(UffdError) as info:
        Userfaultfd.open(0, capability="live")
    assert (info.value.op, info.value.errno, info.value.capability) == ("open", errno.EPERM, "live")
    with pytest.raises(UffdError):
        AsyncDirtyTracker([block])


def test_userfaultfd_wrapper_missing_mode_copy_and_zeropage(block: RamBlock) -> None:
    with Userfaultfd.open(0) as uffd:
        base = block.host_addr
        uffd.register(base, 4 * PAGE_SIZE, 1)  # MISSING
        src = ctypes.create_string_buffer(b"\x7f" * PAGE_SIZE, PAGE_SIZE)
        assert uffd.copy(base, ctypes.addressof(src), PAGE_SIZE) == PAGE_SIZE
        assert uffd.zeropage(base + PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
        uffd.wake(base, 2 * PAGE_SIZE)
        with pytest.raises(UffdError) as info:
            uffd.copy(base, ctypes.addressof(src), PAGE_SIZE)  # already populated
        assert info.value.op == "UFFDIO_COPY" and info.value.errno == errno.EEXIST
        uffd.unregister(base, 4 * PAGE_SIZE)
    assert block.read(0, 2) == b"\x7f\x7f" and block.read(PAGE_SIZE, 2) == b"\0\0"


@FAST
@given(data=st.data())
def test_async_tracker_reports_exactly_the_pages_written(block: RamBlock,
                                                         data: st.DataObject) -> None:
    vec_len = data.draw(st.sampled_from([1, 2, 3, 512]), label="vec_len")
    with AsyncDirtyTracker([block], vec_len=vec_len) as tracker:
        for _ in range(2):
            pages = data.draw(st.sets(st.integers(0, NPAGES - 1), max_size=40), label="pages")
            for page in pages:
                block.mem[page * PAGE_SIZE + 17] = (page & 0xFF) | 1
            dirty = tracker.collect()["ram"]
            note(f"scan ioctls: {tracker.scan_ioctls}")
            assert set(dirty) == pages
            assert not tracker.collect()["ram"].any()


def test_async_tracker_sees_kernel_writes(block: RamBlock) -> None:
    with AsyncDirtyTracker([block]) as tracker:
        r, w = os.pipe()
        try:
            os.write(w, b"k" * (PAGE_SIZE + 100))
            got = os.readv(r, [block.mem[10 * PAGE_SIZE - 50 : 11 * PAGE_SIZE + 50]])
        finally:
            os.close(r)
            os.close(w)
        assert got == PAGE_SIZE + 100
        assert list(tracker.collect()["ram"]) == [9, 10, 11]


def test_async_tracker_sees_unicorn_vcpu_stores(block: RamBlock) -> None:
    unicorn = pytest.importorskip("unicorn")
    arm64 = pytest.importorskip("unicorn.arm64_const")
    gpa = 0x40000000
    # str x1, [x0]; str x1, [x2]; str x1, [x3]   (then stop at `until`)
    code = bytes.fromhex("010000f9410000f9610000f9")
    block.write(0, code)
    uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
    uc.mem_map_ptr(gpa, block.size, unicorn.UC_PROT_ALL, block.host_addr)
    with AsyncDirtyTracker([block]) as tracker:
        uc.reg_write(arm64.UC_ARM64_REG_X1, 0x1122334455667788)
        for reg, page in ((arm64.UC_ARM64_REG_X0, 3), (arm64.UC_ARM64_REG_X2, 300),
                          (arm64.UC_ARM64_REG_X3, 599)):
            uc.reg_write(reg, gpa + page * PAGE_SIZE + 8)
        uc.emu_start(gpa, gpa + len(code))
        assert list(tracker.collect()["ram"]) == [3, 300, 599]
    assert block.read(300 * PAGE_SIZE + 8, 8) == (0x1122334455667788).to_bytes(8, "little")


MODES = pytest.mark.parametrize("mode", ["thread", "signal"])


def _run_live_checkpoint(block: RamBlock, seed: int, *, shadow_pages: int,
                         use_ctypes_writer: bool, mode: str = "thread") -> WriteProtectStats:
    """Protect, let a writer scribble while a saver saves; check the DESIGN section 4 promise."""
    rng = random.Random(seed)
    for page in rng.sample(range(NPAGES), NPAGES // 2):  # half the pages populated, half zero
        block.write(page * PAGE_SIZE, rng.randbytes(64) * (PAGE_SIZE // 64))
    image_at_protect = block.read(0, block.size)
    writes = [(rng.randrange(NPAGES * PAGE_SIZE - 300), rng.randrange(1, 300)) for _ in range(800)]
    written_pages = {p for off, n in writes for p in range(off // PAGE_SIZE,
                                                           (off + n - 1) // PAGE_SIZE + 1)}
    saved: dict[int, bytes] = {}
    failures: list[BaseException] = []
    session = WriteProtectSession([block], shadow_pages=shadow_pages, fault_mode=mode)

    def save(page: int, data: bytes) -> None:
        assert page not in saved, f"page {page} saved twice"
        saved[page] = data

    def saver() -> None:
        try:
            def drain() -> None:
                while (shadow := session.next_shadow()) is not None:
                    save(shadow.page, bytes(shadow.data))
                    session.release_shadow(shadow.slot)

            # a random order, slowly: the writer then hits unsaved pages (shadowed), saved ones
            # (just dirtied) and pages being saved
            for i, page in enumerate(rng.sample(range(NPAGES), NPAGES)):
                if i % 8 == 0:
                    time.sleep(0.0001)
                drain()
                data = session.take_page_for_saving("ram", page)
                if data is not None:
                    save(page, data)
            drain()
        except BaseException as err:  # reported by the main thread
            failures.append(err)

    def writer() -> None:
        try:
            mem = block.mem
            for i, (off, n) in enumerate(writes):
                if i % 64 == 0:
                    time.sleep(0.0001)  # let the saver in, so both race through RAM
                if use_ctypes_writer:  # releases the GIL while it faults
                    ctypes.memset(block.host_addr + off, 0xEE, n)
                else:  # holds the GIL while it faults (DESIGN section 5)
                    mem[off : off + n] = b"\xee" * n
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=writer), threading.Thread(target=saver)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "deadlock: a thread did not finish"
    stats = session.stats()
    session.stop()
    assert not failures, failures
    assert sorted(saved) == list(range(NPAGES))
    image = b"".join(saved[p] for p in range(NPAGES))
    assert image == image_at_protect
    assert set(session.dirty["ram"]) == written_pages
    assert stats.faults >= len(written_pages) and stats.shadow_copies <= len(written_pages)
    assert stats.handler_errno == 0
    # RAM itself holds the writes: every written byte is 0xee
    for off, n in writes[-20:]:
        assert block.read(off, n) == b"\xee" * n
    return stats


@MODES
@settings(FAST, max_examples=15)
@given(seed=st.integers(0, 2**32))
def test_live_session_gil_holding_writer(block: RamBlock, seed: int, mode: str) -> None:
    # pool as large as RAM: a GIL-holding writer must never meet a full pool (see the class doc)
    _run_live_checkpoint(block, seed, shadow_pages=NPAGES, use_ctypes_writer=False, mode=mode)


@MODES
def test_live_session_small_pool_waits_for_saver(block: RamBlock, mode: str) -> None:
    _run_live_checkpoint(block, 7, shadow_pages=2, use_ctypes_writer=True, mode=mode)


def test_live_session_mark_sent_and_counters(block: RamBlock) -> None:
    block.write(0, b"old")
    # 16 slots: the writer below holds the GIL, so its fault must never wait for the saver
    with WriteProtectSession([block], shadow_pages=16, unprotect_pages=16) as session:
        assert session.mark_sent("ram", 0, 4) == 4
        assert session.mark_sent("ram", 2, 4) == 2
        block.write(5 * PAGE_SIZE, b"new")  # opens pages 0..15, shadowing the 10 unsent ones
        stats = session.stats()
        assert (stats.faults, stats.shadow_copies, stats.queued, stats.pool_waits) == (1, 10, 10, 0)
        assert set(session.dirty["ram"]) == set(range(16))
        pages = []
        while (shadow := session.next_shadow()) is not None:
            pages.append(shadow.page)
            session.release_shadow(shadow.slot)
        assert sorted(pages) == list(range(6, 16))
        assert session.take_page_for_saving("ram", 0) is None
        assert session.is_sent("ram", 15) and not session.is_sent("ram", 16)
        with pytest.raises(ValueError):
            session.release_shadow(0)


def test_live_session_kernel_write_is_shadowed(block: RamBlock) -> None:
    block.write(20 * PAGE_SIZE, b"A" * PAGE_SIZE)
    with WriteProtectSession([block], shadow_pages=4) as session:
        r, w = os.pipe()
        try:
            os.write(w, b"B" * 100)
            assert os.readv(r, [block.mem[20 * PAGE_SIZE : 20 * PAGE_SIZE + 100]]) == 100
        finally:
            os.close(r)
            os.close(w)
        shadow = session.next_shadow()
        assert shadow is not None and (shadow.block, shadow.page) == ("ram", 20)
        assert bytes(shadow.data) == b"A" * PAGE_SIZE
        session.release_shadow(shadow.slot)
        assert list(session.dirty["ram"]) == [20]
    assert block.read(20 * PAGE_SIZE, 101) == b"B" * 100 + b"A"


def test_negative_wrapper_errors_name_the_ioctl(block: RamBlock) -> None:
    with Userfaultfd.open(0) as uffd:
        with pytest.raises(UffdError) as info:
            uffd.register(block.host_addr + 1, PAGE_SIZE, 1)
        assert (info.value.op, info.value.errno) == ("UFFDIO_REGISTER", errno.EINVAL)
        assert str(info.value).startswith("userfaultfd UFFDIO_REGISTER: ")
        with pytest.raises(UffdError) as info:
            uffd.writeprotect(block.host_addr, PAGE_SIZE, True)  # not registered
        assert info.value.op == "UFFDIO_WRITEPROTECT"
    with pytest.raises(UffdError) as info:
        uffd.wake(block.host_addr, PAGE_SIZE)
    assert info.value.errno == errno.EBADF


def _parse_records(data: bytes) -> dict[int, bytes]:
    """Page -> bytes of a run of QEMU RAM records (one block named 'ram'), each page once."""
    pages: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        header = int.from_bytes(data[pos:pos + 8], "big")
        pos += 8
        page, flags = header // PAGE_SIZE, header % PAGE_SIZE
        if not flags & 0x20:  # no CONTINUE: the block's name follows
            assert data[pos + 1:pos + 1 + data[pos]] == b"ram"
            pos += 1 + data[pos]
        assert page not in pages, f"page {page} saved twice"
        if flags & 0x02:
            assert data[pos] == 0
            pages[page] = bytes(PAGE_SIZE)
            pos += 1
        else:
            assert flags & 0x08
            pages[page] = data[pos:pos + PAGE_SIZE]
            pos += PAGE_SIZE
    return pages


def _c_saver_round(block: RamBlock, tmp_path: Path, seed: int, *, shadow_pages: int,
                   gil_holding: bool, mode: str = "thread") -> WriteProtectStats:
    """Protect, let a writer scribble while the C saver writes the records to a file."""
    rng = random.Random(seed)
    for page in rng.sample(range(NPAGES), NPAGES // 2):
        block.write(page * PAGE_SIZE, rng.randbytes(64) * (PAGE_SIZE // 64))
    image_at_protect = block.read(0, block.size)
    selected = block.new_bitmap()
    selected.set_all()
    # writes of up to 16 pages: a GIL-holding one faults page after page with the GIL held
    writes = [(rng.randrange(NPAGES * PAGE_SIZE - 16 * PAGE_SIZE),
               rng.randrange(1, 16 * PAGE_SIZE)) for _ in range(200)]
    written_pages = {p for off, n in writes for p in range(off // PAGE_SIZE,
                                                           (off + n - 1) // PAGE_SIZE + 1)}
    failures: list[BaseException] = []
    session = WriteProtectSession([block], shadow_pages=shadow_pages, tracking_only=True,
                                  fault_mode=mode)
    session.rearm({"ram": selected})
    path = tmp_path / f"records-{seed}-{mode}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    result: list[object] = []

    def writer() -> None:
        try:
            for off, n in writes:
                if gil_holding:  # slice assignment: the GIL stays held while it faults
                    block.mem[off:off + n] = b"\xee" * n
                else:
                    ctypes.memset(block.host_addr + off, 0xEE, n)
        except BaseException as err:
            failures.append(err)

    def saver() -> None:
        try:
            result.append(session.save(fd, 100, {"ram": selected}))
        except BaseException as err:
            failures.append(err)

    try:
        threads = [threading.Thread(target=writer), threading.Thread(target=saver)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "deadlock: a thread did not finish"
        stats = session.stats()
        session.stop()
        assert not failures, failures
        runs, counts = result[0]  # type: ignore[misc]
        data = os.pread(fd, counts.bytes_written + 1, 100)
    finally:
        os.close(fd)
    assert len(data) == counts.bytes_written
    saved = _parse_records(data)
    assert sorted(saved) == list(range(NPAGES))
    assert b"".join(saved[p] for p in range(NPAGES)) == image_at_protect
    assert counts.data_pages + counts.zero_pages == NPAGES
    assert counts.from_shadow == stats.shadow_copies
    # the runs the container's page index gets say the same
    for run in runs:
        for k in range(run.npages):
            page = run.first_page + k
            if run.zero:
                assert saved[page] == bytes(PAGE_SIZE)
            else:
                offset = run.data_offset + k * (8 + PAGE_SIZE) - 100
                assert data[offset:offset + PAGE_SIZE] == saved[page]
    assert sum(run.npages for run in runs) == NPAGES
    assert set(session.dirty["ram"]) == written_pages
    assert stats.handler_errno == 0
    return stats


@MODES
@settings(FAST, max_examples=10)
@given(seed=st.integers(0, 2**32), gil_holding=st.booleans())
def test_c_saver_holds_ram_as_at_protect(block: RamBlock, tmp_path: Path, seed: int,
                                         gil_holding: bool, mode: str) -> None:
    _c_saver_round(block, tmp_path, seed, shadow_pages=64, gil_holding=gil_holding, mode=mode)


@MODES
def test_c_saver_full_pool_with_gil_holding_writer_completes(block: RamBlock,
                                                             tmp_path: Path, mode: str) -> None:
    """One shadow slot and a writer that holds the GIL through multi-page writes: each fault
    waits for the saver to free the slot.  A saver that needed the GIL would deadlock here
    (in signal mode the waiting fault handler is the writer's own SIGBUS handler)."""
    stats = _c_saver_round(block, tmp_path, 11, shadow_pages=1, gil_holding=True, mode=mode)
    assert stats.pool_waits > 0


def test_reprotect_keeps_every_clean_page_protected(block: RamBlock) -> None:
    """Pre-pause passes re-protect only dirty pages while a writer runs; afterwards every page
    is protected again or carried, so re-arming needs no walk over all of RAM."""
    block.write(0, bytes(block.size))  # populated
    carried = {"ram": block.new_bitmap()}
    written: set[int] = set()
    stop = threading.Event()
    rng = random.Random(3)
    order = [rng.randrange(NPAGES) for _ in range(4000)]

    with WriteProtectSession([block], tracking_only=True) as session:
        def writer() -> None:
            for page in order:
                if stop.is_set():
                    break
                ctypes.memset(block.host_addr + page * PAGE_SIZE + 8, 0x33, 8)
                written.add(page)

        thread = threading.Thread(target=writer)
        thread.start()
        passes = 0
        while thread.is_alive() and passes < 200:
            session.reprotect(carried)
            passes += 1
        stop.set()
        thread.join()
        session.reprotect(carried)
        assert set(carried["ram"]) == written
        assert not session.dirty["ram"].any()
        before = session.stats().faults
        ctypes.memset(block.host_addr, 0x44, block.size)  # every page: protected, so faults
        assert session.stats().faults - before == NPAGES
        assert session.dirty["ram"].count() == NPAGES
        assert session.stats().shadow_copies == 0  # tracking only: nothing to save


def test_rearm_and_abandoned_round(block: RamBlock) -> None:
    block.write(0, b"x" * block.size)
    selected = block.new_bitmap()
    selected.set_range(0, 10)
    with WriteProtectSession([block], shadow_pages=1, tracking_only=True) as session:
        block.write(5 * PAGE_SIZE, b"before")  # tracked: dirty, unprotected
        assert list(session.dirty["ram"]) == [5]
        session.rearm({"ram": selected})
        assert not session.dirty["ram"].any()
        assert not session.is_sent("ram", 5) and session.is_sent("ram", 10)
        block.write(5 * PAGE_SIZE, b"during")  # protected again: faults, shadowed
        assert session.stats().queued == 1
        assert list(session.dirty["ram"]) == [5]
        session.abandon_round()  # the save failed
        assert session.stats().queued == 0
        assert all(session.is_sent("ram", p) for p in range(NPAGES))
        done = threading.Event()

        def writer() -> None:  # unsaved pages, one slot: waits forever unless abandoned
            ctypes.memset(block.host_addr, 0x55, 20 * PAGE_SIZE)
            done.set()

        threading.Thread(target=writer, daemon=True).start()
        assert done.wait(10), "a writer waited for a saver that is gone"
        assert session.stats().shadow_copies == 1
        session.rearm({"ram": selected})  # the next round starts clean
        assert session.stats().queued == 0 and not session.is_sent("ram", 0)


def test_full_pool_without_saver_takes_extra_pages(block: RamBlock, tmp_path: Path) -> None:
    """No saver runs yet and a GIL-holding writer opens 8 pages with a 1-slot pool: the handler
    must not wait for a saver (this thread, which holds the GIL); the copies wait in extra
    pages until the C saver writes them."""
    block.write(0, bytes(range(256)) * (block.size // 256))
    before = block.read(0, 8 * PAGE_SIZE)
    selected = block.new_bitmap()
    selected.set_range(0, 8)
    with WriteProtectSession([block], shadow_pages=1, tracking_only=True) as session:
        session.rearm({"ram": selected})
        block.mem[0:8 * PAGE_SIZE] = b"\x01" * (8 * PAGE_SIZE)  # GIL held across 8 faults
        stats = session.stats()
        assert (stats.shadow_copies, stats.queued) == (8, 8) and stats.pool_waits >= 7
        fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            runs, counts = session.save(fd, 0, {"ram": selected})
            data = os.pread(fd, counts.bytes_written, 0)
        finally:
            os.close(fd)
        assert counts.from_shadow == 8 and session.stats().queued == 0
    saved = _parse_records(data)
    assert b"".join(saved[p] for p in range(8)) == before
    assert [(r.first_page, r.npages, r.zero) for r in runs] == [(0, 8, False)]


def test_save_records_are_the_runs_written_and_sort_into_ram_order(block: RamBlock,
                                                                   tmp_path: Path) -> None:
    """A live save's runs as page index records (what a live checkpoint's index holds): shadow
    copies are written in the order they were made, out of RAM order; each record points at its pages' data in the file,
    and sorting puts them in RAM order."""
    block.write(0, bytes(range(256)) * (block.size // 256))
    block.write(9 * PAGE_SIZE, bytes(PAGE_SIZE))  # a zero page among them
    before = block.read(0, 12 * PAGE_SIZE)
    selected = block.new_bitmap()
    selected.set_range(0, 12)
    with WriteProtectSession([block], shadow_pages=8, tracking_only=True) as session:
        session.rearm({"ram": selected})
        for page in (7, 2, 5):  # shadow copies, in this order
            block.mem[page * PAGE_SIZE] = 0xEE
        fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            records, counts = session.save_records(fd, 100, {"ram": selected})
            data = os.pread(fd, 100 + counts.bytes_written, 0)
        finally:
            os.close(fd)
    assert counts.from_shadow == 3
    runs = list(IndexRecords(records))
    shadowed = [r.first_page for r in runs if r.first_page in (7, 2, 5)]
    assert shadowed == [7, 2, 5]  # written in the order they were copied: not RAM order
    assert sorted(p for r in runs for p in range(r.first_page, r.first_page + r.npages)) == \
        list(range(12))
    for run in runs:
        assert run.block == 0
        for k in range(run.npages):
            page = run.first_page + k
            want = before[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
            if run.zero:
                assert want == bytes(PAGE_SIZE) and run.data_offset == 0
            else:
                at = run.data_offset + k * (PAGE_SIZE + 8)
                assert data[at:at + PAGE_SIZE] == want
    in_order = list(IndexRecords(sort_index_records(records)))
    assert in_order == sorted(runs) and in_order != runs


def test_fault_around_opens_growing_runs_for_a_sequential_writer(block: RamBlock,
                                                                  tmp_path: Path) -> None:
    block.write(0, bytes(range(256)) * (block.size // 256))
    before = block.read(0, block.size)
    selected = block.new_bitmap()
    selected.set_all()
    with WriteProtectSession([block], shadow_pages=64, tracking_only=True,
                             fault_around=8) as session:
        session.rearm({"ram": selected})
        ctypes.memset(block.host_addr, 0x11, 64 * PAGE_SIZE)  # pages 0..63 in order
        stats = session.stats()
        # runs of 1, 2, 4, then 8 pages: 3 + 8 faults instead of 64
        assert stats.faults == 11
        dirty = set(session.dirty["ram"])
        assert set(range(64)) <= dirty and max(dirty) < 64 + 7
        assert stats.shadow_copies == len(dirty)  # each opened page was saved first
        faults = stats.faults
        ctypes.memset(block.host_addr + 300 * PAGE_SIZE, 0x22, 8)  # elsewhere: one page again
        ctypes.memset(block.host_addr + 302 * PAGE_SIZE, 0x22, 8)
        assert session.stats().faults == faults + 2
        assert {300, 302} <= set(session.dirty["ram"]) and 301 not in session.dirty["ram"]
        fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _, counts = session.save(fd, 0, {"ram": selected})
            data = os.pread(fd, counts.bytes_written, 0)
        finally:
            os.close(fd)
    saved = _parse_records(data)
    assert b"".join(saved[p] for p in range(NPAGES)) == before
    with pytest.raises(ValueError):
        WriteProtectSession([block], unprotect_pages=4, fault_around=2)


def test_signal_mode_unicorn_vcpu_stores_are_shadowed(block: RamBlock) -> None:
    """The vCPU's stores (unicorn's generated code writing the host mapping) fault into the
    SIGBUS handler on the vCPU's own thread: shadowed first, dirty, then done."""
    unicorn = pytest.importorskip("unicorn")
    arm64 = pytest.importorskip("unicorn.arm64_const")
    gpa = 0x40000000
    code = bytes.fromhex("010000f9410000f9610000f9")  # str x1, [x0]; [x2]; [x3]
    block.write(0, code)
    block.write(300 * PAGE_SIZE, b"old!" * (PAGE_SIZE // 4))
    uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
    uc.mem_map_ptr(gpa, block.size, unicorn.UC_PROT_ALL, block.host_addr)
    with WriteProtectSession([block], shadow_pages=8, fault_mode="signal") as session:
        uc.reg_write(arm64.UC_ARM64_REG_X1, 0x1122334455667788)
        for reg, page in ((arm64.UC_ARM64_REG_X0, 3), (arm64.UC_ARM64_REG_X2, 300),
                          (arm64.UC_ARM64_REG_X3, 599)):
            uc.reg_write(reg, gpa + page * PAGE_SIZE + 8)
        uc.emu_start(gpa, gpa + len(code))
        assert list(session.dirty["ram"]) == [3, 300, 599]
        shadows = {}
        while (shadow := session.next_shadow()) is not None:
            shadows[shadow.page] = bytes(shadow.data)
            session.release_shadow(shadow.slot)
        assert sorted(shadows) == [3, 300, 599]
        assert shadows[300] == b"old!" * (PAGE_SIZE // 4)
        assert session.stats().faults == 3
    assert block.read(300 * PAGE_SIZE + 8, 8) == (0x1122334455667788).to_bytes(8, "little")


def test_signal_mode_kernel_write_fails_with_efault(block: RamBlock) -> None:
    """The documented price of signal mode: the kernel cannot deliver SIGBUS for its own
    write, so ``read()`` into a protected page fails (and writes nothing) instead of
    faulting; an unprotected (already written) page takes it."""
    block.write(20 * PAGE_SIZE, b"A" * PAGE_SIZE)
    with WriteProtectSession([block], shadow_pages=4, fault_mode="signal") as session:
        r, w = os.pipe()
        try:
            os.write(w, b"B" * 200)
            with pytest.raises(OSError) as err:
                os.readv(r, [block.mem[20 * PAGE_SIZE : 20 * PAGE_SIZE + 100]])
            assert err.value.errno == errno.EFAULT
            assert block.read(20 * PAGE_SIZE, 100) == b"A" * 100
            block.write(21 * PAGE_SIZE, b"C")  # user mode: resolved in this thread
            assert os.readv(r, [block.mem[21 * PAGE_SIZE : 21 * PAGE_SIZE + 100]]) == 100
        finally:
            os.close(r)
            os.close(w)
        assert list(session.dirty["ram"]) == [21]
    assert block.read(21 * PAGE_SIZE, 101) == b"B" * 100 + b"\0"


def test_signal_mode_stop_while_writers_run(block: RamBlock) -> None:
    """Sessions stopped (and new ones started) while two threads write all the time: a fault
    taken just before a stop must be retried, not passed to the default SIGBUS action."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer(value: int) -> None:
        try:
            while not stop.is_set():
                ctypes.memset(block.host_addr, value, block.size)
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=writer, args=(v,)) for v in (1, 2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(30):
            with WriteProtectSession([block], shadow_pages=4, fault_mode="signal",
                                     tracking_only=True) as session:
                time.sleep(0.002)
            assert session.stats().handler_errno == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures and not any(t.is_alive() for t in threads)


def test_signal_mode_passes_other_sigbus_to_the_previous_handler(tmp_path: Path) -> None:
    """A SIGBUS that is not a fault of a session's RAM (here: past the end of a mapped file)
    reaches the handler installed before (Python's faulthandler) and kills as it would have."""
    script = tmp_path / "other_sigbus.py"
    script.write_text(
        "import ctypes, faulthandler, mmap, os, sys\n"
        "faulthandler.enable()\n"
        "from pyvmm.migration.postcopy_uffd import WriteProtectSession\n"
        "from pyvmm.ram import RamBlock\n"
        "block = RamBlock('ram', 1 << 20, 0)\n"
        "session = WriteProtectSession([block], fault_mode='signal')\n"
        "ctypes.memset(block.host_addr, 1, 4096)\n"
        "print('own fault ok', session.stats().faults, flush=True)\n"
        "path = sys.argv[1]\n"
        "with open(path, 'wb') as f: f.write(b'x' * 8192)\n"
        "fd = os.open(path, os.O_RDWR)\n"
        "m = mmap.mmap(fd, 8192)\n"
        "os.truncate(path, 4096)  # its second page is now past the end of the file\n"
        "address = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
        "ctypes.memset(address + 4096, 2, 1)\n"
        "print('not reached', flush=True)\n")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "short")],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["own fault ok 1"]
    assert done.returncode == -7  # SIGBUS, after faulthandler's report
    assert "Bus error" in done.stderr


@MODES
def test_fault_around_of_a_huge_page_ends_runs_at_2mib_boundaries(tmp_path: Path,
                                                                  mode: str) -> None:
    """fault_around 512 (a live-only checkpoint's): a sequential writer's runs grow, are cut at
    the next 2 MiB boundary, and from there on each fault opens one whole 2 MiB run (a
    transparent huge page unprotected whole stays huge); each opened page is saved first."""
    with RamBlock("ram", 2048 * PAGE_SIZE, 0) as big:
        big.write(0, bytes(range(256)) * (big.size // 256))
        before = big.read(0, big.size)
        selected = big.new_bitmap()
        selected.set_all()
        with WriteProtectSession([big], shadow_pages=2048, tracking_only=True,
                                 fault_around=512, fault_mode=mode) as session:
            session.rearm({"ram": selected})
            for page in range(2048):
                ctypes.memset(big.host_addr + page * PAGE_SIZE, 0x33, 8)
            stats = session.stats()
            # runs [0,1) [1,3) [3,7) ... [255,511) [511,512), then [512,1024) [1024,1536)
            # [1536,2048): 10 + 3 faults
            assert stats.faults == 13
            assert set(session.dirty["ram"]) == set(range(2048))
            assert stats.shadow_copies == 2048
            fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                _, counts = session.save(fd, 0, {"ram": selected})
                data = os.pread(fd, counts.bytes_written, 0)
            finally:
                os.close(fd)
        saved = _parse_records(data)
        assert b"".join(saved[p] for p in range(2048)) == before


def test_save_on_a_niced_thread_leaves_the_caller_as_it_was(block: RamBlock,
                                                            tmp_path: Path) -> None:
    """nice > 0: the C save runs on a thread of its own at that nice value (a caller's raised
    nice could not be lowered back without privilege); the result is the same records."""
    block.write(0, bytes(range(256)) * (block.size // 256))
    before = block.read(0, block.size)
    selected = block.new_bitmap()
    selected.set_all()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with WriteProtectSession([block], shadow_pages=8, tracking_only=True) as session:
        session.rearm({"ram": selected})
        ctypes.memset(block.host_addr + 5 * PAGE_SIZE, 0x44, 3 * PAGE_SIZE)  # shadowed first
        with pytest.raises(ValueError):
            session.save(0, 0, {"ram": selected}, nice=20)
        fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _, counts = session.save(fd, 0, {"ram": selected}, nice=7)
            data = os.pread(fd, counts.bytes_written, 0)
        finally:
            os.close(fd)
        assert counts.from_shadow == 3
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    saved = _parse_records(data)
    assert b"".join(saved[p] for p in range(NPAGES)) == before


@pytest.mark.parametrize("signal_mode", [0, 1], ids=["thread", "signal"])
def test_bare_fault_baseline_writes_every_page_and_lets_go(block: RamBlock,
                                                           signal_mode: int) -> None:
    """bench_uffd's baseline (the kernel's bare write-protect round trip): every page but the
    bell is written once through a fault, the pinning is undone, and the RAM is left
    unprotected (a later plain write does not fault)."""
    from pyvmm._native import ffi, lib

    seconds = ffi.new("double *")
    affinity = os.sched_getaffinity(0)
    base = ffi.cast("void *", block.host_addr)
    assert lib.pyvmm_uffd_bare_wp_faults(signal_mode, base, NPAGES, -1, 0, seconds) == 0
    assert seconds[0] > 0
    assert os.sched_getaffinity(0) == affinity
    mem = block.mem
    assert all(mem[p * PAGE_SIZE] == 2 and mem[p * PAGE_SIZE + PAGE_SIZE - 1] == 2
               for p in range(NPAGES - 1))
    assert mem[(NPAGES - 1) * PAGE_SIZE] == (2 if signal_mode == 0 else 1)  # the bell
    ctypes.memset(block.host_addr, 3, block.size)
    assert mem[0] == 3 and mem[block.size - 1] == 3
    assert lib.pyvmm_uffd_bare_wp_faults(signal_mode, base, 1, -1, -1, seconds) == -errno.EINVAL
