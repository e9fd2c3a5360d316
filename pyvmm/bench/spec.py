"""What ``pyvmm bench`` measures: the matrix of cells, parsed from the command line.

A cell is one workload x one algorithm x one RAM size x one repetition, measured on its own (a
fresh process, see :mod:`pyvmm.bench.cell`).  It travels as JSON (:meth:`Cell.to_json`), so any
executor, local or remote, can run it.

Spelling, as ``pyvmm bench --help`` teaches it:

* ``--workload pattern=random,working_set=64M..1G``: the built-in guest's options
  (``--workload help`` lists them); a value may be a list ``a|b|c`` or, for sizes and counts, a
  doubling range ``LOW..HIGH`` (64M, 128M, ... up to 1G); each combination is one workload.
  ``passes`` defaults to 0 (the guest runs until the cell is done) and ``report`` to 0.
* ``--program "PATH ARG..."``: a static ARM64 ELF and its arguments (e.g. a busybox applet).
* ``--algorithm incremental,live,tracker=wp``: capabilities (``incremental``, ``live``,
  ``cow``, ``checksum``, ``compress``) and parts by name (``tracker=``, ``saver=``,
  ``encoder=``: whatever ``pyvmm algorithms`` lists, plug-ins and ``module:attribute``
  included); ``stop-and-copy`` alone (or an empty spec) is the default full checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ConfigError
from ..guests.workload import WorkloadOptions
from ..migration.defaults import MIGRATION_CAPABILITIES
from ..units import parse_size

PROGRAM_PREFIX = "program:"
PARTS = ("tracker", "saver", "encoder")
#: Doubling ranges stop after this many values (a typo like 1K..1T is not a million cells).
MAX_RANGE_VALUES = 16


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Capabilities and named parts of one checkpoint configuration."""

    capabilities: tuple[str, ...] = ()
    tracker: str | None = None
    saver: str | None = None
    encoder: str | None = None

    @property
    def label(self) -> str:
        """A short name: the capabilities (``stop-and-copy`` when none) and the parts named."""
        words = list(self.capabilities) or ["stop-and-copy"]
        words += [f"{kind}={name}" for kind, name in (("tracker", self.tracker),
                                                      ("saver", self.saver),
                                                      ("encoder", self.encoder)) if name]
        return ",".join(words)

    def checkpointer_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~pyvmm.migration.checkpoint.Checkpointer`."""
        options: dict[str, Any] = {"capabilities": self.capabilities}
        if self.tracker:
            options["tracker"] = self.tracker
        if self.saver:
            options["saver"] = self.saver
        if self.encoder:
            options["encoder"] = self.encoder
        return options


def parse_algorithm(text: str) -> Algorithm:
    """``incremental,live,tracker=wp`` -> Algorithm; ConfigError naming a bad item."""
    capabilities: list[str] = []
    parts: dict[str, str] = {}
    for item in (piece.strip() for piece in text.split(",")):
        if not item or item == "stop-and-copy":
            continue
        kind, equals, name = item.partition("=")
        if equals:
            if kind not in PARTS:
                raise ConfigError(f"--algorithm {text!r}: {kind!r} is not one of "
                                  f"{', '.join(PARTS)} (KIND=NAME) nor a capability")
            if not name:
                raise ConfigError(f"--algorithm {text!r}: {kind}= needs a name")
            if kind in parts:
                raise ConfigError(f"--algorithm {text!r} names two {kind}s")
            parts[kind] = name
        elif item in MIGRATION_CAPABILITIES:
            if item not in capabilities:
                capabilities.append(item)
        else:
            raise ConfigError(f"--algorithm {text!r}: {item!r} is not a capability "
                              f"({', '.join(MIGRATION_CAPABILITIES)}) nor KIND=NAME "
                              f"({', '.join(PARTS)})")
    return Algorithm(tuple(sorted(capabilities)), parts.get("tracker"), parts.get("saver"),
                     parts.get("encoder"))


def algorithm_from_label(label: str) -> Algorithm:
    return parse_algorithm(label)


def _expand_value(key: str, value: str) -> list[str]:
    """``a|b`` -> [a, b]; ``64M..1G`` -> [64M, 128M, ..., 1G] (sizes) or ``1..8`` (counts)."""
    values: list[str] = []
    for choice in value.split("|"):
        low, dots, high = choice.partition("..")
        if not dots:
            values.append(choice)
            continue
        try:
            first, last = parse_size(low), parse_size(high)
        except ConfigError as err:
            raise ConfigError(f"--workload {key}={value}: {err}") from err
        if first <= 0 or last < first:
            raise ConfigError(f"--workload {key}={value}: a range goes from a positive value "
                              f"up to a larger one")
        current = first
        for _ in range(MAX_RANGE_VALUES):
            if current > last:
                break
            values.append(_size_text(current) if any(c.isalpha() for c in low + high)
                          else str(current))
            current *= 2
        else:
            raise ConfigError(f"--workload {key}={value}: more than {MAX_RANGE_VALUES} values")
    return values


def _size_text(size: int) -> str:
    """``64M``, ``1G``: the spelling --workload takes back."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def expand_workload(text: str) -> list[str]:
    """Every combination of the built-in guest's options that ``text`` spells, each checked
    (ConfigError naming the bad option); a program spec is returned as it is."""
    if text.startswith(PROGRAM_PREFIX):
        if not shlex.split(text[len(PROGRAM_PREFIX):]):
            raise ConfigError("--program needs the path of a static ARM64 ELF")
        return [text]
    items = [piece.strip() for piece in text.split(",") if piece.strip()]
    keys, choices = [], []
    for item in items:
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"--workload {text!r}: {item!r} is not KEY=VALUE")
        keys.append(key)
        choices.append(_expand_value(key, value))
    combos = []
    for values in itertools.product(*choices):
        options = dict(zip(keys, values))
        options.setdefault("passes", "0")
        options.setdefault("report", "0")
        spelled = ",".join(f"{k}={v}" for k, v in options.items())
        WorkloadOptions.parse(spelled)  # ConfigError names the bad option
        combos.append(spelled)
    return combos


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement: a workload, an algorithm, a RAM size, a repetition (JSON in and out)."""

    workload: str
    algorithm: str
    ram: int
    repetition: int = 0
    checkpoints: int = 4
    interval: float = 0.5
    directory: str = "."
    reloads: bool = True
    keep_files: bool = False

    def key(self) -> tuple[str, str, int]:
        """The cell's place in the matrix, repetitions aside."""
        return self.workload, self.algorithm, self.ram

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cell:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"bench cell: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**data)


def matrix(workloads: Sequence[str], algorithms: Sequence[str], rams: Iterable[int], *,
           repeat: int, checkpoints: int, interval: float, directory: str, reloads: bool = True,
           keep_files: bool = False) -> list[Cell]:
    """Every cell, repetitions innermost-last (all cells once, then all again), so that an
    interrupted run has a full first pass."""
    combos = list(itertools.product(workloads, algorithms, rams))
    return [Cell(workload, algorithm, ram, repetition, checkpoints, interval, directory,
                 reloads, keep_files)
            for repetition in range(repeat) for workload, algorithm, ram in combos]
