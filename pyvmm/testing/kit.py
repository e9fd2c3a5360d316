"""The test kit's checks of a checkpoint algorithm: the part under test and the central oracles.

A part under test is a dirty tracker, a page saver, a page encoder, or one of each kind
(:class:`AlgorithmUnderTest`,
parsed from ``--pyvmm-algorithm`` text by :func:`parse_algorithm`).  Every check runs it through
the one :class:`~pyvmm.migration.checkpoint.Checkpointer` sequence pyvmm's own algorithms take,
and raises AssertionError saying what differs (DESIGN.md §9):

* :func:`run_state_machine`: the hypothesis state machine of :mod:`pyvmm.testing.stateful` (host,
  kernel and vCPU writes, checkpoints of a stopped and of a running guest, prefix reloads, all
  against a plain model of RAM);
* :func:`new_process_reload_equals_uninterrupted_run`: through the command line, run the built-in
  workload, checkpoint a chain, reload it in a new process and run on: the output is the
  uninterrupted run's, for every prefix of the chain and every reload strategy;
* :func:`running_checkpoint_equals_stop_and_copy`: checkpoints taken while the guest runs (a live
  saver's case) reload to the machine as it was at their pause, which is what a stop-and-copy
  checkpoint at that pause holds (RAM digest, CPU, devices);
* :func:`chain_prefixes_reload_to_their_snapshots`: incremental checkpoints while the guest and
  the host (the kernel included) write RAM: increments 0..k reload to the machine at pause k, for
  every k and every reload strategy (and the whole chain squashed), and the file's page counts
  agree with its page index.

Nothing here needs pytest (:mod:`pyvmm.testing.pytest_plugin` makes test items of these checks).
Each check writes only under the directory it is given.  The ``python -m pyvmm`` children run
with this process's ``sys.path``, so a ``module:attribute`` this process imports, they import
too.  Run the checks on one thread; each leaves no machine, thread or process behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis.stateful import run_state_machine_as_test

from ..boot import GuestSpec, boot
from ..errors import ConfigError
from ..guests.workload import WorkloadOptions
from ..machine import RAM_BASE, Machine
from ..migration.algorithms import KINDS, available, resolve
from ..migration.checkpoint import Checkpointer, CheckpointStats, reload
from ..migration.container import CheckpointFile
from ..migration.defaults import STRATEGIES
from ..migration.seams import EncoderOptions
from ..migration.squash import squash
from ..ram import PAGE_SIZE
from .digest import ram_digest
from .stateful import checkpoint_state_machine, profile_settings

#: The guest of the command-line oracle: the built-in workload, done in a fraction of a second.
CLI_GUEST = ("--ram", "16M", "--seed", "5")
#: Passes of each pattern there: its pages are still being written at :data:`STOP_AT` (the
#: checksum over the working set at the end takes another 0.66M instructions).
CLI_PASSES = {"increment": 400}
#: Where the command-line run checkpoints and stops (instructions).
CHECKPOINT_AT = (300_000, 600_000)
STOP_AT = 900_000
#: The running guest of the in-process oracles: RAM, and the RAM offset of the pages the host
#: writes between checkpoints (beyond the workload's image and its 2 MiB working set).
RUNNING_RAM = 16 << 20
HOST_PAGES_OFFSET = 8 << 20
#: The workload patterns of each oracle, per profile (see :func:`profile_settings`).  The
#: command-line oracle compares output bytes, so its first is ``increment``: its guest adds 1 to a
#: byte of every page in turn, so a page lost or saved as of another moment is never healed by a
#: later write, and the final checksum shows it (the other patterns overwrite what they wrote).
PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "ci": {"new-process": ("increment",), "running": ("random",)},
    "long": {"new-process": ("increment", "random", "hotcold"),
             "running": ("random", "sequential", "hotcold", "increment")},
}
#: How long the guest may take to print two progress lines before a check says it did not run.
GUEST_PROGRESS_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class AlgorithmUnderTest:
    """A tracker, a saver, an encoder or one of each: names
    :func:`~pyvmm.migration.algorithms.resolve` knows (built-in, plug-in or
    ``module:attribute``); None: pyvmm's default for that seam."""

    saver: str | None = None
    tracker: str | None = None
    encoder: str | None = None

    def __str__(self) -> str:
        named = [f"{kind}={name}" for kind, name in (("saver", self.saver),
                                                     ("tracker", self.tracker),
                                                     ("encoder", self.encoder)) if name]
        return ",".join(named) or "defaults"

    def checkpointer(self, machine: Machine, path: Path, capabilities: Sequence[str] = (),
                     **options: Any) -> Checkpointer:
        """A Checkpointer of ``machine`` into ``path`` with this part plugged in."""
        return Checkpointer(machine, path, capabilities=capabilities,
                            tracker=self.tracker or "async", saver=self.saver,
                            encoder=self.encoder, **options)

    def cli_options(self) -> list[str]:
        """The ``pyvmm run`` options that plug this part in."""
        return [*(["--saver", self.saver] if self.saver else []),
                *(["--tracker", self.tracker] if self.tracker else []),
                *(["--encoder", self.encoder] if self.encoder else [])]

    def checksums(self) -> tuple[str, ...]:
        """``("checksum",)``, the capability the oracles add to find damage, unless this part's
        encoder compresses (the two do not combine: its frames carry their own checksums)."""
        if self.encoder is None:
            return ("checksum",)
        encoder = resolve("encoder", self.encoder)(EncoderOptions())
        return () if encoder.encoding().compress_level else ("checksum",)

    def state_machine_capabilities(self) -> list[tuple[str, ...]]:
        """The capability sets the state machine runs with: full checkpoints use no tracker,
        so only a saver (or the defaults) is run without ``incremental``."""
        if self.tracker and not self.saver:
            return [("incremental",)]
        return [(), ("incremental",)]


def parse_algorithm(text: str) -> AlgorithmUnderTest:
    """``SPEC``, or ``KIND=SPEC`` items joined by commas (KIND: saver, tracker, encoder); a
    SPEC is a name (``pyvmm algorithms`` lists them) or ``module:attribute``.  A bare SPEC's
    kind is the registry's, or what the object is (a class with ``save``, ``collect`` or
    ``encoding``, a factory of one or two arguments: a saver or a tracker).  Each part is loaded
    now: ConfigError (one line) for anything wrong."""
    chosen: dict[str, str] = {}
    for item in (piece.strip() for piece in text.split(",")):
        kind, equals, spec = item.partition("=")
        if not equals:
            kind, spec = algorithm_kind(item), item
        elif kind not in KINDS:
            raise ConfigError(f"algorithm {text!r}: {kind!r} is neither saver, tracker nor "
                              f"encoder")
        if not spec:
            raise ConfigError(f"algorithm {text!r}: a {kind or 'part'} without a name")
        if kind in chosen:
            raise ConfigError(f"algorithm {text!r} names two {kind}s (test them one at a time)")
        resolve(kind, spec)  # a part that does not load is one usage error, not a failure each
        chosen[kind] = spec
    return AlgorithmUnderTest(saver=chosen.get("saver"), tracker=chosen.get("tracker"),
                              encoder=chosen.get("encoder"))


def algorithm_kind(spec: str) -> str:
    """``"saver"``, ``"tracker"`` or ``"encoder"``: what ``spec`` names (ConfigError when
    that cannot be told)."""
    if ":" not in spec:
        kinds = [kind for kind in KINDS if spec in available(kind)]
        if len(kinds) == 1:
            return kinds[0]
        if kinds:
            raise ConfigError(f"{spec!r} names a {' and a '.join(kinds)}: write "
                              f"{' or '.join(f'{kind}={spec}' for kind in kinds)}")
        known = "; ".join(f"{kind}s: {', '.join(available(kind))}" for kind in KINDS)
        raise ConfigError(f"unknown algorithm {spec!r} ({known}; or give module:attribute)")
    module, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"algorithm {spec}: cannot load it: {err}") from err
    kind = _kind_of(factory)
    if kind is None:
        raise ConfigError(f"cannot tell whether {spec} is a tracker, a saver or an encoder: "
                          f"write tracker={spec}, saver={spec} or encoder={spec}")
    return kind


def _kind_of(factory: object) -> str | None:
    if isinstance(factory, type):
        for kind, method in (("saver", "save"), ("tracker", "collect"),
                             ("encoder", "encoding")):
            if callable(getattr(factory, method, None)):
                return kind
        return None
    try:
        parameters = inspect.signature(factory).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    required = [p for p in parameters if p.default is p.empty and
                p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {1: "saver", 2: "tracker"}.get(len(required))


# ----------------------------------------------------------------------------- the state machine
def run_state_machine(algorithm: AlgorithmUnderTest, capabilities: tuple[str, ...],
                      profile: str = "ci") -> None:
    """The checkpoint state machine with ``algorithm`` plugged in, under hypothesis profile
    ``profile``.  Increments may hold pages that were not written (wasteful, not wrong)."""
    machine = checkpoint_state_machine(capabilities, tracker=algorithm.tracker or "async",
                                       saver=algorithm.saver, exact_increments=False,
                                       encoder=algorithm.encoder)
    run_state_machine_as_test(machine, settings=profile_settings(profile))  # type: ignore[no-untyped-call]


# ----------------------------------------------------------------------------- in a new process
def new_process_reload_equals_uninterrupted_run(algorithm: AlgorithmUnderTest, workdir: Path,
                                                pattern: str = "increment") -> None:
    """Run the workload with ``algorithm`` checkpointing (incremental, with checksums unless it
    compresses: :meth:`AlgorithmUnderTest.checksums`) at
    :data:`CHECKPOINT_AT` and stop at :data:`STOP_AT`; reload each prefix of the chain in a new
    process and run on: each prints what the uninterrupted run printed from its checkpoint on
    (the whole chain: exactly the rest), each reload strategy and a lazy reload alike."""
    passes = CLI_PASSES.get(pattern, 100)
    workload = f"pattern={pattern},working_set=2M,passes={passes},report={max(passes // 8, 1)}"
    guest = (*CLI_GUEST, "--workload", workload)
    whole = _pyvmm(workdir, "run", "-q", *guest)
    _check_exit(whole, "the uninterrupted run")
    chain = workdir / "chain.chpt"
    first = _pyvmm(workdir, "run", "-q", *guest, "--max-insns", str(STOP_AT), "--checkpoint-at",
                   ",".join(map(str, CHECKPOINT_AT)), "--incremental",
                   *(f"--{cap}" for cap in algorithm.checksums()),
                   "--checkpoint", f"chpt:{chain}", *algorithm.cli_options())
    _check_exit(first, f"the run checkpointing with {algorithm}")
    assert whole.stdout.startswith(first.stdout), \
        "the checkpointing run printed what the uninterrupted run did not"
    increments = len(CHECKPOINT_AT) + 1
    # every prefix, each with a reload strategy of its own (the whole chain: indexed, the default)
    reloads: list[tuple[int, tuple[str, ...]]] = [
        (count, ("--reload-strategy", strategy))
        for count, strategy in zip(range(increments, 0, -1), itertools.cycle(STRATEGIES))]
    reloads.append((increments, ("--lazy",)))
    for count, how in reloads:
        rest = _pyvmm(workdir, "run", "-q", "--incoming", f"chpt:{count}:{chain}", *how)
        what = f"the reload of increments 0..{count - 1} ({' '.join(how)}) in a new process"
        _check_exit(rest, what)
        assert rest.returncode == whole.returncode, f"{what} exited {rest.returncode}"
        if count == increments:
            _same_output(first.stdout + rest.stdout, whole.stdout, what)
        else:  # it resumed somewhere in what the first run printed, and went on as the whole run
            assert whole.stdout.endswith(rest.stdout) and \
                len(whole.stdout) - len(rest.stdout) <= len(first.stdout), \
                f"{what} printed {_tail(rest.stdout)}, not the end of the uninterrupted " \
                f"run's output ({_tail(whole.stdout)})"


def _pyvmm(workdir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    # "" on sys.path is this process's working directory, not the child's
    paths = [os.path.abspath(path or os.curdir) for path in sys.path]
    paths = [path for path in paths if os.path.isdir(path)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], cwd=workdir, env=env,
                          capture_output=True, timeout=600, check=False)


def _check_exit(proc: subprocess.CompletedProcess[bytes], what: str) -> None:
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AssertionError(f"{what} failed (exit {proc.returncode}): "
                             f"{' | '.join(stderr[-3:]) or 'no message'}")


def _same_output(got: bytes, expected: bytes, what: str) -> None:
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                  min(len(got), len(expected)))
        start = expected.rfind(b"\n", 0, at) + 1
        line = expected[:at].count(b"\n") + 1
        raise AssertionError(f"{what}: the output differs from the uninterrupted run's at line "
                             f"{line}: {_line(got, start)} instead of {_line(expected, start)}")


def _line(output: bytes, start: int) -> str:
    end = output.find(b"\n", start)
    return repr(output[start:end if end >= 0 else len(output)].decode(errors="replace"))


def _tail(output: bytes, length: int = 120) -> str:
    text = output.decode(errors="replace").strip()
    return repr(text if len(text) <= length else "…" + text[-length:])


# ----------------------------------------------------------------------------- a running guest
@dataclasses.dataclass(frozen=True)
class MachineSnapshot:
    """What a checkpoint must reproduce of a machine: RAM (the digest, and a digest per non-zero
    page to name the pages that differ), the CPU and the devices' registers."""

    ram: str
    pages: dict[tuple[str, int], bytes]
    cpu: object
    devices: tuple[object, ...]

    @classmethod
    def of(cls, machine: Machine) -> MachineSnapshot:
        pages = {}
        for block in machine.ram_blocks:
            for page in block.nonzero_pages():
                pages[(block.name, page)] = hashlib.blake2b(block.page(page),
                                                            digest_size=16).digest()
        return cls(ram_digest(machine), pages, machine.cpu_state(),
                   (dataclasses.replace(machine.uart.state),
                    dataclasses.replace(machine.counter.state)))

    def differences(self, other: MachineSnapshot) -> list[str]:
        """What differs from ``other``, in words (empty: nothing)."""
        found = []
        if self.ram != other.ram:
            pages = sorted(key for key in set(self.pages) | set(other.pages)
                           if self.pages.get(key) != other.pages.get(key))
            named = ", ".join(f"{name} page {page}" for name, page in pages[:8])
            found.append(f"RAM ({len(pages)} pages: {named}{', …' if len(pages) > 8 else ''})")
        if self.cpu != other.cpu:
            found.append(f"CPU ({self.cpu} instead of {other.cpu})")
        if self.devices != other.devices:
            found.append(f"devices ({self.devices} instead of {other.devices})")
        return found


class _Progress:
    """Counts the lines the guest prints (its UART sink), so a check can wait until it ran."""

    def __init__(self) -> None:
        self._lines = 0
        self._changed = threading.Condition()

    def sink(self, data: bytes) -> None:
        with self._changed:
            self._lines += data.count(b"\n")
            self._changed.notify_all()

    def wait(self, lines: int, what: str) -> None:
        """Wait until the guest printed ``lines`` more lines: it ran, whatever the host speed."""
        with self._changed:
            target = self._lines + lines
            if not self._changed.wait_for(lambda: self._lines >= target,
                                          GUEST_PROGRESS_TIMEOUT):
                raise AssertionError(f"the guest did not run {what}: no progress in "
                                     f"{GUEST_PROGRESS_TIMEOUT:g} s")


@contextmanager
def _running_guest(pattern: str) -> Iterator[tuple[Machine, _Progress]]:
    """The built-in workload writing its working set forever, a progress line every 10 passes;
    started by the caller, paused and closed on the way out."""
    progress = _Progress()
    options = WorkloadOptions.parse(f"pattern={pattern},working_set=2M,passes=0,touch=64,"
                                    f"report=10")
    machine = boot(GuestSpec(workload=options), ram_size=RUNNING_RAM, seed=7,
                   uart_sink=progress.sink)
    try:
        yield machine, progress
    finally:
        machine.close()


def _checkpoints_while_running(algorithm: AlgorithmUnderTest, path: Path, pattern: str,
                               count: int, capabilities: Sequence[str],
                               between: Callable[[Machine, int], None] | None = None,
                               ) -> tuple[list[MachineSnapshot], list[CheckpointStats]]:
    """``count`` checkpoints of the running workload, each after the guest made progress (and
    after ``between(machine, k)``); the machine at each pause, and each checkpoint's stats."""
    at_pause: list[MachineSnapshot] = []
    history: list[CheckpointStats] = []
    with _running_guest(pattern) as (machine, progress):
        checkpointer = algorithm.checkpointer(machine, path, capabilities, durable=False)
        checkpointer.on_pause = lambda paused: at_pause.append(MachineSnapshot.of(paused))
        try:
            machine.start()
            for k in range(count):
                if between is not None:
                    between(machine, k)
                progress.wait(2, f"before checkpoint {k}" if k == 0 else
                              f"after checkpoint {k - 1} (did the saver let it run again?)")
                history.append(checkpointer.checkpoint())
        finally:
            machine.pause()
            checkpointer.close()
    return at_pause, history


def _check_reloads(path: Path, at_pause: Sequence[MachineSnapshot], strategy: str,
                   what: str) -> None:
    for count, expected in enumerate(at_pause, start=1):
        with reload(f"chpt:{count}:{path}", strategy=strategy) as machine:
            differences = MachineSnapshot.of(machine).differences(expected)
        assert not differences, \
            f"{what}: reloading increments 0..{count - 1} ({strategy}) does not give the " \
            f"machine at pause {count - 1}: {'; '.join(differences)} differ"


def running_checkpoint_equals_stop_and_copy(algorithm: AlgorithmUnderTest, workdir: Path,
                                            pattern: str = "random", checkpoints: int = 3,
                                            ) -> None:
    """Full checkpoints while the guest writes its working set: each reloads to the machine
    as it was at its pause, as a stop-and-copy checkpoint there does, however long saving took
    and whatever the guest wrote meanwhile."""
    path = workdir / "running.chpt"
    at_pause, _ = _checkpoints_while_running(algorithm, path, pattern, checkpoints, ())
    _check_reloads(path, at_pause, "indexed", f"checkpoints of a running guest with {algorithm}")


def chain_prefixes_reload_to_their_snapshots(algorithm: AlgorithmUnderTest, workdir: Path,
                                             pattern: str = "random", checkpoints: int = 4,
                                             ) -> None:
    """Incremental checkpoints (with checksums) while the guest runs, the host writing other
    pages between them (``write_memory``, a memoryview, the kernel by ``preadv``, a page zeroed
    again): every prefix reloads to the machine at its last pause with every reload strategy,
    and so does the chain squashed into one full checkpoint; each increment's page counts agree
    with its page index and with the stats returned."""
    path = workdir / "chain.chpt"
    at_pause, history = _checkpoints_while_running(
        algorithm, path, pattern, checkpoints, ("incremental", *algorithm.checksums()),
        between=lambda machine, k: _host_writes(machine, workdir, k))
    kinds = [stats.kind for stats in history]
    assert kinds == ["full"] + ["incremental"] * (checkpoints - 1), f"increments {kinds}"
    _check_counts(path, history)
    for strategy in STRATEGIES:
        _check_reloads(path, at_pause, strategy, f"an incremental chain with {algorithm}")
    squashed = workdir / "squashed.chpt"
    squash(path, output=squashed, durable=False)
    with reload(f"chpt:{squashed}") as machine:
        differences = MachineSnapshot.of(machine).differences(at_pause[-1])
    assert not differences, \
        f"an incremental chain with {algorithm}, squashed into one full checkpoint, does not " \
        f"give the machine at the last pause: {'; '.join(differences)} differ"


def _host_writes(machine: Machine, workdir: Path, round_: int) -> None:
    """Round ``round_`` of host writes into pages the workload never touches."""
    def gpa(page: int) -> int:
        return RAM_BASE + HOST_PAGES_OFFSET + page * PAGE_SIZE

    first = 3 * round_
    machine.write_memory(gpa(first), b"written by write_memory in round %d" % round_)
    text = b"written through a memoryview in round %d" % round_
    machine.memory_view(gpa(first + 1) + 100, len(text))[:] = text
    source = workdir / "kernel-source"
    source.write_bytes(b"written by the kernel (preadv) in round %d" % round_)
    fd = os.open(source, os.O_RDONLY)
    try:
        os.preadv(fd, [machine.memory_view(gpa(first + 2) + 200, source.stat().st_size)], 0)
    finally:
        os.close(fd)
    if round_:
        machine.write_memory(gpa(first - 3), bytes(PAGE_SIZE))  # last round's page: zero again


def _check_counts(path: Path, history: Sequence[CheckpointStats]) -> None:
    with CheckpointFile.open(path) as container:
        for info, stats in zip(container.header.increments, history, strict=True):
            runs = container.page_index(info.index)
            data = sum(run.npages for run in runs if not run.zero)
            zero = sum(run.npages for run in runs if run.zero)
            assert (data, zero) == (info.pages, info.zero_pages), \
                f"increment {info.index}: the page index holds {data} data + {zero} zero " \
                f"pages, the header counts {info.pages} + {info.zero_pages}"
            assert (stats.pages, stats.zero_pages) == (info.pages, info.zero_pages), \
                f"increment {info.index}: checkpoint() said {stats.pages} + " \
                f"{stats.zero_pages} pages, the file holds {info.pages} + {info.zero_pages}"
