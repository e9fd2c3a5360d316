"""A PL011-compatible UART: guest bytes written to DR reach a host sink; input bytes feed DR reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..migration.vmstate import VMStateDescription, uint32, uint64, vbuffer
from .base import MmioDevice

UART_BASE = 0x0900_0000
UART_SIZE = 0x1000

# Register offsets (ARM PrimeCell UART PL011 TRM).
DR, RSR, FR, ILPR, IBRD, FBRD, LCR_H, CR = 0x000, 0x004, 0x018, 0x020, 0x024, 0x028, 0x02C, 0x030
IFLS, IMSC, RIS, MIS, ICR, DMACR = 0x034, 0x038, 0x03C, 0x040, 0x044, 0x048

FR_RXFE = 1 << 4  # receive FIFO empty
FR_TXFE = 1 << 7  # transmit FIFO empty (output is taken by the host at once, so always)
INT_RX = 1 << 4
INT_TX = 1 << 5

#: PeriphID0..3 then PCellID0..3, read at 0xFE0..0xFFC: what identifies a PL011 to a driver.
_ID_REGISTERS = (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)

#: Receives every byte the guest transmits, in order.
UartSink = Callable[[bytes], None]


@dataclasses.dataclass
class Pl011State:
    """Everything a PL011 holds; saved and restored with the machine."""

    rsr: int = 0
    ilpr: int = 0
    ibrd: int = 0
    fbrd: int = 0
    lcr_h: int = 0
    cr: int = 0x300  # TXE | RXE, as after reset
    ifls: int = 0x12
    imsc: int = 0
    ris: int = INT_TX
    dmacr: int = 0
    rx_fifo: bytes = b""
    tx_count: int = 0  # bytes the guest has transmitted since power-on
    rx_len: int = 0  # len(rx_fifo) on the wire; set by pre_save, checked by post_load


#: Bound on the receive FIFO a checkpoint may carry (input queued by the host, not a hardware FIFO).
RX_FIFO_MAX = 1 << 20


def _pl011_pre_save(state: Pl011State) -> None:
    state.rx_len = len(state.rx_fifo)


def _pl011_post_load(state: Pl011State, _version: int) -> None:
    state.rx_fifo = bytes(state.rx_fifo)


VMSTATE_PL011 = VMStateDescription(
    "pl011", version_id=1, minimum_version_id=1,
    fields=[
        uint32("rsr"), uint32("ilpr"), uint32("ibrd"), uint32("fbrd"), uint32("lcr_h"),
        uint32("cr"), uint32("ifls"), uint32("imsc"), uint32("ris"), uint32("dmacr"),
        uint64("tx_count"),
        uint32("rx_len"), vbuffer("rx_fifo", "rx_len", RX_FIFO_MAX),
    ],
    pre_save=_pl011_pre_save, post_load=_pl011_post_load,
)


class Pl011(MmioDevice):
    """The UART.  Transmitted bytes are handed to ``sink`` one write at a time (no buffering here:
    the sink decides, so that progress lines appear when the guest prints them)."""

    name = "pl011"

    def __init__(self, sink: UartSink, base: int = UART_BASE) -> None:
        self.base = base
        self.size = UART_SIZE
        self.sink = sink
        self.state = Pl011State()

    def reset(self) -> None:
        self.state = Pl011State()

    def feed_input(self, data: bytes) -> None:
        """Queue bytes for the guest to read from DR (host → guest)."""
        self.state.rx_fifo += data
        if self.state.rx_fifo:
            self.state.ris |= INT_RX

    def read(self, offset: int, size: int) -> int:
        s = self.state
        if offset == DR:
            if not s.rx_fifo:
                return 0
            byte, s.rx_fifo = s.rx_fifo[0], s.rx_fifo[1:]
            if not s.rx_fifo:
                s.ris &= ~INT_RX
            return byte
        if offset == FR:
            return FR_TXFE | (0 if s.rx_fifo else FR_RXFE)
        if 0xFE0 <= offset <= 0xFFC:
            return _ID_REGISTERS[(offset - 0xFE0) // 4]
        simple = {RSR: s.rsr, ILPR: s.ilpr, IBRD: s.ibrd, FBRD: s.fbrd, LCR_H: s.lcr_h, CR: s.cr,
                  IFLS: s.ifls, IMSC: s.imsc, RIS: s.ris, MIS: s.ris & s.imsc, DMACR: s.dmacr}
        return simple.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        s = self.state
        if offset == DR:
            s.tx_count += 1
            self.sink(bytes((value & 0xFF,)))
        elif offset == RSR:
            s.rsr = 0  # any write clears the error flags
        elif offset == ICR:
            s.ris &= ~value
        elif offset in (ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, DMACR):
            field = {ILPR: "ilpr", IBRD: "ibrd", FBRD: "fbrd", LCR_H: "lcr_h", CR: "cr",
                     IFLS: "ifls", IMSC: "imsc", DMACR: "dmacr"}[offset]
            setattr(s, field, value & 0xFFFF)
        # Writes to read-only or reserved registers are ignored, as on the hardware.
