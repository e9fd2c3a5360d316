"""The command line as a user runs it: ``python -m pyvmm run`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def pyvmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True,
                          timeout=timeout, check=False)


def test_default_run_prints_progress_and_exits_zero() -> None:
    proc = pyvmm("run", "--workload", "working_set=4M,passes=3,report=1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0].startswith("pyvmm-workload: ")
    assert any("pass 3/3" in line for line in lines)
    assert lines[-1].startswith("pyvmm-workload: done")
    assert b"guest exited with code 0" in proc.stderr


def test_same_seed_same_bytes_different_seed_different_bytes() -> None:
    args = ("run", "-q", "--workload", "pattern=random,working_set=2M,passes=2")
    first = pyvmm(*args, "--seed", "5")
    second = pyvmm(*args, "--seed", "5")
    other = pyvmm(*args, "--seed", "6")
    assert first.returncode == second.returncode == other.returncode == 0
    assert first.stdout == second.stdout
    assert first.stdout != other.stdout  # the checksum depends on the random pages touched


def test_max_insns_stops_exactly_and_reports_it() -> None:
    proc = pyvmm("run", "--max-insns", "200K", "--workload", "passes=0")
    assert proc.returncode == 0, proc.stderr
    assert b"stopped after 200000 instructions" in proc.stderr


def test_seconds_limit_ends_an_endless_workload() -> None:
    proc = pyvmm("run", "--seconds", "0.5", "--workload", "passes=0,working_set=1M")
    assert proc.returncode == 0, proc.stderr
    assert b"time limit" in proc.stderr


def test_output_file(tmp_path: pytest.TempPathFactory) -> None:
    out = tmp_path / "uart.txt"  # type: ignore[operator]
    proc = pyvmm("run", "-q", "--output", str(out), "--workload", "working_set=1M,passes=1")
    assert proc.returncode == 0
    assert proc.stdout == b""
    assert out.read_bytes().startswith(b"pyvmm-workload: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--ram", "lots"], "invalid RAM size (--ram) 'lots'"),
        (["run", "--ram", "1000"], "RAM size 1000 is not a positive multiple of 4096"),
        (["run", "--workload", "pattern=zigzag"], "pattern"),
        (["run", "--workload", "colour=red"], "colour"),
        (["run", "--max-insns", "-5"], "--max-insns"),
        (["run", "--seconds", "0"], "--seconds must be > 0"),
        (["run", "--guest", "/no/such/program"], "neither a built-in guest"),
        (["run", "--guest"], "--guest needs a program"),
        (["run", "--env", "NOEQUALS", "--guest", "workload"], "--env"),
        (["run", "--workload", "working_set=1G", "--ram", "256M"], "working"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--saver-nice", "40"], "--saver-nice must be 0..19, not 40"),
        (["run", "--fault-mode", "fast"], "invalid choice: 'fast'"),
        (["fly"], "invalid choice: 'fly'"),
    ],
)
def test_bad_arguments_give_one_clear_line(args: list[str], message: str) -> None:
    proc = pyvmm(*args)
    assert proc.returncode in (1, 2)
    err = proc.stderr.decode()
    assert err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith("pyvmm: error: ")
    assert message in err


def test_not_an_elf_guest_is_a_clear_error(tmp_path: pytest.TempPathFactory) -> None:
    fake = tmp_path / "prog"  # type: ignore[operator]
    fake.write_bytes(b"#!/bin/sh\necho hi\n")
    proc = pyvmm("run", "--guest", str(fake))
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("pyvmm: error: ") and "ELF" in err


def test_help_teaches() -> None:
    proc = pyvmm("run", "--help")
    assert proc.returncode == 0
    text = proc.stdout.decode()
    for word in ("--ram", "--seed", "--max-insns", "--seconds", "--workload", "--guest",
                 "pattern", "sequential", "random", "hotcold", "increment", "examples"):
        assert word in text


def test_a_reader_that_goes_away_is_not_an_error(tmp_path: pytest.TempPathFactory) -> None:
    """`pyvmm checkpoint info FILE | head -1`: when the pipe's reader has gone, pyvmm stops
    quietly with the SIGPIPE status instead of a traceback."""
    path = f"{tmp_path}/out.bin"
    made = pyvmm("run", "--max-insns", "10K", "--checkpoint", f"chpt:{path}")
    assert made.returncode == 0, made.stderr
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "checkpoint", "info", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child has started: its first write finds no reader
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == b"", err


def test_output_onto_a_checkpoint_file_is_refused(tmp_path: pytest.TempPathFactory) -> None:
    """--output naming the --incoming or --checkpoint file would overwrite the checkpoint with
    UART text: refused, before anything is opened, and the file keeps every byte."""
    path = f"{tmp_path}/c.bin"
    assert pyvmm("run", "-q", "--max-insns", "10K", "--checkpoint", f"chpt:{path}").returncode == 0
    with open(path, "rb") as f:
        before = f.read()
    for args in (["--incoming", f"chpt:{path}"],
                 ["--max-insns", "10K", "--checkpoint", f"chpt:{path}"],
                 ["--max-insns", "10K", "--checkpoint", f"chpt:{tmp_path}/new.bin"]):
        output = path if "new.bin" not in args[-1] else f"{tmp_path}/./new.bin"
        proc = pyvmm("run", *args, "--output", output)
        assert proc.returncode == 1 and b"checkpoint file" in proc.stderr, proc.stderr
    with open(path, "rb") as f:
        assert f.read() == before


def test_the_run_summary_counts_guest_instructions(tmp_path: Path) -> None:
    """An exact budget shows as itself; an uncounted run as the blocks the vCPU entered."""
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--max-insns", "3M"],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert b", 3M guest instructions (" in proc.stderr.splitlines()[-1], proc.stderr
    path = tmp_path / "done.bin"
    assert subprocess.run([sys.executable, "-m", "pyvmm", "run", "-q", "--workload", "passes=1",
                           "--checkpoint", f"chpt:{path}"], check=False,
                          timeout=120).returncode == 0
    lazy = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--incoming", f"chpt:{path}",
                           "--lazy"], capture_output=True, timeout=120, check=False)
    assert lazy.returncode == 0, lazy.stderr
    # the guest had ended: no "first guest instruction after -", and none ran
    assert b"first guest instruction" not in lazy.stderr, lazy.stderr
    assert b"already powered off" in lazy.stderr


def test_workload_seed_option_seeds_the_guest_as_seed_does() -> None:
    """``--workload seed=N`` is the machine's seed when --seed is not given (it was silently
    replaced by --seed's default), and the two may not disagree."""
    def checksum(*args: str) -> bytes:
        proc = pyvmm("run", "-q", "--workload", "pattern=random,passes=2", *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()[-1]

    by_option = checksum("--workload", "seed=5")
    assert by_option == checksum("--seed", "5") != checksum()
    clash = pyvmm("run", "--workload", "seed=5", "--seed", "4")
    assert clash.returncode == 1
    assert clash.stderr == b"pyvmm: error: --seed 4 and --workload seed=5 disagree: give one " \
                           b"of them\n"


def test_a_ctrl_c_inside_a_class_creation_is_an_interruption_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Python turns a KeyboardInterrupt raised while a class is created (a lazy import, e.g.
    construct's pdb) into a RuntimeError from __set_name__: still one line, exit 130."""
    import pyvmm.run_command
    from pyvmm.cli import main

    def interrupted_import(_args: object) -> int:
        class Descriptor:
            def __set_name__(self, owner: type, name: str) -> None:
                raise KeyboardInterrupt

        class Module:  # noqa: F841 - its creation is the point
            details = Descriptor()

        return 0

    monkeypatch.setattr(pyvmm.run_command, "cmd_run", interrupted_import)
    assert main(["run"]) == 130
    assert capsys.readouterr().err == "pyvmm: interrupted (SIGINT)\n"
