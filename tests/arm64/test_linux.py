"""The Linux layer's contracts, one at a time, with tiny hand-assembled programs (elfbuild.py).

ELF validation (``test_negative_*``), the initial stack, error paths of system calls (bad
pointers, missing files, unknown calls), fd allocation, determinism of AT_RANDOM and getrandom,
the state's dict form, and continuing a process from copied state on a new machine.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from elfbuild import BASE, CODE_OFFSET, EXIT, assemble, build_elf, write_program

from pyvmm.errors import ConfigError, GuestError, UnsupportedSyscall
from pyvmm.linux import (
    IMAGE_BLOCK,
    attach_process,
    load_program,
    mm,
    state_from_dict,
)
from pyvmm.linux.abi import AT_NULL, AT_PHNUM, AT_RANDOM, Errno, LinuxErrno
from pyvmm.linux.filedata import FileData
from pyvmm.linux.state import FileState, OverlayNode
from pyvmm.linux.vfs import FileSystem
from pyvmm.machine import Machine, StopReason

RunLinux = Callable[..., Any]
ENTRY = BASE + CODE_OFFSET


def _negated_result_exit() -> str:
    """Exit with -x0, so that a failing call's errno becomes the exit code."""
    return "neg x0, x0\n" + EXIT


# ------------------------------------------------------------------------------ ELF validation
def _load(tmp_path: Path, blob: bytes, name: str = "prog") -> None:
    path = tmp_path / name
    path.write_bytes(blob)
    with Machine(32 << 20) as machine:
        load_program(machine, str(path), [name])


@pytest.mark.parametrize("blob,message", [
    (b"#!/bin/sh\necho hi\n", "not an ELF file"),
    (b"", "not an ELF file"),
    (b"\x7fELF", "truncated ELF header"),
    (b"\x7fELF\x02\x01\x01" + bytes(20), "truncated ELF header"),
])
def test_negative_not_an_elf_or_truncated_header(tmp_path: Path, blob: bytes,
                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _load(tmp_path, blob, "junk")
    assert str(tmp_path / "junk") in str(info.value)


def test_negative_wrong_class_order_machine_type(tmp_path: Path) -> None:
    code = assemble("mov x0, #0\n" + EXIT)
    cases = [
        (build_elf(code, elf_class=1), "32-bit ELF"),
        (build_elf(code, byte_order=2), "big-endian"),
        (build_elf(code, machine=62), "built for x86-64, not AArch64"),
        (build_elf(code, e_type=3), "position-independent"),
        (build_elf(code, e_type=1), "relocatable"),
        (build_elf(code, interp=b"/lib/ld-linux-aarch64.so.1\0"), "dynamically linked"),
        (build_elf(code, phentsize=32), "program header size 32"),
        (build_elf(code, entry=0x1234), "entry point 0x1234"),
        (build_elf(code, code_vaddr=0x1000), "below 0x10000"),
        (build_elf(code, code_vaddr=0x8FFF000), "above the 0x9000000 limit"),
    ]
    for blob, message in cases:
        with pytest.raises(ConfigError, match=message):
            _load(tmp_path, blob)


def test_negative_truncated_program_headers_and_segments(tmp_path: Path) -> None:
    blob = build_elf(assemble("mov x0, #0\n" + EXIT))
    with pytest.raises(ConfigError, match="truncated program headers"):
        _load(tmp_path, blob[:80])
    with pytest.raises(ConfigError, match="segment 0 .* truncated"):
        _load(tmp_path, blob[:CODE_OFFSET + 2])


def test_negative_missing_program_and_guest_files(tmp_path: Path) -> None:
    with Machine(32 << 20) as machine, \
            pytest.raises(ConfigError, match="cannot read ELF program .*nothing-here"):
        load_program(machine, str(tmp_path / "nothing-here"), ["x"])
    prog = write_program(tmp_path, "mov x0, #0\n" + EXIT)
    with Machine(32 << 20) as machine, \
            pytest.raises(ConfigError, match="guest file .*absent: no such file"):
        load_program(machine, prog, ["prog"], files=[str(tmp_path / "absent")])
    with Machine(32 << 20) as machine, pytest.raises(ConfigError, match="at least one argument"):
        load_program(machine, prog, [])
    with Machine(8 << 20) as machine, \
            pytest.raises(ConfigError, match="too small for a Linux program"):
        load_program(machine, prog, ["prog"])
    with Machine(32 << 20) as machine, pytest.raises(ConfigError, match="files limit"):
        load_program(machine, prog, ["prog"], files_limit=1 << 40)


# ------------------------------------------------------------------------------ initial stack
def test_initial_stack_is_laid_out_like_linux(tmp_path: Path) -> None:
    prog = write_program(tmp_path, "mov x0, #0\n" + EXIT)
    with Machine(32 << 20, seed=3) as machine:
        load_program(machine, prog, ["prog", "arg one", ""], env={"LANG": "C"})
        cpu = machine.cpu_state()
        sp = cpu.sp
        assert sp % 16 == 0 and cpu.pc == ENTRY and cpu.x[0] == 0

        def word(addr: int) -> int:
            value: int = struct.unpack("<Q", machine.read_memory(addr, 8))[0]
            return value

        top = machine.ram.gpa + machine.ram.size

        def string(addr: int) -> str:
            raw = machine.read_memory(addr, min(256, top - addr))
            return raw[:raw.index(b"\0")].decode()

        argc = word(sp)
        argv = [string(word(sp + 8 * (1 + i))) for i in range(argc)]
        assert argv == ["prog", "arg one", ""]
        assert word(sp + 8 * (1 + argc)) == 0
        envp, pos = [], sp + 8 * (2 + argc)
        while word(pos):
            envp.append(string(word(pos)))
            pos += 8
        assert envp == ["PATH=/bin:/usr/bin", "HOME=/", "LANG=C"]
        auxv: dict[int, int] = {}
        pos += 8
        while True:
            key, value = word(pos), word(pos + 8)
            pos += 16
            if key == AT_NULL:
                break
            auxv[key] = value
        assert auxv[AT_PHNUM] == 1
        assert auxv[3] == BASE + 64  # AT_PHDR: the headers as loaded from file offset 64
        assert auxv[9] == ENTRY and auxv[6] == 4096 and auxv[16] == 0b11 and auxv[26] == 0
        assert string(auxv[15]) == "aarch64"
        assert string(auxv[31]) == prog  # AT_EXECFN
        assert machine.read_memory(auxv[AT_RANDOM], 16) != bytes(16)
        # argv[0] is the lowest string, execfn the highest, just below the top 8 bytes.
        assert word(sp + 8) < word(sp + 16) < auxv[31] < top - 8


AT_RANDOM_PROGRAM = """
    mov x9, sp
    ldr x10, [x9]
    add x9, x9, #8
    add x9, x9, x10, lsl #3
    add x9, x9, #8
skip_env:
    ldr x11, [x9], #8
    cbnz x11, skip_env
find:
    ldp x11, x12, [x9], #16
    cmp x11, #25
    b.eq found
    cbnz x11, find
    mov x0, #1
""" + EXIT + """
found:
    mov x0, #1
    mov x1, x12
    mov x2, #16
    mov x8, #64
    svc #0
    mov x0, #0
""" + EXIT


def test_at_random_is_a_function_of_the_seed(tmp_path: Path, run_linux: RunLinux) -> None:
    prog = write_program(tmp_path, AT_RANDOM_PROGRAM)
    first, second, other = (run_linux(prog, ["prog"], seed=s).stdout for s in (1, 1, 2))
    assert len(first) == 16
    assert first == second
    assert first != other


GETRANDOM_AND_CLOCK = """
    sub sp, sp, #64
    mov x0, sp
    mov x1, #32
    mov x2, #0
    mov x8, #278
    svc #0
    mov x0, #1
    add x1, sp, #32
    mov x8, #113
    svc #0
    mov x0, #1
    mov x1, sp
    mov x2, #48
    mov x8, #64
    svc #0
    mov x0, #0
""" + EXIT


def test_getrandom_and_clock_are_deterministic(tmp_path: Path, run_linux: RunLinux) -> None:
    prog = write_program(tmp_path, GETRANDOM_AND_CLOCK)
    runs = [run_linux(prog, ["prog"], seed=s) for s in (9, 9, 10)]
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout[:32] != runs[2].stdout[:32]
    sec, nsec = struct.unpack("<qq", runs[0].stdout[32:48])
    assert 0 <= nsec < 1_000_000_000 and sec < 3600  # CLOCK_MONOTONIC: virtual time from 0
    assert runs[0].process.state.random_offset == 32


# ------------------------------------------------------------------------------ syscall errors
def test_unsupported_syscall_names_itself_and_its_pc(tmp_path: Path,
                                                     run_linux: RunLinux) -> None:
    for number, name in [(59, "pipe2"), (999, "unknown"), (220, "clone")]:
        prog = write_program(tmp_path, f"nop\n mov x8, #{number}\n svc #0\n" + EXIT)
        run = run_linux(prog, ["prog"], expect_exit=False)
        error = run.result.error
        assert run.result.reason is StopReason.ERROR
        assert isinstance(error, UnsupportedSyscall)
        assert f"unsupported system call {name} (number {number})" in str(error)
        assert error.pc == ENTRY + 8  # the svc itself
        if name == "clone":
            assert "single-process" in str(error)


def test_bad_pointers_return_efault(tmp_path: Path, run_linux: RunLinux) -> None:
    # write(1, 0x10, 5): nothing is mapped at 0x10.
    prog = write_program(tmp_path, "mov x0, #1\n mov x1, #0x10\n mov x2, #5\n mov x8, #64\n"
                         " svc #0\n" + _negated_result_exit())
    assert run_linux(prog, ["prog"]).exit_code == Errno.EFAULT
    # openat with a path pointer into the device window between the image and RAM.
    prog = write_program(tmp_path, "mov x0, #-100\n mov x1, #0x20000000\n mov x2, #0\n"
                         " mov x8, #56\n svc #0\n" + _negated_result_exit())
    assert run_linux(prog, ["prog"]).exit_code == Errno.EFAULT


def test_path_strings_read_up_to_the_end_of_memory(tmp_path: Path) -> None:
    """A string that ends right at the end of a RAM block is read (page by page, not past the
    block); one that runs off the end is EFAULT."""
    prog = write_program(tmp_path, "mov x0, #-100\n mov x1, x19\n mov x2, #0\n mov x8, #56\n"
                         " svc #0\n" + _negated_result_exit())
    for text, errno in [(b"/nowhere\0", Errno.ENOENT), (b"/nowhere", Errno.EFAULT)]:
        with Machine(32 << 20) as machine:
            process = load_program(machine, prog, ["prog"])
            block_end = process.state.memory.image_gpa + process.state.memory.image_size
            machine.write_memory(block_end - len(text), text)
            machine.set_entry(ENTRY, {"x19": block_end - len(text)})
            assert machine.run().exit_code == errno


OPEN_CLOSE_OPEN = """
    mov x0, #-100
    adr x1, path_a
    mov x2, #0
    mov x8, #56
    svc #0
    mov x19, x0
    mov x0, #-100
    adr x1, path_b
    mov x2, #0
    mov x8, #56
    svc #0
    mov x20, x0
    mov x0, x19
    mov x8, #57
    svc #0
    mov x0, #-100
    adr x1, path_c
    mov x2, #0
    mov x8, #56
    svc #0
    mov x21, x0
    mov x0, #-100
    adr x1, path_secret
    mov x2, #0
    mov x8, #56
    svc #0
    mov x22, x0
    sub sp, sp, #32
    stp x19, x20, [sp]
    stp x21, x22, [sp, #16]
    mov x0, #1
    mov x1, sp
    mov x2, #32
    mov x8, #64
    svc #0
    mov x0, #0
""" + EXIT + """
path_a:
    .asciz "{a}"
path_b:
    .asciz "{b}"
path_c:
    .asciz "/dev/null"
path_secret:
    .asciz "{secret}"
"""


def test_open_gives_lowest_free_fd_and_enoent_for_unlisted(tmp_path: Path,
                                                          run_linux: RunLinux) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "a").write_text("a")
    (shared / "b").write_text("b")
    (tmp_path / "secret").write_text("s")
    source = OPEN_CLOSE_OPEN.replace("{a}", str(shared / "a")).replace(
        "{b}", str(shared / "b")).replace("{secret}", str(tmp_path / "secret"))
    prog = write_program(tmp_path, source)
    run = run_linux(prog, ["prog"], files=[str(shared)])
    fd_a, fd_b, fd_c, secret = struct.unpack("<4q", run.stdout)
    assert (fd_a, fd_b, fd_c) == (3, 4, 3)
    assert secret == -Errno.ENOENT


def test_abort_reports_the_signal(tmp_path: Path, run_linux: RunLinux) -> None:
    # tgkill(getpid(), gettid(), SIGABRT), as glibc's abort() does.
    prog = write_program(tmp_path, "mov x8, #172\n svc #0\n mov x19, x0\n mov x8, #178\n"
                         " svc #0\n mov x1, x0\n mov x0, x19\n mov x2, #6\n mov x8, #131\n"
                         " svc #0\n" + EXIT)
    run = run_linux(prog, ["prog"], expect_exit=False)
    assert isinstance(run.result.error, GuestError)
    assert "killed by signal SIGABRT" in str(run.result.error)
    assert run.process.state.killed_by == "SIGABRT"


def test_futex_wait_on_a_changed_value_is_eagain(tmp_path: Path, run_linux: RunLinux) -> None:
    prog = write_program(tmp_path, "sub sp, sp, #16\n mov w9, #5\n str w9, [sp]\n mov x0, sp\n"
                         " mov x1, #128\n mov x2, #4\n mov x3, #0\n mov x8, #98\n svc #0\n"
                         + _negated_result_exit())
    assert run_linux(prog, ["prog"]).exit_code == Errno.EAGAIN


# ------------------------------------------------------------------------------ state
def test_state_round_trips_through_json(tmp_path: Path) -> None:
    prog = write_program(tmp_path, "mov x0, #0\n" + EXIT)
    with Machine(32 << 20) as machine:
        process = load_program(machine, prog, ["prog", "x"], stdin=b"\x00\xffin")
        process.state.files.overlay["/tmp/f"] = OverlayNode("file", FileData.of(b"\x01\x02"))
        process.fs.truncate("/tmp/f", 1 << 40)  # sparse: a hole after the data
        process.state.rlimits[3] = [1, 2]
        data = json.loads(json.dumps(process.state_to_dict()))
        assert state_from_dict(data) == process.state
        assert machine.extra_state["linux"] is process


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["memory"].update(brk="x"), "state.memory.brk: expected an integer"),
    (lambda d: d["files"].update(stdin="not base64!"), "state.files.stdin: expected base64"),
    (lambda d: d["files"]["fds"].update(bad={"description": 0}), "key 'bad' is not an integer"),
    (lambda d: d.update(surprise=1), "unknown field 'surprise'"),
])
def test_negative_malformed_state(tmp_path: Path, change: Callable[[dict[str, Any]], None],
                                  message: str) -> None:
    prog = write_program(tmp_path, "mov x0, #0\n" + EXIT)
    with Machine(32 << 20) as machine:
        data = load_program(machine, prog, ["prog"]).state_to_dict()
    change(data)
    with pytest.raises(ConfigError, match=message):
        state_from_dict(data)


def _run_whole_and_split(program: str, argv: list[str], files: list[str], stdin: bytes,
                         split_at: int) -> tuple[bytes, bytes]:
    """Output of an uninterrupted run, and of a run stopped after ``split_at`` instructions
    whose RAM, CPU, counter and Linux state (through JSON) were copied to a new machine that
    then ran on."""
    with Machine(64 << 20, seed=4) as machine:
        whole = load_program(machine, program, argv, files=files, stdin=stdin)
        assert machine.run().exit_code == 0
        expected = bytes(whole.stdout_data)

    with Machine(64 << 20, seed=4) as first:
        process = load_program(first, program, argv, files=files, stdin=stdin)
        paused = first.run(max_insns=split_at)
        assert paused.reason is StopReason.INSN_LIMIT
        saved = json.loads(json.dumps(process.state_to_dict()))
        with Machine(64 << 20, seed=4) as second:
            resumed = attach_process(second, saved)
            assert [b.name for b in second.ram_blocks][-1] == IMAGE_BLOCK
            for source in first.ram_blocks:
                target = next(b for b in second.ram_blocks if b.name == source.name)
                target.mem[:] = source.mem
            second.set_cpu_state(first.cpu_state())
            second.counter.state = dataclasses.replace(first.counter.state)
            assert second.run().exit_code == 0
            assert resumed.state.exit_code == 0
            return expected, bytes(process.stdout_data) + bytes(resumed.stdout_data)


def test_process_continues_from_copied_state_on_a_new_machine(busybox: str,
                                                              tmp_path: Path) -> None:
    """The checkpoint oracle in small: a run split in two, its state carried over by hand,
    prints what the uninterrupted run prints."""
    path = tmp_path / "input.bin"
    path.write_bytes(bytes(range(256)) * 2048)
    whole, split = _run_whole_and_split(busybox, ["busybox", "sha256sum", str(path)],
                                        [str(path)], b"", 2_000_000)
    assert split == whole


@pytest.mark.slow
@pytest.mark.parametrize("split_at", [1, 1_000, 150_000, 3_000_000, 20_000_000])
def test_gzip_continues_from_copied_state_at_many_points(busybox: str, split_at: int) -> None:
    data = b"".join(b"line %d of the input\n" % (i * i % 977) for i in range(40_000))
    whole, split = _run_whole_and_split(busybox, ["busybox", "gzip", "-c"], [], data, split_at)
    assert split == whole


# ------------------------------------------------------------------------------ files and memory
def test_host_symlinks_cannot_lead_outside_the_exports(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "secret").write_text("secret")
    (shared / "real").write_text("real")
    (shared / "inside").symlink_to("real")
    (shared / "outside").symlink_to(tmp_path / "secret")
    (shared / "sneaky").symlink_to("../secret")
    fs = FileSystem(FileState(cwd=str(shared), exports=[str(shared)]), "/prog")
    assert fs.contents(fs.resolve("inside", str(shared))) == b"real"
    for name in ("outside", "sneaky"):
        target = fs.resolve(name, str(shared))
        assert target == str(tmp_path / "secret")
        assert fs.lookup(target) is None
    assert fs.lookup(str(tmp_path)) is not None  # an ancestor: a directory showing only...
    assert [name for name, _ in fs.listdir(str(tmp_path))] == ["shared"]  # ...the way down
    with pytest.raises(LinuxErrno) as info:
        fs.resolve(str(shared / "real" / "x"), "/")
    assert info.value.errno == Errno.ENOTDIR
    fs.close()


def test_overlay_hides_deleted_and_shows_created_entries(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    fs = FileSystem(FileState(cwd="/", exports=[str(tmp_path)]), "/prog")
    root = str(tmp_path)
    fs.remove(f"{root}/a", directory=False)
    fs.write(fs.create_file(f"{root}/c", 0o666, 0), 0, b"c!")
    fs.mkdir(f"{root}/d", 0o777, 0)
    fs.symlink("c", f"{root}/e", 0)
    fs.rename(f"{root}/b", f"{root}/f")
    listing = {name: node.kind for name, node in fs.listdir(root)}
    assert listing == {"c": "file", "d": "dir", "e": "symlink", "f": "file"}
    assert fs.contents(fs.resolve("e", root)) == b"c!"
    assert fs.contents(f"{root}/f") == b"b"
    assert fs.lookup(f"{root}/c").mode & 0o777 == 0o644  # type: ignore[union-attr]  # umask
    with pytest.raises(LinuxErrno) as info:
        fs.remove(f"{root}/d", directory=False)
    assert info.value.errno == Errno.EISDIR
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    fs.close()


def test_mmap_allocates_top_down_and_unmaps_in_pieces(tmp_path: Path) -> None:
    prog = write_program(tmp_path, "mov x0, #0\n" + EXIT)
    with Machine(32 << 20) as machine:
        process = load_program(machine, prog, ["prog"])
        memory, mem = process.state.memory, process.mem

        def anon(addr: int, length: int, flags: int = 0x22) -> int:
            return mm.mmap(memory, mem, process.fs.read, addr, length, 3, flags, None, 0)

        first = anon(0, 3 * 4096)
        assert first + 3 * 4096 == memory.mmap_high
        second = anon(0, 4096)
        assert second == first - 4096
        machine.write_memory(first, b"\xaa" * 3 * 4096)
        mm.munmap(memory, first + 4096, 4096)  # punch a hole in the middle
        kinds = [(m.start, m.length) for m in memory.mappings if m.kind == "anon"]
        assert kinds == [(second, 4096), (first, 4096), (first + 2 * 4096, 4096)]
        again = anon(0, 4096)
        assert again == first + 4096
        assert machine.read_memory(again, 4096) == bytes(4096)  # fresh mappings read as zero
        fixed = anon(first, 4096, 0x32)  # MAP_FIXED replaces what was there
        assert fixed == first and machine.read_memory(first, 1) == b"\0"
        grown = mm.mremap(memory, mem, second, 4096, 2 * 4096, 1, 0)  # must move: no room
        assert grown != second and mm.find_mapping(memory, second) is None
        with pytest.raises(LinuxErrno):
            mm.mremap(memory, mem, grown, 2 * 4096, 64 * 4096, 0, 0)  # no MAYMOVE, no room
        top = mm.brk(memory, mem, 0)
        assert mm.brk(memory, mem, top + 10_000) == top + 10_000
        assert mm.brk(memory, mem, memory.brk_limit + 1) == top + 10_000  # refused
