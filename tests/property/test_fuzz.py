"""Fuzz targets for the container parser and the stream reader (issue 14): whatever the bytes,
only the project's errors come out, the work is bounded (no hang) and so is the memory.

The targets live in :func:`container_target` and :func:`stream_target` so that
``scripts/fuzz-atheris.py`` runs the very same code for long, coverage-guided runs.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.errors import PyvmmError
from pyvmm.machine import Machine
from pyvmm.migration.container import CheckpointFile, load_spec
from pyvmm.migration.machine_state import machine_save_state
from pyvmm.migration.stream import QEMUFile
from tests.peak_memory import vm_kib

SPEC = load_spec()
#: Work and memory one input may take (a parser that sized anything by a length it read, or
#: looped on one, would pass them).
TIME_BOUND = 5.0
PEAK_BOUND = 128 << 20


def container_target(data: bytes, folder: Path) -> None:
    """``data`` as a checkpoint file: open it and read every increment's page index, stats and
    checksums. Only PyvmmError may come out."""
    path = folder / "fuzz.chpt"
    path.write_bytes(data)
    try:
        with CheckpointFile.open(path) as container:
            for info in container.header.increments:
                for read in (container.page_index, container.stats, container.checksums):
                    try:
                        read(info.index)
                    except PyvmmError:
                        pass
    except PyvmmError:
        pass


def stream_target(data: bytes, machine: Machine) -> None:
    """``data`` as an increment's QEMU stream, loaded into ``machine``'s save-state entries
    (RAM records, sections, device fields, the VM description). Only PyvmmError may come
    out."""
    entries = machine_save_state(machine, with_linux=True)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        stream = QEMUFile.for_reading(f.fileno(), 0, len(data))
        try:
            entries.save_state.load(stream)
        except PyvmmError:
            pass


def _bounded(run: object) -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS
    before = vm_kib("VmRSS")
    started = time.monotonic()
    run()  # type: ignore[operator]
    assert time.monotonic() - started < TIME_BOUND
    assert (vm_kib("VmHWM") - before) << 10 < PEAK_BOUND


def _slot(body: bytes, version: int, sequence: int) -> bytes:
    """A header slot around ``body`` with a valid CRC: hostile content a CRC cannot catch."""
    frame = struct.pack(">8sIIIQ", SPEC.MAGIC, SPEC.BYTE_ORDER_MARK, version,
                        len(body) + SPEC.SLOT_OVERHEAD, sequence) + body
    return (frame + struct.pack(">I", SPEC.crc32(frame))).ljust(SPEC.SLOT_SIZE, b"\0")


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_as_a_checkpoint_file(tmp_path: Path, data: bytes) -> None:
    _bounded(lambda: container_target(data, tmp_path))


@FUZZ
@given(body=st.binary(max_size=600), version=st.integers(1, 3), sequence=st.integers(0, 9),
       tail=st.binary(max_size=4096), hole=st.integers(0, 1 << 40))
def test_hostile_header_bodies_with_valid_crcs(tmp_path: Path, body: bytes, version: int,
                                               sequence: int, tail: bytes, hole: int) -> None:
    """A structured start (magic, version, a valid CRC) so the fuzzing reaches the body's
    fields: sizes, offsets and counts that lie; the file may be sparse up to a TiB."""
    data = _slot(body, version, sequence) + bytes(SPEC.SLOT_SIZE) + tail

    def run() -> None:
        container_target(data, tmp_path)
        path = tmp_path / "fuzz.chpt"
        os.truncate(path, len(data) + hole)  # a hole: lengths past the data read zeros
        container_target_path(path)

    _bounded(run)


def container_target_path(path: Path) -> None:
    try:
        with CheckpointFile.open(path) as container:
            for info in container.header.increments:
                try:
                    container.page_index(info.index)
                    container.checksums(info.index)
                    container.stats(info.index)
                except PyvmmError:
                    pass
    except PyvmmError:
        pass


MAGIC = struct.pack(">II", 0x5145564D, 3)


@FUZZ
@given(tail=st.binary(max_size=4096), structured=st.booleans())
def test_random_streams_into_a_machine(tail: bytes, structured: bool) -> None:
    """Garbage after the QEMU magic (or a made-up START(ram) section) through the section,
    RAM record and vmstate parsers of a real machine's entries."""
    head = MAGIC + b"\x07" + struct.pack(">I", 10) + b"pyvmm-virt"
    if structured:
        head += b"\x01" + struct.pack(">I", 0) + b"\x03ram" + struct.pack(">II", 0, 4)
    with Machine(1 << 20) as machine:
        _bounded(lambda: stream_target(head + tail, machine))
