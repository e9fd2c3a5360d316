"""A commit interrupted between publishing its header and recording it never damages the file.

The writer's in-memory header is what its abort cuts back to; a Ctrl-C or an I/O error that
lands after the new header is on disk but before the writer knows must neither cut the file
below that header nor make the next header go over the only good slot.  The reader, for its
part, takes the newest slot whose data is all there.
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest

from pyvmm.errors import CheckpointWarning
from pyvmm.interrupts import signals_held
from pyvmm.migration import container
from pyvmm.migration.container import CheckpointFile, load_spec
from tests.property.test_container import (
    append_fake,
    assert_increments_intact,
    new_file,
)

SPEC = load_spec()


def _reopen(path: Path) -> CheckpointFile:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # a clean file: no slot passed over
        return CheckpointFile.open(path)


def test_a_ctrl_c_right_after_the_header_write_keeps_the_increment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT arrives as the header's bytes land: the increment is committed, then the
    KeyboardInterrupt comes, and the file holds every increment (before the fix the abort cut
    the file below the header just published: 'FILE is truncated')."""
    path = tmp_path / "c.chpt"
    real_pwrite = container._pwrite_all

    def pwrite_then_sigint(fd: int, data: bytes, offset: int) -> None:
        real_pwrite(fd, data, offset)
        if offset in (0, SPEC.SLOT_SIZE) and armed:
            os.kill(os.getpid(), signal.SIGINT)

    armed = False
    with new_file(path, 2) as cf:
        monkeypatch.setattr(container, "_pwrite_all", pwrite_then_sigint)
        armed = True
        with pytest.raises(KeyboardInterrupt):
            append_fake(cf)
        armed = False
        assert len(cf.header.increments) == 3  # the writer knows what it published
        append_fake(cf)  # and goes on over the older slot
    with _reopen(path) as cf:
        assert len(cf.header.increments) == 4
        assert_increments_intact(cf)


def test_an_io_error_after_the_header_write_resyncs_with_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header's fsync fails after its write landed: the writer takes the slot on disk as
    the state in force, so nothing is cut from under it and the next commit goes over the
    older slot, not the one that holds the newest good header."""
    path = tmp_path / "e.chpt"
    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the first syncs the data, the second the header
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    with new_file(path, 1) as cf:
        monkeypatch.setattr(container.os, "fsync", failing_fsync)
        with pytest.raises(OSError):
            append_fake(cf)
        monkeypatch.setattr(container.os, "fsync", real_fsync)
        assert len(cf.header.increments) == 2  # what the disk says
        append_fake(cf)
    with _reopen(path) as cf:
        assert len(cf.header.increments) == 3
        assert_increments_intact(cf)


def test_an_abort_never_cuts_below_a_header_on_disk(tmp_path: Path) -> None:
    """A writer whose record is stale (as after an unrecorded header write) aborts: the cut
    stops at the end of the data the newest header on disk points to."""
    path = tmp_path / "a.chpt"
    new_file(path, 2).close()
    with CheckpointFile.open(path, writable=True) as writer_view:
        full_size = os.path.getsize(path)
        # another view of the file commits behind this one's back
        with CheckpointFile.open(path, writable=True, lock=False) as other:
            append_fake(other)
            grown = os.path.getsize(path)
        assert grown > full_size
        writer = writer_view.begin_increment("incremental")  # adopts the header on disk
        assert writer.index == 3
        writer.abort()
        assert os.path.getsize(path) == grown
    with _reopen(path) as cf:
        assert len(cf.header.increments) == 3
        assert_increments_intact(cf)


def test_the_reader_falls_back_to_the_newest_slot_whose_data_is_all_there(
    tmp_path: Path,
) -> None:
    """A file cut below its newest header (the 7-in-16 case of issue 14): the older slot,
    with every increment before, is loaded, and a warning names the slot passed over."""
    path = tmp_path / "f.chpt"
    with new_file(path, 3) as cf:
        before_last = cf.header.increments[1].end
    os.truncate(path, before_last + 10)
    with pytest.warns(CheckpointWarning, match=r"slot \d \(sequence \d+, 3 increments\) "
                                               r"points past the end of the file"):
        cf = CheckpointFile.open(path)
    with cf:
        assert len(cf.header.increments) == 2
        assert_increments_intact(cf)
    # the next writer cuts the remains off and appends after the second increment
    with pytest.warns(CheckpointWarning), CheckpointFile.open(path, writable=True) as cf:
        append_fake(cf)
    with _reopen(path) as cf:
        assert len(cf.header.increments) == 3
        assert_increments_intact(cf)


def test_signals_held_delivers_what_it_held_in_order() -> None:
    """The helper itself: SIGINT inside the block raises only once the block is done."""
    done: list[str] = []
    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt), signals_held(on_signal=seen.append):
        os.kill(os.getpid(), signal.SIGINT)
        done.append("after the signal")  # not cut short
    assert done == ["after the signal"] and seen == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
