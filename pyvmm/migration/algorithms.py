"""The registry of checkpoint algorithms: dirty trackers, page savers and page encoders by name.

Built-ins are listed here; third-party plug-ins join through Python entry points in the groups
``pyvmm.trackers``, ``pyvmm.savers`` and ``pyvmm.encoders`` (an installed package declares e.g.
``[project.entry-points."pyvmm.savers"] coldfirst = "mypkg:ColdFirstSaver"``).  A name may also
be given as ``module:attribute`` (an algorithm not installed as a plug-in, e.g. in a test).

What a name resolves to is a factory (see :mod:`pyvmm.migration.seams`):

* a tracker: ``factory(blocks, options: TrackerOptions) -> DirtyTracker``;
* a saver: ``factory(setup: SaverSetup) -> PageSaver``;
* an encoder: ``factory(options: EncoderOptions) -> PageEncoder``.

Nothing is imported before it is asked for: listing names reads entry point metadata only, and a
plug-in that fails to load is reported as such by :func:`describe`, never at start-up.  Unknown
names are a ConfigError that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError
from ..ram import RamBlock
from .seams import DirtyTracker, TrackerOptions

KINDS = {"tracker": "pyvmm.trackers", "saver": "pyvmm.savers", "encoder": "pyvmm.encoders"}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    kind: str
    name: str
    load: Callable[[], Any]
    origin: str = "built-in"
    summary: str = ""  # a built-in's one line; a plug-in's comes from its docstring


def _async_tracker(blocks: Sequence[RamBlock], options: TrackerOptions) -> DirtyTracker:
    from .dirty import AsyncTracker

    return AsyncTracker(blocks)


def _wp_tracker(blocks: Sequence[RamBlock], options: TrackerOptions) -> DirtyTracker:
    from .dirty import WpFaultTracker

    return WpFaultTracker(blocks, unprotect_pages=options.unprotect_pages,
                          handler_cpu=options.handler_cpu, fault_mode=options.fault_mode)


def _hash_tracker(blocks: Sequence[RamBlock], options: TrackerOptions) -> DirtyTracker:
    from .hash_tracker import HashTracker

    return HashTracker(blocks)


def _attribute(module: str, name: str) -> Callable[[], Any]:
    return lambda: getattr(importlib.import_module(module), name)


_BUILTINS: tuple[Algorithm, ...] = (
    Algorithm("tracker", "async", lambda: _async_tracker, summary=(
        "kernel WP_ASYNC + PAGEMAP_SCAN: a write costs the guest no fault (default)")),
    Algorithm("tracker", "wp", lambda: _wp_tracker, summary=(
        "write-protect faults resolved by pyvmm's C handler; the live saver's own tracker")),
    Algorithm("tracker", "hash", lambda: _hash_tracker, summary=(
        "reference: compares every page with its copy at the last pause (slow, obviously "
        "right; sees changes, not writes)")),
    Algorithm("saver", "stop-and-copy", _attribute("pyvmm.migration.savers", "StopAndCopySaver"),
              summary="every page written with the guest paused (QEMU's savevm; default)"),
    Algorithm("saver", "live", _attribute("pyvmm.migration.savers", "LiveSaver"), summary=(
        "write-protect at the pause, save while the guest runs, shadow-copy pages it is "
        "about to change")),
    Algorithm("saver", "cow", _attribute("pyvmm.migration.savers", "CowSaver"), summary=(
        "fork at the pause; a child writes the pages from its copy-on-write view")),
    Algorithm("encoder", "plain", _attribute("pyvmm.migration.encoders", "PlainEncoder"),
              summary="QEMU's records: ZERO for zero pages, PAGE for the rest (default)"),
    Algorithm("encoder", "zstd", _attribute("pyvmm.migration.encoders", "ZstdEncoder"), summary=(
        "the compress capability: pages that zstd shrinks by a quarter become pyvmm's "
        "compressed records")),
)


def available(kind: str) -> dict[str, Algorithm]:
    """The algorithms of ``kind`` by name: the built-ins, then installed plug-ins (a plug-in
    never shadows a built-in name)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown algorithm kind {kind!r} (choose from {', '.join(KINDS)})")
    found = {a.name: a for a in _BUILTINS if a.kind == kind}
    from importlib.metadata import entry_points

    for point in entry_points(group=KINDS[kind]):
        if point.name not in found:
            dist = point.dist.name if point.dist is not None else point.module
            found[point.name] = Algorithm(kind, point.name, point.load, origin=dist)
    return found


def resolve(kind: str, name: str) -> Any:
    """The factory named ``name`` (or ``module:attribute``); ConfigError naming the known ones
    for an unknown name, and what went wrong for a plug-in that cannot be loaded."""
    if ":" in name:
        module, _, attribute = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{kind} {name}: cannot load it: {err}") from err
    # a built-in is found without reading installed packages' metadata (~10 ms per scan)
    algorithm = next((a for a in _BUILTINS if a.kind == kind and a.name == name), None)
    known = {name: algorithm} if algorithm is not None else available(kind)
    algorithm = known.get(name)
    if algorithm is None:
        raise ConfigError(f"unknown {kind} {name!r} (choose from {', '.join(known)}, or give "
                          f"module:attribute)")
    try:
        return algorithm.load()
    except Exception as err:
        raise ConfigError(f"{kind} {name} (from {algorithm.origin}): cannot load it: "
                          f"{err}") from err


def describe(algorithm: Algorithm) -> str:
    """One line: the built-in's summary, or the first line of the plug-in's docstring."""
    if algorithm.summary:
        return algorithm.summary
    try:
        loaded = algorithm.load()
    except Exception as err:  # noqa: BLE001 - listed, not raised: the others still show
        return f"(cannot load: {err})"
    text = getattr(loaded, "description", None) or (loaded.__doc__ or "").strip()
    return text.splitlines()[0] if text else "(no description)"


def listing() -> str:
    """``pyvmm algorithms``: every kind, every name, one line each."""
    lines = []
    for kind, group in KINDS.items():
        lines.append(f"{kind}s (--{kind} NAME; plug-ins: entry point group {group}):")
        for algorithm in available(kind).values():
            origin = "" if algorithm.origin == "built-in" else f"  [{algorithm.origin}]"
            lines.append(f"  {algorithm.name:<14} {describe(algorithm)}{origin}")
    return "\n".join(lines)
