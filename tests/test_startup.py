"""Start-up imports only what a command needs: the modules a command loads, checked structurally.

Each case runs ``pyvmm.cli.main`` in a fresh interpreter and lists ``sys.modules`` at its exit (as
plain lines: printing JSON would import json). No timing is asserted; benchmarks/bench_startup.py
measures the time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BUSYBOX = Path(__file__).resolve().parent / "data" / "busybox" / "bin" / "busybox"

_CHILD = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("".join("module=" + m + "\\n" for m in sorted(sys.modules))))
from pyvmm.cli import main
raise SystemExit(main(sys.argv[1:]))
"""

#: The migration layer, the container format and its parser library, the Linux layer, the
#: assembler, and what only tests, JSON output or file inspection use.
MIGRATION = ("pyvmm.migration.checkpoint", "pyvmm.migration.reload", "pyvmm.migration.container",
             "pyvmm.migration.container_format", "pyvmm.migration.checksum",
             "pyvmm.migration.postcopy_uffd", "pyvmm.migration.periodic", "pyvmm.migration.lazy",
             "pyvmm.migration.squash", "pyvmm.migration.inspect", "pyvmm.migration.verify",
             "pyvmm.migration.container_reader", "pyvmm.migration.container_files",
             "pyvmm.migration.uffd_syscalls", "pyvmm.migration.uffd_async_tracker",
             "pyvmm.migration.savers", "pyvmm.migration.algorithms", "pyvmm.monitor.server",
             "asyncio", "construct")
NEVER_AT_START = ("json", "hypothesis", "pytest", "pyvmm.testing", "uuid", "pickle")


def modules_after(*args: str) -> set[str]:
    """The modules loaded once ``python -m pyvmm ARGS`` has run (it must exit 0)."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.removeprefix("module=") for line in proc.stderr.splitlines()
            if line.startswith("module=")}


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (or their submodules) are in ``modules``."""
    return sorted(m for m in modules for name in names if m == name or m.startswith(name + "."))


def test_noop_run_of_the_builtin_guest_loads_no_migration_linux_or_test_modules() -> None:
    modules = modules_after("run", "-q", "--max-insns", "1")
    assert "pyvmm.machine" in modules and "keystone" in modules  # it did boot the workload
    assert loaded(modules, MIGRATION + NEVER_AT_START + ("pyvmm.linux",)) == []


def test_elf_run_loads_the_linux_layer_but_no_assembler_or_migration() -> None:
    if not BUSYBOX.is_file():
        pytest.fail(f"the busybox guest is missing ({BUSYBOX}): run scripts/fetch-busybox")
    modules = modules_after("run", "-q", "--guest", str(BUSYBOX), "true")
    assert "pyvmm.linux" in modules
    assert loaded(modules, MIGRATION + NEVER_AT_START + ("keystone",)) == []


def test_help_loads_neither_the_assembler_nor_the_migration_layer() -> None:
    modules = modules_after("--help")
    assert "pyvmm.cli" in modules
    assert loaded(modules, MIGRATION + NEVER_AT_START + ("keystone", "pyvmm.linux")) == []


def test_checkpoint_info_loads_no_assembler_and_no_linux_layer(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    save = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-q", "--max-insns", "1",
                           "--no-fsync", "--checkpoint", f"chpt:{path}"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert save.returncode == 0, save.stderr
    modules = modules_after("checkpoint", "info", str(path))
    assert "pyvmm.migration.container" in modules
    assert loaded(modules, ("keystone", "pyvmm.linux", "hypothesis", "pyvmm.testing",
                            "pyvmm.migration.checkpoint", "pyvmm.migration.reload")) == []
