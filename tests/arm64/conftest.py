"""Fixtures for the real-guest tests: the busybox binary, and running a Linux program to its end.

The busybox guest is Debian's static arm64 build, fetched by ``scripts/fetch-busybox`` into
tests/data/busybox/ (PYVMM_BUSYBOX names another binary).  A missing guest fails the tests, it
never skips them: CI must not go green without having run the real guest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest

from pyvmm.linux import LinuxProcess, load_program
from pyvmm.machine import Machine, RunResult, StopReason

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = ROOT / "tests" / "data" / "busybox" / "bin" / "busybox"
FETCH = ROOT / "scripts" / "fetch-busybox"


@pytest.fixture(scope="session")
def busybox() -> str:
    """Path of the static arm64 busybox binary (fetched on first use)."""
    override = os.environ.get("PYVMM_BUSYBOX")
    if override:
        if not os.path.isfile(override):
            pytest.fail(f"PYVMM_BUSYBOX={override} does not name a file")
        return override
    if not BUSYBOX.is_file():
        proc = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True,
                              timeout=900, check=False)
        if not BUSYBOX.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            pytest.fail(f"the busybox guest is missing ({BUSYBOX}) and {FETCH.name} could not "
                        f"fetch it (exit {proc.returncode}): " + " | ".join(tail))
    return str(BUSYBOX)


@dataclasses.dataclass
class GuestRun:
    """The outcome of running a Linux program to its end."""

    result: RunResult
    stdout: bytes
    stderr: bytes
    process: LinuxProcess
    #: SHA-256 over every RAM block's bytes at the end (the whole guest memory), if asked for.
    ram_hash: str

    @property
    def exit_code(self) -> int | None:
        return self.result.exit_code


RunGuest = Callable[..., GuestRun]


def run_guest(program: str, argv: list[str], *, files: Iterable[str] = (), stdin: bytes = b"",
              seed: int = 0, env: Mapping[str, str] | None = None, cwd: str | None = None,
              ram: int = 64 << 20, expect_exit: bool = True, hash_ram: bool = False) -> GuestRun:
    """Load ``program`` on a fresh machine, run it to the end, and collect what it did.

    ``expect_exit``: fail unless the program exits (set False to look at a run's error);
    ``hash_ram``: fill ``GuestRun.ram_hash`` (hashes all guest RAM, ~0.2 s).
    """
    with Machine(ram, seed=seed, name=os.path.basename(argv[0])) as machine:
        process = load_program(machine, program, argv, files=list(files), stdin=stdin, env=env,
                               cwd=cwd)
        result = machine.run(seconds=300)
        if expect_exit and result.reason is not StopReason.SHUTDOWN:
            raise AssertionError(f"{argv} did not exit: {result}; stderr "
                                 f"{bytes(process.stderr_data)[-500:]!r}")
        digest = hashlib.sha256()
        for block in machine.ram_blocks if hash_ram else ():
            digest.update(block.mem)
        process.close()
        return GuestRun(result, bytes(process.stdout_data), bytes(process.stderr_data), process,
                        digest.hexdigest())


@pytest.fixture
def run_linux() -> RunGuest:
    """``run_linux(program_path, argv, **options)``: see :func:`run_guest`."""
    return run_guest


@pytest.fixture
def run_busybox(busybox: str) -> Callable[..., GuestRun]:
    """``run_busybox(applet, *args, files=..., stdin=...)``: run one busybox applet."""

    def run(*args: str, **kwargs: object) -> GuestRun:
        return run_guest(busybox, ["busybox", *args], **kwargs)  # type: ignore[arg-type]

    return run
