"""The ``pyvmm`` command line: argument parsing, one-line errors, and the ``run`` command."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from .boot import BUILTIN_GUESTS, GuestSpec, boot
from .errors import ConfigError, PyvmmError
from .interrupts import signals_held
from .guests.workload import WORKLOAD_HELP, WorkloadOptions
from .machine import DEFAULT_RAM_SIZE, Machine, RunResult, RunState, StopReason
from .migration.defaults import DEFAULT_STRATEGY, SAVER_NICE, STRATEGIES
from .units import format_size, parse_count, parse_size

EXIT_ERROR = 1
EXIT_USAGE = 2

_DESCRIPTION = """\
pyvmm: a small ARM64 machine in Python (CPU from unicorn, RAM in host mmap regions)
with QEMU-like checkpointing."""

_EPILOG = """\
start here:
  python -m pyvmm run --checkpoint chpt:out.bin      run the built-in guest, checkpoint it
  python -m pyvmm run --incoming chpt:out.bin        run on from that checkpoint
  python -m pyvmm checkpoint info out.bin            what the file holds
  python -m pyvmm run --help                         guests, checkpoint capabilities, reloads
  python -m pyvmm checkpoint --help                  info, verify, squash, export"""

_RUN_EPILOG = f"""\
guests:
  With no --guest, the built-in workload runs: a bare-metal ARM64 program that
  dirties a working set of RAM with a chosen pattern, prints progress on the
  UART and powers off.  Tune it with --workload.

  --guest PROGRAM [ARGS...] runs a static Linux ARM64 ELF program (for example
  busybox) in user mode.  --guest must come last: everything after it is the
  program and its arguments.  Exit code = the program's exit code.

{WORKLOAD_HELP}

checkpoints:
  --checkpoint chpt:FILE writes a checkpoint of the machine into FILE at the
  end of the run (also when the guest powered off), at every --checkpoint-at
  instruction count and every --checkpoint-every N instructions.
  --incoming chpt:FILE reloads the last
  checkpoint in FILE (chpt:N:FILE: the first N increments) into a new machine
  and runs on from there; the guest, RAM size and seed come from the file.
  With --lazy the guest starts at once and its RAM is loaded while it runs.
  --period S checkpoints every S seconds while the guest runs (with
  --incremental each one holds only the pages written since the last).
  --incoming chpt:squash[:N]:FILE folds N increments into FILE_squashed and
  exits.  Inspect, verify and squash files with "pyvmm checkpoint ...".

examples:
  python -m pyvmm run
  python -m pyvmm run --checkpoint chpt:out.bin
  python -m pyvmm run --max-insns 20M --checkpoint chpt:out.bin
  python -m pyvmm run --incoming chpt:out.bin
  python -m pyvmm run --incoming chpt:out.bin --lazy
  python -m pyvmm run --checkpoint chpt:out.bin --incremental --live --period 0.5
  python -m pyvmm run --checkpoint chpt:out.bin --live --incremental --checkpoint-every 10M
  python -m pyvmm run --incoming chpt:2:out.bin --reload-strategy partial
  python -m pyvmm checkpoint squash out.bin -n 3 -o full.bin
  python -m pyvmm run --workload pattern=random,working_set=128M,passes=8
  python -m pyvmm run --ram 512M --max-insns 50M
  python -m pyvmm run --files data.bin --guest ./busybox sha256sum data.bin

exit status: the guest's exit code; 0 when a limit (--max-insns, --seconds)
ends the run; 1 on an error, a bad option value included (one line on stderr
naming it); 2 when the command line cannot be parsed (unknown option, missing
or non-numeric value)."""


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error format."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"pyvmm: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyvmm", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    run = sub.add_parser("run", help="run a guest", description="Run a guest on a new machine.",
                         epilog=_RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    machine = run.add_argument_group("machine")
    machine.add_argument("--ram", metavar="SIZE",
                         help=f"guest RAM size, e.g. 256M, 1G (default: "
                              f"{format_size_arg(DEFAULT_RAM_SIZE)})")
    machine.add_argument("--seed", metavar="N", type=int,
                         help="seed of all guest-visible randomness (default: 0); "
                              "same seed, same guest -> same bytes")
    limits = run.add_argument_group("limits (the run stops, paused, when one is reached)")
    limits.add_argument("--max-insns", metavar="N",
                        help="stop after exactly N guest instructions (e.g. 5000000 or 5M); "
                             "counted runs are somewhat slower")
    limits.add_argument("--seconds", metavar="S", type=float,
                        help="stop after S seconds of host time")
    chpt = run.add_argument_group("checkpoints")
    chpt.add_argument("--checkpoint", metavar="chpt:FILE",
                      help="write a checkpoint into FILE at the end of the run (and at each "
                           "--checkpoint-at and --checkpoint-every); an existing FILE is "
                           "replaced, unless it is the --incoming file, whose chain then grows")
    chpt.add_argument("--checkpoint-at", metavar="N[,N...]", action="append", default=[],
                      help="also checkpoint after exactly N instructions of this run "
                           "(repeatable; needs --checkpoint)")
    chpt.add_argument("--checkpoint-every", metavar="N",
                      help="also checkpoint after every N instructions of this run (N, 2N, "
                           "...; e.g. 10M; needs --checkpoint)")
    chpt.add_argument("--incremental", action="store_true",
                      help="capability: after the first (full) checkpoint, save only pages "
                           "written since the previous checkpoint")
    chpt.add_argument("--live", action="store_true",
                      help="capability: pause only to save CPU/devices and write-protect RAM; "
                           "save pages while the guest runs (RAM as at the pause)")
    chpt.add_argument("--cow", action="store_true",
                      help="capability: fork at the pause; a child process writes the RAM pages "
                           "from its copy-on-write view while the guest runs on (not with --live)")
    chpt.add_argument("--checksum", action="store_true",
                      help="capability: record CRC-32C checksums of every page, the stream and "
                           "the RAM; reloads check them, 'checkpoint verify' finds damage")
    chpt.add_argument("--tracker", choices=("async", "wp"), default="async",
                      help="dirty tracker for --incremental: async (kernel WP_ASYNC + "
                           "PAGEMAP_SCAN, default) or wp (write-protect faults)")
    chpt.add_argument("--unprotect-pages", metavar="N", type=int, default=1,
                      help="pages unprotected per write fault (1 = 4 KiB; larger runs fault "
                           "less and may over-count dirty pages)")
    chpt.add_argument("--fault-mode", choices=("thread", "signal"), default="thread",
                      help="who resolves write-protect faults (--tracker wp, --live): a C "
                           "handler thread (default), or the faulting thread itself in a SIGBUS "
                           "handler (~1.7x the faults per second; a host kernel write into "
                           "protected guest RAM then fails with EFAULT)")
    chpt.add_argument("--saver-nice", metavar="N", type=int, default=SAVER_NICE,
                      help=f"nice value 0..19 of the thread saving a --live checkpoint's RAM "
                           f"(default {SAVER_NICE}: the guest wins the CPU, the checkpoint "
                           f"takes longer on a busy host)")
    chpt.add_argument("--no-fsync", action="store_true",
                      help="do not fsync checkpoints: faster; a killed pyvmm still leaves every "
                           "written checkpoint loadable, an OS crash or power loss may not")
    chpt.add_argument("--period", metavar="SECONDS", type=float,
                      help="also checkpoint every SECONDS (a float) while the guest runs, counted "
                           "from the end of one checkpoint to the start of the next; 0: off. A "
                           "failed periodic checkpoint stops the timer and is reported")
    chpt.add_argument("--max-checkpoints", metavar="K", type=int,
                      help="with --period: end the run after K periodic checkpoints (the file "
                           "is complete; no end-of-run checkpoint is added)")
    chpt.add_argument("--max-increments", metavar="K", type=int,
                      help="when FILE holds K increments, the next checkpoint starts a new chain: "
                           "a full checkpoint that replaces FILE (the original reset after 99)")
    chpt.add_argument("--no-sanity-checks", action="store_true",
                      help="skip the cheap end-of-save checks (pages saved == pages selected, "
                           "none left under processing); on by default")
    chpt.add_argument("--incoming", metavar="chpt:[N:]FILE",
                      help="start from a checkpoint instead of booting a guest")
    chpt.add_argument("--reload-strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                      help="how --incoming reads a chain of increments (same result): indexed "
                           "reads each page once from the newest increment holding it (default); "
                           "partial stops non-last increments after their RAM; sequential loads "
                           "every increment whole, as the original did")
    chpt.add_argument("--lazy", action="store_true",
                      help="with --incoming: start the guest at once and load its RAM from the "
                           "file while it runs (userfaultfd); prints the time to the first "
                           "guest instruction")
    guest = run.add_argument_group("guest")
    guest.add_argument("--workload", metavar="KEY=VALUE,...", action="append", default=[],
                       help="options of the built-in workload (see below); may be repeated")
    guest.add_argument("--files", metavar="PATH", action="append", default=[],
                       help="host file or directory the ELF guest may read, at the same path; "
                            "guest writes go to an in-memory overlay (repeatable)")
    guest.add_argument("--files-limit", metavar="SIZE",
                       help="most the ELF guest's in-memory overlay may hold: written file "
                            "pages (holes of sparse files are free) and ~1K per entry; past "
                            "it the guest gets ENOSPC, as on a full tmpfs (default: half of "
                            "--ram, as tmpfs, at most 512M: checkpoints carry the overlay)")
    guest.add_argument("--stdin", metavar="FILE",
                       help="file whose bytes the ELF guest reads on fd 0 (default: empty; "
                            "saved in each checkpoint); - : pyvmm's own standard input, read "
                            "as the guest reads it (a pipe or a terminal; a guest reloaded "
                            "with --incoming reads its new process's standard input)")
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
    _add_checkpoint_commands(sub)
    return parser


def _add_checkpoint_commands(sub: Any) -> None:
    chpt = sub.add_parser("checkpoint", help="inspect, verify, squash and export checkpoint files",
                          description="Inspect, verify, squash and export checkpoint files.")
    verbs = chpt.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    info = verbs.add_parser("info", help="increments, sizes, page counts, devices",
                            description="Show what a checkpoint file holds.")
    info.add_argument("file", metavar="FILE")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    squash = verbs.add_parser(
        "squash", help="fold the first N increments into one full checkpoint",
        description="Reload the first N increments of FILE (without running the guest) and "
                    "write their state as one full checkpoint to OUT (default FILE_squashed). "
                    "OUT may be FILE itself: it is replaced only once the new file is complete.")
    squash.add_argument("file", metavar="FILE")
    squash.add_argument("-n", "--increments", metavar="N", type=int, default=None,
                        help="how many increments to fold (default: all)")
    squash.add_argument("-o", "--output", metavar="OUT", default=None)
    squash.add_argument("--no-fsync", action="store_true", help="do not fsync the output")
    squash.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    verify = verbs.add_parser(
        "verify", help="check headers, indexes, streams and checksums without loading a guest",
        description="Check every increment of FILE: header, page index, stats, checksum block, "
                    "parent chain, stream; with the checksum capability also every page's and "
                    "device section's CRC-32C and the RAM digest. Exit 0 when all is well, 1 "
                    "with one line per problem otherwise.")
    verify.add_argument("file", metavar="FILE")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    export = verbs.add_parser(
        "export", help="write one increment's raw QEMU migration stream",
        description="Write increment K's QEMU v3 migration stream to OUT, e.g. for QEMU's "
                    "scripts/analyze-migration.py.")
    export.add_argument("file", metavar="FILE")
    export.add_argument("--increment", "-k", metavar="K", type=int, default=None,
                        help="which increment (default: the last)")
    export.add_argument("-o", "--output", metavar="OUT", required=True,
                        help="file to write (- for standard output, e.g. a pipe)")


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file (existing or not)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


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
    if args.stdin == "-":
        pass  # live: read by the guest as it runs (GuestSpec.stdin_live)
    elif args.stdin is not None:
        try:
            with open(args.stdin, "rb") as handle:
                stdin = handle.read()
        except OSError as err:
            raise ConfigError(f"--stdin {args.stdin}: {err.strerror}") from err
    if args.stdin is not None and program in BUILTIN_GUESTS:
        raise ConfigError("--stdin is the ELF guest's standard input; the built-in workload "
                          "reads none")
    files_limit = None
    if args.files_limit is not None:
        if program in BUILTIN_GUESTS:
            raise ConfigError("--files-limit bounds the ELF guest's files; the built-in "
                              "workload has none")
        from .linux.state import MAX_FILES_LIMIT  # only ELF guests need the Linux layer

        files_limit = parse_size(args.files_limit, "overlay size (--files-limit)")
        if files_limit > MAX_FILES_LIMIT:
            raise ConfigError(f"--files-limit {args.files_limit}: at most "
                              f"{MAX_FILES_LIMIT >> 20}M (checkpoints carry the overlay)")
    return GuestSpec(program=program, args=tuple(words[1:]), workload=options,
                     files=tuple(os.path.abspath(p) for p in args.files), env=tuple(env),
                     stdin=stdin, stdin_live=args.stdin == "-", files_limit=files_limit)


class _LineSink:
    """Writes guest output to a host stream, flushing at each newline so progress shows live."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def __call__(self, data: bytes) -> None:
        self.stream.write(data)
        if b"\n" in data:
            self.stream.flush()


@dataclasses.dataclass(frozen=True)
class _CheckpointPoints:
    """Where a run checkpoints, in instructions of this run: the --checkpoint-at counts and
    every multiple of --checkpoint-every."""

    at: tuple[int, ...] = ()
    every: int | None = None

    def __contains__(self, count: int) -> bool:
        return count > 0 and (count in self.at or (self.every is not None and
                                                   count % self.every == 0))

    def stops(self, max_insns: int | None) -> Iterator[int]:
        """The counts to stop at, ascending: each point before ``max_insns``, then
        ``max_insns``, then -1 (a last segment with no instruction limit of its own)."""
        at = [p for p in self.at if max_insns is None or p < max_insns]
        i, k = 0, 1
        while True:
            nxt = min([*at[i:i + 1], *([k * self.every] if self.every else [])], default=None)
            if nxt is None or (max_insns is not None and nxt >= max_insns):
                break
            yield nxt
            if i < len(at) and at[i] == nxt:
                i += 1
            if self.every and k * self.every == nxt:
                k += 1
        if max_insns is not None:
            yield max_insns
        yield -1


def _checkpoint_points(args: argparse.Namespace) -> _CheckpointPoints:
    points: set[int] = set()
    for text in args.checkpoint_at:
        for item in text.split(","):
            points.add(parse_count(item, "--checkpoint-at"))
    every = parse_count(args.checkpoint_every, "--checkpoint-every") \
        if args.checkpoint_every is not None else None
    if (points or every is not None) and not args.checkpoint:
        which = "--checkpoint-at" if points else "--checkpoint-every"
        raise ConfigError(f"{which} needs --checkpoint chpt:FILE to write into")
    if 0 in points:
        raise ConfigError("--checkpoint-at counts must be > 0")
    if every == 0:
        raise ConfigError("--checkpoint-every must be > 0")
    return _CheckpointPoints(tuple(sorted(points)), every)


def _cmd_run(args: argparse.Namespace) -> int:
    max_insns = parse_count(args.max_insns, "--max-insns") if args.max_insns else None
    if args.seconds is not None and args.seconds <= 0:
        raise ConfigError(f"--seconds must be > 0, not {args.seconds}")
    points = _checkpoint_points(args)
    if (args.incremental or args.live or args.cow or args.checksum) and not args.checkpoint:
        raise ConfigError("--incremental, --live, --cow and --checksum are capabilities of "
                          "--checkpoint chpt:FILE")
    if args.unprotect_pages < 1:
        raise ConfigError(f"--unprotect-pages must be at least 1, not {args.unprotect_pages}")
    if not 0 <= args.saver_nice <= 19:
        raise ConfigError(f"--saver-nice must be 0..19, not {args.saver_nice}")
    if args.checkpoint or args.incoming:  # a run that neither saves nor reloads never needs it
        from .migration.checkpoint import parse_target
    save_target = parse_target(args.checkpoint) if args.checkpoint else None
    if save_target is not None and (save_target.count is not None or save_target.squash):
        raise ConfigError(f"--checkpoint takes chpt:FILE, not {args.checkpoint}")
    if save_target is not None:
        save_target = save_target.resolved()
    if args.period is not None:
        from .migration.periodic import check_period

        check_period(args.period)
        if not args.checkpoint:
            raise ConfigError("--period needs --checkpoint chpt:FILE to write into")
    if args.max_checkpoints is not None and not args.period:
        raise ConfigError("--max-checkpoints counts periodic checkpoints: it needs --period")
    if args.max_checkpoints is not None and args.max_checkpoints < 1:
        raise ConfigError(f"--max-checkpoints must be at least 1, not {args.max_checkpoints}")
    if args.max_increments is not None and (args.max_increments < 1 or not args.checkpoint):
        raise ConfigError("--max-increments needs --checkpoint chpt:FILE and a count >= 1")
    incoming = parse_target(args.incoming).resolved() if args.incoming else None
    if incoming is not None and incoming.squash:
        return _squash_incoming(args, incoming)
    if args.lazy and incoming is None:
        raise ConfigError("--lazy needs --incoming chpt:[N:]FILE")
    if incoming is not None:
        given = [opt for opt, value in (("--ram", args.ram), ("--seed", args.seed),
                                        ("--guest", args.guest), ("--workload", args.workload),
                                        ("--files", args.files), ("--stdin", args.stdin),
                                        ("--env", args.env),
                                        ("--files-limit", args.files_limit)) if value]
        if given:
            raise ConfigError(f"{given[0]} cannot be combined with --incoming: the guest, its "
                              f"RAM and seed come from the checkpoint")
        ram_size = 0
        spec = None
    else:
        ram_size = parse_size(args.ram or format_size_arg(DEFAULT_RAM_SIZE), "RAM size (--ram)")
        spec = _guest_spec(args)
    out_stream: BinaryIO = sys.stdout.buffer
    if args.output:
        for option, target in (("--incoming", incoming), ("--checkpoint", save_target)):
            if target is not None and _same_file(args.output, target.path):
                raise ConfigError(f"--output {args.output} is the {option} checkpoint file: "
                                  f"the guest's output would overwrite it")
        try:
            out_stream = open(args.output, "wb")  # noqa: SIM115 - closed below
        except OSError as err:
            raise ConfigError(f"--output {args.output}: {err.strerror}") from err
    sink = _LineSink(out_stream)
    err_sink = _LineSink(sys.stderr.buffer)
    loader = None
    try:
        if incoming is not None and args.lazy:
            from .migration.lazy import lazy_reload

            machine, loader = lazy_reload(incoming, uart_sink=sink, stdout=sink,
                                          stderr=err_sink)
            ram_size = machine.ram.size
        elif incoming is not None:
            from .migration.checkpoint import reload

            machine = reload(incoming, strategy=args.reload_strategy, uart_sink=sink,
                             stdout=sink, stderr=err_sink)
            ram_size = machine.ram.size
        else:
            assert spec is not None
            machine = boot(spec, ram_size=ram_size, seed=args.seed or 0, uart_sink=sink,
                           stdout=sink, stderr=err_sink)
        with machine:
            started = time.monotonic()
            try:
                result = _run_with_checkpoints(args, machine, max_insns, points, save_target,
                                               incoming, loader)
            except PyvmmError as err:
                if loader is not None and loader.error is not None:
                    raise loader.error from err  # the cause, not the stopped machine
                raise
            finally:
                if loader is not None:
                    loader.close()  # before the machine: the fill finishes first
            elapsed = time.monotonic() - started
    finally:
        out_stream.flush()
        if out_stream is not sys.stdout.buffer:
            out_stream.close()
    if loader is not None and loader.error is not None:
        raise loader.error
    if result.error is not None:
        raise result.error
    if loader is not None and not args.quiet:
        lazy = loader.stats()
        first = "" if lazy.first_insn_ms is None else \
            f"first guest instruction after {lazy.first_insn_ms:.1f} ms, "
        filled = "-" if lazy.filled_ms is None else f"{lazy.filled_ms:.0f} ms"
        print(f"pyvmm: lazy reload: {first}RAM filled after {filled} ({lazy.fault_pages} pages "
              f"by {lazy.faults} faults, {lazy.fill_pages} by the fill)", file=sys.stderr)
    if not args.quiet:
        what = {
            StopReason.SHUTDOWN: f"guest exited with code {result.exit_code}",
            StopReason.INSN_LIMIT: f"stopped after {max_insns} instructions (--max-insns)",
            StopReason.TIME_LIMIT: "stopped at the time limit (--seconds)",
            StopReason.INTERRUPTED: f"interrupted ({args.stop_signal.name})",
            StopReason.PAUSED: "paused",
        }.get(result.reason, result.reason.value)
        insns = machine.executed_insns
        rate = f" ({_count_text(insns / elapsed)}/s)" if elapsed > 0 and insns else ""
        print(f"pyvmm: {what}; {elapsed:.2f} s, RAM {format_size(ram_size)}, "
              f"{_count_text(insns)} guest instructions{rate}", file=sys.stderr)
    if result.reason is StopReason.SHUTDOWN:
        return result.exit_code or 0
    return 128 + args.stop_signal.signum if result.reason is StopReason.INTERRUPTED else 0


def _count_text(count: float) -> str:
    """123, 45.6K, 7.89M, 1.23G: a count as the run options take it."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.0f}"


class _StopSignal:
    """Which signal interrupted a run: SIGINT, unless SIGTERM came (its handler says so)."""

    def __init__(self) -> None:
        self.signum = int(signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def on_sigterm(self, signum: int, _frame: object) -> None:
        """SIGTERM stops the run as Ctrl-C does: through the machine's pause, at a clean
        boundary, then the end-of-run checkpoint (if any) and exit 143."""
        self.signum = signum
        raise KeyboardInterrupt


def _run_with_checkpoints(args: argparse.Namespace, machine: Machine, max_insns: int | None,
                          points: _CheckpointPoints, save_target: Any, incoming: Any,
                          loader: Any = None) -> RunResult:
    """Run in segments: up to each --checkpoint-at count and multiple of --checkpoint-every,
    checkpoint, go on; checkpoint at the end.  Limits (--max-insns, --seconds) count from the start of this run.  A lazy reload's
    ``loader`` is closed before the first checkpoint (the checkpointer needs the RAM)."""
    checkpointer = None
    if save_target is not None:
        from .migration.checkpoint import Checkpointer

        same = incoming is not None and os.path.exists(save_target.path) and \
            os.path.samefile(save_target.path, incoming.path)
        caps = [name for name, on in (("incremental", args.incremental), ("live", args.live),
                                      ("cow", args.cow), ("checksum", args.checksum)) if on]
        checkpointer = Checkpointer(machine, save_target.path, append=same,
                                    durable=not args.no_fsync, capabilities=caps,
                                    tracker=args.tracker, unprotect_pages=args.unprotect_pages,
                                    max_increments=args.max_increments,
                                    sanity_checks=not args.no_sanity_checks,
                                    fault_mode=args.fault_mode, saver_nice=args.saver_nice)
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    done = 0
    result = machine.last_result
    periodic = None
    ran = False
    try:
        if checkpointer is not None and args.period and machine.state is not RunState.SHUTDOWN:
            periodic = _start_periodic(args, machine, checkpointer, loader)
        if machine.state is RunState.SHUTDOWN:
            if not args.quiet:
                print("pyvmm: the checkpointed guest had already powered off", file=sys.stderr)
        else:
            for stop in points.stops(max_insns):
                budget = None if stop < 0 else stop - done
                seconds = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
                result = machine.run(max_insns=budget, seconds=seconds)
                if result.reason is not StopReason.INSN_LIMIT:
                    break
                done = stop
                if stop in points and checkpointer is not None:
                    with signals_held(_finishing("the checkpoint in flight")):
                        _checkpoint(checkpointer, args.quiet, loader)
                if stop == max_insns:
                    break
        ran = True
    finally:
        # the end of the run (a first Ctrl-C or SIGTERM included) is one piece: a periodic
        # checkpoint in flight, the end-of-run one and the file's close are finished, whatever
        # signal comes meanwhile; it is acted on afterwards
        with signals_held(_finishing("the end-of-run checkpoint")):
            try:
                if periodic is not None:
                    periodic.stop()
                if ran:
                    _end_of_run(args, checkpointer, periodic, result, loader,
                                skip=bool(done and done in points and done == max_insns))
            finally:
                if checkpointer is not None:
                    checkpointer.close()
    return result


def _end_of_run(args: argparse.Namespace, checkpointer: Any, periodic: Any, result: RunResult,
                loader: Any, *, skip: bool) -> None:
    """The end-of-run checkpoint, and what the periodic checkpoints came to."""
    limited = periodic is not None and periodic.limit_reached()
    if checkpointer is not None and result.error is None and not limited and not skip:
        _checkpoint(checkpointer, args.quiet, loader)
    if periodic is not None and periodic.error is not None:
        raise PyvmmError(f"periodic checkpoints stopped after {periodic.count}: "
                         f"{periodic.error}")
    if limited and periodic is not None and not args.quiet:
        print(f"pyvmm: {periodic.count} periodic checkpoints taken (--max-checkpoints)",
              file=sys.stderr)


def _finishing(what: str) -> Callable[[int], None]:
    """What a signal held back during ``what`` prints: that it is acted on once that is done."""

    def note(signum: int) -> None:
        print(f"pyvmm: {signal.Signals(signum).name} received: {what} is finished first "
              f"(then the run stops)", file=sys.stderr, flush=True)

    return note


def _start_periodic(args: argparse.Namespace, machine: Machine, checkpointer: Any,
                    loader: Any) -> Any:
    from .migration.periodic import PeriodicCheckpointer

    def report(stats: Any) -> None:
        if not args.quiet:
            _print_stats(checkpointer, stats)

    def before() -> None:
        if loader is not None:
            loader.close()  # the RAM must be whole and unregistered before it is saved

    def end_run() -> None:
        machine.pause()  # --max-checkpoints: the run ends here, paused, the file complete

    return PeriodicCheckpointer(checkpointer, args.period, max_checkpoints=args.max_checkpoints,
                                on_checkpoint=report, on_limit=end_run,
                                before_checkpoint=before).start()


def _squash_incoming(args: argparse.Namespace, target: Any) -> int:
    """``--incoming chpt:squash[:N]:FILE``: fold N increments into FILE_squashed and exit."""
    from .migration.squash import squash

    result = squash(target.path, target.count, strategy=args.reload_strategy,
                    durable=not args.no_fsync, progress=_Progress("squashing", args.quiet))
    _squash_summary(result, args.quiet)
    return 0


def _squash_summary(result: Any, quiet: bool) -> None:
    if not quiet:
        print(f"pyvmm: squashed {result.increments} increment(s) into {result.output}: "
              f"{result.stats.pages} pages + {result.stats.zero_pages} zero, "
              f"{format_size(result.stats.bytes_written)} in {result.seconds:.2f} s",
              file=sys.stderr)


class _Progress:
    """A progress line on stderr: redrawn in place on a terminal, a line per 10 % otherwise."""

    def __init__(self, what: str, quiet: bool) -> None:
        self.what = what
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        percent = 100 * done // total if total else 100
        if self.tty:
            bar = "#" * (percent // 5)
            print(f"\rpyvmm: {self.what} [{bar:<20}] {percent:3d}%", end="", file=sys.stderr,
                  flush=True)
            if percent >= 100:
                print(file=sys.stderr)
                self.shown = 100
        elif percent // 10 > self.shown // 10 or self.shown < 0:
            self.shown = percent
            print(f"pyvmm: {self.what}: {percent}%", file=sys.stderr, flush=True)


def _checkpoint(checkpointer: Any, quiet: bool, loader: Any = None) -> None:
    if loader is not None:
        loader.close()  # the RAM must be whole and unregistered before it is saved
        if loader.error is not None:
            raise loader.error
    stats = checkpointer.checkpoint()
    if not quiet:
        _print_stats(checkpointer, stats)


def _print_stats(checkpointer: Any, stats: Any) -> None:
    print(f"pyvmm: checkpoint {stats.increment} ({stats.kind}) -> {checkpointer.path}: "
          f"{stats.pages} pages + {stats.zero_pages} zero, "
          f"{format_size(stats.bytes_written)} in {stats.total_ms:.0f} ms, downtime "
          f"{stats.downtime_ms:.1f} ms", file=sys.stderr, flush=True)


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from .migration.inspect import export_increment, file_info, format_info

    if args.verb == "info":
        info = file_info(args.file)
        if args.json:
            import json

            print(json.dumps(info, indent=2))
        else:
            print(format_info(info))
        return 0
    if args.verb == "verify":
        return _cmd_verify(args)
    if args.verb == "squash":
        from .migration.squash import squash

        if args.increments is not None and args.increments < 1:
            raise ConfigError(f"-n must be at least 1, not {args.increments}")
        result = squash(args.file, args.increments, args.output, durable=not args.no_fsync,
                        progress=_Progress("squashing", args.quiet))
        _squash_summary(result, args.quiet)
        return 0
    if args.verb == "export":
        written = export_increment(args.file, args.increment, args.output)
        where = "standard output" if args.output == "-" else args.output
        print(f"pyvmm: wrote {format_size(written)} to {where}", file=sys.stderr)
        return 0
    raise ConfigError(f"unknown checkpoint verb {args.verb}")


VERIFY_PROGRESS_BYTES = 256 << 20
"""Files whose streams are at least this long get progress lines when stderr is not a tty."""


def _cmd_verify(args: argparse.Namespace) -> int:
    from .migration.verify import verify_file

    tty = sys.stderr.isatty()
    shown = [-1]

    def progress(done: int, total: int, increment: int) -> None:
        percent = 100 * done // total if total else 100
        if tty:
            print(f"\rpyvmm: verifying {args.file}: {percent:3d}% (increment {increment})",
                  end="", file=sys.stderr, flush=True)
        elif total >= VERIFY_PROGRESS_BYTES and percent // 10 > shown[0]:
            shown[0] = percent // 10  # a log, not a terminal: a line per 10 %, long files only
            print(f"pyvmm: verifying {args.file}: {percent}%", file=sys.stderr, flush=True)

    show = not args.quiet
    report = verify_file(args.file, progress=progress if show else None)
    if show and tty:
        print(file=sys.stderr)
    if args.json:
        import json

        print(json.dumps(report.as_dict(), indent=2))
    else:
        for problem in report.problems:
            print(f"pyvmm: {args.file}: {problem}")
        for note in report.notes:
            print(f"pyvmm: note: {note}")
        print(report.summary())
    return 0 if report.ok else EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyvmm`` and ``python -m pyvmm``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    stop_signal = args.stop_signal = _StopSignal()
    if threading.current_thread() is threading.main_thread():
        # from here on Ctrl-C is KeyboardInterrupt, met by the clean stops below (python -m
        # pyvmm ends the process with one line until here: see __main__)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with warnings.catch_warnings():
        _show_checkpoint_warnings(quiet=args.command == "checkpoint" and args.verb == "verify")
        return _dispatch(parser, args, stop_signal)


def _show_checkpoint_warnings(*, quiet: bool) -> None:
    """A damaged part of a checkpoint file that a reader worked around (a header slot passed
    over: one increment fewer) is said on stderr, once per message, every time the file is
    read.  ``quiet``: the command reports it itself (verify)."""
    from .errors import CheckpointWarning

    warnings.simplefilter("ignore" if quiet else "always", CheckpointWarning)
    shown: set[str] = set()
    default = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if not issubclass(category, CheckpointWarning):
            default(message, category, filename, lineno, file, line)
        elif str(message) not in shown:
            shown.add(str(message))
            print(f"pyvmm: warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace,
              stop_signal: _StopSignal) -> int:
    try:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM takes Ctrl-C's path in every command: work in flight is finished or
            # discarded cleanly (a squash's new file removed), one line, exit 143
            signal.signal(signal.SIGTERM, stop_signal.on_sigterm)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "checkpoint":
            return _cmd_checkpoint(args)
        parser.error(f"unknown command {args.command}")
    except PyvmmError as err:
        print(f"pyvmm: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"pyvmm: interrupted ({stop_signal.name})", file=sys.stderr)
        return 128 + stop_signal.signum
    except BrokenPipeError:
        # whoever read our output stopped (`pyvmm checkpoint info f | head`): not an error to
        # report; point stdout at /dev/null so that the flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # as if killed by SIGPIPE, which is what a C tool would be
    return EXIT_USAGE
