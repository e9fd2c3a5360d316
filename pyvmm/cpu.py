"""The vCPU's architectural state as plain data: what is read from and written back to unicorn.

Unicorn's own context blob is opaque and not portable between builds, so the state that a checkpoint
or a determinism test compares is listed here register by register.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unicorn import arm64_const as a64

#: Registers read with one ``reg_read_batch`` call, in the order of :class:`CpuState`'s fields.
_GPR_IDS = [getattr(a64, f"UC_ARM64_REG_X{i}") for i in range(29)] + [
    a64.UC_ARM64_REG_X29,
    a64.UC_ARM64_REG_X30,
]
_VREG_IDS = [getattr(a64, f"UC_ARM64_REG_Q{i}") for i in range(32)]

#: System registers saved by name; (name, unicorn register id).  The EL1 registers are the ones a
#: bare-metal guest or our Linux user-mode loader sets up.
SYSTEM_REGISTERS: tuple[tuple[str, int], ...] = (
    ("sp_el0", a64.UC_ARM64_REG_SP_EL0),
    ("sp_el1", a64.UC_ARM64_REG_SP_EL1),
    ("pstate", a64.UC_ARM64_REG_PSTATE),
    ("fpcr", a64.UC_ARM64_REG_FPCR),
    ("fpsr", a64.UC_ARM64_REG_FPSR),
    ("tpidr_el0", a64.UC_ARM64_REG_TPIDR_EL0),
    ("tpidrro_el0", a64.UC_ARM64_REG_TPIDRRO_EL0),
    ("tpidr_el1", a64.UC_ARM64_REG_TPIDR_EL1),
    ("elr_el1", a64.UC_ARM64_REG_ELR_EL1),
    ("esr_el1", a64.UC_ARM64_REG_ESR_EL1),
    ("far_el1", a64.UC_ARM64_REG_FAR_EL1),
    ("vbar_el1", a64.UC_ARM64_REG_VBAR_EL1),
    ("mair_el1", a64.UC_ARM64_REG_MAIR_EL1),
    ("ttbr0_el1", a64.UC_ARM64_REG_TTBR0_EL1),
    ("ttbr1_el1", a64.UC_ARM64_REG_TTBR1_EL1),
    ("cpacr_el1", a64.UC_ARM64_REG_CPACR_EL1),
)

#: CPACR_EL1.FPEN = 0b11: FP/SIMD usable at EL0 and EL1 (unicorn resets it to 0, which traps them).
CPACR_FPEN = 3 << 20


@dataclasses.dataclass(frozen=True)
class CpuState:
    """A snapshot of one vCPU: general registers, PC, SIMD/FP registers and system registers."""

    x: tuple[int, ...]  # X0..X30
    sp: int  # the SP of the current exception level
    pc: int
    v: tuple[int, ...]  # V0..V31 as 128-bit integers
    sysregs: tuple[tuple[str, int], ...]

    def sysreg(self, name: str) -> int:
        """Value of the named system register (names as in :data:`SYSTEM_REGISTERS`)."""
        for key, value in self.sysregs:
            if key == name:
                return value
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view, for messages and test diffs."""
        out: dict[str, Any] = {f"x{i}": v for i, v in enumerate(self.x)}
        out.update(sp=self.sp, pc=self.pc)
        out.update({f"v{i}": v for i, v in enumerate(self.v)})
        out.update(dict(self.sysregs))
        return out


def read_cpu_state(uc: Any) -> CpuState:
    """Read the whole vCPU state from a stopped unicorn instance (call on a paused machine)."""
    gprs = uc.reg_read_batch(_GPR_IDS)
    vregs = tuple(int(uc.reg_read(r)) for r in _VREG_IDS)
    sysregs = tuple((name, int(uc.reg_read(rid))) for name, rid in SYSTEM_REGISTERS)
    return CpuState(
        x=tuple(int(v) for v in gprs),
        sp=int(uc.reg_read(a64.UC_ARM64_REG_SP)),
        pc=int(uc.reg_read(a64.UC_ARM64_REG_PC)),
        v=vregs,
        sysregs=sysregs,
    )


def write_cpu_state(uc: Any, state: CpuState) -> None:
    """Load ``state`` into a stopped unicorn instance.

    PSTATE goes first because it selects the exception level, and so which banked SP ``sp`` means.
    """
    sysregs = dict(state.sysregs)
    uc.reg_write(a64.UC_ARM64_REG_PSTATE, sysregs.pop("pstate"))
    for name, rid in SYSTEM_REGISTERS:
        if name in sysregs:
            uc.reg_write(rid, sysregs[name])
    for rid, value in zip(_GPR_IDS, state.x):
        uc.reg_write(rid, value)
    for rid, value in zip(_VREG_IDS, state.v):
        uc.reg_write(rid, value)
    uc.reg_write(a64.UC_ARM64_REG_SP, state.sp)
    uc.reg_write(a64.UC_ARM64_REG_PC, state.pc)


# ------------------------------------------------------------------------------ vmstate
@dataclasses.dataclass
class CpuSection:
    """The mutable mirror of :class:`CpuState` that the vmstate interpreter saves and loads.

    ``insns`` is the machine's exact instruction count (None when unknown); it travels in a
    subsection so that a reloaded machine keeps counting where the saved one stopped.
    """

    x: list[int] = dataclasses.field(default_factory=lambda: [0] * 31)
    sp: int = 0
    pc: int = 0
    v: list[int] = dataclasses.field(default_factory=lambda: [0] * 32)
    sysregs: dict[str, int] = dataclasses.field(default_factory=dict)
    insns: int = 0
    has_insns: bool = False

    @classmethod
    def from_state(cls, state: CpuState, insns: int | None) -> CpuSection:
        section = cls(x=list(state.x), sp=state.sp, pc=state.pc, v=list(state.v),
                      sysregs=dict(state.sysregs), insns=insns or 0,
                      has_insns=insns is not None)
        for name, value in state.sysregs:
            setattr(section, name, value)
        return section

    def to_state(self) -> CpuState:
        return CpuState(x=tuple(self.x), sp=self.sp, pc=self.pc, v=tuple(self.v),
                        sysregs=tuple((name, int(getattr(self, name)))
                                      for name, _ in SYSTEM_REGISTERS))


def _cpu_vmstate() -> Any:
    # Imported here: cpu.py sits below the migration layer for everything but its description.
    from .migration.vmstate import VMStateDescription, array, uint64, uint128

    icount = VMStateDescription("cpu/icount", 1, 1, [uint64("insns")],
                                needed=lambda s: s.has_insns,
                                post_load=lambda s, _v: setattr(s, "has_insns", True))
    return VMStateDescription(
        "cpu", version_id=1, minimum_version_id=1,
        fields=[array("x", uint64, 31), uint64("sp"), uint64("pc"), array("v", uint128, 32),
                *[uint64(name) for name, _ in SYSTEM_REGISTERS]],
        subsections=[icount],
        pre_load=lambda s: setattr(s, "has_insns", False),
    )


VMSTATE_CPU = _cpu_vmstate()
