"""Squash: fold the first N increments of a checkpoint file into one full checkpoint.

As in the original QEMU fork (``-incoming chpt:squash:N:FILE``), the chain is reloaded into a
machine that never runs, and that machine is checkpointed (stop-and-copy, full) into a new file,
``FILE_squashed`` by default.  The new file is written aside and renamed into place only when
complete (see :mod:`pyvmm.migration.chain_file`), so an interrupted squash never leaves a half
file behind nor destroys the old one, and the output may be the input itself (squash in place).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

from ..output_file import is_stream, output_fd
from .chain_file import check_target
from .checkpoint import Checkpointer, CheckpointStats
from .container import CheckpointFile
from .defaults import CAPABILITIES, DEFAULT_STRATEGY
from .reload import Progress, ReloadReport, reload_file


@dataclasses.dataclass(frozen=True)
class SquashResult:
    output: Path
    increments: int
    reload: ReloadReport
    stats: CheckpointStats
    seconds: float


def default_output(path: str | Path) -> Path:
    """Where squashing ``path`` writes by default: ``FILE_squashed`` (the original's name)."""
    return Path(f"{path}_squashed")


def squash(path: str | Path, count: int | None = None, output: str | Path | None = None, *,
           strategy: str = DEFAULT_STRATEGY, durable: bool = True,
           progress: Progress | None = None, encoder: str = "plain",
           compress_level: int | None = None) -> SquashResult:
    """Write the state of ``path``'s first ``count`` (default all) increments as one full
    checkpoint into ``output`` (default ``FILE_squashed``; may be ``path`` itself).

    A regular ``output`` is replaced only once the new file is complete (it is written aside);
    a FIFO, a character device or ``-`` gets the finished file's bytes in order (written to a
    temporary file first: a container is not written front to back); a directory, a block
    device or a socket is refused before anything is read.  The output keeps the input's
    capabilities but live and cow (how pages are saved, not what), so a run can grow a new
    chain on it.  Its pages are written by ``encoder`` (default ``plain``: a file QEMU's
    analyzer reads whatever the input's increments were).  Raises FormatError for a damaged input (nothing is written then) and
    ConfigError for a bad count or output.  ``progress(done, total)`` gets bytes of the input
    read, then of the output written.
    """
    started = time.perf_counter()
    source = Path(path)
    target = str(default_output(source) if output is None else output)
    stream = is_stream(target)
    if not stream:
        check_target(Path(target), append=False)  # before the (long) reload, not after it
    with CheckpointFile.open(source) as container:
        # the machine never runs: live or cow saving has nothing to win here
        capabilities = [c for c in container.header.capabilities
                        if c in CAPABILITIES and c not in ("live", "cow")]
    machine, report = reload_file(str(source), count, strategy=strategy, progress=progress)
    with machine, tempfile.TemporaryDirectory(prefix="pyvmm-squash-") as scratch:
        written = Path(scratch) / "squashed.chpt" if stream else Path(target)
        checkpointer = Checkpointer(machine, written, durable=durable and not stream,
                                    capabilities=capabilities, encoder=encoder,
                                    compress_level=compress_level)
        try:
            stats = checkpointer.checkpoint()
        finally:
            checkpointer.close()
        if stream:
            with open(written, "rb") as finished, output_fd(target) as out:
                _copy_stream(finished.fileno(), out)
    if progress is not None:
        progress(stats.bytes_written, stats.bytes_written)
    return SquashResult(Path(target), report.increments, report, stats,
                        time.perf_counter() - started)


def _copy_stream(source: int, out: int) -> None:
    while chunk := os.read(source, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]
