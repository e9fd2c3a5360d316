"""The ``pyvmm run`` command: options checked, a machine booted or reloaded, run, checkpointed.

The run goes through a :class:`~pyvmm.monitor.controller.VmController`, which its monitors
(``--qmp``, ``--monitor``, ``--guest-inform``) drive too: a monitor's ``stop`` pauses the run,
``cont`` goes on, ``quit`` ends it (the end-of-run checkpoint of ``--checkpoint`` is still
written), and a reload may swap the machine.  The migration and monitor layers are imported only
by runs that use them (start-up time: benchmarks/bench_startup.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from .boot import BUILTIN_GUESTS, GuestSpec, boot
from .errors import ConfigError, PyvmmError
from .guests.workload import WorkloadOptions
from .interrupts import signals_held
from .machine import DEFAULT_RAM_SIZE, Machine, RunResult, RunState, StopReason
from .progress import Progress, squash_summary
from .units import format_size, parse_count, parse_size


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


def cmd_run(args: argparse.Namespace) -> int:
    """``pyvmm run``: boot (or reload) a machine, run it, checkpoint it; serve its monitors."""
    monitors = _MonitorOptions.parse(args, defer=args.incoming == "defer")
    options = _check_run_options(args)
    if options.incoming is not None and options.incoming.squash:
        return _squash_incoming(args, options.incoming)
    out_stream: BinaryIO = sys.stdout.buffer
    if args.output:
        for option, target in (("--incoming", options.incoming),
                               ("--checkpoint", options.save_target)):
            if target is not None and _same_file(args.output, target.path):
                raise ConfigError(f"--output {args.output} is the {option} checkpoint file: "
                                  f"the guest's output would overwrite it")
        try:
            out_stream = open(args.output, "wb")  # noqa: SIM115 - closed below
        except OSError as err:
            raise ConfigError(f"--output {args.output}: {err.strerror}") from err
    sink = _LineSink(out_stream)
    err_sink = _LineSink(sys.stderr.buffer)
    try:
        return _run_machine(args, options, monitors, sink, err_sink)
    finally:
        out_stream.flush()
        if out_stream is not sys.stdout.buffer:
            out_stream.close()


@dataclasses.dataclass(frozen=True)
class _RunOptions:
    max_insns: int | None
    points: _CheckpointPoints
    save_target: Any  # CheckpointTarget | None (the migration layer is loaded only if needed)
    incoming: Any
    defer: bool
    spec: GuestSpec | None
    ram_size: int


def _check_run_options(args: argparse.Namespace) -> _RunOptions:
    """Every run option checked before anything starts (one ConfigError naming the first bad
    one)."""
    max_insns = parse_count(args.max_insns, "--max-insns") if args.max_insns else None
    if args.seconds is not None and args.seconds <= 0:
        raise ConfigError(f"--seconds must be > 0, not {args.seconds}")
    points = _checkpoint_points(args)
    if (args.incremental or args.live or args.cow or args.checksum or args.compress) and \
            not args.checkpoint:
        raise ConfigError("--incremental, --live, --cow, --checksum and --compress are "
                          "capabilities of --checkpoint chpt:FILE")
    if (args.encoder or args.compress_level is not None) and not args.checkpoint:
        raise ConfigError("--encoder and --compress-level say how --checkpoint chpt:FILE "
                          "writes pages: give --checkpoint")
    if args.unprotect_pages < 1:
        raise ConfigError(f"--unprotect-pages must be at least 1, not {args.unprotect_pages}")
    if not 0 <= args.saver_nice <= 19:
        raise ConfigError(f"--saver-nice must be 0..19, not {args.saver_nice}")
    defer = args.incoming == "defer"
    if args.checkpoint or (args.incoming and not defer):  # a run that neither saves nor
        from .migration.checkpoint import parse_target  # reloads never needs it
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
    incoming = parse_target(args.incoming).resolved() if args.incoming and not defer else None
    if args.lazy and incoming is None:
        raise ConfigError("--lazy needs --incoming chpt:[N:]FILE")
    ram_size = 0
    spec = None
    if incoming is not None or defer:
        given = [opt for opt, value in (("--ram", args.ram), ("--seed", args.seed),
                                        ("--guest", args.guest), ("--workload", args.workload),
                                        ("--files", args.files), ("--stdin", args.stdin),
                                        ("--env", args.env),
                                        ("--files-limit", args.files_limit)) if value]
        if given:
            raise ConfigError(f"{given[0]} cannot be combined with --incoming: the guest, its "
                              f"RAM and seed come from the checkpoint")
    else:
        ram_size = parse_size(args.ram or format_size_arg(DEFAULT_RAM_SIZE), "RAM size (--ram)")
        spec = _guest_spec(args)
    return _RunOptions(max_insns, points, save_target, incoming, defer, spec, ram_size)


@dataclasses.dataclass(frozen=True)
class _MonitorOptions:
    """The run's monitors: QMP and HMP sockets, HMP on the terminal, the guest-inform socket."""

    qmp: tuple[Any, ...] = ()
    hmp: tuple[Any, ...] = ()
    stdio: bool = False
    inform: Any = None
    qfs: str | None = None  # the mount point ("": the default one); None: no QFS

    @property
    def any_command_channel(self) -> bool:
        return bool(self.qmp or self.hmp or self.stdio)

    @classmethod
    def parse(cls, args: argparse.Namespace, *, defer: bool) -> _MonitorOptions:
        if not (args.qmp or args.monitor or args.guest_inform):
            if args.qfs is not None and not defer:
                return cls(qfs=args.qfs)  # its control/cont starts a --paused guest
            if defer:
                raise ConfigError("--incoming defer waits for a monitor's migrate-incoming: "
                                  "add --qmp unix:PATH or --monitor stdio|unix:PATH")
            if args.paused:
                raise ConfigError("--paused waits for a monitor's cont: add --qmp unix:PATH "
                                  "or --monitor stdio|unix:PATH")
            return cls()
        from .monitor.sockets import parse_address

        qmp = tuple(parse_address(text, "--qmp") for text in args.qmp)
        stdio = "stdio" in args.monitor
        if stdio and args.stdin == "-":
            raise ConfigError("--monitor stdio and --stdin - both read this terminal: serve "
                              "the monitor on unix:PATH instead")
        if args.monitor.count("stdio") > 1:
            raise ConfigError("--monitor stdio is given twice")
        hmp = tuple(parse_address(text, "--monitor") for text in args.monitor
                    if text != "stdio")
        inform = parse_address(args.guest_inform, "--guest-inform") \
            if args.guest_inform else None
        if inform is not None and inform.kind != "unix":
            raise ConfigError(f"--guest-inform {args.guest_inform}: expected unix:PATH")
        paths = [a.path for a in (*qmp, *hmp, *([inform] if inform else [])) if a.kind == "unix"]
        for path in paths:
            if paths.count(path) > 1:
                raise ConfigError(f"the socket {path} is given for two monitors")
        monitors = cls(qmp, hmp, stdio, inform, args.qfs)
        if (defer or args.paused) and not monitors.any_command_channel:
            raise ConfigError("--incoming defer and --paused wait for a monitor's command: "
                              "add --qmp unix:PATH or --monitor stdio|unix:PATH")
        return monitors


def _seed(args: argparse.Namespace, spec: GuestSpec) -> int:
    """The machine's seed: --seed, or the workload's own ``seed=`` (they must agree)."""
    given = any(item.partition("=")[0].strip().replace("-", "_") == "seed"
                for text in args.workload for item in text.split(","))
    if not given:
        return int(args.seed or 0)
    if args.seed is not None and args.seed != spec.workload.seed:
        raise ConfigError(f"--seed {args.seed} and --workload seed={spec.workload.seed} "
                          f"disagree: give one of them")
    return spec.workload.seed


def _run_machine(args: argparse.Namespace, options: _RunOptions, monitors: _MonitorOptions,
                 sink: _LineSink, err_sink: _LineSink) -> int:
    from .monitor.controller import MachineSinks, VmController

    machine: Machine | None = None
    loader = None
    incoming = options.incoming
    if incoming is not None and args.lazy:
        from .migration.lazy import lazy_reload

        machine, loader = lazy_reload(incoming, uart_sink=sink, stdout=sink, stderr=err_sink)
    elif incoming is not None:
        from .migration.checkpoint import reload

        machine = reload(incoming, strategy=args.reload_strategy, uart_sink=sink,
                         stdout=sink, stderr=err_sink)
    elif not options.defer:
        assert options.spec is not None
        machine = boot(options.spec, ram_size=options.ram_size, seed=_seed(args, options.spec),
                       uart_sink=sink, stdout=sink, stderr=err_sink)

    def before_ram_use() -> None:
        if loader is not None:
            loader.close()  # the RAM must be whole and unregistered before it is saved
            if loader.error is not None:
                raise loader.error

    def report(path: str, stats: Any) -> None:
        if not args.quiet:
            _print_stats(path, stats)

    vm = None
    services: list[Any] = []
    try:
        vm = VmController(machine, settings=_settings(args),
                          sinks=MachineSinks(sink, sink, err_sink),
                          reload_strategy=args.reload_strategy,
                          incoming_path=None if incoming is None else incoming.path,
                          start_paused=args.paused, before_ram_use=before_ram_use,
                          on_checkpoint=report)
        services = _start_monitors(vm, monitors)
        started = time.monotonic()
        if machine is None:
            machine = vm.wait_for_machine()  # --incoming defer: a monitor's migrate-incoming
            if machine is None:
                if not args.quiet:
                    print("pyvmm: quit before a machine was loaded", file=sys.stderr)
                return 0
        try:
            result = _run_with_checkpoints(args, vm, options)
        except PyvmmError as err:
            if loader is not None and loader.error is not None:
                raise loader.error from err  # the cause, not the stopped machine
            raise
        elapsed = time.monotonic() - started
    finally:
        for service in reversed(services):
            service.close()
        if loader is not None:
            loader.close()  # before the machine: the fill finishes first
        if vm is not None:
            vm.close()
            machine = vm.machine or machine
        if machine is not None:
            machine.close()
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
        _summary(args, options, result, machine, elapsed)
    if result.reason is StopReason.SHUTDOWN:
        return result.exit_code or 0
    return 128 + args.stop_signal.signum if result.reason is StopReason.INTERRUPTED else 0


def _summary(args: argparse.Namespace, options: _RunOptions, result: RunResult,
             machine: Machine, elapsed: float) -> None:
    what = {
        StopReason.SHUTDOWN: f"guest exited with code {result.exit_code}",
        StopReason.INSN_LIMIT: f"stopped after {options.max_insns} instructions (--max-insns)",
        StopReason.TIME_LIMIT: "stopped at the time limit (--seconds)",
        StopReason.INTERRUPTED: f"interrupted ({args.stop_signal.name})",
        StopReason.PAUSED: "paused",
        StopReason.QUIT: "ended by quit" if not args.max_checkpoints else
        "ended after --max-checkpoints",
    }.get(result.reason, result.reason.value)
    insns = machine.executed_insns
    rate = f" ({_count_text(insns / elapsed)}/s)" if elapsed > 0 and insns else ""
    print(f"pyvmm: {what}; {elapsed:.2f} s, RAM {format_size(machine.ram.size)}, "
          f"{_count_text(insns)} guest instructions{rate}", file=sys.stderr)


def _settings(args: argparse.Namespace) -> Any:
    from .monitor.settings import MigrationSettings

    return MigrationSettings(
        capabilities={"incremental": args.incremental, "live": args.live, "cow": args.cow,
                      "checksum": args.checksum, "compress": args.compress},
        tracker=args.tracker, saver=args.saver, unprotect_pages=args.unprotect_pages,
        encoder=args.encoder, compress_level=args.compress_level,
        fault_mode=args.fault_mode,
        saver_nice=args.saver_nice, max_increments=args.max_increments,
        durable=not args.no_fsync, sanity_checks=not args.no_sanity_checks)


def _start_monitors(vm: Any, monitors: _MonitorOptions) -> list[Any]:
    """The monitors' sockets and threads (each with close()), started; the guest-inform
    channel always (a guest may ask for its own checkpoints)."""
    services: list[Any] = []
    try:
        if monitors.qmp or monitors.hmp:
            from .monitor.server import MonitorServer

            server = MonitorServer(vm)
            services.append(server)
            for address in monitors.qmp:
                server.add(address, "qmp", "--qmp")
            for address in monitors.hmp:
                server.add(address, "hmp", "--monitor")
            server.start()
        if monitors.stdio:
            from .monitor.console import StdioMonitor

            services.append(StdioMonitor(vm).start())
        if monitors.qfs is not None:
            from .monitor.qfs import QfsService

            services.append(QfsService(vm, monitors.qfs or None))
        from .monitor.inform import start_guest_inform

        services.append(start_guest_inform(vm, monitors.inform))
    except BaseException:
        for service in reversed(services):
            service.close()
        raise
    return services


def _run_with_checkpoints(args: argparse.Namespace, vm: Any,
                          options: _RunOptions) -> RunResult:
    """Run in segments: up to each --checkpoint-at count and multiple of --checkpoint-every,
    checkpoint, go on; checkpoint at the end.  Limits (--max-insns, --seconds) count from the
    start of this run.  The --checkpoint file is claimed before the guest runs."""
    machine = vm.machine
    save_target = options.save_target
    max_insns, points = options.max_insns, options.points
    if save_target is not None:
        vm.claim(save_target.path)
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    done = 0
    result: RunResult = machine.last_result
    periodic = None
    ran = False
    try:
        if save_target is not None and args.period and machine.state is not RunState.SHUTDOWN:
            periodic = _start_periodic(args, vm, save_target.path)
        if machine.state is RunState.SHUTDOWN:
            if not args.quiet:
                print("pyvmm: the checkpointed guest had already powered off", file=sys.stderr)
        else:
            for stop in points.stops(max_insns):
                budget = None if stop < 0 else stop - done
                seconds = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
                result = vm.run(max_insns=budget, seconds=seconds)
                if result.reason is not StopReason.INSN_LIMIT:
                    break
                done = stop
                if stop in points and save_target is not None:
                    with signals_held(_finishing("the checkpoint in flight")):
                        vm.checkpoint(save_target.path)
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
                vm.finish()
                if ran:
                    _end_of_run(args, vm, save_target, periodic, result,
                                skip=bool(done and done in points and done == max_insns))
            finally:
                vm.close()
    return result


def _end_of_run(args: argparse.Namespace, vm: Any, save_target: Any, periodic: Any,
                result: RunResult, *, skip: bool) -> None:
    """The end-of-run checkpoint, and what the periodic checkpoints came to."""
    limited = periodic is not None and periodic.limit_reached()
    if save_target is not None and result.error is None and not limited and not skip:
        vm.checkpoint(save_target.path)
    if periodic is not None and periodic.error is not None:
        raise PyvmmError(f"periodic checkpoints stopped after {periodic.count}: "
                         f"{periodic.error}")
    if limited and periodic is not None and not args.quiet:
        print(f"pyvmm: {periodic.count} periodic checkpoints taken (--max-checkpoints)",
              file=sys.stderr)


def _start_periodic(args: argparse.Namespace, vm: Any, path: str) -> Any:
    from .migration.periodic import PeriodicCheckpointer

    class _ToFile:
        """The periodic timer's checkpointer: the controller, into the --checkpoint file."""

        @staticmethod
        def checkpoint() -> Any:
            return vm.checkpoint(path)

    return PeriodicCheckpointer(_ToFile(), args.period, max_checkpoints=args.max_checkpoints,
                                on_limit=vm.end_run).start()


def _print_stats(path: str, stats: Any) -> None:
    print(f"pyvmm: checkpoint {stats.increment} ({stats.kind}) -> {path}: "
          f"{stats.pages} pages + {stats.zero_pages} zero, "
          f"{format_size(stats.bytes_written)} in {stats.total_ms:.0f} ms, downtime "
          f"{stats.downtime_ms:.1f} ms", file=sys.stderr, flush=True)


def _count_text(count: float) -> str:
    """123, 45.6K, 7.89M, 1.23G: a count as the run options take it."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.0f}"


def _finishing(what: str) -> Callable[[int], None]:
    """What a signal held back during ``what`` prints: that it is acted on once that is done."""

    def note(signum: int) -> None:
        print(f"pyvmm: {signal.Signals(signum).name} received: {what} is finished first "
              f"(then the run stops)", file=sys.stderr, flush=True)

    return note


def _squash_incoming(args: argparse.Namespace, target: Any) -> int:
    """``--incoming chpt:squash[:N]:FILE``: fold N increments into FILE_squashed and exit."""
    from .migration.squash import squash

    result = squash(target.path, target.count, strategy=args.reload_strategy,
                    durable=not args.no_fsync, progress=Progress("squashing", args.quiet))
    squash_summary(result, args.quiet)
    return 0
