"""System calls on file descriptors: the fd table, open/close/dup, read/write/seek/poll.

Handlers take ``(process, x0..x5)`` as unsigned 64-bit integers and return the value for x0;
failures raise :class:`~pyvmm.linux.abi.LinuxErrno`.  fds point to open file descriptions
(``FileState.descriptions``), shared by dup'ed fds like Linux's ``struct file``; files are read
through :class:`~pyvmm.linux.vfs.FileSystem`, so the host is never written.  The helpers that
turn guest arguments into fds and paths live here too, for :mod:`sys_fs` and :mod:`sys_process`.
"""

from __future__ import annotations

import select
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import GuestError
from .abi import (
    AT_FDCWD,
    F_DUPFD,
    F_DUPFD_CLOEXEC,
    F_GETFD,
    F_GETFL,
    F_GETLK,
    F_SETFD,
    F_SETFL,
    F_SETLK,
    F_SETLKW,
    F_UNLCK,
    FD_CLOEXEC,
    FIOCLEX,
    FIONCLEX,
    IOV_MAX,
    IOVEC,
    O_ACCMODE,
    O_APPEND,
    O_CLOEXEC,
    O_CREAT,
    O_DIRECTORY,
    O_EXCL,
    O_NOCTTY,
    O_NOFOLLOW,
    O_PATH,
    O_RDONLY,
    O_SETFL_MASK,
    O_TMPFILE,
    O_TRUNC,
    O_WRONLY,
    PATH_MAX,
    POLLFD,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    POLLRDNORM,
    POLLWRNORM,
    SEEK_CUR,
    SEEK_DATA,
    SEEK_END,
    SEEK_HOLE,
    SEEK_SET,
    TIMESPEC,
    Errno,
    LinuxErrno,
    SyscallHandler,
)
from .state import FdEntry, OpenFileDescription
from .vfs import DEVICES

if TYPE_CHECKING:
    from .process import LinuxProcess

#: Most bytes one read of an endless device (/dev/zero, /dev/urandom) or one sendfile moves.
_CHUNK = 1 << 20
#: Kinds of the standard stream descriptions: pipes, not files.
STDIO_KINDS = ("stdin", "stdout", "stderr")


def _fail(errno: Errno) -> LinuxErrno:
    return LinuxErrno(errno)


def s32(value: int) -> int:
    """A register's low 32 bits as a C ``int`` (fds, flags, dirfds)."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value & 0x8000_0000 else value


def s64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value & (1 << 63) else value


# ------------------------------------------------------------------------------ fd table
def lookup_fd(p: LinuxProcess, fd: int) -> tuple[FdEntry, OpenFileDescription]:
    files = p.state.files
    entry = files.fds.get(s32(fd))
    if entry is None:
        raise _fail(Errno.EBADF)
    return entry, files.descriptions[entry.description]


def description(p: LinuxProcess, fd: int) -> OpenFileDescription:
    return lookup_fd(p, fd)[1]


def install_fd(p: LinuxProcess, desc_id: int, *, lowest: int = 0, cloexec: bool = False) -> int:
    """Put a new fd for description ``desc_id`` in the lowest free slot >= ``lowest``."""
    files = p.state.files
    fd = lowest
    while fd in files.fds:
        fd += 1
    if fd >= files.max_fds:
        raise _fail(Errno.EMFILE)
    files.fds[fd] = FdEntry(desc_id, cloexec)
    return fd


def new_description(p: LinuxProcess, desc: OpenFileDescription) -> int:
    files = p.state.files
    desc_id = files.next_description
    files.next_description += 1
    files.descriptions[desc_id] = desc
    return desc_id


def close_fd(p: LinuxProcess, fd: int) -> None:
    files = p.state.files
    entry = files.fds.pop(fd, None)
    if entry is None:
        raise _fail(Errno.EBADF)
    if all(e.description != entry.description for e in files.fds.values()):
        del files.descriptions[entry.description]


# ------------------------------------------------------------------------------ paths
def _base_dir(p: LinuxProcess, dirfd: int) -> str:
    dirfd = s32(dirfd)
    if dirfd == AT_FDCWD:
        return p.state.files.cwd
    desc = description(p, dirfd)
    if desc.kind != "dir":
        raise _fail(Errno.ENOTDIR)
    return desc.path


def read_path(p: LinuxProcess, addr: int) -> str:
    raw = p.mem.read_cstring(addr, PATH_MAX)
    # Guest paths are bytes; surrogateescape keeps any byte and maps back to the same host path.
    return raw.decode("utf-8", "surrogateescape")


def guest_path(p: LinuxProcess, dirfd: int, addr: int, *, follow: bool = True) -> str:
    """The absolute guest path named by ``(dirfd, string at addr)``."""
    path = read_path(p, addr)
    base = p.state.files.cwd if path.startswith("/") else _base_dir(p, dirfd)
    return p.fs.resolve(path, base, follow=follow)


# ------------------------------------------------------------------------------ data movement
def _readable(desc: OpenFileDescription) -> None:
    if desc.flags & O_ACCMODE == O_WRONLY or desc.flags & O_PATH or \
            desc.kind in ("stdout", "stderr"):
        raise _fail(Errno.EBADF)


def _writable(desc: OpenFileDescription) -> None:
    if desc.flags & O_ACCMODE == O_RDONLY or desc.flags & O_PATH or desc.kind == "stdin":
        raise _fail(Errno.EBADF)


def read_from(p: LinuxProcess, desc: OpenFileDescription, count: int,
              offset: int | None = None) -> bytes:
    """Read up to ``count`` bytes; at ``offset`` without moving the file offset (pread), or at
    the file offset and advance it."""
    _readable(desc)
    pos = desc.offset if offset is None else offset
    if desc.kind == "stdin":
        if offset is not None:
            raise _fail(Errno.ESPIPE)
        if p.state.files.stdin_live:
            data = p.read_live_stdin(min(count, _CHUNK))
        else:
            data = p.state.files.stdin[pos:pos + count]
    elif desc.kind == "file":
        data = p.fs.read(desc.path, pos, count)
    elif desc.kind == "dir":
        raise _fail(Errno.EISDIR)
    elif desc.kind == "null":
        data = b""
    elif desc.kind == "zero":
        data = bytes(min(count, _CHUNK))
    elif desc.kind == "random":
        data = p.random_bytes(min(count, _CHUNK))
    else:
        raise _fail(Errno.EBADF)
    if offset is None and desc.kind in ("stdin", "file"):
        desc.offset += len(data)
    return data


def write_to(p: LinuxProcess, desc: OpenFileDescription, data: bytes,
             offset: int | None = None) -> int:
    _writable(desc)
    if desc.kind in ("stdout", "stderr"):
        if offset is not None:
            raise _fail(Errno.ESPIPE)
        if data:
            p.sinks[desc.kind](bytes(data))
        if desc.kind == "stdout":
            p.state.stdout_bytes += len(data)
        else:
            p.state.stderr_bytes += len(data)
        return len(data)
    if desc.kind in ("null", "zero", "random"):
        return len(data)
    if desc.kind != "file":
        raise _fail(Errno.EBADF if desc.kind != "dir" else Errno.EISDIR)
    node = p.fs.writable(desc.path)
    if offset is not None:
        pos = offset
    elif desc.flags & O_APPEND:
        pos = node.data.size
    else:
        pos = desc.offset
    written = p.fs.write(node, pos, data)
    node.mtime_ns = p.realtime_ns()
    if offset is None:
        desc.offset = pos + written
    return written


def _iovecs(p: LinuxProcess, addr: int, count: int) -> list[tuple[int, int]]:
    count = s32(count)
    if count < 0 or count > IOV_MAX:
        raise _fail(Errno.EINVAL)
    raw = p.mem.read(addr, count * IOVEC.size)
    return [IOVEC.unpack_from(raw, i * IOVEC.size) for i in range(count)]


def _receivable(p: LinuxProcess, iovs: list[tuple[int, int]]) -> int:
    """How many bytes a read into ``iovs`` can deliver: up to the first byte that is not guest
    RAM (Linux copies up to a fault), so that a huge count never makes the host build more than
    the guest can take (a read of a sparse file's hole is all zeros, however far it goes)."""
    if len(iovs) == 1 and iovs[0][1] <= _CHUNK:
        return iovs[0][1]  # small enough to build; a bad buffer still gets EFAULT on the copy
    total = 0
    for base, length in iovs:
        room = p.mem.room(base, length)
        total += room
        if room < length:
            if total == 0:
                raise _fail(Errno.EFAULT)
            break
    return total


def _scatter(p: LinuxProcess, iovs: list[tuple[int, int]], data: bytes) -> None:
    pos = 0
    for base, length in iovs:
        if pos >= len(data):
            break
        piece = data[pos:pos + length]
        p.mem.write(base, piece)
        pos += len(piece)


def _gather(p: LinuxProcess, iovs: list[tuple[int, int]]) -> bytes:
    return b"".join(p.mem.read(base, length) for base, length in iovs if length)


def sys_read(p: LinuxProcess, fd: int, buf: int, count: int, *_: int) -> int:
    desc = description(p, fd)
    _readable(desc)
    data = read_from(p, desc, _receivable(p, [(buf, count)]))
    p.mem.write(buf, data)
    return len(data)


def sys_write(p: LinuxProcess, fd: int, buf: int, count: int, *_: int) -> int:
    desc = description(p, fd)
    _writable(desc)
    return write_to(p, desc, p.mem.read(buf, count))


def sys_pread64(p: LinuxProcess, fd: int, buf: int, count: int, offset: int, *_: int) -> int:
    if s64(offset) < 0:
        raise _fail(Errno.EINVAL)
    desc = description(p, fd)
    _readable(desc)
    data = read_from(p, desc, _receivable(p, [(buf, count)]), offset)
    p.mem.write(buf, data)
    return len(data)


def sys_pwrite64(p: LinuxProcess, fd: int, buf: int, count: int, offset: int, *_: int) -> int:
    if s64(offset) < 0:
        raise _fail(Errno.EINVAL)
    desc = description(p, fd)
    _writable(desc)
    return write_to(p, desc, p.mem.read(buf, count), offset)


def sys_readv(p: LinuxProcess, fd: int, iov: int, iovcnt: int, *_: int) -> int:
    desc = description(p, fd)
    _readable(desc)
    iovs = _iovecs(p, iov, iovcnt)
    data = read_from(p, desc, _receivable(p, iovs))
    _scatter(p, iovs, data)
    return len(data)


def sys_writev(p: LinuxProcess, fd: int, iov: int, iovcnt: int, *_: int) -> int:
    desc = description(p, fd)
    _writable(desc)
    return write_to(p, desc, _gather(p, _iovecs(p, iov, iovcnt)))


def sys_sendfile(p: LinuxProcess, out_fd: int, in_fd: int, offset_ptr: int, count: int,
                 *_: int) -> int:
    src, dst = description(p, in_fd), description(p, out_fd)
    _writable(dst)
    count = min(count, _CHUNK)
    if offset_ptr:
        offset = s64(p.mem.read_u64(offset_ptr))
        if offset < 0:
            raise _fail(Errno.EINVAL)
        data = read_from(p, src, count, offset)
        p.mem.write_u64(offset_ptr, offset + len(data))
    else:
        data = read_from(p, src, count)
    return write_to(p, dst, data)


def sys_lseek(p: LinuxProcess, fd: int, offset: int, whence: int, *_: int) -> int:
    desc = description(p, fd)
    if desc.kind in STDIO_KINDS:
        raise _fail(Errno.ESPIPE)
    if desc.kind in ("null", "zero", "random"):
        return 0
    offset, whence = s64(offset), s32(whence)
    if desc.kind == "dir":
        if whence != SEEK_SET or offset < 0:
            raise _fail(Errno.EINVAL)
        desc.offset = offset
        return offset
    size = p.fs.require(desc.path).size
    if whence == SEEK_SET:
        new = offset
    elif whence == SEEK_CUR:
        new = desc.offset + offset
    elif whence == SEEK_END:
        new = size + offset
    elif whence in (SEEK_DATA, SEEK_HOLE):
        if offset < 0 or offset >= size:
            raise _fail(Errno.ENXIO)
        new = p.fs.seek_data(desc.path, offset, hole=whence == SEEK_HOLE)
    else:
        raise _fail(Errno.EINVAL)
    if new < 0:
        raise _fail(Errno.EINVAL)
    desc.offset = new
    return new


def sys_ppoll(p: LinuxProcess, fds: int, nfds: int, timeout: int, *_: int) -> int:
    """Every fd is always ready, but a live stdin (which is ready when its host fd is): reads
    of files never block, writes never fill up.  Nothing ready: with no timeout, wait for the
    live stdin (a pause asked for meanwhile restarts the call); with one, the (virtual) time
    passes at once.  Polling nothing is a sleep."""
    if nfds > p.state.files.max_fds:
        raise _fail(Errno.EINVAL)
    wait_ns = None
    if timeout:
        sec, nsec = TIMESPEC.unpack(p.mem.read(timeout, TIMESPEC.size))
        wait_ns = max(0, sec * 1_000_000_000 + nsec)
    if nfds == 0:
        if wait_ns is None:
            raise GuestError("ppoll on no fds without a timeout: the single-process program "
                             "would wait forever", pc=p.pc(), guest=p.guest)
        p.sleep(wait_ns)
        return 0
    while True:
        ready, waits_for_stdin = _poll_once(p, fds, nfds)
        if ready or not waits_for_stdin:
            return ready
        if wait_ns is not None:
            p.sleep(wait_ns)
            return 0
        p.wait_for_input(p.stdin_fd)


def _live_stdin_readable(p: LinuxProcess) -> bool:
    poller = select.poll()
    poller.register(p.stdin_fd, select.POLLIN)
    return bool(poller.poll(0))


def _poll_once(p: LinuxProcess, fds: int, nfds: int) -> tuple[int, bool]:
    """One pass of ppoll over the guest's pollfd array: (fds ready, whether one of the others
    waits for a live stdin)."""
    raw = bytearray(p.mem.read(fds, nfds * POLLFD.size))
    waits_for_stdin = False
    ready = 0
    for i in range(nfds):
        fd, events, _revents = POLLFD.unpack_from(raw, i * POLLFD.size)
        if fd < 0:
            revents = 0
        elif fd not in p.state.files.fds:
            revents = POLLNVAL
        else:
            desc = description(p, fd)
            revents = 0
            if desc.kind not in ("stdout", "stderr") and desc.flags & O_ACCMODE != O_WRONLY:
                if desc.kind == "stdin" and p.state.files.stdin_live and \
                        events & (POLLIN | POLLRDNORM) and not _live_stdin_readable(p):
                    waits_for_stdin = True
                else:
                    revents |= events & (POLLIN | POLLRDNORM)
            if desc.kind != "stdin" and desc.flags & O_ACCMODE != O_RDONLY:
                revents |= events & (POLLOUT | POLLWRNORM)
        POLLFD.pack_into(raw, i * POLLFD.size, fd, events, revents)
        ready += revents != 0
    p.mem.write(fds, raw)  # a timeout leaves every revents 0, as Linux does
    return ready, waits_for_stdin


# ------------------------------------------------------------------------------ open/close/dup
def sys_openat(p: LinuxProcess, dirfd: int, pathname: int, flags: int, mode: int,
               *_: int) -> int:
    flags &= 0xFFFF_FFFF
    access = flags & O_ACCMODE
    if access == O_ACCMODE or flags & O_TMPFILE == O_TMPFILE:
        raise _fail(Errno.EINVAL if access == O_ACCMODE else Errno.EOPNOTSUPP)
    creating = bool(flags & O_CREAT)
    follow = not flags & O_NOFOLLOW and not (creating and flags & O_EXCL)
    path = guest_path(p, dirfd, pathname, follow=follow)
    node = p.fs.lookup(path)
    writing = access != O_RDONLY or bool(flags & O_TRUNC)
    if node is None:
        if not creating:
            raise _fail(Errno.ENOENT)
        p.fs.create_file(path, mode, p.realtime_ns())
        kind = "file"
    else:
        if creating and flags & O_EXCL:
            raise _fail(Errno.EEXIST)
        if node.kind == "symlink":
            raise _fail(Errno.ELOOP)
        if node.kind == "dir":
            if writing or creating:
                raise _fail(Errno.EISDIR)
            kind = "dir"
        elif flags & O_DIRECTORY:
            raise _fail(Errno.ENOTDIR)
        elif node.kind == "device":
            kind = DEVICES[path]
            if kind.startswith("fd"):
                shared = p.state.files.fds.get(int(kind[2:]))
                if shared is None:
                    raise _fail(Errno.ENXIO)
                return install_fd(p, shared.description, cloexec=bool(flags & O_CLOEXEC))
        elif node.kind != "file":
            raise _fail(Errno.EACCES)
        else:
            kind = "file"
            if writing and not flags & O_PATH:
                if flags & O_TRUNC:
                    p.fs.truncate(path, 0).mtime_ns = p.realtime_ns()
                else:
                    p.fs.writable(path)
    keep = flags & ~(O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC | O_CLOEXEC)
    desc_id = new_description(p, OpenFileDescription(kind, path, keep))
    return install_fd(p, desc_id, cloexec=bool(flags & O_CLOEXEC))


def sys_close(p: LinuxProcess, fd: int, *_: int) -> int:
    close_fd(p, s32(fd))
    return 0


def sys_dup(p: LinuxProcess, fd: int, *_: int) -> int:
    entry, _desc = lookup_fd(p, fd)
    return install_fd(p, entry.description)


def sys_dup3(p: LinuxProcess, oldfd: int, newfd: int, flags: int, *_: int) -> int:
    entry, _desc = lookup_fd(p, oldfd)
    newfd, flags = s32(newfd), s32(flags)
    if flags & ~O_CLOEXEC or newfd == s32(oldfd):
        raise _fail(Errno.EINVAL)
    if newfd < 0 or newfd >= p.state.files.max_fds:
        raise _fail(Errno.EBADF)
    if newfd in p.state.files.fds:
        close_fd(p, newfd)
    p.state.files.fds[newfd] = FdEntry(entry.description, bool(flags & O_CLOEXEC))
    return newfd


def sys_fcntl(p: LinuxProcess, fd: int, cmd: int, arg: int, *_: int) -> int:
    entry, desc = lookup_fd(p, fd)
    cmd = s32(cmd)
    if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
        lowest = s32(arg)
        if lowest < 0 or lowest >= p.state.files.max_fds:
            raise _fail(Errno.EINVAL)
        return install_fd(p, entry.description, lowest=lowest, cloexec=cmd == F_DUPFD_CLOEXEC)
    if cmd == F_GETFD:
        return FD_CLOEXEC if entry.cloexec else 0
    if cmd == F_SETFD:
        entry.cloexec = bool(arg & FD_CLOEXEC)
        return 0
    if cmd == F_GETFL:
        return desc.flags
    if cmd == F_SETFL:
        desc.flags = (desc.flags & ~O_SETFL_MASK) | (s32(arg) & O_SETFL_MASK)
        return 0
    if cmd == F_GETLK:
        # One process holds every lock there is: report the range as unlocked.
        p.mem.write(arg, F_UNLCK.to_bytes(2, "little"))
        return 0
    if cmd in (F_SETLK, F_SETLKW):
        return 0
    raise _fail(Errno.EINVAL)


def sys_ioctl(p: LinuxProcess, fd: int, request: int, *_: int) -> int:
    entry, _desc = lookup_fd(p, fd)
    request &= 0xFFFF_FFFF
    if request in (FIOCLEX, FIONCLEX):
        entry.cloexec = request == FIOCLEX
        return 0
    raise _fail(Errno.ENOTTY)  # no fd is a terminal (TCGETS, TIOCGWINSZ...)


HANDLERS: MappingProxyType[str, SyscallHandler] = MappingProxyType({
    "read": sys_read, "write": sys_write, "readv": sys_readv, "writev": sys_writev,
    "pread64": sys_pread64, "pwrite64": sys_pwrite64, "sendfile": sys_sendfile, "lseek": sys_lseek,
    "ppoll": sys_ppoll, "openat": sys_openat, "close": sys_close, "dup": sys_dup, "dup3": sys_dup3,
    "fcntl": sys_fcntl, "ioctl": sys_ioctl,
})
