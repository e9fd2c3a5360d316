"""Reading bench results: the summary table, the CSV rows, and the ratios between two runs.

A summary row is one matrix cell over its repetitions: medians of every checkpoint's downtime,
total time and bytes, the guest's speed during a checkpoint over its speed just before (1.0: no
slowdown), the extra memory, the chain's reload time (all increments, indexed) and the lazy
reload's first instruction, each with its spread (min..max) where there are several values.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

Record = dict[str, Any]

#: Per-checkpoint CSV columns, after the cell's.
CHECKPOINT_COLUMNS = ("increment", "kind", "downtime_ms", "setup_ms", "total_ms",
                      "bytes_written", "pages", "zero_pages", "write_faults", "shadow_copies",
                      "compressed_pages", "guest_ips_before", "guest_ips_during",
                      "guest_ips_after")
CELL_COLUMNS = ("workload", "algorithm", "ram", "repetition")
RELOAD_COLUMNS = ("indexed_s", "partial_s", "lazy_first_insn_ms")
#: Summary metrics: (key, label, how a ratio reads: "lower" or "higher" is better).
METRICS = (("downtime_ms", "downtime ms", "lower"), ("total_ms", "total ms", "lower"),
           ("mib_per_increment", "MiB/incr", "lower"), ("slowdown", "guest during/before",
                                                        "higher"),
           ("extra_mib", "extra MiB", "lower"), ("reload_s", "reload s", "lower"),
           ("lazy_first_ms", "lazy 1st insn ms", "lower"))


def load_results(path: str | Path) -> dict[str, Any]:
    """A results file, checked enough to read (ConfigError naming what is wrong)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from err
    except ValueError as err:
        raise ConfigError(f"{path} is not bench results (not JSON: {err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ConfigError(f"{path} is not bench results (no records list)")
    return data


def _key(record: Record) -> tuple[str, str, int]:
    cell = record["cell"]
    return str(cell["workload"]), str(cell["algorithm"]), int(cell["ram"])


def _values(records: Iterable[Record], metric: str) -> list[float]:
    out: list[float] = []
    for record in records:
        if record.get("error"):
            continue
        checkpoints = record.get("checkpoints") or []
        if metric in ("downtime_ms", "total_ms"):
            out += [float(c[metric]) for c in checkpoints]
        elif metric == "mib_per_increment":
            out += [c["bytes_written"] / (1 << 20) for c in checkpoints]
        elif metric == "slowdown":
            out += [c["guest_ips_during"] / c["guest_ips_before"] for c in checkpoints
                    if c.get("guest_ips_before") and c.get("guest_ips_during") is not None]
        elif metric == "extra_mib" and record.get("extra_memory_bytes", -1) >= 0:
            out.append(record["extra_memory_bytes"] / (1 << 20))
        elif metric == "reload_s" and record.get("reloads"):
            last = record["reloads"][-1]
            value = last.get("indexed_s")
            value = last.get("qemu_incoming_s") if value is None else value
            if value is not None:
                out.append(float(value))
        elif metric == "lazy_first_ms" and record.get("reloads"):
            value = record["reloads"][-1].get("lazy_first_insn_ms")
            if value is not None:
                out.append(float(value))
    return out


def summarise(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per matrix cell (repetitions together): medians and spreads of :data:`METRICS`."""
    groups: dict[tuple[str, str, int], list[Record]] = {}
    for record in records:
        groups.setdefault(_key(record), []).append(record)
    rows = []
    for (workload, algorithm, ram), group in groups.items():
        row: dict[str, Any] = {"workload": workload, "algorithm": algorithm, "ram": ram,
                               "repetitions": len(group),
                               "errors": [r["error"] for r in group if r.get("error")]}
        for metric, _label, _better in METRICS:
            values = _values(group, metric)
            row[metric] = statistics.median(values) if values else None
            row[f"{metric}_range"] = (min(values), max(values)) if values else None
        rows.append(row)
    return rows


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def table(records: Sequence[Record]) -> str:
    """The summary as aligned text (medians; the errors of failed cells below it)."""
    rows = summarise(records)
    header = ["workload", "algorithm", "RAM", *(label for _, label, _ in METRICS)]
    lines = [header]
    errors = []
    for row in rows:
        lines.append([row["workload"], row["algorithm"], f"{row['ram'] >> 20}M",
                      *(_cell(row[metric]) for metric, _, _ in METRICS)])
        errors += [f"  {row['workload']} | {row['algorithm']}: {e}" for e in row["errors"]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in lines]
    if errors:
        text += ["failed cells:", *errors]
    return "\n".join(text)


def csv_text(records: Sequence[Record]) -> str:
    """One row per checkpoint, with its cell, the reload of the chain up to it, and the host."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*CELL_COLUMNS, *CHECKPOINT_COLUMNS, *RELOAD_COLUMNS,
                     "extra_memory_bytes", "host", "error"])
    for record in records:
        cell = record["cell"]
        base = [cell[c] for c in CELL_COLUMNS]
        host = record.get("host", {}).get("hostname", "")
        reloads = record.get("reloads") or []
        checkpoints = record.get("checkpoints") or []
        if not checkpoints:
            writer.writerow([*base, *[""] * (len(CHECKPOINT_COLUMNS) + len(RELOAD_COLUMNS)),
                             "", host, record.get("error") or ""])
        for k, checkpoint in enumerate(checkpoints):
            reload = reloads[k] if k < len(reloads) else {}
            writer.writerow([*base, *(checkpoint.get(c, "") for c in CHECKPOINT_COLUMNS),
                             *(reload.get(c, "") for c in RELOAD_COLUMNS),
                             record.get("extra_memory_bytes", ""), host,
                             record.get("error") or ""])
    return out.getvalue()


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Per matrix cell present in both runs, after / before of each metric's median, with
    which way is better; cells in only one run are listed."""
    old = {(r["workload"], r["algorithm"], r["ram"]): r for r in summarise(before["records"])}
    new = {(r["workload"], r["algorithm"], r["ram"]): r for r in summarise(after["records"])}
    lines = [f"after / before ({', '.join(f'{label}: {better} is better' for _, label, better in METRICS)})"]
    for key in [k for k in new if k in old]:
        workload, algorithm, ram = key
        parts = []
        for metric, label, _better in METRICS:
            a, b = old[key][metric], new[key][metric]
            if a and b is not None:
                parts.append(f"{label} {b / a:.2f}x")
        lines.append(f"{workload} | {algorithm} | {ram >> 20}M: " + (", ".join(parts) or "-"))
    only = sorted(set(old) ^ set(new))
    lines += [f"only in {'before' if key in old else 'after'}: {key[0]} | {key[1]} | "
              f"{key[2] >> 20}M" for key in only]
    return "\n".join(lines)
