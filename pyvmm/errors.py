"""The exception tree of pyvmm: one root, subclasses by meaning, structured fields."""

from __future__ import annotations

from typing import Self


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


class FormatError(PyvmmError):
    """Bytes that do not follow a format pyvmm reads or writes (stream, vmstate, container).

    Carries where it happened: ``offset`` (byte offset in the file or buffer), ``increment``
    (checkpoint increment number) and ``section`` (migration section or vmstate name); each is
    ``None`` when not known at the point of failure. Upper layers add what they know with
    :meth:`located`. ``reason`` is the message without the location.
    """

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        increment: int | None = None,
        section: str | None = None,
    ) -> None:
        self.reason = message
        self.offset = offset
        self.increment = increment
        self.section = section
        where = []
        if increment is not None:
            where.append(f"increment {increment}")
        if section is not None:
            where.append(f"section {section}")
        if offset is not None:
            where.append(f"offset 0x{offset:x}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)

    def located(
        self,
        *,
        offset: int | None = None,
        increment: int | None = None,
        section: str | None = None,
    ) -> Self:
        """The same error (same class) with the location fields it lacks filled in.

        Fields already set are kept: the innermost layer knows the location best. Use as
        ``raise err.located(increment=n) from err``.
        """
        return type(self)(
            self.reason,
            offset=self.offset if self.offset is not None else offset,
            increment=self.increment if self.increment is not None else increment,
            section=self.section if self.section is not None else section,
        )


class StreamError(FormatError):
    """A migration stream could not be read or written: an I/O error (ENOSPC, EBADF...) or the
    data ended before a read was satisfied. The OS error, if any, is the ``__cause__``."""


class VersionError(FormatError):
    """A stream or state description carries a version this pyvmm cannot load (too new or too
    old for the local description)."""


class ChecksumError(FormatError):
    """Stored bytes do not match their checksum (a header slot, an increment entry, a page index,
    a stats blob): the file was damaged after it was written."""


class UffdError(PyvmmError):
    """A userfaultfd or PAGEMAP_SCAN operation failed.

    Fields: ``op`` (the operation, e.g. ``"UFFDIO_REGISTER"``), ``errno`` (the OS error number,
    0 when the failure is not an OS error), ``capability`` (``"incremental"`` or ``"live"``: the
    checkpoint kind a missing feature or privilege makes unavailable, else ``None``) and
    ``detail`` (what was missing, if known).
    """

    def __init__(
        self,
        op: str,
        errno: int,
        *,
        capability: str | None = None,
        detail: str | None = None,
    ) -> None:
        import os  # local: errors.py is imported everywhere and needs nothing else

        self.op = op
        self.errno = errno
        self.capability = capability
        self.detail = detail
        text = f"{os.strerror(errno)} (errno {errno})" if errno else "failed"
        message = f"userfaultfd {op}: {text}"
        if detail:
            message += f": {detail}"
        if capability:
            message += f"; {capability} checkpoints are unavailable"
        super().__init__(message)


class CheckpointWarning(UserWarning):
    """A checkpoint file was readable, but not all of it: e.g. a damaged newest header slot
    made a reader fall back to the older one (one increment fewer).  The CLI prints it as one
    ``pyvmm: warning: ...`` line on stderr; from Python it is an ordinary warning."""
