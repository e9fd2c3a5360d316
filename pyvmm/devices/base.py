"""What the machine asks of an MMIO device: a name, a window, register read/write and reset."""

from __future__ import annotations

import abc


class MmioDevice(abc.ABC):
    """A device whose registers live in a guest-physical window.

    ``read``/``write`` run on the vCPU thread, from unicorn's MMIO callbacks, with the GIL held;
    they must not block.  Offsets are relative to ``base``.
    """

    #: QEMU-style id string of the device's state section (e.g. ``"pl011"``).
    name: str
    base: int
    size: int

    @abc.abstractmethod
    def read(self, offset: int, size: int) -> int:
        """Value of the register at ``offset`` (``size`` bytes wide access)."""

    @abc.abstractmethod
    def write(self, offset: int, size: int, value: int) -> None:
        """Store ``value`` into the register at ``offset``."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Return to the power-on state."""
