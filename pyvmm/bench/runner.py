"""Running a bench matrix: every cell through an executor, progress shown, results kept.

Each cell runs in a fresh Python process (:func:`pyvmm.bench.cell.run_cell` through a
``concurrent.futures`` process pool of one worker that serves one task each): its RSS, its
threads and anything a plug-in leaves behind end with it, and one cell at a time keeps the
timings honest on a quiet machine.  The results file is rewritten (aside, then renamed) after
every cell, so an interrupted run keeps every finished cell.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError
from .cell import SCHEMA_VERSION, run_cell
from .host import describe_host
from .spec import Cell

Record = dict[str, Any]
DASK_CONNECT_TIMEOUT = 10


def local_executor() -> concurrent.futures.Executor:
    """One worker process, a fresh one per cell (spawned: nothing inherited from this one)."""
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)


class ProgressLine:
    """``[k/N] ETA`` and the current cell: rewritten in place on a terminal, a line per cell
    elsewhere (a log, a pipe)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, quiet: bool = False) -> None:
        self.total = total
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.done = 0

    def _eta(self) -> str:
        if not self.done:
            return "ETA --:--"
        left = (time.monotonic() - self.started) / self.done * (self.total - self.done)
        return f"ETA {int(left) // 60:02d}:{int(left) % 60:02d}"

    def starting(self, cell: Cell) -> None:
        if self.quiet or not self.tty:
            return
        text = f"[{self.done + 1}/{self.total}] {self._eta()}  {describe(cell)}"
        self.stream.write("\r\x1b[K" + text[:200])
        self.stream.flush()

    def finished(self, cell: Cell, record: Record) -> None:
        self.done += 1
        if self.quiet:
            return
        outcome = f"error: {record['error']}" if record.get("error") else \
            f"{record.get('seconds', 0.0):.1f} s"
        line = f"pyvmm bench: [{self.done}/{self.total}] {describe(cell)}: {outcome}"
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + "\n")
        self.stream.flush()


def describe(cell: Cell) -> str:
    return (f"{cell.workload} | {cell.algorithm} | RAM {cell.ram >> 20} MiB | "
            f"rep {cell.repetition}")


def new_results(argv: Sequence[str], directory: str) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "command": list(argv),
            "started": datetime.datetime.now(datetime.UTC).isoformat(),
            "host": describe_host(directory), "records": []}


def save_results(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` to ``path``: aside first, then renamed into place (never half a file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def run_matrix(cells: Sequence[Cell], results: dict[str, Any], output: Path, *,
               executor: concurrent.futures.Executor | None = None,
               progress: ProgressLine | None = None,
               on_record: Callable[[Record], None] | None = None) -> bool:
    """Measure ``cells`` one at a time, appending each record to ``results`` and saving it to
    ``output`` as it comes; True when every cell ran, False when interrupted (Ctrl-C,
    SIGTERM): the finished cells are saved then too."""
    pool = executor or local_executor()
    progress = progress or ProgressLine(len(cells), quiet=True)
    try:
        for cell in cells:
            progress.starting(cell)
            future = pool.submit(run_cell, cell.to_json())
            try:
                record = future.result()
            except concurrent.futures.process.BrokenProcessPool as err:
                record = {"schema": SCHEMA_VERSION, "cell": cell.to_json(), "error":
                          f"the cell's process died: {err}", "checkpoints": [],
                          "reloads": [], "baselines": {}, "host": results.get("host", {})}
                pool.shutdown(cancel_futures=True)
                pool = local_executor()
            results["records"].append(record)
            save_results(results, output)
            progress.finished(cell, record)
            if on_record is not None:
                on_record(record)
        return True
    except KeyboardInterrupt:
        _stop_workers(pool)
        save_results(results, output)
        return False
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def dask_client(address: str) -> Any:
    """A client of the Dask scheduler at ``address``, with at least one worker (ConfigError,
    one line, when Dask is missing or the scheduler cannot be reached)."""
    try:
        from distributed import Client
    except ImportError as err:
        raise ConfigError("--dask needs Dask distributed: pip install 'pyvmm[dask]'") from err
    try:
        client = Client(address, timeout=DASK_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as err:
        raise ConfigError(f"--dask {address}: cannot reach the scheduler: {err}") from err
    if not client.scheduler_info()["workers"]:
        client.close()
        raise ConfigError(f"--dask {address}: the cluster has no worker")
    return client


def run_matrix_dask(cells: Sequence[Cell], results: dict[str, Any], output: Path,
                    client: Any, *, progress: ProgressLine | None = None) -> bool:
    """:func:`run_matrix` on an existing Dask distributed cluster (``client``, see
    :func:`dask_client`): one cell per worker at a time (a cell's timings want its worker to
    itself), each record naming the host that measured it; saved as each cell ends."""
    from distributed import as_completed

    progress = progress or ProgressLine(len(cells), quiet=True)
    pending = list(cells)
    running: dict[Any, tuple[Cell, str]] = {}
    try:
        free = list(client.scheduler_info()["workers"])

        def submit() -> list[Any]:
            started = []
            while pending and free:
                worker, cell = free.pop(), pending.pop(0)
                future = client.submit(run_cell, cell.to_json(), pure=False, workers=[worker],
                                       allow_other_workers=False)
                running[future] = (cell, worker)
                started.append(future)
            return started

        completed = as_completed(submit())
        for future in completed:
            cell, worker = running.pop(future)
            try:
                record = future.result()
            except Exception as err:  # noqa: BLE001 - a lost worker is one failed cell
                record = {"schema": SCHEMA_VERSION, "cell": cell.to_json(), "error":
                          f"the cell failed on {worker}: {err}", "checkpoints": [],
                          "reloads": [], "baselines": {}, "host": {}}
            results["records"].append(record)
            save_results(results, output)
            progress.finished(cell, record)
            free.append(worker)
            for started in submit():
                completed.add(started)
        return True
    except KeyboardInterrupt:
        for future in running:
            future.cancel()
        save_results(results, output)
        return False
    finally:
        client.close()


def _stop_workers(pool: concurrent.futures.Executor) -> None:
    """The cell being measured is dropped: its worker process goes now, not at its end."""
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        process.terminate()
