"""The built-in workload (pyvmm/guests/workload.S) run under raw unicorn, checked against its Python model.

The harness here is deliberately minimal and independent of pyvmm.machine: RAM at 0x40000000, the
PL011 data register collected through mmio_map, a stand-in for the guest-inform device's request
registers (answering after a chosen number of polls), and `hvc #0` (delivered by unicorn as interrupt 1,
EXCP_UDEF, with PC at the hvc) taken as PSCI SYSTEM_OFF when x0 = 0x84000008.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

import pytest
from unicorn import UC_ARCH_ARM64, UC_HOOK_INTR, UC_MODE_ARM, Uc, arm64_const

from pyvmm.errors import ConfigError
from pyvmm.guests.workload import (
    PAGE_SIZE,
    PATTERNS,
    RAM_BASE,
    WORKING_SET_OFFSET,
    WORKLOAD_HELP,
    GuestImage,
    WorkloadOptions,
    assemble_workload,
    build_workload,
    expected_checksum,
    expected_output,
    expected_words,
)

UART_BASE = 0x0900_0000
INFORM_BASE = 0x090F_0000
REQUEST, REQUEST_STATUS = 0x14, 0x20
PENDING, DONE, FAILED = 1, 2, 3
HVC_0 = 0xD4000002
PSCI_SYSTEM_OFF = 0x84000008
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1


@dataclass
class Run:
    """One guest run under raw unicorn; `resume` continues a run stopped by an instruction count."""

    image: GuestImage
    ram_size: int
    uart: bytearray = field(default_factory=bytearray)
    powered_off: bool = False
    bad_interrupt: str | None = None
    #: the stand-in guest-inform device answers a request after this many status polls with this
    inform_polls: int = 0
    inform_answer: int = DONE
    #: (pass lines printed so far, polls) at each request
    requests: list[tuple[int, int]] = field(default_factory=list)
    polls: int = 0
    _left: int = 0

    def __post_init__(self) -> None:
        self.uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
        self.uc.mem_map(RAM_BASE, self.ram_size)
        self.uc.mem_write(self.image.load_gpa, self.image.code)
        self.uc.mmio_map(UART_BASE, 0x1000, self._uart_read, None, self._uart_write, None)
        self.uc.mmio_map(INFORM_BASE, 0x1000, self._inform_read, None, self._inform_write, None)
        self.uc.hook_add(UC_HOOK_INTR, self._interrupt)
        for name, value in self.image.registers.items():
            self.uc.reg_write(getattr(arm64_const, f"UC_ARM64_REG_{name.upper()}"), value)
        self.pc = self.image.entry

    def _uart_read(self, uc: Uc, offset: int, size: int, user: object) -> int:
        return 0  # flag register: TXFF clear, the FIFO is never full

    def _uart_write(self, uc: Uc, offset: int, size: int, value: int, user: object) -> None:
        if offset == 0:
            self.uart.append(value & 0xFF)

    def _inform_read(self, uc: Uc, offset: int, size: int, user: object) -> int:
        assert offset == REQUEST_STATUS, hex(offset)
        self.polls += 1
        if self._left:
            self._left -= 1
            return PENDING
        return self.inform_answer

    def _inform_write(self, uc: Uc, offset: int, size: int, value: int, user: object) -> None:
        assert (offset, value) == (REQUEST, 1), (hex(offset), value)  # 1: a checkpoint
        self.requests.append((self.uart.count(b"\n"), self.polls))
        self._left = self.inform_polls

    def _interrupt(self, uc: Uc, intno: int, user: object) -> None:
        pc = uc.reg_read(arm64_const.UC_ARM64_REG_PC)
        word = struct.unpack("<I", uc.mem_read(pc, 4))[0]
        x0 = uc.reg_read(arm64_const.UC_ARM64_REG_X0)
        if intno == 1 and word == HVC_0 and x0 == PSCI_SYSTEM_OFF:
            self.powered_off = True
        else:
            self.bad_interrupt = f"intno {intno} at pc 0x{pc:x} word 0x{word:08x} x0 0x{x0:x}"
        uc.emu_stop()

    def resume(self, count: int = 0) -> None:
        self.uc.emu_start(self.pc, 0, count=count)
        self.pc = self.uc.reg_read(arm64_const.UC_ARM64_REG_PC)
        assert self.bad_interrupt is None, self.bad_interrupt

    def working_set(self) -> bytes:
        base = self.image.registers["x0"]
        return bytes(self.uc.mem_read(base, self.image.registers["x1"] * PAGE_SIZE))


def start(options: WorkloadOptions, **inform: int) -> Run:
    ram_size = WORKING_SET_OFFSET + options.working_set
    return Run(build_workload(options, RAM_BASE, ram_size), ram_size, **inform)


def run_to_end(options: WorkloadOptions, **inform: int) -> Run:
    run = start(options, **inform)
    run.resume()
    assert run.powered_off, run.uart.decode()
    return run


def hash_working_set(memory: bytes) -> int:
    """The checksum as the guest defines it, straight from RAM (independent of the model's shortcut)."""
    checksum = 0
    for (word,) in struct.iter_unpack("<Q", memory):
        checksum = (checksum * FNV_PRIME + word) & MASK64
    return checksum


def model_memory(options: WorkloadOptions) -> bytes:
    memory = bytearray(options.working_set)
    for index, value in expected_words(options).items():
        struct.pack_into("<Q", memory, index * 8, value)
    return bytes(memory)


def small(pattern: str, **changes: int) -> WorkloadOptions:
    settings = {"working_set": 48 * PAGE_SIZE, "passes": 3, "seed": 7, "report_every": 1} | changes
    return WorkloadOptions(pattern=pattern, **settings)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_pattern_prints_its_lines_powers_off_and_matches_the_model(pattern: str) -> None:
    options = small(pattern, touch_bytes=24)
    run = run_to_end(options)
    lines = run.uart.decode().splitlines()
    assert lines[0] == f"pyvmm-workload: start pattern={pattern} pages=48 passes=3 touch=24"
    assert lines[1:4] == [f"pyvmm-workload: pass {k}/3 pattern={pattern} pages=48" for k in (1, 2, 3)]
    assert lines[4].startswith("pyvmm-workload: done passes=3 checksum=0x")
    printed = int(lines[4].rsplit("0x", 1)[1], 16)
    assert printed == expected_checksum(options)
    assert bytes(run.uart) == expected_output(options)
    assert run.working_set() == model_memory(options)
    if pattern != "loop":
        assert printed == hash_working_set(run.working_set())


@pytest.mark.parametrize(("polls", "answer"), [(0, DONE), (0, FAILED), (3, DONE), (40, FAILED)])
def test_checkpoint_requests_leave_output_and_memory_to_the_options(polls: int, answer: int
                                                                    ) -> None:
    """However long the host takes and whatever it answers, the guest asks after every
    `checkpoint_every` passes, waits, and goes on to the output and RAM its model predicts."""
    options = small("random", passes=7, report_every=2, checkpoint_every=3)
    run = run_to_end(options, inform_polls=polls, inform_answer=answer)
    assert bytes(run.uart) == expected_output(options)
    lines = run.uart.decode().splitlines()
    assert lines[3:6] == ["pyvmm-workload: pass 4/7 pattern=random pages=48",
                          "pyvmm-workload: pass 6/7 pattern=random pages=48",
                          "pyvmm-workload: checkpoint after pass 6"]
    assert lines[2] == "pyvmm-workload: checkpoint after pass 3"
    # asked right after each checkpoint line, and polled polls+1 times each
    assert run.requests == [(3, 0), (6, polls + 1)]
    assert run.polls == 2 * (polls + 1)
    assert run.working_set() == model_memory(options)
    assert expected_checksum(options) == expected_checksum(replace(options, checkpoint_every=0))


def test_no_checkpoint_requests_by_default_and_forever_keeps_asking() -> None:
    run = run_to_end(small("sequential"))
    assert run.requests == [] and run.polls == 0
    assert b"checkpoint" not in run.uart
    run = start(small("sequential", passes=0, report_every=0, checkpoint_every=2))
    run.resume(count=60_000)
    assert [line for line in run.uart.decode().splitlines()[1:]] == [
        f"pyvmm-workload: checkpoint after pass {k}" for k in range(2, 2 * len(run.requests) + 1, 2)]
    assert len(run.requests) >= 2


def test_loop_touches_no_memory() -> None:
    run = run_to_end(small("loop", passes=5))
    assert run.working_set() == bytes(48 * PAGE_SIZE)


@pytest.mark.parametrize("touch", [8, 4096])
def test_sequential_writes_exactly_touch_bytes_of_every_page(touch: int) -> None:
    options = small("sequential", touch_bytes=touch, passes=2, working_set=4 * PAGE_SIZE)
    memory = run_to_end(options).working_set()
    for page in range(4):
        chunk = memory[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
        words = [word for (word,) in struct.iter_unpack("<Q", chunk[:touch])]
        # pass 2 of 2 wrote its tag (2 << 48) | (page << 12), plus the byte offset, in each word
        assert words == [2 << 48 | page << 12 | offset for offset in range(0, touch, 8)]
        assert chunk[touch:] == bytes(PAGE_SIZE - touch)


def test_same_seed_same_run_and_another_seed_another_random_run() -> None:
    options = small("random", passes=2, seed=12345)
    first, second = run_to_end(options), run_to_end(options)
    assert first.working_set() == second.working_set()
    assert first.uart == second.uart
    other = run_to_end(replace(options, seed=54321))
    assert other.working_set() != first.working_set()
    assert other.uart != first.uart


def test_random_pattern_looks_uniform() -> None:
    options = small("random", working_set=512 * PAGE_SIZE, passes=1)
    touched = {index // (PAGE_SIZE // 8) for index in expected_words(options)}
    # 512 uniform draws over 512 pages hit about 1 - 1/e of them, spread over both halves.
    assert 0.55 < len(touched) / 512 < 0.72
    assert 0.4 < sum(page < 256 for page in touched) / len(touched) < 0.6


def test_hotcold_sends_most_touches_to_the_hot_pages() -> None:
    options = small("hotcold", working_set=100 * PAGE_SIZE, passes=2, hot_percent=10, hot_chance=90)
    memory = run_to_end(options).working_set()
    touched = [any(memory[page * PAGE_SIZE : page * PAGE_SIZE + 8]) for page in range(100)]
    assert all(touched[:10])
    assert 5 < sum(touched[10:]) < 40  # about 20 cold touches over 90 pages
    only_hot = small("hotcold", working_set=100 * PAGE_SIZE, hot_percent=20, hot_chance=100)
    assert {i // 512 for i in expected_words(only_hot)} <= set(range(20))
    assert run_to_end(only_hot).working_set() == model_memory(only_hot)


def test_increment_leaves_one_boundary_at_every_instant() -> None:
    pages = 16
    options = small("increment", working_set=pages * PAGE_SIZE, passes=3)
    run = start(options)
    seen_inside = 0
    while not run.powered_off:
        run.resume(count=13)  # an odd stride lands inside sweeps, prints and the checksum alike
        memory = run.working_set()
        firsts = [memory[page * PAGE_SIZE] for page in range(pages)]
        boundary = next((p for p in range(1, pages) if firsts[p] != firsts[0]), pages)
        assert firsts[boundary:] == [(firsts[0] - 1) % 256] * (pages - boundary), firsts
        assert all(firsts[p] == firsts[0] for p in range(boundary))
        seen_inside += 0 < boundary < pages
        rest = bytearray(memory)
        rest[::PAGE_SIZE] = bytes(pages)
        assert not any(rest)
    assert seen_inside > 20
    assert bytes(run.uart) == expected_output(options)


def test_forever_keeps_reporting_and_never_says_done() -> None:
    run = start(small("sequential", passes=0, report_every=2))
    run.resume(count=60_000)
    text = run.uart.decode()
    assert "pass 2/forever" in text and "pass 4/forever" in text
    assert "pass 1/" not in text and "done" not in text
    assert not run.powered_off
    with pytest.raises(ConfigError, match="passes"):
        expected_checksum(small("sequential", passes=0))


def test_report_zero_prints_only_start_and_done() -> None:
    options = small("random", report_every=0)
    lines = run_to_end(options).uart.decode().splitlines()
    assert [line.split()[1] for line in lines] == ["start", "done"]


def test_guest_refuses_bad_registers() -> None:
    image = build_workload(small("sequential"), RAM_BASE, WORKING_SET_OFFSET + 48 * PAGE_SIZE)
    for register, value in [("x5", 12), ("x5", 8192), ("x2", 9), ("x1", 0)]:
        bad = replace(image, registers=image.registers | {register: value})
        run = Run(bad, WORKING_SET_OFFSET + 48 * PAGE_SIZE)
        run.resume()
        assert run.powered_off
        assert run.uart == b"pyvmm-workload: bad parameters\n"


def test_image_layout_and_registers() -> None:
    options = WorkloadOptions(pattern="hotcold", seed=2**64 - 1, hot_percent=5, hot_chance=80)
    image = build_workload(options)
    assert image.load_gpa == image.entry == RAM_BASE
    assert len(image.code) < WORKING_SET_OFFSET // 4
    assert assemble_workload() is assemble_workload()  # assembled once per process
    assert image.registers == {
        "x0": RAM_BASE + WORKING_SET_OFFSET, "x1": 64 * 256, "x2": PATTERNS.index("hotcold"),
        "x3": 128, "x4": 2**64 - 1, "x5": 64, "x6": 5, "x7": 16, "x8": 80, "x9": 0,
    }


def test_parse_reads_keys_sizes_and_overrides_a_base() -> None:
    base = WorkloadOptions(seed=99)
    options = WorkloadOptions.parse(
        "pattern=random, working_set=16M,passes=4,touch=4K,hot=5,report=2,checkpoint_every=2", base)
    assert options == WorkloadOptions(
        pattern="random", working_set=16 << 20, passes=4, touch_bytes=4096, hot_percent=5,
        report_every=2, seed=99, checkpoint_every=2,
    )
    assert WorkloadOptions.parse("working_set=1GiB,touch_bytes=0x100,chance=50").working_set == 1 << 30
    assert WorkloadOptions.parse("") == WorkloadOptions()
    assert WorkloadOptions.parse(options.to_text()) == options
    for name in PATTERNS:
        assert name in WORKLOAD_HELP


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("colour=blue", "colour"),
        ("pattern=zigzag", "pattern"),
        ("working_set=1000", "working_set"),
        ("working_set=12Q", "working_set"),
        ("touch=12", "touch"),
        ("touch=8K", "touch"),
        ("hot=0", "hot"),
        ("chance=101", "chance"),
        ("passes=-1", "passes"),
        ("seed=lots", "seed"),
        ("seed=0x10000000000000000", "seed"),
        ("report", "report"),
        ("checkpoint_every=-2", "checkpoint_every"),
    ],
)
def test_negative_bad_option_names_its_key(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=f"'{named}'") as caught:
        WorkloadOptions.parse(text)
    if named in {"colour", "pattern"}:
        assert "sequential" in str(caught.value) or "working_set" in str(caught.value)


def test_negative_working_set_larger_than_ram() -> None:
    options = WorkloadOptions(working_set=256 << 20)
    with pytest.raises(ConfigError, match="working_set.*255 MiB"):
        options.validate(256 << 20)
    with pytest.raises(ConfigError):
        build_workload(options, ram_size=256 << 20)
    options.validate((256 << 20) + WORKING_SET_OFFSET)
