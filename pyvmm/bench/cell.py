"""One bench cell, measured: JSON in, JSON out (``python -m pyvmm.bench.cell`` reads a cell on
stdin and writes its record on stdout, so a cell runs in a process of its own, wherever an
executor puts it).

The guest boots with the cell's RAM and runs on its vCPU thread for the whole cell; the
checkpoints are taken from this thread while it runs (as a user's ``migrate`` is):

1. ``interval`` seconds of guest run: instructions per second *before* (sampled from the
   machine's block counter, which costs the guest nothing);
2. for each of ``checkpoints``: one checkpoint (its statistics are the file's own, the ones
   ``checkpoint info`` shows) with the guest's instructions per second *during* it, then
   ``interval`` seconds of run, *after* it; the peak RSS over the RSS before the first
   checkpoint is the extra memory;
3. the guest is stopped; each chain prefix is reloaded (indexed and partial: seconds; lazy: ms to
   the first guest instruction);
4. baselines in the same process and directory: raw ``write()`` of the RAM's bytes to a new file,
   raw ``read()`` of it back, and ``memcpy`` of the RAM.

A cell that fails records its error (one line) rather than stopping the run.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ..boot import GuestSpec, boot
from ..errors import PyvmmError
from ..guests.workload import WorkloadOptions
from ..machine import Machine, RunState
from .host import peak_rss_growth, reset_peak_rss
from .spec import PROGRAM_PREFIX, Cell, parse_algorithm

#: Bytes per raw write()/read() call and per memcpy of the baselines.
CHUNK = 8 << 20
#: The guest's first output kept in the record (the QEMU rows are checked against it).
UART_KEPT = 1024
QEMU_PREFIX = "qemu:"
SCHEMA_VERSION = 1


def _guest(cell: Cell) -> GuestSpec:
    if cell.workload.startswith(PROGRAM_PREFIX):
        program, *args = shlex.split(cell.workload[len(PROGRAM_PREFIX):])
        return GuestSpec(program=program, args=tuple(args))
    return GuestSpec(workload=WorkloadOptions.parse(cell.workload))


def _ips(machine: Machine, seconds: float) -> float:
    """Guest instructions per second over ``seconds`` of its run."""
    start, began = machine.executed_insns, time.perf_counter()
    time.sleep(seconds)  # a benchmark's window of guest run, not a test's synchronisation
    return (machine.executed_insns - start) / max(time.perf_counter() - began, 1e-9)


def _checkpoints(machine: Machine, cell: Cell, path: Path) -> tuple[list[dict[str, Any]],
                                                                     float, int]:
    from ..migration.checkpoint import Checkpointer

    algorithm = parse_algorithm(cell.algorithm)
    machine.start()
    records: list[dict[str, Any]] = []
    before = _ips(machine, cell.interval)
    baseline_rss = reset_peak_rss()
    checkpointer = Checkpointer(machine, path, durable=False,
                                **algorithm.checkpointer_options())
    try:
        for _ in range(cell.checkpoints):
            start, began = machine.executed_insns, time.perf_counter()
            stats = checkpointer.checkpoint()
            took = max(time.perf_counter() - began, 1e-9)
            during = (machine.executed_insns - start) / took
            after = _ips(machine, cell.interval)
            record = stats.as_dict()
            record.update(guest_ips_before=before, guest_ips_during=during,
                          guest_ips_after=after, wall_ms=took * 1e3)
            records.append(record)
            before = after
    finally:
        checkpointer.close()
        if machine.state is RunState.RUNNING:
            machine.pause()
    extra = peak_rss_growth(baseline_rss)
    return records, before, extra


def _reloads(path: Path, count: int) -> list[dict[str, Any]]:
    from ..migration.lazy import lazy_reload
    from ..migration.reload import reload_file

    rows = []
    for prefix in range(1, count + 1):
        row: dict[str, Any] = {"increments": prefix}
        for strategy in ("indexed", "partial"):
            began = time.perf_counter()
            machine, _report = reload_file(str(path), prefix, strategy=strategy)
            row[f"{strategy}_s"] = time.perf_counter() - began
            machine.close()
        machine, loader = lazy_reload(f"chpt:{prefix}:{path}")
        try:
            if machine.state is not RunState.SHUTDOWN:  # a guest that ended runs no more
                machine.run(max_insns=1000)
            stats = loader.stats()
            row["lazy_first_insn_ms"] = stats.first_insn_ms
            row["lazy_setup_ms"] = stats.setup_ms
        finally:
            loader.close()
            machine.close()
        rows.append(row)
    return rows


def _baselines(machine: Machine, directory: Path) -> dict[str, float]:
    """Raw write()/read() of the RAM's bytes in ``directory`` and memcpy of the RAM: MiB/s."""
    mem = machine.ram.mem
    size = len(mem)
    view = memoryview(mem)
    out: dict[str, float] = {"bytes": float(size)}
    with tempfile.NamedTemporaryFile(dir=directory, prefix="pyvmm-bench-raw-") as raw:
        fd = raw.fileno()
        began = time.perf_counter()
        for at in range(0, size, CHUNK):
            chunk = view[at:at + CHUNK]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        out["raw_write_mib_s"] = size / (1 << 20) / max(time.perf_counter() - began, 1e-9)
        buffer = bytearray(CHUNK)
        os.lseek(fd, 0, os.SEEK_SET)
        began = time.perf_counter()
        while os.readv(fd, [buffer]):
            pass
        out["raw_read_mib_s"] = size / (1 << 20) / max(time.perf_counter() - began, 1e-9)
    target = (ctypes.c_char * CHUNK).from_buffer(buffer)
    source = (ctypes.c_char * size).from_buffer(mem)
    began = time.perf_counter()
    for at in range(0, size, CHUNK):
        ctypes.memmove(target, ctypes.addressof(source) + at, min(CHUNK, size - at))
    out["memcpy_mib_s"] = size / (1 << 20) / max(time.perf_counter() - began, 1e-9)
    del source, target  # the exports end before the RAM is unmapped
    return out


def _terminated(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


def run_cell(data: dict[str, Any]) -> dict[str, Any]:
    """Measure the cell ``data`` (:meth:`Cell.to_json`); its record (see docs/bench-schema)."""
    from .host import describe_host

    cell = Cell.from_json(data)
    if threading.current_thread() is threading.main_thread():
        # a runner that gives up on this cell (Ctrl-C) terminates its process: the files go too
        signal.signal(signal.SIGTERM, _terminated)
    record: dict[str, Any] = {"schema": SCHEMA_VERSION, "cell": cell.to_json(),
                              "host": describe_host(cell.directory), "error": None,
                              "checkpoints": [], "reloads": [], "baselines": {}}
    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="pyvmm-bench-", dir=cell.directory))
    path = workdir / "cell.chpt"
    uart = bytearray()

    def keep_uart(data: bytes) -> None:
        if len(uart) < UART_KEPT:
            uart.extend(data[:UART_KEPT - len(uart)])

    try:
        if cell.algorithm.startswith(QEMU_PREFIX):
            from .qemu import run_qemu_cell

            run_qemu_cell(cell, record, workdir)
            return record
        with boot(_guest(cell), ram_size=cell.ram, stdout=keep_uart, stderr=lambda _b: None,
                  uart_sink=keep_uart) as machine:
            checkpoints, _after, extra = _checkpoints(machine, cell, path)
            record["checkpoints"] = checkpoints
            record["extra_memory_bytes"] = extra
            record["baselines"] = _baselines(machine, workdir)
        if cell.reloads:
            record["reloads"] = _reloads(path, len(checkpoints))
        record["file_bytes"] = path.stat().st_size
        record["uart"] = uart.decode(errors="replace")
        if cell.keep_files:
            record["file"] = str(path)
    except PyvmmError as err:
        record["error"] = str(err)
    except Exception as err:  # noqa: BLE001 - a cell's failure is recorded, the run goes on
        record["error"] = f"{type(err).__name__}: {err} ({traceback.format_exc(limit=3)!r})"
    finally:
        if not cell.keep_files:
            shutil.rmtree(workdir, ignore_errors=True)
        record["seconds"] = time.perf_counter() - began
    return record


def main() -> int:
    """``python -m pyvmm.bench.cell``: a cell's JSON on stdin, its record's JSON on stdout."""
    data = json.load(sys.stdin)
    json.dump(run_cell(data), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
