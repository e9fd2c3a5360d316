"""A Linux process on a pyvmm machine: serves the guest's ``svc`` calls from a dispatch table.

:class:`LinuxProcess` owns the layer's state (:class:`~pyvmm.linux.state.LinuxState`) and the host
side objects that are not state (output sinks, cached host file descriptors).  The machine calls
:meth:`LinuxProcess.handle_svc` on the vCPU thread for every ``svc``: the number in x8 picks the
handler, x0..x5 are its arguments, the result (or ``-errno``) goes back in x0.  A call that is not
implemented stops the run with :class:`~pyvmm.errors.UnsupportedSyscall` naming it: never a hang,
never a silent ``-ENOSYS`` the program might misread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import select
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from unicorn import arm64_const as a64

from ..devices.counter import COUNTER_FREQUENCY_HZ
from ..errors import UnsupportedSyscall
from ..machine import Machine
from . import sys_fs, sys_io, sys_process
from .abi import (
    SYSCALL_NUMBERS,
    LinuxErrno,
    SyscallHandler,
    SyscallRestart,
    syscall_name,
)
from .guestmem import GuestMemory
from .state import LinuxState, state_from_dict, state_to_dict
from .vfs import FileSystem

#: Receives bytes the guest writes to stdout or stderr.
OutputSink = Callable[[bytes], None]

#: x8 (the call number), then x0..x5 (the arguments).
_SYSCALL_REGS = (a64.UC_ARM64_REG_X8, a64.UC_ARM64_REG_X0, a64.UC_ARM64_REG_X1,
                 a64.UC_ARM64_REG_X2, a64.UC_ARM64_REG_X3, a64.UC_ARM64_REG_X4,
                 a64.UC_ARM64_REG_X5)
_MASK64 = (1 << 64) - 1
#: Guest wall-clock time at power-on: 2024-01-01T00:00:00Z (fixed, so runs are reproducible).
REALTIME_EPOCH_NS = 1_704_067_200 * 1_000_000_000
_SINGLE_PROCESS = frozenset({"clone", "clone3", "execve", "execveat", "vfork", "fork"})


class _SyscallRegisters:
    """Reads x8 and x0..x5 in one C call and writes x0, through prebuilt ctypes objects.

    unicorn's ``reg_read``/``reg_write`` cost ~5 µs a register in Python (type dispatch on every
    call), which made register access a third of the cost of a system call; the C entry points
    the binding wraps cost a fraction of that.  Falls back to the public calls if the binding
    lacks them.
    """

    def __init__(self, uc: Any) -> None:
        count = len(_SYSCALL_REGS)
        self._uc = uc
        self._batch = getattr(uc, "_do_reg_read_batch", None)
        self._write = getattr(uc, "_do_reg_write", None)
        self._result = ctypes.c_uint64()
        self._result_ref = ctypes.byref(self._result)
        self._ids = (ctypes.c_int * count)(*_SYSCALL_REGS)
        self._values = (ctypes.c_uint64 * count)()
        self._pointers = (ctypes.c_void_p * count)(
            *(ctypes.addressof(self._values) + 8 * i for i in range(count)))
        self._count = ctypes.c_int(count)

    def read(self) -> list[int]:
        if self._batch is not None and self._batch(self._ids, self._pointers, self._count) == 0:
            return list(self._values)
        return [int(self._uc.reg_read(r)) for r in _SYSCALL_REGS]

    def write_x0(self, value: int) -> None:
        self._result.value = value
        if self._write is None or self._write(a64.UC_ARM64_REG_X0, self._result_ref) != 0:
            self._uc.reg_write(a64.UC_ARM64_REG_X0, value)


def _build_table() -> MappingProxyType[int, SyscallHandler]:
    table: dict[int, SyscallHandler] = {}
    handlers: dict[str, SyscallHandler] = {**sys_io.HANDLERS, **sys_fs.HANDLERS,
                                           **sys_process.HANDLERS}
    for name, handler in handlers.items():
        table[SYSCALL_NUMBERS[name]] = handler
    return MappingProxyType(table)


#: aarch64 syscall number -> handler.
SYSCALLS = _build_table()


class LinuxProcess:
    """The Linux user-mode layer of one machine (see the package documentation).

    Create it with :func:`pyvmm.linux.load_program` (a fresh program) or
    :func:`pyvmm.linux.attach_process` (a process whose RAM and registers were restored).
    It registers itself as the machine's SVC handler and as ``machine.extra_state["linux"]``.
    """

    def __init__(self, machine: Machine, state: LinuxState, *, stdout: OutputSink | None = None,
                 stderr: OutputSink | None = None) -> None:
        self.machine = machine
        self.state = state
        self.mem = GuestMemory(machine)
        self.fs = FileSystem(state.files, state.exe_path)
        #: What the guest wrote, when no sink was given for the stream.
        self.stdout_data = bytearray()
        self.stderr_data = bytearray()
        self.sinks: dict[str, OutputSink] = {
            "stdout": stdout if stdout is not None else self.stdout_data.extend,
            "stderr": stderr if stderr is not None else self.stderr_data.extend,
        }
        self._registers = _SyscallRegisters(machine.uc)
        #: Called on the vCPU thread inside every system call, after its handler and before
        #: its result reaches x0, with the call's number: tests and experiments act from inside
        #: the syscall path with it (e.g. ask for a pause there).  Not state.
        self.syscall_observer: Callable[[int], None] | None = None
        #: Host fd a live stdin (``FileState.stdin_live``) is read from; not state.
        self.stdin_fd = 0
        #: True while a system call waits for input (tests look; not state).
        self.waiting_for_input = False
        seed = str(machine.seed).encode()
        self._random_key = hashlib.sha256(b"pyvmm-linux getrandom\0" + seed).digest()
        machine.set_svc_handler(self.handle_svc)
        machine.extra_state["linux"] = self

    # ------------------------------------------------------------------------ state
    def state_to_dict(self) -> dict[str, Any]:
        """The layer's state as JSON types (for a checkpoint)."""
        return state_to_dict(self.state)

    def state_from_dict(self, data: dict[str, Any]) -> None:
        """Replace the layer's state by a saved one (guest RAM and registers are the caller's)."""
        self.state = state_from_dict(data)
        self.fs.close()
        self.fs = FileSystem(self.state.files, self.state.exe_path)

    @property
    def exit_code(self) -> int | None:
        return self.state.exit_code

    def close(self) -> None:
        """Release host resources (cached host file descriptors).  Idempotent."""
        self.fs.close()

    # ------------------------------------------------------------------------ services for handlers
    @property
    def guest(self) -> str:
        return self.machine.name

    def pc(self) -> int:
        """Address of the ``svc`` being served."""
        return int(self.machine.uc.reg_read(a64.UC_ARM64_REG_PC)) - 4

    def now_ns(self) -> int:
        """Guest monotonic time in ns (advances on every read, like the counter)."""
        return self.machine.counter.nanoseconds()

    def realtime_ns(self) -> int:
        return REALTIME_EPOCH_NS + self.now_ns()

    def sleep(self, ns: int) -> None:
        """Advance guest time by ``ns`` at once: a sleeping guest costs no host time."""
        ticks = -(-ns * COUNTER_FREQUENCY_HZ // 1_000_000_000)
        self.machine.counter.state.ticks += ticks

    def random_bytes(self, length: int) -> bytes:
        """The next ``length`` bytes of the deterministic random stream (a function of the
        machine seed and how many bytes were taken before)."""
        start = self.state.random_offset
        first, last = start // 32, (start + length + 31) // 32
        stream = b"".join(hashlib.sha256(self._random_key + i.to_bytes(8, "little")).digest()
                          for i in range(first, last))
        self.state.random_offset += length
        return stream[start - first * 32:start - first * 32 + length]

    def wait_for_input(self, fd: int) -> None:
        """Block (GIL released) until host ``fd`` is readable or at its end; a pause asked for
        first, or meanwhile, wins: :class:`SyscallRestart` (nothing was read)."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self.machine.pause_fd, select.POLLIN)
        self.waiting_for_input = True
        try:
            while True:
                if self.machine.pause_requested:
                    raise SyscallRestart
                if any(ready == fd for ready, _ in poller.poll()):
                    return
        finally:
            self.waiting_for_input = False

    def read_live_stdin(self, count: int) -> bytes:
        """Up to ``count`` bytes of the live stdin, waiting for the first (see wait_for_input);
        b"" at its end."""
        if count <= 0:
            return b""
        self.wait_for_input(self.stdin_fd)
        try:
            return os.read(self.stdin_fd, count)
        except BlockingIOError:  # another reader of the same pipe was first: wait again
            raise SyscallRestart from None

    def unsupported(self, nr: int, detail: str = "") -> UnsupportedSyscall:
        name = syscall_name(nr)
        text = f"unsupported system call {name} (number {nr})"
        if name in _SINGLE_PROCESS:
            text += ": pyvmm runs single-process guests"
        elif detail:
            text += f": {detail}"
        return UnsupportedSyscall(text, pc=self.pc(), guest=self.guest)

    # ------------------------------------------------------------------------ the SVC hook
    def handle_svc(self, machine: Machine) -> None:
        """Serve one system call (vCPU thread, GIL held; PC is already past the ``svc``)."""
        nr, *args = self._registers.read()
        handler = SYSCALLS.get(nr)
        if handler is None:
            raise self.unsupported(nr)
        self.state.syscalls += 1
        try:
            result = handler(self, *args)
        except LinuxErrno as err:
            result = -int(err.errno)
        except SyscallRestart:
            # back to the svc: the call runs again after the pause, which the vCPU serves
            # before the block that starts there (its registers are as the guest set them)
            self.state.syscalls -= 1
            machine.uc.reg_write(a64.UC_ARM64_REG_PC, self.pc())
            return
        if self.syscall_observer is not None:
            self.syscall_observer(nr)
        if result is not None:
            self._registers.write_x0(result & _MASK64)
