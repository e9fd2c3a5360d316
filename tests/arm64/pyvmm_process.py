"""A ``python -m pyvmm`` process for the tests that drive a running one (monitor, guest-inform):
start it, wait for its socket, and collect how it ended, with its stderr when it misbehaves."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEADLINE = 120.0


def start(*args: str | Path, env: dict[str, str] | None = None,
          stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """``python -m pyvmm ARGS`` with its output piped."""
    return subprocess.Popen([sys.executable, "-m", "pyvmm", *map(str, args)],
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until ``path`` exists (pyvmm makes its sockets listening, then renames them there)."""
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"pyvmm ended ({proc.returncode}): {proc.communicate()[1]!r}")
        assert time.monotonic() < deadline, f"the socket {path} never appeared"
        time.sleep(0.01)


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr) once it ends by itself (killed after DEADLINE: fails)."""
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"pyvmm did not end: {err[-2000:]!r}") from None
    return proc.returncode, out, err


async def quit_disconnect(client: Any) -> None:
    """``client.disconnect()`` after ``quit``: the server may close the stream first, which
    qemu.qmp reports as EOFError (QEMU's own test harness expects it the same way after quit)."""
    try:
        await client.disconnect()
    except EOFError:
        pass
