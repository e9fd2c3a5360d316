"""Test helper: tiny static aarch64 Linux programs, assembled with keystone and wrapped in ELF64.

``build_elf`` writes the smallest ET_EXEC file the loader accepts (one RX segment holding the
headers and the code, optionally a RW data segment with bss), and lets a test spoil any header
field to check the loader's validation.  Programs use the Linux syscall ABI directly: number in
x8, arguments in x0..x5, ``svc #0``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from keystone import KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN, Ks

BASE = 0x400000
CODE_OFFSET = 0x1000
DATA_VADDR = 0x600000
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD, PT_INTERP = 1, 3
PF_X, PF_W, PF_R = 1, 2, 4

#: exit_group(x0): the usual last two instructions of a test program.
EXIT = "mov x8, #94\n svc #0\n"


def assemble(source: str, address: int = BASE + CODE_OFFSET) -> bytes:
    """Assemble aarch64 ``source`` as if placed at ``address``."""
    encoding, _count = Ks(KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN).asm(source, address)
    return bytes(encoding or b"")


def build_elf(code: bytes, *, data: bytes = b"", bss: int = 0, entry: int | None = None,
              elf_class: int = 2, byte_order: int = 1, e_type: int = 2, machine: int = 183,
              interp: bytes | None = None, phentsize: int = PHDR.size,
              code_vaddr: int = BASE) -> bytes:
    """An ELF64 executable whose first PT_LOAD maps the file from offset 0 at ``code_vaddr``
    (so the code at file offset CODE_OFFSET runs at ``code_vaddr + CODE_OFFSET``)."""
    phdrs = []
    text_size = CODE_OFFSET + len(code)
    phdrs.append(PHDR.pack(PT_LOAD, PF_R | PF_X, 0, code_vaddr, code_vaddr, text_size,
                           text_size, 0x1000))
    blob = bytearray(CODE_OFFSET + len(code))
    blob[CODE_OFFSET:] = code
    if data or bss:
        offset = (len(blob) + 0xFFF) & ~0xFFF
        blob.extend(bytes(offset - len(blob)))
        blob.extend(data)
        phdrs.append(PHDR.pack(PT_LOAD, PF_R | PF_W, offset, DATA_VADDR, DATA_VADDR, len(data),
                               len(data) + bss, 0x1000))
    if interp is not None:
        offset = len(blob)
        blob.extend(interp)
        phdrs.insert(0, PHDR.pack(PT_INTERP, PF_R, offset, 0, 0, len(interp), len(interp), 1))
    ident = b"\x7fELF" + bytes([elf_class, byte_order, 1]) + bytes(9)
    header = EHDR.pack(ident, e_type, machine, 1,
                       entry if entry is not None else code_vaddr + CODE_OFFSET,
                       EHDR.size, 0, 0, EHDR.size, phentsize, len(phdrs), 64, 0, 0)
    table = b"".join(phdrs)
    blob[:EHDR.size + len(table)] = header + table
    return bytes(blob)


def write_program(directory: Path, source: str, name: str = "prog", **kwargs: object) -> str:
    """Assemble ``source`` into an ELF file in ``directory``; return its path."""
    path = directory / name
    path.write_bytes(build_elf(assemble(source), **kwargs))  # type: ignore[arg-type]
    return str(path)
