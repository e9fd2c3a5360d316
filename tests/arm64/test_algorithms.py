"""The algorithm registry and its seams, through the CLI and the Checkpointer: names listed,
unknown names refused with the known ones, built-ins and module:attribute parts chosen by name,
and every built-in combination saving the same machine."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from pyvmm.boot import GuestSpec, boot
from pyvmm.errors import ConfigError
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.migration.algorithms import available, resolve
from pyvmm.migration.checkpoint import Checkpointer, reload
from pyvmm.migration.savers import StopAndCopySaver
from pyvmm.migration.seams import DirtyTracker, SavedPages, SaveJob, TrackerOptions
from pyvmm.ram import PageBitmap, RamBlock
from pyvmm.testing.digest import ram_digest

GUEST = WorkloadOptions.parse("pattern=random,working_set=2M,passes=0,report=0")


def pyvmm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *map(str, args)], capture_output=True,
                          text=True, timeout=300, check=False)


class CountingSaver(StopAndCopySaver):
    """stop-and-copy that counts its saves (a third-party saver by module:attribute)."""

    saves = 0

    def save(self, job: SaveJob) -> SavedPages:
        type(self).saves += 1
        return super().save(job)


class EverythingTracker:
    """A (wasteful but correct) tracker: every page is dirty at every pause."""

    kind = "everything"

    def __init__(self, blocks: Sequence[RamBlock], options: TrackerOptions) -> None:
        self.blocks = list(blocks)

    def collect(self) -> dict[str, PageBitmap]:
        selection = {}
        for block in self.blocks:
            bitmap = block.new_bitmap()
            bitmap.set_range(0, block.page_count)
            selection[block.name] = bitmap
        return selection

    def stop(self) -> None:
        pass


def test_pyvmm_algorithms_lists_every_builtin_with_a_line() -> None:
    proc = pyvmm("algorithms")
    assert proc.returncode == 0, proc.stderr
    for name in ("async", "wp", "hash", "stop-and-copy", "live", "cow"):
        line = next(line for line in proc.stdout.splitlines() if line.split()[:1] == [name])
        assert len(line.split()) > 3  # a description follows the name
    assert set(available("tracker")) >= {"async", "wp", "hash"}


@pytest.mark.parametrize("option, value, message", [
    ("--tracker", "nope", "pyvmm: error: tracker must be one of async, wp, hash"),
    ("--saver", "nope", "pyvmm: error: saver must be one of stop-and-copy, live, cow"),
    ("--saver", "no.such.module:Saver", "pyvmm: error: saver no.such.module:Saver: cannot "
                                        "load it: No module named 'no'"),
])
def test_negative_unknown_algorithm_names_list_the_known_ones(tmp_path: Path, option: str,
                                                              value: str, message: str) -> None:
    proc = pyvmm("run", "--incremental", option, value, "--checkpoint", f"chpt:{tmp_path / 'x'}")
    assert proc.returncode == 1
    assert proc.stderr.startswith(message), proc.stderr
    assert proc.stderr.count("\n") == 1
    with pytest.raises(ConfigError, match="unknown tracker 'nope'"):
        resolve("tracker", "nope")


def test_a_module_attribute_saver_and_tracker_take_the_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "c.chpt"
    with boot(GuestSpec(workload=GUEST), ram_size=8 << 20) as machine:
        checkpointer = Checkpointer(
            machine, path, durable=False, capabilities=["incremental"],
            tracker=f"{__name__}:EverythingTracker", saver=f"{__name__}:CountingSaver")
        try:
            before = CountingSaver.saves
            machine.run(max_insns=50_000)
            first = checkpointer.checkpoint()
            machine.run(max_insns=50_000)
            second = checkpointer.checkpoint()
            expected = ram_digest(machine)
        finally:
            checkpointer.close()
    assert CountingSaver.saves == before + 2
    assert (first.kind, second.kind) == ("full", "incremental")
    assert second.tracker == "everything" and second.saver == f"{__name__}:CountingSaver"
    assert second.pages + second.zero_pages == (8 << 20) // 4096  # every page, as it said
    with reload(f"chpt:{path}") as copy:
        assert ram_digest(copy) == expected


@pytest.mark.parametrize("saver, tracker", [
    ("stop-and-copy", "async"), ("stop-and-copy", "wp"), ("stop-and-copy", "hash"),
    ("live", "async"), ("cow", "hash"), ("cow", "wp"),
])
def test_every_builtin_combination_saves_the_same_machine(tmp_path: Path, saver: str,
                                                          tracker: str) -> None:
    """Same guest, same instruction counts: every saver x tracker chain reloads, increment by
    increment, to the RAM the stopped machine had at each checkpoint."""
    path = tmp_path / "c.chpt"
    digests = []
    with boot(GuestSpec(workload=GUEST), ram_size=8 << 20) as machine:
        checkpointer = Checkpointer(machine, path, durable=False, capabilities=["incremental"],
                                    tracker=tracker, saver=saver)
        try:
            for budget in (30_000, 70_000, 1, 120_000):
                machine.run(max_insns=budget)
                stats = checkpointer.checkpoint()
                assert stats.saver == saver
                digests.append(ram_digest(machine))
        finally:
            checkpointer.close()
    for count, digest in enumerate(digests, start=1):
        with reload(f"chpt:{count}:{path}") as copy:
            assert ram_digest(copy) == digest, (saver, tracker, count)


def test_cli_saver_and_tracker_by_name_reload_to_the_run_they_saved(tmp_path: Path) -> None:
    path = tmp_path / "c.chpt"
    workload = "pattern=random,working_set=1M,passes=40,report=0"
    whole = pyvmm("run", "-q", "--workload", workload)
    saved = pyvmm("run", "-q", "--workload", workload, "--incremental", "--saver", "cow",
                  "--tracker", "hash", "--checkpoint-at", "200K,400K", "--max-insns", "600K",
                  "--checkpoint", f"chpt:{path}", "--no-fsync")
    assert saved.returncode == 0, saved.stderr
    info = pyvmm("checkpoint", "info", "--json", path)
    assert '"saver": "cow"' in info.stdout and '"tracker": "hash"' in info.stdout
    rest = pyvmm("run", "-q", "--incoming", f"chpt:{path}")
    assert rest.returncode == 0, rest.stderr
    assert saved.stdout + rest.stdout == whole.stdout


def test_a_live_saver_tracks_with_its_own_session_whatever_tracker_is_named(
        tmp_path: Path) -> None:
    """A live checkpointer's write-protect session is its incremental tracker (one userfaultfd
    for its life): a plug-in tracker's name there is no error, and the stats say wp."""
    path = tmp_path / "c.chpt"
    with boot(GuestSpec(workload=GUEST), ram_size=8 << 20) as machine:
        checkpointer = Checkpointer(machine, path, durable=False,
                                    capabilities=["live", "incremental"],
                                    tracker=f"{__name__}:EverythingTracker")
        try:
            machine.start()
            kinds = [checkpointer.checkpoint() for _ in range(2)]
            machine.pause()
        finally:
            checkpointer.close()
    assert [(s.kind, s.tracker, s.saver) for s in kinds] == [
        ("full", "wp", "live"), ("incremental", "wp", "live")]
