"""Benchmark of RamBlock zero-page detection on 1 GiB, as ratios to reading the memory once.

Run: ``python benchmarks/bench_ram.py [--size-mib N] [--repeat N]``. Each case is timed a few
times and the best time kept (the machines are shared and noisy); the baseline is measured in the
same run: copying the block once into a preallocated, already touched buffer (a memcpy, i.e. every
byte read once).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from pyvmm._native import ffi, lib
from pyvmm.ram import PAGE_SIZE, RamBlock

FILL_CHUNK = 64 << 20


def best_of(repeat: int, action: Callable[[], object]) -> float:
    """The shortest of ``repeat`` wall-clock timings of ``action()``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def fill(block: RamBlock, pattern: bytes) -> None:
    """Write ``pattern`` (one page long) over every page of ``block``."""
    chunk = pattern * (FILL_CHUNK // PAGE_SIZE)
    mem = block.mem
    for offset in range(0, block.size, len(chunk)):
        part = min(len(chunk), block.size - offset)
        mem[offset : offset + part] = chunk[:part]


def report(label: str, seconds: float, baseline: float) -> None:
    print(f"  {label:<52} {seconds * 1e3:9.2f} ms   {seconds / baseline:6.3f} x baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size, repeat = args.size_mib << 20, args.repeat
    npages = size // PAGE_SIZE
    print(f"RAM block of {args.size_mib} MiB ({npages} pages), best of {repeat}")

    with RamBlock("bench.ram", size, 0) as block:
        # a memoryview target: bytearray slice assignment would first copy the source
        dst = memoryview(bytearray(size))
        fill(block, b"\x00" * PAGE_SIZE)  # populate every page (resident, zero)
        dst[:] = block.mem  # touch dst once so the baseline does not count its page faults

        def copy_once() -> None:
            dst[:] = block.mem

        baseline = best_of(repeat, copy_once)
        print(f"  baseline: copy of the block into a touched buffer  {baseline * 1e3:9.2f} ms "
              f"({size / baseline / (1 << 30):.1f} GiB/s)")
        report("populated_pages() (/proc/self/pagemap)",
               best_of(repeat, block.populated_pages), baseline)
        report("resident_pages() (mincore)", best_of(repeat, block.resident_pages), baseline)

        # every page resident and zero: the scan has to read every byte
        report("nonzero_pages(), all pages resident and zero",
               best_of(repeat, block.nonzero_pages), baseline)

        # every page non-zero in its last byte only: every byte read too
        fill(block, b"\x00" * (PAGE_SIZE - 1) + b"\x01")
        assert block.nonzero_pages().count() == npages
        report("nonzero_pages(), every page non-zero at its end",
               best_of(repeat, block.nonzero_pages), baseline)

        # the common non-zero page: data near its start, the scan stops after one word
        fill(block, b"\xa5" * PAGE_SIZE)
        assert block.nonzero_pages().count() == npages
        report("nonzero_pages(), every page full of data",
               best_of(repeat, block.nonzero_pages), baseline)
        dst.release()

    # mostly zero: a fresh block, a few pages written; the populated-page shortcut skips the rest
    with RamBlock("bench.ram", size, 0) as block:
        written = range(0, npages, max(1, npages // 100))
        for page in written:
            block.mem[page * PAGE_SIZE] = 1
        populated = block.populated_pages().count()
        print(f"fresh block, {len(written)} pages written ({populated} populated, transparent huge "
              "pages included)")
        assert list(block.nonzero_pages()) == list(written)
        shortcut = best_of(repeat, block.nonzero_pages)
        report("nonzero_pages() with the populated-page shortcut", shortcut, baseline)

        def scan_without_shortcut() -> None:
            zero = block.new_bitmap()
            lib.pyvmm_scan_zero_pages(ffi.cast("void *", block.host_addr), PAGE_SIZE, npages,
                                      ffi.NULL, ffi.NULL, ffi.cast("pyvmm_u64 *", zero.address))

        # reading untouched pages maps the shared zero page in: measure it last
        report("same scan reading every page (no shortcut)",
               best_of(repeat, scan_without_shortcut), baseline)
        print(f"  shortcut speed-up over reading every page: "
              f"{best_of(1, scan_without_shortcut) / shortcut:.0f}x")


if __name__ == "__main__":
    main()
