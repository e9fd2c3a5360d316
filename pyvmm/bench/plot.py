"""The figures of a bench run, as PNG files (matplotlib: ``pip install pyvmm[plot]``).

* ``downtime.png``: checkpoint downtime against the workload's dirty rate, a line per algorithm;
  the dirty rate of a workload is what its incremental checkpoints saved per second of guest run
  (pages x 4 KiB / interval, median), or the workloads in order where no cell was incremental;
* ``slowdown.png``: the guest's speed during a checkpoint over its speed just before, a bar per
  algorithm and workload;
* ``bytes.png``: bytes written per increment (increment 0 is full), a line per algorithm;
* ``reload.png``: reload time (indexed) against the chain's length, a line per algorithm.

Each point is the median over repetitions (and over the checkpoints of a cell where several
give the same quantity), with error bars from the minimum to the maximum.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

Record = dict[str, Any]
FIGURES = ("downtime.png", "slowdown.png", "bytes.png", "reload.png")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ConfigError("plots need matplotlib: pip install 'pyvmm[plot]'") from err
    matplotlib.use("Agg")  # files, never a window
    import matplotlib.pyplot as plt

    return plt


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, median - min, max - median): a point and its error bar."""
    middle = statistics.median(values)
    return middle, middle - min(values), max(values) - middle


def _label(workload: str) -> str:
    return ",".join(part for part in workload.split(",")
                    if not part.startswith(("passes=", "report=")))


def _good(records: Sequence[Record]) -> list[Record]:
    return [r for r in records if not r.get("error") and r.get("checkpoints")]


def dirty_rates(records: Sequence[Record]) -> dict[str, float]:
    """MiB/s each workload dirtied, from its incremental checkpoints (see the module doc)."""
    rates: dict[str, list[float]] = defaultdict(list)
    for record in _good(records):
        interval = float(record["cell"]["interval"])
        for checkpoint in record["checkpoints"]:
            if checkpoint["kind"] == "incremental":
                rates[record["cell"]["workload"]].append(
                    (checkpoint["pages"] + checkpoint["zero_pages"]) * 4096 / (1 << 20) / interval)
    return {workload: statistics.median(values) for workload, values in rates.items()}


def _series(records: Sequence[Record], x_of: Any, y_of: Any) -> dict[str, dict[float, list[float]]]:
    """algorithm -> x -> the y values found."""
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in _good(records):
        for x, y in zip(*_points(record, x_of, y_of)):
            out[record["cell"]["algorithm"]][x].append(y)
    return out


def _points(record: Record, x_of: Any, y_of: Any) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for item in y_of(record):
        x = x_of(record, item)
        if x is not None and item[1] is not None:
            xs.append(x)
            ys.append(item[1])
    return xs, ys


def _lines(plt: Any, series: dict[str, dict[float, list[float]]], title: str, xlabel: str,
           ylabel: str, path: Path, xticks: dict[float, str] | None = None,
           log: bool = False) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for algorithm, points in sorted(series.items()):
        xs = sorted(points)
        middles, below, above = zip(*(_spread(points[x]) for x in xs)) if xs else ((), (), ())
        axes.errorbar(xs, middles, yerr=[below, above], marker="o", capsize=3, label=algorithm)
    if xticks:
        axes.set_xticks(list(xticks), list(xticks.values()), rotation=20, ha="right",
                        fontsize=7)
    if log:  # algorithms apart by orders of magnitude (a savevm's pause, a live one's)
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot(results: dict[str, Any], directory: str | Path) -> list[Path]:
    """Draw the figures of ``results`` into ``directory`` (made if missing); their paths."""
    plt = _pyplot()
    records = results["records"]
    if not _good(records):
        raise ConfigError("the results hold no finished cell to plot")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in FIGURES]
    rates = dirty_rates(records)
    workloads = list(dict.fromkeys(r["cell"]["workload"] for r in _good(records)))
    numeric = all(w in rates for w in workloads)
    position = {w: rates[w] if numeric else float(i) for i, w in enumerate(workloads)}
    ticks = None if numeric else {float(i): _label(w) for i, w in enumerate(workloads)}
    _lines(plt, _series(records, lambda r, item: position[r["cell"]["workload"]],
                        lambda r: [(None, c["downtime_ms"]) for c in r["checkpoints"]]),
           "Checkpoint downtime", "dirty rate (MiB/s)" if numeric else "workload",
           "downtime (ms, log scale)", paths[0], ticks, log=True)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    # only the algorithms whose guest speed was measured (QEMU counts no instructions)
    algorithms = sorted({r["cell"]["algorithm"] for r in _good(records)
                         if any(c.get("guest_ips_during") is not None
                                for c in r["checkpoints"])})
    width = 0.8 / max(len(algorithms), 1)
    for k, algorithm in enumerate(algorithms):
        middles, below, above, xs = [], [], [], []
        for i, workload in enumerate(workloads):
            values = [c["guest_ips_during"] / c["guest_ips_before"]
                      for r in _good(records) if r["cell"]["algorithm"] == algorithm
                      and r["cell"]["workload"] == workload
                      for c in r["checkpoints"]
                      if c.get("guest_ips_before") and c.get("guest_ips_during") is not None]
            if values:
                middle, low, high = _spread(values)
                middles.append(middle)
                below.append(low)
                above.append(high)
                xs.append(i + k * width)
        axes.bar(xs, middles, width, yerr=[below, above], capsize=3, label=algorithm)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))],
                    [_label(w) for w in workloads], rotation=20, ha="right", fontsize=7)
    axes.set_title("Guest speed during a checkpoint / just before")
    axes.set_ylabel("ratio (1 = no slowdown)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=100)
    plt.close(figure)
    _lines(plt, _series(records, lambda r, item: float(item[0]),
                        lambda r: [(c["increment"], c["bytes_written"] / (1 << 20))
                                   for c in r["checkpoints"]]),
           "Bytes per increment (0: full)", "increment", "MiB written", paths[2])
    _lines(plt, _series(records, lambda r, item: float(item[0]),
                        lambda r: [(row["increments"], row["indexed_s"]
                                    if row.get("indexed_s") is not None
                                    else row.get("qemu_incoming_s"))
                                   for row in r.get("reloads") or []]),
           "Reload time against chain length (indexed; QEMU: -incoming of snapshot k)",
           "increments reloaded", "seconds (log scale)", paths[3], log=True)
    return paths
