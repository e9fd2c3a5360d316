"""The aarch64 Linux user ABI as numbers: syscall numbers and names, errno, flags, struct layouts.

Everything here is a constant of the kernel's ABI (``include/uapi/asm-generic/*.h`` and
``arch/arm64/include/uapi/asm/*.h``), written out so that the layer does not depend on the host's
own headers or Python's ``errno``/``os`` values, which belong to the host's architecture.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from types import MappingProxyType
from typing import Final

#: A system call handler: ``handler(process, x0, x1, x2, x3, x4, x5)`` returns the value for x0
#: (a negative errno allowed), or None for a call that does not return (exit).
SyscallHandler = Callable[..., int | None]

#: aarch64 (asm-generic) system call numbers to names, for dispatch and for error messages.
SYSCALL_NAMES: Final = MappingProxyType({
    0: "io_setup", 1: "io_destroy", 2: "io_submit", 3: "io_cancel", 4: "io_getevents",
    5: "setxattr", 6: "lsetxattr", 7: "fsetxattr", 8: "getxattr", 9: "lgetxattr", 10: "fgetxattr",
    11: "listxattr", 12: "llistxattr", 13: "flistxattr", 14: "removexattr", 15: "lremovexattr",
    16: "fremovexattr", 17: "getcwd", 18: "lookup_dcookie", 19: "eventfd2", 20: "epoll_create1",
    21: "epoll_ctl", 22: "epoll_pwait", 23: "dup", 24: "dup3", 25: "fcntl", 26: "inotify_init1",
    27: "inotify_add_watch", 28: "inotify_rm_watch", 29: "ioctl", 30: "ioprio_set",
    31: "ioprio_get", 32: "flock", 33: "mknodat", 34: "mkdirat", 35: "unlinkat", 36: "symlinkat",
    37: "linkat", 38: "renameat", 39: "umount2", 40: "mount", 41: "pivot_root", 42: "nfsservctl",
    43: "statfs", 44: "fstatfs", 45: "truncate", 46: "ftruncate", 47: "fallocate",
    48: "faccessat", 49: "chdir", 50: "fchdir", 51: "chroot", 52: "fchmod", 53: "fchmodat",
    54: "fchownat", 55: "fchown", 56: "openat", 57: "close", 58: "vhangup", 59: "pipe2",
    60: "quotactl", 61: "getdents64", 62: "lseek", 63: "read", 64: "write", 65: "readv",
    66: "writev", 67: "pread64", 68: "pwrite64", 69: "preadv", 70: "pwritev", 71: "sendfile",
    72: "pselect6", 73: "ppoll", 74: "signalfd4", 75: "vmsplice", 76: "splice", 77: "tee",
    78: "readlinkat", 79: "newfstatat", 80: "fstat", 81: "sync", 82: "fsync", 83: "fdatasync",
    84: "sync_file_range", 85: "timerfd_create", 86: "timerfd_settime", 87: "timerfd_gettime",
    88: "utimensat", 89: "acct", 90: "capget", 91: "capset", 92: "personality", 93: "exit",
    94: "exit_group", 95: "waitid", 96: "set_tid_address", 97: "unshare", 98: "futex",
    99: "set_robust_list", 100: "get_robust_list", 101: "nanosleep", 102: "getitimer",
    103: "setitimer", 104: "kexec_load", 105: "init_module", 106: "delete_module",
    107: "timer_create", 108: "timer_gettime", 109: "timer_getoverrun", 110: "timer_settime",
    111: "timer_delete", 112: "clock_settime", 113: "clock_gettime", 114: "clock_getres",
    115: "clock_nanosleep", 116: "syslog", 117: "ptrace", 118: "sched_setparam",
    119: "sched_setscheduler", 120: "sched_getscheduler", 121: "sched_getparam",
    122: "sched_setaffinity", 123: "sched_getaffinity", 124: "sched_yield",
    125: "sched_get_priority_max", 126: "sched_get_priority_min", 127: "sched_rr_get_interval",
    128: "restart_syscall", 129: "kill", 130: "tkill", 131: "tgkill", 132: "sigaltstack",
    133: "rt_sigsuspend", 134: "rt_sigaction", 135: "rt_sigprocmask", 136: "rt_sigpending",
    137: "rt_sigtimedwait", 138: "rt_sigqueueinfo", 139: "rt_sigreturn", 140: "setpriority",
    141: "getpriority", 142: "reboot", 143: "setregid", 144: "setgid", 145: "setreuid",
    146: "setuid", 147: "setresuid", 148: "getresuid", 149: "setresgid", 150: "getresgid",
    151: "setfsuid", 152: "setfsgid", 153: "times", 154: "setpgid", 155: "getpgid", 156: "getsid",
    157: "setsid", 158: "getgroups", 159: "setgroups", 160: "uname", 161: "sethostname",
    162: "setdomainname", 163: "getrlimit", 164: "setrlimit", 165: "getrusage", 166: "umask",
    167: "prctl", 168: "getcpu", 169: "gettimeofday", 170: "settimeofday", 171: "adjtimex",
    172: "getpid", 173: "getppid", 174: "getuid", 175: "geteuid", 176: "getgid", 177: "getegid",
    178: "gettid", 179: "sysinfo", 180: "mq_open", 181: "mq_unlink", 182: "mq_timedsend",
    183: "mq_timedreceive", 184: "mq_notify", 185: "mq_getsetattr", 186: "msgget", 187: "msgctl",
    188: "msgrcv", 189: "msgsnd", 190: "semget", 191: "semctl", 192: "semtimedop", 193: "semop",
    194: "shmget", 195: "shmctl", 196: "shmat", 197: "shmdt", 198: "socket", 199: "socketpair",
    200: "bind", 201: "listen", 202: "accept", 203: "connect", 204: "getsockname",
    205: "getpeername", 206: "sendto", 207: "recvfrom", 208: "setsockopt", 209: "getsockopt",
    210: "shutdown", 211: "sendmsg", 212: "recvmsg", 213: "readahead", 214: "brk", 215: "munmap",
    216: "mremap", 217: "add_key", 218: "request_key", 219: "keyctl", 220: "clone", 221: "execve",
    222: "mmap", 223: "fadvise64", 224: "swapon", 225: "swapoff", 226: "mprotect", 227: "msync",
    228: "mlock", 229: "munlock", 230: "mlockall", 231: "munlockall", 232: "mincore",
    233: "madvise", 234: "remap_file_pages", 235: "mbind", 236: "get_mempolicy",
    237: "set_mempolicy", 238: "migrate_pages", 239: "move_pages", 240: "rt_tgsigqueueinfo",
    241: "perf_event_open", 242: "accept4", 243: "recvmmsg", 260: "wait4", 261: "prlimit64",
    262: "fanotify_init", 263: "fanotify_mark", 266: "clock_adjtime", 267: "syncfs", 268: "setns",
    269: "sendmmsg", 270: "process_vm_readv", 271: "process_vm_writev", 272: "kcmp",
    273: "finit_module", 274: "sched_setattr", 275: "sched_getattr", 276: "renameat2",
    277: "seccomp", 278: "getrandom", 279: "memfd_create", 280: "bpf", 281: "execveat",
    282: "userfaultfd", 283: "membarrier", 284: "mlock2", 285: "copy_file_range", 286: "preadv2",
    287: "pwritev2", 288: "pkey_mprotect", 289: "pkey_alloc", 290: "pkey_free", 291: "statx",
    292: "io_pgetevents", 293: "rseq", 294: "kexec_file_load", 424: "pidfd_send_signal",
    425: "io_uring_setup", 426: "io_uring_enter", 427: "io_uring_register", 428: "open_tree",
    429: "move_mount", 430: "fsopen", 431: "fsconfig", 432: "fsmount", 433: "fspick",
    434: "pidfd_open", 435: "clone3", 436: "close_range", 437: "openat2", 438: "pidfd_getfd",
    439: "faccessat2", 440: "process_madvise", 441: "epoll_pwait2", 442: "mount_setattr",
    443: "quotactl_fd", 444: "landlock_create_ruleset", 445: "landlock_add_rule",
    446: "landlock_restrict_self", 447: "memfd_secret", 448: "process_mrelease",
    449: "futex_waitv", 450: "set_mempolicy_home_node",
})
SYSCALL_NUMBERS: Final = MappingProxyType({name: nr for nr, name in SYSCALL_NAMES.items()})


def syscall_name(nr: int) -> str:
    """The name of system call ``nr``, or ``"unknown"`` for a number Linux does not define."""
    return SYSCALL_NAMES.get(nr, "unknown")


class Errno(enum.IntEnum):
    """Linux error numbers (asm-generic/errno-base.h, errno.h) that the layer returns."""

    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    EINTR = 4
    EIO = 5
    ENXIO = 6
    E2BIG = 7
    EBADF = 9
    ECHILD = 10
    EAGAIN = 11
    ENOMEM = 12
    EACCES = 13
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    EXDEV = 18
    ENODEV = 19
    ENOTDIR = 20
    EISDIR = 21
    EINVAL = 22
    EMFILE = 24
    ENOTTY = 25
    EFBIG = 27
    ENOSPC = 28
    ESPIPE = 29
    EROFS = 30
    EPIPE = 32
    ERANGE = 34
    ENAMETOOLONG = 36
    ENOSYS = 38
    ENOTEMPTY = 39
    ELOOP = 40
    EOPNOTSUPP = 95


class LinuxErrno(Exception):
    """A system call fails with ``errno``: raised inside a handler, turned into ``-errno`` in x0.

    Never leaves the syscall layer (it is control flow, not a pyvmm error a user sees).
    """

    def __init__(self, errno: Errno) -> None:
        super().__init__(errno.name)
        self.errno = errno


class SyscallRestart(Exception):
    """A call that would block (waiting for input) gives way to a pause asked for meanwhile:
    raised inside a handler before it changed anything, it rewinds the guest to its ``svc``, so
    that the call runs again once the guest resumes, here or in a process that reloaded the
    checkpoint taken at the pause: as Linux restarts a call interrupted by SIGSTOP.

    Never leaves the syscall layer (control flow, like :class:`LinuxErrno`)."""


#: Signal numbers (asm-generic/signal.h) to names, for messages and dispositions.
SIGNAL_NAMES: Final = MappingProxyType({
    1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS",
    8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2", 13: "SIGPIPE",
    14: "SIGALRM", 15: "SIGTERM", 16: "SIGSTKFLT", 17: "SIGCHLD", 18: "SIGCONT", 19: "SIGSTOP",
    20: "SIGTSTP", 21: "SIGTTIN", 22: "SIGTTOU", 23: "SIGURG", 24: "SIGXCPU", 25: "SIGXFSZ",
    26: "SIGVTALRM", 27: "SIGPROF", 28: "SIGWINCH", 29: "SIGIO", 30: "SIGPWR", 31: "SIGSYS",
})
SIGKILL, SIGSTOP = 9, 19
NSIG = 64
#: Signals whose default action is to do nothing (the others terminate or stop the process).
SIGNALS_IGNORED_BY_DEFAULT: Final = frozenset({17, 18, 23, 28})  # CHLD, CONT, URG, WINCH
SIG_DFL, SIG_IGN = 0, 1


def signal_name(sig: int) -> str:
    if sig in SIGNAL_NAMES:
        return SIGNAL_NAMES[sig]
    return f"SIGRTMIN+{sig - 32}" if 32 <= sig <= NSIG else f"signal {sig}"


# ---------------------------------------------------------------------------------- files
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_EACCESS = 0x200
AT_SYMLINK_FOLLOW = 0x400
AT_NO_AUTOMOUNT = 0x800
AT_EMPTY_PATH = 0x1000

# open(2) flags: arm64 has its own values for DIRECTORY/NOFOLLOW/DIRECT/LARGEFILE.
O_ACCMODE = 0o3
O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2
O_CREAT = 0o100
O_EXCL = 0o200
O_NOCTTY = 0o400
O_TRUNC = 0o1000
O_APPEND = 0o2000
O_NONBLOCK = 0o4000
O_DSYNC = 0o10000
O_DIRECTORY = 0o40000
O_NOFOLLOW = 0o100000
O_DIRECT = 0o200000
O_LARGEFILE = 0o400000
O_NOATIME = 0o1000000
O_CLOEXEC = 0o2000000
O_PATH = 0o10000000
O_TMPFILE = 0o20000000
#: Status flags F_SETFL may change.
O_SETFL_MASK = O_APPEND | O_NONBLOCK | O_DIRECT | O_NOATIME

F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_GETLK, F_SETLK, F_SETLKW = range(8)
F_DUPFD_CLOEXEC = 1030
FD_CLOEXEC = 1
F_UNLCK = 2

SEEK_SET, SEEK_CUR, SEEK_END, SEEK_DATA, SEEK_HOLE = range(5)

R_OK, W_OK, X_OK = 4, 2, 1

S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o60000
S_IFDIR = 0o40000
S_IFCHR = 0o20000
S_IFIFO = 0o10000

# d_type values of getdents64.
DT_FIFO, DT_CHR, DT_DIR, DT_REG, DT_LNK = 1, 2, 4, 8, 10

FIOCLEX, FIONCLEX = 0x5451, 0x5450

PATH_MAX = 4096
IOV_MAX = 1024

#: struct stat (asm-generic/stat.h, 128 bytes): dev, ino, mode, nlink, uid, gid, rdev, pad,
#: size, blksize, pad, blocks, atime, atime_nsec, mtime, mtime_nsec, ctime, ctime_nsec, unused[2].
STAT = struct.Struct("<QQIIIIQQqiiqqQqQqQII")
#: struct linux_dirent64 header: d_ino, d_off, d_reclen, d_type (the name follows).
DIRENT64 = struct.Struct("<QqHB")
IOVEC = struct.Struct("<QQ")
#: struct pollfd: fd, events, revents.
POLLFD = struct.Struct("<ihh")
POLLIN, POLLOUT, POLLNVAL, POLLRDNORM, POLLWRNORM = 0x1, 0x4, 0x20, 0x40, 0x100
TIMESPEC = struct.Struct("<qq")
TIMEVAL = struct.Struct("<qq")
#: struct sigaction as the arm64 kernel takes it: handler, flags, restorer, mask.
SIGACTION = struct.Struct("<QQQQ")
#: stack_t: ss_sp, ss_flags (int, padded), ss_size.
STACK_T = struct.Struct("<Qi4xQ")
RLIMIT = struct.Struct("<QQ")
#: struct sysinfo on 64-bit: uptime, loads[3], totalram, freeram, sharedram, bufferram, totalswap,
#: freeswap, procs (u16), pad, totalhigh, freehigh, mem_unit (u32), padding to 112 bytes.
SYSINFO = struct.Struct("<q3Q6QHH4xQQI4x")
UTSNAME_FIELD = 65
ROBUST_LIST_HEAD_SIZE = 24
RLIM_INFINITY = (1 << 64) - 1

# ---------------------------------------------------------------------------------- memory
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_SHARED_VALIDATE = 0x03
MAP_TYPE = 0x0F
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x100
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
MADV_DONTNEED = 4
MADV_FREE = 8

# ---------------------------------------------------------------------------------- misc
CLOCK_REALTIME = 0
CLOCK_MONOTONIC = 1
CLOCK_PROCESS_CPUTIME_ID = 2
CLOCK_THREAD_CPUTIME_ID = 3
CLOCK_MONOTONIC_RAW = 4
CLOCK_REALTIME_COARSE = 5
CLOCK_MONOTONIC_COARSE = 6
CLOCK_BOOTTIME = 7
CLOCK_REALTIME_ALARM = 8
CLOCK_BOOTTIME_ALARM = 9
CLOCK_TAI = 11
TIMER_ABSTIME = 1

FUTEX_WAIT, FUTEX_WAKE = 0, 1
FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 9, 10
FUTEX_CMD_MASK = 0x7F  # drops FUTEX_PRIVATE_FLAG (128) and FUTEX_CLOCK_REALTIME (256)

SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2

RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_DATA, RLIMIT_STACK, RLIMIT_CORE = 0, 1, 2, 3, 4
RLIMIT_NOFILE = 7
RLIMIT_AS = 9
RLIM_NLIMITS = 16

GRND_NONBLOCK, GRND_RANDOM, GRND_INSECURE = 1, 2, 4

# ---------------------------------------------------------------------------------- auxv
AT_NULL = 0
AT_PHDR = 3
AT_PHENT = 4
AT_PHNUM = 5
AT_PAGESZ = 6
AT_BASE = 7
AT_FLAGS = 8
AT_ENTRY = 9
AT_UID = 11
AT_EUID = 12
AT_GID = 13
AT_EGID = 14
AT_PLATFORM = 15
AT_HWCAP = 16
AT_CLKTCK = 17
AT_SECURE = 23
AT_RANDOM = 25
AT_HWCAP2 = 26
AT_EXECFN = 31
HWCAP_FP = 1 << 0
HWCAP_ASIMD = 1 << 1
CLOCKS_PER_SEC = 100
