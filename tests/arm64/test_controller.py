"""VmController, in process: the run-state rules the monitors rely on, cancel, capability and
parameter checks, and reloads that swap the machine.  (The same paths through real sockets and
QEMU's client: test_monitor.py.)"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pyvmm.boot import GuestSpec, boot
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import RunState, StopReason
from pyvmm.migration.checkpoint import CheckpointCancelled
from pyvmm.migration.container import CheckpointFile
from pyvmm.monitor.controller import MIGRATION_IN_PROGRESS, CommandError, VmController
from pyvmm.monitor.events import Event
from pyvmm.monitor.settings import MigrationSettings
from pyvmm.testing.digest import ram_digest

FOREVER = WorkloadOptions.parse("pattern=random,working_set=1M,passes=0,report=0")


def new_vm(**settings: object) -> VmController:
    machine = boot(GuestSpec(program="workload", workload=FOREVER), ram_size=16 << 20)
    return VmController(machine, settings=MigrationSettings(durable=False, **settings))


def kinds(path: Path) -> list[str]:
    with CheckpointFile.open(path) as container:
        return [i.kind for i in container.header.increments]


def test_stop_does_not_end_the_run_cont_goes_on_and_quit_ends_it() -> None:
    vm = new_vm()
    events: list[str] = []
    vm.events.subscribe(lambda event: events.append(event.name))
    machine = vm.machine
    assert machine is not None
    outcome: list[object] = []
    runner = threading.Thread(target=lambda: outcome.append(vm.run()))
    runner.start()
    try:
        while machine.state is not RunState.RUNNING:
            threading.Event().wait(0.01)
        vm.stop()
        assert vm.status() == {"status": "paused", "running": False, "singlestep": False}
        runner.join(0.3)
        assert runner.is_alive(), "a monitor's stop ended the run"
        vm.cont()
        assert vm.status()["running"] is True
        vm.quit()
        runner.join(30)
        assert not runner.is_alive()
    finally:
        vm.quit()
        runner.join()
        vm.close()
        machine.close()
    result = outcome[0]
    assert result.reason is StopReason.QUIT
    assert events[:2] == ["RESUME", "STOP"] and "SHUTDOWN" in events


def test_a_cancelled_checkpoint_commits_nothing_and_loses_no_page(tmp_path: Path) -> None:
    """migrate_cancel's effect on a checkpoint in flight: nothing in the file, and the next
    (incremental) checkpoint still holds every page the cancelled one would have."""
    chpt = tmp_path / "c.chpt"
    vm = new_vm(capabilities={"incremental": True})
    machine = vm.machine
    assert machine is not None
    statuses: list[str] = []
    vm.events.subscribe(lambda e: statuses.append(e.data["status"]) if e.name == "MIGRATION"
                        else None)
    try:
        machine.run(max_insns=200_000)
        vm.checkpoint(str(chpt))
        machine.run(max_insns=300_000)
        cancelled = threading.Event()
        cancelled.set()
        with pytest.raises(CheckpointCancelled):
            vm.checkpoint(str(chpt), cancel=cancelled)
        assert kinds(chpt) == ["full"]
        assert vm.query_migrate()["status"] == "cancelled"
        stats = vm.checkpoint(str(chpt))
        assert stats.kind == "incremental" and stats.pages > 0
        expected = ram_digest(machine)
    finally:
        vm.close()
        machine.close()
    assert statuses == ["setup", "active", "completed", "setup", "active", "cancelled",
                        "setup", "active", "completed"]
    vm2 = VmController(None, start_paused=True)  # --incoming defer --paused
    try:
        vm2.migrate_incoming(f"chpt:{chpt}")
        assert vm2.machine is not None and ram_digest(vm2.machine) == expected
    finally:
        if vm2.machine is not None:
            vm2.machine.close()


def test_settings_are_checked_and_frozen_while_a_migration_runs(tmp_path: Path) -> None:
    vm = new_vm()
    machine = vm.machine
    assert machine is not None
    try:
        with pytest.raises(CommandError, match="exclude each other"):
            vm.set_capabilities({"live": True, "cow": True})
        with pytest.raises(CommandError, match="saver-nice must be 0..19"):
            vm.set_parameters({"saver-nice": 42})
        with pytest.raises(CommandError, match="tracker must be one of"):
            vm.set_parameters({"tracker": "magic"})
        assert vm.settings.capabilities["live"] is False  # nothing half applied
        machine.start()
        vm.migrate(f"chpt:{tmp_path / 'p.chpt'}", period=30)
        with pytest.raises(CommandError) as err:
            vm.migrate(f"chpt:{tmp_path / 'q.chpt'}")
        assert str(err.value) == MIGRATION_IN_PROGRESS
        with pytest.raises(CommandError, match="in progress"):
            vm.set_capabilities({"incremental": True})
        vm.migrate_cancel()
        reply = vm.wait_migration()
        assert reply["status"] in ("cancelled", "completed")
        vm.set_capabilities({"incremental": True})  # over: settings may change again
        with pytest.raises(CommandError, match="invalid checkpoint target"):
            vm.migrate("file:/tmp/x")
        with pytest.raises(CommandError, match="migrate takes chpt:FILE"):
            vm.migrate(f"chpt:2:{tmp_path / 'p.chpt'}")
        with pytest.raises(CommandError, match="not specified on the command line"):
            vm.migrate_incoming(f"chpt:{tmp_path / 'p.chpt'}")
    finally:
        vm.close()
        machine.close()
    assert not (tmp_path / "q.chpt").exists()


def test_reload_swaps_the_machine_and_the_next_checkpoint_grows_the_chain(
        tmp_path: Path) -> None:
    """A reload into the running process: a new machine with the file's state replaces the
    running one (which is closed), runs on, and the next checkpoint is a full one appended to
    the same chain."""
    chpt = tmp_path / "c.chpt"
    vm = new_vm(capabilities={"incremental": True})
    first = vm.machine
    assert first is not None
    seen: list[Event] = []
    vm.events.subscribe(seen.append)
    try:
        first.run(max_insns=100_000)
        vm.checkpoint(str(chpt))
        saved = ram_digest(first)
        first.run(max_insns=100_000)
        vm.checkpoint(str(chpt))
        assert ram_digest(first) != saved
        assert vm.reload(f"chpt:1:{chpt}") == 1
        second = vm.machine
        assert second is not None and second is not first
        assert ram_digest(second) == saved
        with pytest.raises(Exception, match="closed"):
            first.cpu_state()
        second.run(max_insns=100_000)
        vm.checkpoint()
        assert kinds(chpt) == ["full", "incremental", "full"]
        with pytest.raises(CommandError, match="holds 3 increment"):
            vm.reload(f"chpt:7:{chpt}")
        assert vm.machine is second  # a failed reload leaves the machine as it was
    finally:
        vm.close()
        if vm.machine is not None:
            vm.machine.close()
    reloads = [e.data for e in seen if e.name == "RELOAD"]
    assert reloads == [{"file": str(chpt), "increments": 1}]
