"""Which state entries make up a pyvmm machine, and moving the CPU's registers in and out of them.

:func:`machine_save_state` builds the registry for one machine: the RAM handler, the CPU, the
devices (each with its own description), a small ``pyvmm-machine`` section (whether the guest had
powered off, and its exit code) and, for Linux guests, the syscall layer's state as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..cpu import VMSTATE_CPU, CpuSection
from ..devices.counter import VMSTATE_COUNTER
from ..devices.guest_inform import VMSTATE_GUEST_INFORM
from ..devices.pl011 import VMSTATE_PL011
from ..errors import FormatError
from ..machine import Machine
from .ram_handler import RAM_SECTION_VERSION, RamHandler
from .savevm import SaveState, SaveStateEntry
from .vmstate import VMStateDescription, boolean, int32, uint32, uint64, vbuffer

#: The machine type written in every stream's CONFIGURATION section.
MACHINE_TYPE = "pyvmm-virt"
#: Bound on the Linux layer's saved state (its overlay files live in it).
MAX_LINUX_STATE = 1 << 30


@dataclasses.dataclass
class MachineSection:
    """Run-level facts that are not device registers."""

    ended: bool = False
    exit_code: int = 0
    seed: int = 0


VMSTATE_MACHINE = VMStateDescription(
    "pyvmm-machine", version_id=1, minimum_version_id=1,
    fields=[boolean("ended"), int32("exit_code"), uint64("seed")],
)


@dataclasses.dataclass
class LinuxSection:
    """The Linux syscall layer's state, as the JSON text of its plain-data dict."""

    state_json: bytes = b""
    length: int = 0


VMSTATE_LINUX = VMStateDescription(
    "linux-user", version_id=1, minimum_version_id=1,
    fields=[uint32("length"), vbuffer("state_json", "length", MAX_LINUX_STATE)],
)


@dataclasses.dataclass
class MachineStateEntries:
    """The registry plus direct handles on the entries the orchestration needs."""

    save_state: SaveState
    ram: RamHandler
    cpu: CpuSection
    machine_section: MachineSection
    linux: LinuxSection | None


def machine_save_state(machine: Machine, *, with_linux: bool | None = None) -> MachineStateEntries:
    """A fresh registry over ``machine``'s RAM blocks, CPU and devices.

    ``with_linux``: register the Linux layer's section (default: if the machine has one).  A
    loader that does not know yet passes True; the section is then optional in the stream.
    """
    save_state = SaveState(MACHINE_TYPE)
    ram = RamHandler(machine.ram_blocks)
    save_state.register(SaveStateEntry("ram", 0, RAM_SECTION_VERSION, handler=ram))
    cpu = CpuSection()
    save_state.register(SaveStateEntry("cpu", 0, VMSTATE_CPU.version_id, priority=0,
                                       vmsd=VMSTATE_CPU, opaque=cpu))
    for idstr, vmsd, obj in (("pl011", VMSTATE_PL011, machine.uart.state),
                             ("virt-counter", VMSTATE_COUNTER, machine.counter.state),
                             ("guest-inform", VMSTATE_GUEST_INFORM, machine.guest_inform.state)):
        save_state.register(SaveStateEntry(idstr, 0, vmsd.version_id, priority=1, vmsd=vmsd,
                                           opaque=obj))
    section = MachineSection()
    save_state.register(SaveStateEntry("pyvmm-machine", 0, 1, priority=2, vmsd=VMSTATE_MACHINE,
                                       opaque=section))
    linux: LinuxSection | None = None
    if with_linux if with_linux is not None else "linux" in machine.extra_state:
        linux = LinuxSection()
        save_state.register(SaveStateEntry("linux-user", 0, 1, priority=3, vmsd=VMSTATE_LINUX,
                                           opaque=linux))
    return MachineStateEntries(save_state, ram, cpu, section, linux)


def capture(machine: Machine, entries: MachineStateEntries, *, ended: bool) -> None:
    """Copy the CPU registers and run-level facts into the entries (machine stopped).

    ``ended``: the guest had powered off (the caller knows: the machine itself is in the
    save-vm state now)."""
    state = machine.cpu_state()
    fresh = CpuSection.from_state(state, machine.insns)
    for field in dataclasses.fields(CpuSection):
        setattr(entries.cpu, field.name, getattr(fresh, field.name))
    for name, value in state.sysregs:
        setattr(entries.cpu, name, value)
    entries.machine_section.ended = ended
    entries.machine_section.exit_code = (machine.exit_code or 0) if ended else 0
    entries.machine_section.seed = machine.seed
    if entries.linux is not None:
        process: Any = machine.extra_state.get("linux")
        if process is None:
            raise FormatError("the machine has no Linux layer to save")
        text = json.dumps(process.state_to_dict(), separators=(",", ":")).encode()
        entries.linux.state_json = text
        entries.linux.length = len(text)


def linux_state_from(entries: MachineStateEntries) -> dict[str, Any] | None:
    """The Linux layer's state dict a load brought in, or None if the stream had none."""
    if entries.linux is None or not entries.linux.length:
        return None
    try:
        value = json.loads(bytes(entries.linux.state_json))
    except ValueError as err:
        raise FormatError("the Linux layer's saved state is not valid JSON",
                          section="linux-user") from err
    if not isinstance(value, dict):
        raise FormatError("the Linux layer's saved state is not an object", section="linux-user")
    return value


def apply(machine: Machine, entries: MachineStateEntries) -> None:
    """Write the loaded CPU registers and instruction count into the (stopped) machine."""
    machine.set_cpu_state(entries.cpu.to_state())
    machine.set_insns(entries.cpu.insns if entries.cpu.has_insns else None)
