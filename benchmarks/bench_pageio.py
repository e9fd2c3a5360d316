"""Benchmark of RAM page records (pyvmm.migration.pageio) on 1 GiB, as ratios to raw file I/O.

Run: ``python benchmarks/bench_pageio.py [--size-mib N] [--repeat N] [--dir DIR] [--fsync]``.
Every page of the block is non-zero, so every page becomes a 4104-byte PAGE record. Baselines,
measured in the same run against files in the same directory:

- save: ``write_page_records`` of every page vs one ``os.write`` of the block's memory;
- load: ``read_page_runs`` of those records vs one ``os.preadv`` of the raw file, both into a
  block faulted in beforehand (the I/O paths alone) and both into a fresh block per timing (with
  the first-touch faults of a reload's new guest RAM, which vary with huge-page compaction).

Each writer starts from an empty file (truncated, and every dirty page on the machine written
back, before its timed window), the page cache stays warm for the reads; with ``--fsync`` both
writers also fsync. The cases are timed in interleaved rounds and the best of ``--repeat``
kept for each: the machines are shared and noisy, and load drifts over a run.
Targets: save <= 1.1x, load <= 1.2x. The files are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from pyvmm.migration.pageio import PageRuns, read_page_runs, write_page_records
from pyvmm.ram import PAGE_SIZE, RamBlock

FILL_CHUNK = 64 << 20


class Timings:
    """Wall-clock timings of named cases, taken in interleaved rounds.

    Each round times every case once, in turn, so that the load of other processes on these
    shared machines hits all cases alike; the ratio of two cases is taken from their best times.
    """

    def __init__(self) -> None:
        self.best: dict[str, float] = {}

    def time(self, name: str, prepare: Callable[[], object], action: Callable[[], object]) -> None:
        """Run ``prepare()`` untimed, then time ``action()``; keep the best time of ``name``."""
        prepare()
        started = time.perf_counter()
        action()
        elapsed = time.perf_counter() - started
        self.best[name] = min(self.best.get(name, float("inf")), elapsed)


def fill_nonzero(block: RamBlock) -> None:
    """Make every page of ``block`` non-zero and different, in 64 MiB slice copies."""
    mem = block.mem
    pattern = bytes(range(256)) * (PAGE_SIZE // 256)
    chunk = pattern * (FILL_CHUNK // PAGE_SIZE)
    for offset in range(0, block.size, FILL_CHUNK):
        part = min(FILL_CHUNK, block.size - offset)
        mem[offset : offset + part] = chunk[:part]
    # a different last byte per page (page number mod 251), one strided slice per 64 KiB of pages
    stamp = bytes((page % 251) + 1 for page in range(block.page_count))
    mem[PAGE_SIZE - 1 :: PAGE_SIZE] = stamp


def same_bytes(a: RamBlock, b: RamBlock) -> bool:
    """Whether two blocks hold the same bytes (memoryview == compares item by item: slow)."""
    return a.size == b.size and all(
        a.mem[o : o + FILL_CHUNK].tobytes() == b.mem[o : o + FILL_CHUNK].tobytes()
        for o in range(0, a.size, FILL_CHUNK)
    )


def no_op() -> None:
    pass


def raw_write(fd: int, block: RamBlock, fsync: bool) -> None:
    view = block.mem
    done = 0
    while done < block.size:
        done += os.write(fd, view[done:])
    if fsync:
        os.fsync(fd)


def raw_read(fd: int, block: RamBlock) -> None:
    view = block.mem
    done = 0
    while done < block.size:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
            raise EOFError("raw file shorter than the block")
        done += n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=".", help="directory for the two files (default: .)")
    parser.add_argument("--fsync", action="store_true", help="fsync after each write, both sides")
    args = parser.parse_args()
    size, repeat, fsync = args.size_mib << 20, args.repeat, args.fsync
    raw_path = os.path.join(args.dir, "bench_pageio.raw")
    rec_path = os.path.join(args.dir, "bench_pageio.records")
    print(f"RAM block of {args.size_mib} MiB ({size // PAGE_SIZE} pages, all non-zero), "
          f"best of {repeat}, files in {os.path.abspath(args.dir)}, "
          f"{'with' if fsync else 'no'} fsync")

    block = RamBlock("mach-virt.ram", size, 0)
    raw_fd = os.open(raw_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    rec_fd = os.open(rec_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        fill_nonzero(block)
        pages = block.new_bitmap()
        pages.set_all()
        runs = PageRuns()

        def save(detect_zero: bool) -> None:
            nonlocal runs
            result = write_page_records(rec_fd, 0, block, pages, first_has_idstr=True,
                                        detect_zero=detect_zero)
            if fsync:
                os.fsync(rec_fd)
            runs = result.runs

        def empty(fd: int) -> Callable[[], None]:
            def prepare() -> None:
                os.ftruncate(fd, 0)
                # the other file's dirty pages are written back now, not by the kernel's
                # flusher during the timed write (on two cores it would take one)
                os.sync()
            return prepare

        # the readers' target: a block faulted in once, so that the timings compare the I/O
        # paths, and a fresh block per timing, so that they include the first-touch faults of
        # a reload's new guest RAM (transparent huge pages: with direct compaction these vary)
        touched = RamBlock("mach-virt.ram", size, 0)
        touched.mem[:] = block.mem
        fresh: list[RamBlock] = []

        def new_fresh() -> None:
            while fresh:
                fresh.pop().close()
            fresh.append(RamBlock("mach-virt.ram", size, 0))

        timings = Timings()
        for _ in range(repeat):
            timings.time("raw write", empty(raw_fd), lambda: raw_write(raw_fd, block, fsync))
            timings.time("records", empty(rec_fd), lambda: save(True))
            timings.time("records, no zero check", empty(rec_fd), lambda: save(False))
            timings.time("raw read", no_op, lambda: raw_read(raw_fd, touched))
            timings.time("runs", no_op, lambda: read_page_runs(rec_fd, touched, runs))
            timings.time("raw read, fresh", new_fresh, lambda: raw_read(raw_fd, fresh[0]))
            timings.time("runs, fresh", new_fresh, lambda: read_page_runs(rec_fd, fresh[0], runs))
        if not same_bytes(fresh[0], block) or not same_bytes(touched, block):
            raise AssertionError("records read back differ from the block")
        assert list(runs) == [(0, block.page_count, 9 + len(block.name), False)]
        while fresh:
            fresh.pop().close()
        touched.close()
        best = timings.best

        gib = size / (1 << 30)

        def show(label: str, name: str, baseline: str | None, target: str = "") -> None:
            seconds = best[name]
            if baseline is None:
                tail = f"{gib / seconds:5.2f} GiB/s"
            else:
                tail = f"{seconds / best[baseline]:6.3f} x raw  {target}"
            print(f"  {label:<44} {seconds * 1e3:8.1f} ms  {tail}")

        show("raw os.write of the block", "raw write", None)
        show("write_page_records", "records", "raw write", "(target <= 1.1)")
        show("write_page_records, detect_zero=False", "records, no zero check", "raw write")
        show("raw os.preadv into a touched block", "raw read", None)
        show("read_page_runs into a touched block", "runs", "raw read", "(target <= 1.2)")
        show("raw os.preadv into a fresh block", "raw read, fresh", None)
        show("read_page_runs into a fresh block", "runs, fresh", "raw read, fresh",
             "(target <= 1.2)")
    finally:
        block.close()
        os.close(raw_fd)
        os.close(rec_fd)
        os.unlink(raw_path)
        os.unlink(rec_path)


if __name__ == "__main__":
    main()
