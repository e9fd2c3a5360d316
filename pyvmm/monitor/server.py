"""The monitor's sockets: QMP (``--qmp``) and HMP text (``--monitor unix:PATH``) servers.

Both run on one asyncio loop in one host thread (``pyvmm-monitor``), so a client never holds
the guest: the vCPU runs on its own thread, and commands that may wait (stop, cont, migrate,
reloads, HMP) run on a small pool of worker threads while the loop goes on serving the others.
Queries answer on the loop itself (well under a millisecond).

What a client can cost is bounded: at most :data:`MAX_CLIENTS` connections (more are closed at
once), a message of at most :data:`~.json_stream.MAX_MESSAGE` bytes, and at most
:data:`MAX_PENDING` bytes of replies and events waiting for a client that does not read (past
it the client is dropped; the guest and the other clients go on).  Unix sockets are made mode
0600 before they listen; TCP only when asked, bound to the address given.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import math
import os
import socket
import threading
from typing import Any

from ..threads import NamedThread, name_this_thread
from .controller import CommandError, VmController
from .events import Event
from .json_stream import JsonSplitter, SplitError
from .qmp_commands import COMMANDS, execute, lookup, qemu_version
from .sockets import SocketAddress, listen, parse_address

MAX_CLIENTS = 100
MAX_PENDING = 4 << 20
MAX_HMP_LINE = 64 << 10
_WORKERS = 16


class _Client:
    """One connection's output: written without waiting; a client that lets more than
    MAX_PENDING bytes pile up is dropped."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False
        self.closed = False
        # Input is read through a descriptor of our own, never by the transport: asyncio drops
        # a transport's input when a write to it fails (the peer hung up), but what a client
        # sent before it went is still run, as QEMU does (its quit included)
        transport = writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()
        self.input = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        self.input.setblocking(False)

    def send_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        transport = self.writer.transport
        if transport.is_closing():
            return  # the peer hung up: its input is still read and run (see __init__)
        if transport.get_write_buffer_size() + len(data) > MAX_PENDING:
            self.close()  # it does not read: dropping it bounds our memory
            return
        self.writer.write(data)

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(json.dumps(message).encode() + b"\r\n")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):  # wakes its reader; the peer sees the end
                self.input.shutdown(socket.SHUT_RD)
            if self.writer.transport.get_write_buffer_size() > MAX_PENDING // 2:
                self.writer.transport.abort()  # not reading: what it is owed is dropped
            else:
                self.writer.close()  # what it is owed (a quit's reply) is flushed first


def _not_json(name: str) -> Any:
    """NaN and Infinity are Python's, not JSON: refused as QEMU's parser does (a reply echoing
    them would be no JSON either)."""
    raise ValueError(f"invalid token '{name}'")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range '{text}'")
    return value


def _error(error_class: str, desc: str, msg_id: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if msg_id is not None:
        reply["id"] = msg_id
    return reply


class MonitorServer:
    """QMP and HMP sockets over one controller, served from their own thread."""

    def __init__(self, vm: VmController) -> None:
        self.vm = vm
        self._loop = asyncio.new_event_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            _WORKERS, thread_name_prefix="pyvmm-qmp-worker",
            initializer=name_this_thread, initargs=("pyvmm-qmp-work",))
        self._sockets: list[tuple[socket.socket, str, SocketAddress]] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._clients: set[_Client] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        # events in the order they were emitted, sent before any reply built after them
        self._events: collections.deque[Event] = collections.deque()

    def add(self, address: SocketAddress, kind: str, option: str) -> None:
        """Listen at ``address`` for ``kind`` ("qmp" or "hmp") clients (before :meth:`start`)."""
        self._sockets.append((listen(address, option), kind, address))

    def start(self) -> MonitorServer:
        self.vm.events.subscribe(self._on_event)
        self._thread = NamedThread(target=self._main, name="pyvmm-monitor", daemon=True)
        self._thread.start()
        self._ready.wait()
        return self

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            for sock, kind, _address in self._sockets:
                handler = self._serve_qmp if kind == "qmp" else self._serve_hmp
                if sock.family == socket.AF_UNIX:
                    server = await asyncio.start_unix_server(handler, sock=sock, limit=1 << 16)
                else:
                    server = await asyncio.start_server(handler, sock=sock, limit=1 << 16)
                self._servers.append(server)
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    def close(self) -> None:
        """Stop serving: flush what clients are owed (a quit's reply), close them, remove
        the unix sockets."""
        self.vm.events.unsubscribe(self._on_event)
        if self._thread is not None and self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                future.result(timeout=5)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sock, _kind, address in self._sockets:
            if address.kind == "unix":
                try:
                    os.unlink(address.path)
                except OSError:
                    pass
            sock.close()

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for client in list(self._clients):
            client.close()
        await asyncio.sleep(0)

    # ------------------------------------------------------------------ events
    def _on_event(self, event: Event) -> None:
        """Any thread: hand the event to the loop (never blocks)."""
        self._events.append(event)
        try:
            self._loop.call_soon_threadsafe(self._broadcast)
        except RuntimeError:
            pass  # the loop is closed: the run is ending

    def _broadcast(self) -> None:
        """The loop: send every event emitted so far.  Also called before each reply, so a
        reply that reports a state (query-migrate's "completed") never overtakes the event
        that announced it."""
        while self._events:
            event = self._events.popleft()
            data = json.dumps(event.as_qmp()).encode() + b"\r\n"
            for client in list(self._clients):
                if client.negotiated:
                    client.send_bytes(data)

    def _admit(self, writer: asyncio.StreamWriter) -> _Client | None:
        """A new connection's client, or None (closed at once) past MAX_CLIENTS."""
        client = _Client(writer)
        if len(self._clients) >= MAX_CLIENTS:
            client.close()
            client.input.close()
            return None
        self._clients.add(client)
        return client

    # ------------------------------------------------------------------ QMP
    async def _serve_qmp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        client = self._admit(writer)
        if client is None:
            return
        client.send({"QMP": {"version": qemu_version(), "capabilities": []}})
        splitter = JsonSplitter()
        try:
            while not client.closed:
                data = await self._loop.sock_recv(client.input, 1 << 16)
                if not data:
                    break
                for item in splitter.feed(data):
                    if isinstance(item, SplitError):
                        client.send(_error("GenericError", item.message))
                        continue
                    reply = await self._handle(client, item)
                    self._broadcast()
                    client.send(reply)
                    if client.closed:
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(client)
            client.close()
            client.input.close()

    async def _handle(self, client: _Client, raw: bytes) -> dict[str, Any]:
        try:
            message = json.loads(raw, parse_constant=_not_json, parse_float=_finite_float)
        except (ValueError, RecursionError) as err:
            return _error("GenericError", f"JSON parse error, {err}")
        if not isinstance(message, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        msg_id = message.get("id")
        for key in message:
            if key not in ("execute", "arguments", "id"):
                return _error("GenericError", f"QMP input member '{key}' is unexpected", msg_id)
        name = message.get("execute")
        if not isinstance(name, str):
            return _error("GenericError", "QMP input member 'execute' must be a string"
                          if name is not None else "QMP input lacks member 'execute'", msg_id)
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            return _error("GenericError", "QMP input member 'arguments' must be an object",
                          msg_id)
        if not client.negotiated and name != "qmp_capabilities":
            return _error("CommandNotFound", "Expecting capabilities negotiation with "
                                             "'qmp_capabilities'", msg_id)
        if client.negotiated and name == "qmp_capabilities":
            return _error("CommandNotFound", "Capabilities negotiation is already complete, "
                                             "command ignored", msg_id)
        try:
            command = lookup(name)
            if name == "qmp_capabilities":
                execute(self.vm, command, arguments)
                if arguments.get("enable"):
                    raise CommandError(f"Capability '{arguments['enable'][0]}' not available")
                client.negotiated = True
                result: Any = {}
            elif command.blocking:
                result = await self._loop.run_in_executor(self._pool, execute, self.vm,
                                                          command, arguments)
            else:
                result = execute(self.vm, command, arguments)
        except CommandError as err:
            return _error(err.error_class, str(err), msg_id)
        except Exception as err:  # noqa: BLE001 - a bug must cost one reply, not the server
            return _error("GenericError", f"internal error: {err!r}", msg_id)
        reply: dict[str, Any] = {"return": result}
        if msg_id is not None:
            reply["id"] = msg_id
        return reply

    # ------------------------------------------------------------------ HMP
    async def _serve_hmp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        from .. import __version__
        from .hmp import execute_line

        client = self._admit(writer)
        if client is None:
            return
        prompt = b"(pyvmm) "
        client.send_bytes(f"pyvmm {__version__} monitor - type 'help' for more "
                          f"information\r\n".encode() + prompt)
        pending = bytearray()
        skipping = False  # dropping the rest of an over-long line
        try:
            while not client.closed:
                data = await self._loop.sock_recv(client.input, 1 << 16)
                if not data:
                    break
                pending += data
                while b"\n" in pending:
                    line, _, rest = bytes(pending).partition(b"\n")
                    pending = bytearray(rest)
                    if skipping:
                        skipping = False
                        continue
                    text = line.decode("utf-8", "replace").strip()
                    if text:
                        output = await self._loop.run_in_executor(self._pool, execute_line,
                                                                  self.vm, text)
                        client.send_bytes(output.encode())
                    client.send_bytes(prompt)
                if len(pending) > MAX_HMP_LINE:
                    pending.clear()
                    skipping = True
                    client.send_bytes(f"Error: line longer than {MAX_HMP_LINE} bytes\r\n"
                                      .encode() + prompt)
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(client)
            client.close()
            client.input.close()


__all__ = ["COMMANDS", "MonitorServer", "SocketAddress", "listen", "parse_address"]
