"""Putting a guest on a machine: the built-in workload or a static Linux ELF program.

A :class:`GuestSpec` is plain data describing what to run; :func:`boot` builds the machine for it,
loads the guest and returns it ready to :meth:`~pyvmm.machine.Machine.run`.  The CLI, the tests and
the benchmarks all start guests through here, so they take the path a user takes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from .devices.pl011 import UartSink
from .errors import ConfigError
from .guests.workload import WorkloadOptions, build_workload
from .machine import DEFAULT_RAM_SIZE, RAM_BASE, Machine

#: Names ``--guest`` accepts for built-in guests.
BUILTIN_GUESTS = ("workload",)

OutputSink = Callable[[bytes], None]


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    """What to run.  ``program`` is a built-in name or the path of a static ARM64 ELF file."""

    program: str = "workload"
    args: tuple[str, ...] = ()
    workload: WorkloadOptions = dataclasses.field(default_factory=WorkloadOptions)
    files: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    stdin: bytes = b""
    #: The ELF guest's stdin is this process's standard input, read as the guest reads it.
    stdin_live: bool = False
    #: Most bytes the ELF guest's file overlay may hold (ENOSPC past it); None: the default,
    #: half the RAM size (see :func:`pyvmm.linux.vfs.default_files_limit`).
    files_limit: int | None = None

    @property
    def is_builtin(self) -> bool:
        return self.program in BUILTIN_GUESTS

    @property
    def label(self) -> str:
        """A short name for messages: ``workload`` or the ELF's file name and first argument."""
        if self.is_builtin:
            return self.program
        name = os.path.basename(self.program)
        return f"{name} {self.args[0]}" if self.args else name


def boot(spec: GuestSpec, *, ram_size: int = DEFAULT_RAM_SIZE, seed: int = 0,
         uart_sink: UartSink | None = None, stdout: OutputSink | None = None,
         stderr: OutputSink | None = None) -> Machine:
    """A machine with ``spec`` loaded, in the PRELAUNCH state.

    The workload prints through the UART (``uart_sink``); an ELF program's stdout/stderr go to
    ``stdout``/``stderr`` (default: collected by the syscall layer).  Raises ConfigError for a
    guest that cannot be loaded, naming what is wrong.
    """
    machine = Machine(ram_size, seed=seed, uart_sink=uart_sink, name=spec.label)
    try:
        if spec.is_builtin:
            _boot_workload(machine, spec, ram_size, seed)
        else:
            _boot_elf(machine, spec, stdout, stderr)
    except BaseException:
        machine.close()
        raise
    return machine


def _boot_workload(machine: Machine, spec: GuestSpec, ram_size: int, seed: int) -> None:
    if spec.args:
        raise ConfigError(f"the built-in guest {spec.program!r} takes no arguments "
                          f"(use --workload KEY=VALUE,... to tune it)")
    options = dataclasses.replace(spec.workload, seed=seed)
    options.validate(ram_size)
    image = build_workload(options, ram_base=RAM_BASE, ram_size=ram_size)
    machine.write_memory(image.load_gpa, image.code)
    machine.set_entry(image.entry, image.registers)


def _boot_elf(machine: Machine, spec: GuestSpec, stdout: OutputSink | None,
              stderr: OutputSink | None) -> None:
    from .linux import load_program  # the Linux layer is only needed for ELF guests

    argv: Sequence[str] = (os.path.basename(spec.program), *spec.args)
    load_program(machine, spec.program, list(argv), env=dict(spec.env) or None,
                 files=list(spec.files), stdin=spec.stdin, stdout=stdout, stderr=stderr,
                 stdin_live=spec.stdin_live, files_limit=spec.files_limit)
