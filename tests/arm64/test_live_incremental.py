"""Incremental and live checkpoints (issue 4) against the oracles of DESIGN.md §9:
a live checkpoint holds RAM exactly as at its pause; reloading increments 0..k gives the state at
checkpoint k; the first incremental on a full equals a second full; stats agree with the file;
a failed checkpoint loses no dirty page."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.boot import GuestSpec, boot
from pyvmm.errors import ConfigError, PyvmmError, StreamError
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine
from pyvmm.migration.checkpoint import Checkpointer, reload
from pyvmm.migration.container import CheckpointFile
from pyvmm.migration.postcopy_uffd import WriteProtectSession


def ram_digest(machine: Machine) -> str:
    digest = hashlib.sha256()
    for block in machine.ram_blocks:
        for first, count in block.nonzero_pages().runs():
            digest.update(first.to_bytes(8, "little"))
            digest.update(block.mem[first * 4096:(first + count) * 4096])
    return digest.hexdigest()


def state(machine: Machine) -> tuple[str, object, object]:
    return ram_digest(machine), machine.cpu_state(), dataclasses.replace(machine.uart.state)


def workload(pattern: str, size: str = "8M") -> Machine:
    options = WorkloadOptions.parse(f"pattern={pattern},working_set={size},passes=0,touch=64")
    return boot(GuestSpec(workload=options), ram_size=32 << 20, seed=7)


def chain_states(path: Path, count: int) -> Iterator[tuple[str, object, object]]:
    for k in range(1, count + 1):
        with reload(f"chpt:{k}:{path}") as machine:
            yield state(machine)


@pytest.mark.parametrize("tracker", ["async", "wp"])
def test_incremental_chain_reloads_every_prefix(tmp_path: Path, tracker: str) -> None:
    path = tmp_path / "inc.bin"
    expected = []
    with workload("hotcold") as machine:
        checkpointer = Checkpointer(machine, path, capabilities=["incremental"], tracker=tracker)
        for k in range(4):
            machine.run(max_insns=300_000)
            # host-side writes between checkpoints must be caught too, including a page that
            # becomes zero again
            machine.write_memory(0x4000_0000 + (20 << 20) + k * 4096, b"host %d" % k)
            if k == 3:
                machine.write_memory(0x4000_0000 + (20 << 20), bytes(4096))
            stats = checkpointer.checkpoint()
            expected.append(state(machine))
            assert stats.kind == ("full" if k == 0 else "incremental")
        checkpointer.close()
    assert list(chain_states(path, 4)) == expected
    with CheckpointFile.open(path) as container:
        increments = container.header.increments
        assert [i.kind for i in increments] == ["full"] + ["incremental"] * 3
        assert all(i.parent == i.index - 1 for i in increments[1:])
        for inc in increments:  # stats agree with the file's page index
            runs = container.page_index(inc.index)
            assert sum(r.npages for r in runs if not r.zero) == inc.pages
            assert sum(r.npages for r in runs if r.zero) == inc.zero_pages
            assert container.stats(inc.index)["pages"] == inc.pages


def test_first_incremental_on_a_full_equals_a_second_full(tmp_path: Path) -> None:
    with workload("random") as machine:
        inc = Checkpointer(machine, tmp_path / "inc.bin", capabilities=["incremental"])
        machine.run(max_insns=200_000)
        inc.checkpoint()
        machine.run(max_insns=200_000)
        inc.checkpoint()
        full = Checkpointer(machine, tmp_path / "full.bin")
        full.checkpoint()
        inc.close()
        full.close()
    assert list(chain_states(tmp_path / "inc.bin", 2))[-1] == \
        next(chain_states(tmp_path / "full.bin", 1))


@pytest.mark.parametrize(("capabilities", "tracker", "pattern", "fault_mode"), [
    (["live"], "async", "random", "thread"),
    (["live"], "async", "sequential", "signal"),
    (["cow"], "async", "random", "thread"),
    (["cow", "incremental"], "wp", "hotcold", "thread"),
    (["live", "incremental"], "async", "sequential", "thread"),
    (["live", "incremental"], "wp", "random", "thread"),
    (["live", "incremental"], "wp", "random", "signal"),
])
def test_live_checkpoints_hold_ram_as_at_the_pause(tmp_path: Path, capabilities: list[str],
                                                   tracker: str, pattern: str,
                                                   fault_mode: str) -> None:
    """The guest writes hard while each checkpoint is saved; what is saved is the pause's RAM."""
    path = tmp_path / "live.bin"
    at_pause: list[tuple[str, object, object]] = []
    with workload(pattern, "16M") as machine:
        checkpointer = Checkpointer(machine, path, capabilities=capabilities, tracker=tracker,
                                    fault_mode=fault_mode)
        checkpointer.on_pause = lambda m: at_pause.append(state(m))
        machine.start()
        faults = 0
        for _ in range(6):
            time.sleep(0.03)
            stats = checkpointer.checkpoint()
            faults += stats.write_faults
            assert stats.downtime_ms < stats.total_ms
        machine.pause()
        checkpointer.close()
    assert faults > 0 or "cow" in capabilities  # the guest wrote into protected RAM
    assert list(chain_states(path, 6)) == at_pause


def test_increment_pattern_snapshot_is_consistent(tmp_path: Path) -> None:
    """DESIGN.md §9: a consistent snapshot of the 'increment' guest has one boundary."""
    path = tmp_path / "incr.bin"
    with workload("increment", "4M") as machine:
        checkpointer = Checkpointer(machine, path, capabilities=["live"])
        machine.start()
        for _ in range(5):
            time.sleep(0.02)
            checkpointer.checkpoint()
        machine.pause()
        checkpointer.close()
    for k in range(1, 6):
        with reload(f"chpt:{k}:{path}") as copy:
            base = 0x4000_0000 + (1 << 20)
            firsts = [copy.read_memory(base + p * 4096, 1)[0] for p in range(1024)]
        boundaries = sum(1 for a, b in zip(firsts, firsts[1:]) if a != b)
        assert boundaries <= 1, firsts
        assert firsts[0] in (firsts[-1], (firsts[-1] + 1) & 0xFF)


@pytest.mark.parametrize("caps", [("--incremental",), ("--incremental", "--live", "--tracker",
                                                      "wp"), ("--incremental", "--cow"),
                                  ("--incremental", "--live", "--tracker", "wp",
                                   "--fault-mode", "signal", "--saver-nice", "3")])
def test_cpu_and_kernel_writes_by_a_linux_guest_are_tracked(tmp_path: Path, busybox: Path,
                                                            caps: tuple[str, ...]) -> None:
    """busybox reads a file (the kernel writes guest RAM through read()) and computes on it."""
    data = tmp_path / "data.bin"
    data.write_bytes(hashlib.shake_256(b"tracked").digest(256 << 10))
    args = ("--ram", "64M", "--files", data, "--guest", busybox, "gzip", "-c", data)

    def pyvmm(*extra: str | Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "pyvmm", "run", "-q", *map(str, extra)],
                              capture_output=True, timeout=300, check=False)

    whole = pyvmm(*args)
    chain = tmp_path / "chain.bin"
    first = pyvmm(*caps, "--checkpoint-at", "400K,800K", "--max-insns", "1200K",
                  "--checkpoint", f"chpt:{chain}", *args)
    assert first.returncode == 0, first.stderr
    second = pyvmm("--incoming", f"chpt:{chain}")
    assert first.stdout + second.stdout == whole.stdout
    # each prefix of the chain resumes to the same output as well
    for k in (1, 2):
        rest = pyvmm("--incoming", f"chpt:{k}:{chain}").stdout
        assert whole.stdout.endswith(rest) and rest


def test_negative_fault_mode_and_saver_nice_are_checked(tmp_path: Path) -> None:
    with workload("sequential") as machine:
        with pytest.raises(ConfigError, match="fault mode 'fast'"):
            Checkpointer(machine, tmp_path / "x.bin", capabilities=["live"], fault_mode="fast")
        with pytest.raises(ConfigError, match="saver_nice must be 0..19, not 20"):
            Checkpointer(machine, tmp_path / "x.bin", capabilities=["live"], saver_nice=20)


def test_negative_userfaultfd_unavailable(tmp_path: Path) -> None:
    env = dict(os.environ, PYVMM_UFFD_INJECT_OPEN_ERRNO="1")
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--max-insns", "100K",
                           "--incremental", "--checkpoint", f"chpt:{tmp_path / 'x.bin'}"],
                          capture_output=True, timeout=120, env=env, check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode().splitlines()[-1]
    assert err.startswith("pyvmm: error: ") and "userfaultfd" in err
    assert "incremental" in err


@pytest.mark.parametrize(("capabilities", "tracker"), [
    (["incremental"], "async"),
    (["incremental", "live"], "wp"),
])
def test_negative_disk_full_loses_no_dirty_page(tmp_path: Path, capabilities: list[str],
                                                tracker: str) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                      check=False).returncode != 0:
        pytest.fail("cannot mount a small tmpfs (the test needs root, as CI has)")
    try:
        filler = mount / "filler"
        path = mount / "chain.bin"
        expected = []
        with workload("hotcold", "8M") as machine:
            checkpointer = Checkpointer(machine, path, capabilities=capabilities,
                                        tracker=tracker, durable=False)
            machine.run(max_insns=300_000)
            checkpointer.checkpoint()
            expected.append(state(machine))
            with open(filler, "wb") as handle:  # fill the disk
                try:
                    while True:
                        handle.write(b"\xff" * (1 << 20))
                except OSError:
                    pass
            machine.run(max_insns=300_000)
            with pytest.raises(StreamError) as failure:
                checkpointer.checkpoint()
            assert "No space left" in str(failure.value)
            assert isinstance(failure.value, PyvmmError)
            machine.run(max_insns=300_000)  # the guest keeps running
            filler.unlink()
            checkpointer.checkpoint()  # holds every page dirtied since the first checkpoint
            expected.append(state(machine))
            checkpointer.close()
        assert list(chain_states(path, 2)) == expected
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("tracker", ["async", "wp"])
def test_live_incremental_keeps_one_userfaultfd(tmp_path: Path, tracker: str) -> None:
    """A live incremental chain re-arms one session (one userfaultfd, one registration) at every
    pause, whichever tracker was named; the chain still reloads to each pause's state."""
    path = tmp_path / "chain.bin"
    at_pause: list[tuple[str, object, object]] = []
    with workload("random", "8M") as machine:
        checkpointer = Checkpointer(machine, path, capabilities=["live", "incremental"],
                                    tracker=tracker)
        checkpointer.on_pause = lambda m: at_pause.append(state(m))
        machine.start()
        sessions = set()
        fds = set()
        kinds = []
        for _ in range(4):
            time.sleep(0.03)
            stats = checkpointer.checkpoint()
            kinds.append(stats.kind)
            assert stats.tracker == "wp"  # the live session tracks, see pyvmm.migration.dirty
            live = checkpointer.tracker
            assert live is not None and hasattr(live, "session")
            sessions.add(id(live.session))
            fds.add(live.session._uffd.fileno())
        machine.pause()
        checkpointer.close()
    assert kinds == ["full"] + ["incremental"] * 3
    assert len(sessions) == 1 and len(fds) == 1 and -1 not in fds
    assert list(chain_states(path, 4)) == at_pause


def test_live_only_checkpointer_tracks_nothing_between_checkpoints(tmp_path: Path) -> None:
    with workload("sequential", "4M") as machine:
        checkpointer = Checkpointer(machine, tmp_path / "live.bin", capabilities=["live"])
        machine.start()
        time.sleep(0.02)
        stats = checkpointer.checkpoint()
        assert checkpointer.tracker is None and stats.pages_carried == 0
        machine.pause()
        # RAM is no longer registered: a new userfaultfd can take it
        session = WriteProtectSession(machine.ram_blocks, tracking_only=True)
        session.stop()
        checkpointer.close()
