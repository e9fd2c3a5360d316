"""The downtime a checkpoint records is the pause the guest saw (issue 14 item 12).

A durable checkpoint syncs its file; the guest need not wait for that once its pages are
written, only the header's publication must.  Each test watches the machine's own run-state
changes, so what it asserts does not depend on how fast the host is.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pyvmm.boot import GuestSpec, boot
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine, RunState
from pyvmm.migration.checkpoint import Checkpointer
from pyvmm.migration.container import CheckpointFile


def _guest() -> Machine:
    options = WorkloadOptions(pattern="random", working_set=4 << 20, passes=10**6,
                              report_every=10**6)
    return boot(GuestSpec(workload=options), ram_size=32 << 20, uart_sink=lambda _b: None)


class PauseWatch:
    """How long each save-vm stop lasted, timed by the machine's state listener."""

    def __init__(self, machine: Machine) -> None:
        self.pauses: list[float] = []
        self._since = 0.0
        machine.add_state_listener(self._changed)

    def _changed(self, old: RunState, new: RunState) -> None:
        if new is RunState.SAVE_VM:
            self._since = time.perf_counter()
        elif old is RunState.SAVE_VM:
            self.pauses.append(time.perf_counter() - self._since)


@pytest.mark.parametrize("capabilities", [(), ("incremental",), ("checksum",),
                                          ("incremental", "checksum")])
def test_a_durable_stop_and_copy_checkpoint_records_the_pause_the_guest_saw(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capabilities: tuple[str, ...]) -> None:
    """The guest runs again before the header is published (the sync no longer stops it), and
    the downtime recorded covers the whole stop (before, it ended before the commit's sync while
    the guest stayed stopped through it)."""
    published_while: list[RunState] = []
    real_write_header = CheckpointFile._write_header

    def watched_write_header(self: CheckpointFile, header: object) -> None:
        published_while.append(machine.state)
        real_write_header(self, header)  # type: ignore[arg-type]

    monkeypatch.setattr(CheckpointFile, "_write_header", watched_write_header)
    with _guest() as machine:
        watch = PauseWatch(machine)
        machine.start()
        checkpointer = Checkpointer(machine, tmp_path / "d.bin", durable=True,
                                    capabilities=capabilities)
        try:
            for _ in range(2):
                stats = checkpointer.checkpoint()
                assert published_while[-1] is RunState.RUNNING
                assert stats.downtime_ms >= watch.pauses[-1] * 1e3
                assert stats.setup_ms <= stats.downtime_ms <= stats.total_ms
        finally:
            checkpointer.close()
            machine.pause()
        with CheckpointFile.open(tmp_path / "d.bin") as container:
            stored = container.stats(1)
        assert stored["downtime_ms"] == stats.downtime_ms


def test_a_live_checkpoint_records_the_pause_the_guest_saw(tmp_path: Path) -> None:
    with _guest() as machine:
        watch = PauseWatch(machine)
        machine.start()
        checkpointer = Checkpointer(machine, tmp_path / "l.bin", durable=True,
                                    capabilities=("live", "incremental"))
        try:
            for _ in range(2):
                stats = checkpointer.checkpoint()
                assert stats.downtime_ms >= watch.pauses[-1] * 1e3
                assert stats.downtime_ms <= stats.total_ms
        finally:
            checkpointer.close()
            machine.pause()
