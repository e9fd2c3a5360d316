"""Properties of pyvmm.migration.savevm (with the RAM handler and the machine's entries): QEMU v3
stream bytes spelled out field by field, round trips through SaveState.load, and hostile streams
(altered, truncated at every byte) that only ever raise FormatError.

A stream in memory is parsed by Python alone; from a file, the RAM handler's page records go
through the C walker (``pyvmm_ram_walk``), which leaves every record it finds wrong to Python.
Hostile streams are loaded both ways and must give the same error or the same machine."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pyvmm.cpu import SYSTEM_REGISTERS
from pyvmm.devices.pl011 import Pl011State
from pyvmm.errors import FormatError
from pyvmm.machine import Machine
from pyvmm.migration.machine_state import (
    MACHINE_TYPE,
    MachineStateEntries,
    machine_save_state,
)
from pyvmm.migration.ram_handler import RAM_SECTION_VERSION, RamHandler
from pyvmm.migration.savevm import LoadResult, SaveState, SaveStateEntry
from pyvmm.migration.stream import QEMUFile
from pyvmm.ram import PAGE_SIZE, RamBlock

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def be32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def be64(value: int) -> bytes:
    return value.to_bytes(8, "big")


# -- the header ------------------------------------------------------------------------------

HEADER = b"".join([
    b"\x51\x45\x56\x4d",  # be32 QEMU_VM_FILE_MAGIC "QEVM"
    b"\x00\x00\x00\x03",  # be32 QEMU_VM_FILE_VERSION 3
    b"\x07",  # QEMU_VM_CONFIGURATION
    b"\x00\x00\x00\x0a",  # be32 length of the machine type (no u8 length: QEMU's own layout)
    b"pyvmm-virt",  # the machine type; no page-bits subsection follows
])


def test_header_and_configuration_bytes() -> None:
    f = QEMUFile.memory()
    SaveState(MACHINE_TYPE).save_header(f)
    assert f.getvalue() == HEADER


# -- the machine's device sections -----------------------------------------------------------

RAM_PAGES = 64
PL011_REGISTERS = ("rsr", "ilpr", "ibrd", "fbrd", "lcr_h", "cr", "ifls", "imsc", "ris", "dmacr")


@pytest.fixture
def machine() -> Iterator[Machine]:
    with Machine(RAM_PAGES * PAGE_SIZE) as m:
        yield m


def set_fields(obj: object, **values: Any) -> None:
    """Change an object the registry holds in place (the entries keep a reference to it)."""
    for name, value in values.items():
        setattr(obj, name, value)


def set_known_state(machine: Machine, entries: MachineStateEntries) -> None:
    """The values the expected bytes below spell out."""
    set_fields(entries.cpu, x=[0x1000 + i for i in range(31)], sp=0x4010_0000, pc=0x4000_0320,
               v=[(0xAAAA_0000_0000_0000 + i) << 64 | (0x5555_0000 + i) for i in range(32)],
               insns=2_000_000, has_insns=True)
    for i, (name, _) in enumerate(SYSTEM_REGISTERS):
        setattr(entries.cpu, name, 0x100 + i)
    set_fields(machine.uart.state, rsr=1, ilpr=2, ibrd=0x27, fbrd=4, lcr_h=0x70, cr=0x301,
               ifls=0x12, imsc=0x10, ris=0x30, dmacr=0, tx_count=0x0102_0304_0506_0708,
               rx_fifo=b"ok")
    set_fields(machine.counter.state, ticks=0x3E8, cntv_ctl=1, cntv_cval=0x7D0, cntp_ctl=0,
               cntp_cval=0xFFFF_FFFF_FFFF_FFFF)
    set_fields(machine.guest_inform.state, checkpoint_count=3, checkpoint_status=1,
               restore_count=2, request=0xCAFE, request_count=5)
    set_fields(entries.machine_section, ended=True, exit_code=-2, seed=42)


CPU_SECTION = b"".join([
    b"\x04",  # QEMU_VM_SECTION_FULL
    b"\x00\x00\x00\x01",  # be32 section_id 1 (RAM is 0)
    b"\x03cpu",  # u8 length, idstr
    b"\x00\x00\x00\x00",  # be32 instance_id 0
    b"\x00\x00\x00\x01",  # be32 version_id 1
    b"\x00\x00\x00\x00\x00\x00\x10\x00",  # x[0]: be64, no length or name on the wire
    b"\x00\x00\x00\x00\x00\x00\x10\x01",  # x[1]
    b"".join(be64(0x1000 + i) for i in range(2, 31)),  # x[2] .. x[30]
    b"\x00\x00\x00\x00\x40\x10\x00\x00",  # sp
    b"\x00\x00\x00\x00\x40\x00\x03\x20",  # pc
    b"\x00\x00\x00\x00\x55\x55\x00\x00",  # v[0] low 64 bits first (QEMU's zregs[0].d[0])
    b"\xaa\xaa\x00\x00\x00\x00\x00\x00",  # v[0] high 64 bits
    b"".join(be64(0x5555_0000 + i) + be64(0xAAAA_0000_0000_0000 + i)
             for i in range(1, 32)),  # v[1] .. v[31], low word then high word each
    b"".join(be64(0x100 + i) for i in range(len(SYSTEM_REGISTERS))),  # sp_el0 .. cpacr_el1
    b"\x05",  # QEMU_VM_SUBSECTION (has_insns: the instruction count is known)
    b"\x0acpu/icount",  # u8 length, subsection name
    b"\x00\x00\x00\x01",  # be32 subsection version 1
    b"\x00\x00\x00\x00\x00\x1e\x84\x80",  # insns 2000000
    b"\x7e",  # QEMU_VM_SECTION_FOOTER
    b"\x00\x00\x00\x01",  # be32 section_id 1 again
])

PL011_SECTION = b"".join([
    b"\x04",  # QEMU_VM_SECTION_FULL
    b"\x00\x00\x00\x02",  # be32 section_id 2
    b"\x05pl011",  # u8 length, idstr
    b"\x00\x00\x00\x00",  # be32 instance_id 0
    b"\x00\x00\x00\x01",  # be32 version_id 1
    b"\x00\x00\x00\x01",  # rsr
    b"\x00\x00\x00\x02",  # ilpr
    b"\x00\x00\x00\x27",  # ibrd
    b"\x00\x00\x00\x04",  # fbrd
    b"\x00\x00\x00\x70",  # lcr_h
    b"\x00\x00\x03\x01",  # cr
    b"\x00\x00\x00\x12",  # ifls
    b"\x00\x00\x00\x10",  # imsc
    b"\x00\x00\x00\x30",  # ris
    b"\x00\x00\x00\x00",  # dmacr
    b"\x01\x02\x03\x04\x05\x06\x07\x08",  # tx_count (be64)
    b"\x00\x00\x00\x02",  # rx_len (set by pre_save from rx_fifo)
    b"ok",  # rx_fifo, rx_len bytes
    b"\x7e",  # QEMU_VM_SECTION_FOOTER
    b"\x00\x00\x00\x02",  # be32 section_id 2
])

COUNTER_SECTION = b"".join([
    b"\x04",  # QEMU_VM_SECTION_FULL
    b"\x00\x00\x00\x03",  # be32 section_id 3
    b"\x0cvirt-counter",  # u8 length, idstr
    b"\x00\x00\x00\x00",  # be32 instance_id 0
    b"\x00\x00\x00\x01",  # be32 version_id 1
    b"\x00\x00\x00\x00\x00\x00\x03\xe8",  # ticks
    b"\x00\x00\x00\x00\x00\x00\x00\x01",  # cntv_ctl
    b"\x00\x00\x00\x00\x00\x00\x07\xd0",  # cntv_cval
    b"\x00\x00\x00\x00\x00\x00\x00\x00",  # cntp_ctl
    b"\xff\xff\xff\xff\xff\xff\xff\xff",  # cntp_cval
    b"\x7e",  # QEMU_VM_SECTION_FOOTER
    b"\x00\x00\x00\x03",  # be32 section_id 3
])

GUEST_INFORM_SECTION = b"".join([
    b"\x04",  # QEMU_VM_SECTION_FULL
    b"\x00\x00\x00\x04",  # be32 section_id 4
    b"\x0cguest-inform",  # u8 length, idstr
    b"\x00\x00\x00\x00",  # be32 instance_id 0
    b"\x00\x00\x00\x01",  # be32 version_id 1
    b"\x00\x00\x00\x03",  # checkpoint_count
    b"\x00\x00\x00\x01",  # checkpoint_status (IN_PROGRESS)
    b"\x00\x00\x00\x02",  # restore_count
    b"\x00\x00\xca\xfe",  # request
    b"\x00\x00\x00\x05",  # request_count
    b"\x7e",  # QEMU_VM_SECTION_FOOTER
    b"\x00\x00\x00\x04",  # be32 section_id 4
])

MACHINE_SECTION = b"".join([
    b"\x04",  # QEMU_VM_SECTION_FULL
    b"\x00\x00\x00\x05",  # be32 section_id 5
    b"\x0dpyvmm-machine",  # u8 length, idstr
    b"\x00\x00\x00\x00",  # be32 instance_id 0
    b"\x00\x00\x00\x01",  # be32 version_id 1
    b"\x01",  # ended (bool: one byte)
    b"\xff\xff\xff\xfe",  # exit_code -2 (int32, two's complement)
    b"\x00\x00\x00\x00\x00\x00\x00\x2a",  # seed
    b"\x7e",  # QEMU_VM_SECTION_FOOTER
    b"\x00\x00\x00\x05",  # be32 section_id 5
])

DEVICE_SECTIONS = [("cpu", CPU_SECTION), ("pl011", PL011_SECTION),
                   ("virt-counter", COUNTER_SECTION), ("guest-inform", GUEST_INFORM_SECTION),
                   ("pyvmm-machine", MACHINE_SECTION)]


def test_device_sections_bytes(machine: Machine) -> None:
    entries = machine_save_state(machine)
    set_known_state(machine, entries)
    f = QEMUFile.memory()
    devices = entries.save_state.save_devices(f)
    data = f.getvalue()
    at = 0
    for name, expected in DEVICE_SECTIONS:
        assert data[at:at + len(expected)] == expected, name
        at += len(expected)
    assert at == len(data)
    assert [(d["name"], d["instance_id"], d["version"]) for d in devices] == \
        [(name, 0, 1) for name, _ in DEVICE_SECTIONS]


def test_cpu_without_an_instruction_count_sends_no_subsection(machine: Machine) -> None:
    entries = machine_save_state(machine)
    set_known_state(machine, entries)
    entries.cpu.has_insns = False
    f = QEMUFile.memory()
    devices = entries.save_state.save_devices(f)
    subsection = b"\x05\x0acpu/icount\x00\x00\x00\x01" + be64(2_000_000)
    assert f.getvalue().startswith(CPU_SECTION.replace(subsection, b""))
    assert "subsections" not in devices[0]


def test_device_descriptions_describe_the_bytes(machine: Machine) -> None:
    """The VMDESCRIPTION entries name every field with its wire size, as QEMU's analyzer needs."""
    entries = machine_save_state(machine)
    set_known_state(machine, entries)
    devices = {d["name"]: d for d in entries.save_state.save_devices(QEMUFile.memory())}
    u32 = {"type": "uint32", "size": 4}
    u64 = {"type": "uint64", "size": 8}
    assert devices["pl011"] == {
        "name": "pl011", "instance_id": 0, "vmsd_name": "pl011", "version": 1,
        "fields": [*({"name": n, **u32} for n in PL011_REGISTERS),
                   {"name": "tx_count", **u64}, {"name": "rx_len", **u32},
                   {"name": "rx_fifo", "type": "buffer", "size": 2}]}
    assert devices["pyvmm-machine"]["fields"] == [
        {"name": "ended", "type": "bool", "size": 1},
        {"name": "exit_code", "type": "int32", "size": 4},
        {"name": "seed", **u64}]
    cpu = devices["cpu"]
    assert cpu["fields"][:4] == [{"name": "x", "array_len": 31, **u64}, {"name": "sp", **u64},
                                 {"name": "pc", **u64}, {"name": "v", "array_len": 64, **u64}]
    assert cpu["subsections"] == [{"vmsd_name": "cpu/icount", "version": 1,
                                   "fields": [{"name": "insns", **u64}]}]
    # the sizes add up to the section bodies spelled above (header 14 + len(idstr), footer 5)
    for name, expected in DEVICE_SECTIONS[1:]:
        body = sum(f.get("array_len", 1) * f["size"] for f in devices[name]["fields"])
        assert body == len(expected) - (14 + len(name)) - 5, name


# -- the RAM section -------------------------------------------------------------------------

RAM_BLOCK = "pc.ram"
RAM_START = b"".join([
    b"\x01",  # QEMU_VM_SECTION_START
    b"\x00\x00\x00\x00",  # be32 section_id 0
    b"\x03ram",  # u8 length, idstr
    b"\x00\x00\x00\x00",  # be32 instance_id 0
    b"\x00\x00\x00\x04",  # be32 version_id 4
    b"\x00\x00\x00\x00\x00\x00\x40\x04",  # be64 total RAM 0x4000 | RAM_SAVE_FLAG_MEM_SIZE
    b"\x06pc.ram",  # u8 length, block idstr
    b"\x00\x00\x00\x00\x00\x00\x40\x00",  # be64 block length 0x4000
    b"\x00\x00\x00\x00\x00\x00\x00\x10",  # be64 RAM_SAVE_FLAG_EOS
    b"\x7e",  # QEMU_VM_SECTION_FOOTER
    b"\x00\x00\x00\x00",  # be32 section_id 0
])
RAM_PART = b"".join([
    b"\x02",  # QEMU_VM_SECTION_PART
    b"\x00\x00\x00\x00",  # be32 section_id 0
    b"\x00\x00\x00\x00\x00\x00\x10\x08",  # be64 offset 0x1000 | RAM_SAVE_FLAG_PAGE
    b"\x06pc.ram",  # u8 length, block idstr (first record of the block: no CONTINUE)
    b"\xa5" * PAGE_SIZE,  # the page
    b"\x00\x00\x00\x00\x00\x00\x20\x22",  # be64 0x2000 | RAM_SAVE_FLAG_ZERO | CONTINUE
    b"\x00",  # fill byte
    b"\x00\x00\x00\x00\x00\x00\x00\x10",  # be64 RAM_SAVE_FLAG_EOS
    b"\x7e",  # QEMU_VM_SECTION_FOOTER
    b"\x00\x00\x00\x00",  # be32 section_id 0
])
RAM_END = b"".join([
    b"\x03",  # QEMU_VM_SECTION_END
    b"\x00\x00\x00\x00",  # be32 section_id 0
    b"\x00\x00\x00\x00\x00\x00\x00\x10",  # be64 RAM_SAVE_FLAG_EOS
    b"\x7e",  # QEMU_VM_SECTION_FOOTER
    b"\x00\x00\x00\x00",  # be32 section_id 0
])


@pytest.fixture
def small_ram() -> Iterator[RamBlock]:
    """Four pages: page 1 data, page 2 written but zero, pages 0 and 3 never touched."""
    with RamBlock(RAM_BLOCK, 4 * PAGE_SIZE, 0) as block:
        block.write(PAGE_SIZE, b"\xa5" * PAGE_SIZE)
        block.write(2 * PAGE_SIZE, bytes(PAGE_SIZE))
        yield block


def save_ram(f: QEMUFile, block: RamBlock, pages: list[int]) -> RamHandler:
    save_state = SaveState(MACHINE_TYPE)
    ram = RamHandler([block])
    save_state.register(SaveStateEntry("ram", 0, RAM_SECTION_VERSION, handler=ram))
    selection = block.new_bitmap()
    for page in pages:
        selection.set(page)
    ram.select({block.name: selection})
    save_state.save_setup(f)
    assert save_state.save_iterate(f)
    save_state.save_complete(f)
    f.flush()
    return ram


def test_ram_section_bytes_through_a_memory_stream(small_ram: RamBlock) -> None:
    f = QEMUFile.memory()
    ram = save_ram(f, small_ram, [1, 2])
    assert f.getvalue() == RAM_START + RAM_PART + RAM_END
    assert (ram.counters.data_pages, ram.counters.zero_pages) == (1, 1)


def test_ram_section_bytes_through_the_c_writer(small_ram: RamBlock, tmp_path: Path) -> None:
    path = tmp_path / "ram.qemu"
    with open(path, "wb") as handle:
        f = QEMUFile.for_writing(handle.fileno())
        ram = save_ram(f, small_ram, [1, 2])
        f.close()
    assert path.read_bytes() == RAM_START + RAM_PART + RAM_END
    assert (ram.counters.data_pages, ram.counters.zero_pages) == (1, 1)
    # the layout it reports for the page index: the data run starts at the page's bytes
    data_at = len(RAM_START) + 5 + 8 + 7
    assert [(r.block, r.first_page, r.npages, r.zero) for r in ram.runs] == \
        [(0, 1, 1, False), (0, 2, 1, True)]
    assert ram.runs[0].data_offset == data_at


def test_ram_section_with_nothing_selected(small_ram: RamBlock) -> None:
    f = QEMUFile.memory()
    save_ram(f, small_ram, [])
    part = b"\x02" + be32(0) + be64(0x10) + b"\x7e" + be32(0)  # PART: only EOS
    assert f.getvalue() == RAM_START + part + RAM_END


# -- whole streams: round trips --------------------------------------------------------------


def write_stream(f: QEMUFile, machine: Machine, entries: MachineStateEntries
                 ) -> list[dict[str, Any]]:
    """What a full checkpoint writes (checkpoint.Checkpointer._write_full without the file)."""
    save_state = entries.save_state
    entries.ram.select({b.name: b.populated_pages() for b in machine.ram_blocks})
    save_state.save_header(f)
    save_state.save_setup(f)
    save_state.save_iterate(f)
    save_state.save_complete(f)
    devices = save_state.save_devices(f)
    save_state.save_trailer(f, devices, PAGE_SIZE)
    f.flush()
    return devices


def device_state(machine: Machine, entries: MachineStateEntries) -> dict[str, Any]:
    """Everything the device sections carry, as comparable plain data."""
    cpu = entries.cpu
    return {
        "cpu": (list(cpu.x), cpu.sp, cpu.pc, list(cpu.v), cpu.insns, cpu.has_insns,
                [getattr(cpu, name) for name, _ in SYSTEM_REGISTERS]),
        "pl011": dataclasses.astuple(machine.uart.state),
        "counter": dataclasses.astuple(machine.counter.state),
        "inform": dataclasses.astuple(machine.guest_inform.state),
        "machine": dataclasses.astuple(entries.machine_section),
    }


def load_into_new_machine(data: bytes | None = None, *, path: Path | None = None,
                          runs: Any = None, limit: int | None = None
                          ) -> tuple[LoadResult, dict[str, Any], bytes]:
    with Machine(RAM_PAGES * PAGE_SIZE) as target:
        entries = machine_save_state(target)
        for name, _ in SYSTEM_REGISTERS:  # the loader fills in what capture() would have set
            setattr(entries.cpu, name, 0)
        if runs is not None:
            entries.ram.set_load_index(runs)
        if path is not None:
            with open(path, "rb") as handle:
                result = entries.save_state.load(QEMUFile.for_reading(handle.fileno(),
                                                                      limit=limit))
        else:
            assert data is not None
            result = entries.save_state.load(QEMUFile.memory(data))
        return result, device_state(target, entries), bytes(target.ram_blocks[0].mem)


SECTIONS_LOADED = ["START:ram", "PART:ram", "END:ram", "FULL:cpu", "FULL:pl011",
                   "FULL:virt-counter", "FULL:guest-inform", "FULL:pyvmm-machine"]


def test_round_trip_through_memory_and_file(machine: Machine, tmp_path: Path) -> None:
    entries = machine_save_state(machine)
    set_known_state(machine, entries)
    block = machine.ram_blocks[0]
    block.write(0, b"first page")
    block.write(7 * PAGE_SIZE, bytes(range(256)) * 16)
    block.write(9 * PAGE_SIZE, bytes(PAGE_SIZE))  # populated, zero: sent as a ZERO record
    f = QEMUFile.memory()
    devices = write_stream(f, machine, entries)
    data = f.getvalue()
    assert data.startswith(HEADER + b"\x01")
    path = tmp_path / "stream.qemu"
    with open(path, "wb") as handle:
        g = QEMUFile.for_writing(handle.fileno())
        write_stream(g, machine, entries)
        g.close()
    assert path.read_bytes() == data  # the C page writer sends the memory path's bytes
    want_state, want_ram = device_state(machine, entries), bytes(block.mem)
    for result, state, ram in (load_into_new_machine(data), load_into_new_machine(path=path),
                               load_into_new_machine(path=path, runs=entries.ram.runs)):
        assert result.sections == SECTIONS_LOADED
        assert result.description == {"page_size": PAGE_SIZE, "devices": devices}
        assert state == want_state
        assert ram == want_ram


_INDEXED_STREAM: list[tuple[bytes, Any]] = []


def indexed_stream() -> tuple[bytes, Any]:
    """A stream written through the C page writer with runs of several pages, a zero page
    between them, and the page index runs the writer reported (made once)."""
    if not _INDEXED_STREAM:
        with Machine(RAM_PAGES * PAGE_SIZE) as machine, tempfile.TemporaryDirectory() as tmp:
            entries = machine_save_state(machine)
            set_known_state(machine, entries)
            block = machine.ram_blocks[0]
            for page in [*range(10, 18), *range(20, 23)]:
                block.write(page * PAGE_SIZE, bytes([page]) * PAGE_SIZE)
            block.write(18 * PAGE_SIZE, bytes(PAGE_SIZE))
            path = Path(tmp) / "indexed.qemu"
            with open(path, "wb") as handle:
                f = QEMUFile.for_writing(handle.fileno())
                write_stream(f, machine, entries)
                f.close()
            assert any(r.npages > 1 for r in entries.ram.runs)
            _INDEXED_STREAM.append((path.read_bytes(), list(entries.ram.runs)))
    return _INDEXED_STREAM[0]


def load_ram_both_ways(data: bytes, runs: Any, skip: bool) -> Any:
    """Load with the page index from memory (Python) and from a file (C walker, runs read by
    preadv); the outcomes (error, or RAM and page count) must be the same."""
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stream.bin"
        path.write_bytes(data)
        for from_file in (False, True):
            with Machine(RAM_PAGES * PAGE_SIZE) as target:
                entries = machine_save_state(target)
                for name, _ in SYSTEM_REGISTERS:
                    setattr(entries.cpu, name, 0)
                entries.ram.set_load_index(runs)
                entries.ram.skip_pages = skip
                try:
                    if from_file:
                        with open(path, "rb") as handle:
                            entries.save_state.load(QEMUFile.for_reading(handle.fileno()))
                    else:
                        entries.save_state.load(QEMUFile.memory(data))
                    outcomes.append((entries.ram.pages_loaded,
                                     bytes(target.ram_blocks[0].mem[:64 * PAGE_SIZE])))
                except FormatError as err:
                    outcomes.append((type(err), str(err)))
    assert outcomes[0] == outcomes[1], "memory and file loads differ"
    return outcomes[0]


@settings(FAST, max_examples=120)
@given(st.data(), st.booleans())
def test_altered_ram_records_with_a_page_index_load_the_same_from_memory_and_file(
        data: st.DataObject, skip: bool) -> None:
    stream, runs = indexed_stream()
    first = min(r.data_offset for r in runs if not r.zero) - 64
    last = max(r.data_offset + r.npages * (PAGE_SIZE + 8) for r in runs if not r.zero) + 64
    altered = bytearray(stream)
    for _ in range(data.draw(st.integers(0, 3))):
        # record headers and names, mostly: page data changes nothing but the RAM
        at = data.draw(st.one_of(st.integers(first, last), st.sampled_from(
            [r.data_offset - 8 + k for r in runs if not r.zero for k in range(8)])))
        altered[at] = data.draw(st.integers(0, 255))
    outcome = load_ram_both_ways(bytes(altered), runs, skip)
    if altered == bytearray(stream):
        assert outcome[0] == 8 + 3 + 1  # data pages and the zero page
        # the unaltered stream: the machine's RAM as written (pages 10..17 carry their number)
        assert skip or outcome[1][10 * PAGE_SIZE] == 10


u32s = st.integers(0, 0xFFFF_FFFF)
u64s = st.integers(0, (1 << 64) - 1)


@st.composite
def machine_states(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "pages": draw(st.dictionaries(st.integers(0, RAM_PAGES - 1),
                                      st.one_of(st.binary(min_size=1, max_size=64),
                                                st.integers(0, 255)), max_size=8)),
        "cpu": {"x": draw(st.lists(u64s, min_size=31, max_size=31)), "sp": draw(u64s),
                "pc": draw(u64s), "v": draw(st.lists(st.integers(0, (1 << 128) - 1),
                                                     min_size=32, max_size=32)),
                "insns": draw(u64s), "has_insns": draw(st.booleans())},
        "sysregs": draw(st.lists(u64s, min_size=len(SYSTEM_REGISTERS),
                                 max_size=len(SYSTEM_REGISTERS))),
        "pl011": Pl011State(**dict(zip(PL011_REGISTERS, draw(st.lists(u32s, min_size=10,
                                                                         max_size=10)))),
                            rx_fifo=draw(st.binary(max_size=40)), tx_count=draw(u64s)),
        "counter": draw(st.lists(u64s, min_size=5, max_size=5)),
        # the five v1 registers, then the request subsection's argument, status (0..3), result
        "inform": [*draw(st.lists(u32s, min_size=5, max_size=5)), draw(u32s),
                   draw(st.integers(0, 3)), draw(u32s)],
        "machine": (draw(st.booleans()), draw(st.integers(-(1 << 31), (1 << 31) - 1)),
                    draw(u64s)),
    }


@FAST
@given(machine_states())
def test_round_trip_of_any_state(state: dict[str, Any]) -> None:
    note(repr(state))
    with Machine(RAM_PAGES * PAGE_SIZE) as machine:
        entries = machine_save_state(machine)
        for page, content in state["pages"].items():
            fill = bytes([content]) * PAGE_SIZE if isinstance(content, int) else content
            machine.ram_blocks[0].write(page * PAGE_SIZE, fill)
        set_fields(entries.cpu, **state["cpu"])
        for (name, _), value in zip(SYSTEM_REGISTERS, state["sysregs"]):
            setattr(entries.cpu, name, value)
        set_fields(machine.uart.state, **dataclasses.asdict(state["pl011"]))
        for obj, values in ((machine.counter.state, state["counter"]),
                            (machine.guest_inform.state, state["inform"]),
                            (entries.machine_section, state["machine"])):
            names = [fld.name for fld in dataclasses.fields(obj)]
            set_fields(obj, **dict(zip(names, values)))
        f = QEMUFile.memory()
        write_stream(f, machine, entries)
        want_state, want_ram = device_state(machine, entries), bytes(machine.ram_blocks[0].mem)
    result, got_state, got_ram = load_into_new_machine(f.getvalue())
    assert result.sections == SECTIONS_LOADED
    if not state["cpu"]["has_insns"]:  # no subsection sent: the loader keeps its default
        want_state["cpu"] = (*want_state["cpu"][:4], 0, False, want_state["cpu"][6])
    assert got_state == want_state
    assert got_ram == want_ram


# -- the VMDESCRIPTION trailer ---------------------------------------------------------------


def test_trailer_bytes() -> None:
    f = QEMUFile.memory()
    SaveState(MACHINE_TYPE).save_trailer(f, [], PAGE_SIZE)
    text = b'{"page_size":4096,"devices":[]}'
    assert f.getvalue() == b"".join([
        b"\x00",  # QEMU_VM_EOF
        b"\x06",  # QEMU_VM_VMDESCRIPTION
        be32(len(text)),  # be32 JSON length (31)
        text,  # the JSON, compact
    ])


def test_trailer_is_found_the_way_qemus_analyzer_looks() -> None:
    """The analyzer takes the first "{" after the last NUL byte for the JSON's start, so no
    byte of the JSON's length may be a "{" (0x7b): lengths that would be are padded."""
    padded = 0
    for pad in range(0x180):  # JSON lengths 0x1f .. 0x1ac, through 0x7b and 0x17b
        devices = [{"name": "d" * pad}] if pad else []
        compact = json.dumps({"page_size": PAGE_SIZE, "devices": devices},
                             separators=(",", ":")).encode()
        f = QEMUFile.memory()
        f.put_bytes(b"\x00the stream before")
        SaveState(MACHINE_TYPE).save_trailer(f, devices, PAGE_SIZE)
        data = f.getvalue()
        json_at = data.find(b"{", data.rfind(b"\0"))
        assert data[json_at - 5] == 0x06, pad  # the analyzer's own check
        length = int.from_bytes(data[json_at - 4:json_at], "big")
        assert json_at + length == len(data)
        assert data[json_at:] == compact + b" " * (length - len(compact))
        padded += length != len(compact)
    assert padded == 2  # only the two lengths ending in 0x7b


# -- hostile streams -------------------------------------------------------------------------


@pytest.fixture
def small_stream(machine: Machine) -> bytes:
    """A whole valid stream: one data page, one zero page, every device."""
    entries = machine_save_state(machine)
    set_known_state(machine, entries)
    machine.ram_blocks[0].write(3 * PAGE_SIZE, b"\x5a" * PAGE_SIZE)
    machine.ram_blocks[0].write(4 * PAGE_SIZE, bytes(PAGE_SIZE))
    f = QEMUFile.memory()
    write_stream(f, machine, entries)
    return f.getvalue()


def load_both_ways(data: bytes) -> tuple[LoadResult, dict[str, Any], bytes] | FormatError:
    """Load ``data`` from memory (Python parser) and from a file (C page-record walker); both
    must give the same machine or the same FormatError (type, message, offset, section)."""
    outcomes: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stream.bin"
        path.write_bytes(data)
        for source in ({"data": data}, {"path": path}):
            try:
                loaded = load_into_new_machine(**source)  # type: ignore[arg-type]
                outcomes.append((loaded[0].sections, loaded[1], loaded[2]))
            except FormatError as err:
                outcomes.append((type(err), str(err), err.offset, err.section))
                if len(outcomes) == 1:
                    first_error: FormatError | None = err
            else:
                if len(outcomes) == 1:
                    first_error, first_loaded = None, loaded
    assert outcomes[0] == outcomes[1], "memory and file loads differ"
    return first_loaded if first_error is None else first_error


def load_error(data: bytes) -> FormatError:
    outcome = load_both_ways(data)
    assert isinstance(outcome, FormatError), "the stream loaded"
    return outcome


def test_small_stream_loads(small_stream: bytes) -> None:
    assert load_into_new_machine(small_stream)[0].sections == SECTIONS_LOADED


def test_negative_bad_magic(small_stream: bytes) -> None:
    err = load_error(b"QEVN" + small_stream[4:])
    assert "not a QEMU migration stream" in str(err) and err.offset == 0


def test_negative_wrong_version(small_stream: bytes) -> None:
    err = load_error(small_stream[:4] + be32(2) + small_stream[8:])
    assert "unsupported QEMU stream version 2" in str(err) and err.offset == 4


def test_negative_other_machine_type(small_stream: bytes) -> None:
    err = load_error(small_stream.replace(b"\x0apyvmm-virt", b"\x0apyvmm-virX", 1))
    assert "pyvmm-virX" in str(err) and err.section == "configuration"


def test_negative_machine_type_too_long(small_stream: bytes) -> None:
    err = load_error(HEADER[:9] + be32(0x10000) + small_stream[len(HEADER):])
    assert "too long" in str(err)


def test_negative_unknown_section_idstr(small_stream: bytes) -> None:
    at = small_stream.index(PL011_SECTION[:11])
    err = load_error(small_stream.replace(b"\x05pl011", b"\x05pl012", 1))
    assert err.section == "pl012" and err.offset == at
    assert "unknown section 'pl012' instance 0" in str(err)


def test_negative_unknown_instance(small_stream: bytes) -> None:
    header = PL011_SECTION[:11]
    err = load_error(small_stream.replace(header + be32(0), header + be32(1), 1))
    assert "unknown section 'pl011' instance 1" in str(err)


def test_negative_wrong_footer_id(small_stream: bytes) -> None:
    at = small_stream.index(PL011_SECTION) + len(PL011_SECTION) - 5
    data = small_stream[:at] + b"\x7e" + be32(3) + small_stream[at + 5:]
    err = load_error(data)
    assert err.section == "pl011" and err.offset == at
    assert "does not end with its footer" in str(err)


def test_negative_missing_footer_marker(small_stream: bytes) -> None:
    at = small_stream.index(COUNTER_SECTION) + len(COUNTER_SECTION) - 5
    err = load_error(small_stream[:at] + b"\x7f" + small_stream[at + 1:])
    assert err.section == "virt-counter" and "found 0x7f" in str(err)


@pytest.mark.parametrize("kind", [0x05, 0x06, 0x07, 0x08, 0x7E, 0xFF])
def test_negative_unknown_section_type(small_stream: bytes, kind: int) -> None:
    at = small_stream.index(COUNTER_SECTION)
    err = load_error(small_stream[:at] + bytes([kind]) + small_stream[at + 1:])
    assert f"unknown section type 0x{kind:02x}" in str(err) and err.offset == at


def test_negative_device_sent_as_a_live_section(small_stream: bytes) -> None:
    at = small_stream.index(PL011_SECTION)
    err = load_error(small_stream[:at] + b"\x01" + small_stream[at + 1:])
    assert "wrong type START" in str(err) and err.section == "pl011"


def test_negative_end_for_an_unknown_section(small_stream: bytes) -> None:
    at = small_stream.index(CPU_SECTION[:9]) - len(RAM_END)
    assert small_stream[at:at + len(RAM_END)] == RAM_END
    err = load_error(small_stream[:at + 1] + be32(9) + small_stream[at + 5:])
    assert "END section for unknown section id 9" in str(err)


def test_negative_newer_section_version(small_stream: bytes) -> None:
    header = GUEST_INFORM_SECTION[:26]  # type, id, idstr, instance, version
    err = load_error(small_stream.replace(header, header[:-4] + be32(2), 1))
    assert err.section == "guest-inform" and "newer" in str(err)


def test_negative_ram_of_another_size(small_stream: bytes) -> None:
    entry = b"\x0dmach-virt.ram" + be64(RAM_PAGES * PAGE_SIZE)  # the block list's entry
    err = load_error(small_stream.replace(entry, entry[:-8] + be64(2 * RAM_PAGES * PAGE_SIZE), 1))
    assert "RAM size mismatch: block mach-virt.ram" in str(err) and err.section == "ram"


def test_negative_ram_page_outside_its_block(small_stream: bytes) -> None:
    record = be64(3 * PAGE_SIZE | 0x08) + b"\x0dmach-virt.ram"
    assert record in small_stream
    err = load_error(small_stream.replace(record, be64(RAM_PAGES * PAGE_SIZE | 0x08)
                                          + b"\x0dmach-virt.ram", 1))
    assert "outside block mach-virt.ram" in str(err)


def test_negative_ram_record_for_an_unknown_block(small_stream: bytes) -> None:
    err = load_error(small_stream.replace(b"\x0dmach-virt.ram", b"\x0dmach-virt.rom", 2))
    assert "unknown block 'mach-virt.rom'" in str(err)


def test_negative_ram_continue_without_a_block(small_stream: bytes) -> None:
    record = be64(3 * PAGE_SIZE | 0x08) + b"\x0dmach-virt.ram"
    data = small_stream.replace(record, be64(3 * PAGE_SIZE | 0x08 | 0x20), 1)
    assert "continues a block but none was named" in str(load_error(data))


@pytest.mark.parametrize("flag", [0x01, 0x40, 0x80, 0x100])
def test_negative_ram_unknown_flags(small_stream: bytes, flag: int) -> None:
    record = be64(3 * PAGE_SIZE | 0x08)
    err = load_error(small_stream.replace(record, be64(3 * PAGE_SIZE | 0x08 | flag), 1))
    assert "unknown RAM record flags" in str(err) and err.section == "ram"


def test_negative_truncated_at_every_byte(small_stream: bytes, tmp_path: Path) -> None:
    """Every prefix is refused with a FormatError (any other exception fails the test), except
    the one that ends right after EOF: a QEMU stream need not carry a VMDESCRIPTION. From a file
    (a stream limit, or the file's end), the same error as from memory."""
    trailer = small_stream.rindex(b"\x00\x06")
    path = tmp_path / "stream.bin"
    path.write_bytes(small_stream)
    for n in [*range(0, len(small_stream), 97), *range(trailer - 40, trailer + 2)]:
        with pytest.raises(FormatError) as from_memory:
            if load_into_new_machine(small_stream[:n]) and n == trailer + 1:
                raise FormatError("accepted")
        with pytest.raises(FormatError) as from_file:
            if load_into_new_machine(path=path, limit=n) and n == trailer + 1:
                raise FormatError("accepted")
        assert str(from_file.value) == str(from_memory.value), n
    with open(path, "r+b") as handle:  # the file itself ends inside the RAM section
        os.ftruncate(handle.fileno(), len(small_stream) // 2)
    assert str(load_error(small_stream[:len(small_stream) // 2])) == str(
        pytest.raises(FormatError, load_into_new_machine, path=path).value)
    accepted = []
    with Machine(RAM_PAGES * PAGE_SIZE) as target:
        entries = machine_save_state(target)
        for name, _ in SYSTEM_REGISTERS:
            setattr(entries.cpu, name, 0)
        for n in range(len(small_stream)):
            try:
                result = entries.save_state.load(QEMUFile.memory(small_stream[:n]))
            except FormatError:
                continue
            accepted.append(n)
            assert result.description is None
    assert accepted == [trailer + 1]


@settings(FAST, max_examples=150,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_negative_altered_bytes_raise_format_error_only(small_stream: bytes,
                                                        data: st.DataObject) -> None:
    stream = bytearray(small_stream)
    for _ in range(data.draw(st.integers(1, 4))):
        # most of the stream is the data page: aim at the structure around it too
        region = data.draw(st.sampled_from(["any", "head", "tail"]))
        lo, hi = {"any": (0, len(stream)), "head": (0, 200),
                  "tail": (len(stream) - 2500, len(stream))}[region]
        at = data.draw(st.integers(lo, hi - 1))
        stream[at] = data.draw(st.integers(0, 255))
    note(f"changed: {[(i, b) for i, (a, b) in enumerate(zip(small_stream, stream)) if a != b]}")
    try:
        load_both_ways(bytes(stream))
    except Exception as err:  # the property is: nothing but FormatError
        raise AssertionError(f"{type(err).__name__}: {err}") from err

