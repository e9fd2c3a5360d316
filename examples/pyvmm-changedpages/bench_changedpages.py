"""The benchmark row of the ``changed`` tracker, against ``async`` (the baseline) and ``hash``.

The guest is pyvmm's built-in workload writing a working set at random; between incremental
checkpoints the host also rewrites pages of it with the bytes they hold, as a guest reading the
same file into the same buffer again would.  ``async`` saves those pages, ``hash`` and
``changed`` do not; ``hash`` compares all of RAM at each pause, ``changed`` only what was
written.  Printed: the median pages per increment and milliseconds per checkpoint, and their
ratios to ``async`` measured in the same run (absolute times vary from host to host).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from pyvmm.boot import GuestSpec, boot
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.migration.checkpoint import Checkpointer
from pyvmm.ram import PAGE_SIZE
from pyvmm.units import parse_size

WORKING_SET_PAGE = (1 << 20) // PAGE_SIZE  # the workload's working set starts 1 MiB into RAM


def measure(tracker: str, args: argparse.Namespace, workdir: Path) -> tuple[float, float]:
    """Median pages per increment and ms per checkpoint with ``tracker``."""
    options = WorkloadOptions.parse(f"pattern=random,working_set={args.working_set},passes=0,"
                                    f"touch=64,report=0")
    with boot(GuestSpec(workload=options), ram_size=parse_size(args.ram), seed=7) as machine:
        machine.run(max_insns=args.warmup)  # the working set populated
        checkpointer = Checkpointer(machine, workdir / f"{tracker}.chpt", durable=False,
                                    capabilities=["incremental"], tracker=tracker)
        checkpointer.checkpoint()  # the full one
        pages, times = [], []
        for _ in range(args.checkpoints):
            machine.run(max_insns=args.insns)
            for page in range(WORKING_SET_PAGE, WORKING_SET_PAGE + args.rewrites):
                view = machine.ram.page(page)
                view[:] = bytes(view)  # written, not changed
            stats = checkpointer.checkpoint()
            pages.append(stats.pages + stats.zero_pages)
            times.append(stats.total_ms)
        checkpointer.close()
    return statistics.median(pages), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="1G")
    parser.add_argument("--working-set", default="64M")
    parser.add_argument("--warmup", type=int, default=5_000_000, help="instructions first")
    parser.add_argument("--insns", type=int, default=300_000,
                        help="guest instructions between checkpoints")
    parser.add_argument("--rewrites", type=int, default=8192,
                        help="pages the host rewrites with their own bytes between checkpoints")
    parser.add_argument("--checkpoints", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = {name: measure(name, args, Path(workdir)) for name in ("async", "hash", "changed")}
    base_pages, base_ms = rows["async"]
    print(f"{'tracker':<9} {'pages/increment':>15} {'ms/checkpoint':>13} {'pages vs async':>14} "
          f"{'time vs async':>13}")
    for name, (pages, ms) in rows.items():
        print(f"{name:<9} {pages:>15.0f} {ms:>13.1f} {pages / base_pages:>14.2f} "
              f"{ms / base_ms:>13.2f}")


if __name__ == "__main__":
    main()
