"""Lazy reload (issue 5, deliverable 2): a lazily reloaded machine runs to the same output and
the same final state as an eagerly reloaded one, for the built-in workload, busybox and chains
of increments; the fault handler serves runs of pages; a damaged file stops the guest with one
clear error instead of hanging or running it on wrong RAM."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from pyvmm.boot import GuestSpec, boot
from pyvmm.errors import ChecksumError, ConfigError, FormatError, RunStateError
from pyvmm.machine import Machine, RunState, StopReason
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.migration.checkpoint import Checkpointer, reload
from pyvmm.migration.container import PAGE_RECORD_HEADER, CheckpointFile
from pyvmm.migration.lazy import LazyLoader, lazy_reload
from pyvmm.migration.machine_state import machine_save_state
from pyvmm.migration.ram_handler import RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_ZERO, IndexedRun
from pyvmm.migration.stream import QEMUFile
from pyvmm.ram import PAGE_SIZE
from pyvmm.testing.hostile import Lie, lies, lying_page_index

from test_checkpoint import WORKLOAD, machine_digest, pyvmm

RUN_TIMEOUT = 120.0


def make_checkpoint(path: Path, *args: str | Path) -> None:
    proc = pyvmm("run", "-q", "--checkpoint", f"chpt:{path}", *args)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def workload_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lazy") / "workload.bin"
    make_checkpoint(path, "--max-insns", "700K", *WORKLOAD)
    return path


@pytest.fixture(scope="module")
def chain_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four increments (one full, three incremental) of the workload."""
    path = tmp_path_factory.mktemp("lazy") / "chain.bin"
    make_checkpoint(path, "--incremental", "--checkpoint-at", "300K,900K,1500K",
                    "--max-insns", "2M", *WORKLOAD)
    with CheckpointFile.open(path) as container:
        assert [i.kind for i in container.header.increments] == \
            ["full", "incremental", "incremental", "incremental"]
    return path


def run_eager(target: str) -> tuple[bytes, dict[str, object]]:
    out = bytearray()
    with reload(target, uart_sink=out.extend, stdout=out.extend) as machine:
        result = machine.run(seconds=RUN_TIMEOUT)
        assert result.reason is StopReason.SHUTDOWN, result
        return bytes(out), machine_digest(machine)


def run_lazy(target: str, **options: object) -> tuple[bytes, dict[str, object], LazyLoader]:
    out = bytearray()
    machine, loader = lazy_reload(target, uart_sink=out.extend, stdout=out.extend,
                                  **options)  # type: ignore[arg-type]
    with machine:
        with loader:
            result = machine.run(seconds=RUN_TIMEOUT)
        assert loader.error is None
        assert result.reason is StopReason.SHUTDOWN, result
        return bytes(out), machine_digest(machine), loader


def page_count(path: Path, count: int | None = None) -> int:
    """Data pages a reload of the first `count` increments loads (each page once)."""
    pages: set[tuple[int, int]] = set()
    zero: set[tuple[int, int]] = set()
    with CheckpointFile.open(path) as container:
        for info in container.header.increments[:count]:
            for run in container.page_index(info.index):
                span = {(run.block, run.first_page + k) for k in range(run.npages)}
                if run.zero:
                    pages -= span
                    zero |= span
                else:
                    pages |= span
    return len(pages)


def test_lazy_workload_equals_eager(workload_file: Path) -> None:
    target = f"chpt:{workload_file}"
    lazy_out, lazy_state, loader = run_lazy(target)
    eager_out, eager_state = run_eager(target)
    assert lazy_out == eager_out and b"done passes=40" in lazy_out
    assert lazy_state == eager_state
    stats = loader.stats()
    assert stats.filled and stats.data_pages == page_count(workload_file)
    # every data page installed exactly once, by the handler or by the fill
    assert stats.fault_pages + stats.fill_pages == stats.data_pages
    assert stats.first_insn_ms is not None and stats.first_insn_ms > 0
    assert stats.filled_ms is not None


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_lazy_chain_prefix_equals_eager(chain_file: Path, count: int) -> None:
    target = f"chpt:{count}:{chain_file}"
    # state right after the reload (nothing run): RAM, CPU, devices
    machine, loader = lazy_reload(target)
    with machine:
        with loader:
            assert loader.wait_filled(RUN_TIMEOUT)
        lazy_state = machine_digest(machine)
    with reload(target) as eager:
        assert lazy_state == machine_digest(eager)
    assert loader.stats().data_pages == page_count(chain_file, count)
    lazy_out, lazy_end, _ = run_lazy(target)
    eager_out, eager_end = run_eager(target)
    assert lazy_out == eager_out and lazy_end == eager_end


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lie=lies(4))
@example(lie=Lie(increment=0, run=0, field="data_offset", delta=-1, other=1))  # onto a zero run
def test_hostile_page_indexes_are_refused_as_the_decoder_refuses_them(
        chain_file: Path, tmp_path: Path, lie: Lie) -> None:
    """A page index with a valid CRC but lying runs: the lazy reload's C checks refuse it with
    the container decoder's own error, or (when the decoder takes it) load what an eager reload
    of the same file loads."""
    damaged, change = lying_page_index(chain_file, lie)
    note(change)
    increment = lie.increment
    path = tmp_path / "hostile.bin"
    path.write_bytes(damaged)
    try:
        with CheckpointFile.open(path) as container:
            container.page_index(increment)
    except FormatError as err:
        with pytest.raises(FormatError) as refused:
            lazy_reload(f"chpt:{path}")
        assert str(refused.value) == str(err)
        return
    # the decoder takes it: the lazy reload loads what the eager one loads, or both refuse
    try:
        machine, loader = lazy_reload(f"chpt:{path}")
        with machine:
            with loader:
                assert loader.wait_filled(RUN_TIMEOUT) or loader.error is not None
            lazy_ram = machine_digest(machine)["ram"]
    except FormatError:
        with pytest.raises(FormatError):
            reload(f"chpt:{path}").close()
        return
    with reload(f"chpt:{path}") as eager:
        assert lazy_ram == machine_digest(eager)["ram"]


def test_fault_handler_serves_a_run_and_zero_pages(workload_file: Path) -> None:
    """Without the fill, a first touch is one fault that installs the whole aligned window of
    pages around it (before and after the touched page) when their records follow each other in
    the file; a page the checkpoint does not hold gets a zero page."""
    with CheckpointFile.open(workload_file) as container:
        runs = [r for r in container.page_index(0) if not r.zero and r.npages >= 32]
    run = runs[0]
    window = -(-run.first_page // 16) * 16  # the first 16-page window inside the run
    assert window + 16 <= run.first_page + run.npages
    machine, loader = lazy_reload(f"chpt:{workload_file}", fill=False, fault_run=16)
    with reload(f"chpt:{workload_file}") as eager:
        with machine:
            with loader:
                block = machine.ram
                # a Python thread holding the GIL touches RAM: the C handler serves it
                touched = window + 5
                assert block.page(touched).tobytes() == eager.ram.page(touched).tobytes()
                stats = loader.stats()
                assert (stats.faults, stats.fault_pages) == (1, 16)
                # the rest of the window came in with it: no new fault
                span = slice(window * PAGE_SIZE, (window + 16) * PAGE_SIZE)
                assert block.mem[span] == eager.ram.mem[span]
                assert loader.stats().faults == 1
                absent = eager.ram.nonzero_pages().complement()
                last = block.page_count - 1
                assert last in absent
                assert block.read(last * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
                stats = loader.stats()
                assert stats.faults == 2 and stats.zero_pages >= 1 and not stats.filled
            stats = loader.stats()  # close() filled the rest
            assert stats.filled and stats.fault_pages + stats.fill_pages == stats.data_pages
            assert machine_digest(machine)["ram"] == machine_digest(eager)["ram"]


def test_vcpu_and_python_threads_fault_together(workload_file: Path) -> None:
    """The guest runs (vCPU faults, GIL released) while another Python thread reads all RAM
    (GIL held during each copy): both are served, nothing deadlocks."""
    machine, loader = lazy_reload(f"chpt:{workload_file}", fill=False)
    digests: list[str] = []

    def read_all() -> None:
        digests.append(hashlib.sha256(machine.ram.read(0, machine.ram.size)).hexdigest())

    with machine:
        reader = threading.Thread(target=read_all)
        machine.start(seconds=RUN_TIMEOUT)
        reader.start()
        reader.join(RUN_TIMEOUT)
        assert not reader.is_alive() and digests
        result = machine.wait(RUN_TIMEOUT)
        assert result.reason is StopReason.SHUTDOWN
        loader.close()
        assert loader.stats().filled


def test_close_early_leaves_a_usable_machine(workload_file: Path) -> None:
    target = f"chpt:{workload_file}"
    out = bytearray()
    machine, loader = lazy_reload(target, uart_sink=out.extend, fill=False)
    with machine:
        loader.close()
        loader.close()  # idempotent
        assert loader.stats().filled
        assert machine.run(seconds=RUN_TIMEOUT).reason is StopReason.SHUTDOWN
        state = machine_digest(machine)
    eager_out, eager_state = run_eager(target)
    assert bytes(out) == eager_out and state == eager_state


def test_lazy_busybox_equals_eager(tmp_path: Path, busybox: str) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(hashlib.shake_256(b"lazy").digest(1 << 20))
    path = tmp_path / "bb.bin"
    make_checkpoint(path, "--max-insns", "2M", "--ram", "64M", "--files", data, "--guest",
                    busybox, "sha256sum", data)
    lazy_out, lazy_state, loader = run_lazy(f"chpt:{path}")
    eager_out, eager_state = run_eager(f"chpt:{path}")
    assert lazy_out == eager_out
    assert hashlib.sha256(data.read_bytes()).hexdigest().encode() in lazy_out
    assert lazy_state == eager_state
    stats = loader.stats()
    assert stats.fault_pages + stats.fill_pages == stats.data_pages == page_count(path)


def corrupt_a_record_header(path: Path) -> tuple[int, int]:
    """Change the record header in front of the second page of the longest data run; returns
    (its file offset, the page)."""
    with CheckpointFile.open(path) as container:
        runs = [r for r in container.page_index(0) if not r.zero and r.npages > 1]
    run = max(runs, key=lambda r: r.npages)
    at = run.data_offset + PAGE_SIZE  # header of page first_page + 1
    with open(path, "r+b") as f:
        f.seek(at)
        header = bytearray(f.read(PAGE_RECORD_HEADER))
        header[5] ^= 0x10  # another page number
        f.seek(at)
        f.write(header)
    return at, run.first_page + 1


@pytest.fixture
def bad_header_file(tmp_path: Path, workload_file: Path) -> tuple[Path, int, int]:
    path = tmp_path / "bad.bin"
    path.write_bytes(workload_file.read_bytes())
    at, page = corrupt_a_record_header(path)
    return path, at, page


@pytest.fixture
def good_copy(tmp_path: Path, workload_file: Path) -> Path:
    path = tmp_path / "damaged-later.bin"
    path.write_bytes(workload_file.read_bytes())
    return path


def test_negative_bad_record_header_found_by_the_fill(good_copy: Path) -> None:
    """A header damaged after the reload's checks (the file changed under it) is found by the
    C fill thread: the machine stops, nothing hangs."""
    machine, loader = lazy_reload(f"chpt:{good_copy}", fill=False)
    at, page = corrupt_a_record_header(good_copy)
    loader.start_fill()
    with machine:
        with pytest.raises(FormatError, match="record header") as err:
            loader.wait_filled(RUN_TIMEOUT)  # must not hang
        assert err.value.offset == at and err.value.increment == 0
        assert f"page {page} of RAM block" in str(err.value)
        assert machine.state is RunState.INTERNAL_ERROR
        with pytest.raises(RunStateError, match="internal-error"):
            machine.run()  # never runs on RAM that could not be loaded
        loader.close()
        assert loader.error is err.value


def test_negative_bad_record_header_found_by_a_fault(good_copy: Path) -> None:
    machine, loader = lazy_reload(f"chpt:{good_copy}", fill=False, fault_run=1024)
    at, page = corrupt_a_record_header(good_copy)
    with machine:
        assert page % 1024, "the page before must lie in the same fault window"
        machine.ram.page(page).tobytes()  # served (with zeros) so that nothing hangs
        with pytest.raises(FormatError, match="record header") as err:
            loader.wait_filled(RUN_TIMEOUT)
        assert err.value.offset == at
        assert machine.state is RunState.INTERNAL_ERROR
        assert loader.stats().fault_pages == 0
        loader.close()


def test_negative_bad_record_header_is_refused_before_the_guest_starts(
        bad_header_file: tuple[Path, int, int]) -> None:
    """Issue 14 item 7: the lazy reload makes the checks the other reloads make, before the
    guest runs: a wrong record header is one line, as the indexed reload says it."""
    path, at, page = bad_header_file
    with pytest.raises(FormatError, match="record header") as lazy:
        lazy_reload(f"chpt:{path}")
    assert lazy.value.offset == at and lazy.value.increment == 0
    assert f"page {page}" in str(lazy.value)
    with pytest.raises(FormatError):
        reload(f"chpt:{path}").close()


def test_negative_bad_record_header_on_the_cli(bad_header_file: tuple[Path, int, int]) -> None:
    """One line, exit code 1, and the guest never ran."""
    path, _, _ = bad_header_file
    proc = pyvmm("run", "--incoming", f"chpt:{path}", "--lazy")
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1
    assert lines[-1].startswith("pyvmm: error:") and "record header" in lines[-1]
    assert "Traceback" not in proc.stderr.decode()
    assert proc.stdout == b""


def zero_block(path: Path, offset: int, length: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


def test_negative_zeroed_block_over_an_older_increments_page_records(
        chain_file: Path, tmp_path: Path) -> None:
    """Issue 14 item 7: a zeroed 4 KiB block over the page records of an increment whose pages
    a newer one overrides. The indexed, partial and sequential reloads refuse it (the stream
    does not parse); the lazy reload took it and ran the guest to exit 0. Now it refuses it
    too, on the CLI with one line and exit 1."""
    path = tmp_path / "zeroed.bin"
    path.write_bytes(chain_file.read_bytes())
    with CheckpointFile.open(path) as container:
        info = container.header.increments[0]
        runs = [r for r in container.page_index(0) if not r.zero and r.npages >= 4]
    run = max(runs, key=lambda r: r.npages)
    zero_block(path, run.data_offset + 2 * (PAGE_SIZE + PAGE_RECORD_HEADER) - 64)
    assert info.stream_offset < run.data_offset
    for strategy in ("indexed", "partial", "sequential"):
        with pytest.raises(FormatError):
            reload(f"chpt:{path}", strategy=strategy).close()
    with pytest.raises(FormatError):
        lazy_reload(f"chpt:{path}")
    proc = pyvmm("run", "--incoming", f"chpt:{path}", "--lazy")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.decode().strip().splitlines()[-1].startswith("pyvmm: error:")
    assert "Traceback" not in proc.stderr.decode()


def test_negative_file_cut_short_after_start(tmp_path: Path, workload_file: Path) -> None:
    """The file loses its page data after the reload started: a touch of a page that is gone is
    served (zeros, nothing hangs), the loader fails and the machine will not run."""
    path = tmp_path / "cut.bin"
    path.write_bytes(workload_file.read_bytes())
    with CheckpointFile.open(path) as container:
        info = container.header.increments[0]
        run = max((r for r in container.page_index(0) if not r.zero), key=lambda r: r.npages)
    machine, loader = lazy_reload(f"chpt:{path}", fill=False)
    os.truncate(path, info.stream_offset + 4096)
    with machine:
        last = run.first_page + run.npages - 1
        assert machine.ram.page(last).tobytes() == bytes(PAGE_SIZE)
        with pytest.raises(FormatError, match="cut short") as err:
            loader.wait_filled(RUN_TIMEOUT)
        assert err.value.increment is None or err.value.increment == 0
        assert machine.state is RunState.INTERNAL_ERROR
        with pytest.raises(RunStateError):
            machine.run()
        loader.close()


def test_negative_truncated_file_fails_before_starting(tmp_path: Path,
                                                       workload_file: Path) -> None:
    path = tmp_path / "short.bin"
    data = workload_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        lazy_reload(f"chpt:{path}")
    proc = pyvmm("run", "--incoming", f"chpt:{path}", "--lazy")
    assert proc.returncode != 0
    assert proc.stderr.decode().strip().splitlines()[-1].startswith("pyvmm: error:")


def test_negative_bad_options(workload_file: Path) -> None:
    with pytest.raises(ConfigError, match="power of two"):
        lazy_reload(f"chpt:{workload_file}", fault_run=3)
    with pytest.raises(ConfigError, match="fill_run"):
        lazy_reload(f"chpt:{workload_file}", fill_run=0)
    proc = pyvmm("run", "--lazy", "--guest", "workload")
    assert proc.returncode != 0 and b"--lazy needs --incoming" in proc.stderr


def test_cli_lazy_prints_time_to_first_instruction(tmp_path: Path, workload_file: Path) -> None:
    out = tmp_path / "next.bin"
    lazy = pyvmm("run", "--incoming", f"chpt:{workload_file}", "--lazy",
                 "--checkpoint", f"chpt:{out}")
    eager = pyvmm("run", "-q", "--incoming", f"chpt:{workload_file}")
    assert lazy.returncode == eager.returncode == 0, lazy.stderr
    assert lazy.stdout == eager.stdout
    assert b"lazy reload: first guest instruction after" in lazy.stderr
    quiet = pyvmm("run", "-q", "--incoming", f"chpt:{workload_file}", "--lazy")
    assert quiet.stderr == b"" and quiet.stdout == eager.stdout
    # the checkpoint taken after a lazy reload holds the same final state
    with reload(f"chpt:{out}") as machine:
        final = machine_digest(machine)
    _, eager_final = run_eager(f"chpt:{workload_file}")
    assert final["ram"] == eager_final["ram"] and final["cpu"] == eager_final["cpu"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fault_run=st.sampled_from([1, 2, 64, 1024]), fill_run=st.integers(1, 1024),
       touches=st.lists(st.integers(0, (32 << 20) // PAGE_SIZE - 1), max_size=20),
       fill=st.booleans())
def test_any_runs_and_touch_order_give_the_eager_ram(workload_file: Path, fault_run: int,
                                                      fill_run: int, touches: list[int],
                                                      fill: bool) -> None:
    machine, loader = lazy_reload(f"chpt:{workload_file}", fault_run=fault_run,
                                  fill_run=fill_run, fill=fill)
    with reload(f"chpt:{workload_file}") as eager, machine:
        with loader:
            for page in touches:
                assert machine.ram.page(page).tobytes() == eager.ram.page(page).tobytes()
        stats = loader.stats()
        assert stats.fault_pages + stats.fill_pages == stats.data_pages
        assert machine_digest(machine) == machine_digest(eager)


def test_lazy_reload_of_a_machine_that_had_ended(tmp_path: Path) -> None:
    path = tmp_path / "ended.bin"
    make_checkpoint(path, *WORKLOAD)
    machine, loader = lazy_reload(f"chpt:{path}")
    with machine, loader:
        assert machine.state is RunState.SHUTDOWN
    assert isinstance(machine, Machine) and loader.stats().filled


def test_new_process_lazy_run_equals_whole_run(tmp_path: Path) -> None:
    """The central oracle through the CLI: run N, checkpoint, lazy reload in a new process,
    run on == one uninterrupted run."""
    whole_file, split_file = tmp_path / "whole.bin", tmp_path / "split.bin"
    whole = pyvmm("run", "-q", "--checkpoint", f"chpt:{whole_file}", *WORKLOAD)
    first = pyvmm("run", "-q", "--max-insns", "1234567", "--checkpoint", f"chpt:{split_file}",
                  *WORKLOAD)
    second = pyvmm("run", "-q", "--incoming", f"chpt:{split_file}", "--lazy",
                   "--checkpoint", f"chpt:{split_file}")
    assert second.returncode == 0 and second.stderr == b"", second.stderr
    assert first.stdout + second.stdout == whole.stdout
    with reload(f"chpt:{split_file}") as a, reload(f"chpt:{whole_file}") as b:
        assert machine_digest(a) == machine_digest(b)


def load_stream(path: Path, *, skip: bool, from_memory: bool) -> tuple[Machine, int, int]:
    """Load increment 0's stream of `path` into a fresh machine; (machine, pages_loaded, bytes
    consumed)."""
    with CheckpointFile.open(path) as container:
        info = container.header.increments[0]
        runs = container.page_index(0)
        machine = Machine(container.header.ram_blocks[0].size)
        entries = machine_save_state(machine, with_linux=True)
        entries.ram.skip_pages = skip
        entries.ram.set_load_index([IndexedRun(r.block, r.first_page, r.npages, r.data_offset,
                                               r.zero) for r in runs])
        if from_memory:
            data = os.pread(container.fd, info.stream_length, info.stream_offset)
            f = QEMUFile.memory(data)
        else:
            f = QEMUFile.for_reading(container.fd, info.stream_offset, info.stream_length)
        machine.set_state(RunState.INMIGRATE)
        entries.save_state.load(f)
        return machine, entries.ram.pages_loaded, f.pos


@pytest.mark.parametrize("from_memory", [False, True])
def test_ram_handler_skip_mode_parses_everything_and_writes_no_page(
        workload_file: Path, from_memory: bool) -> None:
    loaded, loaded_pages, loaded_end = load_stream(workload_file, skip=False,
                                                   from_memory=from_memory)
    skipped, skipped_pages, skipped_end = load_stream(workload_file, skip=True,
                                                      from_memory=from_memory)
    with loaded, skipped:
        assert loaded.ram.populated_pages().count() > 1000
        assert skipped.ram.populated_pages().count() == 0  # not one page touched
        with CheckpointFile.open(workload_file) as container:
            info = container.header.increments[0]
        assert skipped_pages == loaded_pages == info.pages + info.zero_pages
        assert skipped_end == loaded_end  # the device sections after RAM were read alike


def test_negative_skip_mode_refuses_a_filled_zero_record() -> None:
    with Machine(1 << 20) as machine:
        entries = machine_save_state(machine)
        entries.ram.skip_pages = True
        record = QEMUFile.memory()
        record.put_be64(5 * PAGE_SIZE | RAM_SAVE_FLAG_ZERO)
        record.put_str8(machine.ram.name)
        record.put_u8(0xAB)
        record.put_be64(RAM_SAVE_FLAG_EOS)
        with pytest.raises(FormatError, match="filled with 0xab"):
            entries.ram.load(QEMUFile.memory(record.getvalue()), 4)


def test_lazy_chain_with_pages_zeroed_later(tmp_path: Path) -> None:
    """Pages written in increment 0 and zeroed in increment 1 (an incremental checkpoint records
    them as zero pages): the lazy reload of 1 increment has the data, of 2 the zeros."""
    path = tmp_path / "zeroed.bin"
    spec = GuestSpec(workload=WorkloadOptions.parse("working_set=64K,passes=0"))
    with boot(spec, ram_size=16 << 20) as machine:
        checkpointer = Checkpointer(machine, path, capabilities=["incremental"], durable=False)
        for page in range(100, 300):
            machine.ram.write(page * PAGE_SIZE, page.to_bytes(4, "little") * 16)
        checkpointer.checkpoint()
        for page in range(150, 250, 3):
            machine.ram.write(page * PAGE_SIZE, bytes(PAGE_SIZE))
        machine.ram.write(400 * PAGE_SIZE, b"new")
        checkpointer.checkpoint()
        checkpointer.close()
    for count in (1, 2):
        target = f"chpt:{count}:{path}"
        machine, loader = lazy_reload(target, fill=False)
        with machine, reload(target) as eager:
            with loader:
                for page in (100, 150, 151, 153, 249, 299, 400, 401):
                    assert machine.ram.page(page).tobytes() == eager.ram.page(page).tobytes()
                if count == 2:
                    assert machine.ram.page(150).tobytes() == bytes(PAGE_SIZE)
                    assert loader.stats().zero_pages >= 1
                else:
                    assert machine.ram.page(150).tobytes() != bytes(PAGE_SIZE)
            assert machine_digest(machine) == machine_digest(eager)


@pytest.mark.parametrize("capabilities", [(), ("incremental",)])
def test_checkpoint_during_the_fill_waits_for_it(tmp_path: Path, workload_file: Path,
                                                 capabilities: tuple[str, ...]) -> None:
    """A checkpoint taken before the fill ends (none started here) saves all of RAM, not just
    the pages touched so far, and can track dirty pages afterwards."""
    path = tmp_path / "again.bin"
    machine, loader = lazy_reload(f"chpt:{workload_file}", fill=False)
    with machine, reload(f"chpt:{workload_file}") as eager:
        checkpointer = Checkpointer(machine, path, capabilities=capabilities, durable=False)
        stats = checkpointer.checkpoint()
        assert loader.stats().filled
        machine.run(max_insns=100_000)
        checkpointer.checkpoint()
        checkpointer.close()
        loader.close()
        eager.run(max_insns=100_000)
        with reload(f"chpt:{path}") as again:
            assert machine_digest(again)["ram"] == machine_digest(eager)["ram"]
    with CheckpointFile.open(workload_file) as container:
        assert stats.pages == container.header.increments[0].pages


def test_negative_checkpoint_of_a_failed_lazy_reload(tmp_path: Path,
                                                     workload_file: Path) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(workload_file.read_bytes())
    machine, loader = lazy_reload(f"chpt:{path}", fill=False)
    corrupt_a_record_header(path)  # after the checks before the start: found by the fill
    with machine:
        checkpointer = Checkpointer(machine, tmp_path / "out.bin", durable=False)
        with pytest.raises(FormatError, match="record header"):
            checkpointer.checkpoint()
        checkpointer.close()
        loader.close()
        assert machine.state is RunState.INTERNAL_ERROR


def test_lazy_reload_of_several_ram_blocks(tmp_path: Path) -> None:
    path = tmp_path / "blocks.bin"
    with Machine(8 << 20) as machine:
        extra = machine.add_ram_block("extra.ram", 0x0100_0000, 1 << 20)
        for block in (machine.ram, extra):
            for page in range(3, block.page_count, 7):
                block.write(page * PAGE_SIZE, f"{block.name}:{page}".encode())
        checkpointer = Checkpointer(machine, path, durable=False)
        checkpointer.checkpoint()
        checkpointer.close()
    machine, loader = lazy_reload(f"chpt:{path}", fill=False, fault_run=4)
    with machine, reload(f"chpt:{path}") as eager:
        with loader:
            extra = machine.ram_blocks[1]
            assert extra.name == "extra.ram"
            assert extra.read(10 * PAGE_SIZE, 16) == b"extra.ram:10".ljust(16, b"\0")
            assert loader.stats().faults == 1
        assert loader.stats().data_pages == sum(len(range(3, b.page_count, 7))
                                                for b in eager.ram_blocks)
        assert machine_digest(machine) == machine_digest(eager)


@pytest.fixture(scope="module")
def checksum_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lazy") / "checksum.bin"
    make_checkpoint(path, "--max-insns", "700K", "--checksum", *WORKLOAD)
    return path


def flip_page_data(source: Path, target: Path) -> tuple[int, int, bytes]:
    """A copy of `source` with one byte flipped in the middle of a page in the middle of its
    longest data run; returns (that page's data offset, the page, its damaged data)."""
    data = bytearray(source.read_bytes())
    with CheckpointFile.open(source) as container:
        run = max((r for r in container.page_index(0) if not r.zero), key=lambda r: r.npages)
    k = run.npages // 2
    at = run.data_offset + k * (PAGE_SIZE + PAGE_RECORD_HEADER)
    data[at + 1234] ^= 0x40
    target.write_bytes(data)
    return at, run.first_page + k, bytes(data[at:at + PAGE_SIZE])


def test_lazy_checksum_file_equals_eager(checksum_file: Path) -> None:
    lazy_out, lazy_state, loader = run_lazy(f"chpt:{checksum_file}")
    assert (lazy_out, lazy_state) == run_eager(f"chpt:{checksum_file}")
    assert loader.stats().fault_pages + loader.stats().fill_pages == page_count(checksum_file)


@pytest.mark.parametrize("by", ["fill", "fault"])
def test_negative_page_data_against_its_checksum(tmp_path: Path, checksum_file: Path,
                                                 by: str) -> None:
    """A flipped page-data byte (the stream around it intact, so the checks before the start
    pass): the thread that reads the page finds it, names page, GPA and offset, never installs
    it (a touch gets zeros, so nothing hangs) and the guest never runs on."""
    path = tmp_path / "flipped.bin"
    at, page, damaged = flip_page_data(checksum_file, path)
    machine, loader = lazy_reload(f"chpt:{path}", fill=by == "fill", fault_run=64)
    with machine:
        if by == "fault":
            assert machine.ram.page(page).tobytes() == bytes(PAGE_SIZE)
        with pytest.raises(ChecksumError, match="does not match its checksum") as err:
            loader.wait_filled(RUN_TIMEOUT)
        gpa = machine.ram.gpa + page * PAGE_SIZE
        assert f"page {page} of RAM block" in str(err.value)
        assert f"(GPA 0x{gpa:x})" in str(err.value)
        assert err.value.offset == at and err.value.increment == 0
        assert machine.state is RunState.INTERNAL_ERROR
        with pytest.raises(RunStateError, match="internal-error"):
            machine.run()
        assert machine.ram.page(page).tobytes() != damaged  # never installed
        if by == "fault":
            assert loader.stats().fault_pages == 0
        loader.close()
        assert loader.error is err.value
    proc = pyvmm("run", "--incoming", f"chpt:{path}", "--lazy")
    assert proc.returncode == 1
    last = proc.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("pyvmm: error: lazy reload of") and f"page {page} " in last
