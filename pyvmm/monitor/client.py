"""``pyvmm monitor``: a command-line client for a running pyvmm's monitor sockets.

``pyvmm monitor unix:PATH`` opens an HMP session: on a QMP socket (``--qmp``) each line goes
through ``human-monitor-command``; on an HMP socket (``--monitor unix:PATH``) lines are relayed
as typed.  Line editing and history where the terminal allows it; lines from a pipe run one by
one, without prompts.  ``pyvmm monitor unix:PATH --qmp CMD [JSON]`` runs one QMP command and
prints its ``return`` value as JSON (exit 0), or its error as one line (exit 1).

Every failure to reach or understand the server is a :class:`~pyvmm.errors.ConfigError` naming
the address.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from ..errors import ConfigError
from .sockets import SocketAddress, parse_address

TIMEOUT = 30.0  # seconds to wait for the server's greeting and for each reply
_HMP_PROMPT = b"(pyvmm) "
_MAX_REPLY = 64 << 20


class _Connection:
    """Lines (CRLF or LF) from a socket, with a bound on what one reply may hold."""

    def __init__(self, address: SocketAddress) -> None:
        self.address = address
        family = socket.AF_UNIX if address.kind == "unix" else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        target: Any = address.path if address.kind == "unix" else (address.host, address.port)
        try:
            self.sock.connect(target)
        except OSError as err:
            self.sock.close()
            raise ConfigError(f"cannot connect to {address}: {err.strerror or err}") from err
        self.buffer = bytearray()

    def _fill(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError as err:
            raise ConfigError(f"{self.address}: no answer within {TIMEOUT:.0f} s") from err
        except OSError as err:
            raise ConfigError(f"{self.address}: {err.strerror or err}") from err
        if not data:
            raise EOFError
        self.buffer += data
        if len(self.buffer) > _MAX_REPLY:
            raise ConfigError(f"{self.address}: a reply longer than {_MAX_REPLY >> 20} MiB")

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            self._fill()
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.rstrip(b"\r")

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        text, _, rest = bytes(self.buffer).partition(marker)
        self.buffer = bytearray(rest)
        return text

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as err:
            raise ConfigError(f"{self.address}: {err.strerror or err}") from err

    def close(self) -> None:
        self.sock.close()


class QmpSession:
    """A negotiated QMP connection: :meth:`execute` one command at a time (events skipped)."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self._next_id = 0
        reply = self._call("qmp_capabilities", {})
        if "error" in reply:
            raise ConfigError(f"{connection.address}: capabilities negotiation failed: "
                              f"{reply['error'].get('desc')}")

    def _call(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        msg_id = f"pyvmm-monitor-{self._next_id}"
        message: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            message["arguments"] = arguments
        self.connection.send(json.dumps(message).encode() + b"\n")
        while True:
            try:
                reply = json.loads(self.connection.line())
            except ValueError as err:
                raise ConfigError(f"{self.connection.address}: not a QMP reply: {err}") from err
            if isinstance(reply, dict) and reply.get("id") == msg_id:
                return reply
            # events, and replies to nobody (a parse error's): not ours

    def execute(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The reply: ``{"return": ...}`` or ``{"error": {"class", "desc"}}``."""
        return self._call(command, arguments)


def _open(text: str) -> tuple[_Connection, QmpSession | None]:
    """Connect; a QMP server's greeting makes a negotiated session, an HMP banner none."""
    connection = _Connection(parse_address(text, "monitor"))
    try:
        first = connection.line()
    except EOFError as err:
        connection.close()
        raise ConfigError(f"{connection.address} closed the connection at once (too many "
                          f"clients?)") from err
    try:
        greeting = json.loads(first)
    except ValueError:
        greeting = None
    if isinstance(greeting, dict) and "QMP" in greeting:
        return connection, QmpSession(connection)
    connection.until(_HMP_PROMPT)  # the banner's prompt
    return connection, None


def run_qmp(address: str, command: str, arguments_text: str | None) -> int:
    """One QMP command; its reply printed.  Exit status 0 on ``return``, 1 on ``error``."""
    try:
        arguments = json.loads(arguments_text) if arguments_text else {}
    except ValueError as err:
        raise ConfigError(f"the arguments of {command} are not JSON: {err}") from err
    if not isinstance(arguments, dict):
        raise ConfigError(f"the arguments of {command} must be a JSON object, not "
                          f"{arguments_text}")
    connection, session = _open(address)
    try:
        if session is None:
            raise ConfigError(f"{address} is an HMP monitor, not QMP: leave out --qmp")
        try:
            reply = session.execute(command, arguments)
        except EOFError:
            if command == "quit":
                reply = {"return": {}}  # the server went before its reply reached us
            else:
                raise ConfigError(f"{address} closed the connection") from None
    finally:
        connection.close()
    if "error" in reply:
        error = reply["error"]
        print(f"pyvmm: error: {error.get('class')}: {error.get('desc')}", file=sys.stderr)
        return 1
    print(json.dumps(reply.get("return"), indent=2))
    return 0


def run_hmp(address: str) -> int:
    """An HMP session until end of input, ``quit``, or the server's end."""
    connection, session = _open(address)
    tty = os.isatty(0)
    if tty:
        try:
            import readline  # noqa: F401 - input() gains line editing and history
        except ImportError:
            pass
    try:
        while True:
            try:
                line = input("(pyvmm) ") if tty else sys.stdin.readline()
            except EOFError:
                return 0
            if not tty and not line:
                return 0
            text = line.strip()
            if not text:
                continue
            try:
                output = _hmp_command(connection, session, text)
            except EOFError:
                if text.split()[0] in ("quit", "q"):
                    return 0
                raise ConfigError(f"{address} closed the connection") from None
            sys.stdout.write(output.replace("\r\n", "\n"))
            sys.stdout.flush()
            if text.split()[0] in ("quit", "q"):
                return 0
    finally:
        connection.close()


def _hmp_command(connection: _Connection, session: QmpSession | None, text: str) -> str:
    if session is None:
        connection.send(text.encode() + b"\n")
        return connection.until(_HMP_PROMPT).decode("utf-8", "replace")
    reply = session.execute("human-monitor-command", {"command-line": text})
    if "error" in reply:
        return f"Error: {reply['error'].get('desc')}\n"
    result = reply.get("return")
    return result if isinstance(result, str) else json.dumps(result) + "\n"


def main(address: str, qmp_command: str | None, arguments: str | None) -> int:
    """``pyvmm monitor``; the exit status."""
    if arguments is not None and qmp_command is None:
        raise ConfigError("JSON arguments go with --qmp CMD")
    if qmp_command is not None:
        return run_qmp(address, qmp_command, arguments)
    return run_hmp(address)
