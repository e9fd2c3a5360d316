"""QEMU beside pyvmm: the same bare-metal workload on ``qemu-system-aarch64 -M virt``, its
snapshots measured like pyvmm's checkpoints, in the same run.

pyvmm's machine is QEMU's ``virt`` board where the workload looks (RAM at 0x40000000, the PL011
at 0x09000000, PSCI on ``hvc #0``), so the workload runs there unchanged: QEMU loads a raw image
given as ``-kernel`` 512 KiB into RAM and enters it at EL1, so the image is a prologue that sets
the workload's entry registers (x0..x9: working set, pattern, seed...) followed by the workload
assembled for its address; the working set stays at RAM + 1 MiB.  The UART output is the one
pyvmm's machine prints (a test compares them).

Two algorithms, each a row of its own:

* ``qemu:savevm`` -- QEMU's stop-and-copy: ``stop``, ``migrate`` to a file, ``cont``; its
  downtime is the guest's whole pause (stop to cont), as pyvmm's stop-and-copy one is;
* ``qemu:background-snapshot`` -- QEMU's live snapshot (write-protect with userfaultfd, the guest
  running): ``migrate`` with the ``background-snapshot`` capability; downtime as QEMU reports it.

Each snapshot is a whole file (QEMU has no increments); the reload of snapshot ``k`` is a new QEMU
with ``-incoming`` on it, timed to the end of the incoming migration.  Instructions per second are
not measured on QEMU (it counts none without ``-icount``): those fields are null, never guessed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from ..errors import PyvmmError
from ..guests.workload import (
    RAM_BASE,
    WorkloadOptions,
    assemble_workload,
    build_workload,
)
from .host import peak_rss_growth, reset_peak_rss

QEMU = "qemu-system-aarch64"
ALGORITHMS = ("qemu:savevm", "qemu:background-snapshot")
#: Where QEMU's arm64 boot loads a raw -kernel image (KERNEL64_LOAD_ADDR in hw/arm/boot.c).
KERNEL_OFFSET = 0x80000
PROLOGUE_ROOM = 0x100
STARTUP_TIMEOUT = 30.0
MIGRATION_TIMEOUT = 600.0


class QemuError(PyvmmError):
    """QEMU could not be started or driven (one line, the cell records it)."""


def find_qemu() -> str | None:
    return shutil.which(QEMU)


def workload_image(options: WorkloadOptions, ram_size: int) -> bytes:
    """The raw ``-kernel`` image: entry registers set, then a branch to the workload."""
    from keystone import KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN, Ks

    base = RAM_BASE + KERNEL_OFFSET
    registers = build_workload(options, RAM_BASE, ram_size).registers
    code_at = base + PROLOGUE_ROOM
    code = assemble_workload(code_at)
    lines = [f"{'movz' if shift == 0 else 'movk'} {name}, #{(value >> shift) & 0xFFFF}, "
             f"lsl #{shift}" for name, value in registers.items() for shift in (0, 16, 32, 48)]
    lines.append(f"b #{code_at}")
    encoding, _ = Ks(KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN).asm("\n".join(lines), base)
    prologue = bytes(encoding or [])
    if len(prologue) > PROLOGUE_ROOM:
        raise QemuError(f"the QEMU prologue takes {len(prologue)} bytes, more than "
                        f"{PROLOGUE_ROOM}")
    return prologue + bytes(PROLOGUE_ROOM - len(prologue)) + code


class Qmp:
    """A minimal synchronous QMP client (QEMU's JSON protocol over a unix socket)."""

    def __init__(self, path: Path, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError as err:
                if process.poll() is not None:
                    raise QemuError(f"QEMU exited ({process.returncode}) before its QMP "
                                    f"socket opened") from err
                if time.monotonic() > deadline:
                    raise QemuError(f"QEMU's QMP socket did not open in "
                                    f"{STARTUP_TIMEOUT:.0f} s") from err
                time.sleep(0.02)  # QEMU is starting up; nothing to wait on but the socket
        self.stream = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.stream.readline()
            if not line:
                raise QemuError("QEMU closed its QMP connection")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.stream.write(json.dumps(request).encode() + b"\n")
        self.stream.flush()
        reply = self._read()
        if "error" in reply:
            raise QemuError(f"QEMU {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def wait_migration(self) -> dict[str, Any]:
        """query-migrate until the migration ends; its last reply (QemuError if it failed)."""
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while True:
            info: dict[str, Any] = self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QemuError(f"QEMU's migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise QemuError("QEMU's migration did not end in time")
            time.sleep(0.005)  # polling QEMU's own progress, as its users do

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def _start(workdir: Path, ram: int, *extra: str) -> tuple[subprocess.Popen[bytes], Qmp]:
    binary = find_qemu()
    if binary is None:
        raise QemuError(f"{QEMU} is not installed")
    sock = workdir / f"qmp-{time.monotonic_ns()}.sock"
    process = subprocess.Popen(
        [binary, "-M", "virt", "-cpu", "cortex-a57", "-m", f"{ram >> 20}M", "-nographic",
         "-monitor", "none", "-nic", "none", "-qmp", f"unix:{sock},server=on,wait=off",
         *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return process, Qmp(sock, process)
    except BaseException:
        process.kill()
        process.wait()
        raise


def _stop(process: subprocess.Popen[bytes], qmp: Qmp | None) -> None:
    if qmp is not None:
        try:
            qmp.execute("quit")
        except (QemuError, OSError):
            pass
        qmp.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_qemu_cell(cell: Any, record: dict[str, Any], workdir: Path) -> None:
    """Fill ``record`` (see :func:`pyvmm.bench.cell.run_cell`) for the QEMU algorithm of
    ``cell`` on its workload; QemuError (one line) when QEMU cannot do it."""
    live = cell.algorithm == "qemu:background-snapshot"
    options = WorkloadOptions.parse(cell.workload)
    image = workdir / "workload.img"
    image.write_bytes(workload_image(options, cell.ram))
    uart = workdir / "uart.log"
    process, qmp = _start(workdir, cell.ram, "-serial", f"file:{uart}", "-kernel", str(image))
    files = []
    try:
        qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": live}]})
        time.sleep(cell.interval)  # the guest's run before the first snapshot
        baseline_rss = reset_peak_rss(process.pid)
        for k in range(cell.checkpoints):
            path = workdir / f"snapshot-{k}.qemu"
            began = time.perf_counter()
            if not live:
                qmp.execute("stop")
            qmp.execute("migrate", {"uri": f"exec:cat > {path}"})
            info = qmp.wait_migration()
            if not live:
                qmp.execute("cont")
            wall = time.perf_counter() - began
            ram = info.get("ram", {})
            files.append(path)
            record["checkpoints"].append({
                "increment": k, "kind": "full", "pages": int(ram.get("normal", 0)),
                "zero_pages": int(ram.get("duplicate", 0)),
                "bytes_written": path.stat().st_size,
                "total_ms": float(info.get("total-time", wall * 1e3)),
                "setup_ms": float(info.get("setup-time", 0)),
                "downtime_ms": float(info.get("downtime", 0)) if live else wall * 1e3,
                "write_faults": 0, "shadow_copies": 0, "saver": cell.algorithm,
                "encoder": "qemu", "compressed_pages": 0, "guest_ips_before": None,
                "guest_ips_during": None, "guest_ips_after": None, "wall_ms": wall * 1e3})
            time.sleep(cell.interval)  # the guest runs on between snapshots
        record["extra_memory_bytes"] = peak_rss_growth(baseline_rss, process.pid)
    finally:
        _stop(process, qmp)
    record["uart"] = uart.read_bytes()[:1024].decode(errors="replace") if uart.exists() else ""
    record["file_bytes"] = sum(path.stat().st_size for path in files)
    if cell.reloads:
        for k, path in enumerate(files):
            began = time.perf_counter()
            process, qmp = _start(workdir, cell.ram, "-S", "-incoming", f"exec:cat {path}")
            try:
                qmp.wait_migration()
                record["reloads"].append({"increments": k + 1, "indexed_s": None,
                                          "partial_s": None, "lazy_first_insn_ms": None,
                                          "lazy_setup_ms": None,
                                          "qemu_incoming_s": time.perf_counter() - began})
            finally:
                _stop(process, qmp)


def available_note() -> str | None:
    """None when QEMU rows can be measured, else why not (said, never faked)."""
    if find_qemu() is None:
        return f"{QEMU} is not installed: the QEMU rows are skipped"
    return None

