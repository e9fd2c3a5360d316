"""The ``checksum`` capability (issue 5): CRC-32C in C, checksum blocks, verify, checked reloads.

Oracles: the CRC-32C check value and a bit-at-a-time Python reference for both C paths; the RAM
digest stored at each checkpoint equals the digest of the guest's RAM at the pause (live and
incremental, guest running); a flipped byte anywhere in the committed bytes of a real chain is
found by ``verify`` and named (increment, block/page or byte range), and a reload never returns
a machine whose state differs from a clean reload of the same prefix.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from pyvmm._native import ffi, lib

from pyvmm.boot import GuestSpec, boot
from pyvmm.errors import ChecksumError, ConfigError, FormatError, PyvmmError
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine, StopReason
from pyvmm.migration import checksum, checksum_reload, checksum_stream
from pyvmm.migration import reload as reload_module
from pyvmm.migration.checkpoint import Checkpointer, reload
from pyvmm.migration.checksum_format import decode_checksums, encode_checksums
from pyvmm.migration.container import CheckpointFile, encode_header_slot, load_spec
from pyvmm.migration.inspect import file_info
from pyvmm.migration.lazy import lazy_reload
from pyvmm.migration.verify import verify_file
from pyvmm.ram import PAGE_SIZE
from pyvmm.testing.hostile import Lie, lies, lying_page_index

SPEC = load_spec()
FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ----- CRC-32C ------------------------------------------------------------------------------------


def reference_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def both_paths() -> Iterator[str]:
    """Every CRC-32C implementation this CPU runs, the default (best) one first."""
    default = checksum.implementation()
    assert default == checksum.available_implementations()[-1]
    yield default
    for name in checksum.available_implementations()[:-1]:
        with checksum.using(name):
            assert checksum.implementation() == name
            assert checksum.hardware() == (name != "portable")
            yield name


def test_check_value_on_both_paths() -> None:
    assert len(list(both_paths())) >= 2  # at least the default and the portable tables
    for _ in both_paths():
        assert checksum.crc32c(b"123456789") == 0xE3069283
        assert checksum.crc32c(b"") == 0
        assert checksum.crc32c(b"56789", checksum.crc32c(b"1234")) == 0xE3069283


def test_an_implementation_the_cpu_lacks_is_refused() -> None:
    with pytest.raises(ConfigError, match="'sse5' is not available here"), \
            checksum.using("sse5"):
        pass


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=700), st.integers(0, 7), st.integers(0, 700))
def test_paths_agree_with_the_reference(data: bytes, misalign: int, split: int) -> None:
    buf = bytes(misalign) + data
    view = memoryview(buf)[misalign:]  # unaligned starts take the byte-wise head
    want = reference_crc32c(data)
    for _ in both_paths():
        assert checksum.crc32c(view) == want
        split_at = min(split, len(data))
        assert checksum.crc32c(data[split_at:], checksum.crc32c(data[:split_at])) == want


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(200, 9000), st.integers(0, 31),
       st.integers(0, 2**32 - 1))
def test_folding_over_long_buffers_agrees_with_the_reference(seed: int, length: int,
                                                            misalign: int, start: int) -> None:
    """Buffers long enough for carry-less multiply folding (its 64- and 128-byte blocks, then
    a tail), any alignment, continuing any CRC."""
    data = random.Random(seed).randbytes(length)
    view = memoryview(bytes(misalign) + data)[misalign:]
    prefix = start.to_bytes(4, "little") * 3
    want = reference_crc32c(prefix + data)
    for _ in both_paths():
        assert checksum.crc32c(view, checksum.crc32c(prefix)) == want


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 23), st.integers(0, 2**32 - 1), st.integers(0, 63))
def test_page_list_crcs_agree_with_the_reference(npages: int, seed: int, misalign: int) -> None:
    """Per-page CRCs of pages anywhere in memory, in any order (as the indexed reload checks
    what it read), on every implementation: groups of seven (three by crc32 instructions, four
    by folding, in one loop), of three, and single pages."""
    rnd = random.Random(seed)
    buf = bytearray(rnd.randbytes((npages + 1) * PAGE_SIZE))
    base = ffi.from_buffer(buf)
    order = list(range(npages))
    rnd.shuffle(order)
    pointers = ffi.new("void *[]", [base + misalign + k * PAGE_SIZE for k in order])
    want = [reference_crc32c(bytes(buf[misalign + k * PAGE_SIZE:misalign + (k + 1) * PAGE_SIZE]))
            for k in order]
    out = ffi.new("unsigned int[]", npages)
    for name in both_paths():
        lib.pyvmm_crc32c_page_list(pointers, npages, PAGE_SIZE, out)
        assert list(out) == want, name


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 23), st.integers(0, 2**32 - 1))
def test_page_crcs_in_memory_and_in_a_file(npages: int, seed: int) -> None:
    rnd = random.Random(seed)
    pages = [rnd.randbytes(PAGE_SIZE) if rnd.random() < 0.7 else bytes(PAGE_SIZE)
             for _ in range(npages)]
    want = [reference_crc32c(p) if any(p) else checksum.zero_page_crc() for p in pages]
    ram = bytearray(b"".join(pages))
    populated = array.array("Q", [0])
    for k in range(npages):
        if any(pages[k]) or rnd.random() < 0.5:
            populated[0] |= 1 << k
    out = array.array("I", [0]) * npages
    # a file of page records: 8-byte headers (content irrelevant here) between the pages
    records = b"".join(b"\xaa" * 8 + p for p in pages)
    path = f"/tmp/pyvmm-crc-{os.getpid()}.bin"
    with open(path, "wb") as f:
        f.write(b"x" * 3 + records)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in both_paths():
            lib.pyvmm_crc32c_pages(ffi.from_buffer(ram), PAGE_SIZE, npages,
                                   ffi.from_buffer("pyvmm_u64[]", populated),
                                   ffi.from_buffer("unsigned int[]", out))
            assert list(out) == want
            lib.pyvmm_crc32c_pages(ffi.from_buffer(ram), PAGE_SIZE, npages, ffi.NULL,
                                   ffi.from_buffer("unsigned int[]", out))
            assert list(out) == want
            err = ffi.new("struct pyvmm_crc_error *")
            out[:] = array.array("I", [0]) * npages
            assert lib.pyvmm_crc32c_file_pages(fd, 3 + 8, npages, PAGE_SIZE, PAGE_SIZE + 8,
                                               ffi.from_buffer("unsigned int[]", out), err) == 0
            assert list(out) == want
            # one page more than the file holds: cut short, said so
            rc = lib.pyvmm_crc32c_file_pages(fd, 3 + 8, npages + 1, PAGE_SIZE, PAGE_SIZE + 8,
                                             ffi.from_buffer("unsigned int[]",
                                                             array.array("I", [0]) * (npages + 1)),
                                             err)
            assert rc == lib.PYVMM_CRC_TRUNCATED
    finally:
        os.close(fd)
        os.unlink(path)


# ----- a real chain -------------------------------------------------------------------------------


def ram_state(machine: Machine) -> str:
    digest = hashlib.sha256()
    for block in machine.ram_blocks:
        for first, count in block.nonzero_pages().runs():
            digest.update(first.to_bytes(8, "little"))
            digest.update(block.mem[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
    return digest.hexdigest()


def state(machine: Machine) -> tuple[str, object, object]:
    return ram_state(machine), machine.cpu_state(), dataclasses.replace(machine.uart.state)


@dataclass
class Chain:
    path: Path
    data: bytes
    states: list[tuple[str, object, object]]  # clean reload of the first k+1 increments
    pause_digests: list[int]  # RAM digest computed from the guest's RAM at each pause


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """live + incremental + checksum checkpoints of a guest stopped at exact instruction counts:
    the oracle chain.  Counted runs, not sleeps, pace the guest, so the file's layout (which
    pages each increment holds, which gaps its streams have) is the same on any host, however
    busy: the damage tests below pick gaps by kind and need each kind to be there."""
    path = tmp_path_factory.mktemp("sum") / "chain.chpt"
    options = WorkloadOptions.parse("pattern=hotcold,working_set=2M,passes=0,touch=64")
    digests: list[int] = []

    def at_pause(machine: Machine) -> None:
        table = checksum.RamCrcTable(
            [checksum.RamBlockInfo(b.name, b.gpa, b.size) for b in machine.ram_blocks])
        table.blocks = [checksum.ram_page_crcs(b) for b in machine.ram_blocks]
        digests.append(table.digest())

    with boot(GuestSpec(workload=options), ram_size=16 << 20, seed=3) as machine:
        checkpointer = Checkpointer(machine, path,
                                    capabilities=["incremental", "live", "checksum"])
        checkpointer.on_pause = at_pause
        # a short first run leaves most of the working set zero (the full increment is runs of
        # data and zero pages); the later ones write scattered pages (runs of data pages
        # one page record header apart)
        for insns in (100_000, 30_000, 30_000):
            result = machine.run(max_insns=insns)
            assert result.reason is StopReason.INSN_LIMIT, result
            checkpointer.checkpoint()
        checkpointer.close()
    states = []
    for k in range(1, 4):  # the checked reload itself is part of the oracle: it must pass
        with reload(f"chpt:{k}:{path}") as copy:
            states.append(state(copy))
    return Chain(path, path.read_bytes(), states, digests)


def test_chain_digests_are_the_ram_at_each_pause(chain: Chain) -> None:
    with CheckpointFile.open(chain.path) as container:
        assert "checksum" in container.header.capabilities
        blocks = [container.checksums(i.index) for i in container.header.increments]
    assert [b.ram_digest for b in blocks if b is not None] == chain.pause_digests
    assert len(set(chain.pause_digests)) == 3  # the guest changed RAM between checkpoints
    with CheckpointFile.open(chain.path) as container:
        for inc in container.header.increments:  # every device section named and covered
            devices = container.stats(inc.index)["devices"]
            sections = container.checksums(inc.index).sections  # type: ignore[union-attr]
            assert [f"{d.name}/{d.instance_id}" for d in sections] == [
                name.split(" ")[0] for name in devices]
            assert all(checksum.crc32c(chain.data[d.offset:d.offset + d.length]) == d.crc
                       for d in sections)
    report = verify_file(chain.path)
    assert report.ok, report.problems
    assert (report.increments, report.checksummed) == (3, 3)
    info = file_info(str(chain.path))
    assert [i["ram_digest"] for i in info["increments"]] == [
        f"{d:08x}" for d in chain.pause_digests]


@pytest.mark.parametrize("capabilities", [["checksum"], ["incremental", "checksum"],
                                          ["incremental", "cow", "checksum"]])
def test_every_save_path_records_the_ram_at_the_pause(tmp_path: Path,
                                                      capabilities: list[str]) -> None:
    """Stop-and-copy, incremental and cow: the stored digest is the RAM's at each pause and a
    checked reload of every prefix passes and reproduces it."""
    path = tmp_path / "paths.chpt"
    options = WorkloadOptions.parse("pattern=random,working_set=2M,passes=0,touch=64")
    digests: list[int] = []
    states = []

    def at_pause(machine: Machine) -> None:
        table = checksum.RamCrcTable(
            [checksum.RamBlockInfo(b.name, b.gpa, b.size) for b in machine.ram_blocks])
        table.blocks = [checksum.ram_page_crcs(b) for b in machine.ram_blocks]
        digests.append(table.digest())
        states.append(ram_state(machine))

    with boot(GuestSpec(workload=options), ram_size=16 << 20, seed=11) as machine:
        checkpointer = Checkpointer(machine, path, capabilities=capabilities)
        checkpointer.on_pause = at_pause
        for k in range(3):
            machine.run(max_insns=150_000)
            machine.write_memory(0x4000_0000 + (8 << 20) + k * PAGE_SIZE, b"host %d" % k)
            checkpointer.checkpoint()
        checkpointer.close()
    with CheckpointFile.open(path) as container:
        stored = [container.checksums(i.index) for i in container.header.increments]
    assert [b.ram_digest for b in stored if b is not None] == digests
    for k in range(1, 4):
        with reload(f"chpt:{k}:{path}") as copy:
            assert ram_state(copy) == states[k - 1]
    assert verify_file(path).ok


def test_verify_reports_a_truncated_file_and_a_broken_parent_link(chain: Chain,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "cut.chpt"
    path.write_bytes(chain.data[:-100])
    report = verify_file(path)  # the newest increment is cut: the older slot is read
    assert not report.ok and "points past the end of the file" in report.problems[0].message
    path.write_bytes(chain.data[:SPEC.DATA_START + 10])
    report = verify_file(path)  # cut inside the first increment: nothing to fall back to
    assert not report.ok and "truncated" in report.problems[0].message
    with CheckpointFile.open(chain.path) as container:
        header = container.header
    # a hostile but self-consistent header: increment 2 says its parent is 0
    bad = header.increments[2]
    changed = dataclasses.replace(header, increments=header.increments[:2] + (
        dataclasses.replace(bad, parent=0),), sequence=header.sequence + 1)
    damaged = bytearray(chain.data)
    slot = encode_header_slot(changed).ljust(SPEC.SLOT_SIZE, b"\0")
    with CheckpointFile.open(chain.path) as container:
        older = 1 - container._slot
    damaged[older * SPEC.SLOT_SIZE:(older + 1) * SPEC.SLOT_SIZE] = slot
    path.write_bytes(damaged)
    report = verify_file(path)
    assert [str(p) for p in report.problems] == [
        "increment 2: header: parent is 0, expected 1"]


def _regions(data: bytes) -> dict[str, list[tuple[int, int, int | None]]]:
    """(start, length, increment) of every committed byte range, by kind."""
    path = Path(f"/tmp/pyvmm-regions-{os.getpid()}.chpt")
    path.write_bytes(data)
    try:
        with CheckpointFile.open(path) as container:
            header = container.header
            used = len(encode_header_slot(header))
            regions: dict[str, list[tuple[int, int, int | None]]] = {
                "header": [(container._slot * SPEC.SLOT_SIZE, used, None)],
                "page index": [], "stats": [], "checksum block": [], "page data": [],
                "stream outside page data": [], "device section": []}
            for inc in header.increments:
                k = inc.index
                regions["page index"].append((inc.index_offset, inc.index_length, k))
                regions["stats"].append((inc.stats_offset, inc.stats_length, k))
                regions["checksum block"].append((inc.checksum_offset, inc.checksum_length, k))
                runs = container.page_index(k)
                block = container.checksums(k, runs)
                assert block is not None
                for section in block.sections:
                    regions["device section"].append((section.offset, section.length, k))
                stride = PAGE_SIZE + 8
                extents = []
                for run in runs:
                    if run.zero:
                        continue
                    for p in range(run.npages):
                        regions["page data"].append((run.data_offset + p * stride, PAGE_SIZE, k))
                    extents.append((run.data_offset,
                                    run.data_offset + (run.npages - 1) * stride + PAGE_SIZE))
                start = inc.stream_offset
                for begin, end in sorted(extents) + [(inc.index_offset, inc.index_offset)]:
                    if begin > start:
                        regions["stream outside page data"].append((start, begin - start, k))
                    start = end
        return regions
    finally:
        path.unlink()


def flip_byte(chain: Chain, tmp_path: Path, kind: str, pick: float, where: float,
              mask: int) -> tuple[Path, int | None]:
    """A copy of the chain with one byte of a ``kind`` region flipped (region and byte picked
    by the fractions ``pick`` and ``where``); the copy's path and the region's increment."""
    start, length, increment = (regions := _regions(chain.data)[kind])[int(pick * len(regions))]
    offset = start + int(where * length)
    note(f"{kind}: byte 0x{offset:x} ^= 0x{mask:02x} (increment {increment})")
    damaged = bytearray(chain.data)
    damaged[offset] ^= mask
    path = tmp_path / "damaged.chpt"
    path.write_bytes(damaged)
    return path, increment


def page_header_gap(chain: Chain, kind: str, pick: float) -> int | None:
    """The increment of the region flip_byte picks when that is a gap between two runs that
    holds only the 8-byte record header of the next run's first page (the checks deferred
    while an indexed reload loads RAM leave those to the loader); else None."""
    if kind != "stream outside page data":
        return None
    _start, length, increment = (regions := _regions(chain.data)[kind])[int(pick * len(regions))]
    return increment if length == 8 else None


@FAST
@given(kind=st.sampled_from(["header", "page index", "stats", "checksum block", "page data",
                             "stream outside page data", "device section"]),
       pick=st.floats(0, 1, exclude_max=True), where=st.floats(0, 1, exclude_max=True),
       mask=st.integers(1, 255), mapped=st.booleans())
def test_flipped_byte_is_found_named_and_never_loaded(chain: Chain, tmp_path: Path, kind: str,
                                                      pick: float, where: float,
                                                      mask: int, mapped: bool) -> None:
    path, increment = flip_byte(chain, tmp_path, kind, pick, where, mask)
    header_gap = page_header_gap(chain, kind, pick)
    report = verify_file(path)
    assert not report.ok
    first = report.problems[0]
    note(str(first))
    if increment is None:
        assert first.message.startswith("header")
    else:
        assert first.increment == increment and f"increment {increment}" in first.message
    if kind == "page data":
        assert "page" in first.message and "GPA 0x" in first.message
    if kind == "device section":
        assert "device section '" in first.message
    # a reload gives a clean prefix's state or refuses: never a guest on damaged bytes
    for k in range(1, 4):
        try:
            with mapped_reads(mapped):  # the gap checks and the last stream's RAM walk
                copy = reload(f"chpt:{k}:{path}")
        except (FormatError, ConfigError) as err:
            note(f"reload {k}: {err}")
            continue
        with copy:
            assert state(copy) in chain.states
            if increment is not None and increment < k and kind != "stats":
                # the damaged increment was loaded: only a page record the reload did not
                # load may be damaged (a superseded page; or, in an increment before the last,
                # whose stream the indexed reload does not parse, a record header it did not
                # read), and the state is the clean one
                assert kind == "page data" or (header_gap is not None and header_gap < k - 1)
                assert state(copy) == chain.states[k - 1]


CHECK_THREAD = pytest.mark.parametrize(
    "check_thread", [(1, 0), (2, 0), (0, 0), (1, 1)],
    ids=["checker thread", "checker thread only", "reading thread", "two reading threads"])


def check_in(monkeypatch: pytest.MonkeyPatch, check_thread: tuple[int, int]) -> None:
    """Where an indexed reload checks page CRCs: (_CHECK_THREAD, _SECOND_READER); with a
    second reader taking every other window, each reading thread checks its pages."""
    monkeypatch.setattr(reload_module, "_CHECK_THREAD", check_thread[0])
    monkeypatch.setattr(reload_module, "_SECOND_READER", check_thread[1])


@CHECK_THREAD
def test_reload_raises_checksum_error_for_loaded_page_damage(chain: Chain, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             check_thread: tuple[int, int]) -> None:
    """A page that ends up in the reloaded RAM, damaged: ChecksumError naming its increment,
    block, page and GPA; the machine is closed, never returned."""
    check_in(monkeypatch, check_thread)
    with CheckpointFile.open(chain.path) as container:
        runs = container.page_index(2)
        layout = container.header.ram_blocks
    run = next(r for r in runs if not r.zero)
    damaged = bytearray(chain.data)
    damaged[run.data_offset + 77] ^= 0x10
    path = tmp_path / "page.chpt"
    path.write_bytes(damaged)
    gpa = layout[run.block].gpa + run.first_page * PAGE_SIZE
    with pytest.raises(ChecksumError, match=rf"page {run.first_page} \(GPA 0x{gpa:x}\).*"
                                            rf"increment 2"):
        reload(f"chpt:{path}")
    with pytest.raises(ChecksumError, match="page data of RAM block"), \
            CheckpointFile.open(path) as container:
        checksum_reload.check_before_load(container, container.header.increments, pages=True)


@pytest.fixture(scope="module")
def host_chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three live checkpoints of host-written pages (deterministic, unlike the guest's chain):
    increment 0 holds pages 0-2999, 1 pages 500-1499, 2 pages 1000-1199, so every increment
    has pages only it holds, over several read batches and windows."""
    path = tmp_path_factory.mktemp("older") / "chain.chpt"
    with Machine(16 << 20) as machine:
        checkpointer = Checkpointer(machine, path,
                                    capabilities=["incremental", "live", "checksum"])
        for k, pages in enumerate([range(3000), range(500, 1500), range(1000, 1200)]):
            for page in pages:
                machine.ram.write(page * PAGE_SIZE + 64 * k, bytes([k + 1]) * 64)
            checkpointer.checkpoint()
        checkpointer.close()
    return path


@CHECK_THREAD
@pytest.mark.parametrize("increment, page", [(0, 100), (0, 2500), (1, 600)])
def test_damage_in_an_older_increment_is_named_by_the_indexed_reload(
        host_chain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check_thread: tuple[int, int],
        increment: int, page: int) -> None:
    """A damaged page of an older increment, which only the indexed reload's page checks see
    (its stream is not parsed): the error names that increment, also when the checker thread
    finds it while the reading thread has gone on to pages of other increments."""
    check_in(monkeypatch, check_thread)
    with CheckpointFile.open(host_chain) as container:
        layout = container.header.ram_blocks
        run = next(r for r in container.page_index(increment) if not r.zero and
                   r.first_page <= page < r.first_page + r.npages)
    damaged = bytearray(host_chain.read_bytes())
    damaged[run.data_offset + (page - run.first_page) * (PAGE_SIZE + 8) + 100] ^= 0x01
    path = tmp_path / "older.chpt"
    path.write_bytes(damaged)
    windowed = window_reader_calls(monkeypatch)
    gpa = layout[run.block].gpa + page * PAGE_SIZE
    with pytest.raises(ChecksumError, match=rf"page {page} \(GPA 0x{gpa:x}\)") as err:
        reload_module.reload_file(str(path))
    assert err.value.increment == increment
    assert "page data does not match its checksum" in str(err.value)
    # found by the window-by-window reader (live saves write their index in RAM order)
    assert windowed == ["raised"]


def window_reader_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool | str]:
    """What each indexed reload's window-by-window reader answered from now on ("raised")."""
    answers: list[bool | str] = []
    real = reload_module._Loader._read_window_by_window

    def spy(self: Any, *args: Any) -> bool:
        answers.append("raised")
        answers[-1] = result = real(self, *args)
        return result

    monkeypatch.setattr(reload_module._Loader, "_read_window_by_window", spy)
    return answers


def test_a_live_chain_is_read_window_by_window(
        chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live save's page index is in RAM order (its stream need not be: the saver writes pages
    a running guest is about to change first), so the indexed reload reads the chain window by
    window."""
    with CheckpointFile.open(chain.path) as container:
        for info in container.header.increments:
            runs = container.page_index(info.index)
            assert runs == sorted(runs, key=lambda r: (r.block, r.first_page))
    windowed = window_reader_calls(monkeypatch)
    with reload(f"chpt:{chain.path}") as machine:
        assert state(machine) == chain.states[-1]
    assert windowed == [True]


@CHECK_THREAD
@pytest.mark.parametrize("which", ["read", "zero run", "never saved"])
def test_indexed_reload_checks_each_page_as_it_reads_it(chain: Chain, which: str,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path,
                                                        check_thread: tuple[int, int]) -> None:
    """The indexed reload compares every page it reads (and every page it leaves zero) with
    the checksum table instead of a second pass over RAM: a table that disagrees with one page
    fails the reload naming that page, as the RAM pass of the other strategies does."""
    check_in(monkeypatch, check_thread)
    path = chain.path
    if which == "never saved":  # a machine that never touched most of its RAM
        path = tmp_path / "sparse.chpt"
        with Machine(64 << 20) as machine:
            machine.ram.write(5 * PAGE_SIZE, b"written")
            checkpointer = Checkpointer(machine, path, capabilities=["checksum"])
            checkpointer.checkpoint()
            checkpointer.close()
    with CheckpointFile.open(path) as container:
        expected = checksum_reload.check_before_load(container, container.header.increments)
        assert expected is not None
        layout = container.header.ram_blocks
        increments = container.header.increments
        pages_of = [container.page_index(i) for i in range(len(increments))]
        last = pages_of[-1]
    held = {(r.block, p) for i in range(len(increments)) for r in pages_of[i]
            for p in range(r.first_page, r.first_page + r.npages)}
    if which == "read":
        run = next(r for r in last if not r.zero)
        block, page = run.block, run.first_page + run.npages - 1
    elif which == "zero run":
        run = next(r for r in pages_of[0] if r.zero)
        block, page = run.block, run.first_page
    else:
        block = 0
        page = next(p for p in range(len(expected.blocks[0]) - 1, -1, -1)
                    if (0, p) not in held)
    gpa = layout[block].gpa + page * PAGE_SIZE
    real = checksum_reload.check_before_load

    def lying(*args: object, **kwargs: object) -> checksum.RamCrcTable | None:
        table = real(*args, **kwargs)  # type: ignore[arg-type]
        assert table is not None
        table.blocks[block][page] ^= 0x5A5A
        return table

    monkeypatch.setattr(reload_module, "check_before_load", lying)
    for strategy in ("indexed", "sequential"):
        with pytest.raises(ChecksumError, match=rf"page {page} \(GPA 0x{gpa:x}\)") as err:
            reload_module.reload_file(str(path), strategy=strategy)
        if strategy == "indexed":
            assert ("page data does not match" if which == "read" else "is zero") in str(
                err.value)


# ----- format 1 files -----------------------------------------------------------------------------


def as_format_1(path: Path) -> None:
    """Rewrite both header slots of a checksum-less file as format 1 (same data layout)."""
    with CheckpointFile.open(path) as container:
        header = container.header
        slot = container._slot
    with open(path, "r+b") as f:
        for number, sequence in ((slot, header.sequence), (1 - slot, header.sequence - 1)):
            old = dataclasses.replace(header, format_version=1, sequence=sequence)
            f.seek(number * SPEC.SLOT_SIZE)
            f.write(encode_header_slot(old).ljust(SPEC.SLOT_SIZE, b"\0"))


def test_format_1_files_still_load_verify_and_append(tmp_path: Path) -> None:
    path = tmp_path / "v1.chpt"
    options = WorkloadOptions.parse("working_set=1M,passes=0")
    with boot(GuestSpec(workload=options), ram_size=16 << 20, seed=5) as machine:
        machine.run(max_insns=100_000)
        checkpointer = Checkpointer(machine, path, capabilities=["incremental"])
        checkpointer.checkpoint()
        checkpointer.close()
        expected = state(machine)
        as_format_1(path)
        with CheckpointFile.open(path) as container:
            assert container.header.format_version == 1
        with reload(f"chpt:{path}") as copy:
            assert state(copy) == expected
        report = verify_file(path)
        assert report.ok and report.checksummed == 0
        assert any("no checksums" in n for n in report.notes)
        with pytest.raises(ConfigError, match="format 1, which has no checksums"):
            Checkpointer(machine, path, append=True, capabilities=["checksum"]).checkpoint()
        appender = Checkpointer(machine, path, append=True)
        appender.checkpoint()
        appender.close()
    with CheckpointFile.open(path) as container:
        assert container.header.format_version == 1  # appends keep the file's version
        assert len(container.header.increments) == 2
    assert verify_file(path).ok


def test_append_rebuilds_the_table_from_the_file(chain: Chain, tmp_path: Path) -> None:
    """The RAM table rebuilt from a file's checksum blocks (what an appending Checkpointer
    without its own table starts from) is the table of the machine's RAM as it is."""
    path = tmp_path / "append.chpt"
    options = WorkloadOptions.parse("pattern=random,working_set=1M,passes=0,touch=64")
    with boot(GuestSpec(workload=options), ram_size=16 << 20, seed=9) as machine:
        first = Checkpointer(machine, path, capabilities=["incremental", "checksum"])
        machine.run(max_insns=200_000)
        first.checkpoint()
        machine.run(max_insns=200_000)
        first.checkpoint()  # an incremental: the first checkpointer's own table
        with CheckpointFile.open(path) as container:
            table = checksum.table_from_file(container)
        actual = [checksum.ram_page_crcs(b) for b in machine.ram_blocks]
        assert table.first_mismatches(actual) == []
        first.close()
    assert verify_file(path).ok


# ----- the command line ---------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", "checkpoint", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_verify(chain: Chain, tmp_path: Path) -> None:
    good = run_cli("verify", str(chain.path))
    assert good.returncode == 0, good.stderr
    assert "OK (3 increment(s), 3 with checksums" in good.stdout
    as_json = json.loads(run_cli("verify", "--json", str(chain.path)).stdout)
    assert as_json["ok"] and as_json["checksummed"] == 3
    regions = _regions(chain.data)
    damaged = bytearray(chain.data)
    start, _, increment = regions["page data"][-1]
    damaged[start] ^= 1
    dev_start, dev_length, dev_increment = regions["stream outside page data"][1]
    damaged[dev_start + dev_length // 2] ^= 1
    path = tmp_path / "bad.chpt"
    path.write_bytes(damaged)
    bad = run_cli("verify", "-q", str(path))
    assert bad.returncode == 1
    lines = [line for line in bad.stdout.splitlines() if line.startswith("pyvmm: ")]
    assert len(lines) == 2, bad.stdout
    assert f"increment {dev_increment}: stream: stream bytes" in lines[0]
    assert f"increment {increment}: stream: page data of RAM block" in lines[1]
    assert "2 problem(s)" in bad.stdout
    info = run_cli("info", str(chain.path))
    assert info.returncode == 0 and "checksum" in info.stdout and "RAM digest" in info.stdout
    missing = run_cli("verify", str(tmp_path / "nothing.chpt"))
    assert missing.returncode == 1 and "no such checkpoint file" in missing.stderr


def test_negative_hostile_checksum_blocks() -> None:
    """Garbage and lying counts: FormatError (ChecksumError for a bad CRC), never more."""
    rnd = random.Random(4)
    for _ in range(300):
        data = b"CSUM" + rnd.randbytes(rnd.randrange(0, 80))
        with pytest.raises(FormatError):
            decode_checksums(data, increment=0)
    block = checksum.ChecksumBlock("crc32c", 7, array.array("I", [1, 2]), array.array("I", [3]))
    data = bytearray(encode_checksums(5, block))
    assert decode_checksums(bytes(data), increment=5) == block
    with pytest.raises(FormatError, match="belongs to increment 5"):
        decode_checksums(bytes(data), increment=4)
    data[17] ^= 0xFF  # the page count (bytes 16..19): now longer than the block
    with pytest.raises(FormatError, match="page_crcs|gap"):
        decode_checksums(bytes(data), increment=5)
    data[17] ^= 0xFF
    data[21] ^= 1  # a page CRC value (bytes 20..27): the block's own CRC catches it
    with pytest.raises(ChecksumError, match="checksum block: checksum mismatch"):
        decode_checksums(bytes(data), increment=5)


def test_cli_run_with_checksum_capability(tmp_path: Path) -> None:
    path = tmp_path / "run.chpt"
    run = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-q", "--max-insns", "300K",
                          "--workload", "working_set=1M,passes=0",
                          "--checkpoint", f"chpt:{path}", "--checksum"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    info = json.loads(run_cli("info", "--json", str(path)).stdout)
    assert "checksum" in info["capabilities"] and info["increments"][0]["ram_digest"]
    assert run_cli("verify", "-q", str(path)).returncode == 0
    refused = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--checksum"],
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1 and "capabilities of --checkpoint" in refused.stderr


def test_negative_huge_ram_layout_is_refused_not_allocated() -> None:
    huge = [checksum.RamBlockInfo("mach-virt.ram", 0x4000_0000, (checksum.MAX_TABLE_PAGES + 1)
                                  * PAGE_SIZE)]
    with pytest.raises(FormatError, match="more than the .* whose checksums pyvmm keeps"):
        checksum.RamCrcTable(huge)


def test_two_thread_read_back_equals_one_pass(chain: Chain, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Long streams are cut in two at a page boundary (inside a run or between runs): the CRCs
    are the one-pass ones, and a bad record header right at a cut inside a run is found."""
    path = tmp_path / "split.chpt"
    path.write_bytes(chain.data)
    cuts_inside_a_run = 0
    for increment in range(3):
        with CheckpointFile.open(path) as container:
            info = container.header.increments[increment]
            runs = container.page_index(increment)
            monkeypatch.setattr(checksum_stream, "PARALLEL_PAGES", 1 << 30)
            one = checksum_stream.stream_crcs(container.fd, info, runs)
            assert one.page_crcs is not None and len(one.page_crcs) >= 2
            monkeypatch.setattr(checksum_stream, "PARALLEL_PAGES", 2)
            two = checksum_stream.stream_crcs(container.fd, info, runs)
            assert (two.page_crcs, two.gap_crcs, two.gaps) == (one.page_crcs, one.gap_crcs,
                                                               one.gaps)
            # where the cut falls: half of the data pages, in file order
            data = sorted((r.data_offset, r.npages, r.first_page) for r in runs if not r.zero)
            left = len(one.page_crcs) // 2
            for offset, npages, first in data:
                if npages > left:
                    break
                left -= npages
            if not left:
                continue
            cuts_inside_a_run += 1
            header_at = offset + left * (PAGE_SIZE + 8) - 8
            with open(path, "r+b") as f:
                f.seek(header_at)
                f.write(b"\xff")
            with pytest.raises(FormatError, match=f"record header of page {first + left} "):
                checksum_stream.stream_crcs(container.fd, info, runs)
    assert cuts_inside_a_run  # the chain's runs are short: at least one cut lands inside one


# ----- the checks before a reload: C against Python ----------------------------------------------


def _before_load(path: Path, k: int, header_gap: int | None = None) -> tuple[str, object]:
    """What the Python checks of the first k increments say ("ok", table) or ("TypeName",
    message), what the C checks say, and that check_before_load raises exactly the former
    (``header_gap``: the increment of a damaged record header between two runs, which the
    checks deferred for the indexed loader leave to it in increments before the last)."""
    with CheckpointFile.open(path) as container:
        increments = container.header.increments[:k]
        try:
            table = checksum_reload._checked_in_python(container, increments, pages=False)
            python: tuple[str, object] = ("ok", [t.tobytes() for t in table.blocks])
        except PyvmmError as err:
            python = (type(err).__name__, str(err))
        fast = checksum_reload._checked_in_c(container, increments)
        event(f"Python: {python[0]}")
        note(f"python: {python[0]} {python[1] if python[0] != 'ok' else ''}; "
             f"C: {'rejected' if fast is None else 'accepted'}")
        # C never accepts what Python rejects, nor rejects what Python accepts, and agrees on
        # the table
        assert (fast is None) == (python[0] != "ok")
        if fast is not None:
            assert [t.tobytes() for t in fast.blocks] == python[1]
            assert [i for i, _ in fast.sources] == [i for i, _ in table.sources]
        try:
            checked = checksum_reload.check_before_load(container, increments)
            assert checked is not None and python[0] == "ok"
        except PyvmmError as err:
            assert (type(err).__name__, str(err)) == python
        # deferred: the older increments' gaps are checked while the RAM loads, and the
        # reloaded RAM's check raises what the checks before would have raised
        left_to_loader = header_gap is not None and header_gap < k - 1
        try:
            checked = checksum_reload.check_before_load(container, increments, defer_gaps=True)
            assert checked is not None
            assert checked.pending is not None
            if checked.pending is not None:
                checked.pending.check()
            assert python[0] == "ok" or left_to_loader
        except PyvmmError as err:
            assert not left_to_loader
            assert (type(err).__name__, str(err)) == python
    return python


@contextlib.contextmanager
def mapped_reads(mapped: bool) -> Iterator[None]:
    """The C gap checks and RAM section walks map every stream (``mapped``) or read every one
    with pread."""
    before = lib.pyvmm_map_min(0 if mapped else (1 << 64) - 1)
    try:
        yield
    finally:
        lib.pyvmm_map_min(before)


@FAST
@given(kind=st.sampled_from(["page index", "checksum block", "page data",
                             "stream outside page data", "device section", "stats"]),
       pick=st.floats(0, 1, exclude_max=True), where=st.floats(0, 1, exclude_max=True),
       mask=st.integers(1, 255), mapped=st.booleans())
def test_c_checks_before_load_agree_with_python_on_flipped_bytes(
        chain: Chain, tmp_path: Path, kind: str, pick: float, where: float, mask: int,
        mapped: bool) -> None:
    """The C checks accept exactly what the Python ones accept, and a rejection raises the
    Python checks' error (the one naming increment, section or byte range); whether the C gap
    checks map the streams or read them."""
    path, increment = flip_byte(chain, tmp_path, kind, pick, where, mask)
    header_gap = page_header_gap(chain, kind, pick)
    event(f"gaps {'mapped' if mapped else 'read'}")
    if header_gap is not None:
        event("a record header between two runs")
    for k in range(1, 4):
        with mapped_reads(mapped):
            outcome = _before_load(path, k, header_gap)
        if kind in ("page index", "checksum block", "stream outside page data",
                    "device section") and increment is not None and increment < k:
            assert outcome[0] != "ok" and f"increment {increment}" in str(outcome[1])


@FAST
@given(lie=lies(3))
def test_c_checks_before_load_agree_with_python_on_hostile_page_indexes(
        chain: Chain, tmp_path: Path, lie: Lie) -> None:
    """Page indexes with a valid CRC but lying runs (outside the block or stream, a page listed
    twice, overlapping data, a zero run with data, runs out of file order): the C record checks
    and the Python decoder agree."""
    damaged, change = lying_page_index(chain.path, lie)
    note(change)
    path = tmp_path / "hostile.chpt"
    path.write_bytes(damaged)
    for k in range(1, 4):
        _before_load(path, k)


def test_a_mapped_gap_read_past_the_end_of_the_file_is_caught(tmp_path: Path) -> None:
    """A stream that runs past the end of the file (as when the file is cut short while its
    gaps are read from a mapping) is reported cut short, not killed by SIGBUS: the mapped read
    takes the signal and the gaps are read again with pread, which finds where the file ends.
    Then a whole stream is read from a mapping again and its gap matches."""
    data = random.Random(5).randbytes(2 << 20)
    path = tmp_path / "short.bin"
    path.write_bytes(data)
    err = ffi.new("struct pyvmm_crcindex_error *")
    want = ffi.new("unsigned int[]", [checksum.crc32c(data[100:])])
    fd = os.open(path, os.O_RDONLY)
    try:
        with mapped_reads(mapped=True):
            cut_short = lib.pyvmm_map_cut_short()
            rc = lib.pyvmm_crcindex_gaps(fd, ffi.NULL, 0, PAGE_SIZE, 100, len(data) + (64 << 10),
                                         want, 1, 0, err)
            assert rc == lib.PYVMM_CRCINDEX_TRUNCATED and err.offset == len(data)
            assert lib.pyvmm_map_cut_short() == cut_short + 1
            assert lib.pyvmm_crcindex_gaps(fd, ffi.NULL, 0, PAGE_SIZE, 100, len(data), want, 1,
                                           0, err) == 0
            assert lib.pyvmm_map_cut_short() == cut_short + 1
            want[0] ^= 1
            assert lib.pyvmm_crcindex_gaps(fd, ffi.NULL, 0, PAGE_SIZE, 100, len(data), want, 1,
                                           0, err) == lib.PYVMM_CRCINDEX_GAP_MISMATCH
    finally:
        os.close(fd)


def test_a_mapped_ram_walk_past_the_end_of_the_file_walks_again_reading(tmp_path: Path) -> None:
    """The skip-mode walk of a RAM section that runs past the end of the file (cut short while
    it is walked from a mapping) takes SIGBUS, starts over reading with pread, and stops at
    the record the file cuts, as a walk that reads from the start does; whole, both walk it to
    its end."""
    npages, name = 300, b"pc.ram"
    parts = []
    for page in range(npages):
        flags = 0x08 | (0x20 if page else 0)  # PAGE, then CONTINUE
        parts.append((page * PAGE_SIZE | flags).to_bytes(8, "big"))
        if not page:
            parts.append(bytes([len(name)]) + name)
        parts.append(bytes([page % 251 + 1]) * PAGE_SIZE)
    parts.append((0x10).to_bytes(8, "big"))  # EOS
    stream = b"".join(parts)
    path = tmp_path / "walk.bin"
    ram = bytearray(npages * PAGE_SIZE)
    names = ffi.new("unsigned char[]", bytes([len(name)]) + name)
    c_names = ffi.new("unsigned char *[]", [names])
    bases = ffi.new("void *[]", [ffi.from_buffer(ram)])
    sizes = ffi.new("pyvmm_u64[]", [npages])

    def walk(mapped: bool, end: int) -> tuple[int, int, int, int]:
        w = ffi.new("struct pyvmm_ram_walk *")
        w.offset, w.end, w.block = 0, end, -1
        fd = os.open(path, os.O_RDONLY)
        try:
            with mapped_reads(mapped):
                rc = lib.pyvmm_ram_walk(fd, 1, c_names, bases, sizes, PAGE_SIZE, ffi.NULL, 0, 1,
                                        w)
        finally:
            os.close(fd)
        return rc, int(w.offset), int(w.pages), int(w.eos)

    path.write_bytes(stream)
    whole = walk(True, len(stream))
    assert whole == walk(False, len(stream)) == (0, len(stream), npages, 1)
    cut = len(stream) // 2 & ~4095  # at a page boundary: the next header is in a page past it
    path.write_bytes(stream[:cut])
    before = lib.pyvmm_map_cut_short()
    short = walk(True, len(stream))
    assert lib.pyvmm_map_cut_short() == before + 1
    assert short == walk(False, len(stream))
    rc, offset, pages, eos = short
    first = 8 + 1 + len(name) + PAGE_SIZE  # the first record names the block
    assert rc == 0 and not eos and cut <= offset < cut + PAGE_SIZE + 8
    assert pages == (offset - first) // (PAGE_SIZE + 8) + 1
    assert not any(ram)  # skip mode writes no page


def test_checksum_block_fast_decoder_agrees_with_construct(chain: Chain) -> None:
    """The struct decoder of checksum blocks returns what the declaration's parser returns, and
    declines (so that the parser names the error) whatever the parser rejects."""
    from pyvmm.migration import checksum_format

    rnd = random.Random(5)
    with CheckpointFile.open(chain.path) as container:
        blobs = [(info.index, os.pread(container.fd, info.checksum_length, info.checksum_offset))
                 for info in container.header.increments]
    cases = []
    for increment, blob in blobs:
        cases.append((increment, blob))
        cases.append((increment + 1, blob))
        for _ in range(150):
            damaged = bytearray(blob)
            damaged[rnd.randrange(len(blob))] ^= rnd.randrange(1, 256)
            cases.append((increment, bytes(damaged)))
            cases.append((increment, blob[:rnd.randrange(len(blob))]))
    accepted = 0
    for increment, data in cases:
        fast = checksum_format._decode_checksums_fast(data, increment)
        try:
            parsed = checksum_format.decode_checksums(data, increment=increment)
        except FormatError:
            assert fast is None
            continue
        assert fast == parsed
        accepted += 1
    assert accepted >= len(blobs)


def test_ram_page_crcs_in_two_halves_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper thread's half starts at a bitmap word: same CRCs, populated or not."""
    from pyvmm.migration import checksum_table
    from pyvmm.ram import RamBlock

    block = RamBlock("test.ram", 333 * PAGE_SIZE, 0x4000_0000)
    try:
        rnd = random.Random(6)
        for page in rnd.sample(range(333), 120):
            block.mem[page * PAGE_SIZE:page * PAGE_SIZE + 16] = rnd.randbytes(16)
        monkeypatch.setattr(checksum_table, "PARALLEL_PAGES", 1 << 30)
        one = checksum.ram_page_crcs(block)
        monkeypatch.setattr(checksum_table, "PARALLEL_PAGES", 2)
        two = checksum.ram_page_crcs(block)
        assert one == two
        assert list(one) == [checksum.crc32c(block.mem[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])
                             for p in range(333)]
    finally:
        block.close()


@pytest.mark.parametrize("parallel", [1 << 30, 2])
def test_stop_and_copy_checksums_in_c_equal_python(tmp_path: Path, parallel: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The C writer path (RAM CRCs taken while the stream was written, or afterwards in one or
    two halves; gaps; table) gives the checksum block and table the Python path gives, for a
    full and an incremental stop-and-copy increment."""
    monkeypatch.setattr(checksum, "PARALLEL_PAGES", parallel)
    calls = {"c": 0, "python": 0}
    in_c = checksum._increment_checksums_in_c

    def both(*args: object, **kwargs: object) -> object:
        container, kind, offset, length, runs, table, ram, ahead = args
        assert isinstance(ahead, checksum.RamCrcsAhead)  # the checkpointer took them early
        done = in_c(*args, **kwargs)  # type: ignore[arg-type]
        assert done is not None
        calls["c"] += 1
        afterwards = in_c(*args[:7])  # type: ignore[arg-type]
        assert afterwards is not None
        assert [list(x) if isinstance(x, array.array) else x for x in afterwards[:3]] == [
            list(x) if isinstance(x, array.array) else x for x in done[:3]]  # type: ignore[index]
        monkeypatch.setattr(checksum, "_increment_checksums_in_c", lambda *a, **k: None)
        try:
            block, after = checksum.increment_checksums(
                container, kind, offset, length, runs, table,  # type: ignore[arg-type]
                from_ram=ram)  # type: ignore[arg-type]
        finally:
            monkeypatch.setattr(checksum, "_increment_checksums_in_c", both)
        calls["python"] += 1
        page_crcs, gap_crcs, last_gap, table_after = done  # type: ignore[misc]
        assert (page_crcs, gap_crcs) == (block.page_crcs, block.gap_crcs)
        assert [t.tobytes() for t in table_after.blocks] == [t.tobytes() for t in after.blocks]
        assert table_after.digest() == block.ram_digest
        assert last_gap[0] + last_gap[1] == offset + length  # type: ignore[operator]
        return done

    monkeypatch.setattr(checksum, "_increment_checksums_in_c", both)
    options = WorkloadOptions.parse("pattern=hotcold,working_set=2M,passes=0,touch=64")
    path = tmp_path / "sc.chpt"
    with boot(GuestSpec(workload=options), ram_size=16 << 20, seed=4) as machine:
        checkpointer = Checkpointer(machine, path, capabilities=["incremental", "checksum"])
        for _ in range(3):
            machine.run(max_insns=200_000)
            checkpointer.checkpoint()
        checkpointer.close()
    assert calls == {"c": 3, "python": 3}
    assert verify_file(path).ok


def test_deferred_gap_checks_fail_the_reloaded_ram_check(chain: Chain, tmp_path: Path) -> None:
    """With the older increments' gaps checked while the RAM loads, damage there is raised by
    the reloaded RAM's check (as the checks before the load raise it), except in a gap that is
    only the record header of the next run's first page: that is the loader's to check, if it
    reads the page. And a reload that ends before that check leaves no descriptor behind."""
    older = [r for r in _regions(chain.data)["stream outside page data"] if r[2] < 2]
    longer = [r for r in older if r[1] > 8]
    headers = [r for r in older if r[1] == 8]
    assert longer and headers  # zero-page records in one, single page headers in the other
    with CheckpointFile.open(chain.path) as clean:
        layout = clean.header.ram_blocks
    for (start, length, increment), deferred_raises in ((longer[len(longer) // 2], True),
                                                        (headers[len(headers) // 2], False)):
        damaged = bytearray(chain.data)
        damaged[start + length // 2] ^= 0x20
        path = tmp_path / "older.chpt"
        path.write_bytes(damaged)
        with reload(f"chpt:{chain.path}") as copy:
            blocks = checksum_reload.reload_blocks(copy.ram_blocks, layout)
            with CheckpointFile.open(path) as container:
                with pytest.raises(ChecksumError) as before:
                    checksum_reload.check_before_load(container, container.header.increments)
                assert before.value.increment == increment
                expected = checksum_reload.check_before_load(container, container.header.increments,
                                                      defer_gaps=True)
                assert expected is not None and expected.pending is not None
                if deferred_raises:
                    with pytest.raises(ChecksumError) as after:
                        checksum_reload.check_reloaded_ram(blocks, expected, 2)
                    assert str(after.value) == str(before.value)
                else:
                    checksum_reload.check_reloaded_ram(blocks, expected, 2)
        # the indexed reload: refused, or (the damaged header's page not read) the clean state
        try:
            with reload(f"chpt:{path}") as copy:
                assert not deferred_raises and state(copy) == chain.states[-1]
        except FormatError as err:
            assert err.increment == increment
    for thread in threading.enumerate():  # the failed reloads' checks close their fds
        if thread.name == "pyvmm-crc-gaps":  # when done: count only after they are
            thread.join()
    fds = len(os.listdir("/proc/self/fd"))
    with CheckpointFile.open(chain.path) as container:
        expected = checksum_reload.check_before_load(container, container.header.increments,
                                              defer_gaps=True)
        assert expected is not None and expected.pending is not None
        expected.pending._thread.join()  # a loader that failed never waits
    assert len(os.listdir("/proc/self/fd")) == fds


def test_the_last_streams_gaps_are_checked_before_it_is_parsed(
        chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The indexed reload checks the last increment's stream gaps while it reads RAM, and waits
    for them before it parses that stream: damage there (even a page record header between two
    runs) is the checks' error, naming the increment, and no stream is parsed. (A header the
    reader reads along with its page may be refused by the reader first, as a wrong header.)"""
    regions = _regions(chain.data)["stream outside page data"]
    last = max(r[2] for r in regions if r[2] is not None)
    parsed: list[int] = []
    real = reload_module._Loader._load_stream
    monkeypatch.setattr(reload_module._Loader, "_load_stream",
                        lambda self, entries, info, **kw: parsed.append(info.index) or
                        real(self, entries, info, **kw))
    for length in (8, 9):  # a header between runs, then a longer gap
        start, size, _ = next(r for r in regions if r[2] == last and
                              (r[1] == 8 if length == 8 else r[1] > 8))
        damaged = bytearray(chain.data)
        damaged[start + size // 2] ^= 0x04
        path = tmp_path / "last.chpt"
        path.write_bytes(damaged)
        with CheckpointFile.open(path) as container, pytest.raises(ChecksumError) as before:
            checksum_reload.check_before_load(container, container.header.increments)
        parsed.clear()
        with pytest.raises(FormatError) as err:
            reload_module.reload_file(str(path))
        assert err.value.increment == last
        if length == 8 and "record header" in str(err.value):
            assert not isinstance(err.value, ChecksumError)  # the reader's, as it read the page
        else:
            assert str(err.value) == str(before.value)
        assert parsed == []


def test_lazy_reload_checks_what_it_loads_before_the_guest_starts(chain: Chain,
                                                                 tmp_path: Path) -> None:
    """A lazy reload with checksums refuses, before the guest starts, damage in an older
    increment's stream outside its page records, and (issue 14 item 7: the checks every reload
    makes) a damaged record header between two of its runs, as the indexed reload does: the
    guest never runs on a file another reload refuses."""
    regions = [r for r in _regions(chain.data)["stream outside page data"] if r[2] < 2]
    longer = next(r for r in regions if r[1] > 8)
    headers = [r for r in regions if r[1] == 8]
    assert headers
    for (start, length, increment), kind in [(longer, ChecksumError)] + \
            [(h, FormatError) for h in headers]:
        damaged = bytearray(chain.data)
        damaged[start + length // 2] ^= 0x20
        path = tmp_path / "older.chpt"
        path.write_bytes(damaged)
        with pytest.raises(kind) as err:
            lazy_reload(f"chpt:{path}")
        assert err.value.increment == increment
        with pytest.raises(FormatError):
            reload(f"chpt:{path}").close()
