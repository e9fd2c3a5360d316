"""Starting a static Linux program on a machine: memory layout, ELF image, initial stack, state.

Guest memory layout (virtual == physical, the MMU is off)::

    image base (e.g. 0x400000)   ELF PT_LOAD segments, then bss, in RAM block "linux.image"
    page_up(end of bss)          brk heap, growing up to the end of that block
                                 (64 MiB after the bss, at most up to 0x0900_0000)
    0x4000_0000                  main RAM: mmap() area, allocated top-down ...
    RAM end - 8 MiB .. RAM end   ... below the stack, whose top is the end of RAM

The initial stack is laid out exactly as Linux's ``create_elf_tables`` does for aarch64: strings
(execfn, environment, arguments) at the top, then the platform string and the 16 AT_RANDOM bytes,
then argc, argv[], NULL, envp[], NULL and the auxiliary vector, with SP 16-byte aligned.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from ..machine import LOW_MEMORY_LIMIT, Machine
from ..ram import PAGE_SIZE
from . import mm
from .abi import (
    AT_BASE,
    AT_CLKTCK,
    AT_EGID,
    AT_ENTRY,
    AT_EUID,
    AT_EXECFN,
    AT_FLAGS,
    AT_GID,
    AT_HWCAP,
    AT_HWCAP2,
    AT_NULL,
    AT_PAGESZ,
    AT_PHDR,
    AT_PHENT,
    AT_PHNUM,
    AT_PLATFORM,
    AT_RANDOM,
    AT_SECURE,
    AT_UID,
    CLOCKS_PER_SEC,
    HWCAP_ASIMD,
    HWCAP_FP,
    MAP_ANONYMOUS,
    MAP_GROWSDOWN,
    MAP_PRIVATE,
    O_RDONLY,
    O_WRONLY,
)
from .elf import ElfProgram, read_program
from .guestmem import page_down, page_up
from .process import LinuxProcess, OutputSink
from .state import (
    MAX_FILES_LIMIT,
    FdEntry,
    FileState,
    LinuxState,
    MemoryState,
    OpenFileDescription,
    OverlayNode,
    state_from_dict,
)
from .state import (
    Mapping as MemoryMapping,
)
from .sys_process import GID, UID
from .vfs import default_files_limit

IMAGE_BLOCK = "linux.image"
STACK_SIZE = 8 << 20
#: Room for the brk heap after the bss (glibc's malloc uses mmap once brk cannot grow).
BRK_RESERVE = 64 << 20
#: Linux refuses to map anything below this (vm.mmap_min_addr), so NULL stays unmapped.
MIN_LOAD_ADDRESS = 0x10000
MIN_RAM = STACK_SIZE + (8 << 20)
#: Most bytes of arguments, environment and execfn strings (Linux allows a quarter of the stack).
MAX_STRINGS = STACK_SIZE // 4
#: The environment a program gets before the caller's additions: small and the same everywhere.
DEFAULT_ENV: tuple[tuple[str, str], ...] = (("PATH", "/bin:/usr/bin"), ("HOME", "/"))
PLATFORM = b"aarch64"
HWCAP = HWCAP_FP | HWCAP_ASIMD


def at_random_bytes(seed: int) -> bytes:
    """The 16 AT_RANDOM bytes a program gets (glibc seeds its stack guard and pointer guard
    from them): a function of the machine seed only."""
    return hashlib.sha256(b"pyvmm-linux AT_RANDOM\0" + str(seed).encode()).digest()[:16]


def load_program(machine: Machine, elf_path: str | os.PathLike[str], argv: Iterable[str], *,
                 env: Mapping[str, str] | None = None,
                 files: Iterable[str | os.PathLike[str]] = (), stdin: bytes = b"",
                 stdout: OutputSink | None = None, stderr: OutputSink | None = None,
                 cwd: str | None = None, stdin_live: bool = False,
                 files_limit: int | None = None) -> LinuxProcess:
    """Load a static aarch64 Linux program on a machine that has not started yet.

    See the package documentation (:mod:`pyvmm.linux`) for the meaning of each argument.
    Raises ConfigError, naming the file or the argument, for anything that cannot be loaded.
    """
    path = os.path.abspath(os.fspath(elf_path))
    program, data = read_program(path, limit=LOW_MEMORY_LIMIT)
    args = _strings("argument", argv)
    if not args:
        raise ConfigError("a Linux program needs at least one argument (its name, argv[0])")
    envp = _environment(env)
    exports = _exports(files, path)
    guest_cwd = os.path.normpath(cwd if cwd is not None else os.getcwd())
    if not guest_cwd.startswith("/"):
        raise ConfigError(f"guest working directory {cwd!r} is not an absolute path")
    if not isinstance(stdin, (bytes, bytearray)):
        raise ConfigError("stdin must be bytes")
    if stdin_live and stdin:
        raise ConfigError("stdin is either given bytes or live, not both")
    strings = [s.encode("utf-8", "surrogateescape") + b"\0" for s in (path, *envp, *args)]
    if sum(len(s) for s in strings) > MAX_STRINGS:
        raise ConfigError(f"arguments and environment take more than {MAX_STRINGS} bytes")
    ram = machine.ram
    if ram.size < MIN_RAM:
        raise ConfigError(f"RAM of {ram.size >> 20} MiB is too small for a Linux program "
                          f"(needs at least {MIN_RAM >> 20} MiB)")
    if files_limit is None:
        files_limit = default_files_limit(ram.size)
    if isinstance(files_limit, bool) or not isinstance(files_limit, int) or \
            not 0 <= files_limit <= MAX_FILES_LIMIT:
        raise ConfigError(f"files limit {files_limit!r} is outside [0, {MAX_FILES_LIMIT >> 20}M]: "
                          f"a checkpoint holds the guest's files, in a section of bounded size")

    if program.low < MIN_LOAD_ADDRESS:
        raise ConfigError(f"{path}: segment at 0x{program.low:x} lies below 0x"
                          f"{MIN_LOAD_ADDRESS:x}, where Linux maps nothing")
    image_gpa = page_down(program.low)
    brk_start = page_up(program.high)
    image_end = min(LOW_MEMORY_LIMIT, brk_start + BRK_RESERVE)
    block = machine.add_ram_block(IMAGE_BLOCK, image_gpa, image_end - image_gpa)
    memory = MemoryState(image_block=IMAGE_BLOCK, image_gpa=image_gpa,
                         image_size=image_end - image_gpa, brk_start=brk_start, brk=brk_start,
                         brk_limit=image_end, mmap_low=ram.gpa,
                         mmap_high=ram.gpa + ram.size - STACK_SIZE,
                         stack_top=ram.gpa + ram.size, stack_size=STACK_SIZE)
    for seg in program.segments:
        block.write(seg.vaddr - image_gpa, data[seg.offset:seg.offset + seg.filesz])
        start = page_down(seg.vaddr)
        mm.insert_mapping(memory, MemoryMapping(start, page_up(seg.end) - start, seg.prot,
                                                MAP_PRIVATE, "image", path,
                                                page_down(seg.offset)))
    mm.insert_mapping(memory, MemoryMapping(memory.stack_top - STACK_SIZE, STACK_SIZE, 3,
                                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN,
                                            "stack"))

    files_state = FileState(cwd=guest_cwd, exports=exports, stdin=bytes(stdin),
                            stdin_live=stdin_live, files_limit=files_limit)
    for fd, kind in enumerate(("stdin", "stdout", "stderr")):
        access = O_RDONLY if kind == "stdin" else O_WRONLY
        files_state.descriptions[fd] = OpenFileDescription(kind, f"/dev/{kind}", access)
        files_state.fds[fd] = FdEntry(fd)
    files_state.next_description = 3
    state = LinuxState(exe_path=path, argv=args, envp=envp, memory=memory, files=files_state,
                       comm=os.path.basename(path)[:15])
    process = LinuxProcess(machine, state, stdout=stdout, stderr=stderr)
    if process.fs.lookup("/tmp") is None:
        # Programs expect a writable /tmp; it lives in the overlay like every other change (it
        # counts against the limit but is never refused: even a limit of 0 gets it).
        process.fs.set_entry("/tmp", OverlayNode("dir", mode=0o1777), charge=False)

    sp = _initial_stack(machine, program, strings, len(envp), len(args), memory.stack_top)
    machine.set_entry(program.entry, {"sp": sp, "x0": 0})
    return process


def attach_process(machine: Machine, state: LinuxState | dict[str, Any], *,
                   stdout: OutputSink | None = None,
                   stderr: OutputSink | None = None) -> LinuxProcess:
    """Re-create the Linux layer for a machine whose RAM and registers are being restored.

    ``state`` is a :class:`LinuxState` or the dict :meth:`LinuxProcess.state_to_dict` gave.  The
    program's image RAM block is added if the machine does not have it yet (so call this before
    RAM is loaded and before the machine starts).  Host files are opened again by path: they
    must not have changed since the state was saved.
    """
    if not isinstance(state, LinuxState):
        state = state_from_dict(state)
    memory = state.memory
    # The state may come from a crafted file: no block is made of a size it merely declares.
    if not MIN_LOAD_ADDRESS <= memory.image_gpa < memory.image_gpa + memory.image_size \
            <= LOW_MEMORY_LIMIT:
        raise ConfigError(f"the saved process's image block [0x{memory.image_gpa:x}, +0x"
                          f"{memory.image_size:x}) does not lie in [0x{MIN_LOAD_ADDRESS:x}, 0x"
                          f"{LOW_MEMORY_LIMIT:x})")
    existing = [b for b in machine.ram_blocks if b.name == memory.image_block]
    if not existing:
        machine.add_ram_block(memory.image_block, memory.image_gpa, memory.image_size)
    elif (existing[0].gpa, existing[0].size) != (memory.image_gpa, memory.image_size):
        raise ConfigError(f"RAM block {memory.image_block} is at 0x{existing[0].gpa:x} "
                          f"(+0x{existing[0].size:x}), the saved process expects 0x"
                          f"{memory.image_gpa:x} (+0x{memory.image_size:x})")
    main_end = machine.ram.gpa + machine.ram.size
    if memory.stack_top != main_end:
        raise ConfigError(f"the saved process has its stack top at 0x{memory.stack_top:x}, but "
                          f"this machine's RAM ends at 0x{main_end:x}: RAM sizes differ")
    return LinuxProcess(machine, state, stdout=stdout, stderr=stderr)


# ------------------------------------------------------------------------------ helpers
def _strings(what: str, values: Iterable[str]) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise ConfigError(f"{what}s must be a list of strings, not one string")
    out = []
    for value in values:
        if not isinstance(value, str):
            raise ConfigError(f"{what} {value!r} is not a string")
        if "\0" in value:
            raise ConfigError(f"{what} {value!r} contains a NUL byte")
        out.append(value)
    return out


def _environment(env: Mapping[str, str] | None) -> list[str]:
    merged = dict(DEFAULT_ENV)
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ConfigError(f"invalid environment variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"environment variable {key}: value {value!r} is not a string "
                              f"without NUL bytes")
        merged[key] = value
    return [f"{key}={value}" for key, value in merged.items()]


def _exports(files: Iterable[str | os.PathLike[str]], exe_path: str) -> list[str]:
    if isinstance(files, (str, bytes)):
        raise ConfigError("files must be a list of paths, not one string")
    exports: list[str] = []
    for entry in [*files, exe_path]:
        path = os.path.abspath(os.fspath(entry))
        if not os.path.lexists(path):
            raise ConfigError(f"guest file {entry}: no such file or directory on the host")
        # A listed symlink means what it points to: show the target's path too.
        for candidate in (path, os.path.realpath(path)):
            if candidate not in exports:
                exports.append(candidate)
    return exports


def _initial_stack(machine: Machine, program: ElfProgram, strings: list[bytes], envc: int,
                   argc: int, top: int) -> int:
    """Write argc/argv/envp/auxv and their strings below ``top``; return the initial SP.

    ``strings``: execfn, the environment, the arguments, each NUL-terminated.
    """
    # Linux copies execfn first (highest), then the environment and the arguments, each
    # last-first, so that envp[0] and argv[0] are the lowest of their group.
    p = top - 8  # one NULL pointer's room at the very top
    addresses = [0] * len(strings)
    for i in [0, *reversed(range(1, 1 + envc)), *reversed(range(1 + envc, 1 + envc + argc))]:
        p -= len(strings[i])
        addresses[i] = p
        machine.write_memory(p, strings[i])
    execfn_addr = addresses[0]
    env_addrs, arg_addrs = addresses[1:1 + envc], addresses[1 + envc:]

    p &= ~15
    p -= len(PLATFORM) + 1
    platform_addr = p
    machine.write_memory(p, PLATFORM + b"\0")
    p -= 16
    random_addr = p
    machine.write_memory(p, at_random_bytes(machine.seed))
    phdr_addr = program.phdr_vaddr
    if phdr_addr is None:
        # No loaded segment holds the program headers: give the program a copy of them.
        p = (p - len(program.phdr_bytes)) & ~7
        phdr_addr = p
        machine.write_memory(p, program.phdr_bytes)

    auxv = [(AT_HWCAP, HWCAP), (AT_PAGESZ, PAGE_SIZE), (AT_CLKTCK, CLOCKS_PER_SEC),
            (AT_PHDR, phdr_addr), (AT_PHENT, program.phentsize), (AT_PHNUM, program.phnum),
            (AT_BASE, 0), (AT_FLAGS, 0), (AT_ENTRY, program.entry), (AT_UID, UID),
            (AT_EUID, UID), (AT_GID, GID), (AT_EGID, GID), (AT_SECURE, 0),
            (AT_RANDOM, random_addr), (AT_HWCAP2, 0), (AT_EXECFN, execfn_addr),
            (AT_PLATFORM, platform_addr), (AT_NULL, 0)]
    words = [argc, *arg_addrs, 0, *env_addrs, 0]
    for key, value in auxv:
        words += [key, value]
    sp = (p - 8 * len(words)) & ~15
    machine.write_memory(sp, struct.pack(f"<{len(words)}Q", *words))
    return sp
