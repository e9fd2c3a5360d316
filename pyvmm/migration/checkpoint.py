"""Checkpoint orchestration: ``chpt:`` targets, taking a checkpoint of a machine, reloading one.

Grammar of targets (as in the original QEMU fork)::

    chpt:FILE              save increments into FILE / reload every increment of FILE
    chpt:N:FILE            reload the first N increments of FILE
    chpt:squash[:N]:FILE   fold the first N (default all) increments into one full checkpoint

A checkpoint here is stop-and-copy: the vCPU is paused (run state ``save-vm``), every populated
RAM page, the CPU and the devices are written as one QEMU v3 stream appended to the container as
an increment, and the machine goes back to the state it was in.  A reload builds a machine with
the file's RAM layout, loads the chosen increments in order and leaves it PAUSED, ready to run.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devices.pl011 import UartSink
from ..errors import ConfigError, FormatError, PyvmmError
from ..machine import MAIN_RAM_NAME, Machine, RunState
from ..ram import PAGE_SIZE
from .container import CheckpointFile, IncrementInfo, PageRun, RamBlockInfo
from .machine_state import (
    MachineStateEntries,
    apply,
    capture,
    linux_state_from,
    machine_save_state,
)
from .ram_handler import IndexedRun
from .stream import QEMUFile

OutputSink = Callable[[bytes], None]
_TARGET_RE = re.compile(r"^chpt:(?:(?P<squash>squash)(?::(?P<sn>\d+))?:|(?P<n>\d+):)?(?P<file>.+)$")


@dataclasses.dataclass(frozen=True)
class CheckpointTarget:
    """A parsed ``chpt:`` URI."""

    path: str
    count: int | None = None  # reload only the first N increments
    squash: bool = False

    def __str__(self) -> str:
        if self.squash:
            return f"chpt:squash{'' if self.count is None else f':{self.count}'}:{self.path}"
        return f"chpt:{'' if self.count is None else f'{self.count}:'}{self.path}"


def parse_target(uri: str) -> CheckpointTarget:
    """Parse ``chpt:[N:]FILE`` or ``chpt:squash[:N]:FILE``; ConfigError naming what is wrong."""
    if not uri.startswith("chpt:"):
        raise ConfigError(f"invalid checkpoint target {uri!r}: expected chpt:FILE, chpt:N:FILE "
                          f"or chpt:squash[:N]:FILE")
    match = _TARGET_RE.match(uri)
    if match is None:
        raise ConfigError(f"invalid checkpoint target {uri!r}: no file name")
    count_text = match.group("n") or match.group("sn")
    count = int(count_text) if count_text is not None else None
    if count is not None and count < 1:
        raise ConfigError(f"invalid checkpoint target {uri!r}: N must be at least 1")
    return CheckpointTarget(path=match.group("file"), count=count,
                            squash=match.group("squash") is not None)


@dataclasses.dataclass(frozen=True)
class CheckpointStats:
    """What one checkpoint cost and wrote; stored with the increment and shown by ``info``."""

    increment: int
    kind: str
    pages: int
    zero_pages: int
    bytes_written: int
    total_ms: float
    setup_ms: float
    downtime_ms: float
    throughput_mib_s: float
    devices: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Checkpointer:
    """Takes checkpoints of one machine into one container file.

    Methods are called from any thread but the vCPU's (typically the main thread between runs,
    or a timer/monitor thread while the guest runs).
    """

    def __init__(self, machine: Machine, path: str | Path, *, append: bool = False,
                 durable: bool = True) -> None:
        """``durable``: fsync each increment and header (see :attr:`CheckpointFile.durable`)."""
        self.machine = machine
        self.path = Path(path)
        self._append = append
        self._durable = durable
        self._file: CheckpointFile | None = None
        self.entries: MachineStateEntries = machine_save_state(machine)
        self.history: list[CheckpointStats] = []

    def _container(self) -> CheckpointFile:
        if self._file is None:
            layout = tuple(RamBlockInfo(b.name, b.gpa, b.size) for b in self.machine.ram_blocks)
            if self._append and self.path.exists():
                self._file = CheckpointFile.open(self.path, writable=True)
                if self._file.header.ram_blocks != layout:
                    self._file.close()
                    self._file = None
                    raise ConfigError(f"{self.path} holds a machine with another RAM layout; "
                                      f"write the checkpoint to a new file")
            else:
                self._file = CheckpointFile.create(self.path, page_size=PAGE_SIZE,
                                                   ram_blocks=layout, machine=self.machine.name,
                                                   overwrite=True)
            self._file.durable = self._durable
        return self._file

    def checkpoint(self) -> CheckpointStats:
        """Take a full stop-and-copy checkpoint; the machine keeps the run state it had.

        On failure nothing is committed (the file keeps its earlier increments), the guest
        carries on, and the error is raised.
        """
        machine = self.machine
        started = time.perf_counter()
        was_running = machine.pause(RunState.SAVE_VM)
        before = machine.state
        if not was_running:
            machine.set_state(RunState.SAVE_VM)
        ok = False
        try:
            stats = self._write_full(started, ended=before is RunState.SHUTDOWN)
            ok = True
            return stats
        finally:
            machine.guest_inform.checkpoint_finished(ok)
            if was_running:
                machine.resume()
            else:
                machine.set_state(before if before is not RunState.PRELAUNCH else RunState.PAUSED)

    def _write_full(self, started: float, *, ended: bool) -> CheckpointStats:
        machine = self.machine
        container = self._container()
        machine.guest_inform.checkpoint_started()
        capture(machine, self.entries, ended=ended)
        setup_done = time.perf_counter()
        ram = self.entries.ram
        ram.select({b.name: b.populated_pages() for b in machine.ram_blocks})
        writer = container.begin_increment("full")
        try:
            f = QEMUFile.for_writing(container.fd, writer.stream_offset)
            save_state = self.entries.save_state
            save_state.save_header(f)
            save_state.save_setup(f)
            save_state.save_iterate(f)
            save_state.save_complete(f)
            devices = save_state.save_devices(f)
            save_state.save_trailer(f, devices, PAGE_SIZE)
            f.flush()
            elapsed = time.perf_counter() - started
            stats = CheckpointStats(
                increment=writer.index, kind="full", pages=ram.counters.data_pages,
                zero_pages=ram.counters.zero_pages, bytes_written=f.pos,
                total_ms=elapsed * 1e3, setup_ms=(setup_done - started) * 1e3,
                downtime_ms=elapsed * 1e3,
                throughput_mib_s=f.pos / max(elapsed, 1e-9) / (1 << 20),
                devices=tuple(f"{d['name']}/{d['instance_id']} v{d['version']}"
                              for d in devices))
            writer.commit(stream_length=f.pos,
                          page_runs=[PageRun(r.block, r.first_page, r.npages, r.data_offset,
                                             r.zero) for r in ram.runs],
                          pages=ram.counters.data_pages, zero_pages=ram.counters.zero_pages,
                          stats=stats.as_dict())
        except BaseException:
            writer.abort()
            raise
        self.history.append(stats)
        return stats

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _main_ram_size(blocks: tuple[RamBlockInfo, ...], path: str) -> int:
    for block in blocks:
        if block.name == MAIN_RAM_NAME:
            return block.size
    raise FormatError(f"{path} has no {MAIN_RAM_NAME} RAM block")


def reload(target: CheckpointTarget | str, *, uart_sink: UartSink | None = None,
           stdout: OutputSink | None = None, stderr: OutputSink | None = None) -> Machine:
    """A new machine holding the state of the target's first N (default all) increments.

    The machine is PAUSED (or SHUTDOWN, if the guest had powered off when it was saved), ready
    for :meth:`Machine.run`.  Raises FormatError (one line, naming file, increment and section)
    for a damaged or foreign file, ConfigError for a bad target.
    """
    if isinstance(target, str):
        target = parse_target(target)
    if target.squash:
        raise ConfigError("squash (chpt:squash:...) is not available yet: reload with chpt:FILE")
    with CheckpointFile.open(target.path) as container:
        header = container.header
        available = len(header.increments)
        if available == 0:
            raise FormatError(f"{target.path} holds no checkpoint yet")
        count = available if target.count is None else target.count
        if count > available:
            raise ConfigError(f"{target.path} holds {available} increment(s), not {count}")
        machine = Machine(_main_ram_size(header.ram_blocks, target.path),
                          uart_sink=uart_sink, name=header.machine or "guest")
        try:
            _load_increments(machine, container, header.increments[:count], header.ram_blocks,
                             stdout, stderr)
        except BaseException:
            machine.close()
            raise
    return machine


def _load_increments(machine: Machine, container: CheckpointFile,
                     increments: tuple[IncrementInfo, ...], layout: tuple[RamBlockInfo, ...],
                     stdout: OutputSink | None, stderr: OutputSink | None) -> None:
    for block in layout:
        if block.name != MAIN_RAM_NAME:
            machine.add_ram_block(block.name, block.gpa, block.size)
    machine.set_state(RunState.INMIGRATE)
    entries = machine_save_state(machine, with_linux=True)
    for info in increments:
        runs = container.page_index(info.index)
        entries.ram.set_load_index([IndexedRun(r.block, r.first_page, r.npages, r.data_offset,
                                               r.zero) for r in runs])
        f = QEMUFile.for_reading(container.fd, info.stream_offset, info.stream_length)
        try:
            entries.save_state.load(f)
        except FormatError as err:
            raise err.located(increment=info.index) from err
    apply(machine, entries)
    machine.seed = entries.machine_section.seed
    linux_state = linux_state_from(entries)
    if linux_state is not None:
        from ..linux import attach_process  # only Linux guests need the layer

        try:
            attach_process(machine, linux_state, stdout=stdout, stderr=stderr)
        except PyvmmError as err:
            raise FormatError(f"cannot restore the Linux process: {err}",
                              section="linux-user") from err
    machine.guest_inform.restored()
    machine.guest_inform.checkpoint_finished(True)  # the checkpoint we came from completed
    machine.set_state(RunState.PAUSED)
    if entries.machine_section.ended:
        machine.mark_shutdown(entries.machine_section.exit_code)

