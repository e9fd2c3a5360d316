"""Squash: fold the first N increments of a checkpoint file into one full checkpoint.

As in the original QEMU fork (``-incoming chpt:squash:N:FILE``), the chain is reloaded into a
machine that never runs, and that machine is checkpointed (stop-and-copy, full) into a new file,
``FILE_squashed`` by default.  The new file is written under a temporary name in the same
directory and renamed into place only when complete, so an interrupted squash never leaves a
half file behind, and the output may be the input itself (squash in place).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from ..errors import ConfigError
from .checkpoint import CAPABILITIES, Checkpointer, CheckpointStats
from .container import CheckpointFile
from .defaults import DEFAULT_STRATEGY
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
           progress: Progress | None = None) -> SquashResult:
    """Write the state of ``path``'s first ``count`` (default all) increments as one full
    checkpoint into ``output`` (default ``FILE_squashed``; may be ``path`` itself).

    The output keeps the input's capabilities but live and cow (how pages are saved, not what),
    so a run can grow a new chain on it.  Raises
    FormatError for a damaged input (nothing is written then) and ConfigError for a bad count.
    ``progress(done, total)`` gets bytes of the input read, then of the output written.
    """
    started = time.perf_counter()
    source = Path(path)
    target = default_output(source) if output is None else Path(output)
    with CheckpointFile.open(source) as container:
        # the machine never runs: live or cow saving has nothing to win here
        capabilities = [c for c in container.header.capabilities
                        if c in CAPABILITIES and c not in ("live", "cow")]
    if target.is_dir():
        raise ConfigError(f"squash output {target} is a directory")
    machine, report = reload_file(str(source), count, strategy=strategy, progress=progress)
    temporary = target.with_name(f".{target.name}.squash-{os.getpid()}")
    try:
        with machine:
            checkpointer = Checkpointer(machine, temporary, durable=durable,
                                        capabilities=capabilities)
            try:
                stats = checkpointer.checkpoint()
            finally:
                checkpointer.close()
        if progress is not None:
            progress(stats.bytes_written, stats.bytes_written)
        os.replace(temporary, target)
        if durable:
            _sync_directory(target.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return SquashResult(target, report.increments, report, stats,
                        time.perf_counter() - started)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory if str(directory) else ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
