"""Where a command's ``-o OUT`` goes, without ever destroying what OUT was.

* ``-``, a FIFO, a character device, or a ``/dev/fd``-style name for an open descriptor: written
  in place, sequentially (``-o /dev/stdout | ...`` works); such a file is never created,
  renamed over or unlinked.
* a regular file, or a name that does not exist yet: written aside, under ``.NAME.part-PID`` in
  the same directory, and renamed over OUT only when complete; an interrupted or failed write
  leaves OUT as it was.
* anything else (a directory, a block device, a socket): ConfigError, nothing touched.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError

_FD_DIRS = ("/dev/fd/", "/proc/self/fd/", "/dev/stdout", "/dev/stderr")


def is_stream(output: str) -> bool:
    """Whether ``output`` is written in place and sequentially (see the module docstring);
    ConfigError when it can be written neither way."""
    if output == "-" or output.startswith(_FD_DIRS):
        return True
    try:
        mode = os.stat(output).st_mode
    except FileNotFoundError:
        return False
    except OSError as err:
        raise ConfigError(f"cannot write {output}: {err.strerror}") from err
    if stat.S_ISREG(mode):
        return False
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return True
    kind = ("a directory" if stat.S_ISDIR(mode) else
            "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    raise ConfigError(f"cannot write {output}: it is {kind} (write to a regular file, a FIFO, "
                      f"a character device or -)")


@contextmanager
def output_fd(output: str) -> Iterator[int]:
    """A descriptor to write ``output`` through; see the module docstring.  A regular file
    appears (or is replaced) only if the block ends without an exception."""
    if is_stream(output):
        if output == "-":
            sys.stdout.flush()
            yield sys.stdout.fileno()
            return
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as err:
            raise ConfigError(f"cannot write {output}: {err.strerror}") from err
        try:
            yield fd
        finally:
            os.close(fd)
        return
    target = Path(output)
    part = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ConfigError(f"cannot write {output}: {err.strerror}") from err
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
