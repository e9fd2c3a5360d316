"""Linux user mode for pyvmm: runs static aarch64 Linux ELF programs (e.g. busybox) on a machine.

The program runs at EL1 with the MMU off (virtual == physical); each ``svc`` is served by a
Python system call layer whose whole state is plain data, so it can be checkpointed with the
machine and continued in another process.  Everything the guest can observe is a function of the
machine seed, the program, its arguments and the files it was given: no host time, no host
randomness, no host paths beyond those listed.

Public API
----------
``load_program(machine, elf_path, argv, *, env=None, files=(), stdin=b"", stdout=None,
stderr=None, cwd=None, stdin_live=False, files_limit=None) -> LinuxProcess``
    Load a static, non-PIE aarch64 ELF64 executable (ET_EXEC) on a machine that has not started,
    and set its entry point and initial stack.  Afterwards ``machine.run()`` runs it; the
    program's exit code is ``RunResult.exit_code``.

    - ``argv``: the program's arguments, ``argv[0]`` included (busybox picks its applet from
      ``argv[0]`` or ``argv[1]``).
    - ``env``: variables added to (or overriding) the default environment
      ``PATH=/bin:/usr/bin HOME=/`` (nothing else comes from the host environment).
    - ``files``: host files or directories the guest may read, at the same absolute paths.  Any
      write, create, truncate, rename or delete lands in an in-memory overlay; host files are
      never changed.  Sparse files (truncated up, written past their end) take no memory for
      their holes.  Host paths not listed do not exist for the guest, and host symlinks are
      followed in guest terms, so they cannot lead outside what was listed.  ``/tmp`` always
      exists (in the overlay when not listed); ``/dev/null``, ``/dev/zero``, ``/dev/urandom``,
      ``/dev/stdin``, ``/dev/stdout``, ``/dev/stderr`` and ``/proc/self/exe`` are built in.
    - ``stdin``: the bytes the program reads on fd 0 (default: empty).
    - ``stdout``/``stderr``: callables receiving the bytes written to fd 1/2; by default they are
      collected in ``LinuxProcess.stdout_data``/``stderr_data``.
    - ``cwd``: the guest's working directory (default: the host's, as a path string only).
    - ``files_limit``: most bytes the overlay may hold (stored file pages, plus about 1 KiB and
      the path per entry).  Default: half the RAM size, as a tmpfs takes, at most 512 MiB (a
      checkpoint carries the overlay).  Past it the guest gets ENOSPC, as on a full tmpfs; a
      write at or past the largest file size (2**63 - 1) gets EFBIG.

    Raises :class:`~pyvmm.errors.ConfigError` naming the file and the problem for a file that is
    not such a program (not ELF, 32-bit, not AArch64, PIE/shared, dynamically linked, truncated
    or inconsistent headers), and for bad arguments.

``LinuxProcess``
    ``.state`` (:class:`LinuxState`), ``.state_to_dict()``/``.state_from_dict(d)`` (JSON types,
    for checkpoints), ``.stdout_data``/``.stderr_data``, ``.exit_code``, ``.close()``.  It is
    registered as ``machine.extra_state["linux"]``.

``attach_process(machine, state_or_dict, *, stdout=None, stderr=None) -> LinuxProcess``
    Re-create the layer on a machine whose RAM and registers are restored from a checkpoint
    (adds the program's image RAM block when missing; call before loading RAM).

The guest runs as root (uid/gid 0), pid 1000, on "Linux 6.1.0-pyvmm aarch64" with one CPU; its
clocks start at 2024-01-01T00:00:00Z and follow the machine's virtual counter (sleeps return at
once); getrandom() and AT_RANDOM are streams derived from the machine seed.

Errors during a run end it with ``RunResult.reason == ERROR``: an unimplemented system call is
:class:`~pyvmm.errors.UnsupportedSyscall` naming it and its PC (``clone``/``execve`` say that
pyvmm runs single-process guests); a fatal signal the program sends itself (``abort()``) is a
:class:`~pyvmm.errors.GuestError` "killed by signal SIGABRT".  Bad guest pointers make the call
return ``-EFAULT``, as on Linux.
"""

from __future__ import annotations

from .loader import (
    DEFAULT_ENV,
    IMAGE_BLOCK,
    at_random_bytes,
    attach_process,
    load_program,
)
from .process import SYSCALLS, LinuxProcess, OutputSink
from .state import LinuxState, state_from_dict, state_to_dict

__all__ = [
    "DEFAULT_ENV",
    "IMAGE_BLOCK",
    "SYSCALLS",
    "LinuxProcess",
    "LinuxState",
    "OutputSink",
    "at_random_bytes",
    "attach_process",
    "load_program",
    "state_from_dict",
    "state_to_dict",
]
