"""Process system calls: memory, exit, identity, time, randomness, signals, limits, futexes.

Same handler convention as :mod:`pyvmm.linux.sys_io`.  Everything the guest can observe is
a function of the machine seed and of what the guest did: time is the machine's virtual counter
(sleeps advance it and return at once), randomness is a seeded stream, identities and the system
description are fixed.  There is one thread and signals are recorded, never delivered; a signal
that would kill the process stops the run with a GuestError saying so.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import GuestError
from . import mm
from .abi import (
    CLOCK_BOOTTIME,
    CLOCK_BOOTTIME_ALARM,
    CLOCK_MONOTONIC,
    CLOCK_MONOTONIC_COARSE,
    CLOCK_MONOTONIC_RAW,
    CLOCK_PROCESS_CPUTIME_ID,
    CLOCK_REALTIME,
    CLOCK_REALTIME_ALARM,
    CLOCK_REALTIME_COARSE,
    CLOCK_TAI,
    CLOCK_THREAD_CPUTIME_ID,
    FUTEX_CMD_MASK,
    FUTEX_WAIT,
    FUTEX_WAIT_BITSET,
    FUTEX_WAKE,
    FUTEX_WAKE_BITSET,
    GRND_INSECURE,
    GRND_NONBLOCK,
    GRND_RANDOM,
    MAP_ANONYMOUS,
    NSIG,
    O_ACCMODE,
    O_WRONLY,
    RLIM_INFINITY,
    RLIM_NLIMITS,
    RLIMIT,
    RLIMIT_NOFILE,
    RLIMIT_STACK,
    ROBUST_LIST_HEAD_SIZE,
    SIG_BLOCK,
    SIG_DFL,
    SIG_IGN,
    SIG_SETMASK,
    SIG_UNBLOCK,
    SIGACTION,
    SIGKILL,
    SIGNALS_IGNORED_BY_DEFAULT,
    SIGSTOP,
    STACK_T,
    SYSINFO,
    TIMER_ABSTIME,
    TIMESPEC,
    TIMEVAL,
    UTSNAME_FIELD,
    Errno,
    LinuxErrno,
    SyscallHandler,
    signal_name,
)
from .state import SigAction
from .sys_io import description, s32

if TYPE_CHECKING:
    from .process import LinuxProcess

#: The guest's identity: one process, run by root.
PID = 1000
PPID = 1
UID = GID = 0
PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_NAME, PR_GET_NAME = 1, 3, 4, 15, 16
UTSNAME = ("Linux", "pyvmm", "6.1.0-pyvmm", "#1 SMP PREEMPT pyvmm", "aarch64", "(none)")
_GETRANDOM_MAX = 1 << 20
_SIGSET_SIZE = 8
_UNBLOCKABLE = (1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1))
_CLOCKS_WALL = (CLOCK_REALTIME, CLOCK_REALTIME_COARSE, CLOCK_REALTIME_ALARM, CLOCK_TAI)
_CLOCKS_MONO = (CLOCK_MONOTONIC, CLOCK_MONOTONIC_RAW, CLOCK_MONOTONIC_COARSE, CLOCK_BOOTTIME,
                CLOCK_BOOTTIME_ALARM, CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID)


def _fail(errno: Errno) -> LinuxErrno:
    return LinuxErrno(errno)


# ------------------------------------------------------------------------------ memory
def sys_brk(p: LinuxProcess, addr: int, *_: int) -> int:
    return mm.brk(p.state.memory, p.mem, addr)


def sys_mmap(p: LinuxProcess, addr: int, length: int, prot: int, flags: int, fd: int,
             offset: int) -> int:
    flags &= 0xFFFF_FFFF
    path: str | None = None
    if not flags & MAP_ANONYMOUS:
        desc = description(p, fd)
        if desc.kind != "file":
            raise _fail(Errno.ENODEV if desc.kind != "dir" else Errno.EACCES)
        if desc.flags & O_ACCMODE == O_WRONLY:
            raise _fail(Errno.EACCES)
        path = desc.path
    return mm.mmap(p.state.memory, p.mem, p.fs.read, addr, length, prot & 0xFFFF_FFFF, flags,
                   path, offset)


def sys_munmap(p: LinuxProcess, addr: int, length: int, *_: int) -> int:
    return mm.munmap(p.state.memory, addr, length)


def sys_mremap(p: LinuxProcess, old: int, old_size: int, new_size: int, flags: int,
               new_addr: int, *_: int) -> int:
    return mm.mremap(p.state.memory, p.mem, old, old_size, new_size, s32(flags), new_addr)


def sys_mprotect(p: LinuxProcess, addr: int, length: int, prot: int, *_: int) -> int:
    return mm.mprotect(p.state.memory, addr, length, prot & 0xFFFF_FFFF)


def sys_madvise(p: LinuxProcess, addr: int, length: int, advice: int, *_: int) -> int:
    return mm.madvise(p.state.memory, p.mem, p.fs.read, addr, length, s32(advice))


def sys_accepted(p: LinuxProcess, *_: int) -> int:
    """msync, mlock, munlock...: nothing to do on memory that is always resident."""
    return 0


# ------------------------------------------------------------------------------ exit, identity
def sys_exit_group(p: LinuxProcess, status: int, *_: int) -> None:
    code = status & 0xFF
    p.state.exit_code = code
    p.machine.request_stop(code)
    return None


def sys_set_tid_address(p: LinuxProcess, tidptr: int, *_: int) -> int:
    p.state.clear_child_tid = tidptr
    return PID


def sys_set_robust_list(p: LinuxProcess, head: int, length: int, *_: int) -> int:
    if length != ROBUST_LIST_HEAD_SIZE:
        raise _fail(Errno.EINVAL)
    p.state.robust_list_head = head
    return 0


def sys_enosys(p: LinuxProcess, *_: int) -> int:
    """Calls a program must cope without (rseq): the kernel may lack them too."""
    raise _fail(Errno.ENOSYS)


def sys_getpid(p: LinuxProcess, *_: int) -> int:
    return PID


def sys_getppid(p: LinuxProcess, *_: int) -> int:
    return PPID


def sys_getuid(p: LinuxProcess, *_: int) -> int:
    return UID


def sys_getresuid(p: LinuxProcess, ruid: int, euid: int, suid: int, *_: int) -> int:
    for addr in (ruid, euid, suid):
        p.mem.write(addr, UID.to_bytes(4, "little"))
    return 0


def sys_getgroups(p: LinuxProcess, size: int, *_: int) -> int:
    if s32(size) < 0:
        raise _fail(Errno.EINVAL)
    return 0


def sys_setpgid(p: LinuxProcess, pid: int, pgid: int, *_: int) -> int:
    if s32(pid) not in (0, PID) or s32(pgid) not in (0, PID):
        raise _fail(Errno.EPERM)
    return 0


def sys_getpgid(p: LinuxProcess, pid: int, *_: int) -> int:
    if s32(pid) not in (0, PID):
        raise _fail(Errno.ESRCH)
    return PID


def sys_setsid(p: LinuxProcess, *_: int) -> int:
    raise _fail(Errno.EPERM)  # already a process group leader


def sys_wait4(p: LinuxProcess, *_: int) -> int:
    raise _fail(Errno.ECHILD)


def sys_uname(p: LinuxProcess, buf: int, *_: int) -> int:
    raw = b"".join(field.encode().ljust(UTSNAME_FIELD, b"\0") for field in UTSNAME)
    p.mem.write(buf, raw)
    return 0


def sys_sysinfo(p: LinuxProcess, buf: int, *_: int) -> int:
    total = p.machine.ram.size
    used = sum(m.length for m in p.state.memory.mappings)
    uptime = p.now_ns() // 1_000_000_000
    p.mem.write(buf, SYSINFO.pack(uptime, 0, 0, 0, total, max(total - used, 0), 0, 0, 0, 0,
                                  1, 0, 0, 0, 1))
    return 0


def _default_rlimit(p: LinuxProcess, resource: int) -> list[int]:
    if resource == RLIMIT_STACK:
        return [p.state.memory.stack_size, RLIM_INFINITY]
    if resource == RLIMIT_NOFILE:
        return [p.state.files.max_fds, p.state.files.max_fds]
    return [RLIM_INFINITY, RLIM_INFINITY]


def sys_prlimit64(p: LinuxProcess, pid: int, resource: int, new: int, old: int,
                  *_: int) -> int:
    if s32(pid) not in (0, PID):
        raise _fail(Errno.ESRCH)
    resource = s32(resource)
    if not 0 <= resource < RLIM_NLIMITS:
        raise _fail(Errno.EINVAL)
    current = p.state.rlimits.get(resource) or _default_rlimit(p, resource)
    if new:
        soft, hard = RLIMIT.unpack(p.mem.read(new, RLIMIT.size))
        if soft > hard:
            raise _fail(Errno.EINVAL)
    if old:
        p.mem.write(old, RLIMIT.pack(*current))
    if new:
        p.state.rlimits[resource] = [soft, hard]
    return 0


def sys_getrlimit(p: LinuxProcess, resource: int, rlim: int, *_: int) -> int:
    return sys_prlimit64(p, 0, resource, 0, rlim)


def sys_setrlimit(p: LinuxProcess, resource: int, rlim: int, *_: int) -> int:
    return sys_prlimit64(p, 0, resource, rlim, 0)


def sys_getrusage(p: LinuxProcess, who: int, usage: int, *_: int) -> int:
    now_us = p.now_ns() // 1000
    user = TIMEVAL.pack(now_us // 1_000_000, now_us % 1_000_000)
    p.mem.write(usage, user + bytes(144 - len(user)))
    return 0


def sys_prctl(p: LinuxProcess, option: int, arg2: int, *_: int) -> int:
    option = s32(option)
    if option == PR_SET_NAME:
        raw = p.mem.read_cstring(arg2, 4096)[:15]
        p.state.comm = raw.decode("utf-8", "surrogateescape")
        return 0
    if option == PR_GET_NAME:
        p.mem.write(arg2, p.state.comm.encode("utf-8", "surrogateescape")[:15].ljust(16, b"\0"))
        return 0
    if option == PR_GET_DUMPABLE:
        return 1
    if option in (PR_SET_DUMPABLE, PR_SET_PDEATHSIG):
        return 0
    raise _fail(Errno.EINVAL)


def sys_sched_getaffinity(p: LinuxProcess, pid: int, size: int, mask: int, *_: int) -> int:
    if s32(pid) not in (0, PID):
        raise _fail(Errno.ESRCH)
    if size < 8 or size % 8:
        raise _fail(Errno.EINVAL)
    p.mem.write(mask, (1).to_bytes(8, "little"))  # one CPU
    return 8


# ------------------------------------------------------------------------------ time
def _clock_ns(p: LinuxProcess, clock: int) -> int:
    clock = s32(clock)
    if clock in _CLOCKS_WALL:
        return p.realtime_ns()
    if clock in _CLOCKS_MONO:
        return p.now_ns()
    raise _fail(Errno.EINVAL)


def sys_clock_gettime(p: LinuxProcess, clock: int, tp: int, *_: int) -> int:
    sec, nsec = divmod(_clock_ns(p, clock), 1_000_000_000)
    p.mem.write(tp, TIMESPEC.pack(sec, nsec))
    return 0


def sys_clock_getres(p: LinuxProcess, clock: int, res: int, *_: int) -> int:
    if s32(clock) not in _CLOCKS_WALL + _CLOCKS_MONO:
        raise _fail(Errno.EINVAL)
    if res:
        p.mem.write(res, TIMESPEC.pack(0, 1))
    return 0


def sys_gettimeofday(p: LinuxProcess, tv: int, tz: int, *_: int) -> int:
    if tv:
        usec = p.realtime_ns() // 1000
        p.mem.write(tv, TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000))
    if tz:
        p.mem.write(tz, bytes(8))  # UTC, no DST
    return 0


def _read_timespec(p: LinuxProcess, addr: int) -> int:
    sec, nsec = TIMESPEC.unpack(p.mem.read(addr, TIMESPEC.size))
    if sec < 0 or not 0 <= nsec < 1_000_000_000:
        raise _fail(Errno.EINVAL)
    return int(sec * 1_000_000_000 + nsec)


def sys_nanosleep(p: LinuxProcess, req: int, rem: int, *_: int) -> int:
    p.sleep(_read_timespec(p, req))
    return 0


def sys_clock_nanosleep(p: LinuxProcess, clock: int, flags: int, req: int, rem: int,
                        *_: int) -> int:
    wanted = _read_timespec(p, req)
    if s32(flags) & TIMER_ABSTIME:
        wanted -= _clock_ns(p, clock)
    else:
        _clock_ns(p, clock)  # validates the clock id
    if wanted > 0:
        p.sleep(wanted)
    return 0


def sys_times(p: LinuxProcess, buf: int, *_: int) -> int:
    ticks = p.now_ns() // 10_000_000  # CLOCKS_PER_SEC = 100
    if buf:
        p.mem.write(buf, ticks.to_bytes(8, "little") + bytes(24))
    return ticks


# ------------------------------------------------------------------------------ randomness
def sys_getrandom(p: LinuxProcess, buf: int, length: int, flags: int, *_: int) -> int:
    if s32(flags) & ~(GRND_NONBLOCK | GRND_RANDOM | GRND_INSECURE):
        raise _fail(Errno.EINVAL)
    length = min(length, _GETRANDOM_MAX)  # Linux too may return fewer bytes than asked
    if not p.mem.valid(buf, length):
        raise _fail(Errno.EFAULT)
    p.mem.write(buf, p.random_bytes(length))
    return length


# ------------------------------------------------------------------------------ signals
def _check_signal(sig: int) -> int:
    sig = s32(sig)
    if not 1 <= sig <= NSIG:
        raise _fail(Errno.EINVAL)
    return sig


def sys_rt_sigaction(p: LinuxProcess, sig: int, act: int, oldact: int, sigsetsize: int,
                     *_: int) -> int:
    if sigsetsize != _SIGSET_SIZE:
        raise _fail(Errno.EINVAL)
    sig = _check_signal(sig)
    if act and sig in (SIGKILL, SIGSTOP):
        raise _fail(Errno.EINVAL)
    current = p.state.signals.actions.get(sig, SigAction())
    new = SigAction(*SIGACTION.unpack(p.mem.read(act, SIGACTION.size))) if act else None
    if oldact:
        p.mem.write(oldact, SIGACTION.pack(current.handler, current.flags, current.restorer,
                                           current.mask))
    if new is not None:
        new.mask &= ~_UNBLOCKABLE
        p.state.signals.actions[sig] = new
    return 0


def sys_rt_sigprocmask(p: LinuxProcess, how: int, new: int, old: int, sigsetsize: int,
                       *_: int) -> int:
    if sigsetsize != _SIGSET_SIZE:
        raise _fail(Errno.EINVAL)
    signals = p.state.signals
    value = p.mem.read_u64(new) if new else None
    if value is not None and s32(how) not in (SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK):
        raise _fail(Errno.EINVAL)
    if old:
        p.mem.write_u64(old, signals.mask)
    if value is not None:
        how = s32(how)
        if how == SIG_BLOCK:
            signals.mask |= value
        elif how == SIG_UNBLOCK:
            signals.mask &= ~value
        else:
            signals.mask = value
        signals.mask &= ~_UNBLOCKABLE & ((1 << 64) - 1)
    return 0


def sys_sigaltstack(p: LinuxProcess, ss: int, old: int, *_: int) -> int:
    signals = p.state.signals
    if old:
        p.mem.write(old, STACK_T.pack(signals.altstack_sp, signals.altstack_flags,
                                      signals.altstack_size))
    if ss:
        sp, flags, size = STACK_T.unpack(p.mem.read(ss, STACK_T.size))
        signals.altstack_sp, signals.altstack_flags, signals.altstack_size = sp, flags, size
    return 0


def _send_to_self(p: LinuxProcess, sig: int) -> int:
    sig = s32(sig)
    if sig == 0:
        return 0
    sig = _check_signal(sig)
    action = p.state.signals.actions.get(sig, SigAction())
    if action.handler == SIG_IGN or action.handler == SIG_DFL and \
            sig in SIGNALS_IGNORED_BY_DEFAULT:
        return 0
    if p.state.signals.mask & (1 << (sig - 1)) and sig not in (SIGKILL, SIGSTOP):
        return 0  # blocked: it would stay pending, and nothing here ever unblocks delivery
    name = signal_name(sig)
    if action.handler == SIG_DFL or sig in (SIGKILL, SIGSTOP):
        p.state.killed_by = name
        raise GuestError(f"killed by signal {name}", pc=p.pc(), guest=p.guest)
    raise GuestError(f"the program sent itself {name}, which has a handler; pyvmm does not "
                     f"deliver signals", pc=p.pc(), guest=p.guest)


def sys_kill(p: LinuxProcess, pid: int, sig: int, *_: int) -> int:
    if s32(pid) not in (0, -1, PID, -PID):
        raise _fail(Errno.ESRCH)
    return _send_to_self(p, sig)


def sys_tkill(p: LinuxProcess, tid: int, sig: int, *_: int) -> int:
    if s32(tid) != PID:
        raise _fail(Errno.ESRCH if s32(tid) > 0 else Errno.EINVAL)
    return _send_to_self(p, sig)


def sys_tgkill(p: LinuxProcess, tgid: int, tid: int, sig: int, *_: int) -> int:
    if s32(tgid) != PID:
        raise _fail(Errno.ESRCH if s32(tgid) > 0 else Errno.EINVAL)
    return sys_tkill(p, tid, sig)


# ------------------------------------------------------------------------------ futex
def sys_futex(p: LinuxProcess, uaddr: int, op: int, val: int, *_: int) -> int:
    cmd = s32(op) & FUTEX_CMD_MASK
    if cmd in (FUTEX_WAKE, FUTEX_WAKE_BITSET):
        p.mem.read(uaddr, 4)
        return 0  # no other thread waits
    if cmd in (FUTEX_WAIT, FUTEX_WAIT_BITSET):
        if p.mem.read_u32(uaddr) != val & 0xFFFF_FFFF:
            raise _fail(Errno.EAGAIN)
        raise GuestError("futex wait with no other thread to wake it: the single-threaded "
                         "program would hang forever", pc=p.pc(), guest=p.guest)
    raise _fail(Errno.ENOSYS)


def sys_sched_yield(p: LinuxProcess, *_: int) -> int:
    return 0


HANDLERS: MappingProxyType[str, SyscallHandler] = MappingProxyType({
    "brk": sys_brk, "mmap": sys_mmap, "munmap": sys_munmap, "mremap": sys_mremap,
    "mprotect": sys_mprotect, "madvise": sys_madvise, "msync": sys_accepted,
    "mlock": sys_accepted, "munlock": sys_accepted,
    "exit": sys_exit_group, "exit_group": sys_exit_group,
    "set_tid_address": sys_set_tid_address, "set_robust_list": sys_set_robust_list,
    "rseq": sys_enosys,
    "getpid": sys_getpid, "gettid": sys_getpid, "getppid": sys_getppid,
    "getuid": sys_getuid, "geteuid": sys_getuid, "getgid": sys_getuid, "getegid": sys_getuid,
    "getresuid": sys_getresuid, "getresgid": sys_getresuid, "getgroups": sys_getgroups,
    "setpgid": sys_setpgid, "getpgid": sys_getpgid, "getsid": sys_getpgid,
    "setsid": sys_setsid, "wait4": sys_wait4,
    "uname": sys_uname, "sysinfo": sys_sysinfo, "prlimit64": sys_prlimit64,
    "getrlimit": sys_getrlimit, "setrlimit": sys_setrlimit, "getrusage": sys_getrusage,
    "prctl": sys_prctl, "sched_getaffinity": sys_sched_getaffinity, "sched_yield": sys_sched_yield,
    "clock_gettime": sys_clock_gettime, "clock_getres": sys_clock_getres,
    "gettimeofday": sys_gettimeofday, "nanosleep": sys_nanosleep,
    "clock_nanosleep": sys_clock_nanosleep, "times": sys_times,
    "getrandom": sys_getrandom,
    "rt_sigaction": sys_rt_sigaction, "rt_sigprocmask": sys_rt_sigprocmask,
    "sigaltstack": sys_sigaltstack, "kill": sys_kill, "tkill": sys_tkill, "tgkill": sys_tgkill,
    "futex": sys_futex,
})
