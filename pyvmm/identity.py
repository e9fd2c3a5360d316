"""Who a running machine is: its VM id, and where its checkpoints go when no file is named.

As in the original QEMU fork, the VM id is ``$VM_UID`` if set, else ``$USER.$VM_ID``, else
``$USER.<pid>``.  It is recorded with every increment a machine writes (``vm_name`` in the
increment's statistics, shown by ``checkpoint info``) and names the default destination of
``chpt:`` without a path: ``$XDG_STATE_HOME/pyvmm/checkpoints/<VM id>.chpt``
(``~/.local/state/pyvmm/checkpoints`` when ``XDG_STATE_HOME`` is unset).  That directory is the
user's own: made mode 0700, and refused when it is a symbolic link, another user's, or writable
by others (a world-writable path such as ``/tmp/pyvmm`` could be pre-made by anyone).

Pure functions of the environment given (default: this process's), no module state.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError

#: what a VM id may hold: it becomes a file name
_VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def _user(environ: Mapping[str, str]) -> str:
    user = environ.get("USER")
    if user:
        return user
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def vm_id(environ: Mapping[str, str] | None = None, pid: int | None = None) -> str:
    """The VM id: ``$VM_UID``, else ``$USER.$VM_ID``, else ``$USER.<pid>``.  ConfigError when
    it could not be a file name (1..128 of ``[A-Za-z0-9._@+-]``, not starting with a dot)."""
    env = os.environ if environ is None else environ
    given = env.get("VM_UID")
    if given:
        name, source = given, "$VM_UID"
    else:
        suffix = env.get("VM_ID") or str(os.getpid() if pid is None else pid)
        name, source = f"{_user(env)}.{suffix}", "$USER.$VM_ID" if env.get("VM_ID") else "$USER"
    if not _VM_ID.fullmatch(name):
        raise ConfigError(f"VM id {name!r} (from {source}) must be 1..128 of A-Z a-z 0-9 . _ @ "
                          f"+ -, not starting with a dot or dash")
    return name


def default_checkpoint_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``chpt:`` without a path writes: see the module docstring (not made here)."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME")
    base = Path(state) if state and os.path.isabs(state) else \
        Path(env.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir) / ".local" / "state"
    return base / "pyvmm" / "checkpoints"


def default_checkpoint_path(environ: Mapping[str, str] | None = None,
                            pid: int | None = None) -> Path:
    """The default checkpoint file of this VM, its directory made (0700) and checked first.

    ConfigError when the directory cannot be made, is a symbolic link, belongs to another user
    or is writable by group or others."""
    directory = default_checkpoint_dir(environ)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(directory)
    except OSError as err:
        raise ConfigError(f"cannot make the default checkpoint directory {directory}: "
                          f"{err.strerror}") from err
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"default checkpoint directory {directory} is not a directory (a "
                          f"symbolic link?); name a file: chpt:FILE")
    if info.st_uid != os.getuid():
        raise ConfigError(f"default checkpoint directory {directory} belongs to another user "
                          f"(uid {info.st_uid}); name a file: chpt:FILE")
    if info.st_mode & 0o022:
        raise ConfigError(f"default checkpoint directory {directory} is writable by others "
                          f"(mode {stat.S_IMODE(info.st_mode):o}); make it 0700 or name a file")
    return directory / f"{vm_id(environ, pid)}.chpt"
