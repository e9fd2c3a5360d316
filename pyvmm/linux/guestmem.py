"""Guest memory as system calls see it: bad pointers become EFAULT, strings are read page by page.

Guest virtual addresses equal guest-physical ones (the MMU is off), so a pointer is valid when it
lies in a RAM block of the machine.  Every access here goes through the machine's RAM blocks and
turns :class:`~pyvmm.errors.GuestMemoryError` into ``LinuxErrno(EFAULT)``, so a hostile pointer
can never crash the host side.  Runs on the vCPU thread (from the SVC hook).
"""

from __future__ import annotations

import struct

from ..errors import GuestMemoryError
from ..machine import Machine
from ..ram import PAGE_SIZE
from .abi import Errno, LinuxErrno

_MASK64 = (1 << 64) - 1
_ZERO_PAGE = bytes(PAGE_SIZE)


def page_down(addr: int) -> int:
    return addr & ~(PAGE_SIZE - 1)


def page_up(addr: int) -> int:
    return (addr + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class GuestMemory:
    """Checked reads and writes of guest memory for one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def _check(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0 or addr + length > _MASK64:
            raise LinuxErrno(Errno.EFAULT)

    def read(self, addr: int, length: int) -> bytes:
        self._check(addr, length)
        try:
            return self.machine.read_memory(addr, length)
        except GuestMemoryError:
            raise LinuxErrno(Errno.EFAULT) from None

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self._check(addr, len(data))
        try:
            self.machine.write_memory(addr, data)
        except GuestMemoryError:
            raise LinuxErrno(Errno.EFAULT) from None

    def view(self, addr: int, length: int) -> memoryview:
        """A writable view of guest memory (no copy), or EFAULT."""
        self._check(addr, length)
        if length == 0:
            return memoryview(bytearray())
        try:
            return self.machine.memory_view(addr, length)
        except GuestMemoryError:
            raise LinuxErrno(Errno.EFAULT) from None

    def valid(self, addr: int, length: int) -> bool:
        try:
            self._check(addr, length)
            self.machine.block_for(addr, max(length, 1))
        except (LinuxErrno, GuestMemoryError):
            return False
        return True

    def room(self, addr: int, length: int) -> int:
        """How many of the ``length`` bytes from ``addr`` lie in guest RAM, counting from
        ``addr`` up to the end of its RAM block (0 if ``addr`` is not in RAM)."""
        if length <= 0 or self.valid(addr, length):
            return max(length, 0)
        if not self.valid(addr, 1):
            return 0
        block, offset = self.machine.block_for(addr)
        return min(length, block.size - offset)

    def read_u32(self, addr: int) -> int:
        value: int = struct.unpack("<I", self.read(addr, 4))[0]
        return value

    def read_u64(self, addr: int) -> int:
        value: int = struct.unpack("<Q", self.read(addr, 8))[0]
        return value

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<Q", value & _MASK64))

    def read_cstring(self, addr: int, limit: int) -> bytes:
        """The NUL-terminated string at ``addr`` (without the NUL), at most ``limit`` bytes long.

        Reads one page at a time so that a string ending just before unmapped memory is read
        fine.  EFAULT if it runs into unmapped memory, ENAMETOOLONG past ``limit``.
        """
        out = bytearray()
        while True:
            chunk = self.read(addr, PAGE_SIZE - (addr % PAGE_SIZE))
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                if len(out) >= limit:
                    raise LinuxErrno(Errno.ENAMETOOLONG)
                return bytes(out)
            out += chunk
            if len(out) >= limit:
                raise LinuxErrno(Errno.ENAMETOOLONG)
            addr += len(chunk)

    def zero(self, addr: int, length: int) -> None:
        """Make ``[addr, addr+length)`` (page-aligned) read as zeros, writing only pages that are
        not zero already: untouched pages stay unpopulated on the host."""
        if length <= 0:
            return
        try:
            block, offset = self.machine.block_for(addr, length)
        except GuestMemoryError:
            raise LinuxErrno(Errno.EFAULT) from None
        mem = block.mem
        first = offset // PAGE_SIZE
        for page in range(first, first + length // PAGE_SIZE):
            if not block.is_zero_page(page):
                mem[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = _ZERO_PAGE

    def copy(self, dst: int, src: int, length: int) -> None:
        """memmove inside guest memory."""
        if length <= 0:
            return
        data = self.read(src, length)
        self.write(dst, data)
