"""Live and incremental checkpoints of a running 1 GiB guest, against baselines from the same run.

  1 downtime     : guest pause of live full checkpoints (median, max) while the guest runs, each
                   by a new Checkpointer (capabilities live); 1b: a chain of live incremental
                   checkpoints by one Checkpointer (tracker async, served by its live session)
  2 guest speed  : guest passes/s during a live full checkpoint vs an equal window just before it
                   (progress lines on the UART, report=1, interpolated between line times)
  3 incremental  : stop-and-copy checkpoint with ~1 % of pages dirtied from the host vs a full
                   checkpoint of the same guest taken right after each, trackers async and wp
                   (medians)
  4 tracking cost: counted runs right after an incremental checkpoint vs the same runs with no
                   Checkpointer on the machine: (a) worst case, N instructions = about one pass of
                   the sequential pattern (every working-set page written once, every write a
                   first write); (b) amortised over a checkpoint interval of --interval seconds
                   of guest run (default 5 s, --quick 2 s): every page is still written, but
                   only its first write in the interval costs anything
  5 write faults : faults/s and shadow copies of the live checkpoints, per configuration
                   (a live-only checkpoint also opens runs of up to 512 pages, cut at 2 MiB
                   boundaries, per fault of a writer that faults on consecutive pages)
  6 memory       : peak RSS growth during a live checkpoint vs shadow copies x 4 KiB
Targets (issue 4) are in brackets, QEMU 7.2 figures from DESIGN.md section 8 where it has them.
Every checkpoint is written with durable=False (no fsync): what is compared is the CPU-side cost.
Files go to a temp dir in the current directory and are deleted.  Numbers are for reading, not
for gating CI (2 shared cores: compare the ratios).

    python benchmarks/bench_live.py [--ram 1G] [--working-set 512M] [--quick] [--pin CPU]
        [--configs MODE:UNPROTECT:NICE,...] [--live-only]

Sections 1, 2, 5 and 6 interleave the live checkpoint configurations of --configs: fault mode
(thread or signal, see WriteProtectSession), unprotect_pages, and the saver thread's nice value.

--pin CPU pins the vCPU to host CPU CPU; the checkpointers' fault handler then runs on the same
CPU (DESIGN.md section 8: same-CPU fault handling is several times faster).
"""

from __future__ import annotations

import argparse
import bisect
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from pyvmm.bench.host import reset_peak_rss, status_kib
from pyvmm.boot import GuestSpec, boot
from pyvmm.guests.workload import WORKING_SET_OFFSET, WorkloadOptions
from pyvmm.machine import RAM_BASE, Machine
from pyvmm.migration.checkpoint import Checkpointer
from pyvmm.ram import PAGE_SIZE
from pyvmm.units import parse_size


class Progress:
    """Collects the time of each UART progress line (called on the vCPU thread)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def sink(self, data: bytes) -> None:
        for _ in range(bytes(data).count(b"\n")):
            self.times.append(time.perf_counter())

    def at(self, t: float) -> float:
        """Passes done at host time t, interpolated between line times."""
        times = list(self.times)
        i = bisect.bisect_right(times, t)
        if i == 0 or i == len(times):
            return float(i)  # outside known lines: whole passes only
        a, b = times[i - 1], times[i]
        return i + (t - a) / (b - a) if b > a else float(i)

    def rate(self, t0: float, t1: float) -> float:
        return (self.at(t1) - self.at(t0)) / (t1 - t0)

    def wait_lines(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.times) + count
        while len(self.times) < target and time.monotonic() < deadline:
            time.sleep(0.01)


def rss_kib() -> tuple[int, int]:
    return status_kib("VmRSS"), status_kib("VmHWM")


class RssSampler:
    """Peak VmRSS during a window: VmHWM after a reset if the kernel allows, else polling."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.before = rss_kib()[0]
        self.hwm_ok = reset_peak_rss() is not None
        self.peak = self.before
        if not self.hwm_ok:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib()[0])
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss, hwm = rss_kib()
        self.after = rss
        self.peak = max(self.peak, hwm if self.hwm_ok else rss)


PIN: int | None = None


def booted(pattern: str, ram: int, working_set: int, touch: int) -> tuple[Machine, Progress]:
    progress = Progress()
    spec = GuestSpec(workload=WorkloadOptions.parse(
        f"pattern={pattern},working_set={working_set},passes=0,touch={touch},report=1"))
    machine = boot(spec, ram_size=ram, seed=1, uart_sink=progress.sink)
    machine.pin_vcpu(PIN)
    return machine, progress


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


Config = tuple[str, int, int]  # (fault mode, unprotect_pages, saver nice)


def config_name(config: Config) -> str:
    return f"{config[0]}/unprotect {config[1]}/nice {config[2]}"


def live_section(pattern: str, ram: int, working_set: int, touch: int, reps: int,
                 directory: Path, configs: list[Config]
                 ) -> tuple[str, dict[Config, list[dict[str, float]]]]:
    """Live full checkpoints of a running guest, the configs interleaved."""
    machine, progress = booted(pattern, ram, working_set, touch)
    machine.start()
    progress.wait_lines(3)  # first pass populates the host pages; then steady state
    results: dict[Config, list[dict[str, float]]] = {c: [] for c in configs}
    gap = 1.0
    for i in range(reps * len(configs)):
        mode, unprotect, nice = config = configs[i % len(configs)]
        time.sleep(gap)
        path = directory / f"live-{pattern}-{i}.chpt"
        checkpointer = Checkpointer(machine, path, capabilities=["live"], durable=False,
                                    unprotect_pages=unprotect, fault_mode=mode,
                                    saver_nice=nice)
        with RssSampler() as mem:
            t0 = time.perf_counter()
            stats = checkpointer.checkpoint()
            t1 = time.perf_counter()
        checkpointer.close()
        path.unlink()
        window = t1 - t0
        progress.wait_lines(1, timeout=5.0)  # the pass running at t1 ends: t1 can be interpolated
        during = progress.rate(t0, t1)
        before = progress.rate(t0 - window, t0)
        results[config].append({
            "downtime": stats.downtime_ms, "setup": stats.setup_ms, "total": stats.total_ms, "window": window,
            "speed": during / before if before > 0 else float("nan"),
            "faults": stats.write_faults, "shadows": stats.shadow_copies,
            "faults_s": stats.write_faults / (stats.total_ms / 1e3),
            "carried": stats.pages_carried,
            "mem_kib": mem.peak - mem.before, "hwm": float(mem.hwm_ok),
        })
        gap = max(1.0, window)  # the baseline window before the next one is free of it
    machine.pause()
    machine.close()
    return pattern, results


def live_chain_section(pattern: str, ram: int, working_set: int, touch: int, count: int,
                       directory: Path) -> list[tuple[str, float, float, int]]:
    """One Checkpointer, live + incremental (tracker async): a full then incrementals."""
    machine, progress = booted(pattern, ram, working_set, touch)
    machine.start()
    progress.wait_lines(3)
    path = directory / f"chain-{pattern}.chpt"
    checkpointer = Checkpointer(machine, path, capabilities=["live", "incremental"],
                                durable=False, tracker="async")
    out = []
    for _ in range(count):
        time.sleep(1.0)
        stats = checkpointer.checkpoint()
        out.append((stats.kind, stats.downtime_ms, stats.total_ms,
                    stats.pages + stats.zero_pages))
    machine.pause()
    checkpointer.close()
    path.unlink()
    machine.close()
    return out


def incremental_section(ram: int, working_set: int, touch: int, reps: int,
                        directory: Path) -> list[tuple[str, float, float, int, int]]:
    """Full vs ~1 % incremental, stop-and-copy, on a paused guest; trackers async and wp.

    Each incremental is followed by a full checkpoint of the same RAM into a second file (a
    Checkpointer without capabilities, the file deleted after it), so both sides of the ratio
    are measured at the same moments: on this machine the cost of writing into fresh page
    cache swings by several times from one minute to the next."""
    machine, progress = booted("sequential", ram, working_set, touch)
    machine.start()
    progress.wait_lines(2)
    machine.pause()
    ws_pages = working_set // PAGE_SIZE
    ram_pages = ram // PAGE_SIZE
    dirty_count = max(1, ram_pages // 100)
    rng = random.Random(7)
    out = []
    for tracker in ("async", "wp"):
        path = directory / f"incr-{tracker}.chpt"
        checkpointer = Checkpointer(machine, path, capabilities=["incremental"], durable=False,
                                    tracker=tracker)
        checkpointer.checkpoint()  # the chain's full: arms the tracker
        full_ms, incr_ms, full_pages, pages = [], [], 0, 0
        for r in range(reps):
            chosen = rng.sample(range(ws_pages), min(dirty_count, ws_pages))
            stamp = (r + 1).to_bytes(8, "little") * 8  # non-zero: a zeroed page saves cheaper
            for page in chosen:
                machine.write_memory(RAM_BASE + WORKING_SET_OFFSET + page * PAGE_SIZE, stamp)
            stats = checkpointer.checkpoint()
            incr_ms.append(stats.total_ms)
            pages = stats.pages + stats.zero_pages
            full_path = directory / "full.chpt"
            full = Checkpointer(machine, full_path, durable=False)
            try:
                full_stats = full.checkpoint()
            finally:
                full.close()
                full_path.unlink()
            full_ms.append(full_stats.total_ms)
            full_pages = full_stats.pages + full_stats.zero_pages
        checkpointer.close()
        path.unlink()
        out.append((tracker, med(full_ms), med(incr_ms), full_pages, pages))
    machine.close()
    return out


def tracking_section(ram: int, working_set: int, touch: int, reps: int, interval: float,
                     directory: Path) -> tuple[int, int, dict[str, list[float]]]:
    """Counted runs of N instructions: no tracker vs async / wp armed by an incremental
    checkpoint just before (so every page the run writes is clean at its start)."""
    machine, progress = booted("sequential", ram, working_set, touch)
    # Counted runs only on this machine: a counted run after a free run that was paused from
    # outside does not stop at its budget (seen with this pyvmm/unicorn), so never free-run here.
    while len(progress.times) < 2:  # first pass populates the host pages
        machine.run(max_insns=10_000_000)
    # calibrate: instructions per pass (one line per pass)
    budget = 20_000_000
    while True:
        lines = len(progress.times)
        machine.run(max_insns=budget)
        done = len(progress.times) - lines
        if done >= 3:
            break
        budget *= 2
    n = int(budget / done)  # about one pass: every working-set page written once
    started = time.perf_counter()
    machine.run(max_insns=n)
    per_insn = (time.perf_counter() - started) / n
    n_interval = max(n, int(interval / per_insn))  # --interval seconds of untracked guest run
    times: dict[str, list[float]] = {f"{t}{k}": [] for t in ("none", "async", "wp")
                                     for k in ("", "_interval")}
    for r in range(reps):
        for suffix, budget in (("", n), ("_interval", n_interval)):
            started = time.perf_counter()
            machine.run(max_insns=budget)
            times["none" + suffix].append(time.perf_counter() - started)
            for tracker in ("async", "wp"):
                path = directory / f"track-{tracker}-{r}.chpt"
                checkpointer = Checkpointer(machine, path, capabilities=["incremental"],
                                            durable=False, tracker=tracker)
                checkpointer.checkpoint()  # full: arms the tracker
                machine.run(max_insns=n)  # dirty the working set
                checkpointer.checkpoint()  # incremental: collects and re-protects
                started = time.perf_counter()
                machine.run(max_insns=budget)
                times[tracker + suffix].append(time.perf_counter() - started)
                checkpointer.close()
                path.unlink()
    machine.close()
    return n, n_interval, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ram", default="1G")
    parser.add_argument("--working-set", default=None, help="default: half the RAM")
    parser.add_argument("--touch", default=8, type=int, help="bytes the guest writes per page")
    parser.add_argument("--reps", type=int, default=None,
                        help="live checkpoints per pattern and unprotect_pages value (default 3)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--dir", default=None, help="where files go (default: a temp dir in .)")
    parser.add_argument("--interval", type=float, default=None,
                        help="checkpoint interval of section 4b, seconds of guest run "
                        "(default 5, --quick 2)")
    parser.add_argument("--pin", type=int, default=None,
                        help="pin the vCPU (and so the fault handler) to this host CPU")
    parser.add_argument("--configs", default="thread:1:10,thread:1:0,thread:16:10,signal:1:10",
                        help="live checkpoint configurations of sections 1, 2, 5 and 6, "
                        "interleaved: fault_mode:unprotect_pages:saver_nice,... (default "
                        "%(default)s)")
    parser.add_argument("--live-only", action="store_true",
                        help="sections 1, 2, 5 and 6 only")
    parser.add_argument("--patterns", default="sequential,random",
                        help="guest write patterns of the live sections (default %(default)s)")
    args = parser.parse_args()
    configs: list[Config] = []
    for item in args.configs.split(","):
        mode, pages, nice = (item.split(":") + ["1", "0"])[:3]
        configs.append((mode, int(pages), int(nice)))
    global PIN
    PIN = args.pin
    interval = args.interval or (2.0 if args.quick else 5.0)
    ram = parse_size(args.ram)
    working_set = parse_size(args.working_set) if args.working_set else ram // 2
    reps = args.reps or (1 if args.quick else 3)
    small_reps = 2 if args.quick else 3
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir or ".") as tmp:
        directory = Path(tmp)
        live = [live_section(p, ram, working_set, args.touch, reps, directory, configs)
                for p in args.patterns.split(",")]
        if not args.live_only:
            chain = live_chain_section("sequential", ram, working_set, args.touch, 2 + 2 * reps,
                                       directory)
            incr = incremental_section(ram, working_set, args.touch, 2 * small_reps + 1,
                                       directory)
            n, n_interval, track = tracking_section(ram, working_set, args.touch, small_reps,
                                                    interval, directory)
    elapsed = time.perf_counter() - started

    print(f"guest RAM {ram / (1 << 30):.2f} GiB, working set {working_set >> 20} MiB, "
          f"touch={args.touch} B/page, report=1; durable=False everywhere (CPU-side cost, no "
          f"fsync); vCPU {'pinned to CPU %d' % PIN if PIN is not None else 'not pinned'}; "
          f"{'--quick; ' if args.quick else ''}{elapsed:.0f} s")
    print("1. live full checkpoint, guest running: downtime "
          "[target median <= 2 ms; QEMU 7.2 1 GiB: 1-3 ms median, max 83 ms]")
    for pattern, res in live:
        downs = [x["downtime"] for c in configs for x in res[c]]
        totals = [x["total"] for c in configs for x in res[c]]
        print(f"   {pattern:<10} n={len(downs)}  median {med(downs):6.2f} ms  "
              f"max {max(downs):6.2f} ms  (setup_ms median "
              f"{med([x['setup'] for c in configs for x in res[c]]):.1f}; checkpoint total "
              f"median {med(totals):.0f} ms)  "
              f"all: {' '.join(f'{d:.1f}' for d in downs)}")
    print("2. guest speed during a live full checkpoint / speed in an equal window just before "
          "(passes/s) [target >= 30 %; QEMU 7.2 1 GiB, writing every page: 6-8 %]")
    for pattern, res in live:
        label = ("writes every page" if pattern == "sequential"
                 else "random writes")
        for c in configs:
            speeds = [x["speed"] for x in res[c]]
            print(f"   {pattern:<10} ({label}), {config_name(c):<26}: median "
                  f"{100 * med(speeds):5.1f} %  (min {100 * min(speeds):.1f}, max "
                  f"{100 * max(speeds):.1f}; all {' '.join(f'{100 * v:.0f}' for v in speeds)}; "
                  f"window median {1e3 * med([x['window'] for x in res[c]]):.0f} ms)")
    print("5. write faults during live full checkpoints (faults / checkpoint total time), "
          "shadow copies [DESIGN 8: ~220 k faults/s same CPU, ~15 k/s other CPU, ~1 M pages/s "
          "unprotecting 64 KiB]")
    for pattern, res in live:
        for c in configs:
            rows = res[c]
            print(f"   {pattern:<10} {config_name(c):<26}: faults median "
                  f"{med([x['faults'] for x in rows]):8.0f}  = {med([x['faults_s'] for x in rows]) / 1e3:6.1f} k/s"
                  f"  shadow copies median {med([x['shadows'] for x in rows]):7.0f}  pages "
                  f"carried median {med([x['carried'] for x in rows]):7.0f}")
    print("6. extra memory during a live checkpoint: peak RSS - RSS before, vs shadow copies x "
          "4 KiB [target <= shadow copies + small constant]; shadow copies is a count over the whole "
          "checkpoint; the pool (shadow_pages=4096 x 4 KiB = 16 MiB) is touched only as slots are "
          "first used, most recently freed slot first")
    for pattern, res in live:
        for c in configs:
            rows = res[c]
            how = "VmHWM" if all(x["hwm"] for x in rows) else "polled VmRSS"
            extra = [x["mem_kib"] / 1024 for x in rows]
            shadow = [x["shadows"] * PAGE_SIZE / (1 << 20) for x in rows]
            print(f"   {pattern:<10} {config_name(c):<26}: extra median "
                  f"{med(extra):7.1f} MiB (max {max(extra):.1f})  shadow copies median "
                  f"{med(shadow):7.1f} MiB  difference median "
                  f"{med([e - s for e, s in zip(extra, shadow)]):+.1f} MiB ({how})")

    if args.live_only:
        return
    downs = [d for _, d, _, _ in chain]
    print(f"1b. live chain, one Checkpointer (live, incremental, tracker async): downtime median "
          f"{med(downs):.2f} ms max {max(downs):.2f} ms; all: " + "  ".join(
              f"{kind[0]}:{d:.1f} ms/{total:.0f} ms/{pages} p" for kind, d, total, pages in chain)
          + "  (kind: downtime/total/pages saved)")
    print("3. incremental (~1 % of RAM pages dirtied from the host, guest paused) / full, "
          "stop-and-copy, medians, each incremental followed by a full [target <= 5 %]")
    for tracker, full_ms, incr_ms, full_pages, incr_pages in incr:
        print(f"   tracker {tracker:<5}: full {full_ms:7.1f} ms ({full_pages} pages incl. zero)  incremental "
              f"{incr_ms:6.1f} ms ({incr_pages} pages)  ratio {100 * incr_ms / full_ms:.2f} %")
    print("4. dirty-tracking cost of a write-heavy guest (sequential: every working-set page "
          "written each pass), counted runs right after an incremental checkpoint vs no "
          "Checkpointer [target <= +10 % with async, between checkpoints]")
    for suffix, label in (("", f"(a) worst case, {n} insns = ~1 pass, every write a first write"),
                          ("_interval", f"(b) amortised, {n_interval} insns = ~{interval:.0f} s "
                           f"checkpoint interval")):
        base = min(track["none" + suffix])
        print(f"   {label}: no tracking {1e3 * base:.1f} ms   " + "   ".join(
            f"{t} {1e3 * min(track[t + suffix]):.1f} ms "
            f"({100 * (min(track[t + suffix]) / base - 1):+.1f} %; medians "
            f"{100 * (med(track[t + suffix]) / med(track['none' + suffix]) - 1):+.1f} %)"
            for t in ("async", "wp")) + f"   (best of {len(track['none' + suffix])}: other "
            f"load on the host only slows runs down)")


if __name__ == "__main__":
    main()
