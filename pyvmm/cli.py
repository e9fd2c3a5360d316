"""The ``pyvmm`` command line: argument parsing, one-line errors, and the ``run`` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import BinaryIO

from .boot import BUILTIN_GUESTS, GuestSpec, boot
from .errors import ConfigError, PyvmmError
from .guests.workload import WORKLOAD_HELP, WorkloadOptions
from .machine import DEFAULT_RAM_SIZE, StopReason
from .units import format_size, parse_count, parse_size

EXIT_ERROR = 1
EXIT_USAGE = 2

_DESCRIPTION = """\
pyvmm: a small ARM64 machine in Python (CPU from unicorn, RAM in host mmap regions)
with QEMU-like checkpointing."""

_RUN_EPILOG = f"""\
guests:
  With no --guest, the built-in workload runs: a bare-metal ARM64 program that
  dirties a working set of RAM with a chosen pattern, prints progress on the
  UART and powers off.  Tune it with --workload.

  --guest PROGRAM [ARGS...] runs a static Linux ARM64 ELF program (for example
  busybox) in user mode.  --guest must come last: everything after it is the
  program and its arguments.  Exit code = the program's exit code.

{WORKLOAD_HELP}

examples:
  python -m pyvmm run
  python -m pyvmm run --workload pattern=random,working_set=128M,passes=8
  python -m pyvmm run --ram 512M --max-insns 50M
  python -m pyvmm run --files data.bin --guest ./busybox sha256sum data.bin

exit status: the guest's exit code; 0 when a limit (--max-insns, --seconds)
ends the run; 1 on an error (one line on stderr); 2 on bad arguments."""


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error format."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"pyvmm: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyvmm", description=_DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    run = sub.add_parser("run", help="run a guest", description="Run a guest on a new machine.",
                         epilog=_RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    machine = run.add_argument_group("machine")
    machine.add_argument("--ram", metavar="SIZE", default=format_size_arg(DEFAULT_RAM_SIZE),
                         help="guest RAM size, e.g. 256M, 1G (default: %(default)s)")
    machine.add_argument("--seed", metavar="N", type=int, default=0,
                         help="seed of all guest-visible randomness (default: %(default)s); "
                              "same seed, same guest -> same bytes")
    limits = run.add_argument_group("limits (the run stops, paused, when one is reached)")
    limits.add_argument("--max-insns", metavar="N",
                        help="stop after exactly N guest instructions (e.g. 5000000 or 5M); "
                             "counted runs are somewhat slower")
    limits.add_argument("--seconds", metavar="S", type=float,
                        help="stop after S seconds of host time")
    guest = run.add_argument_group("guest")
    guest.add_argument("--workload", metavar="KEY=VALUE,...", action="append", default=[],
                       help="options of the built-in workload (see below); may be repeated")
    guest.add_argument("--files", metavar="PATH", action="append", default=[],
                       help="host file or directory the ELF guest may read, at the same path; "
                            "guest writes go to an in-memory overlay (repeatable)")
    guest.add_argument("--stdin", metavar="FILE",
                       help="file whose bytes the ELF guest reads on fd 0 (default: empty)")
    guest.add_argument("--env", metavar="NAME=VALUE", action="append", default=[],
                       help="environment variable for the ELF guest (repeatable)")
    guest.add_argument("--output", metavar="FILE",
                       help="write the guest's UART output (or ELF stdout) to FILE instead of "
                            "standard output")
    guest.add_argument("-q", "--quiet", action="store_true",
                       help="no summary line on stderr at the end")
    guest.add_argument("--guest", metavar="PROGRAM", nargs=argparse.REMAINDER,
                       help=f"what to run: {' | '.join(BUILTIN_GUESTS)} (default) or a static "
                            f"ARM64 ELF and its arguments; must be the last option")
    return parser


def format_size_arg(nbytes: int) -> str:
    return f"{nbytes >> 20}M"


def _guest_spec(args: argparse.Namespace) -> GuestSpec:
    words: list[str] = list(args.guest or [])
    if args.guest is not None and not words:
        raise ConfigError("--guest needs a program: a built-in name or an ELF file")
    program = words[0] if words else BUILTIN_GUESTS[0]
    options = WorkloadOptions()
    for text in args.workload:
        options = WorkloadOptions.parse(text, base=options)
    if args.workload and program not in BUILTIN_GUESTS:
        raise ConfigError("--workload tunes the built-in workload; it does not apply to an ELF "
                          "guest")
    if program not in BUILTIN_GUESTS and not os.path.exists(program):
        raise ConfigError(f"guest {program!r} is neither a built-in guest "
                          f"({', '.join(BUILTIN_GUESTS)}) nor an existing file")
    env: list[tuple[str, str]] = []
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"invalid --env {item!r}: expected NAME=VALUE")
        env.append((name, value))
    for path in args.files:
        if not os.path.exists(path):
            raise ConfigError(f"--files {path}: no such file or directory")
    stdin = b""
    if args.stdin is not None:
        try:
            with open(args.stdin, "rb") as handle:
                stdin = handle.read()
        except OSError as err:
            raise ConfigError(f"--stdin {args.stdin}: {err.strerror}") from err
    return GuestSpec(program=program, args=tuple(words[1:]), workload=options,
                     files=tuple(os.path.abspath(p) for p in args.files), env=tuple(env),
                     stdin=stdin)


class _LineSink:
    """Writes guest output to a host stream, flushing at each newline so progress shows live."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def __call__(self, data: bytes) -> None:
        self.stream.write(data)
        if b"\n" in data:
            self.stream.flush()


def _cmd_run(args: argparse.Namespace) -> int:
    ram_size = parse_size(args.ram, "RAM size (--ram)")
    max_insns = parse_count(args.max_insns, "--max-insns") if args.max_insns else None
    if args.seconds is not None and args.seconds <= 0:
        raise ConfigError(f"--seconds must be > 0, not {args.seconds}")
    spec = _guest_spec(args)
    out_stream: BinaryIO = sys.stdout.buffer
    if args.output:
        try:
            out_stream = open(args.output, "wb")  # noqa: SIM115 - closed below
        except OSError as err:
            raise ConfigError(f"--output {args.output}: {err.strerror}") from err
    sink = _LineSink(out_stream)
    err_sink = _LineSink(sys.stderr.buffer)
    try:
        machine = boot(spec, ram_size=ram_size, seed=args.seed, uart_sink=sink, stdout=sink,
                       stderr=err_sink)
        with machine:
            started = time.monotonic()
            result = machine.run(max_insns=max_insns, seconds=args.seconds)
            elapsed = time.monotonic() - started
    finally:
        out_stream.flush()
        if out_stream is not sys.stdout.buffer:
            out_stream.close()
    if result.error is not None:
        raise result.error
    if not args.quiet:
        what = {
            StopReason.SHUTDOWN: f"guest exited with code {result.exit_code}",
            StopReason.INSN_LIMIT: f"stopped after {result.insns} instructions (--max-insns)",
            StopReason.TIME_LIMIT: "stopped at the time limit (--seconds)",
            StopReason.INTERRUPTED: "interrupted",
            StopReason.PAUSED: "paused",
        }.get(result.reason, result.reason.value)
        print(f"pyvmm: {what}; {elapsed:.2f} s, RAM {format_size(ram_size)}", file=sys.stderr)
    if result.reason is StopReason.SHUTDOWN:
        return result.exit_code or 0
    return 130 if result.reason is StopReason.INTERRUPTED else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyvmm`` and ``python -m pyvmm``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        parser.error(f"unknown command {args.command}")
    except PyvmmError as err:
        print(f"pyvmm: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pyvmm: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE
