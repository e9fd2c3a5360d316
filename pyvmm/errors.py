"""The exception tree of pyvmm: one root, subclasses by meaning, structured fields."""

from __future__ import annotations


class PyvmmError(Exception):
    """Root of every error pyvmm raises on purpose.

    ``str(err)`` is one line a user can act on; the CLI prints it as ``pyvmm: error: ...``.
    """


class ConfigError(PyvmmError):
    """A machine, guest or command-line setting is invalid (bad size, unknown option...)."""


class GuestError(PyvmmError):
    """The guest did something the machine cannot carry on from.

    Carries where it happened so a user can find it: ``pc`` (guest address of the instruction)
    and ``guest`` (a short name of what was running).
    """

    def __init__(self, message: str, *, pc: int | None = None, guest: str | None = None) -> None:
        self.pc = pc
        self.guest = guest
        self.reason = message
        where = []
        if guest:
            where.append(f"guest {guest}")
        if pc is not None:
            where.append(f"pc 0x{pc:x}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class UnsupportedSyscall(GuestError):
    """A Linux guest made a system call the syscall layer does not implement."""


class UnsupportedInstruction(GuestError):
    """The vCPU met an instruction it cannot execute (undefined or unsupported)."""


class GuestMemoryError(GuestError):
    """The guest (or host code on its behalf) touched guest-physical memory that is not mapped."""


class RunStateError(PyvmmError):
    """A run-state transition that is not allowed (e.g. resume a machine that has shut down)."""
