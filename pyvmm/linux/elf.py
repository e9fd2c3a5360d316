"""Reading and validating a static aarch64 ELF64 executable (the file is untrusted input).

Only what the loader needs is kept: the entry point, the program headers and the loadable segments.
Every offset and size is checked against the file before use, and every rejection is a
:class:`~pyvmm.errors.ConfigError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import struct

from ..errors import ConfigError

#: e_ident[0:16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
#: e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
#: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
_PHDR = struct.Struct("<IIQQQQQQ")

ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_REL, ET_EXEC, ET_DYN, ET_CORE = 1, 2, 3, 4
EM_AARCH64 = 183
PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_PHDR, PT_TLS = 1, 2, 3, 6, 7
PF_X, PF_W, PF_R = 1, 2, 4
#: More program headers than this is not a program, it is an attack on the loader.
MAX_PHNUM = 256

_MACHINE_NAMES = {3: "x86 (i386)", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "s390",
                  40: "ARM (32-bit)", 62: "x86-64", 183: "AArch64", 243: "RISC-V"}
_TYPE_NAMES = {0: "no file type", ET_REL: "a relocatable object (ET_REL)",
               ET_DYN: "position-independent (ET_DYN: a PIE or shared library)",
               ET_CORE: "a core dump (ET_CORE)"}


@dataclasses.dataclass(frozen=True)
class Segment:
    """One PT_LOAD segment: ``filesz`` bytes from ``offset`` in the file land at ``vaddr``,
    followed by zeros up to ``memsz`` (the bss)."""

    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int

    @property
    def end(self) -> int:
        return self.vaddr + self.memsz

    @property
    def prot(self) -> int:
        """The segment's flags as PROT_* bits (R=1, W=2, X=4)."""
        return (((self.flags & PF_R) and 1) | ((self.flags & PF_W) and 2)
                | ((self.flags & PF_X) and 4))


@dataclasses.dataclass(frozen=True)
class ElfProgram:
    """A validated static ET_EXEC aarch64 program."""

    path: str
    entry: int
    phnum: int
    phentsize: int
    #: Where the program headers are in guest memory once loaded (AT_PHDR), or None when no
    #: loaded segment holds them (the loader then puts a copy on the stack).
    phdr_vaddr: int | None
    #: The raw program header table (for the stack copy).
    phdr_bytes: bytes
    segments: tuple[Segment, ...]

    @property
    def low(self) -> int:
        return min(s.vaddr for s in self.segments)

    @property
    def high(self) -> int:
        return max(s.end for s in self.segments)


def read_program(path: str, *, limit: int) -> tuple[ElfProgram, bytes]:
    """Read and validate the ELF file at ``path``; return it with the file's bytes.

    ``limit``: every segment must end below this guest address (where the loader's window ends).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read ELF program {path}: {err.strerror or err}") from err
    return parse_program(path, data, limit=limit), data


def parse_program(path: str, data: bytes, *, limit: int) -> ElfProgram:
    """Validate ``data`` as a static aarch64 ELF64 executable (see :func:`read_program`)."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{path}: {what}")

    if data[:4] != b"\x7fELF":
        raise bad("not an ELF file (no \\x7fELF magic)")
    if len(data) < 5:
        raise bad("truncated ELF header")
    if data[4] == ELFCLASS32:
        raise bad("32-bit ELF (ELFCLASS32); pyvmm runs 64-bit aarch64 programs only")
    if data[4] != ELFCLASS64:
        raise bad(f"invalid ELF class {data[4]}")
    if len(data) < _EHDR.size:
        raise bad(f"truncated ELF header ({len(data)} bytes, need {_EHDR.size})")
    (ident, e_type, e_machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(data)
    if ident[5] != ELFDATA2LSB:
        raise bad("big-endian ELF; pyvmm runs little-endian aarch64 programs only")
    if e_machine != EM_AARCH64:
        name = _MACHINE_NAMES.get(e_machine, f"machine {e_machine}")
        raise bad(f"built for {name}, not AArch64 (e_machine {e_machine})")
    if e_type != ET_EXEC:
        kind = _TYPE_NAMES.get(e_type, f"ELF type {e_type}")
        raise bad(f"{kind}; pyvmm runs static non-PIE executables (ET_EXEC) only")
    if phentsize != _PHDR.size:
        raise bad(f"program header size {phentsize}, expected {_PHDR.size}")
    if not 1 <= phnum <= MAX_PHNUM:
        raise bad(f"{phnum} program headers (expected 1..{MAX_PHNUM})")
    if phoff > len(data) or phoff + phnum * phentsize > len(data):
        raise bad(f"truncated program headers ({phnum} at offset {phoff}, file is "
                  f"{len(data)} bytes)")
    phdr_bytes = data[phoff:phoff + phnum * phentsize]

    segments: list[Segment] = []
    phdr_vaddr: int | None = None
    headers = [_PHDR.unpack_from(data, phoff + i * phentsize) for i in range(phnum)]
    for index, (p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz,
                _align) in enumerate(headers):
        if p_type == PT_INTERP:
            raise bad("dynamically linked (has a PT_INTERP program interpreter); pyvmm runs "
                      "static programs only")
        if p_type == PT_PHDR:
            phdr_vaddr = p_vaddr
        if p_type != PT_LOAD:
            continue
        where = f"segment {index} (vaddr 0x{p_vaddr:x})"
        if p_filesz > p_memsz:
            raise bad(f"{where}: file size 0x{p_filesz:x} exceeds memory size 0x{p_memsz:x}")
        if p_offset + p_filesz > len(data):
            raise bad(f"{where}: truncated: needs file bytes up to {p_offset + p_filesz}, file "
                      f"is {len(data)} bytes")
        if p_memsz == 0:
            continue
        if p_vaddr + p_memsz > limit:
            raise bad(f"{where}: ends at 0x{p_vaddr + p_memsz:x}, above the 0x{limit:x} limit "
                      f"of pyvmm's program window")
        segments.append(Segment(p_vaddr, p_memsz, p_offset, p_filesz, p_flags))
    if not segments:
        raise bad("no loadable (PT_LOAD) segment")
    segments.sort(key=lambda s: s.vaddr)
    for a, b in zip(segments, segments[1:]):
        if b.vaddr < a.end:
            raise bad(f"loadable segments at 0x{a.vaddr:x} and 0x{b.vaddr:x} overlap")
    if not any(s.vaddr <= entry < s.end and s.flags & PF_X for s in segments):
        raise bad(f"entry point 0x{entry:x} is not in an executable loaded segment")
    if phdr_vaddr is None:
        # No PT_PHDR (static glibc has none): the headers are where their file bytes are loaded.
        for s in segments:
            if s.offset <= phoff and phoff + len(phdr_bytes) <= s.offset + s.filesz:
                phdr_vaddr = s.vaddr + (phoff - s.offset)
                break
    return ElfProgram(path=path, entry=entry, phnum=phnum, phentsize=phentsize,
                      phdr_vaddr=phdr_vaddr, phdr_bytes=phdr_bytes, segments=tuple(segments))
