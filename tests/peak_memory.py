"""Peak memory of one ``pyvmm`` command, measured in the process that ran it.

``wait4``'s ``ru_maxrss`` of a child also counts what it held before ``exec``: the forked copy of
the test process (a full suite's pytest is ~200 MiB), so a bound on it depends on what ran
before. The command runs instead under a small ``python -c`` that calls :func:`pyvmm.cli.main`
and reports ``VmHWM`` of its own address space (made at ``exec``) through a pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

_MEASURED = """\
import os, sys
from pyvmm.cli import main
try:
    code = main(sys.argv[1:])
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            os.write(int(os.environ["PYVMM_TEST_PEAK_FD"]), line.split()[1].encode())
raise SystemExit(code)
"""


def run_measured(args: Sequence[str | Path], *, timeout: float = 300,
                 stdin: int | None = subprocess.DEVNULL) -> tuple[int, bytes, bytes, int]:
    """(exit status, stdout, stderr, peak RSS in bytes) of ``pyvmm ARGS`` (``pyvmm.cli.main``:
    what ``python -m pyvmm`` runs)."""
    read, write = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _MEASURED, *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin,
                                pass_fds=(write,),
                                env=dict(os.environ, PYVMM_TEST_PEAK_FD=str(write)))
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as report:
        out, err = proc.communicate(timeout=timeout)
        peak_kib = report.read()
    return proc.returncode, out, err, int(peak_kib or 0) << 10


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field of this process (VmRSS, VmHWM...), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")
