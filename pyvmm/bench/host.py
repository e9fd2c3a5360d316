"""The machine a bench record was measured on: CPU, cores, kernel, page size, THP, filesystem."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from typing import Any


def _first(path: str, prefix: str = "") -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip() if prefix else line.strip()
    except OSError:
        pass
    return ""


def _bracketed(path: str) -> str:
    """The selected word of a sysfs choice file (``always [madvise] never`` -> madvise)."""
    text = _first(path)
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else text


def filesystem(directory: str) -> str:
    """The type of the filesystem ``directory`` is on (the longest mount point above it)."""
    target = str(Path(directory).resolve())
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def status_kib(field: str, pid: int | str = "self") -> int:
    """A ``/proc/PID/status`` field in KiB (VmRSS, VmHWM); 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int | str = "self") -> int | None:
    """Start a peak-memory window: VmHWM back to the current RSS (Linux: clear_refs 5).  The
    KiB the window starts from (VmHWM just after), or None where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return None
    return status_kib("VmHWM", pid)


def peak_rss_growth(baseline: int | None, pid: int | str = "self") -> int:
    """Bytes the peak RSS rose since :func:`reset_peak_rss` gave ``baseline`` (-1: unknown).
    The kernel's RSS counters are per-CPU and read approximately, so a process that freed
    memory in the window can read a few pages below its start: that is 0, not a negative."""
    if baseline is None:
        return -1
    return max(0, status_kib("VmHWM", pid) - baseline) * 1024


def describe_host(directory: str = ".") -> dict[str, Any]:
    """What a reader of the numbers needs to know about where they come from."""
    from .. import __version__

    return {
        "hostname": socket.gethostname(),
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "thp": _bracketed("/sys/kernel/mm/transparent_hugepage/enabled"),
        "filesystem": filesystem(directory),
        "python": platform.python_version(),
        "pyvmm": __version__,
    }
