"""The guest-inform channel, both ways: the guest's own requests carried out, host listeners told.

Guest to host: a request the guest writes to its guest-inform device (a checkpoint, a reload of
the first N increments of the current checkpoint file, quit; see
:mod:`pyvmm.devices.guest_inform`) is carried out through the :class:`~.controller.VmController`
and answered in the device's REQUEST_STATUS / REQUEST_RESULT registers, which the guest polls.
Every machine the controller runs is served, the ones a reload swaps in too.

Host listeners (``--guest-inform unix:PATH``): programs that connect to the socket speak the
original's one-letter protocol.  They are told, every one of them:

  ``c``                a checkpoint starts
  ``C``                it is committed
  ``R<n>\\n``           the machine was reloaded from the first n increments of its file
  ``!<text>\\n``        an error: a checkpoint that failed or was cancelled (after its ``c``),
                       or, to the listener that sent it, a request that failed or is unknown
  ``#<text>\\n``        the help text (the answer to ``h``)

and may send ``c`` (checkpoint now, into the current checkpoint file, else the VM's default
destination), ``r`` (reload all increments of the current checkpoint file), ``r<n>`` (its first n:
the digits end at the first other byte or at the end of the write), ``q`` (quit), ``h`` (help);
newlines, carriage returns and spaces are ignored; any other byte gets one ``!`` line back and
the connection stays.  The original sent ``R`` and one digit; the newline lets n grow past 9.

Threads.  Guest requests and listeners' commands are carried out one at a time, in order, on
the worker thread ``pyvmm-inform`` (a checkpoint pauses the vCPU: never on the vCPU thread,
where the device's write hook runs).  The sockets are served by ``pyvmm-inform-io``, which never
waits on a listener: what a listener is owed goes out without blocking, and one that lets more
than :data:`MAX_PENDING` bytes pile up (it does not read) is dropped, so it never holds the
guest, a checkpoint or the other listeners.  At most :data:`MAX_LISTENERS` connections, and
:data:`MAX_QUEUED` listener commands waiting (more are refused with a ``!`` line).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import selectors
import socket
import stat
import threading
from collections.abc import Callable

from ..devices.guest_inform import (
    ERR_FAILED,
    ERR_INTERRUPTED,
    ERR_NO_FILE,
    ERR_NO_HOST,
    GuestInform,
    GuestRequest,
    RequestCode,
)
from ..errors import PyvmmError
from ..machine import Machine
from ..threads import NamedThread
from .controller import VmController
from .events import Event
from .sockets import SocketAddress, listen

MAX_LISTENERS = 64
MAX_PENDING = 64 << 10  # bytes owed to one listener before it counts as not reading
MAX_QUEUED = 16  # listener commands waiting for the worker
_MAX_DIGITS = 9  # of r<n>: n < 10**9 (a file holds far fewer increments)
_IGNORED = frozenset(b"\r\n \t")

HELP = (
    b"#pyvmm guest-inform: send c (checkpoint now), r (reload the current checkpoint file),\n"
    b"#  r<n> (reload its first n increments), q (quit), h (this help).\n"
    b"#told: c (a checkpoint starts), C (it is committed), R<n> and a newline (reloaded the\n"
    b"#  first n increments), ! and a line (an error), # and a line (this help).\n"
)


@dataclasses.dataclass(frozen=True)
class _GuestJob:
    device: GuestInform
    request: GuestRequest


@dataclasses.dataclass(frozen=True)
class _ListenerJob:
    listener: _Listener
    command: str  # "c", "r", "q"
    count: int = 0  # r<n>: n (0: all increments)


_Job = _GuestJob | _ListenerJob | None  # None: the worker ends


class _Listener:
    """One connection (pyvmm-inform-io's own): what it is owed, not yet sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.outbox = bytearray()
        self.closed = False


Outgoing = tuple[_Listener | None, bytes | Callable[[], bytes]]  # None: every listener


class GuestInformService:
    """The guest-inform channel of one controller; see the module docstring.  Made by
    :func:`start_guest_inform`; :meth:`close` ends it."""

    def __init__(self, vm: VmController, sock: socket.socket | None = None,
                 address: SocketAddress | None = None) -> None:
        self.vm = vm
        self._sock = sock
        self._address = address
        self._socket_id: tuple[int, int] | None = None
        if sock is not None and address is not None and address.kind == "unix":
            info = os.stat(address.path)
            self._socket_id = (info.st_dev, info.st_ino)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._outgoing: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # listener jobs in self._jobs
        self._announced = False  # a 'c' was sent for the checkpoint under way
        self._closing = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._listeners: set[_Listener] = set()
        self._worker = NamedThread(target=self._work, name="pyvmm-inform", daemon=True)
        self._io = NamedThread(target=self._serve, name="pyvmm-inform-io", daemon=True)

    def start(self) -> GuestInformService:
        self._worker.start()
        self._io.start()
        self.vm.events.subscribe(self._on_event)
        self.vm.add_machine_listener(self._hook)
        return self

    def close(self) -> None:
        """End the channel: requests not carried out yet fail (the guest's with ERR_NO_HOST),
        listeners get what they are owed if they take it at once, the socket is removed."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self.vm.events.unsubscribe(self._on_event)
        machine = self.vm.machine
        if machine is not None:
            machine.guest_inform.on_request = None  # later requests fail at once
        self._jobs.put(None)
        if self._worker.is_alive():
            self._worker.join()
        self._wake()
        if self._io.is_alive():
            self._io.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._sock is not None:
            self._sock.close()
            self._remove_socket()

    def _remove_socket(self) -> None:
        # only the socket this service made: never a file someone put there since
        if self._address is None or self._socket_id is None:
            return
        try:
            info = os.lstat(self._address.path)
            if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == self._socket_id:
                os.unlink(self._address.path)
        except OSError:
            pass

    # ------------------------------------------------------------------ the guest's requests
    def _hook(self, machine: Machine) -> None:
        """Every machine the controller runs: serve its device's requests."""
        if self._closing:
            return
        device = machine.guest_inform

        def on_request(request: GuestRequest) -> None:  # vCPU thread: never blocks
            self._jobs.put(_GuestJob(device, request))

        device.on_request = on_request

    def _work(self) -> None:
        """pyvmm-inform: carry out the jobs one at a time."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, _GuestJob):
                if self._closing:
                    job.device.answer(job.request, False, ERR_NO_HOST)
                else:
                    self._serve_guest(job.device, job.request)
                continue
            with self._lock:
                self._queued -= 1
            if not self._closing:
                self._serve_listener(job)

    def _serve_guest(self, device: GuestInform, request: GuestRequest) -> None:
        vm = self.vm
        machine = vm.machine
        if machine is None or machine.guest_inform is not device:
            # its machine was replaced (a reload) before we came to it: acting now would act
            # on another guest
            device.answer(request, False, ERR_INTERRUPTED)
            return
        if request.code is RequestCode.CHECKPOINT:
            if not device.is_pending(request):
                return  # a checkpoint taken meanwhile answered it
            try:
                stats = vm.checkpoint()
            except PyvmmError:
                device.answer(request, False, ERR_FAILED)  # listeners saw '!' if it started
                return
            device.answer(request, True, stats.increment)
        elif request.code is RequestCode.RELOAD:
            path = vm.checkpoint_file()
            if path is None:
                device.answer(request, False, ERR_NO_FILE)
                return
            try:
                loaded = vm.reload(_reload_uri(path, request.argument))
            except PyvmmError:
                device.answer(request, False, ERR_FAILED)
                return
            # the guest that asked is gone with its machine; its device is answered all the same
            device.answer(request, True, loaded)
        else:
            # answered first: a checkpoint at the run's end then holds a guest whose quit is done
            device.answer(request, True, 0)
            vm.quit()

    # ------------------------------------------------------------------ listeners' commands
    def _serve_listener(self, job: _ListenerJob) -> None:
        vm = self.vm
        try:
            if job.command == "c":
                vm.checkpoint()
            elif job.command == "r":
                path = vm.checkpoint_file()
                if path is None:
                    raise PyvmmError("no checkpoint file to reload from (take a checkpoint "
                                     "first)")
                vm.reload(_reload_uri(path, job.count))
            else:
                vm.quit()
        except PyvmmError as err:
            request = job.command + (str(job.count) if job.count else "")
            self._send(job.listener, _line("!", f"{request}: {err}"))

    def _submit(self, listener: _Listener, command: str, count: int = 0) -> None:
        """pyvmm-inform-io: queue a listener's command for the worker (or refuse it)."""
        with self._lock:
            if self._queued >= MAX_QUEUED:
                refused = True
            else:
                refused = False
                self._queued += 1
        if refused:
            self._queue_out(listener, _line("!", f"{command}: {MAX_QUEUED} requests are "
                                                 f"waiting already; try again later"))
            return
        self._jobs.put(_ListenerJob(listener, command, count))

    # ------------------------------------------------------------------ events -> listeners
    def _on_event(self, event: Event) -> None:
        """Any thread: never blocks (the socket thread sends)."""
        if event.name == "MIGRATION":
            status = event.data.get("status")
            with self._lock:
                # a reload into an empty controller (migrate-incoming) has a MIGRATION too
                if status == "setup" and self.vm.machine is not None:
                    self._announced = True
                    message: bytes | Callable[[], bytes] | None = b"c"
                elif status in ("failed", "cancelled") and self._announced:
                    self._announced = False
                    message = self._failure_line
                else:
                    message = None
            if message is not None:
                self._send(None, message)
        elif event.name == "CHECKPOINT":
            with self._lock:
                self._announced = False
            self._send(None, b"C")
        elif event.name == "RELOAD":
            self._send(None, f"R{int(event.data.get('increments', 0))}\n".encode())

    def _failure_line(self) -> bytes:
        reply = self.vm.query_migrate()
        status = reply.get("status", "failed")
        if status == "cancelled":
            return _line("!", "checkpoint cancelled")
        return _line("!", f"checkpoint failed: {reply.get('error-desc', 'unknown error')}")

    # ------------------------------------------------------------------ the socket thread
    def _send(self, listener: _Listener | None, message: bytes | Callable[[], bytes]) -> None:
        """Any thread: owe ``message`` to ``listener`` (None: to all)."""
        self._outgoing.put((listener, message))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending anyway
        except OSError:
            pass  # closed: the service has ended

    def _serve(self) -> None:
        """pyvmm-inform-io: accept, read, send; until close()."""
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        if self._sock is not None:
            self._sock.setblocking(False)
            selector.register(self._sock, selectors.EVENT_READ, None)
        try:
            while True:
                for key, mask in selector.select():
                    if key.fileobj == self._wake_r:
                        _drain(self._wake_r)
                    elif key.fileobj is self._sock:
                        self._accept(selector)
                    else:
                        listener = key.data
                        assert isinstance(listener, _Listener)
                        if mask & selectors.EVENT_READ:
                            self._read(selector, listener)
                        if mask & selectors.EVENT_WRITE and not listener.closed:
                            self._flush(selector, listener)
                self._deliver(selector)
                with self._lock:
                    ending = self._closing and not self._worker.is_alive()
                if ending:
                    return
        finally:
            for listener in list(self._listeners):
                self._flush(selector, listener)  # what it can take at once (a quit's 'C')
                self._drop(selector, listener)
            selector.close()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        assert self._sock is not None
        try:
            sock, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # out of descriptors, a connection reset before accept: the next may do
        if len(self._listeners) >= MAX_LISTENERS:
            sock.close()
            return
        sock.setblocking(False)
        listener = _Listener(sock)
        self._listeners.add(listener)
        selector.register(sock, selectors.EVENT_READ, listener)

    def _read(self, selector: selectors.BaseSelector, listener: _Listener) -> None:
        try:
            data = listener.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(selector, listener)
            return
        at = 0
        while at < len(data):
            byte = data[at]
            at += 1
            if byte in _IGNORED:
                continue
            if byte in b"cq":
                self._submit(listener, chr(byte))
            elif byte == ord("h"):
                self._queue_out(listener, HELP)
            elif byte == ord("r"):
                end = at
                while end < len(data) and data[end:end + 1].isdigit():
                    end += 1
                digits, at = data[at:end], end
                if len(digits) > _MAX_DIGITS:
                    self._queue_out(listener, _line("!", f"r{digits[:12].decode()}...: no "
                                                         f"file holds that many increments"))
                    continue
                self._submit(listener, "r", int(digits) if digits else 0)
            else:
                shown = chr(byte) if 0x20 < byte < 0x7F else f"\\x{byte:02x}"
                self._queue_out(listener, _line("!", f"unknown request '{shown}' (h: help)"))
        self._flush(selector, listener)

    def _deliver(self, selector: selectors.BaseSelector) -> None:
        """What other threads owe listeners, queued and sent."""
        touched: set[_Listener] = set()
        while True:
            try:
                target, message = self._outgoing.get_nowait()
            except queue.Empty:
                break
            data = message() if callable(message) else message
            for listener in ([target] if target is not None else list(self._listeners)):
                if not listener.closed:
                    listener.outbox += data
                    touched.add(listener)
        for listener in touched:
            self._flush(selector, listener)

    def _queue_out(self, listener: _Listener, data: bytes) -> None:
        if not listener.closed:
            listener.outbox += data

    def _flush(self, selector: selectors.BaseSelector, listener: _Listener) -> None:
        """Send what ``listener`` is owed without waiting; drop it if it does not read."""
        if listener.closed:
            return
        try:
            while listener.outbox:
                sent = listener.sock.send(listener.outbox)
                del listener.outbox[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(selector, listener)
            return
        if len(listener.outbox) > MAX_PENDING:
            self._drop(selector, listener)  # it does not read: it costs us no more
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if listener.outbox else 0)
        selector.modify(listener.sock, events, listener)

    def _drop(self, selector: selectors.BaseSelector, listener: _Listener) -> None:
        if listener.closed:
            return
        listener.closed = True
        self._listeners.discard(listener)
        try:
            selector.unregister(listener.sock)
        except (KeyError, ValueError):
            pass
        listener.sock.close()


def start_guest_inform(vm: VmController, address: SocketAddress | None) -> GuestInformService:
    """Serve the guest's requests of every machine ``vm`` runs and, when ``address`` is given
    (``unix:PATH``, made mode 0600; a live or foreign file there is refused with a
    ConfigError), listeners on it.  ``close()`` the result at the end of the run."""
    sock = listen(address, "--guest-inform") if address is not None else None
    try:
        return GuestInformService(vm, sock, address).start()
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def _reload_uri(path: str, count: int) -> str:
    # absolute: a relative name such as "3:x" would read as a count
    where = os.path.abspath(path)
    return f"chpt:{count}:{where}" if count else f"chpt:{where}"


def _line(mark: str, text: str) -> bytes:
    return (mark + " ".join(text.split()) + "\n").encode("utf-8", "replace")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
