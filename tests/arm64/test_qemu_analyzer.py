"""QEMU's own stream analyzer reads pyvmm's checkpoints: proof that our streams are QEMU's format.

``scripts/analyze-migration.py`` from QEMU 7.2 (as Debian bookworm ships it; fetched by
``scripts/fetch-qemu-analyzer``, or named by PYVMM_QEMU_ANALYZER) is run on increments that the
CLI wrote and exported, as a user would.  It walks the stream with nothing but the VMDESCRIPTION
JSON, so every value it prints agreeing with the machine shows that the device bytes, the JSON
that describes them and the RAM records are all what QEMU would write.  The machine's state to
compare with comes from a second, in-process run of the same deterministic guest (DESIGN.md §9),
not from pyvmm's loader.  A missing analyzer fails the tests; it never skips them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pyvmm.boot import GuestSpec, boot
from pyvmm.cpu import SYSTEM_REGISTERS
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine, StopReason
from pyvmm.migration.checkpoint import reload
from pyvmm.migration.container import CheckpointFile
from pyvmm.migration.machine_state import machine_save_state
from pyvmm.migration.ram_handler import RAM_SECTION_VERSION, RamHandler
from pyvmm.migration.savevm import SaveState, SaveStateEntry
from pyvmm.migration.stream import QEMUFile
from pyvmm.migration.vmstate import VMStateDescription, uint32
from pyvmm.ram import PAGE_SIZE, RamBlock

ROOT = Path(__file__).resolve().parents[2]
ANALYZER = ROOT / "tests" / "data" / "qemu" / "analyze-migration.py"
FETCH = ROOT / "scripts" / "fetch-qemu-analyzer"

RAM_SIZE = 64 << 20
WORKLOAD = "working_set=1M,passes=0,report=1"
#: Instruction counts at which the workload run is checkpointed (one increment each).
POINTS = (1_000_000, 3_000_000)
DEVICE_SECTIONS = ["ram", "cpu", "pl011", "virt-counter", "guest-inform", "pyvmm-machine"]
#: QEMU 7.2's analyzer formats a page in -m mode with ord(c) over bytes, a Python 2 leftover.
ORD_BUG = "ord() expected string of length 1, but int found"
#: Runs the analyzer with ord() also taking the ints that iterating bytes gives in Python 3.
ORD_SHIM = (
    "import builtins, runpy, sys\n"
    "_ord = builtins.ord\n"
    "builtins.ord = lambda c: c if isinstance(c, int) else _ord(c)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.fixture(scope="session")
def analyzer() -> Path:
    """Path of QEMU's analyze-migration.py (fetched on first use)."""
    override = os.environ.get("PYVMM_QEMU_ANALYZER")
    if override:
        if not os.path.isfile(override):
            pytest.fail(f"PYVMM_QEMU_ANALYZER={override} does not name a file")
        return Path(override)
    if not ANALYZER.is_file():
        proc = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True,
                              timeout=900, check=False)
        if not ANALYZER.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            pytest.fail(f"QEMU's analyzer is missing ({ANALYZER}) and {FETCH.name} could not "
                        f"fetch it (exit {proc.returncode}): " + " | ".join(tail))
    if "class MigrationDump" not in ANALYZER.read_text(errors="replace"):
        pytest.fail(f"{ANALYZER} is not QEMU's analyze-migration.py")
    return ANALYZER


# -- running things ------------------------------------------------------------------------------


def pyvmm(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True,
                          timeout=300, check=False, cwd=cwd)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc


def analyze(analyzer: Path, stream: Path, *options: str, cwd: Path | None = None,
            ord_shim: bool = False) -> subprocess.CompletedProcess[str]:
    """``python3 analyze-migration.py -f STREAM OPTIONS`` (the exit status is not checked)."""
    prefix = [sys.executable, "-c", ORD_SHIM] if ord_shim else [sys.executable]
    return subprocess.run([*prefix, str(analyzer), "-f", str(stream), *options],
                          capture_output=True, text=True, timeout=300, check=False, cwd=cwd)


def analyze_ok(analyzer: Path, stream: Path, *options: str, cwd: Path | None = None,
               ord_shim: bool = False) -> str:
    proc = analyze(analyzer, stream, *options, cwd=cwd, ord_shim=ord_shim)
    assert proc.returncode == 0, f"the analyzer failed on {stream.name}:\n{proc.stderr[-2000:]}"
    return proc.stdout


def by_name(state: dict[str, Any]) -> dict[str, Any]:
    """The analyzer's sections keyed by idstr ("cpu (1)" -> "cpu"), in stream order."""
    return {key.rsplit(" (", 1)[0]: value for key, value in state.items()}


def value(text: str) -> int:
    """An integer as the analyzer prints it: "0x0000002a", or "0xffffffff (-1)" if signed."""
    match = re.fullmatch(r"0x([0-9a-f]+)(?: \((-?\d+)\))?", text)
    assert match is not None, f"not an analyzer integer: {text!r}"
    return int(match.group(2)) if match.group(2) is not None else int(match.group(1), 16)


def first_page_difference(got: bytes, want: bytes | memoryview) -> int | None:
    """The first page where two RAM images differ (None if equal): a readable assertion."""
    assert len(got) == len(want), f"{len(got)} bytes, expected {len(want)}"
    expected = bytes(want)
    if got == expected:
        return None
    return next(p for p in range(len(got) // PAGE_SIZE)
                if got[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
                != expected[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])


def increment_pages(path: Path, increment: int) -> tuple[str, dict[str, set[int]]]:
    """The increment's kind and the pages it holds per RAM block (from the page index)."""
    with CheckpointFile.open(path) as container:
        header = container.header
        pages: dict[str, set[int]] = {b.name: set() for b in header.ram_blocks}
        for run in container.page_index(increment):
            name = header.ram_blocks[run.block].name
            pages[name].update(range(run.first_page, run.first_page + run.npages))
        return header.increments[increment].kind, pages


# -- the built-in workload, checkpointed twice -----------------------------------------------


@dataclasses.dataclass
class Snapshot:
    """The machine at one checkpoint point, from the in-process reference run."""

    pc: int
    sp: int
    x: tuple[int, ...]
    v: tuple[int, ...]
    sysregs: dict[str, int]
    insns: int | None
    tx_count: int
    counter: dict[str, int]
    ram: bytes


@dataclasses.dataclass
class WorkloadCheckpoints:
    file: Path
    streams: list[Path]
    uart: bytes  # what the CLI run printed
    reference_uart: bytes  # what the reference run printed
    snapshots: list[Snapshot]


def _snapshot(machine: Machine) -> Snapshot:
    state = machine.cpu_state()
    (block,) = machine.ram_blocks
    return Snapshot(pc=state.pc, sp=state.sp, x=state.x, v=state.v, sysregs=dict(state.sysregs),
                    insns=machine.insns, tx_count=machine.uart.state.tx_count,
                    counter=dataclasses.asdict(machine.counter.state), ram=bytes(block.mem))


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> WorkloadCheckpoints:
    work = tmp_path_factory.mktemp("workload")
    chpt = work / "workload.chpt"
    run = pyvmm("run", "--ram", "64M", "--workload", WORKLOAD, "--max-insns", str(POINTS[-1]),
                "--checkpoint-at", ",".join(str(p) for p in POINTS[:-1]),
                "--checkpoint", f"chpt:{chpt}", cwd=work)
    streams = []
    for k in range(len(POINTS)):
        out = work / f"increment{k}.qemu"
        pyvmm("checkpoint", "export", str(chpt), "-k", str(k), "-o", str(out), cwd=work)
        streams.append(out)
    uart = bytearray()
    snapshots = []
    spec = GuestSpec(workload=WorkloadOptions.parse(WORKLOAD))
    with boot(spec, ram_size=RAM_SIZE, seed=0, uart_sink=uart.extend) as machine:
        done = 0
        for point in POINTS:
            result = machine.run(max_insns=point - done)
            assert result.reason is StopReason.INSN_LIMIT, result
            done = point
            snapshots.append(_snapshot(machine))
    return WorkloadCheckpoints(chpt, streams, run.stdout, bytes(uart), snapshots)


def test_reference_run_is_the_checkpointed_run(workload: WorkloadCheckpoints) -> None:
    # the comparisons below mean something only if the in-process run is the CLI's run
    assert workload.uart == workload.reference_uart
    assert workload.uart.count(b"\n") >= 2
    assert [s.insns for s in workload.snapshots] == list(POINTS)


@pytest.mark.parametrize("k", range(len(POINTS)))
def test_state_dump_matches_the_machine(analyzer: Path, workload: WorkloadCheckpoints,
                                        k: int) -> None:
    sections = by_name(json.loads(analyze_ok(analyzer, workload.streams[k])))
    snap = workload.snapshots[k]
    assert list(sections) == DEVICE_SECTIONS
    assert sections["ram"] == {"section sizes": {"mach-virt.ram": f"0x{RAM_SIZE:016x}"}}

    cpu = sections["cpu"]
    assert value(cpu["pc"]) == snap.pc
    assert value(cpu["sp"]) == snap.sp
    assert [value(x) for x in cpu["x"]] == list(snap.x)
    words = [value(w) for w in cpu["v"]]  # each V register as two u64, low word first
    assert [words[2 * i] | words[2 * i + 1] << 64 for i in range(32)] == list(snap.v)
    assert {name: value(cpu[name]) for name, _ in SYSTEM_REGISTERS} == snap.sysregs
    assert cpu["cpu/icount"] == {"insns": f"0x{POINTS[k]:016x}"}

    pl011 = sections["pl011"]
    assert value(pl011["tx_count"]) == snap.tx_count > 0
    assert value(pl011["cr"]) == 0x300
    assert value(pl011["rx_len"]) == 0 and pl011["rx_fifo"] == ""
    assert {name: value(v) for name, v in sections["virt-counter"].items()} == snap.counter
    inform = {name: value(v) for name, v in sections["guest-inform"].items()}
    # captured during checkpoint k: k earlier ones completed, this one in progress
    assert inform == {"checkpoint_count": k, "checkpoint_status": 1, "restore_count": 0,
                      "request": 0, "request_count": 0}
    assert sections["pyvmm-machine"] == {"ended": False, "exit_code": "0x00000000",
                                         "seed": "0x0000000000000000"}


def test_last_checkpoint_counts_every_byte_the_guest_printed(
        analyzer: Path, workload: WorkloadCheckpoints) -> None:
    sections = by_name(json.loads(analyze_ok(analyzer, workload.streams[-1])))
    assert value(sections["pl011"]["tx_count"]) == len(workload.uart)


def test_desc_dump_is_the_streams_description(analyzer: Path,
                                              workload: WorkloadCheckpoints) -> None:
    stream = workload.streams[-1]
    desc = json.loads(analyze_ok(analyzer, stream, "-d", "desc"))
    # what pyvmm's own loader finds after EOF
    with Machine(RAM_SIZE) as machine:
        entries = machine_save_state(machine)
        with open(stream, "rb") as handle:
            loaded = entries.save_state.load(QEMUFile.for_reading(handle.fileno()))
    assert desc == loaded.description
    assert desc["page_size"] == PAGE_SIZE
    assert [d["name"] for d in desc["devices"]] == DEVICE_SECTIONS[1:]
    cpu = desc["devices"][0]
    assert [f["name"] for f in cpu["fields"][:4]] == ["x", "sp", "pc", "v"]
    assert [s["vmsd_name"] for s in cpu["subsections"]] == ["cpu/icount"]


@pytest.mark.parametrize("k", range(len(POINTS)))
def test_extract_writes_guest_ram(analyzer: Path, workload: WorkloadCheckpoints, k: int,
                                  tmp_path: Path) -> None:
    out = analyze_ok(analyzer, workload.streams[k], "-x", cwd=tmp_path)
    assert out.splitlines() == ["desc.json", "mach-virt.ram", "state.json"]
    extracted = (tmp_path / "mach-virt.ram").read_bytes()
    kind, pages = increment_pages(workload.file, k)
    ram = workload.snapshots[k].ram
    if kind == "full":
        assert first_page_difference(extracted, ram) is None
    else:  # an increment holds its pages only; the analyzer leaves the rest zero
        held = pages["mach-virt.ram"]
        assert held
        for page in range(RAM_SIZE // PAGE_SIZE):
            want = ram[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] if page in held \
                else bytes(PAGE_SIZE)
            assert extracted[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] == want, f"page {page}"
    # -x walks the devices as -d state does
    state = json.loads((tmp_path / "state.json").read_text())
    assert state == json.loads(analyze_ok(analyzer, workload.streams[k]))
    assert json.loads((tmp_path / "desc.json").read_text())["page_size"] == PAGE_SIZE


def test_memory_dump_lists_every_page_it_holds(analyzer: Path,
                                               workload: WorkloadCheckpoints) -> None:
    stream = workload.streams[0]
    plain = analyze(analyzer, stream, "-m")
    if plain.returncode != 0:
        # QEMU 7.2's -m fails on any data page, QEMU's own streams too; nothing else may fail
        assert ORD_BUG in plain.stderr, plain.stderr[-2000:]
    memory = by_name(json.loads(analyze_ok(analyzer, stream, "-m", ord_shim=True)))["ram"]["memory"]
    _, pages = increment_pages(workload.file, 0)
    ram = workload.snapshots[0].ram
    listed = set()
    for key, text in memory.items():
        match = re.fullmatch(r"mach-virt\.ram \(0x([0-9a-f]{16})\)", key)
        assert match is not None, key
        page = int(match.group(1), 16) // PAGE_SIZE
        listed.add(page)
        want = ram[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        if text == "Filled with 0x00":
            assert want == bytes(PAGE_SIZE), f"page {page} is not zero"
        else:
            assert bytes.fromhex(text) == want, f"page {page}"
    assert listed == pages["mach-virt.ram"]
    assert any(text != "Filled with 0x00" for text in memory.values())
    for page in set(range(RAM_SIZE // PAGE_SIZE)) - listed:  # a full checkpoint omits zeros only
        assert ram[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] == bytes(PAGE_SIZE), f"page {page}"


# -- a Linux guest: busybox ------------------------------------------------------------------

BUSYBOX_SCRIPT = "echo hello; i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; echo done"
BUSYBOX_INSNS = 300_000


@dataclasses.dataclass
class BusyboxCheckpoint:
    file: Path
    stream: Path
    stdout: bytes
    blocks: dict[str, int]  # RAM block name -> size, from `checkpoint info --json`


@pytest.fixture(scope="module")
def busybox_checkpoint(busybox: str, tmp_path_factory: pytest.TempPathFactory
                       ) -> BusyboxCheckpoint:
    work = tmp_path_factory.mktemp("busybox")
    chpt = work / "busybox.chpt"
    run = pyvmm("run", "-q", "--max-insns", str(BUSYBOX_INSNS), "--checkpoint", f"chpt:{chpt}",
                "--guest", busybox, "sh", "-c", BUSYBOX_SCRIPT, cwd=work)
    stream = work / "busybox.qemu"
    pyvmm("checkpoint", "export", str(chpt), "-o", str(stream), cwd=work)
    info = json.loads(pyvmm("checkpoint", "info", "--json", str(chpt), cwd=work).stdout)
    return BusyboxCheckpoint(chpt, stream, run.stdout,
                             {b["name"]: b["size"] for b in info["ram_blocks"]})


def test_busybox_state_dump(analyzer: Path, busybox_checkpoint: BusyboxCheckpoint) -> None:
    sections = by_name(json.loads(analyze_ok(analyzer, busybox_checkpoint.stream)))
    assert list(sections) == [*DEVICE_SECTIONS, "linux-user"]
    assert len(busybox_checkpoint.blocks) == 2
    assert sections["ram"]["section sizes"] == {
        name: f"0x{size:016x}" for name, size in busybox_checkpoint.blocks.items()}
    assert sections["cpu"]["cpu/icount"] == {"insns": f"0x{BUSYBOX_INSNS:016x}"}
    assert value(sections["pl011"]["tx_count"]) == 0  # a Linux program writes through syscalls
    linux = sections["linux-user"]
    raw = bytes.fromhex(linux["state_json"])
    assert value(linux["length"]) == len(raw)
    state = json.loads(raw)
    assert state["argv"][1:] == ["sh", "-c", BUSYBOX_SCRIPT]
    assert busybox_checkpoint.stdout == b"hello\n"
    assert state["stdout_bytes"] == len(busybox_checkpoint.stdout)
    assert state["exit_code"] is None


def test_busybox_extract_writes_every_ram_block(analyzer: Path,
                                               busybox_checkpoint: BusyboxCheckpoint,
                                               tmp_path: Path) -> None:
    out = analyze_ok(analyzer, busybox_checkpoint.stream, "-x", cwd=tmp_path)
    assert out.splitlines() == ["desc.json", *busybox_checkpoint.blocks, "state.json"]
    # the reference here is pyvmm's reload of the same file (a Linux guest's reference run
    # would need the same cwd and files; the workload tests cover the independent oracle)
    machine = reload(f"chpt:{busybox_checkpoint.file}", stdout=lambda _b: None,
                     stderr=lambda _b: None)
    with machine:
        assert machine.insns == BUSYBOX_INSNS
        for block in machine.ram_blocks:
            extracted = (tmp_path / block.name).read_bytes()
            assert first_page_difference(extracted, block.mem) is None, block.name


# -- the analyzer's way of finding the description -------------------------------------------


def _stream_with_description_length(low_byte: int, tmp_path: Path
                                    ) -> tuple[Path, bytes, VMStateDescription]:
    """A small stream whose VMDESCRIPTION JSON, before any padding, has a length ending in
    ``low_byte`` (tuned with the lengths of the device's and its field's names)."""
    for name_len in range(1, 200):
        for field_len in (1, 2):
            vmsd = VMStateDescription("d" * name_len, 1, 1,
                                      [uint32("v" * field_len, attr="value")])
            save_state = SaveState("pyvmm-virt")
            with RamBlock("pc.ram", 4 * PAGE_SIZE, 0) as block:
                block.write(PAGE_SIZE, b"\xa5" * PAGE_SIZE)
                ram = RamHandler([block])
                save_state.register(SaveStateEntry("ram", 0, RAM_SECTION_VERSION, handler=ram))
                save_state.register(SaveStateEntry(vmsd.name, 0, 1, vmsd=vmsd,
                                                   opaque=SimpleNamespace(value=0x1234)))
                ram.select({"pc.ram": block.populated_pages()})
                path = tmp_path / "small.qemu"
                with open(path, "wb") as handle:
                    f = QEMUFile.for_writing(handle.fileno())
                    save_state.save_header(f)
                    save_state.save_setup(f)
                    save_state.save_iterate(f)
                    save_state.save_complete(f)
                    devices = save_state.save_devices(f)
                    save_state.save_trailer(f, devices, PAGE_SIZE)
                    f.close()
            compact = json.dumps({"page_size": PAGE_SIZE, "devices": devices},
                                 separators=(",", ":")).encode()
            if len(compact) & 0xFF == low_byte:
                return path, compact, vmsd
    raise AssertionError(f"no description length ends in 0x{low_byte:02x}")


def test_description_whose_length_holds_a_brace_byte(analyzer: Path, tmp_path: Path) -> None:
    # The analyzer takes the first "{" after the file's last NUL for the JSON's start: a length
    # ending in 0x7b ("{") would mislead it, so the writer pads the JSON with spaces.
    path, compact, vmsd = _stream_with_description_length(0x7B, tmp_path)
    data = path.read_bytes()
    start = data.rindex(compact)
    length = data[start - 4:start]
    assert b"{" not in length
    assert data[start + len(compact):] == b" " * (int.from_bytes(length, "big") - len(compact))
    sections = by_name(json.loads(analyze_ok(analyzer, path)))
    assert list(sections) == ["ram", vmsd.name]
    assert sections[vmsd.name] == {vmsd.fields[0].name: "0x00001234"}
