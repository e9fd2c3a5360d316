"""The ARM generic timer's counter, virtualised: guest reads of CNTVCT/CNTPCT never see host time.

The counter advances by a fixed step on every read, so guest time is a function of what the guest did
and two runs of the same guest read the same values (DESIGN.md §6).  Timer compare registers are
stored (and saved) but raise no interrupt: the machine has no interrupt controller, guests poll.
"""

from __future__ import annotations

import dataclasses

from ..migration.vmstate import VMStateDescription, uint64

#: The frequency the guest reads from CNTFRQ_EL0 (QEMU's virt board uses 62.5 MHz too).
COUNTER_FREQUENCY_HZ = 62_500_000
#: How far the counter moves per read: 1 µs of guest time.
TICKS_PER_READ = COUNTER_FREQUENCY_HZ // 1_000_000

# System-register encodings (op0, op1, CRn, CRm, op2) that leak host time if not intercepted.
CNTFRQ_EL0 = (3, 3, 14, 0, 0)
CNTPCT_EL0 = (3, 3, 14, 0, 1)
CNTVCT_EL0 = (3, 3, 14, 0, 2)
CNTPCTSS_EL0 = (3, 3, 14, 0, 5)
CNTVCTSS_EL0 = (3, 3, 14, 0, 6)
CNTV_TVAL_EL0 = (3, 3, 14, 3, 0)
CNTV_CTL_EL0 = (3, 3, 14, 3, 1)
CNTV_CVAL_EL0 = (3, 3, 14, 3, 2)
CNTP_TVAL_EL0 = (3, 3, 14, 2, 0)
CNTP_CTL_EL0 = (3, 3, 14, 2, 1)
CNTP_CVAL_EL0 = (3, 3, 14, 2, 2)
PMCCNTR_EL0 = (3, 3, 9, 13, 0)  # the cycle counter: host cycles unless served here

SysReg = tuple[int, int, int, int, int]
MASK64 = (1 << 64) - 1


@dataclasses.dataclass
class CounterState:
    """The virtual counter value and the timer registers the guest programmed."""

    ticks: int = 0
    cntv_ctl: int = 0
    cntv_cval: int = 0
    cntp_ctl: int = 0
    cntp_cval: int = 0


VMSTATE_COUNTER = VMStateDescription(
    "virt-counter", version_id=1, minimum_version_id=1,
    fields=[uint64("ticks"), uint64("cntv_ctl"), uint64("cntv_cval"), uint64("cntp_ctl"),
            uint64("cntp_cval")],
)


class VirtualCounter:
    """Serves the counter/timer system registers from :class:`CounterState`."""

    name = "virt-counter"

    def __init__(self) -> None:
        self.state = CounterState()

    def reset(self) -> None:
        self.state = CounterState()

    def now(self) -> int:
        """Advance and return the counter (what a guest read sees; also used for guest clocks)."""
        self.state.ticks += TICKS_PER_READ
        return self.state.ticks

    def nanoseconds(self) -> int:
        """Guest time in ns, advancing like a counter read."""
        return self.now() * 1_000_000_000 // COUNTER_FREQUENCY_HZ

    def handles(self, reg: SysReg) -> bool:
        return reg in _READS or reg in _WRITES

    def mrs(self, reg: SysReg) -> int:
        """Value of an intercepted ``mrs``."""
        s = self.state
        if reg == CNTFRQ_EL0:
            return COUNTER_FREQUENCY_HZ
        if reg in (CNTPCT_EL0, CNTVCT_EL0, CNTPCTSS_EL0, CNTVCTSS_EL0, PMCCNTR_EL0):
            return self.now()
        if reg == CNTV_CTL_EL0:
            return s.cntv_ctl | self._istatus(s.cntv_ctl, s.cntv_cval)
        if reg == CNTP_CTL_EL0:
            return s.cntp_ctl | self._istatus(s.cntp_ctl, s.cntp_cval)
        if reg == CNTV_CVAL_EL0:
            return s.cntv_cval
        if reg == CNTP_CVAL_EL0:
            return s.cntp_cval
        if reg == CNTV_TVAL_EL0:
            return (s.cntv_cval - s.ticks) & 0xFFFF_FFFF
        if reg == CNTP_TVAL_EL0:
            return (s.cntp_cval - s.ticks) & 0xFFFF_FFFF
        raise KeyError(reg)

    def msr(self, reg: SysReg, value: int) -> None:
        """Store an intercepted ``msr``."""
        s = self.state
        if reg == CNTV_CTL_EL0:
            s.cntv_ctl = value & 0b11
        elif reg == CNTP_CTL_EL0:
            s.cntp_ctl = value & 0b11
        elif reg == CNTV_CVAL_EL0:
            s.cntv_cval = value & MASK64
        elif reg == CNTP_CVAL_EL0:
            s.cntp_cval = value & MASK64
        elif reg == CNTV_TVAL_EL0:
            s.cntv_cval = (s.ticks + _sign32(value)) & MASK64
        elif reg == CNTP_TVAL_EL0:
            s.cntp_cval = (s.ticks + _sign32(value)) & MASK64
        # Writes to the read-only counters are ignored, as on the hardware at EL0/EL1.

    def _istatus(self, ctl: int, cval: int) -> int:
        """CTL.ISTATUS: the timer condition is met (enabled and counter ≥ compare value)."""
        return 0b100 if (ctl & 1) and self.state.ticks >= cval else 0


def _sign32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value & 0x8000_0000 else value


_READS = {CNTFRQ_EL0, CNTPCT_EL0, CNTVCT_EL0, CNTPCTSS_EL0, CNTVCTSS_EL0, PMCCNTR_EL0,
          CNTV_CTL_EL0, CNTV_CVAL_EL0, CNTV_TVAL_EL0, CNTP_CTL_EL0, CNTP_CVAL_EL0, CNTP_TVAL_EL0}
_WRITES = {CNTV_CTL_EL0, CNTV_CVAL_EL0, CNTV_TVAL_EL0, CNTP_CTL_EL0, CNTP_CVAL_EL0, CNTP_TVAL_EL0,
           CNTFRQ_EL0, CNTPCT_EL0, CNTVCT_EL0}
