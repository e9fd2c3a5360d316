"""The guest's file system: listed host paths read-only, an in-memory overlay for every change.

A guest path names the host path of the same spelling, and exists only if it is one of the
exported host paths (``FileState.exports``), lies under an exported directory, or is a directory
on the way to one (shown with only those entries).  Host symlinks are followed in guest terms, so
a link can never lead outside what was exported.  Anything the guest writes, creates, truncates,
renames or deletes lands in ``FileState.overlay`` (file bytes, directories, and whiteouts that hide
deleted host paths); host files are only ever opened read-only.  A few device files (/dev/null,
/dev/zero, /dev/urandom) and /proc/self/exe are built in.

The overlay is bounded, as a tmpfs is: ``FileState.files_limit`` bytes (by default half the RAM
size, see :func:`default_files_limit`) cover the pages of stored file data (holes of sparse files
are free, :mod:`pyvmm.linux.filedata`) plus :data:`ENTRY_COST` and the saved length of the path
for every entry (files, directories, symlinks, whiteouts), so that neither data nor a flood of
empty files can take unbounded host memory or outgrow a checkpoint.  A change that does not fit
gets ENOSPC (a write writes what fits first, as Linux does); a file position at or past
``MAX_FILE_SIZE`` gets EFBIG.

Host file descriptors are cached here for speed; they are not state (a new process re-opens the
same paths).  Runs on the vCPU thread.
"""

from __future__ import annotations

import dataclasses
import os
import stat as stat_mod
import weakref
from collections import deque

from .abi import (
    DT_CHR,
    DT_DIR,
    DT_LNK,
    DT_REG,
    PATH_MAX,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    Errno,
    LinuxErrno,
)
from .filedata import CHUNK_SIZE, MAX_FILE_SIZE, FileData
from .state import MAX_FILES_LIMIT, FileState, OverlayNode

#: Built-in devices: guest path -> the OpenFileDescription kind that serves it ("fdN": opening
#: it shares fd N's open file, as Linux's /dev/stdin -> /proc/self/fd/0 does for pipes).
DEVICES = {"/dev/null": "null", "/dev/zero": "zero", "/dev/random": "random",
           "/dev/urandom": "random", "/dev/stdin": "fd0", "/dev/stdout": "fd1",
           "/dev/stderr": "fd2"}
_DEVICE_RDEV = {"/dev/null": (1, 3), "/dev/zero": (1, 5), "/dev/random": (1, 8),
                "/dev/urandom": (1, 9)}
PROC_SELF_EXE = "/proc/self/exe"
_SYNTHETIC_DIRS = {"/": ["dev", "proc"], "/dev": [p[5:] for p in DEVICES],
                   "/proc": ["self"], "/proc/self": ["exe"]}
_MAX_SYMLINK_HOPS = 40
_MAX_CACHED_HOST_FDS = 64

_VISIBLE, _ANCESTOR, _HIDDEN = 2, 1, 0
#: What every overlay entry costs beside its path and data: about what its Python objects take
#: (and what a tmpfs inode and dentry take in a kernel), so a flood of empty files is bounded too.
ENTRY_COST = 1024


def default_files_limit(ram_size: int) -> int:
    """The overlay's limit for a guest with ``ram_size`` bytes of RAM: half of it, as a tmpfs
    mounted without ``size=`` takes, at most :data:`~pyvmm.linux.state.MAX_FILES_LIMIT`."""
    return min(ram_size // 2, MAX_FILES_LIMIT)


def entry_cost(path: str, node: OverlayNode) -> int:
    """What an overlay entry counts against the limit: its data's pages, its path as saved (JSON
    text: a path of odd bytes takes more) and ENTRY_COST."""
    return ENTRY_COST + _json_length(path) + node.data.allocated


def _json_length(text: str) -> int:
    """``len(json.dumps(text))`` (ASCII-escaped), without importing json at every start."""
    length = 2
    for char in text:
        code = ord(char)
        if 0x20 <= code < 0x7F:
            length += 2 if char in '"\\' else 1
        elif char in "\b\f\n\r\t":
            length += 2
        else:
            length += 12 if code > 0xFFFF else 6
    return length


@dataclasses.dataclass(frozen=True)
class Node:
    """What a guest path is: kind ("file", "dir", "symlink", "device", "special"), where it comes
    from ("overlay", "host", "synthetic"), and the stat fields the guest sees."""

    kind: str
    source: str
    mode: int
    size: int = 0
    mtime_ns: int = 0
    target: str = ""  # symlink target
    rdev: int = 0
    #: 512-byte blocks allocated (st_blocks); None: as many as the size takes.
    blocks: int | None = None

    @property
    def d_type(self) -> int:
        return {"dir": DT_DIR, "symlink": DT_LNK, "device": DT_CHR}.get(self.kind, DT_REG)


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def base_name(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _fail(errno: Errno) -> LinuxErrno:
    return LinuxErrno(errno)


def _close_fds(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class FileSystem:
    """Looks up, reads and changes guest paths over :class:`FileState` (see the module doc)."""

    def __init__(self, state: FileState, exe_path: str) -> None:
        self.state = state
        self.exe_path = exe_path
        self._host_fds: dict[str, int] = {}
        # Closes the cached fds when this object goes, should nobody call close().
        self._finalizer = weakref.finalize(self, _close_fds, self._host_fds)
        #: Bytes of the limit in use (derived from the overlay, so not state).
        self.usage = sum(entry_cost(path, node) for path, node in state.overlay.items())

    def close(self) -> None:
        """Close cached host file descriptors (they are reopened on demand)."""
        _close_fds(self._host_fds)

    # ------------------------------------------------------------------------ lookup
    def _visibility(self, path: str) -> int:
        ancestor = False
        for export in self.state.exports:
            if export == "/" or path == export or path.startswith(export + "/"):
                return _VISIBLE
            if path == "/" or export.startswith(path + "/"):
                ancestor = True
        return _ANCESTOR if ancestor else _HIDDEN

    def on_host(self, path: str) -> bool:
        """Whether ``path`` exists outside the overlay (so deleting it needs a whiteout)."""
        if path in DEVICES or path in _SYNTHETIC_DIRS or path == PROC_SELF_EXE:
            return True
        vis = self._visibility(path)
        return vis == _ANCESTOR or vis == _VISIBLE and os.path.lexists(path)

    def lookup(self, path: str) -> Node | None:
        """The node at the absolute, normalised guest ``path`` (symlinks not followed)."""
        overlay = self.state.overlay
        probe = path
        while probe != "/":
            probe = parent_of(probe)
            above = overlay.get(probe)
            if above is not None and above.kind != "dir":
                return None  # a deleted directory or a file hides everything below it
        node = overlay.get(path)
        if node is not None:
            if node.kind == "whiteout":
                return None
            if node.kind == "dir":
                return Node("dir", "overlay", S_IFDIR | node.mode, 4096, node.mtime_ns)
            if node.kind == "symlink":
                target = bytes(node.data).decode("utf-8", "surrogateescape")
                return Node("symlink", "overlay", S_IFLNK | 0o777, node.data.size,
                            node.mtime_ns, target=target)
            return Node("file", "overlay", S_IFREG | node.mode, node.data.size, node.mtime_ns,
                        blocks=node.data.allocated // 512)
        if path in DEVICES:
            major, minor = _DEVICE_RDEV.get(path, (0, 0))
            return Node("device", "synthetic", S_IFCHR | 0o666, rdev=(major << 8) | minor)
        if path == PROC_SELF_EXE:
            return Node("symlink", "synthetic", S_IFLNK | 0o777, len(self.exe_path),
                        target=self.exe_path)
        vis = self._visibility(path)
        if vis == _VISIBLE:
            try:
                st = os.lstat(path)
            except (OSError, ValueError):
                return None
            if stat_mod.S_ISDIR(st.st_mode):
                kind = "dir"
            elif stat_mod.S_ISREG(st.st_mode):
                kind = "file"
            elif stat_mod.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(path)
                except OSError:
                    return None
                return Node("symlink", "host", st.st_mode, len(target), st.st_mtime_ns,
                            target=target)
            else:
                kind = "special"  # a host FIFO or device: reading it could block the host
            return Node(kind, "host", st.st_mode, st.st_size if kind == "file" else 0,
                        st.st_mtime_ns)
        if vis == _ANCESTOR or path in _SYNTHETIC_DIRS:
            return Node("dir", "synthetic", S_IFDIR | 0o755, 4096)
        return None

    def resolve(self, path: str, base: str, *, follow: bool = True) -> str:
        """The absolute guest path that ``path`` (relative to ``base``) names.

        Intermediate symlinks are always followed, the last one when ``follow``.  The last
        component need not exist (callers check); a missing or non-directory intermediate one
        raises ENOENT or ENOTDIR.
        """
        if not path:
            raise _fail(Errno.ENOENT)
        if len(path) >= PATH_MAX:
            raise _fail(Errno.ENAMETOOLONG)
        parts: list[str] = [] if path.startswith("/") else [p for p in base.split("/") if p]
        todo = deque(path.split("/"))
        hops = 0
        while todo:
            name = todo.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if parts:
                    parts.pop()
                continue
            if len(name) > 255:
                raise _fail(Errno.ENAMETOOLONG)
            parts.append(name)
            current = "/" + "/".join(parts)
            last = all(rest in ("", ".") for rest in todo)
            node = self.lookup(current)
            if node is None:
                if last:
                    break
                raise _fail(Errno.ENOENT)
            if node.kind == "symlink" and (follow or not last):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise _fail(Errno.ELOOP)
                parts.pop()
                if node.target.startswith("/"):
                    parts.clear()
                todo.extendleft(reversed(node.target.split("/")))
                continue
            if not last and node.kind != "dir":
                raise _fail(Errno.ENOTDIR)
            if last and path.endswith("/") and node.kind != "dir":
                raise _fail(Errno.ENOTDIR)
        return "/" + "/".join(parts)

    def require(self, path: str) -> Node:
        node = self.lookup(path)
        if node is None:
            raise _fail(Errno.ENOENT)
        return node

    def require_parent_dir(self, path: str) -> None:
        """ENOENT/ENOTDIR unless the directory that would hold ``path`` exists."""
        node = self.lookup(parent_of(path))
        if node is None:
            raise _fail(Errno.ENOENT)
        if node.kind != "dir":
            raise _fail(Errno.ENOTDIR)

    # ------------------------------------------------------------------------ reading
    def read(self, path: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of the regular file at ``path`` from ``offset`` (holes read as
        zeros; the caller bounds ``length``)."""
        node = self.state.overlay.get(path)
        if node is not None and node.kind == "file":
            return node.data.read(offset, length)
        info = self.require(path)
        if info.kind == "dir":
            raise _fail(Errno.EISDIR)
        if info.source != "host" or info.kind != "file":
            raise _fail(Errno.EINVAL)
        length = max(0, min(length, info.size - offset))
        if length == 0:
            return b""
        try:
            return os.pread(self._host_fd(path), length, offset)
        except OSError as err:
            self._forget(path)
            raise _fail(Errno.EIO) from err

    def contents(self, path: str) -> bytes:
        """All bytes of the regular file at ``path`` (for small files: it allocates them)."""
        info = self.require(path)
        return self.read(path, 0, info.size)

    def _host_fd(self, path: str) -> int:
        fd = self._host_fds.get(path)
        if fd is None:
            if len(self._host_fds) >= _MAX_CACHED_HOST_FDS:
                self.close()
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as err:
                raise _fail(Errno.EACCES if isinstance(err, PermissionError)
                            else Errno.ENOENT) from err
            self._host_fds[path] = fd
        return fd

    def _forget(self, path: str) -> None:
        fd = self._host_fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def listdir(self, path: str) -> list[tuple[str, Node]]:
        """The entries of directory ``path`` (without . and ..), sorted by name."""
        names: set[str] = set(_SYNTHETIC_DIRS.get(path, ()))
        vis = self._visibility(path)
        if vis == _VISIBLE:
            try:
                names.update(os.listdir(path))
            except OSError:
                pass
        elif vis == _ANCESTOR:
            prefix = path.rstrip("/") + "/"
            for export in self.state.exports:
                if export.startswith(prefix):
                    names.add(export[len(prefix):].split("/", 1)[0])
        for key in self.state.overlay:
            if key != "/" and parent_of(key) == path:
                names.add(base_name(key))
        entries = []
        for name in sorted(names):
            node = self.lookup(path.rstrip("/") + "/" + name)
            if node is not None:
                entries.append((name, node))
        return entries

    # ------------------------------------------------------------------------ changing
    def set_entry(self, path: str, node: OverlayNode, *, charge: bool = True) -> None:
        """Put ``node`` at ``path`` in the overlay, replacing what was there; ENOSPC (nothing
        changed) if the limit cannot take it.  ``charge`` False: the loader's own entries, which
        count in the usage but are never refused."""
        old = self.state.overlay.get(path)
        growth = entry_cost(path, node) - (entry_cost(path, old) if old is not None else 0)
        if charge and growth > 0 and self.usage + growth > self.state.files_limit:
            raise _fail(Errno.ENOSPC)
        self.state.overlay[path] = node
        self.usage += growth

    def _pop_entry(self, path: str) -> None:
        old = self.state.overlay.pop(path, None)
        if old is not None:
            self.usage -= entry_cost(path, old)

    def writable(self, path: str, *, discard: bool = False) -> OverlayNode:
        """The overlay copy of regular file ``path``, copied up from the host on first use
        (``discard``: its bytes are about to go, as for O_TRUNC: copy none of them)."""
        node = self.state.overlay.get(path)
        if node is not None and node.kind == "file":
            return node
        info = self.require(path)
        if info.kind == "dir":
            raise _fail(Errno.EISDIR)
        if info.kind != "file":
            raise _fail(Errno.EACCES)
        node = OverlayNode("file", FileData() if discard else self._copy_up(path, info.size),
                           info.mode & 0o7777, info.mtime_ns)
        self.set_entry(path, node)
        return node

    def _copy_up(self, path: str, size: int) -> FileData:
        """The host file's bytes, read chunk by chunk (zeros that end a chunk stay holes: the
        host's holes cost nothing here either); ENOSPC as soon as they would not fit beside the
        entry itself."""
        data = FileData(size)
        room = self.state.files_limit - self.usage - entry_cost(path, OverlayNode("file"))
        for offset in range(0, size, CHUNK_SIZE):
            piece = self.read(path, offset, CHUNK_SIZE).rstrip(b"\0")
            if not piece:
                continue
            written, growth = data.write(offset, piece, room)
            if written < len(piece):
                raise _fail(Errno.ENOSPC)
            room -= growth
        data.size = size  # a host file that shrank meanwhile: the rest reads as zeros
        return data

    def write(self, node: OverlayNode, offset: int, data: bytes | bytearray) -> int:
        """pwrite(2) into the overlay file ``node`` (from :meth:`writable`): bytes written
        (what fits: EFBIG at or past MAX_FILE_SIZE, ENOSPC if not one byte fits)."""
        if not data:
            return 0
        if offset + len(data) > MAX_FILE_SIZE:
            if offset >= MAX_FILE_SIZE:
                raise _fail(Errno.EFBIG)
            data = data[:MAX_FILE_SIZE - offset]
        room = self.state.files_limit - self.usage
        written, growth = node.data.write(offset, data, max(0, room))
        if not written:
            raise _fail(Errno.ENOSPC)
        self.usage += growth
        return written

    def truncate(self, path: str, length: int) -> OverlayNode:
        """truncate(2) the regular file ``path`` to ``length`` (>= 0); EFBIG past
        MAX_FILE_SIZE.  Growing makes a hole, which costs nothing."""
        if length > MAX_FILE_SIZE:
            raise _fail(Errno.EFBIG)
        node = self.writable(path, discard=length == 0)
        self.usage -= node.data.truncate(length)
        return node

    def seek_data(self, path: str, offset: int, *, hole: bool) -> int:
        """lseek SEEK_DATA (``hole`` False) or SEEK_HOLE from ``offset`` (inside the file);
        ENXIO when no data follows.  Host files are all data."""
        node = self.state.overlay.get(path)
        if node is None or node.kind != "file":
            return self.require(path).size if hole else offset
        if hole:
            return node.data.next_hole(offset)
        found = node.data.next_data(offset)
        if found is None:
            raise _fail(Errno.ENXIO)
        return found

    def create_file(self, path: str, mode: int, mtime_ns: int) -> OverlayNode:
        self.require_parent_dir(path)
        node = OverlayNode("file", FileData(), mode & ~self.state.umask & 0o7777, mtime_ns)
        self.set_entry(path, node)
        return node

    def mkdir(self, path: str, mode: int, mtime_ns: int) -> None:
        if self.lookup(path) is not None:
            raise _fail(Errno.EEXIST)
        self.require_parent_dir(path)
        self.set_entry(path, OverlayNode("dir", FileData(), mode & ~self.state.umask & 0o7777,
                                         mtime_ns))

    def symlink(self, target: str, path: str, mtime_ns: int) -> None:
        if self.lookup(path) is not None:
            raise _fail(Errno.EEXIST)
        self.require_parent_dir(path)
        raw = FileData.of(target.encode("utf-8", "surrogateescape"))
        self.set_entry(path, OverlayNode("symlink", raw, 0o777, mtime_ns))

    def remove(self, path: str, *, directory: bool) -> None:
        """unlink (``directory`` False) or rmdir ``path``."""
        node = self.require(path)
        if node.source == "synthetic" or path == "/":
            raise _fail(Errno.EPERM if not directory else Errno.EBUSY)
        if directory:
            if node.kind != "dir":
                raise _fail(Errno.ENOTDIR)
            if self.listdir(path):
                raise _fail(Errno.ENOTEMPTY)
        elif node.kind == "dir":
            raise _fail(Errno.EISDIR)
        self._drop(path)

    def _drop(self, path: str) -> None:
        # Whiteouts of a removed directory's entries stay: they keep host entries hidden should
        # the directory be made again.
        if self.on_host(path):
            self.set_entry(path, OverlayNode("whiteout"))
            self._forget(path)
        else:
            self._pop_entry(path)

    def rename(self, old: str, new: str) -> None:
        """rename(2) of a regular file or a symlink; directories give EXDEV (callers such as
        mv then copy them)."""
        node = self.require(old)
        if node.source == "synthetic":
            raise _fail(Errno.EPERM)
        if node.kind not in ("file", "symlink"):
            raise _fail(Errno.EXDEV)
        if old == new:
            return
        target = self.lookup(new)
        if target is not None and target.kind == "dir":
            raise _fail(Errno.EISDIR)
        if target is not None and target.source == "synthetic":
            raise _fail(Errno.EPERM)
        self.require_parent_dir(new)
        source = self.state.overlay.get(old)
        if source is None or source.kind == "whiteout":
            data = FileData.of(node.target.encode("utf-8", "surrogateescape")) \
                if node.kind == "symlink" else self._copy_up(old, node.size)
            source = OverlayNode(node.kind, data, node.mode & 0o7777, node.mtime_ns)
        # All or nothing: the new entry, and the whiteout that hides a host original.
        replaced = self.state.overlay.get(new)
        growth = entry_cost(new, source) - (entry_cost(new, replaced) if replaced else 0)
        growth += entry_cost(old, OverlayNode("whiteout")) if self.on_host(old) else 0
        growth -= entry_cost(old, self.state.overlay[old]) if old in self.state.overlay else 0
        if growth > 0 and self.usage + growth > self.state.files_limit:
            raise _fail(Errno.ENOSPC)
        self.set_entry(new, source, charge=False)
        self._forget(new)
        self._drop(old)
