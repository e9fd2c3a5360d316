"""The guest-inform device: the guest sees how checkpointing of it goes, and asks for its own.

Register map (32-bit registers, little-endian; offsets from GUEST_INFORM_BASE; other offsets
read 0 and ignore writes):

  0x00 MAGIC            RO  0x50564749 ("PVGI")
  0x04 VERSION          RO  2 (1: the request registers 0x1c..0x24 are not there)
  0x08 CHECKPOINT_COUNT RO  checkpoints completed since power-on (survives save/reload)
  0x0c CHECKPOINT_STATE RO  0 none yet, 1 in progress, 2 completed, 3 failed
  0x10 RESTORE_COUNT    RO  how many times this machine's state was reloaded from a checkpoint
  0x14 REQUEST          RW  writing a request code asks the host for it: 1 checkpoint, 2 reload,
                            3 quit (any other value fails at once, ERR_UNKNOWN_REQUEST).  A write
                            while a request is pending is ignored; reads return the last value
                            written while none was
  0x18 REQUEST_COUNT    RO  number of writes to REQUEST (ignored ones too)
  0x1c REQUEST_ARG      RW  the argument of the next request: for a reload, how many increments
                            of the current checkpoint file to load (0: all of them)
  0x20 REQUEST_STATUS   RO  0 idle (no request yet), 1 pending, 2 done, 3 failed
  0x24 REQUEST_RESULT   RO  0 while pending.  Done: a checkpoint's increment index in its file
                            (0xffffffff when the host could not tell), the number of increments
                            a reload loaded, 0 for quit.  Failed: an error code, ERR_* below

A guest writes REQUEST_ARG (if the request takes one), then REQUEST, then polls REQUEST_STATUS
until it is no longer 1.  The write makes the request pending at once, on the vCPU thread, and
hands it to the host (``on_request``: the monitor's guest-inform service, which carries it out on
a thread of its own); with nobody to serve it the request fails at once (ERR_NO_HOST).

A checkpoint answers a pending checkpoint request (whoever started it): the state it saves
already says *done* with the new increment's index, so a guest reloaded from it goes on from its
poll; the running guest sees *done* only once the increment is committed (*failed* if it is not).
A request still pending in a saved state (a reload or quit caught by another checkpoint) fails
with ERR_INTERRUPTED when that state is reloaded: nobody carries it out any more.

State: vmstate ``guest-inform`` version 1, as before the request registers; those travel in
the subsection ``guest-inform/request``, sent only once a request was made, so older files load
(their request registers idle) and a guest that never asks saves the bytes it always did.

Threads: ``read``/``write`` run on the vCPU thread; :meth:`GuestInform.checkpoint_started` and
the vmstate hooks on the checkpointing thread while the vCPU is paused;
:meth:`~GuestInform.checkpoint_finished` and :meth:`~GuestInform.answer` on host threads while it
may run.  A lock keeps a request's answer whole against them.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Callable

from ..errors import FormatError
from ..migration.vmstate import VMStateDescription, uint32
from .base import MmioDevice

GUEST_INFORM_BASE = 0x090F_0000
GUEST_INFORM_SIZE = 0x1000
MAGIC = 0x5056_4749
VERSION = 2

MAGIC_REG, VERSION_REG, CHECKPOINT_COUNT_REG, CHECKPOINT_STATE_REG = 0x00, 0x04, 0x08, 0x0C
RESTORE_COUNT_REG, REQUEST_REG, REQUEST_COUNT_REG = 0x10, 0x14, 0x18
REQUEST_ARG_REG, REQUEST_STATUS_REG, REQUEST_RESULT_REG = 0x1C, 0x20, 0x24

#: REQUEST_RESULT of a checkpoint request answered by a checkpoint whose index nobody told us
RESULT_UNKNOWN = 0xFFFF_FFFF
#: REQUEST_RESULT of a failed request
ERR_UNKNOWN_REQUEST = 1  # REQUEST held no request code
ERR_NO_HOST = 2  # nobody serves requests (no monitor, or the run is ending)
ERR_FAILED = 3  # the host tried: the checkpoint or reload failed, was cancelled or refused
ERR_INTERRUPTED = 4  # pending in a saved state that was reloaded
ERR_NO_FILE = 5  # a reload with no checkpoint file to reload from


class CheckpointStatus(enum.IntEnum):
    NONE = 0
    IN_PROGRESS = 1
    COMPLETED = 2
    FAILED = 3


class RequestCode(enum.IntEnum):
    """What the guest writes to REQUEST."""

    CHECKPOINT = 1
    RELOAD = 2
    QUIT = 3


class RequestStatus(enum.IntEnum):
    """REQUEST_STATUS."""

    IDLE = 0
    PENDING = 1
    DONE = 2
    FAILED = 3


_CODES = frozenset(int(code) for code in RequestCode)
_STATUSES = frozenset(int(status) for status in RequestStatus)


@dataclasses.dataclass(frozen=True)
class GuestRequest:
    """One accepted request, as handed to ``on_request``: ``sequence`` tells it from the
    device's later ones (host-side: not migrated)."""

    code: RequestCode
    argument: int
    sequence: int


@dataclasses.dataclass
class GuestInformState:
    """The migrated state (the fields of :data:`VMSTATE_GUEST_INFORM`), plus
    ``checkpoint_answer``: host-side, never migrated — the REQUEST_RESULT the checkpoint in
    progress gives the pending checkpoint request (None: it answers none)."""

    checkpoint_count: int = 0
    checkpoint_status: int = CheckpointStatus.NONE
    restore_count: int = 0
    request: int = 0
    request_count: int = 0
    request_argument: int = 0
    request_status: int = RequestStatus.IDLE
    request_result: int = 0
    checkpoint_answer: int | None = dataclasses.field(default=None, compare=False)


def _request_needed(state: GuestInformState) -> bool:
    return bool(state.request_status or state.request_argument or state.request_result)


def _clear_request(state: GuestInformState) -> None:
    # a stream without the subsection means an idle request: fields left from an earlier
    # increment of the chain, or from before the load, must not survive it
    state.request_argument = 0
    state.request_status = RequestStatus.IDLE
    state.request_result = 0


def _check_request(state: GuestInformState, version_id: int) -> None:
    if state.request_status not in _STATUSES:
        raise FormatError(f"request status {state.request_status} is not one of "
                          f"0..{max(_STATUSES)}", section="guest-inform")


def _show_answer(state: GuestInformState) -> None:
    """pre_save: the saved state has the pending checkpoint request done."""
    if state.checkpoint_answer is not None and state.request_status == RequestStatus.PENDING:
        state.request_status = RequestStatus.DONE
        state.request_result = state.checkpoint_answer


def _hide_answer(state: GuestInformState) -> None:
    """post_save: the running guest waits for the commit (checkpoint_finished)."""
    if state.checkpoint_answer is not None and state.request_status == RequestStatus.DONE \
            and state.request_result == state.checkpoint_answer:
        state.request_status = RequestStatus.PENDING
        state.request_result = 0


VMSTATE_GUEST_INFORM = VMStateDescription(
    "guest-inform", version_id=1, minimum_version_id=1,
    fields=[uint32("checkpoint_count"), uint32("checkpoint_status"), uint32("restore_count"),
            uint32("request"), uint32("request_count")],
    # the request registers of VERSION 2: a subsection, so that a machine that never asked
    # for anything writes the bytes of pyvmm versions before it, and their files load here
    subsections=[VMStateDescription(
        "guest-inform/request", 1, 1,
        [uint32("request_argument"), uint32("request_status"), uint32("request_result")],
        needed=_request_needed, post_load=_check_request)],
    pre_save=_show_answer, post_save=_hide_answer, pre_load=_clear_request,
)


class GuestInform(MmioDevice):
    """The device; the host updates it through :meth:`checkpoint_started` and friends, and
    serves its requests through ``on_request`` and :meth:`answer`."""

    name = "guest-inform"

    def __init__(self, base: int = GUEST_INFORM_BASE,
                 on_request: Callable[[GuestRequest], None] | None = None) -> None:
        self.base = base
        self.size = GUEST_INFORM_SIZE
        #: vCPU thread, must not block: hands an accepted request to the host
        self.on_request = on_request
        self.state = GuestInformState()
        self._lock = threading.Lock()
        self._sequence = 0  # of the last accepted request

    def reset(self) -> None:
        with self._lock:
            self.state = GuestInformState()

    # ------------------------------------------------------------------ the host's side
    def checkpoint_started(self, increment: int | None = None) -> None:
        """A checkpoint pauses the guest (checkpointing thread, vCPU paused); ``increment``:
        the index it will have in its file.  It answers a pending checkpoint request."""
        with self._lock:
            s = self.state
            s.checkpoint_status = CheckpointStatus.IN_PROGRESS
            if s.request_status == RequestStatus.PENDING and \
                    s.request == RequestCode.CHECKPOINT:
                s.checkpoint_answer = RESULT_UNKNOWN if increment is None else \
                    increment & 0xFFFF_FFFF

    def checkpoint_finished(self, ok: bool) -> None:
        """The checkpoint ended, committed (``ok``) or not."""
        with self._lock:
            s = self.state
            if ok:
                s.checkpoint_count += 1
            s.checkpoint_status = CheckpointStatus.COMPLETED if ok else CheckpointStatus.FAILED
            if s.checkpoint_answer is not None:
                if s.request_status == RequestStatus.PENDING:
                    s.request_result = s.checkpoint_answer if ok else ERR_FAILED
                    s.request_status = RequestStatus.DONE if ok else RequestStatus.FAILED
                s.checkpoint_answer = None

    def restored(self) -> None:
        """This machine's state was just loaded from a checkpoint (before it runs)."""
        with self._lock:
            s = self.state
            s.restore_count += 1
            s.checkpoint_answer = None
            if s.request_status == RequestStatus.PENDING:
                s.request_status, s.request_result = RequestStatus.FAILED, ERR_INTERRUPTED

    def is_pending(self, request: GuestRequest) -> bool:
        """``request`` is this device's pending one and no checkpoint is answering it now."""
        with self._lock:
            return self._pending(request) and self.state.checkpoint_answer is None

    def answer(self, request: GuestRequest, ok: bool, result: int = 0) -> None:
        """Any thread: the host is done with ``request`` (``result``: REQUEST_RESULT; for a
        failure an ERR_* code).  No-op unless it is still pending — except that the index of
        a checkpoint that answered it without knowing it (RESULT_UNKNOWN) is filled in."""
        with self._lock:
            s = self.state
            if self._pending(request):
                s.request_result = result & 0xFFFF_FFFF
                s.request_status = RequestStatus.DONE if ok else RequestStatus.FAILED
            elif ok and request.sequence == self._sequence and \
                    request.code is RequestCode.CHECKPOINT and \
                    s.request_status == RequestStatus.DONE and s.request_result == RESULT_UNKNOWN:
                s.request_result = result & 0xFFFF_FFFF

    def _pending(self, request: GuestRequest) -> bool:
        return request.sequence == self._sequence and \
            self.state.request_status == RequestStatus.PENDING

    # ------------------------------------------------------------------ the guest's side
    def read(self, offset: int, size: int) -> int:
        s = self.state
        return {
            MAGIC_REG: MAGIC,
            VERSION_REG: VERSION,
            CHECKPOINT_COUNT_REG: s.checkpoint_count,
            CHECKPOINT_STATE_REG: int(s.checkpoint_status),
            RESTORE_COUNT_REG: s.restore_count,
            REQUEST_REG: s.request,
            REQUEST_COUNT_REG: s.request_count,
            REQUEST_ARG_REG: s.request_argument,
            REQUEST_STATUS_REG: int(s.request_status),
            REQUEST_RESULT_REG: s.request_result,
        }.get(offset, 0) & 0xFFFF_FFFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFFFF_FFFF
        if offset == REQUEST_ARG_REG:
            self.state.request_argument = value
        elif offset == REQUEST_REG:
            self._request(value)

    def _request(self, value: int) -> None:
        with self._lock:
            s = self.state
            s.request_count = (s.request_count + 1) & 0xFFFF_FFFF
            if s.request_status == RequestStatus.PENDING:
                return  # one at a time: the guest polls REQUEST_STATUS first
            s.request = value
            self._sequence += 1
            if value not in _CODES:
                s.request_status, s.request_result = RequestStatus.FAILED, ERR_UNKNOWN_REQUEST
                return
            on_request = self.on_request
            if on_request is None:
                s.request_status, s.request_result = RequestStatus.FAILED, ERR_NO_HOST
                return
            s.request_status, s.request_result = RequestStatus.PENDING, 0
            request = GuestRequest(RequestCode(value), s.request_argument, self._sequence)
        on_request(request)  # outside the lock: the host may answer at once
