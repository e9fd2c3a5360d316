"""Monitor socket addresses (``unix:PATH``, ``tcp:HOST:PORT``) and listening on them safely.

Light on purpose (no asyncio, no JSON): every run may serve the guest-inform channel, and a run
that serves no socket must start fast (benchmarks/bench_startup.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import stat

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SocketAddress:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (QEMU's ``,server=on,wait=off`` options ignored)."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_address(text: str, option: str) -> SocketAddress:
    """ConfigError naming ``option`` for anything but ``unix:PATH`` / ``tcp:HOST:PORT``."""
    spec = text.split(",", 1)[0]
    if spec.startswith("unix:") and len(spec) > 5:
        return SocketAddress("unix", path=os.path.abspath(spec[5:]))
    if spec.startswith("tcp:"):
        host, sep, port = spec[4:].rpartition(":")
        if sep and port.isdigit() and 0 < int(port) < 65536:
            return SocketAddress("tcp", host=host.strip("[]") or "127.0.0.1", port=int(port))
    raise ConfigError(f"{option} {text}: expected unix:PATH or tcp:HOST:PORT")


def listen(address: SocketAddress, option: str) -> socket.socket:
    """A listening socket at ``address``: a unix socket made 0600 before it listens (a stale
    one left by a killed pyvmm is replaced; a live one or any other file is refused)."""
    if address.kind == "tcp":
        try:
            sock = socket.create_server((address.host, address.port), reuse_port=False)
        except OSError as err:
            raise ConfigError(f"{option} {address}: {err.strerror}") from err
        return sock
    path = address.path
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISSOCK(info.st_mode):
            raise ConfigError(f"{option} {address}: the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            raise ConfigError(f"{option} {address}: another process is listening there")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens
        finally:
            probe.close()
    # made under a temporary name, 0600 and listening, then renamed into place: nobody can
    # connect before the mode is set, and whoever sees the path can connect at once
    aside = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        sock.bind(aside)
        os.chmod(aside, 0o600)
        sock.listen(64)
        os.rename(aside, path)
    except OSError as err:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(aside)
        raise ConfigError(f"{option} {address}: {err.strerror}") from err
    return sock
