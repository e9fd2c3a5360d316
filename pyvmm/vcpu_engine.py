"""The unicorn side of the vCPU: hooks for guest exceptions, PSCI, the counter and MMIO.

:class:`VcpuHooks` serves what the guest traps into: PSCI calls on ``hvc #0`` / ``smc #0`` (as
QEMU's ``virt`` board does), the generic timer's counter through intercepted ``mrs``/``msr``
(:mod:`pyvmm.devices.counter`), and undefined instructions, breakpoints and aborts, raised as
:class:`~pyvmm.errors.GuestError`; it also turns unicorn's errors into the project's. System
calls (``svc``) stay with :class:`~pyvmm.machine.Machine`: they are the hot path of Linux guests.
:func:`map_mmio` maps a device; :func:`release_engine` frees the engine before its RAM goes.

Threads: the hooks run on the vCPU thread with the GIL held, as every hook of the machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from unicorn import (
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_ERR_READ_PROT,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_PROT,
    UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_INVALID,
    UC_MEM_FETCH_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ_PROT,
    UC_MEM_READ_UNMAPPED,
    UcError,
)
from unicorn import arm64_const as a64

from .devices.base import MmioDevice
from .devices.counter import VirtualCounter
from .errors import (
    GuestError,
    GuestMemoryError,
    PyvmmError,
    RunStateError,
    UnsupportedInstruction,
)
from .ram import RamBlock

# PSCI function ids (ARM DEN 0022), served on ``hvc #0`` / ``smc #0`` as QEMU's virt board does.
PSCI_VERSION = 0x8400_0000
PSCI_SYSTEM_OFF = 0x8400_0008
PSCI_SYSTEM_RESET = 0x8400_0009
PSCI_FEATURES = 0x8400_000A
_HVC_0 = 0xD400_0002
_SMC_0 = 0xD400_0003
_PSCI_NOT_SUPPORTED = (1 << 64) - 1  # -1

# unicorn's interrupt numbers (QEMU's EXCP_* for ARM).
EXCP_UDEF, EXCP_SWI, EXCP_PREFETCH_ABORT, EXCP_DATA_ABORT, EXCP_BKPT = 1, 2, 3, 4, 7


class HookedMachine(Protocol):
    """What the hooks use of the machine they serve (read when a hook runs)."""

    uc: Any
    name: str
    counter: VirtualCounter

    def read_memory(self, gpa: int, length: int) -> bytes: ...

    def request_stop(self, exit_code: int | None = None) -> None: ...


class VcpuHooks:
    """The hooks of one machine's engine but its ``svc`` path (see the module docstring)."""

    def __init__(self, machine: HookedMachine) -> None:
        self._machine = machine
        self._last_invalid: tuple[int, int] | None = None

    def install(self, uc: Any, on_interrupt: Callable[[Any, int, Any], None]) -> None:
        """Add the hooks to ``uc``; ``on_interrupt`` (the machine's, which serves ``svc`` and
        hands every other exception to :meth:`on_exception`) takes the interrupts."""
        uc.hook_add(UC_HOOK_INTR, on_interrupt)
        uc.hook_add(UC_HOOK_INSN, self._on_mrs, None, 1, 0, a64.UC_ARM64_INS_MRS)
        uc.hook_add(UC_HOOK_INSN, self._on_msr, None, 1, 0, a64.UC_ARM64_INS_MSR)
        uc.hook_add(UC_HOOK_MEM_INVALID, self._on_invalid_memory)

    def _on_mrs(self, uc: Any, reg: int, cp: Any, _ud: Any) -> int:
        counter = self._machine.counter
        key = (cp.op0, cp.op1, cp.crn, cp.crm, cp.op2)
        if not counter.handles(key):
            return 0
        uc.reg_write(reg, counter.mrs(key))
        return 1  # skip the instruction: we produced its result

    def _on_msr(self, uc: Any, reg: int, cp: Any, _ud: Any) -> int:
        counter = self._machine.counter
        key = (cp.op0, cp.op1, cp.crn, cp.crm, cp.op2)
        if not counter.handles(key):
            return 0
        counter.msr(key, cp.val)
        return 1

    def _on_invalid_memory(self, uc: Any, access: int, address: int, size: int, value: int,
                           _ud: Any) -> bool:
        self._last_invalid = (access, address)
        return False

    def on_exception(self, uc: Any, intno: int) -> None:
        """Serve exception ``intno`` other than ``svc``: a PSCI call, else raise the GuestError
        that names it."""
        guest = self._machine.name
        pc = uc.reg_read(a64.UC_ARM64_REG_PC)
        if intno == EXCP_UDEF:
            word = self._insn_word(pc)
            if word in (_HVC_0, _SMC_0):
                self._psci(pc)
                return
            text = f"0x{word:08x}" if word is not None else "at an unreadable address"
            raise UnsupportedInstruction(f"undefined or unsupported instruction {text}", pc=pc,
                                         guest=guest)
        if intno == EXCP_BKPT:
            word = self._insn_word(pc) or 0
            raise GuestError(f"guest hit a breakpoint (brk #{(word >> 5) & 0xFFFF})", pc=pc,
                             guest=guest)
        if intno in (EXCP_PREFETCH_ABORT, EXCP_DATA_ABORT):
            far = uc.reg_read(a64.UC_ARM64_REG_FAR_EL1)
            kind = "instruction" if intno == EXCP_PREFETCH_ABORT else "data"
            raise GuestError(f"{kind} abort at address 0x{far:x}", pc=pc, guest=guest)
        raise GuestError(f"unexpected exception {intno}", pc=pc, guest=guest)

    def _insn_word(self, pc: int) -> int | None:
        try:
            return int.from_bytes(self._machine.read_memory(pc, 4), "little")
        except GuestMemoryError:
            return None

    def _psci(self, pc: int) -> None:
        """Serve a PSCI call (``hvc #0``/``smc #0``, function id in x0) and step past it."""
        machine = self._machine
        uc = machine.uc
        function = uc.reg_read(a64.UC_ARM64_REG_X0) & 0xFFFF_FFFF
        uc.reg_write(a64.UC_ARM64_REG_PC, pc + 4)
        if function == PSCI_SYSTEM_OFF:
            machine.request_stop(0)
        elif function == PSCI_SYSTEM_RESET:
            raise GuestError("guest asked for a system reset, which is not supported", pc=pc,
                             guest=machine.name)
        elif function == PSCI_VERSION:
            uc.reg_write(a64.UC_ARM64_REG_X0, 0x0001_0000)  # PSCI 1.0
        elif function == PSCI_FEATURES:
            asked = uc.reg_read(a64.UC_ARM64_REG_X1) & 0xFFFF_FFFF
            ok = asked in (PSCI_VERSION, PSCI_SYSTEM_OFF, PSCI_FEATURES)
            uc.reg_write(a64.UC_ARM64_REG_X0, 0 if ok else _PSCI_NOT_SUPPORTED)
        else:
            uc.reg_write(a64.UC_ARM64_REG_X0, _PSCI_NOT_SUPPORTED)

    def translate_uc_error(self, err: UcError) -> PyvmmError:
        """The project's error for what unicorn's ``emu_start`` raised (on the vCPU thread)."""
        guest = self._machine.name
        pc = self._machine.uc.reg_read(a64.UC_ARM64_REG_PC)
        if err.errno == UC_ERR_INSN_INVALID:
            word = self._insn_word(pc)
            text = f"0x{word:08x}" if word is not None else "(unreadable)"
            return UnsupportedInstruction(f"invalid instruction {text}", pc=pc, guest=guest)
        if err.errno in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED,
                         UC_ERR_READ_PROT, UC_ERR_WRITE_PROT, UC_ERR_FETCH_PROT):
            access, address = self._last_invalid or (-1, -1)
            kind = ("read" if access in (UC_MEM_READ_UNMAPPED, UC_MEM_READ_PROT) else
                    "instruction fetch" if access in (UC_MEM_FETCH_UNMAPPED, UC_MEM_FETCH_PROT)
                    else "write")
            where = f"0x{address:x}" if address >= 0 else "an unknown address"
            return GuestMemoryError(f"guest {kind} of unmapped memory at {where}", pc=pc,
                                    guest=guest)
        return GuestError(f"CPU error: {err}", pc=pc, guest=guest)


def map_mmio(uc: Any, dev: MmioDevice) -> None:
    """Map ``dev``'s registers into ``uc``'s address space: its reads and writes call the
    device (on the vCPU thread)."""
    def read(_uc: Any, offset: int, size: int, _ud: Any) -> int:
        return dev.read(offset, size)

    def write(_uc: Any, offset: int, size: int, value: int, _ud: Any) -> None:
        dev.write(offset, size, value)

    uc.mmio_map(dev.base, dev.size, read, None, write, None)


class ClosedEngine:
    """What ``Machine.uc`` is after close(): every use names the mistake."""

    def __getattr__(self, name: str) -> Any:
        raise RunStateError(f"the machine is closed (unicorn {name} after close())")


def release_engine(uc: Any, ram_blocks: Sequence[RamBlock]) -> None:
    """Free the unicorn engine ``uc``, whose mappings point into ``ram_blocks``, before the RAM
    goes (nothing for a :class:`ClosedEngine`).

    uc_close frees the mappings with the engine (~10 ms); unmapping them one by one first
    costs unicorn a TB invalidation per page (~0.4 s per GiB). Unicorn 2.1's Python binding
    runs uc_close from a finalizer, called here once (later calls do nothing); without it,
    the mappings are removed one by one.
    """
    if isinstance(uc, ClosedEngine):
        return
    finalize = getattr(uc, "_Uc__finalizer", None)
    if callable(finalize):
        finalize()
        return
    for block in ram_blocks:
        try:
            uc.mem_unmap(block.gpa, block.size)
        except UcError:
            pass
