"""Reload of a 16-increment chain against reload of its squashed full checkpoint, in one run.

A workload machine (1 GiB by default) has ``--fill`` of its RAM filled from the host with
page-unique non-zero bytes; it takes a full checkpoint and then 15 incremental ones (16
increments, ``durable=False``: the page cache, not the disk, is measured), each after dirtying
``--dirty`` of the filled pages at random plus a hot set of ``--hot`` pages rewritten every time.
Then:
  squash : squash() of the chain into one full checkpoint (timed once)
  reload : reload_file() of the chain with each strategy (indexed, partial, sequential) and of the
           squashed file with the same strategy, interleaved, best (median) of ``--repeat``;
           each machine is closed before the next reload. Nothing is dropped from the page cache:
           the files are written back first (sync), then read warm, so the ratio compares
           CPU-side cost (page index decode, claiming, preadv, stream parsing), not the disk.
           The indexed reload reads every other window of RAM on a second thread
           (reload._SECOND_READER), the chain's and the squashed file's alike.
With ``--guest PATTERN`` the increments are written by the built-in workload guest instead of
the host: RAM above the guest's first MiB is filled as above, then the workload runs with that
pattern over the filled pages (``hotcold``: 90 % of its 64-byte touches in a hot 10 %; ``random``;
``sequential``) for ``--insns`` instructions before each incremental checkpoint.
The chain's and the squashed file's reloads must give the source machine's RAM (SHA-256).
With ``--checksum`` the same schedule is also checkpointed with the ``checksum`` capability and
the chain's indexed reload is timed with checksums on vs off (throughput ratio = off / on).
Targets (issue 5): indexed chain/squashed <= 1.3x; checksums on >= 0.8x the throughput of off.

    python benchmarks/bench_reload.py [--ram 1G] [--quick] [--dir DIR] [--repeat 3] [--checksum]
                                      [--fill 0.75] [--dirty 0.03] [--hot 2048] [--cluster 1]
                                      [--guest hotcold|random|sequential] [--insns 2M]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pyvmm.boot import GuestSpec, boot
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine
from pyvmm.migration.checkpoint import Checkpointer
from pyvmm.migration.reload import STRATEGIES, ReloadReport, reload_file
from pyvmm.migration.squash import squash
from pyvmm.ram import PAGE_SIZE
from pyvmm.units import parse_count, parse_size

INCREMENTS = 16
TARGET_INDEXED = 1.3
TARGET_CHECKSUM = 0.8


def filled_machine(ram: int, fill: float) -> tuple[Machine, int]:
    """A workload machine, paused, with the first ``fill`` of its RAM pages (after page 0, the
    guest image) non-zero and different from each other; returns it and the filled page count."""
    spec = GuestSpec(workload=WorkloadOptions.parse("working_set=64K,passes=0"))
    machine = boot(spec, ram_size=ram)
    machine.run(max_insns=10_000)
    filled = max(1, int(machine.ram.page_count * fill)) - 1
    mem = machine.ram.mem
    noise = random.Random(1).randbytes(1 << 16)
    for page in range(1, 1 + filled):
        offset = page * PAGE_SIZE
        start = (page * 97) % ((1 << 16) - 256)
        mem[offset:offset + 256] = noise[start:start + 256]
    return machine, filled


#: The workload guest's image and stack live in RAM's first MiB; its working set starts there.
GUEST_FIRST_PAGE = (1 << 20) // PAGE_SIZE


def guest_machine(ram: int, fill: float, pattern: str) -> tuple[Machine, int]:
    """A workload machine whose working set is the filled share of RAM above its first MiB,
    filled from the host like :func:`filled_machine` (a full checkpoint of real size), paused
    before its first touch; returns it and the filled page count."""
    pages = max(1, int(ram // PAGE_SIZE * fill) - GUEST_FIRST_PAGE)
    options = WorkloadOptions.parse(f"pattern={pattern},working_set={pages * PAGE_SIZE},"
                                    f"passes=0,report=0")
    machine = boot(GuestSpec(workload=options), ram_size=ram, uart_sink=lambda _b: None)
    mem = machine.ram.mem
    noise = random.Random(1).randbytes(1 << 16)
    for page in range(GUEST_FIRST_PAGE, GUEST_FIRST_PAGE + pages):
        offset = page * PAGE_SIZE
        start = (page * 97) % ((1 << 16) - 256)
        mem[offset:offset + 256] = noise[start:start + 256]
    return machine, pages


def build_guest_chain(machine: Machine, path: Path, insns: int,
                      capabilities: Sequence[str]) -> tuple[float, int]:
    """Full + 15 incremental checkpoints, the guest running ``insns`` instructions before each
    incremental one; returns the time spent checkpointing and the pages saved in all."""
    checkpointer = Checkpointer(machine, path, durable=False,
                                capabilities=["incremental", *capabilities])
    spent, pages = 0.0, 0
    try:
        for k in range(INCREMENTS):
            if k:
                machine.run(max_insns=insns)
            started = time.perf_counter()
            pages += checkpointer.checkpoint().pages
            spent += time.perf_counter() - started
    finally:
        checkpointer.close()
    return spent, pages


def schedule(filled: int, dirty: float, hot: int, seed: int, cluster: int = 1) -> list[list[int]]:
    """Pages written before each incremental checkpoint: a fresh random share (in runs of
    ``cluster`` pages at random places) and a hot set."""
    rng = random.Random(seed)
    pages = range(1, 1 + filled)
    hot_set = rng.sample(pages, min(hot, filled))
    share = max(1, int(filled * dirty) // cluster)
    starts = range(1, max(2, 2 + filled - cluster))
    return [sorted({p for s in rng.sample(starts, min(share, len(starts)))
                    for p in range(s, min(s + cluster, 1 + filled))} | set(hot_set))
            for _ in range(INCREMENTS - 1)]


def build_chain(machine: Machine, path: Path, writes: list[list[int]],
                capabilities: Sequence[str]) -> tuple[float, int]:
    """Full + len(writes) incremental checkpoints of ``machine`` into ``path``; returns the time
    spent checkpointing and the pages the increments hold in all."""
    checkpointer = Checkpointer(machine, path, durable=False,
                                capabilities=["incremental", *capabilities])
    mem = machine.ram.mem
    spent, pages = 0.0, 0
    try:
        started = time.perf_counter()
        pages += checkpointer.checkpoint().pages
        spent += time.perf_counter() - started
        for k, todo in enumerate(writes, start=1):
            stamp = k.to_bytes(4, "little") * 16
            for page in todo:
                offset = page * PAGE_SIZE + 256 + (k % 15) * 64
                mem[offset:offset + 64] = stamp
            started = time.perf_counter()
            pages += checkpointer.checkpoint().pages
            spent += time.perf_counter() - started
    finally:
        checkpointer.close()
    return spent, pages


def ram_digest(machine: Machine) -> str:
    digest = hashlib.sha256()
    for block in machine.ram_blocks:
        digest.update(block.mem)
    return digest.hexdigest()


def timed_reload(path: Path, strategy: str) -> tuple[float, ReloadReport]:
    started = time.perf_counter()
    machine, report = reload_file(str(path), strategy=strategy)
    seconds = time.perf_counter() - started
    machine.close()
    return seconds, report


def best_median(times: list[float]) -> str:
    return f"{min(times):7.3f} s ({statistics.median(times):7.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ram", default=None, help="guest RAM (default 1G, 256M with --quick)")
    parser.add_argument("--quick", action="store_true", help="256 MiB guest")
    parser.add_argument("--fill", type=float, default=0.75,
                        help="share of RAM pages filled non-zero (default 0.75)")
    parser.add_argument("--dirty", type=float, default=0.03,
                        help="share of the filled pages written at random per increment")
    parser.add_argument("--hot", type=int, default=2048,
                        help="pages rewritten before every increment")
    parser.add_argument("--cluster", type=int, default=1,
                        help="the random share is written in runs of this many pages (default 1)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where files go (default: a temp dir in .)")
    parser.add_argument("--checksum", action="store_true",
                        help="also compare reload with the checksum capability on vs off")
    parser.add_argument("--guest", choices=("hotcold", "random", "sequential"), default=None,
                        help="increments written by the workload guest with this pattern "
                             "instead of host writes")
    parser.add_argument("--insns", default="2M",
                        help="with --guest: instructions run before each incremental checkpoint")
    args = parser.parse_args()
    ram = parse_size(args.ram or ("256M" if args.quick else "1G"), "--ram")
    if not 0 < args.fill <= 1 or not 0 < args.dirty <= 1:
        parser.error("--fill and --dirty are shares in (0, 1]")
    if args.cluster < 1:
        parser.error("--cluster must be at least 1")
    times: dict[str, list[float]] = {}
    reports: dict[str, ReloadReport] = {}
    with tempfile.TemporaryDirectory(dir=args.dir or ".") as tmp:
        chain, squashed, summed = (Path(tmp) / n for n in ("chain.bin", "squashed.bin",
                                                            "checksum.bin"))
        if args.guest:
            insns = parse_count(args.insns, "--insns")
            machine, filled = guest_machine(ram, args.fill, args.guest)
            with machine:
                save_seconds, chain_pages = build_guest_chain(machine, chain, insns, ())
                expected = ram_digest(machine)
                if args.checksum:  # a continuation of the same guest (same kind of chain)
                    build_guest_chain(machine, summed, insns, ("checksum",))
        else:
            machine, filled = filled_machine(ram, args.fill)
            writes = schedule(filled, args.dirty, args.hot, seed=2, cluster=args.cluster)
            with machine:
                save_seconds, chain_pages = build_chain(machine, chain, writes, ())
                expected = ram_digest(machine)
                if args.checksum:  # the same schedule again, on the same RAM, with checksums
                    build_chain(machine, summed, writes, ("checksum",))
        result = squash(chain, output=squashed, durable=False)
        sizes = (chain.stat().st_size, squashed.stat().st_size)
        # the files were written without fsync: their pages are written back now, not by the
        # kernel's flusher threads while reloads are timed (on two cores they would take one)
        synced = time.perf_counter()
        os.sync()
        synced = time.perf_counter() - synced

        for strategy in STRATEGIES:  # RAM as saved, whatever the file and strategy
            for name, path in (("chain", chain), ("squashed", squashed)):
                copy, report = reload_file(str(path), strategy=strategy)
                with copy:
                    if ram_digest(copy) != expected:
                        raise SystemExit(f"{name} reloaded ({strategy}) to different RAM")
        for i in range(args.repeat):
            for strategy in STRATEGIES:
                order = [("chain", chain), ("squashed", squashed)]
                if i % 2:
                    order.reverse()
                if args.checksum and strategy == "indexed":
                    order.append(("checksum", summed))
                for name, path in order:
                    key = f"{name} {strategy}"
                    seconds, reports[key] = timed_reload(path, strategy)
                    times.setdefault(key, []).append(seconds)

    mib = 1 << 20
    writer = (f"the workload guest, pattern={args.guest}, {args.insns} instructions each"
              if args.guest else
              f"{args.dirty:.0%} random in runs of {args.cluster} + {args.hot} hot pages each")
    print(f"guest RAM {ram / mib:.0f} MiB, {filled} pages ({filled * PAGE_SIZE / mib:.0f} MiB) "
          f"filled; {INCREMENTS} increments ({writer}), durable=False, page cache warm "
          f"(CPU-side cost)")
    print(f"chain: {chain_pages} pages saved in {save_seconds:.2f} s, {sizes[0] / mib:.0f} MiB; "
          f"squashed: {sizes[1] / mib:.0f} MiB")
    print(f"squash: {result.seconds:.3f} s ({result.stats.pages} pages written); then "
          f"written back (sync) in {synced:.1f} s before the reloads are timed")
    print(f"reload, best (median) of {args.repeat}:")
    for strategy in STRATEGIES:
        c, s = times[f"chain {strategy}"], times[f"squashed {strategy}"]
        ratio, ratio_med = min(c) / min(s), statistics.median(c) / statistics.median(s)
        target = (f"  [target <= {TARGET_INDEXED}x: "
                  f"{'met' if ratio <= TARGET_INDEXED else 'MISSED'}]"
                  if strategy == "indexed" else "")
        print(f"  {strategy:10s} chain {best_median(c)}  squashed {best_median(s)}  "
              f"chain/squashed {ratio:.2f}x ({ratio_med:.2f}x){target}")
        print(f"  {'':10s} pages read: chain {reports[f'chain {strategy}'].pages_read}, "
              f"squashed {reports[f'squashed {strategy}'].pages_read}; streams parsed: chain "
              f"{reports[f'chain {strategy}'].streams}")
    if args.checksum:
        off, on = times["chain indexed"], times["checksum indexed"]
        ratio = min(off) / min(on)
        print(f"  checksums  off {best_median(off)}  on {best_median(on)}  throughput on/off "
              f"{ratio:.2f}x ({statistics.median(off) / statistics.median(on):.2f}x)  "
              f"[target >= {TARGET_CHECKSUM}x: "
              f"{'met' if ratio >= TARGET_CHECKSUM else 'MISSED'}]"
              f"{'' if reports['checksum indexed'].checksums_verified else ' NOT VERIFIED'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
