"""QMP protocol abuse against a running ``pyvmm run --qmp``: each bad input costs one error reply
in QEMU's shape, and afterwards the server still answers, the guest still runs, and every
checkpoint in the file still loads.

Every test drives a real ``python -m pyvmm run --qmp unix:PATH --workload passes=0 ...`` (a guest
that never ends; ``quit`` ends it) through raw unix sockets for the abuse and qemu.qmp's
``QMPClient`` for the crowd of well-behaved clients.  "The guest keeps running" is checked two
ways: ``query-status`` says so, and the workload's progress lines (its stdout, a file) go on
counting passes.  The server's memory is read from ``/proc/PID/status`` after its peak was reset
through ``/proc/PID/clear_refs``.  Nothing waits by sleeping: each wait polls against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0  # seconds any one wait may take before the test fails
GENERIC, NOT_FOUND = "GenericError", "CommandNotFound"
IN_PROGRESS = "There's a migration process in progress"
MAX_CLIENTS = 100  # pyvmm.monitor.server.MAX_CLIENTS
MAX_PENDING = 4 << 20  # pyvmm.monitor.server.MAX_PENDING
MAX_MESSAGE = 1 << 20  # pyvmm.monitor.json_stream.MAX_MESSAGE
RUNNING = {"return": {"status": "running", "running": True, "singlestep": False}}
_PASS = re.compile(rb"pass (\d+)/forever")
# a guest that never ends, small enough that a full checkpoint takes a few milliseconds, and
# prints a progress line every 16 passes (~70 lines a second)
GUEST = ("--ram", "32M", "--workload", "passes=0,working_set=8M")


def _strict_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes) -> Any:
    """``data`` parsed as RFC 8259 JSON (Python's NaN and Infinity refused)."""
    return json.loads(data, parse_constant=_strict_constant)


def error(error_class: str, desc: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}, **extra}


def migrate_when_free(client: RawQmp, uri: str) -> None:
    """``migrate`` to ``uri`` as soon as the migration under way has ended (each refusal must
    be QEMU's in-progress error)."""
    replies: list[dict[str, Any]] = []

    def accepted() -> bool:
        replies.append(client.command("migrate", {"uri": uri}))
        return replies[-1] == {"return": {}}

    wait_until(accepted, lambda: f"migrate is accepted (last reply: {replies[-1:]})")
    assert all(r == error(GENERIC, IN_PROGRESS) for r in replies[:-1]), replies


def wait_until(condition: Callable[[], bool], what: str | Callable[[], str],
               deadline: float = DEADLINE) -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``deadline``."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            text = what if isinstance(what, str) else what()
            raise AssertionError(f"timed out after {deadline:.0f} s waiting until {text}")
        time.sleep(0.005)  # a polling interval, not a wait for meaning


class RawQmp:
    """A QMP client on a bare socket: send any bytes, read messages one by one.  Events that
    arrive while a reply is awaited are kept in :attr:`events`."""

    def __init__(self, path: str, *, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(path)
        self.buffer = bytearray()
        self.events: list[dict[str, Any]] = []
        self.greeting = self.message()
        assert set(self.greeting) == {"QMP"}, self.greeting
        assert set(self.greeting["QMP"]) == {"version", "capabilities"}
        if negotiate:
            assert self.command("qmp_capabilities") == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line the server sent (EOFError when it closed the connection)."""
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

    def message(self) -> dict[str, Any]:
        message = strict_json(self.line())
        assert isinstance(message, dict), message
        return message

    def reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            message = self.message()
            if "event" not in message:
                return message
            assert set(message) <= {"event", "data", "timestamp"}, message
            self.events.append(message)

    def command(self, name: str, arguments: dict[str, Any] | None = None,
                **members: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"execute": name, **members}
        if arguments is not None:
            request["arguments"] = arguments
        self.send(json.dumps(request).encode() + b"\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@dataclasses.dataclass
class Pyvmm:
    """A running ``pyvmm run --qmp`` and where it writes."""

    proc: subprocess.Popen[bytes]
    qmp: str
    chpt: Path
    out: Path
    err: Path
    clients: list[RawQmp] = dataclasses.field(default_factory=list)

    def connect(self, *, negotiate: bool = True) -> RawQmp:
        """A new client (closed at the end of the test whatever happens, so that a failed
        test leaves no connection behind to count against MAX_CLIENTS)."""
        client = RawQmp(self.qmp, negotiate=negotiate)
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()

    def passes(self) -> int:
        """The last pass the guest reported on its console (0 before the first report)."""
        found = _PASS.findall(self.out.read_bytes()[-4096:])
        return int(found[-1]) if found else 0

    def status_kib(self, field: str) -> int:
        """A memory field (VmRSS, VmHWM...) of the pyvmm process, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"/proc/{self.proc.pid}/status has no {field}")

    def reset_peak(self) -> None:
        """VmHWM := VmRSS now (Linux: 5 > clear_refs), so the next peak is this test's own."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def assert_running(self, client: RawQmp | None = None) -> None:
        """The server answers query-status with running true, and the guest makes progress."""
        own = client is None
        client = client or self.connect()
        try:
            assert client.command("query-status") == RUNNING
        finally:
            if own:
                client.close()
        assert self.proc.poll() is None, self.err.read_bytes().decode(errors="replace")
        start = self.passes()
        wait_until(lambda: self.passes() > start, f"the guest runs past pass {start}")

    def migrations(self, client: RawQmp) -> int:
        """Checkpoints completed by this run (query-migrate's dirty-sync-count)."""
        reply = client.command("query-migrate")["return"]
        return int(reply.get("ram", {}).get("dirty-sync-count", 0))

    def wait_migrations(self, client: RawQmp, count: int) -> dict[str, Any]:
        """Wait until ``count`` checkpoints completed and none runs; the query-migrate reply."""
        replies: list[dict[str, Any]] = []

        def done() -> bool:
            replies.append(client.command("query-migrate")["return"])
            ram = replies[-1].get("ram", {})
            return bool(ram.get("dirty-sync-count") == count and
                        replies[-1]["status"] == "completed")

        wait_until(done, lambda: f"{count} checkpoints completed (last: {replies[-1:]})")
        return replies[-1]

    def quit(self) -> None:
        """End the run with QMP quit; it must exit 0 with nothing on stderr (-q)."""
        client = self.connect()
        assert client.command("quit") == {"return": {}}
        client.close()
        assert self.proc.wait(DEADLINE) == 0, self.err.read_bytes().decode(errors="replace")
        assert self.err.read_bytes() == b""


def pyvmm(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *map(str, args)], capture_output=True,
                          timeout=120, check=False, env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def running_pyvmm(workdir: Path, *extra: str) -> Iterator[Pyvmm]:
    """``pyvmm run --qmp`` started, yielded once its socket answers, ended afterwards (quit,
    else killed); a traceback on its stderr fails the test."""
    sockdir = tempfile.mkdtemp(prefix="qa", dir="/tmp")  # unix socket paths hold 107 bytes
    qmp = os.path.join(sockdir, "qmp.sock")
    chpt, out, err = workdir / "f.chpt", workdir / "guest.out", workdir / "pyvmm.err"
    with open(out, "wb") as out_file, open(err, "wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyvmm", "run", "--qmp", f"unix:{qmp}", *GUEST,
             "--checkpoint", f"chpt:{chpt}", "--no-fsync", "-q", *extra],
            stdin=subprocess.DEVNULL, stdout=out_file, stderr=err_file, cwd=workdir,
            env=_env())
    vm = Pyvmm(proc, qmp, chpt, out, err)
    try:
        clients: list[RawQmp] = []

        def listening() -> bool:
            assert proc.poll() is None, err.read_bytes().decode(errors="replace")
            try:
                clients.append(vm.connect())
                return True
            except (FileNotFoundError, ConnectionRefusedError):
                return False  # not yet bound, or bound and not yet listening

        wait_until(listening, "the QMP socket answers")
        client = clients[0]  # it answers before the guest's first instruction
        wait_until(lambda: client.command("query-status") == RUNNING, "the guest runs")
        # past its first progress line the guest has touched its whole working set: the
        # process's memory is what it will be (what the memory bounds measure from)
        wait_until(lambda: vm.passes() > 0, "the guest's first progress line")
        client.close()
        yield vm
    finally:
        vm.close_clients()
        if proc.poll() is None:
            try:
                client = vm.connect()
                client.command("quit")
                client.close()
                proc.wait(DEADLINE)
            except (OSError, EOFError, subprocess.TimeoutExpired, AssertionError):
                proc.kill()
                proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    stderr = err.read_bytes()  # reached when the test passed: its run must have been clean
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Pyvmm]:
    """A pyvmm of this test's own (for what changes the run: checkpoints, stops, memory)."""
    with running_pyvmm(tmp_path) as running:
        yield running


@pytest.fixture(scope="module")
def _one_shared_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pyvmm]:
    with running_pyvmm(tmp_path_factory.mktemp("shared")) as running:
        yield running


@pytest.fixture
def shared_vm(_one_shared_vm: Pyvmm) -> Iterator[Pyvmm]:
    """One pyvmm for the stateless cases: every bad request on it must leave it serving the
    next test as if nothing happened."""
    try:
        yield _one_shared_vm
    finally:
        _one_shared_vm.close_clients()


# ---------------------------------------------------------------------------------- bad requests
_NOT_OBJECT = "QMP input must be a JSON object"
BAD_REQUESTS: list[Any] = [
    pytest.param(b'{"execute": "query-status",}', (GENERIC, "JSON parse error, "),
                 id="trailing-comma"),
    pytest.param(b'{"execute" "query-status"}', (GENERIC, "JSON parse error, "), id="no-colon"),
    pytest.param(b'{"execute": "query-status", "id": \'x\'}', (GENERIC, "JSON parse error, "),
                 id="single-quotes"),
    pytest.param(b'{"execute": "query-\xff\xfe"}', (GENERIC, "JSON parse error, "),
                 id="not-utf8"),
    pytest.param(b'}', error(GENERIC, "JSON parse error, invalid token '}'"), id="stray-brace"),
    pytest.param(b'[1, 2]', error(GENERIC, _NOT_OBJECT), id="array"),
    pytest.param(b'[{"execute": "query-status"}]', error(GENERIC, _NOT_OBJECT),
                 id="array-of-command"),
    pytest.param(b'5', error(GENERIC, _NOT_OBJECT), id="number"),
    pytest.param(b'"query-status"', error(GENERIC, _NOT_OBJECT), id="string"),
    pytest.param(b'{}', error(GENERIC, "QMP input lacks member 'execute'"), id="empty-object"),
    pytest.param(b'{"execute": 5}', error(GENERIC, "QMP input member 'execute' must be a string"),
                 id="execute-number"),
    pytest.param(b'{"execute": "nope"}',
                 error(NOT_FOUND, "The command nope has not been found"), id="unknown-command"),
    pytest.param(b'{"execute": "nope", "id": {"tag": [1]}}',
                 error(NOT_FOUND, "The command nope has not been found", id={"tag": [1]}),
                 id="unknown-command-id-echoed"),
    pytest.param(b'{"execute": "query-status", "foo": 1}',
                 error(GENERIC, "QMP input member 'foo' is unexpected"), id="unexpected-member"),
    pytest.param(b'{"execute": "query-status", "arguments": [1]}',
                 error(GENERIC, "QMP input member 'arguments' must be an object"),
                 id="arguments-array"),
    pytest.param(b'{"execute": "query-status", "arguments": null}',
                 error(GENERIC, "QMP input member 'arguments' must be an object"),
                 id="arguments-null"),
    pytest.param(b'{"execute": "migrate", "arguments": {"uri": 5}}',
                 error(GENERIC, "Invalid parameter type for 'uri', expected: string"),
                 id="wrong-type"),
    pytest.param(b'{"execute": "migrate", "arguments": {"uri": "chpt:x", "period": "1"}}',
                 error(GENERIC, "Invalid parameter type for 'period', expected: number"),
                 id="wrong-type-period"),
    pytest.param(b'{"execute": "migrate", "arguments": {"uri": "chpt:x", "period": true}}',
                 error(GENERIC, "Invalid parameter type for 'period', expected: number"),
                 id="bool-for-number"),
    pytest.param(b'{"execute": "migrate-set-parameters", "arguments": {"saver-nice": 1.5}}',
                 error(GENERIC, "Invalid parameter type for 'saver-nice', expected: integer"),
                 id="float-for-integer"),
    pytest.param(b'{"execute": "migrate"}', error(GENERIC, "Parameter 'uri' is missing"),
                 id="missing-argument"),
    pytest.param(b'{"execute": "migrate", "arguments": {"uri": "chpt:x", "x": 1}}',
                 error(GENERIC, "Parameter 'x' is unexpected"), id="unexpected-argument"),
    pytest.param(b'{"execute": "stop", "arguments": {"now": true}}',
                 error(GENERIC, "Parameter 'now' is unexpected"),
                 id="unexpected-argument-blocking"),
    pytest.param(b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
                 b'[{"capability": "teleport", "state": true}]}}',
                 error(GENERIC, "Parameter 'capability' does not accept value 'teleport'"),
                 id="bad-enum"),
    pytest.param(b'{"execute": "query-status", "id": NaN}', (GENERIC, "JSON parse error, "),
                 id="nan-id"),
    pytest.param(b'{"execute": "query-status", "id": 1e400}', (GENERIC, "JSON parse error, "),
                 id="overflowing-id"),
]


@pytest.mark.parametrize(("request_bytes", "expected"), BAD_REQUESTS)
def test_negative_bad_request_gets_one_error_and_the_connection_goes_on(
        shared_vm: Pyvmm, request_bytes: bytes, expected: Any) -> None:
    client = shared_vm.connect()
    client.send(request_bytes + b"\n")
    reply = client.reply()
    if isinstance(expected, tuple):  # the parser's own words follow QEMU's prefix
        error_class, prefix = expected
        assert set(reply) == {"error"} and set(reply["error"]) == {"class", "desc"}, reply
        assert reply["error"]["class"] == error_class
        assert reply["error"]["desc"].startswith(prefix), reply
    else:
        assert reply == expected
    # one error, nothing more: the next reply is the next command's, on the same connection
    assert client.command("query-status", id="after") == {**RUNNING, "id": "after"}
    shared_vm.assert_running(client)
    client.close()


def test_negative_commands_before_negotiation_and_negotiation_twice(shared_vm: Pyvmm) -> None:
    client = shared_vm.connect(negotiate=False)
    expecting = error(NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'")
    for name in ("query-status", "stop", "quit", "migrate", "nope"):
        assert client.command(name, id=name) == {**expecting, "id": name}
    assert client.command("qmp_capabilities", {"enable": "oob"}) == \
        error(GENERIC, "Invalid parameter type for 'enable', expected: array")
    assert client.command("qmp_capabilities", {"enable": ["oob"]}) == \
        error(GENERIC, "Capability 'oob' not available")
    assert client.command("qmp_capabilities", id=1) == {"return": {}, "id": 1}
    assert client.command("qmp_capabilities", id=2) == {
        **error(NOT_FOUND, "Capabilities negotiation is already complete, command ignored"),
        "id": 2}
    shared_vm.assert_running(client)
    client.close()


def test_negative_many_bad_messages_in_one_write_get_one_reply_each(shared_vm: Pyvmm) -> None:
    """Pipelined without newlines, as qemu.qmp sends: one reply per message, in order."""
    client = shared_vm.connect()
    requests = [b'{"execute": "nope", "id": %d}' % i if i % 3 else
                b'{"execute": "query-status", "id": %d}' % i for i in range(300)]
    client.send(b"".join(requests))
    for i in range(300):
        reply = client.reply()
        assert reply["id"] == i
        assert ("return" in reply) == (i % 3 == 0), reply
    shared_vm.assert_running(client)
    client.close()


# ---------------------------------------------------------------------------------- huge inputs
TEN_MB = 10 * 1000 * 1000


def _huge_line(shape: str) -> bytes:
    if shape == "string":
        return b'{"execute": "query-status", "arguments": {"x": "' + b"A" * TEN_MB + b'"}}'
    if shape == "members":
        members = b"".join(b'"k%07d": 1, ' % i for i in range(TEN_MB // 14))
        return b'{"execute": "query-status", "arguments": {' + members + b'"z": 0}}'
    if shape == "nesting":
        return b"[" * TEN_MB
    assert shape == "junk"
    return b"A" * TEN_MB


HUGE_ERRORS = {
    "string": f"JSON parse error, message longer than {MAX_MESSAGE} bytes",
    "members": f"JSON parse error, message longer than {MAX_MESSAGE} bytes",
    "nesting": "JSON parse error, nesting deeper than 1024",
    "junk": "JSON parse error, invalid token '" + "A" * 32 + "'",
}


@pytest.mark.parametrize("shape", sorted(HUGE_ERRORS))
def test_negative_10mb_line_is_one_error_in_bounded_memory(vm: Pyvmm, shape: str) -> None:
    client = vm.connect()
    line = _huge_line(shape)
    assert len(line) >= TEN_MB
    vm.reset_peak()
    before = vm.status_kib("VmHWM")
    client.send(line + b"\n" + b'{"execute": "query-status", "id": "after"}\n')
    assert client.reply() == error(GENERIC, HUGE_ERRORS[shape])
    assert client.reply() == {**RUNNING, "id": "after"}
    grown = vm.status_kib("VmHWM") - before
    # holding the line once would cost 10 MB, parsing it several times that; the server keeps
    # at most one message's bytes (1 MiB) and a read buffer
    assert grown < 6 << 10, f"the server's peak RSS grew by {grown} KiB for a 10 MB line"
    vm.assert_running(client)
    client.close()


# ------------------------------------------------------------------------------- many clients
def test_fifty_qmp_clients_connecting_at_once_all_get_greetings_and_answers(
        shared_vm: Pyvmm) -> None:
    async def one(index: int, start: asyncio.Event) -> tuple[Any, ...]:
        client = QMPClient(f"client-{index}")
        await start.wait()
        await client.connect(shared_vm.qmp)  # greeting, then qmp_capabilities
        try:
            assert client.greeting is not None
            return (await client.execute("query-status"),
                    await client.execute("query-name"),
                    await client.execute("query-migrate"))
        finally:
            await client.disconnect()

    async def crowd() -> list[tuple[Any, ...]]:
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(one(i, start)) for i in range(50)]
        await asyncio.sleep(0)  # every task waits at the start line
        start.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)

    answers = asyncio.run(crowd())
    assert len(answers) == 50
    for status, name, migrate in answers:
        assert status == RUNNING["return"]
        assert name == answers[0][1] and isinstance(name["name"], str)
        assert "status" in migrate
    shared_vm.assert_running()


def test_client_limit_closes_the_extra_one_and_frees_a_place_when_one_leaves(
        shared_vm: Pyvmm) -> None:
    clients: list[RawQmp] = []

    def one_more() -> bool:
        try:
            clients.append(shared_vm.connect(negotiate=False))  # greeted
            return True
        except EOFError:
            return False  # the server has not yet seen an earlier test's clients go

    try:
        for _ in range(MAX_CLIENTS):
            wait_until(one_more, f"client {len(clients) + 1} is admitted")
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(DEADLINE)
        extra.connect(shared_vm.qmp)
        assert extra.recv(1 << 16) == b""  # closed at once, no greeting
        extra.close()
        for client in clients[::10]:  # those in place are still served
            assert client.command("qmp_capabilities") == {"return": {}}
            assert client.command("query-status") == RUNNING
        clients.pop().close()
        wait_until(one_more, "a place is free again")  # once the server saw the leaver go
        newcomer = clients[-1]
        assert newcomer.command("qmp_capabilities") == {"return": {}}
        shared_vm.assert_running(newcomer)
    finally:
        for client in clients:
            client.close()


# ------------------------------------------------------------------- clients that go away
def test_clients_vanishing_mid_checkpoint_leave_every_increment_loadable(vm: Pyvmm) -> None:
    observer = vm.connect()
    capabilities = [{"capability": name, "state": True} for name in ("live", "incremental")]
    assert observer.command("migrate-set-capabilities", {"capabilities": capabilities}) == \
        {"return": {}}
    migrate = json.dumps({"execute": "migrate", "arguments": {"uri": f"chpt:{vm.chpt}"}})

    # 1: migrate, then close at once (the reply is never read)
    client = vm.connect()
    client.send(migrate.encode() + b"\n")
    client.close()
    vm.wait_migrations(observer, 1)
    # 2: the same, reset-style: SO_LINGER 0, the socket dropped with the reply unread
    client = vm.connect()
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.send(migrate.encode() + b"\n")
    client.close()
    vm.wait_migrations(observer, 2)
    # 3: HMP's migrate waits for the checkpoint on a worker; its client leaves meanwhile
    client = vm.connect()
    client.send(json.dumps({"execute": "human-monitor-command",
                            "arguments": {"command-line": f"migrate chpt:{vm.chpt}"}}).encode())
    client.close()
    reply = vm.wait_migrations(observer, 3)
    assert reply["checkpoint"]["increment"] == 2
    statuses = [e["data"]["status"] for e in observer.events if e["event"] == "MIGRATION"]
    assert statuses.count("completed") == 3, observer.events
    assert "failed" not in statuses and "cancelled" not in statuses
    vm.assert_running(observer)
    info = observer.command("query-checkpoints", {"file": str(vm.chpt)})["return"]
    assert [i["kind"] for i in info["increments"]] == ["full", "incremental", "incremental"]
    observer.close()
    vm.quit()  # and the end-of-run checkpoint: a fourth increment
    verify = pyvmm("checkpoint", "verify", vm.chpt)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    info_run = pyvmm("checkpoint", "info", vm.chpt)
    assert b"increments    4" in info_run.stdout, info_run.stdout


def test_quit_and_cancel_mid_checkpoint_leave_the_file_loadable(vm: Pyvmm) -> None:
    client = vm.connect()
    client.command("migrate-set-capabilities",
                   {"capabilities": [{"capability": "live", "state": True}]})
    assert client.command("migrate", {"uri": f"chpt:{vm.chpt}"}) == {"return": {}}
    vm.wait_migrations(client, 1)
    assert client.command("migrate", {"uri": f"chpt:{vm.chpt}"}) == {"return": {}}
    assert client.command("migrate_cancel") == {"return": {}}  # in flight or already done
    migrate_when_free(client, f"chpt:{vm.chpt}")
    assert client.command("quit") == {"return": {}}  # at once, while that checkpoint runs
    client.close()
    assert vm.proc.wait(DEADLINE) == 0
    assert vm.err.read_bytes() == b""
    verify = pyvmm("checkpoint", "verify", vm.chpt)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_commands_sent_before_the_client_hung_up_are_all_run(vm: Pyvmm) -> None:
    """A fire-and-forget script: connect, write its commands, close without reading.  (asyncio
    drops a transport's input when a write to it fails; the server reads through its own
    descriptor so that they still run, as in QEMU.)"""
    script = socket.socket(socket.AF_UNIX)
    script.connect(vm.qmp)
    script.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-status"}'
                   b'{"execute": "quit"}')
    script.close()
    try:  # a quit takes ~0.1 s; ten seconds without one: it was lost
        assert vm.proc.wait(10) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the quit the client sent before hanging up was never run")
    assert vm.err.read_bytes() == b""


# -------------------------------------------------------------------------- slow clients
def _stop_cont(client: RawQmp, cycles: int) -> None:
    for i in range(cycles):
        assert client.command("stop", id=2 * i) == {"return": {}, "id": 2 * i}
        assert client.command("cont", id=2 * i + 1) == {"return": {}, "id": 2 * i + 1}


def test_a_client_that_does_not_read_during_an_event_flood_stalls_nobody(vm: Pyvmm) -> None:
    sleeper = vm.connect()  # negotiated: it is sent every event, and reads none for now
    driver = vm.connect()
    _stop_cont(driver, 300)
    names = [e["event"] for e in driver.events]
    assert names == ["STOP", "RESUME"] * 300
    vm.assert_running(driver)
    # well under MAX_PENDING: the sleeper was kept, and is owed every event, in order
    owed = [sleeper.message()["event"] for _ in range(600)]
    assert owed == ["STOP", "RESUME"] * 300
    assert sleeper.command("query-status") == RUNNING
    sleeper.close()
    driver.close()


def test_a_client_whose_replies_pile_up_is_dropped_in_bounded_memory(vm: Pyvmm) -> None:
    hog = vm.connect()
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    driver = vm.connect()
    vm.reset_peak()
    before = vm.status_kib("VmHWM")
    request = b'{"execute": "query-commands"}'  # each reply is ~600 bytes
    for _ in range(100):  # 100 x 500 requests: ~30 MB of replies if it were kept
        try:
            hog.send(request * 500)
        except OSError:
            break  # dropped mid-send: EPIPE / ECONNRESET
        assert driver.command("query-status") == RUNNING  # answered all along
    # the hog was dropped: what it can still read is bounded, then the connection ends (a
    # hog never dropped would block this loop until the socket's timeout)
    received = 0
    with contextlib.suppress(EOFError, ConnectionResetError):
        while True:
            received += len(hog.line()) + 1
    assert received < MAX_PENDING + (2 << 20), received
    grown = vm.status_kib("VmHWM") - before
    assert grown < 16 << 10, f"the server's peak RSS grew by {grown} KiB"
    vm.assert_running(driver)
    driver.close()


@pytest.mark.slow
def test_an_event_flood_drops_a_client_that_never_reads(vm: Pyvmm) -> None:
    """Enough STOP/RESUME events (~83 bytes each) to pass MAX_PENDING for the sleeper (~35 s:
    a stop/cont round trip is ~1 ms)."""
    sleeper = vm.connect()
    sleeper.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    driver = vm.connect()
    _stop_cont(driver, MAX_PENDING // 150 + 5000)  # each cycle owes the sleeper ~166 bytes
    received = 0
    with contextlib.suppress(EOFError, ConnectionResetError):
        while True:
            received += len(sleeper.line()) + 1
    assert received < MAX_PENDING + (2 << 20)
    vm.assert_running(driver)
    driver.close()


# -------------------------------------------------------------------- one migration at a time
def test_migrate_while_a_periodic_migrate_runs_gets_qemus_error(vm: Pyvmm) -> None:
    client = vm.connect()
    uri = f"chpt:{vm.chpt}"
    assert client.command("migrate", {"uri": uri, "period": 0.2}) == {"return": {}}
    assert client.command("migrate", {"uri": uri}, id="again") == \
        {**error(GENERIC, IN_PROGRESS), "id": "again"}
    other = vm.connect()
    assert other.command("migrate", {"uri": f"chpt:{vm.chpt}.other", "period": 1}) == \
        error(GENERIC, IN_PROGRESS)
    assert other.command("migrate-set-capabilities", {"capabilities": [
        {"capability": "incremental", "state": True}]}) == error(GENERIC, IN_PROGRESS)
    assert other.command("human-monitor-command", {"command-line": f"migrate {uri}"}) == \
        {"return": f"Error: {IN_PROGRESS}\r\n"}
    wait_until(lambda: vm.migrations(other) >= 3, "three periodic checkpoints")
    assert not os.path.exists(f"{vm.chpt}.other")
    assert client.command("migrate_cancel") == {"return": {}}
    taken = vm.migrations(client)
    migrate_when_free(client, uri)  # once the periodic migration has ended
    wait_until(lambda: vm.migrations(client) > taken and
               client.command("query-migrate")["return"]["status"] == "completed",
               "the single checkpoint completed")
    vm.assert_running(client)
    client.close()
    other.close()
    vm.quit()
    verify = pyvmm("checkpoint", "verify", vm.chpt)
    assert verify.returncode == 0, verify.stdout + verify.stderr
