"""The file a checkpointer writes its chain into: claimed at start, never destroyed before its
successor is safe.

A :class:`ChainFile` owns one target path from construction to :meth:`ChainFile.close`:

* the target is checked before the guest runs (a directory, a FIFO or device, a missing parent
  directory, no permission, another writer's lock: one ConfigError line);
* the writer lock (``flock`` on the file at the path) is taken at once and held throughout, so
  a second writer is refused at its start, not after its run;
* a new chain (a new file, an existing file that is not being appended to, or the
  ``max_increments`` restart) is written aside, under ``.NAME.new-PID`` in the same directory,
  and renamed over the path only once it holds a committed increment.  Until then the old file
  stays whole and locked: a kill, a full disk or a failed first checkpoint leaves it as it was
  (and leaves no empty file where there was none);
* asides left by a killed writer are removed when the next writer claims the path.

Used by one thread at a time (the checkpointer's lock).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .container import CheckpointFile
from .container_files import file_kind, lock_target

ASIDE_TAGS = ("new", "restart")  # "restart": the name pyvmm 0.x gave a restarted chain's file


def check_target(path: Path, *, append: bool) -> None:
    """ConfigError, naming what is wrong, unless a checkpoint chain can be written at ``path``
    (appended to, when ``append`` and the file exists)."""
    parent = path.parent
    try:
        parent_mode = os.stat(parent).st_mode
    except FileNotFoundError as err:
        raise ConfigError(f"cannot write checkpoint file {path}: directory {parent} does not "
                          f"exist") from err
    except OSError as err:
        raise ConfigError(f"cannot write checkpoint file {path}: {parent}: {err.strerror}") \
            from err
    if not stat.S_ISDIR(parent_mode):
        raise ConfigError(f"cannot write checkpoint file {path}: {parent} is not a directory")
    try:
        mode: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise ConfigError(f"cannot write checkpoint file {path}: {err.strerror}") from err
    if mode is not None and not stat.S_ISREG(mode):
        raise ConfigError(f"checkpoint file {path} is {file_kind(mode)}, not a regular file: "
                          f"checkpoints are written to regular files only")
    if append and mode is not None:
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"cannot write checkpoint file {path}: permission denied")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write checkpoint file {path}: no permission to create files "
                          f"in {parent}")


class ChainFile:
    """One checkpointer's claim on its target path; see the module docstring.

    ``create(path)`` makes a new, empty container with the machine's layout and capabilities;
    ``check(file)`` checks that an existing one can take this machine's increments (ConfigError
    naming the mismatch)."""

    def __init__(self, path: Path, *, append: bool, durable: bool,
                 create: Callable[[Path], CheckpointFile],
                 check: Callable[[CheckpointFile], None]) -> None:
        check_target(path, append=append)
        self.path = path
        self._durable = durable
        self._create = create
        self._check = check
        self._file: CheckpointFile | None = None
        #: a descriptor holding the lock of the file at path while a successor is written aside
        self._guard: int | None = None
        self._aside: Path | None = None
        #: whether path is a chain this writer may append to (else the next increment starts a
        #: new chain, written aside)
        exists = os.path.exists(path)
        self._ours = append and exists
        if exists:
            if append:
                self._file = self._open()
            else:
                self._guard = lock_target(path)
        self._remove_leftovers()

    def _open(self) -> CheckpointFile:
        file = CheckpointFile.open(self.path, writable=True, lock=self._guard is None)
        try:
            self._check(file)
        except BaseException:
            file.close()
            raise
        file.durable = self._durable
        return file

    def _new(self, path: Path) -> CheckpointFile:
        file = self._create(path)
        file.durable = self._durable
        return file

    def _remove_leftovers(self) -> None:
        """Remove asides of this path left by killed writers; ConfigError when a live one is
        still writing the first chain of a path that does not exist yet (it holds no lock on
        the path, so the aside is what says it is there)."""
        directory = self.path.parent
        prefixes = tuple(f".{self.path.name}.{tag}-" for tag in ASIDE_TAGS)
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            pid_text = name.rsplit("-", 1)[-1]
            if not name.startswith(prefixes) or not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == os.getpid():
                continue
            locked = self._guard is not None or self._file is not None
            if not locked and _alive(pid):
                raise ConfigError(f"checkpoint file {self.path} is being written by another "
                                  f"process (pid {pid}, into {directory / name})")
            # with the path's lock held, no other process can be writing an aside of it
            try:
                os.unlink(directory / name)
            except OSError:
                pass  # not ours to remove (permissions): harmless beside the chain

    @property
    def aside(self) -> Path | None:
        """The file a new chain is being written into before it replaces path, if any."""
        return self._aside

    def container(self, max_increments: int | None = None) -> CheckpointFile:
        """The file the next increment goes into: the chain at path, or a new one written aside
        (path is not this writer's chain yet, or holds ``max_increments`` already)."""
        if self._file is None:
            if not self._ours:
                return self._start_aside()
            self._file = self._open()
        if max_increments is not None and len(self._file.header.increments) >= max_increments:
            if self._guard is None:
                self._guard = os.dup(self._file.fd)  # the same open file: the lock stays held
            self._file.close()
            self._file = None
            return self._start_aside()
        return self._file

    def _start_aside(self) -> CheckpointFile:
        self._aside = self.path.with_name(f".{self.path.name}.new-{os.getpid()}")
        self._file = self._new(self._aside)
        return self._file

    def committed(self) -> None:
        """An increment was committed: a chain written aside now replaces the file at path (or
        takes the path, if there was no file)."""
        if self._aside is None:
            return
        assert self._file is not None
        self._file.move_to(self.path, replace=self._guard is not None)
        self._aside = None
        self._ours = True
        self._release_guard()

    def failed(self) -> None:
        """The increment was not committed: a chain written aside is dropped (the file at path
        is as it was)."""
        aside, self._aside = self._aside, None
        if aside is None:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        aside.unlink(missing_ok=True)

    def _release_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            os.close(guard)

    def close(self) -> None:
        """Release the path; an uncommitted aside is removed (the file it would have replaced,
        or the absence of one, stays as it was)."""
        try:
            self.failed()
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            self._release_guard()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
