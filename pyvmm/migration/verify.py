"""``pyvmm checkpoint verify``: check a whole checkpoint file without loading a guest.

:func:`verify_file` reads the header, then for every increment its page index, stats and
checksum block (each CRC-protected), its parent link (an incremental's parent is the increment
before it, a full one has none), its stream (starts with the QEMU magic, page record headers
inside data runs as expected, bytes all present) and, when the increment has a checksum block,
every data page's CRC-32C, every stream gap's CRC-32C (section headers, zero records, device
sections) and the RAM digest. Each problem is one line naming the increment and the block, page
(RAM block, page number, GPA) or byte range. Files without checksums get the structural checks
and a note that page data is unchecked.

The structural checks are at least those every reload makes
(:func:`~pyvmm.migration.reload.check_increment_structure`: each stream parsed whole, as a
sequential reload parses it, into a machine that is built but never loaded or run, no page
data read), so a file verify calls OK is one every reload strategy loads.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, FormatError, PyvmmError
from ..machine import Machine
from .checksum_stream import compare_stream, stream_crcs
from .checksum_table import RamCrcTable
from .container import CheckpointFile, IncrementInfo
from .machine_state import MachineStateEntries
from .page_index_format import page_index_records
from .pageio import check_compressed_runs
from .reload import check_increment_structure, new_machine, scratch_entries

Progress = Callable[[int, int, int], None]
"""Called with (bytes checked, bytes to check, increment being checked)."""

_STREAM_START = struct.pack(">II", 0x5145564D, 3)  # QEVM, version 3


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the file: ``increment`` is None for the header."""

    increment: int | None
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class VerifyReport:
    """What :func:`verify_file` found: ``ok`` when no problem."""

    path: str
    format_version: int | None = None
    increments: int = 0
    checksummed: int = 0  # increments with a checksum block
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: good or how many problems, and how much was checked."""
        what = f"{self.increments} increment(s), {self.checksummed} with checksums"
        if self.ok:
            return f"{self.path}: OK ({what}, {self.bytes_checked} stream bytes read)"
        return f"{self.path}: {len(self.problems)} problem(s) ({what})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "ok": self.ok,
            "format_version": self.format_version,
            "increments": self.increments,
            "checksummed": self.checksummed,
            "bytes_checked": self.bytes_checked,
            "problems": [{"increment": p.increment, "message": p.message}
                         for p in self.problems],
            "notes": self.notes,
        }


def verify_file(path: str | os.PathLike[str], progress: Progress | None = None) -> VerifyReport:
    """Check everything in the checkpoint file at ``path`` (see the module docstring).

    Raises ConfigError only when the file cannot be opened; damage is reported, not raised.
    """
    report = VerifyReport(path=os.fspath(path))
    try:
        container = CheckpointFile.open(path)
    except ConfigError:
        raise
    except FormatError as err:
        report.problems.append(Problem(err.increment, f"header: {err}"))
        return report
    with container:
        header = container.header
        report.format_version = header.format_version
        report.increments = len(header.increments)
        if container.rejected_slot:
            # a torn header write (a crash while publishing an increment) or damage: either
            # way the increment it described is lost, so it is a problem, not a note
            report.problems.append(Problem(None, f"header: a header slot was passed over: "
                                                 f"{container.rejected_slot}"))
        if not header.increments:
            report.problems.append(Problem(None, "header: the file holds no increment, so "
                                                 "there is nothing to reload"))
        elif header.increments[0].kind != "full":  # the parent links are checked below
            report.problems.append(Problem(0, "increment 0: header: the first increment is "
                                              "not a full checkpoint"))
        total = sum(info.stream_length for info in header.increments)
        done = 0
        table: RamCrcTable | None = None  # None: not known (no checksums since the last full)
        unchecked = []
        parser = _StreamParser(container)
        try:
            for info in header.increments:
                if progress is not None:
                    progress(done, total, info.index)
                problem, has_checksums, table = _verify_increment(container, info, table)
                if problem is None:
                    problem = parser.check(info)
                done += info.stream_length
                if problem is not None:
                    report.problems.append(problem)
                if has_checksums:
                    report.checksummed += 1
                else:
                    unchecked.append(info.index)
        finally:
            parser.close()
        report.bytes_checked = done
        if progress is not None:
            progress(done, total, len(header.increments))
        if unchecked:
            shown = ", ".join(str(i) for i in unchecked[:8]) + (" ..." if len(unchecked) > 8
                                                                 else "")
            report.notes.append(f"increment(s) {shown} have no checksums: their page data and "
                                f"device sections are unchecked (structure only)")
    return report


class _StreamParser:
    """Parses streams as a reload does, into a machine of the file's layout that is never run
    and whose RAM is never written (made on first use, once per file)."""

    def __init__(self, container: CheckpointFile) -> None:
        self._container = container
        self._machine: Machine | None = None
        self._entries: MachineStateEntries | None = None

    def check(self, info: IncrementInfo) -> Problem | None:
        """The structural checks every reload makes of ``info``; the first problem, or None."""
        container = self._container
        index = info.index
        try:
            if self._entries is None:
                self._machine = new_machine(container.header, str(container.path))
                self._entries = scratch_entries(self._machine)
            records = page_index_records(container.page_index_blob(index), index)
            if records is None:
                raise FormatError("malformed page index", increment=index)
            final = index == len(container.header.increments) - 1
            check_increment_structure(container, info, self._entries, records, final=final)
        except (FormatError, ConfigError) as err:
            text = err.reason + _where(err.offset) if isinstance(err, FormatError) else str(err)
            return Problem(index, f"increment {index}: stream: {text}")
        return None

    def close(self) -> None:
        if self._machine is not None:
            self._machine.close()


def _verify_increment(container: CheckpointFile, info: IncrementInfo,
                      table: RamCrcTable | None
                      ) -> tuple[Problem | None, bool, RamCrcTable | None]:
    """(first problem or None, whether it has checksums, the RAM table after it)."""
    index = info.index
    header = container.header
    has_checksums = bool(info.checksum_length)

    def problem(what: str, err: PyvmmError | str) -> tuple[Problem, bool, None]:
        text = err.reason + _where(err.offset) if isinstance(err, FormatError) else str(err)
        return Problem(index, f"increment {index}: {what}: {text}"), has_checksums, None

    expected_parent = -1 if info.kind == "full" else index - 1
    if info.parent != expected_parent:
        return problem("header", f"parent is {info.parent}, expected {expected_parent}")
    try:
        runs = container.page_index(index)
    except FormatError as err:
        return problem("page index", err)
    try:
        container.stats(index)
    except FormatError as err:
        return problem("stats", err)
    try:
        block = container.checksums(index, runs)
    except FormatError as err:
        return problem("checksum block", err)
    start = os.pread(container.fd, len(_STREAM_START), info.stream_offset)
    if info.stream_length < len(_STREAM_START) or start != _STREAM_START:
        return problem("stream", f"does not start with the QEMU v3 stream magic (offset "
                                 f"0x{info.stream_offset:x})")
    try:
        crcs = stream_crcs(container.fd, info, runs, page_size=header.page_size, pages=True)
        check_compressed_runs(container.fd, [(r.first_page, r.npages, r.data_offset, r.zero,
                                              r.compressed) for r in runs],
                              info.stream_offset + info.stream_length)
    except FormatError as err:
        return problem("stream", err)
    if block is None:
        return None, False, None
    mismatches = compare_stream(container.fd, info, runs, header.ram_blocks, block, crcs)
    if mismatches:
        return problem("stream", mismatches[0])
    if info.kind == "full":
        try:
            table = RamCrcTable(header.ram_blocks, header.page_size)
        except FormatError as err:
            return problem("checksum block", err)
    if table is not None:
        table.apply(info.kind, runs, block.page_crcs, index)
        if table.digest() != block.ram_digest:
            return problem("checksum block", "the RAM digest does not match the page "
                                             "checksums of the chain")
    return None, True, table


def _where(offset: int | None) -> str:
    return "" if offset is None else f" (offset 0x{offset:x})"
