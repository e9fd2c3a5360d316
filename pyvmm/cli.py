"""The ``pyvmm`` command line: argument parsing, one-line errors, and the ``run`` command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

from .boot import BUILTIN_GUESTS
from .errors import ConfigError, PyvmmError
from .guests.workload import WORKLOAD_HELP
from .machine import DEFAULT_RAM_SIZE
from .migration.defaults import DEFAULT_STRATEGY, SAVER_NICE, STRATEGIES
from .progress import Progress, squash_summary
from .units import format_size

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
  python -m pyvmm checkpoint --help                  info, verify, squash, export
  python -m pyvmm run --qmp unix:vm.qmp              drive it: QMP, HMP (--monitor stdio)
  python -m pyvmm monitor unix:vm.qmp                ... from another terminal
  python -m pyvmm bench --help                       compare checkpoint algorithms"""

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

monitor:
  --qmp and --monitor serve QEMU's monitor protocols while the guest runs:
  stop pauses (the run goes on), cont resumes, quit ends the run (with the
  --checkpoint end-of-run checkpoint), migrate chpt:FILE checkpoints now (or
  every period seconds) with the capabilities set by
  migrate-set-capabilities, migrate_cancel commits nothing; MIGRATION,
  CHECKPOINT, STOP, RESUME and SHUTDOWN events tell QMP clients what happens.

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
  python -m pyvmm run --qmp unix:vm.qmp --workload passes=0   (then: pyvmm monitor unix:vm.qmp)
  python -m pyvmm run --monitor stdio --paused                (HMP here: cont, migrate chpt:x, quit)
  python -m pyvmm run --qmp unix:vm.qmp --incoming defer      (QMP migrate-incoming loads it)

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
                              f"{DEFAULT_RAM_SIZE >> 20}M)")
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
    chpt.add_argument("--compress", action="store_true",
                      help="capability: write pages that zstd shrinks by a quarter or more as "
                           "compressed records (= --encoder zstd; not with --checksum; QEMU "
                           "cannot load such a file, pyvmm reloads it as any other)")
    chpt.add_argument("--compress-level", metavar="N", type=int,
                      help="zstd level of --compress (QEMU's compress-level): 1 (default) to "
                           "19 for smaller files, negative for speed")
    chpt.add_argument("--tracker", metavar="NAME", default="async",
                      help="dirty tracker for --incremental: async (kernel WP_ASYNC + "
                           "PAGEMAP_SCAN, default), wp (write-protect faults), hash (reference: "
                           "compares page copies), a plug-in's name or module:attribute (see "
                           "pyvmm algorithms)")
    chpt.add_argument("--saver", metavar="NAME",
                      help="page saver: stop-and-copy (default), live (= --live), cow (= --cow), "
                           "a plug-in's name or module:attribute (see pyvmm algorithms)")
    chpt.add_argument("--encoder", metavar="NAME",
                      help="page encoder: plain (QEMU's records, default), zstd (= --compress), "
                           "a plug-in's name or module:attribute (see pyvmm algorithms)")
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
                      help="start from a checkpoint instead of booting a guest; defer: wait "
                           "for a monitor's migrate-incoming (needs --qmp or --monitor)")
    chpt.add_argument("--reload-strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                      help="how --incoming reads a chain of increments (same result): indexed "
                           "reads each page once from the newest increment holding it (default); "
                           "partial stops non-last increments after their RAM; sequential loads "
                           "every increment whole, as the original did")
    chpt.add_argument("--lazy", action="store_true",
                      help="with --incoming: start the guest at once and load its RAM from the "
                           "file while it runs (userfaultfd); prints the time to the first "
                           "guest instruction")
    monitor = run.add_argument_group("monitor (drive the running machine, as QEMU's monitor)")
    monitor.add_argument("--qmp", metavar="unix:PATH", action="append", default=[],
                         help="serve QMP (QEMU's JSON protocol: qemu.qmp, qmp-shell) on a unix "
                              "socket made mode 0600, or on tcp:HOST:PORT bound to HOST "
                              "(repeatable)")
    monitor.add_argument("--monitor", metavar="stdio|unix:PATH", action="append", default=[],
                         help="serve HMP, QEMU's text monitor (help, info status, info "
                              "migrate, migrate -d chpt:FILE, stop, cont, quit, ...) on this "
                              "terminal or on a unix socket (repeatable)")
    monitor.add_argument("--guest-inform", metavar="unix:PATH",
                         help="a socket for guest-inform listeners: told 'c'/'C' when a "
                              "checkpoint starts/ends and 'R<n>' after a reload; they may send "
                              "c (checkpoint), r (reload), q (quit), h (help)")
    monitor.add_argument("--qfs", metavar="DIR", nargs="?", const="",
                         help="mount QFS, the control filesystem, at DIR (default: a directory "
                              "named by the VM id under ~/.local/state/pyvmm/qfs): echo now > "
                              "DIR/checkpoints/trigger, cat DIR/control/status, ... (needs "
                              "fuse3 and pip install 'pyvmm[qfs]')")
    monitor.add_argument("-S", "--paused", action="store_true",
                         help="do not start the guest until a monitor says cont (QEMU's -S)")
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
    sub.add_parser("algorithms", help="list the dirty trackers, page savers and page encoders",
                   description="List the checkpoint algorithms pyvmm can use by name: built-in "
                               "ones and those installed plug-ins declare through the entry "
                               "point groups pyvmm.trackers, pyvmm.savers and pyvmm.encoders.")
    from .bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    monitor_cmd = sub.add_parser(
        "monitor", help="drive a running pyvmm through its monitor socket",
        description="Open an HMP session on a running pyvmm's monitor socket (its --qmp or "
                    "--monitor unix:PATH), or run one QMP command with --qmp.",
        epilog="examples:\n"
               "  python -m pyvmm run --qmp unix:/tmp/vm.qmp &\n"
               "  python -m pyvmm monitor unix:/tmp/vm.qmp                 (then: info status, "
               "migrate chpt:out.bin, info migrate, quit)\n"
               "  python -m pyvmm monitor unix:/tmp/vm.qmp --qmp query-status\n"
               "  python -m pyvmm monitor unix:/tmp/vm.qmp --qmp migrate '{\"uri\": "
               "\"chpt:out.bin\"}'\n"
               "  echo 'info migrate' | python -m pyvmm monitor unix:/tmp/vm.qmp",
        usage="pyvmm monitor [-h] unix:PATH [--qmp CMD [JSON]]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    monitor_cmd.add_argument("address", metavar="unix:PATH",
                         help="the monitor socket (unix:PATH or tcp:HOST:PORT)")
    monitor_cmd.add_argument("--qmp", metavar="CMD", nargs="+",
                             help="CMD [JSON]: run this one QMP command with these arguments "
                                  "(a JSON object) and print its reply (exit 1 on an error "
                                  "reply)")
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
    squash.add_argument("--compress", action="store_true",
                        help="write the output's pages compressed (zstd; default: QEMU's plain "
                             "records, whatever the input holds)")
    squash.add_argument("--compress-level", metavar="N", type=int,
                        help="zstd level of --compress (default 1)")
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
        if args.compress_level is not None and not args.compress:
            raise ConfigError("--compress-level is the level of --compress: give both")
        result = squash(args.file, args.increments, args.output, durable=not args.no_fsync,
                        progress=Progress("squashing", args.quiet),
                        encoder="zstd" if args.compress else "plain",
                        compress_level=args.compress_level)
        squash_summary(result, args.quiet)
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
    args.argv = list(sys.argv[1:] if argv is None else argv)
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
            from .run_command import cmd_run

            return cmd_run(args)
        if args.command == "bench":
            from .bench.cli import cmd_bench

            return cmd_bench(args, args.argv)
        if args.command == "algorithms":
            from .migration.algorithms import listing

            print(listing())
            return 0
        if args.command == "monitor":
            from .monitor.client import main as monitor_main

            qmp = args.qmp or [None]
            if len(qmp) > 2:
                parser.error(f"--qmp takes CMD and at most one JSON object, not {qmp[2:]}")
            return monitor_main(args.address, qmp[0], qmp[1] if len(qmp) > 1 else None)
        if args.command == "checkpoint":
            return _cmd_checkpoint(args)
        parser.error(f"unknown command {args.command}")
    except PyvmmError as err:
        print(f"pyvmm: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"pyvmm: interrupted ({stop_signal.name})", file=sys.stderr)
        return 128 + stop_signal.signum
    except RuntimeError as err:
        # a Ctrl-C that lands while a class is being created (a lazy import: construct's
        # pdb) reaches us as "Error calling __set_name__" caused by the KeyboardInterrupt
        if not isinstance(err.__cause__ or err.__context__, KeyboardInterrupt):
            raise
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
