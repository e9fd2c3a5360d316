"""``python -m pyvmm bench``: the command line of the benchmark matrix (see :mod:`pyvmm.bench`)."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..units import parse_size

DEFAULT_WORKLOAD = "pattern=random,working_set=64M"
DEFAULT_ALGORITHMS = ("stop-and-copy", "incremental", "live", "incremental,live", "cow")

EPILOG = """\
examples:
  python -m pyvmm bench                                  the classic five, 64 MiB random writes
  python -m pyvmm bench --workload pattern=random,working_set=16M..256M \\
      --algorithm incremental,live --algorithm incremental,tracker=wp --ram 512M
  python -m pyvmm bench --algorithm saver=mypkg:MySaver --repeat 5 -o mine.json
  python -m pyvmm bench --program "tests/data/busybox/bin/busybox gzip -c /dev/zero"
  python -m pyvmm bench compare before.json after.json   ratios between two runs
  python -m pyvmm bench plot run.json --plots figures/   redraw the PNGs of a saved run

A cell is one workload x algorithm x RAM size x repetition, measured in a fresh process: the
guest runs on, --checkpoints checkpoints are taken --interval seconds apart while it runs, then
each chain prefix is reloaded; raw write()/read() and memcpy of the same RAM are measured in the
same process as baselines. Results (JSON, one record per cell, with the host described) are
saved after every cell: Ctrl-C keeps the finished ones. --workload help lists the guest's
options; a value may be a list a|b or a doubling range 64M..1G.
"""


def add_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="compare checkpoint algorithms on a matrix of workloads",
        description="Run a matrix of workloads x algorithms x RAM sizes x repetitions and "
                    "measure each checkpoint (downtime, total time, bytes, faults, the guest's "
                    "speed before/during/after, extra memory) and the reload of each chain "
                    "prefix, beside raw write()/read()/memcpy baselines.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("verb", nargs="*", metavar="compare A.json B.json | plot R.json",
                       help="instead of running: the ratios between two saved runs, or the "
                            "figures of one")
    bench.add_argument("--workload", metavar="SPEC", action="append", default=[],
                       help=f"built-in guest options, lists a|b and ranges LOW..HIGH allowed "
                            f"(repeatable; default {DEFAULT_WORKLOAD}; 'help' lists them)")
    bench.add_argument("--program", metavar='"PATH ARG..."', action="append", default=[],
                       help="a static ARM64 ELF and its arguments as a workload (repeatable)")
    bench.add_argument("--algorithm", metavar="SPEC", action="append", default=[],
                       help="capabilities and parts, e.g. incremental,live,tracker=wp or "
                            "saver=mypkg:MySaver (repeatable; default: "
                            f"{' / '.join(DEFAULT_ALGORITHMS)})")
    bench.add_argument("--qemu", choices=("auto", "on", "off"), default="auto",
                       help="QEMU rows beside pyvmm's (qemu:savevm, qemu:background-snapshot on "
                            "each built-in workload): auto (default) when qemu-system-aarch64 "
                            "is installed, with a note when not; on: required; off")
    bench.add_argument("--ram", metavar="SIZE[,SIZE...]", default="256M",
                       help="guest RAM sizes (default 256M)")
    bench.add_argument("--repeat", metavar="N", type=int, default=3,
                       help="repetitions of each cell (default 3)")
    bench.add_argument("--checkpoints", metavar="K", type=int, default=4,
                       help="checkpoints per cell, the chain reloaded prefix by prefix "
                            "(default 4)")
    bench.add_argument("--interval", metavar="SECONDS", type=float, default=0.5,
                       help="guest run before and between checkpoints (default 0.5)")
    bench.add_argument("--dask", metavar="SCHEDULER",
                       help="run the cells on an existing Dask distributed cluster (e.g. "
                            "tcp://host:8786; pip install 'pyvmm[dask]'), one per worker at a "
                            "time, each record naming its host; default: here, one at a time")
    bench.add_argument("--dir", metavar="DIR", default=".",
                       help="where checkpoint files are written (default: here)")
    bench.add_argument("-o", "--output", metavar="FILE.json",
                       help="results file (default bench-DATE-TIME.json here)")
    bench.add_argument("--csv", metavar="FILE.csv", help="also write one CSV row per checkpoint")
    bench.add_argument("--plots", metavar="DIR",
                       help="draw the PNG figures into DIR (matplotlib: pip install "
                            "'pyvmm[plot]'; default for 'plot R.json': R-plots/)")
    bench.add_argument("--no-reloads", action="store_true", help="do not time reloads")
    bench.add_argument("--keep-files", action="store_true",
                       help="keep each cell's checkpoint file (its path is in the record)")
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress, no table")


def _rams(text: str) -> list[int]:
    sizes = []
    for item in text.split(","):
        size = parse_size(item.strip())
        if size < (16 << 20):
            raise ConfigError(f"--ram {item}: a bench guest needs at least 16M")
        sizes.append(size)
    return sizes


def _check_algorithm(spec: str) -> str:
    from ..migration.algorithms import resolve
    from .qemu import ALGORITHMS as QEMU_ALGORITHMS
    from .spec import parse_algorithm

    if spec in QEMU_ALGORITHMS:
        return spec
    algorithm = parse_algorithm(spec)
    for kind in ("tracker", "saver", "encoder"):
        name = getattr(algorithm, kind)
        if name:
            resolve(kind, name)  # ConfigError listing the known ones
    return algorithm.label


def cmd_bench(args: argparse.Namespace, argv: list[str]) -> int:
    from . import report

    if args.verb:
        if args.verb[0] == "compare" and len(args.verb) == 3:
            print(report.compare(report.load_results(args.verb[1]),
                                 report.load_results(args.verb[2])))
            return 0
        if args.verb[0] == "plot" and len(args.verb) == 2:
            from .plot import plot

            source = Path(args.verb[1])
            target = args.plots or str(source.with_name(f"{source.stem}-plots"))
            for path in plot(report.load_results(source), target):
                print(path)
            return 0
        raise ConfigError("bench takes options to run a matrix, or: compare A.json B.json, "
                          "or: plot R.json")
    if "help" in args.workload:
        from ..guests.workload import WORKLOAD_HELP

        print(WORKLOAD_HELP)
        return 0
    from .runner import ProgressLine, new_results, run_matrix
    from .spec import PROGRAM_PREFIX, expand_workload, matrix

    for name, value, low in (("--repeat", args.repeat, 1), ("--checkpoints", args.checkpoints, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, not {value}")
    if not 0 < args.interval <= 60:
        raise ConfigError(f"--interval must be in (0, 60] seconds, not {args.interval}")
    workloads = [w for spec in (args.workload or ([] if args.program else [DEFAULT_WORKLOAD]))
                 for w in expand_workload(spec)]
    workloads += [w for program in args.program for w in expand_workload(PROGRAM_PREFIX + program)]
    algorithms = list(dict.fromkeys(_check_algorithm(a)
                                    for a in args.algorithm or DEFAULT_ALGORITHMS))
    directory = Path(args.dir)
    if not directory.is_dir():
        raise ConfigError(f"--dir {args.dir}: not a directory")
    output = Path(args.output or datetime.datetime.now().strftime("bench-%Y%m%d-%H%M%S.json"))
    if output.is_dir():
        raise ConfigError(f"--output {output}: is a directory")
    from .qemu import ALGORITHMS as QEMU_ALGORITHMS
    from .qemu import available_note

    builtin = [w for w in workloads if not w.startswith(PROGRAM_PREFIX)]
    qemu_rows: list[str] = []
    if args.qemu != "off" and builtin:
        note = available_note()
        if note is None:
            qemu_rows = [a for a in QEMU_ALGORITHMS if a not in algorithms]
        elif args.qemu == "on":
            raise ConfigError(f"--qemu on: {note.split(':')[0]}")
        elif not args.quiet:
            print(f"pyvmm bench: note: {note}", file=sys.stderr)
    common = {"repeat": args.repeat, "checkpoints": args.checkpoints, "interval": args.interval,
              "directory": str(directory.resolve()), "reloads": not args.no_reloads,
              "keep_files": args.keep_files}
    rams = _rams(args.ram)
    cells = matrix(workloads, [a for a in algorithms if a not in QEMU_ALGORITHMS], rams,
                   **common) + matrix(builtin, [a for a in algorithms if a in QEMU_ALGORITHMS]
                                      + qemu_rows, rams, **common)
    cells.sort(key=lambda cell: cell.repetition)  # all cells once, then again: stable
    algorithms += qemu_rows
    if args.plots:
        from .plot import _pyplot

        _pyplot()  # matplotlib missing: said before the run, not after it
    results = new_results(["pyvmm", *argv], str(directory))
    client = None
    if args.dask:
        from .runner import dask_client

        client = dask_client(args.dask)
    if not args.quiet:
        print(f"pyvmm bench: {len(cells)} cells ({len(workloads)} workloads x {len(algorithms)} "
              f"algorithms x {len(_rams(args.ram))} RAM sizes x {args.repeat}), results in "
              f"{output}", file=sys.stderr)
    progress = ProgressLine(len(cells), quiet=args.quiet)
    if client is not None:
        from .runner import run_matrix_dask

        finished = run_matrix_dask(cells, results, output, client, progress=progress)
    else:
        finished = run_matrix(cells, results, output, progress=progress)
    if args.csv:
        Path(args.csv).write_text(report.csv_text(results["records"]))
    if args.plots and any(not r.get("error") for r in results["records"]):
        from .plot import plot

        for path in plot(results, args.plots):
            print(f"pyvmm bench: {path}", file=sys.stderr)
    if not args.quiet:
        print(report.table(results["records"]))
    if not finished:
        print(f"pyvmm bench: interrupted; {len(results['records'])} finished cell(s) kept in "
              f"{output}", file=sys.stderr)
        return 130
    failed = sum(1 for record in results["records"] if record.get("error"))
    return 1 if failed else 0
