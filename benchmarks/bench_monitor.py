"""The QMP monitor's cost: a command's round trip, and what a polling client takes from the guest.

  1 round trip : ``query-status`` on a running ``pyvmm run --qmp`` (built-in workload, never
                 ending), one request at a time from a raw unix-socket client in this process:
                 median, p99 and max of --calls calls; also with the guest stopped (no vCPU
                 competing for the GIL and a core).  Baseline, same client, same run, in
                 alternating blocks of 100 calls: a trivial asyncio echo server in its own
                 process (what an asyncio unix-socket server costs at all, under the same
                 load).  Target (issue 15): median < 1 ms with the guest running.
  2 guest speed: guest instructions per second of ``run --seconds S`` with a client polling
                 ``query-migrate`` every 10 ms (on a fixed schedule, from this process) against
                 the same run with no client; rounds interleaved, rate from each run's summary
                 line ("N guest instructions (X/s)").  Target (issue 15): >= 0.95x.
  3 guest speed: the same comparison inside one run, in alternating windows (ABBA) with and
                 without the poller, guest passes per second timed from its progress lines:
                 free of the run-to-run spread of section 2 (which core, which pages).
Numbers are for reading, not for gating CI (2 shared cores: compare the ratios).

    python benchmarks/bench_monitor.py [--quick] [--calls 2000] [--rounds 3] [--seconds 4]
        [--windows 10] [--window 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GUEST = ("--ram", "64M", "--workload", "passes=0,working_set=32M")
POLL_S = 0.010
TARGET_MEDIAN_MS = 1.0
TARGET_SPEED = 0.95
_SUMMARY = re.compile(rb"([\d.]+)([KMG]?) guest instructions \(([\d.]+)([KMG]?)/s\)")
_SCALE = {b"": 1.0, b"K": 1e3, b"M": 1e6, b"G": 1e9}
_PASS = re.compile(rb"pass (\d+)/forever")
# the same guest, reporting every 4 passes: ~250 lines a second to time its passes by
WINDOW_GUEST = ("--ram", "64M", "--workload", "passes=0,working_set=32M,report=4")

ECHO_SERVER = """\
import asyncio, os, sys

async def echo(reader, writer):
    while line := await reader.readline():
        writer.write(line)
    writer.close()

async def main():
    server = await asyncio.start_unix_server(echo, sys.argv[1])
    os.write(1, b"ready\\n")
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def child_env() -> dict[str, str]:
    """pyvmm importable from this tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class LineClient:
    """One request line, one reply line (QMP events skipped), over a unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buffer = bytearray()

    def line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                return line
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the server closed the connection")
            self.buffer += data

    def ask(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        while True:
            line = self.line()
            if not line.startswith(b'{"event"'):
                return line

    def close(self) -> None:
        self.sock.close()


def connect_when_up(path: str, proc: subprocess.Popen[bytes]) -> LineClient:
    """A client, once the server at ``path`` accepts connections."""
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode} before it listened")
        try:
            return LineClient(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens at {path} after 30 s") from None
            time.sleep(0.01)


def qmp_client(path: str, proc: subprocess.Popen[bytes]) -> LineClient:
    client = connect_when_up(path, proc)
    greeting = json.loads(client.line())
    assert "QMP" in greeting, greeting
    assert json.loads(client.ask(b'{"execute": "qmp_capabilities"}\n')) == {"return": {}}
    return client


@contextmanager
def pyvmm_run(directory: Path, *extra: str, guest: tuple[str, ...] = GUEST,
              stdout: int = subprocess.DEVNULL) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``pyvmm run --qmp`` of the never-ending workload; yields (process, socket path) and
    ends it with quit (unless it has ended on its own)."""
    path = str(directory / "qmp.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "--qmp", f"unix:{path}",
                             *guest, *extra], stdout=stdout, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=child_env(), cwd=directory)
    try:
        yield proc, path
    finally:
        if proc.poll() is None:
            try:
                client = qmp_client(path, proc)
                client.ask(b'{"execute": "quit"}\n')
                client.close()
            except (OSError, EOFError):
                proc.kill()
        if proc.stderr is not None and not proc.stderr.closed:
            proc.communicate(timeout=60)


def round_trips(client: LineClient, request: bytes, calls: int) -> list[float]:
    """Seconds per request/reply, ``calls`` of them after 20 untimed."""
    for _ in range(20):
        client.ask(request)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        client.ask(request)
        times.append(time.perf_counter() - started)
    return times


def wait_running(client: LineClient) -> None:
    deadline = time.monotonic() + 30
    while json.loads(client.ask(b'{"execute": "query-status"}\n'))["return"]["status"] != \
            "running":
        if time.monotonic() > deadline:
            raise SystemExit("the guest did not start within 30 s")
        time.sleep(0.01)


def section_round_trip(directory: Path, calls: int) -> dict[str, dict[str, list[float]]]:
    """{guest state: {server: round trips}}; pyvmm and the echo server measured in
    alternating blocks of 100 calls, while the guest runs (it holds a core) and while it is
    stopped."""
    results: dict[str, dict[str, list[float]]] = {}
    request = b'{"execute": "query-status"}\n'
    # the echo server returns the request: a line as long as pyvmm's reply
    reply_sized = b'{"return": {"status": "running", "running": true, "singlestep": false}}\r\n'
    echo_path = str(directory / "echo.sock")
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, echo_path],
                            stdout=subprocess.PIPE)
    try:
        assert echo.stdout is not None and echo.stdout.readline() == b"ready\n"
        echo_client = connect_when_up(echo_path, echo)
        with pyvmm_run(directory, "-q") as (proc, path):
            client = qmp_client(path, proc)
            wait_running(client)
            for state in ("running", "stopped"):
                if state == "stopped":
                    client.ask(b'{"execute": "stop"}\n')
                pyvmm_times: list[float] = []
                echo_times: list[float] = []
                for _ in range(max(1, calls // 100)):
                    pyvmm_times += round_trips(client, request, 100)
                    echo_times += round_trips(echo_client, reply_sized, 100)
                results[state] = {"pyvmm query-status": pyvmm_times,
                                  "asyncio echo (baseline)": echo_times}
            client.ask(b'{"execute": "cont"}\n')
            client.close()
        echo_client.close()
    finally:
        echo.kill()
        echo.wait()
    return results


def guest_rate(directory: Path, seconds: float, poll: bool) -> tuple[float, int]:
    """(guest instructions per second, query-migrate calls made) of one ``run --seconds``."""
    with pyvmm_run(directory, "--seconds", str(seconds)) as (proc, path):
        client = qmp_client(path, proc)
        polls = 0
        if poll:
            next_at = time.monotonic()
            try:
                while proc.poll() is None:
                    client.ask(b'{"execute": "query-migrate"}\n')
                    polls += 1
                    next_at += POLL_S
                    time.sleep(max(0.0, next_at - time.monotonic()))
            except (OSError, EOFError):
                pass  # the run ended (its --seconds) while a poll was under way
        client.close()
        _out, err = proc.communicate(timeout=seconds + 60)
    found = _SUMMARY.search(err)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"pyvmm run exited {proc.returncode}: {err.decode(errors='replace')}")
    return float(found.group(3)) * _SCALE[found.group(4)], polls


class Poller:
    """A thread that sends ``query-migrate`` every POLL_S seconds (a fixed schedule) while
    :attr:`on` is set."""

    def __init__(self, client: LineClient) -> None:
        self.client = client
        self.on = threading.Event()
        self.done = threading.Event()
        self.polls = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            if not self.on.wait(0.05):
                continue
            next_at = time.monotonic()
            while self.on.is_set() and not self.done.is_set():
                self.client.ask(b'{"execute": "query-migrate"}\n')
                self.polls += 1
                next_at += POLL_S
                time.sleep(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


class Progress:
    """The guest's progress lines (``pass N/forever``), each with the host time it was read."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lines: list[tuple[float, int]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for line in self.stream:
            found = _PASS.search(line)
            if found:
                self.lines.append((time.monotonic(), int(found.group(1))))

    def rate(self, start: float, end: float) -> float:
        """Passes per second between the first and last line read in [start, end)."""
        inside = [(t, n) for t, n in self.lines if start <= t < end]
        if len(inside) < 2:
            raise SystemExit("too few progress lines in a window: lengthen --window")
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return (n1 - n0) / (t1 - t0)


def section_windows(directory: Path, windows: int,
                    window_s: float) -> tuple[list[float], list[float], int]:
    """One run, alternating windows with and without the poller (ABBA order, so a drift
    weighs on both alike): guest passes per second in each."""
    alone: list[float] = []
    polled: list[float] = []
    with pyvmm_run(directory, "-q", guest=WINDOW_GUEST, stdout=subprocess.PIPE) as (proc, path):
        assert proc.stdout is not None
        progress = Progress(proc.stdout)
        client = qmp_client(path, proc)
        wait_running(client)
        poller = Poller(client)
        time.sleep(window_s)  # warm-up: translated code, first touches of the working set
        for i in range(2 * windows):
            poll = i % 4 in (1, 2)
            if poll:
                poller.on.set()
            else:
                poller.on.clear()
            start = time.monotonic()
            time.sleep(window_s)  # the window being measured, not a wait for an event
            (polled if poll else alone).append(progress.rate(start + 0.05, time.monotonic()))
        poller.on.clear()
        poller.stop()
        polls = poller.polls
        client.close()
    return alone, polled, polls


def section_guest_speed(directory: Path, rounds: int,
                        seconds: float) -> tuple[list[float], list[float], list[int]]:
    alone: list[float] = []
    polled: list[float] = []
    polls: list[int] = []
    for i in range(rounds):  # interleaved, the order swapped every round: drift hits both
        for poll in ((False, True) if i % 2 == 0 else (True, False)):
            rate, count = guest_rate(directory, seconds, poll)
            (polled if poll else alone).append(rate)
            if poll:
                polls.append(count)
    return alone, polled, polls


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="500 calls, 1 round of 2 s per case")
    parser.add_argument("--calls", type=int, default=None, help="round trips (default 2000)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of section 2 (default 3)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="guest run per round of section 2 (default 4)")
    parser.add_argument("--windows", type=int, default=None,
                        help="windows of each kind in section 3 (default 10)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds per window of section 3 (default 1)")
    args = parser.parse_args()
    calls = args.calls or (500 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    windows = args.windows or (4 if args.quick else 10)
    window_s = args.window or (0.5 if args.quick else 1.0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-monitor-", dir="/tmp") as tmp:
        trips = section_round_trip(Path(tmp), calls)
        alone, polled, polls = section_guest_speed(Path(tmp), rounds, seconds)
        w_alone, w_polled, w_polls = section_windows(Path(tmp), windows, window_s)
    elapsed = time.perf_counter() - started

    print(f"guest: {' '.join(GUEST)}; {'--quick; ' if args.quick else ''}{elapsed:.0f} s")
    print(f"1. round trip, one request at a time, {calls} calls each, pyvmm and the echo "
          f"server in alternating blocks of 100 [target: median < {TARGET_MEDIAN_MS:.0f} ms "
          f"with the guest running]")
    for state, by_server in trips.items():
        base = statistics.median(by_server["asyncio echo (baseline)"])
        for name, times in by_server.items():
            median = statistics.median(times)
            line = (f"   guest {state:8s} {name:24s} median {median * 1e3:6.3f} ms  p99 "
                    f"{percentile(times, 0.99) * 1e3:6.3f} ms  max {max(times) * 1e3:7.3f} ms")
            if name.startswith("pyvmm"):
                line += f"   {median / base:5.2f}x echo"
                if state == "running":
                    line += f"   [{'met' if median * 1e3 < TARGET_MEDIAN_MS else 'MISSED'}]"
            print(line)
    ratio = statistics.median(polled) / statistics.median(alone)
    print(f"2. guest speed, {rounds} interleaved round(s) of run --seconds {seconds:g}, "
          f"instructions/s from the run's summary [target: >= {TARGET_SPEED}x]")
    print(f"   {'no client':32s} median {statistics.median(alone) / 1e6:6.1f} M/s  "
          f"({', '.join(f'{r / 1e6:.1f}' for r in alone)})")
    print(f"   {'query-migrate every 10 ms':32s} median {statistics.median(polled) / 1e6:6.1f} "
          f"M/s  ({', '.join(f'{r / 1e6:.1f}' for r in polled)}; {min(polls)}-{max(polls)} "
          f"polls a run)   {ratio:5.3f}x  [{'met' if ratio >= TARGET_SPEED else 'MISSED'}]")
    w_ratio = statistics.median(w_polled) / statistics.median(w_alone)
    print(f"3. guest speed in one run, {windows} + {windows} alternating windows of "
          f"{window_s:g} s (ABBA), guest passes/s from its progress lines [target: >= "
          f"{TARGET_SPEED}x]")
    print(f"   {'no client':32s} median {statistics.median(w_alone):7.1f} passes/s  "
          f"(min {min(w_alone):.1f}, max {max(w_alone):.1f})")
    print(f"   {'query-migrate every 10 ms':32s} median {statistics.median(w_polled):7.1f} "
          f"passes/s  (min {min(w_polled):.1f}, max {max(w_polled):.1f}; {w_polls} polls)   "
          f"{w_ratio:5.3f}x  [{'met' if w_ratio >= TARGET_SPEED else 'MISSED'}]")


if __name__ == "__main__":
    main()
