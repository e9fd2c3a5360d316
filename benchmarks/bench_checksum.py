"""Cost of the ``checksum`` capability: checkpoint and reload of a 1 GiB guest, checksums on vs off.

Same run, same machine, same directory, interleaved: a full checkpoint (``durable=False``: the
page cache, so the comparison is not drowned by the disk; ``--durable`` for the default, which
fsyncs) with and without the ``checksum``
capability, each into a new file created before its timed window (bench_checkpoint.py's
``timed_checkpoint``), then a reload of each file (with checksums: the stream gaps checked
before the load and the reloaded RAM's page CRCs compared with the file's after it). Throughput ratio = time off
/ time on. Then a lazy reload of each file (with checksums every page is checked against its
CRC before it is installed): time to the first guest instruction and until all RAM is in. Also
the raw CRC-32C speed of every implementation the CPU runs (one buffer and per page, from memory
and in cache).
Targets (issue 5): checkpoint and reload throughput with checksums >= 0.8x without; lazy
reload's first instruction <= 20 ms (for 1 GiB), checksums on or off.

    python benchmarks/bench_checksum.py [--ram 1G] [--dir DIR] [--repeat 4] [--warmup 1]
                                        [--durable]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyvmm._native import ffi, lib

from pyvmm.migration import checksum
from pyvmm.migration.checkpoint import reload
from pyvmm.migration.lazy import lazy_reload
from pyvmm.units import parse_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import filled_machine, timed_checkpoint


def crc_speed(nbytes: int, passes: int = 1) -> dict[str, float]:
    """GB/s of one-buffer and per-page CRC-32C over ``nbytes`` (``passes`` times: a small buffer
    stays in the cache, as pages just read do), for every implementation this CPU runs
    (slowest first; the last is the default)."""
    data = bytearray(nbytes)
    for i in range(0, nbytes, 4096):
        data[i:i + 8] = i.to_bytes(8, "little")
    buf = ffi.from_buffer(data)
    out = ffi.new("unsigned int[]", nbytes // 4096)
    result = {}

    def best(call: object) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(passes):
                call()  # type: ignore[operator]
            times.append(time.perf_counter() - started)
        return nbytes * passes / min(times) / 1e9

    for name in checksum.available_implementations():
        with checksum.using(name):
            result[f"{name} buffer"] = best(lambda: lib.pyvmm_crc32c(0, buf, nbytes))
            result[f"{name} per page"] = best(
                lambda: lib.pyvmm_crc32c_pages(buf, 4096, nbytes // 4096, ffi.NULL, out))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ram", default="1G")
    parser.add_argument("--dir", default=None, help="where files go (default: a temp dir in .)")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds first (default 1)")
    parser.add_argument("--durable", action="store_true",
                        help="fsync each checkpoint (the default of Checkpointer and `run`)")
    args = parser.parse_args()
    ram = parse_size(args.ram)
    speeds = crc_speed(min(ram, 256 << 20))
    cached = crc_speed(1 << 20, passes=64)
    times: dict[str, list[float]] = {k: [] for k in ("save off", "save on", "load off",
                                                    "load on", "lazy first off",
                                                    "lazy first on", "lazy filled off",
                                                    "lazy filled on")}
    with tempfile.TemporaryDirectory(dir=args.dir or ".") as tmp:
        directory = Path(tmp)
        machine = filled_machine(ram)
        for i in range(-args.warmup, args.repeat):
            # warm-up rounds (i < 0) are not kept: on these VMs the first writes into page
            # cache the host has not backed yet cost several times more than later ones
            keep = i >= 0
            order = (False, True) if i % 2 == 0 else (True, False)
            for on in order:
                path = directory / f"{'on' if on else 'off'}.bin"
                caps = ["checksum"] if on else []
                # a new file, created before the window; timed_checkpoint syncs first, so no
                # writeback of the previous file competes with the one timed
                path.unlink(missing_ok=True)
                seconds = timed_checkpoint(machine, path, args.durable, caps)
                if keep:
                    times["save on" if on else "save off"].append(seconds)
            os.sync()
            for on in order:
                path = directory / f"{'on' if on else 'off'}.bin"
                started = time.perf_counter()
                copy = reload(f"chpt:{path}")
                if keep:
                    times["load on" if on else "load off"].append(time.perf_counter() - started)
                copy.close()
            for on in order:
                path = directory / f"{'on' if on else 'off'}.bin"
                lazy, loader = lazy_reload(f"chpt:{path}")
                with lazy:
                    with loader:
                        lazy.run(max_insns=100_000)
                        loader.wait_filled()
                    stats = loader.stats()
                assert stats.first_insn_ms is not None and stats.filled_ms is not None
                which = "on" if on else "off"
                if keep:
                    times[f"lazy first {which}"].append(stats.first_insn_ms / 1e3)
                    times[f"lazy filled {which}"].append(stats.filled_ms / 1e3)
        machine.close()
    gib = ram / (1 << 30)
    print(f"guest RAM {gib:.2f} GiB, every page non-zero, checkpoints "
          f"{'durable (fsync)' if args.durable else 'not fsynced'}; best of {args.repeat} "
          f"(median)")
    for what in ("save", "load"):
        off, on = min(times[f"{what} off"]), min(times[f"{what} on"])
        off_med, on_med = statistics.median(times[f"{what} off"]), statistics.median(
            times[f"{what} on"])
        print(f"  {'checkpoint' if what == 'save' else 'reload    '}  off {off:.3f} s "
              f"({off_med:.3f})  on {on:.3f} s ({on_med:.3f})  throughput ratio "
              f"{off / on:.2f}x ({off_med / on_med:.2f}x) (target >= 0.8x)")
    first = {on: min(times[f"lazy first {on}"]) * 1e3 for on in ("off", "on")}
    filled = {on: min(times[f"lazy filled {on}"]) * 1e3 for on in ("off", "on")}
    print(f"  lazy reload first instruction  off {first['off']:.1f} ms  on {first['on']:.1f} ms "
          f"(target <= 20 ms); all RAM in  off {filled['off']:.0f} ms  on {filled['on']:.0f} ms "
          f"(ratio {filled['off'] / filled['on']:.2f}x)")
    print(f"  raw CRC-32C (in use: {checksum.implementation()}), GB/s, "
          f"{min(ram, 256 << 20) >> 20} MiB from memory / 1 MiB in cache:")
    for key in speeds:
        print(f"    {key:22s} {speeds[key]:5.1f} / {cached[key]:5.1f}")


if __name__ == "__main__":
    main()
