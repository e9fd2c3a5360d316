"""pytest plugin: point pyvmm's checkpoint test kit at your own dirty tracker or page saver.

::

    pytest --pyvmm-algorithm mypkg:MySaver              # module:attribute, or a plug-in's name
    pytest --pyvmm-algorithm saver=live,tracker=hash    # a pair; the option may be repeated
    pytest --pyvmm-algorithm mypkg:MySaver --pyvmm-profile long

pyvmm installs it as a ``pytest11`` entry point (``pyvmm``); ``-p pyvmm.testing.pytest_plugin``
loads it where that is not installed.  What it gives:

* with ``--pyvmm-algorithm``, test items ``pyvmm-kit[ALGORITHM]::CHECK`` running the checks of
  :mod:`pyvmm.testing.kit` with that part plugged in: the checkpoint state machine, a reload in a
  new process equals the uninterrupted run, a checkpoint of a running guest equals a stop-and-copy
  one at the same pause, every prefix of a chain reloads to its snapshot.  They join whatever
  else the run collects; ``-k pyvmm-kit`` (or ``-k "not pyvmm-kit"``) selects them;
* fixtures for your own tests: ``pyvmm_machine``, ``pyvmm_checkpoint_file``,
  ``pyvmm_checkpointer`` (capabilities from ``@pytest.mark.pyvmm_capabilities(...)``, default
  ``incremental``) and ``pyvmm_algorithm`` (a test using them runs once per
  ``--pyvmm-algorithm``; without the option, with pyvmm's defaults);
* the hypothesis profiles ``pyvmm-ci`` (quick, derandomized: CI) and ``pyvmm-long`` (a long
  local run), registered for ``--hypothesis-profile``.  The kit's own items follow
  ``--pyvmm-profile`` (else a ``pyvmm-*`` ``--hypothesis-profile``, else
  ``PYVMM_HYPOTHESIS_PROFILE``, else ci); ``long`` also runs the oracles over more workloads.

A bad ``--pyvmm-algorithm`` (unknown name, a part that does not load, a kind that cannot be told)
is one usage error line before anything runs.

Installed, the plugin loads in every pytest run of the environment, so it imports pyvmm (and
hypothesis) only in a run that uses it: one with ``--pyvmm-algorithm``, a ``pyvmm-*`` hypothesis
profile, or a ``pyvmm_*`` fixture.  A conftest that wants the profiles without those calls
:func:`pyvmm.testing.stateful.profile_settings`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..machine import Machine
    from ..migration.checkpoint import Checkpointer
    from .kit import AlgorithmUnderTest

_ALGORITHMS = pytest.StashKey[list["AlgorithmUnderTest"]]()
_PROFILES = {"ci": "ci", "long": "long", "dev": "long"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm", "pyvmm checkpoint test kit")
    group.addoption("--pyvmm-algorithm", action="append", default=[], metavar="SPEC",
                    help="run pyvmm's checkpoint test kit against this part: a tracker or "
                         "saver name (pyvmm algorithms lists them) or module:attribute, or "
                         "saver=SPEC / tracker=SPEC / saver=SPEC,tracker=SPEC (repeatable)")
    group.addoption("--pyvmm-profile", choices=("ci", "long"), default=None,
                    help="the kit's hypothesis profile and workloads: ci (quick, the default) "
                         "or long")


@pytest.hookimpl(tryfirst=True)  # before hypothesis loads --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pyvmm_capabilities(*names): the capabilities of the "
                                       "pyvmm_checkpointer fixture (default: incremental)")
    texts = config.getoption("pyvmm_algorithm")
    hypothesis_profile = config.getoption("hypothesis_profile", None)
    if texts or (isinstance(hypothesis_profile, str) and hypothesis_profile.startswith("pyvmm-")):
        from .stateful import profile_settings

        profile_settings()  # registers pyvmm-ci, pyvmm-long (and pyvmm-dev) with hypothesis
    if not texts:
        return
    from ..errors import ConfigError
    from .kit import parse_algorithm

    try:
        config.stash[_ALGORITHMS] = [parse_algorithm(text) for text in texts]
    except ConfigError as err:
        raise pytest.UsageError(f"--pyvmm-algorithm: {err}") from err


def kit_profile(config: pytest.Config) -> str:
    """``"ci"`` or ``"long"``: the profile of the kit's items (see the module)."""
    hypothesis_profile = config.getoption("hypothesis_profile", None)
    chosen = (config.getoption("pyvmm_profile") or
              (hypothesis_profile.removeprefix("pyvmm-")
               if isinstance(hypothesis_profile, str) and hypothesis_profile.startswith("pyvmm-")
               else None) or
              os.environ.get("PYVMM_HYPOTHESIS_PROFILE") or "ci")
    if chosen not in _PROFILES:
        raise pytest.UsageError(f"unknown pyvmm profile {chosen!r} (choose from ci, long)")
    return _PROFILES[chosen]


# ----------------------------------------------------------------------------- the kit's items
@dataclasses.dataclass(frozen=True)
class KitCheck:
    """One check of the kit: its name, what it promises, and how to run it in a directory."""

    name: str
    promise: str
    run: Callable[[Path], None]


def kit_checks(algorithm: AlgorithmUnderTest, profile: str) -> list[KitCheck]:
    """The checks the kit runs on ``algorithm`` under ``profile``."""
    from . import kit

    checks = []
    for capabilities in algorithm.state_machine_capabilities():
        checks.append(KitCheck(
            f"state-machine[{'+'.join(capabilities) or 'full'}]",
            "host, kernel and vCPU writes, checkpoints of a stopped and of a running guest, "
            "and prefix reloads agree with a plain model of RAM",
            functools.partial(_state_machine, algorithm, capabilities, profile)))
    patterns = kit.PATTERNS[profile]
    for pattern in patterns["new-process"]:
        checks.append(KitCheck(
            f"new-process-reload[{pattern}]",
            "run, checkpoint a chain, reload it in a new process, run on == one uninterrupted "
            "run (output bytes)",
            functools.partial(_in, kit.new_process_reload_equals_uninterrupted_run, algorithm,
                              pattern)))
    for pattern in patterns["running"]:
        checks.append(KitCheck(
            f"running-equals-stop-and-copy[{pattern}]",
            "a checkpoint taken while the guest runs == a stop-and-copy one at the same pause "
            "(RAM digest, CPU, devices)",
            functools.partial(_in, kit.running_checkpoint_equals_stop_and_copy, algorithm,
                              pattern)))
        checks.append(KitCheck(
            f"chain-prefixes[{pattern}]",
            "every prefix of an incremental chain reloads to the machine at its last pause, "
            "with every reload strategy, and so does the chain squashed",
            functools.partial(_in, kit.chain_prefixes_reload_to_their_snapshots, algorithm,
                              pattern)))
    return checks


def _state_machine(algorithm: AlgorithmUnderTest, capabilities: tuple[str, ...], profile: str,
                   workdir: Path) -> None:
    from .kit import run_state_machine

    run_state_machine(algorithm, capabilities, profile)  # its own files: no workdir


def _in(check: Callable[..., None], algorithm: AlgorithmUnderTest, pattern: str,
        workdir: Path) -> None:
    check(algorithm, workdir, pattern)


class KitItem(pytest.Item):
    """One check of the kit on one algorithm, in a temporary directory of its own."""

    def __init__(self, *, check: KitCheck, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check

    def runtest(self) -> None:
        with tempfile.TemporaryDirectory(prefix="pyvmm-kit-") as workdir:
            self.check.run(Path(workdir))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> Any:
        if style is None and self.config.getoption("tbstyle", "auto") == "auto":
            style = "short"  # the message says what differs; the kit's frames are the how
        failure = super().repr_failure(excinfo, style)
        if hasattr(failure, "addsection"):  # after the traceback; the summary keeps the error
            failure.addsection("pyvmm kit: what must hold", self.check.promise)
        return failure

    def _traceback_filter(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:
        """From the check on: pytest's own frames say nothing of the algorithm."""
        traceback = excinfo.traceback.cut(path=Path(__file__))
        return traceback[1:].filter(excinfo) if len(traceback) > 1 else traceback

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return Path(__file__).with_name("kit.py"), None, f"{self.nodeid}: {self.check.promise}"


class KitCollector(pytest.Collector):
    """The kit's checks of one algorithm."""

    def __init__(self, *, algorithm: AlgorithmUnderTest, profile: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.algorithm = algorithm
        self.profile = profile

    def collect(self) -> list[pytest.Item]:
        return [KitItem.from_parent(self, name=check.name, check=check)
                for check in kit_checks(self.algorithm, self.profile)]


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect: they apply to the kit's items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    algorithms = config.stash.get(_ALGORITHMS, [])
    if not algorithms:
        return
    profile = kit_profile(config)
    # pytest shows a node id's first part as a path relative to where it was started: rooted
    # there, the kit's items read pyvmm-kit[...] from any directory under the rootdir
    try:
        where = config.invocation_params.dir.relative_to(config.rootpath).as_posix()
    except ValueError:
        where = "."
    for algorithm in algorithms:
        name = f"pyvmm-kit[{algorithm}]"
        collector = KitCollector.from_parent(
            session, name=name, nodeid=name if where == "." else f"{where}/{name}",
            algorithm=algorithm, profile=profile)
        items.extend(collector.collect())


# ----------------------------------------------------------------------------- fixtures
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    algorithms = metafunc.config.stash.get(_ALGORITHMS, [])
    if algorithms and "pyvmm_algorithm" in metafunc.fixturenames:
        metafunc.parametrize("pyvmm_algorithm", algorithms, ids=[str(a) for a in algorithms],
                             indirect=True)


@pytest.fixture
def pyvmm_algorithm(request: pytest.FixtureRequest) -> AlgorithmUnderTest:
    """The part under test: each ``--pyvmm-algorithm`` in turn, else pyvmm's defaults."""
    from .kit import AlgorithmUnderTest

    algorithm: AlgorithmUnderTest = getattr(request, "param", AlgorithmUnderTest())
    return algorithm


@pytest.fixture
def pyvmm_machine() -> Iterator[Machine]:
    """The built-in workload booted, not started: 16 MiB of RAM, a 2 MiB working set written
    at random forever, seed 7.  Run it with ``run(max_insns=N)``, or ``start()`` and
    ``pause()``; closed afterwards."""
    from ..boot import GuestSpec, boot
    from ..guests.workload import WorkloadOptions

    options = WorkloadOptions.parse("pattern=random,working_set=2M,passes=0,touch=64,report=0")
    with boot(GuestSpec(workload=options), ram_size=16 << 20, seed=7) as machine:
        yield machine


@pytest.fixture
def pyvmm_checkpoint_file(tmp_path: Path) -> Path:
    """A path for a checkpoint file (not made yet) in the test's temporary directory."""
    return tmp_path / "checkpoint.chpt"


@pytest.fixture
def pyvmm_checkpointer(request: pytest.FixtureRequest, pyvmm_machine: Machine,
                       pyvmm_checkpoint_file: Path,
                       pyvmm_algorithm: AlgorithmUnderTest) -> Iterator[Checkpointer]:
    """A Checkpointer of ``pyvmm_machine`` into ``pyvmm_checkpoint_file`` with the part under
    test plugged in, capabilities from ``@pytest.mark.pyvmm_capabilities(...)`` (default
    ``incremental``), no fsync; closed (the guest paused first) afterwards."""
    marker = request.node.get_closest_marker("pyvmm_capabilities")
    capabilities = tuple(marker.args) if marker is not None else ("incremental",)
    checkpointer = pyvmm_algorithm.checkpointer(pyvmm_machine, pyvmm_checkpoint_file,
                                                capabilities, durable=False)
    try:
        yield checkpointer
    finally:
        pyvmm_machine.pause()
        checkpointer.close()
