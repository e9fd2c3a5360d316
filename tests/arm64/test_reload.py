"""Reloading chains of increments: every strategy x every prefix N x squash gives the state the
machine had at checkpoint N-1, and device post_load runs exactly once per reload.

Guest write schedules are random (hypothesis): the built-in workload runs a random number of
instructions between checkpoints and the host writes random pages (as device emulation does),
including zero pages over data, so increments override each other in every way."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.boot import GuestSpec, boot
from pyvmm.errors import ConfigError, FormatError
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine
from pyvmm.migration.checkpoint import Checkpointer, reload
from pyvmm.migration.container import CheckpointFile
from pyvmm.migration import reload as reload_module
from pyvmm.migration.reload import STRATEGIES, reload_file
from pyvmm.migration.squash import default_output, squash
from pyvmm.ram import PAGE_SIZE
from pyvmm.testing.digest import ram_digest
from pyvmm.testing.hostile import Lie, lying_page_index

RAM = 8 << 20
DEVICES = {"cpu/0", "pl011/0", "virt-counter/0", "guest-inform/0", "pyvmm-machine/0",
           "linux-user/0"}


def state_of(machine: Machine) -> dict[str, Any]:
    """RAM bytes, registers and device registers: what a reload must reproduce."""
    return {"ram": ram_digest(machine), "cpu": machine.cpu_state(), "insns": machine.insns,
            "uart": copy.deepcopy(machine.uart.state),
            "counter": copy.deepcopy(machine.counter.state)}


def new_guest(seed: int) -> Machine:
    options = WorkloadOptions(pattern="random", working_set=1 << 20, passes=1000, report_every=50)
    return boot(GuestSpec(workload=options), ram_size=RAM, seed=seed, uart_sink=lambda _b: None)


Step = tuple[int, list[tuple[int, int]]]  # instructions to run, host writes (page, fill byte)


def build_chain(path: Path, seed: int, steps: list[Step], *, live: bool = False,
                max_increments: int | None = None,
                checksum: bool = False) -> list[dict[str, Any]]:
    """Checkpoint after each step into ``path`` (incremental); the state at each pause."""
    states: list[dict[str, Any]] = []
    caps = ["incremental", "live"] if live else ["incremental"]
    if checksum:
        caps.append("checksum")
    with new_guest(seed) as machine:
        checkpointer = Checkpointer(machine, path, durable=False, capabilities=caps,
                                    max_increments=max_increments)
        checkpointer.on_pause = lambda m: states.append(state_of(m))
        try:
            for insns, writes in steps:
                if insns:
                    machine.run(max_insns=insns)
                for page, fill in writes:
                    machine.ram.write(page * PAGE_SIZE, bytes([fill]) * PAGE_SIZE)
                checkpointer.checkpoint()
        finally:
            checkpointer.close()
    return states


steps_strategy = st.lists(
    st.tuples(st.integers(0, 40_000),
              # pages of the upper half: the guest's code and data sit low (its working set too)
              st.lists(st.tuples(st.integers(RAM // PAGE_SIZE // 2, RAM // PAGE_SIZE - 1),
                                 st.sampled_from([0, 7])),
                       max_size=12)),
    min_size=1, max_size=5)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 3), steps=steps_strategy)
def test_every_strategy_and_prefix_and_squash_reload_the_state_at_that_checkpoint(
        tmp_path: Path, seed: int, steps: list[Step]) -> None:
    path = tmp_path / "chain.bin"
    path.unlink(missing_ok=True)
    states = build_chain(path, seed, steps)
    for n in range(1, len(states) + 1):
        for strategy in STRATEGIES:
            machine, report = reload_file(str(path), n, strategy=strategy)
            with machine:
                assert state_of(machine) == states[n - 1], (n, strategy)
            assert report.post_load == {d: 1 for d in DEVICES - {"linux-user/0"}}, strategy
        squashed = squash(path, n, tmp_path / f"squashed{n}.bin", durable=False)
        with CheckpointFile.open(squashed.output) as container:
            assert [i.kind for i in container.header.increments] == ["full"]
        with reload(f"chpt:{squashed.output}") as machine:
            assert state_of(machine) == states[n - 1], ("squash", n)


def test_strategies_read_what_they_say(tmp_path: Path) -> None:
    """indexed reads each page once; sequential reads every increment's pages; partial parses
    the device sections of the last increment only but reads the same pages as sequential."""
    path = tmp_path / "chain.bin"
    same_pages = [(p, 7) for p in range(1200, 1240)]
    build_chain(path, 1, [(20_000, same_pages)] + [(0, same_pages)] * 3)
    reports = {s: reload_file(str(path), strategy=s) for s in STRATEGIES}
    for machine, _ in reports.values():
        machine.close()
    with CheckpointFile.open(path) as container:
        total = sum(i.pages for i in container.header.increments)
        last = container.header.increments[-1].pages
    assert reports["sequential"][1].pages_read == total
    assert reports["partial"][1].pages_read == total
    assert reports["indexed"][1].pages_read == reports["sequential"][1].pages_read - \
        3 * len(same_pages)
    assert reports["indexed"][1].pages_read < total and last >= len(same_pages)
    assert all(r.streams == 4 for _, r in (reports["sequential"], reports["partial"]))
    assert reports["indexed"][1].streams == 1


def test_sieving_reads_through_small_gaps_and_changes_nothing_else(tmp_path: Path) -> None:
    """With sieve_pages, pages of an older increment that a newer one holds are read into a
    scratch buffer when that joins two reads; the RAM is the same whatever the sieve."""
    path = tmp_path / "chain.bin"
    # the full checkpoint holds pages 1100..1299 in one run; the incremental every third of them
    states = build_chain(path, 3, [(0, [(p, 9) for p in range(1100, 1300)]),
                                   (0, [(p, 4) for p in range(1100, 1300, 3)])])
    reports = {}
    for sieve in (0, 1, 2, 64):
        machine, reports[sieve] = reload_file(str(path), sieve_pages=sieve)
        with machine:
            assert state_of(machine) == states[-1], sieve
    assert reports[0].sieved_bytes == 0
    pages_read = {r.pages_read for r in reports.values()}
    assert len(pages_read) == 1  # each page still goes to RAM once, from the newest increment
    # in the full checkpoint's run, one page in three is the incremental's: 66 one-record gaps
    assert reports[1].sieved_bytes == 66 * (PAGE_SIZE + 8)
    assert reports[1].reads < reports[0].reads
    assert reports[64].reads <= reports[2].reads <= reports[1].reads
    with pytest.raises(ConfigError, match="sieve_pages"):
        reload_file(str(path), sieve_pages=65)


WINDOW = 1024  # pages of RAM the indexed reload takes at a time (chain_read.c: WINDOW_PAGES)


def window_reader_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each indexed reload's window-by-window reader answered from now on (False: it
    left the chain to the increment-by-increment reader)."""
    answers: list[bool] = []
    read_window_by_window = reload_module._Loader._read_window_by_window

    def spy(self: Any, *args: Any) -> bool:
        answers.append(read_window_by_window(self, *args))
        return answers[-1]

    monkeypatch.setattr(reload_module._Loader, "_read_window_by_window", spy)
    return answers


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
def test_window_by_window_reads_what_increment_by_increment_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checksum: bool) -> None:
    """The indexed reload goes through RAM a window at a time, and through every increment
    (newest first) inside each window: runs across a window's edge, zero runs over data and
    data over zero runs load what reading a whole increment at a time loads, and progress
    still climbs to the total."""
    path = tmp_path / "chain.bin"
    steps: list[Step] = [
        (20_000, [(p, 7) for p in range(WINDOW - 40, WINDOW + 40)]),  # one run across the edge
        (0, [(p, 0) for p in range(WINDOW - 3, WINDOW + 5)]),  # zero run across it, over data
        (5_000, [(p, 3) for p in range(WINDOW - 50, WINDOW + 60, 4)] + [(2047, 1)]),
        (0, [(p, 9) for p in range(WINDOW - 1, WINDOW + 2)] + [(WINDOW - 40, 0)]),
    ]
    states = build_chain(path, 2, steps, checksum=checksum)
    windowed = window_reader_calls(monkeypatch)
    reports = {}
    # by window on two threads (every other window on the second), by window on one thread,
    # and increment by increment
    for by_window, second in ((True, 1), (True, 0), (False, 1)):
        monkeypatch.setattr(reload_module, "_WINDOWED", by_window)
        monkeypatch.setattr(reload_module, "_SECOND_READER", second)
        for sieve in (0, 2):
            seen: list[tuple[int, int]] = []
            machine, report = reload_file(str(path), sieve_pages=sieve,
                                          progress=lambda done, total: seen.append((done, total)))
            with machine:
                assert state_of(machine) == states[-1], (by_window, sieve)
            assert report.checksums_verified == checksum
            assert [d for d, _ in seen] == sorted(d for d, _ in seen)
            assert seen[-1][0] == seen[-1][1]
            reports[by_window, second, sieve] = report
    assert windowed == [True] * 4  # the increment-by-increment runs never asked for it
    for sieve in (0, 2):
        assert reports[True, 1, sieve].pages_read == reports[False, 1, sieve].pages_read
        one, two = reports[True, 0, sieve], reports[True, 1, sieve]
        assert (one.pages_read, one.reads, one.sieved_bytes) == \
            (two.pages_read, two.reads, two.sieved_bytes)
    assert reports[True, 1, 0].sieved_bytes == 0 < reports[True, 1, 2].sieved_bytes


@pytest.mark.parametrize("second_reader", [1, 0], ids=["two threads", "one thread"])
def test_windows_shared_out_over_several_ram_blocks(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    second_reader: int) -> None:
    """With a second reader every other window goes to the other thread, across the edges of
    RAM blocks too (windows of a block it never got are behind its cursors): a chain of three
    increments over three blocks of odd sizes, with runs that cross window edges, reloads to
    the RAM it saved, as a whole file and as each prefix."""
    monkeypatch.setattr(reload_module, "_SECOND_READER", second_reader)
    path = tmp_path / "blocks.bin"
    digests = []
    with Machine(8 << 20) as machine:
        blocks = [machine.ram, machine.add_ram_block("b.ram", 0x0100_0000, (3 << 20) + 8192),
                  machine.add_ram_block("c.ram", 0x0200_0000, 5 * WINDOW * PAGE_SIZE // 2)]
        checkpointer = Checkpointer(machine, path, durable=False, capabilities=["incremental"])
        for k, step in enumerate((3, 5, 11)):
            for number, block in enumerate(blocks):
                for page in range((k + number) % step, block.page_count, step):
                    block.write(page * PAGE_SIZE + 8 * k, f"{k}:{number}:{page}".encode())
            checkpointer.checkpoint()
            digests.append(ram_digest(machine))
        checkpointer.close()
    windowed = window_reader_calls(monkeypatch)
    for count in (1, 2, 3):
        machine, report = reload_file(str(path), count)
        with machine:
            assert ram_digest(machine) == digests[count - 1], count
    assert windowed == [True] * 3


def test_an_index_out_of_ram_order_is_read_increment_by_increment(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """pyvmm writes each page index in RAM order, which the window-by-window reader needs; a
    valid index whose runs come in another order (another writer) is read a whole increment at
    a time instead, to the same state."""
    path = tmp_path / "chain.bin"
    states = build_chain(path, 1, [(20_000, []), (0, [(p, 5) for p in (1300, 1302, 1900)])])
    with CheckpointFile.open(path) as container:
        runs = container.page_index(1)
    assert len([r for r in runs if not r.zero]) >= 2
    shuffled, _ = lying_page_index(path, Lie(increment=1, run=0, field="swap", delta=0,
                                             other=len(runs) - 1))
    path.write_bytes(shuffled)
    with CheckpointFile.open(path) as container:
        assert container.page_index(1) != runs  # reordered, and still a valid index
    windowed = window_reader_calls(monkeypatch)
    machine, _ = reload_file(str(path))
    with machine:
        assert state_of(machine) == states[-1]
    assert windowed == [False]


def test_live_incremental_chain_reloads_with_every_strategy(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A live saver writes pages in the order it gets to them; the page index is still in RAM
    order, so the indexed reload reads the chain window by window."""
    path = tmp_path / "live.bin"
    states = build_chain(path, 2, [(30_000, [(1500, 1)]), (30_000, []), (30_000, [(1500, 0)])],
                         live=True)
    windowed = window_reader_calls(monkeypatch)
    for strategy in STRATEGIES:
        with reload(f"chpt:{path}", strategy=strategy) as machine:
            assert state_of(machine) == states[-1]
    assert windowed == [True]
    with CheckpointFile.open(path) as container:
        for info in container.header.increments:
            runs = container.page_index(info.index)
            assert runs == sorted(runs, key=lambda r: (r.block, r.first_page))


def test_max_increments_restarts_the_chain_in_place(tmp_path: Path) -> None:
    path = tmp_path / "capped.bin"
    states = build_chain(path, 3, [(10_000, [(1700, 3)])] * 5, max_increments=2)
    with CheckpointFile.open(path) as container:
        # 5 checkpoints: [full, inc], then a fresh [full, inc], then a fresh [full]
        assert [i.kind for i in container.header.increments] == ["full"]
    with reload(f"chpt:{path}") as machine:
        assert state_of(machine) == states[-1]
    assert not [p for p in os.listdir(tmp_path) if p != "capped.bin"], "temporary files remain"


def test_squash_default_name_and_in_place(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    states = build_chain(path, 0, [(10_000, []), (10_000, [(1800, 9)]), (10_000, [])])
    result = squash(path, 2)
    assert result.output == default_output(path) == tmp_path / "c.bin_squashed"
    with reload(f"chpt:{result.output}") as machine:
        assert state_of(machine) == states[1]
    squash(path, output=path)  # in place: all three folded into one full increment
    with CheckpointFile.open(path) as container:
        assert len(container.header.increments) == 1
    with reload(f"chpt:{path}") as machine:
        assert state_of(machine) == states[2]


def test_bad_reload_requests_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    build_chain(path, 0, [(1000, [])])
    with pytest.raises(ConfigError, match="holds 1 increment"):
        reload(f"chpt:2:{path}")
    with pytest.raises(ConfigError, match="unknown reload strategy 'fast'"):
        reload(f"chpt:{path}", strategy="fast")
    with pytest.raises(ConfigError, match="squashes"):
        reload(f"chpt:squash:{path}")
    with pytest.raises(ConfigError, match="holds 1 increment"):
        squash(path, 3)
    assert not (tmp_path / "c.bin_squashed").exists()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(FormatError):
        squash(empty)


def test_sanity_checks_abort_a_checkpoint_that_lost_a_page(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A saver that drops a selected page is caught before commit; the next checkpoint (with a
    sound saver) still holds the page."""
    from pyvmm.migration.checkpoint import SanityError
    from pyvmm.migration.ram_handler import RamHandler

    path = tmp_path / "c.bin"
    with new_guest(0) as machine:
        checkpointer = Checkpointer(machine, path, durable=False, capabilities=["incremental"])
        states: list[dict[str, Any]] = []
        checkpointer.on_pause = lambda m: states.append(state_of(m))
        checkpointer.checkpoint()
        machine.ram.write(1500 * PAGE_SIZE, b"\x05" * PAGE_SIZE)
        machine.ram.write(1600 * PAGE_SIZE, b"\x06" * PAGE_SIZE)
        select = RamHandler.select

        def lose_one(self: RamHandler, pages: Any) -> None:
            sent = {name: bitmap.copy() for name, bitmap in pages.items()}
            for bitmap in sent.values():
                if bitmap.count():
                    bitmap.clear(bitmap.find_next_set(0))
                    break
            select(self, sent)

        monkeypatch.setattr(RamHandler, "select", lose_one)
        with pytest.raises(SanityError, match="selected"):
            checkpointer.checkpoint()
        monkeypatch.setattr(RamHandler, "select", select)
        assert len(increments_of(path)) == 1
        checkpointer.checkpoint()
        checkpointer.close()
    assert increments_of(path) == ["full", "incremental"]
    with reload(f"chpt:{path}") as machine:
        assert state_of(machine) == states[-1]


def increments_of(path: Path) -> list[str]:
    with CheckpointFile.open(path) as container:
        return [i.kind for i in container.header.increments]


@pytest.mark.parametrize("strategy, second_reader",
                         [(s, 1) for s in STRATEGIES] + [("indexed", 0)])
@pytest.mark.parametrize("victim", [0, 1])
def test_a_wrong_record_header_between_batched_pages_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, second_reader: int,
        victim: int) -> None:
    """Pages next to each other in the file are read by one preadv; the record headers between
    them are still compared with what the writer puts there (by the indexed reload's claim, or
    by the stream parser's run reads, which hand the run back to Python to name the page), in
    the full increment and in a newer one, with the indexed reload's windows on one thread or
    shared out between two."""
    monkeypatch.setattr(reload_module, "_SECOND_READER", second_reader)
    path = tmp_path / "c.bin"
    build_chain(path, 0, [(1000, [(p, 5) for p in range(1600, 1610)]),
                          (1000, [(p, 3) for p in range(1500, 1505)])])
    with CheckpointFile.open(path) as container:
        run = next(r for r in container.page_index(victim) if not r.zero and r.npages >= 3)
    with open(path, "r+b") as handle:
        handle.seek(run.data_offset + 2 * 4104 - 8)  # the header of the run's third page
        handle.write(b"\xff" * 8)
    page = run.first_page + 2
    named = {"indexed": f"wrong record header at page {page}"}.get(
        strategy, f"record header of page {page} is 0xffffffffffffffff")
    with pytest.raises(FormatError, match=named) as err:
        reload_file(str(path), strategy=strategy)
    assert err.value.increment == victim
