"""System calls on paths: stat, access, readlink, directories, cwd, and changes to the overlay.

Same handler convention as :mod:`pyvmm.linux.sys_io`.  Stat results are built from the guest's
view (:class:`~pyvmm.linux.vfs.Node`): owner root, stable inode numbers derived from the path, so
nothing host-specific but a host file's size, mode and mtime shows.  Every change (mkdir, unlink,
rename, symlink, truncate, chmod, utimensat) lands in the overlay.
"""

from __future__ import annotations

import zlib
from types import MappingProxyType
from typing import TYPE_CHECKING

from .abi import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    AT_REMOVEDIR,
    AT_SYMLINK_NOFOLLOW,
    DIRENT64,
    O_ACCMODE,
    O_RDONLY,
    S_IFIFO,
    STAT,
    X_OK,
    Errno,
    LinuxErrno,
    SyscallHandler,
)
from .state import OpenFileDescription, OverlayNode
from .sys_io import STDIO_KINDS, description, guest_path, read_path, s32, s64
from .vfs import Node, parent_of

if TYPE_CHECKING:
    from .process import LinuxProcess

_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_RENAME_NOREPLACE = 1


def _fail(errno: Errno) -> LinuxErrno:
    return LinuxErrno(errno)


def inode(path: str) -> int:
    """A stable inode number for a guest path (the host's would leak and differ per machine)."""
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) + 2


def _stat_bytes(path: str, node: Node) -> bytes:
    size = node.size
    sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
    nlink = 2 if node.kind == "dir" else 1
    blocks = (size + 511) // 512 if node.blocks is None else node.blocks
    return STAT.pack(1, inode(path), node.mode, nlink, 0, 0, node.rdev, 0, size, 4096, 0,
                     blocks, sec, nsec, sec, nsec, sec, nsec, 0, 0)


def _stat_description(p: LinuxProcess, desc: OpenFileDescription) -> bytes:
    if desc.kind in STDIO_KINDS:
        # Standard streams look like pipes: not seekable, not terminals.
        return _stat_bytes(f"pipe:{desc.kind}", Node("fifo", "synthetic", S_IFIFO | 0o600))
    node = p.fs.lookup(desc.path)
    if node is None:  # the path went away while open
        node = Node("file", "overlay", 0o100000 | 0o644)
    return _stat_bytes(desc.path, node)


# ------------------------------------------------------------------------------ metadata
def sys_newfstatat(p: LinuxProcess, dirfd: int, pathname: int, statbuf: int, flags: int,
                   *_: int) -> int:
    flags = s32(flags)
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | 0x800):
        raise _fail(Errno.EINVAL)
    raw = read_path(p, pathname)
    if not raw and flags & AT_EMPTY_PATH:
        if s32(dirfd) == AT_FDCWD:
            cwd = p.state.files.cwd
            p.mem.write(statbuf, _stat_bytes(cwd, p.fs.require(cwd)))
        else:
            p.mem.write(statbuf, _stat_description(p, description(p, dirfd)))
        return 0
    path = guest_path(p, dirfd, pathname, follow=not flags & AT_SYMLINK_NOFOLLOW)
    p.mem.write(statbuf, _stat_bytes(path, p.fs.require(path)))
    return 0


def sys_fstat(p: LinuxProcess, fd: int, statbuf: int, *_: int) -> int:
    p.mem.write(statbuf, _stat_description(p, description(p, fd)))
    return 0


def sys_faccessat(p: LinuxProcess, dirfd: int, pathname: int, mode: int, *_: int) -> int:
    mode = s32(mode)
    if mode & ~7:
        raise _fail(Errno.EINVAL)
    node = p.fs.require(guest_path(p, dirfd, pathname))
    # The guest runs as root: only execute permission can be missing.
    if mode & X_OK and node.kind != "dir" and not node.mode & 0o111:
        raise _fail(Errno.EACCES)
    return 0


def sys_faccessat2(p: LinuxProcess, dirfd: int, pathname: int, mode: int, flags: int,
                   *_: int) -> int:
    return sys_faccessat(p, dirfd, pathname, mode)


def sys_readlinkat(p: LinuxProcess, dirfd: int, pathname: int, buf: int, size: int,
                   *_: int) -> int:
    size = s32(size)
    if size <= 0:
        raise _fail(Errno.EINVAL)
    node = p.fs.require(guest_path(p, dirfd, pathname, follow=False))
    if node.kind != "symlink":
        raise _fail(Errno.EINVAL)
    target = node.target.encode("utf-8", "surrogateescape")[:size]
    p.mem.write(buf, target)
    return len(target)


def sys_getdents64(p: LinuxProcess, fd: int, dirp: int, count: int, *_: int) -> int:
    desc = description(p, fd)
    if desc.kind != "dir":
        raise _fail(Errno.ENOTDIR)
    here = p.fs.lookup(desc.path)
    if here is None:
        return 0  # the directory was removed: Linux lists nothing
    entries = [(".", desc.path, here)]
    parent = parent_of(desc.path)
    entries.append(("..", parent, p.fs.lookup(parent) or here))
    entries += [(name, desc.path.rstrip("/") + "/" + name, node)
                for name, node in p.fs.listdir(desc.path)]
    out = bytearray()
    index = desc.offset
    count = min(count & 0xFFFF_FFFF, 1 << 20)
    while index < len(entries):
        name, path, node = entries[index]
        raw = name.encode("utf-8", "surrogateescape")
        reclen = (DIRENT64.size + len(raw) + 1 + 7) & ~7
        if len(out) + reclen > count:
            break
        record = DIRENT64.pack(inode(path), index + 1, reclen, node.d_type) + raw
        out += record + bytes(reclen - len(record))
        index += 1
    if not out and index < len(entries):
        raise _fail(Errno.EINVAL)  # the buffer cannot hold one entry
    p.mem.write(dirp, out)
    desc.offset = index
    return len(out)


def sys_getcwd(p: LinuxProcess, buf: int, size: int, *_: int) -> int:
    raw = p.state.files.cwd.encode("utf-8", "surrogateescape") + b"\0"
    if size < len(raw):
        raise _fail(Errno.ERANGE)
    p.mem.write(buf, raw)
    return len(raw)


def sys_chdir(p: LinuxProcess, pathname: int, *_: int) -> int:
    path = guest_path(p, AT_FDCWD, pathname)
    if p.fs.require(path).kind != "dir":
        raise _fail(Errno.ENOTDIR)
    p.state.files.cwd = path
    return 0


def sys_fchdir(p: LinuxProcess, fd: int, *_: int) -> int:
    desc = description(p, fd)
    if desc.kind != "dir":
        raise _fail(Errno.ENOTDIR)
    p.state.files.cwd = desc.path
    return 0


# ------------------------------------------------------------------------------ changes (overlay)
def sys_mkdirat(p: LinuxProcess, dirfd: int, pathname: int, mode: int, *_: int) -> int:
    p.fs.mkdir(guest_path(p, dirfd, pathname, follow=False), mode, p.realtime_ns())
    return 0


def sys_symlinkat(p: LinuxProcess, target: int, dirfd: int, linkpath: int, *_: int) -> int:
    text = read_path(p, target)
    if not text:
        raise _fail(Errno.ENOENT)
    p.fs.symlink(text, guest_path(p, dirfd, linkpath, follow=False), p.realtime_ns())
    return 0


def sys_linkat(p: LinuxProcess, *_: int) -> int:
    raise _fail(Errno.EPERM)  # hard links are not modelled by the overlay


def sys_unlinkat(p: LinuxProcess, dirfd: int, pathname: int, flags: int, *_: int) -> int:
    flags = s32(flags)
    if flags & ~AT_REMOVEDIR:
        raise _fail(Errno.EINVAL)
    path = guest_path(p, dirfd, pathname, follow=False)
    p.fs.remove(path, directory=bool(flags & AT_REMOVEDIR))
    return 0


def sys_renameat2(p: LinuxProcess, olddirfd: int, oldpath: int, newdirfd: int, newpath: int,
                  flags: int, *_: int) -> int:
    flags = s32(flags)
    if flags & ~_RENAME_NOREPLACE:
        raise _fail(Errno.EINVAL)
    old = guest_path(p, olddirfd, oldpath, follow=False)
    new = guest_path(p, newdirfd, newpath, follow=False)
    if flags & _RENAME_NOREPLACE and p.fs.lookup(new) is not None:
        raise _fail(Errno.EEXIST)
    p.fs.rename(old, new)
    return 0


def sys_renameat(p: LinuxProcess, olddirfd: int, oldpath: int, newdirfd: int, newpath: int,
                 *_: int) -> int:
    return sys_renameat2(p, olddirfd, oldpath, newdirfd, newpath, 0)


def _truncate(p: LinuxProcess, path: str, length: int) -> None:
    length = s64(length)
    if length < 0:
        raise _fail(Errno.EINVAL)
    p.fs.truncate(path, length).mtime_ns = p.realtime_ns()


def sys_ftruncate(p: LinuxProcess, fd: int, length: int, *_: int) -> int:
    desc = description(p, fd)
    if desc.kind != "file":
        raise _fail(Errno.EINVAL)
    if desc.flags & O_ACCMODE == O_RDONLY:
        raise _fail(Errno.EINVAL)
    _truncate(p, desc.path, length)
    return 0


def sys_truncate(p: LinuxProcess, pathname: int, length: int, *_: int) -> int:
    _truncate(p, guest_path(p, AT_FDCWD, pathname), length)
    return 0


def _chmod(p: LinuxProcess, path: str, mode: int) -> None:
    node = p.fs.require(path)
    overlay = p.state.files.overlay
    if node.kind == "dir":
        current = overlay.get(path)
        if current is None:
            current = OverlayNode("dir", mtime_ns=node.mtime_ns)
            p.fs.set_entry(path, current)
        current.mode = mode & 0o7777
    elif node.kind == "file":
        p.fs.writable(path).mode = mode & 0o7777
    elif node.source == "synthetic":
        raise _fail(Errno.EPERM)


def sys_fchmod(p: LinuxProcess, fd: int, mode: int, *_: int) -> int:
    desc = description(p, fd)
    if desc.kind in STDIO_KINDS:
        return 0
    _chmod(p, desc.path, mode)
    return 0


def sys_fchmodat(p: LinuxProcess, dirfd: int, pathname: int, mode: int, *_: int) -> int:
    _chmod(p, guest_path(p, dirfd, pathname), mode)
    return 0


def sys_fchown(p: LinuxProcess, fd: int, *_: int) -> int:
    description(p, fd)
    return 0  # everything belongs to root, the only user


def sys_fchownat(p: LinuxProcess, dirfd: int, pathname: int, _uid: int, _gid: int, flags: int,
                 *_: int) -> int:
    raw = read_path(p, pathname)
    if not raw and s32(flags) & AT_EMPTY_PATH:
        return sys_fchown(p, dirfd)
    p.fs.require(guest_path(p, dirfd, pathname, follow=not s32(flags) & AT_SYMLINK_NOFOLLOW))
    return 0


def sys_utimensat(p: LinuxProcess, dirfd: int, pathname: int, times: int, flags: int,
                  *_: int) -> int:
    if pathname == 0:
        desc = description(p, dirfd)
        if desc.kind in STDIO_KINDS:
            return 0
        path = desc.path
    else:
        path = guest_path(p, dirfd, pathname, follow=not s32(flags) & AT_SYMLINK_NOFOLLOW)
    node = p.fs.require(path)
    if times:
        raw = p.mem.read(times, 32)
        nsec = int.from_bytes(raw[24:32], "little", signed=True)
        if nsec == _UTIME_OMIT:
            return 0
        mtime = p.realtime_ns() if nsec == _UTIME_NOW else \
            int.from_bytes(raw[16:24], "little", signed=True) * 1_000_000_000 + nsec
    else:
        mtime = p.realtime_ns()
    if node.kind == "file":
        p.fs.writable(path).mtime_ns = mtime
    return 0


def sys_fsync(p: LinuxProcess, fd: int, *_: int) -> int:
    description(p, fd)
    return 0


def sys_sync(p: LinuxProcess, *_: int) -> int:
    return 0


def sys_umask(p: LinuxProcess, mask: int, *_: int) -> int:
    old = p.state.files.umask
    p.state.files.umask = mask & 0o777
    return old


HANDLERS: MappingProxyType[str, SyscallHandler] = MappingProxyType({
    "newfstatat": sys_newfstatat, "fstat": sys_fstat, "faccessat": sys_faccessat,
    "faccessat2": sys_faccessat2, "readlinkat": sys_readlinkat, "getdents64": sys_getdents64,
    "getcwd": sys_getcwd, "chdir": sys_chdir, "fchdir": sys_fchdir, "mkdirat": sys_mkdirat,
    "unlinkat": sys_unlinkat, "symlinkat": sys_symlinkat, "linkat": sys_linkat,
    "renameat": sys_renameat, "renameat2": sys_renameat2, "ftruncate": sys_ftruncate,
    "truncate": sys_truncate, "fchmod": sys_fchmod, "fchmodat": sys_fchmodat, "fchown": sys_fchown,
    "fchownat": sys_fchownat, "utimensat": sys_utimensat, "fsync": sys_fsync,
    "fdatasync": sys_fsync, "sync": sys_sync, "umask": sys_umask,
})
