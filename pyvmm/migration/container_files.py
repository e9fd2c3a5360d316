"""Checkpoint files on disk: regular files only, the writer lock, exact reads, durable names.

What :mod:`pyvmm.migration.container` and :mod:`pyvmm.migration.chain_file` need of the file
system below the container's bytes.  A path is looked at before it is opened, so that a FIFO or a
device is refused, never opened (opening one may wait or act); the writer lock is an exclusive
``flock`` checked against the path, so that a writer that renamed a new chain over the file
meanwhile is noticed.  Every failure is one :class:`~pyvmm.errors.ConfigError` line (a file that
cannot be used) or :class:`~pyvmm.errors.FormatError` (a file cut short).  No state: any thread.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from pyvmm.errors import ConfigError, FormatError

__all__ = ["file_kind", "flock_current", "lock_target", "open_regular", "pread_exact",
           "sync_directory"]


def pread_exact(fd: int, length: int, offset: int, *, what: str, increment: int | None) -> bytes:
    """``length`` bytes at ``offset`` of ``fd``; FormatError naming ``what`` when the file
    ends first."""
    # callers have bounded `length` by the file size already
    chunks = []
    done = 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            raise FormatError(f"{what} is cut short by the end of the file", offset=offset,
                              increment=increment)
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def sync_directory(path: Path) -> None:
    """Make the directory entry of ``path`` durable (best effort: never raises)."""
    # a new file's directory entry is only durable once the directory itself is synced
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data itself is synced
    finally:
        os.close(dir_fd)


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a non-regular file is, for an error line ("a FIFO", "a directory", ...)."""
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, *, writable: bool) -> int:
    """Open an existing checkpoint file; ConfigError unless it is a regular file.

    The path is looked at before it is opened: opening a FIFO waits for a writer and opening a
    device may act on it, so neither is ever opened.  (A file swapped in between the look and
    the open is caught by fstat, and the non-blocking open cannot wait on it.)"""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise ConfigError(f"no such checkpoint file: {path}") from err
    except OSError as err:
        raise ConfigError(f"cannot open checkpoint file {path}: {err.strerror}") from err
    if not stat.S_ISREG(mode):
        raise ConfigError(f"checkpoint file {path} is {file_kind(mode)}, not a regular file")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ConfigError(f"cannot open checkpoint file {path}: {err.strerror}") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfigError(f"checkpoint file {path} is {file_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd


def lock_target(path: Path) -> int:
    """Take the writer lock of the checkpoint file at ``path`` through a descriptor of its own.

    Held by a writer that will replace the file (a new chain written aside, renamed over it
    once it holds a committed increment), so that no other writer appends to or replaces it
    meanwhile.  Returns the descriptor (closing it releases the lock); ConfigError when the
    file is locked by another writer or is not a regular file."""
    fd = open_regular(path, writable=False)
    try:
        flock_current(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def flock_current(fd: int, path: Path) -> None:
    """Take the writer lock on ``fd`` and check that it still is the file at ``path``: a writer
    that renamed a new chain over it between our open and our lock owns the path now."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        raise ConfigError(f"checkpoint file {path} is open for writing in another process") from err
    held = os.fstat(fd)
    try:
        current = os.stat(path)
    except OSError:
        current = None
    if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
        raise ConfigError(f"checkpoint file {path} was replaced by another writer meanwhile")
