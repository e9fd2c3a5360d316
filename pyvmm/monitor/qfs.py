"""QFS: the VM's control filesystem, mounted with FUSE (``run --qfs [DIR]``).

Any shell drives the running machine with plain file operations: ``echo now >
checkpoints/trigger; cat checkpoints/wait_until_finished``, ``touch
checkpoints/reload/increment_02``, ``cat control/status``.  What each file does is
:mod:`pyvmm.monitor.qfs_tree`; this module mounts it with ``mfusepy`` over libfuse 3 (``pip
install 'pyvmm[qfs]'``; Debian: ``fuse3``) and keeps the mount's life to the run's:

* the mount point must be a directory of the invoking user, empty (made 0700 when missing);
  a stale mount a killed pyvmm left there (ENOTCONN) is unmounted first;
* the mount is the user's only (no ``allow_other``; ``default_permissions``: the kernel checks
  the files' modes);
* it is unmounted when the run ends, however it ends (exit, error, SIGTERM, SIGINT).

libfuse's loop installs its own SIGINT/SIGTERM/SIGHUP handlers (they would unmount QFS and
leave pyvmm running); the ones pyvmm had are put back once libfuse has started (its ``init``
callback), so Ctrl-C and SIGTERM stop pyvmm as before, which then unmounts.

A write QFS refuses answers EINVAL and logs the reason on stderr (``pyvmm: qfs: ...``); an
unknown path is ENOENT; removing or renaming anything is EPERM.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PyvmmError
from ..threads import NamedThread
from .qfs_tree import MAX_WRITE, Node, QfsTree

if TYPE_CHECKING:
    from .controller import VmController

MOUNT_TIMEOUT = 10.0
FSNAME = "pyvmm-qfs"
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE)


def default_mountpoint() -> Path:
    """This VM's default mount point: beside its default checkpoint file, named by its VM id
    (``~/.local/state/pyvmm/qfs/VMID``)."""
    from ..identity import default_checkpoint_dir, vm_id

    return default_checkpoint_dir().parent / "qfs" / vm_id()


def _fuse() -> Any:
    if not os.path.exists("/dev/fuse"):
        raise ConfigError("--qfs needs /dev/fuse (the fuse kernel module)")
    if shutil.which("fusermount3") is None:
        raise ConfigError("--qfs needs fusermount3 (Debian: apt-get install fuse3)")
    try:
        import mfusepy
    except ImportError as err:
        raise ConfigError("--qfs needs mfusepy: pip install 'pyvmm[qfs]'") from err
    except OSError as err:  # libfuse itself missing
        raise ConfigError(f"--qfs needs libfuse 3 (Debian: apt-get install fuse3): {err}") from err
    return mfusepy


def _unmount(path: Path, lazy: bool = False) -> bool:
    """``fusermount3 -u`` (``-z``: lazily, for a stale or busy mount); True when it went."""
    result = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), str(path)],
                            capture_output=True, text=True, check=False)
    return result.returncode == 0


def _stale(path: Path) -> bool:
    """Whether ``path`` is a mount whose server is gone (a QFS whose pyvmm was killed): its
    directory cannot be read (ENOTCONN), though a stat may still come from the kernel's cache."""
    try:
        os.listdir(path)
    except OSError as err:
        return err.errno == errno.ENOTCONN
    return False


def prepare_mountpoint(path: Path) -> Path:
    """``path`` ready to mount on: made (0700) if missing, a stale mount cleaned; ConfigError
    (one line) for one that is not a directory, not the user's, not empty, or mounted."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        try:
            path.mkdir(mode=0o700, parents=True)
        except OSError as err:
            raise ConfigError(f"--qfs {path}: cannot make it: {err.strerror}") from err
        return path
    except OSError as err:
        if err.errno != errno.ENOTCONN:
            raise ConfigError(f"--qfs {path}: {err.strerror}") from err
        info = None
    if info is None or (os.path.ismount(path) and _stale(path)):
        # a QFS whose pyvmm was killed: its mount stays until unmounted
        if not _unmount(path, lazy=True):
            raise ConfigError(f"--qfs {path}: a stale mount is there and cannot be unmounted "
                              f"(fusermount3 -u -z {path})")
        print(f"pyvmm: qfs: cleaned a stale mount at {path}", file=sys.stderr, flush=True)
        info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"--qfs {path}: not a directory")
    if info.st_uid != os.getuid():
        raise ConfigError(f"--qfs {path}: belongs to another user (uid {info.st_uid})")
    if os.path.ismount(path):
        raise ConfigError(f"--qfs {path}: something is mounted there already")
    if any(os.scandir(path)):
        raise ConfigError(f"--qfs {path}: not empty")
    return path


class _Handle:
    __slots__ = ("content", "node", "path")

    def __init__(self, path: str, node: Node, content: bytes | None) -> None:
        self.path = path
        self.node = node
        self.content = content  # made at open; a blocking file's at its first read


def operations(tree: QfsTree, initialized: threading.Event) -> Any:
    """The FUSE operations of ``tree`` (an ``mfusepy.Operations``)."""
    mfusepy = _fuse()
    FuseOSError = mfusepy.FuseOSError

    def log(path: str, reason: str) -> None:
        print(f"pyvmm: qfs: {path}: {reason}", file=sys.stderr, flush=True)

    class Operations(mfusepy.Operations):  # type: ignore[misc,name-defined]
        use_ns = True

        def __init__(self) -> None:
            self._handles: dict[int, _Handle] = {}
            self._next_fh = 1
            self._lock = threading.Lock()
            self._uid, self._gid = os.getuid(), os.getgid()
            self._started = time.time_ns()

        def init(self, path: str) -> None:
            initialized.set()  # libfuse's loop runs: its signal handlers are in place

        def _node(self, path: str) -> Node:
            node = tree.lookup(path)
            if node is None:
                raise FuseOSError(errno.ENOENT)
            return node

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            node = self._node(path)
            common = {"st_uid": self._uid, "st_gid": self._gid, "st_atime": self._started,
                      "st_mtime": self._started, "st_ctime": self._started}
            if node.is_dir:
                return {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2, **common}
            mode = (0o400 if node.read else 0) | (0o200 if node.write or node.touch else 0)
            return {"st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": 0, **common}

        def readdir(self, path: str, fh: Any) -> list[str]:
            if not self._node(path).is_dir:
                raise FuseOSError(errno.ENOTDIR)
            return [".", "..", *tree.listing(path)]

        def open(self, path: str, fi: Any) -> int:
            node = self._node(path)
            if node.is_dir:
                raise FuseOSError(errno.EISDIR)
            writing = fi.flags & os.O_ACCMODE != os.O_RDONLY
            if writing and not (node.write or node.touch):
                raise FuseOSError(errno.EACCES)
            if not writing and node.read is None:
                raise FuseOSError(errno.EACCES)
            content = None
            if not writing and not node.blocking:
                content = self._read(path, node)
            with self._lock:
                fh = self._next_fh
                self._next_fh += 1
                self._handles[fh] = _Handle(path, node, content)
            fi.fh = fh
            fi.direct_io = 1  # every read comes here: the text is made now, not cached
            return 0

        def _read(self, path: str, node: Node) -> bytes:
            assert node.read is not None
            try:
                return node.read().encode()
            except PyvmmError as err:
                log(path, str(err))
                raise FuseOSError(errno.EIO) from err

        def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
            handle = self._handles.get(fi.fh)
            if handle is None:
                raise FuseOSError(errno.EBADF)
            if handle.content is None:  # a blocking file: it waits here, on this read
                handle.content = self._read(path, handle.node)
            return handle.content[offset:offset + size]

        def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
            handle = self._handles.get(fi.fh)
            if handle is None:
                raise FuseOSError(errno.EBADF)
            node = handle.node
            if len(data) > MAX_WRITE:
                log(path, f"a write of {len(data)} bytes (commands are short lines, at most "
                          f"{MAX_WRITE} bytes)")
                raise FuseOSError(errno.EINVAL)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                log(path, "not text (UTF-8)")
                raise FuseOSError(errno.EINVAL) from None
            try:
                if node.write is not None:
                    node.write(text)
                elif node.touch is not None:
                    node.touch()
                else:
                    raise FuseOSError(errno.EACCES)
            except (PyvmmError, ValueError) as err:
                log(path, str(err))
                raise FuseOSError(errno.EINVAL) from err
            return len(data)

        def truncate(self, path: str, length: int, fh: Any = None) -> int:
            node = self._node(path)
            if not (node.write or node.touch):
                raise FuseOSError(errno.EACCES)
            return 0  # `echo x > file` truncates first: nothing to keep

        def utimens(self, path: str, times: Any = None) -> int:
            node = self._node(path)
            if node.touch is None:
                if node.is_dir or node.read is not None:
                    return 0  # touching a plain file or directory changes nothing
                raise FuseOSError(errno.EACCES)
            try:
                node.touch()
            except PyvmmError as err:
                log(path, str(err))
                raise FuseOSError(errno.EINVAL) from err
            return 0

        def release(self, path: str, fi: Any) -> int:
            with self._lock:
                self._handles.pop(fi.fh, None)
            return 0

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            raise FuseOSError(errno.EACCES if tree.lookup(path.rsplit("/", 1)[0] or "/")
                              else errno.ENOENT)

        def _refuse(self, *args: Any) -> int:
            raise FuseOSError(errno.EPERM)

        unlink = rmdir = mkdir = rename = chmod = chown = symlink = link = _refuse

    return Operations()


class QfsService:
    """QFS mounted at ``mountpoint`` for the life of the run; :meth:`close` unmounts it."""

    def __init__(self, vm: VmController, mountpoint: str | Path | None = None) -> None:
        mfusepy = _fuse()
        self.path = prepare_mountpoint(Path(mountpoint) if mountpoint else default_mountpoint())
        self.tree = QfsTree(vm)
        self._initialized = threading.Event()
        self._failed: BaseException | None = None
        ops = operations(self.tree, self._initialized)
        saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}

        def serve() -> None:
            try:
                # both thread counts set: libfuse 3.14 warns about its own default otherwise
                mfusepy.FUSE(ops, str(self.path), foreground=True, nothreads=False,
                             raw_fi=True, fsname=FSNAME, default_permissions=True,
                             max_threads=16, max_idle_threads=8)
            except BaseException as err:  # noqa: BLE001 - said by the thread that waits
                self._failed = err
            finally:
                self._initialized.set()

        self._thread = NamedThread(target=serve, name="pyvmm-qfs", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not self._initialized.wait(0.05):
            if time.monotonic() > deadline:
                break
        # libfuse put its own signal handlers in: pyvmm's go back (see the module docstring)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)
        if self._failed is not None or not os.path.ismount(self.path):
            self.close()
            reason = self._failed or "it did not appear in time"
            raise ConfigError(f"--qfs {self.path}: cannot mount: {reason}")

    def close(self) -> None:
        """Unmount (lazily if busy) and wait for the FUSE thread; idempotent."""
        if os.path.ismount(self.path) and not _unmount(self.path):
            _unmount(self.path, lazy=True)
        self._thread.join(timeout=MOUNT_TIMEOUT)
        self.tree.close()
