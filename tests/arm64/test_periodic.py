"""Periodic checkpoints, squash from the command line, and crash safety of a growing chain.

Through the same paths a user takes: ``pyvmm run --period``, ``pyvmm checkpoint squash``,
``--incoming chpt:squash:FILE``, ``pyvmm checkpoint verify``; plus the Python timer's stop rules
(period 0, a failed checkpoint) and kill -9 of the writer at random instants."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.boot import GuestSpec, boot
from pyvmm.errors import PyvmmError
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine, RunState
from pyvmm.migration.checkpoint import Checkpointer, reload
from pyvmm.migration.container import CheckpointFile
from pyvmm.migration.periodic import PeriodicCheckpointer
from pyvmm.migration.reload import STRATEGIES, reload_file
from pyvmm.migration.verify import verify_file

LONG_GUEST = ("--ram", "32M", "--workload",
              "pattern=random,working_set=4M,passes=1000000,report=100000")


def pyvmm(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *map(str, args)], capture_output=True,
                          timeout=timeout, check=False)


def increments(path: Path) -> list[str]:
    with CheckpointFile.open(path) as container:
        return [i.kind for i in container.header.increments]


def test_period_with_max_checkpoints_ends_the_run_with_k_reloadable_increments(
        tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    run = pyvmm("run", "--checkpoint", f"chpt:{path}", "--incremental", "--live", "--checksum",
                "--period", "0.2", "--max-checkpoints", "4", *LONG_GUEST)
    assert run.returncode == 0, run.stderr
    assert b"4 periodic checkpoints taken" in run.stderr
    assert increments(path) == ["full"] + ["incremental"] * 3  # no end-of-run extra
    assert verify_file(path).ok
    for n in range(1, 5):
        for strategy in STRATEGIES:
            machine, report = reload_file(str(path), n, strategy=strategy)
            machine.close()
            assert report.checksums_verified


def test_period_zero_takes_no_periodic_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    run = pyvmm("run", "--checkpoint", f"chpt:{path}", "--period", "0", "--seconds", "0.6",
                *LONG_GUEST)
    assert run.returncode == 0, run.stderr
    assert increments(path) == ["full"]  # only the end-of-run checkpoint
    bad = pyvmm("run", "--checkpoint", f"chpt:{path}", "--period", "-1")
    assert bad.returncode == 1 and b"--period must be" in bad.stderr
    bad = pyvmm("run", "--max-checkpoints", "2")
    assert bad.returncode == 1 and b"needs --period" in bad.stderr


def _guest() -> Machine:
    options = WorkloadOptions(pattern="random", working_set=2 << 20, passes=10**6,
                              report_every=10**6)
    return boot(GuestSpec(workload=options), ram_size=16 << 20, uart_sink=lambda _b: None)


def test_set_period_zero_stops_the_timer(tmp_path: Path) -> None:
    with _guest() as machine:
        checkpointer = Checkpointer(machine, tmp_path / "p.bin", durable=False,
                                    capabilities=["incremental"])
        machine.start()
        timer = PeriodicCheckpointer(checkpointer, 0.05).start()
        deadline = time.monotonic() + 30
        while timer.count < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        timer.set_period(0)
        timer.stop()
        taken = timer.count
        time.sleep(0.3)
        assert taken >= 2 and timer.count == taken and not timer.running
        machine.pause()
        checkpointer.close()
    assert len(increments(tmp_path / "p.bin")) == taken


def test_a_failed_checkpoint_stops_the_timer_and_loses_nothing(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                      check=False).returncode != 0:
        pytest.fail("cannot mount a small tmpfs (the test needs root, as CI has)")
    try:
        path = mount / "p.bin"
        with _guest() as machine:
            checkpointer = Checkpointer(machine, path, durable=False,
                                        capabilities=["incremental"])
            checkpointer.checkpoint()  # the full one fits
            filler = mount / "filler"
            with open(filler, "ab") as handle:
                try:
                    while True:
                        handle.write(b"x" * (1 << 20))
                        handle.flush()
                except OSError:
                    pass
            machine.start()
            timer = PeriodicCheckpointer(checkpointer, 0.05).start()
            deadline = time.monotonic() + 30
            while timer.running and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not timer.running and timer.count == 0
            assert isinstance(timer.error, PyvmmError)
            assert machine.state is RunState.RUNNING  # the guest kept going
            filler.unlink()
            expected: list[object] = []
            checkpointer.on_pause = lambda m: expected.append(
                bytes(m.ram_blocks[0].mem[:16 << 20]))
            checkpointer.checkpoint()  # space again: every page since the full one is in it
            machine.pause()
            checkpointer.close()
        with reload(f"chpt:{path}") as again:
            assert bytes(again.ram_blocks[0].mem[:16 << 20]) == expected[0]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_squash_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    run = pyvmm("run", "-q", "--checkpoint", f"chpt:{path}", "--incremental", "--period", "0.1",
                "--max-checkpoints", "3", *LONG_GUEST)
    assert run.returncode == 0, run.stderr
    squashed = pyvmm("checkpoint", "squash", path, "-n", "2", "-o", tmp_path / "two.bin")
    assert squashed.returncode == 0, squashed.stderr
    assert b"squashed 2 increment(s)" in squashed.stderr and b"100%" in squashed.stderr
    assert increments(tmp_path / "two.bin") == ["full"]
    original = pyvmm("run", "--incoming", "chpt:squash:3:" + str(path), "-q")
    assert original.returncode == 0, original.stderr
    assert increments(Path(f"{path}_squashed")) == ["full"]
    with reload(f"chpt:2:{path}") as a, reload(f"chpt:{tmp_path / 'two.bin'}") as b:
        assert a.cpu_state() == b.cpu_state()
        assert bytes(a.ram_blocks[0].mem) == bytes(b.ram_blocks[0].mem)
    bad = pyvmm("checkpoint", "squash", path, "-n", "9")
    assert bad.returncode == 1 and b"holds 3 increment(s), not 9" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_during_periodic_incremental_checkpoints_leaves_a_loadable_file(
        tmp_path: Path, seed: int) -> None:
    """kill -9 at a random instant: verify passes and every committed increment reloads."""
    path = tmp_path / "p.bin"
    rng = random.Random(seed)
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "-q", "--checkpoint",
                             f"chpt:{path}", "--incremental", "--checksum", "--period", "0.05",
                             *LONG_GUEST], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait for the first checkpoint to be committed, then kill at a random point of the chain
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if increments(path):
                break
        except PyvmmError:
            pass  # not there yet, or its header being written
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    report = verify_file(path)
    assert report.ok, report.problems
    kinds = increments(path)
    for n in range(1, len(kinds) + 1):
        machine, reloaded = reload_file(str(path), n)
        machine.close()
        assert reloaded.checksums_verified
    assert kinds, "killed before the first checkpoint: the test proved nothing"
