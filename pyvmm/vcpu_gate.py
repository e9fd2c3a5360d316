"""The vCPU's stop gate: the one way another thread stops a running vCPU, at a clean boundary.

Another thread never calls ``uc_emu_stop`` itself.  Unicorn 2.1 leaves a chain of translated blocks
at the next block start and, when a stop was requested, trusts that a code hook has already put the
guest PC there; without one the PC keeps an older value, so resuming would run instructions twice
(the cause of issue 13: Linux guests damaged by periodic checkpoints).  Instead the pausing thread
sets a flag and a C block hook, run by the vCPU thread at every block's first instruction with the
PC synced to it, stops the vCPU there.  Every asynchronous stop therefore lands on an instruction
boundary, between blocks, outside any MMIO, MRS or SVC hook: guest registers, RAM and the syscall
layer's state are consistent whenever the vCPU is parked.

Threads: :meth:`StopGate.request` and :meth:`StopGate.clear` from any thread; the hook runs on the
vCPU thread and never touches Python objects (it runs with the GIL released).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from unicorn import UC_HOOK_BLOCK, UcError

from ._native import ffi, lib


def _unicorn_library() -> Any:
    """The ctypes handle of libunicorn the binding loaded (its module moved between releases)."""
    try:
        from unicorn.unicorn_py3 import unicorn as binding
    except ImportError:  # the 2.0-style single-module binding
        from unicorn import unicorn as binding
    for name in ("uclib", "_uc"):
        library = getattr(binding, name, None)
        if library is not None:
            return library
    raise ImportError("the unicorn binding does not expose its C library (uclib)")


uclib = _unicorn_library()


class StopGate:
    """A stop request for one unicorn engine, served at the start of the next translation block."""

    def __init__(self, uc: Any) -> None:
        self._gate = ffi.new("struct pyvmm_vcpu_gate *")
        stop_address = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        self._gate.emu_stop = ffi.cast("int (*)(void *)", stop_address)
        hook_address = int(ffi.cast("uintptr_t", ffi.addressof(lib, "pyvmm_vcpu_block_hook")))
        handle = ctypes.c_size_t()
        status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_BLOCK,
                                   ctypes.c_void_p(hook_address),
                                   ctypes.c_void_p(int(ffi.cast("uintptr_t", self._gate))),
                                   ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != 0:
            raise UcError(status)
        #: Keeps the engine (and with it the hook) no longer than the gate's memory lives.
        self._uc = uc
        #: Readable while a request is pending: a hook that waits (for input) polls it too.
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def request(self) -> None:
        """Ask the vCPU to stop before the next block it enters (in this run or the next)."""
        self._gate.requested = 1
        os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        """The vCPU is parked: withdraw a request nobody served (it stopped for another
        reason), and reset :attr:`fd`."""
        self._gate.requested = 0
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Release :attr:`fd` (idempotent); the engine goes first."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def requested(self) -> bool:
        """Whether a stop waits to be served (from a hook: the vCPU stops once it returns)."""
        return bool(self._gate.requested)

    @property
    def stops(self) -> int:
        """How many requests the vCPU has served."""
        return int(self._gate.stops)

    @property
    def insns(self) -> int:
        """Guest instructions in the blocks the vCPU has entered (read while it is parked; a
        block an exception leaves early counts whole)."""
        return int(self._gate.insns)

    @property
    def stopped_at(self) -> int:
        """Guest address of the block before which the last served request stopped the vCPU."""
        return int(self._gate.stopped_at)
