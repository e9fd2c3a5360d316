"""Asynchronous monitor events: QEMU's QMP event shape, fanned out to subscribers.

An event is a name (``STOP``, ``RESUME``, ``SHUTDOWN``, ``MIGRATION``, ``CHECKPOINT``, ``RELOAD``)
with a JSON-able ``data`` dict and the host time it happened.  :meth:`EventBus.emit` may be called
from any thread, the vCPU's included (a run-state change), and never blocks: subscribers must
return at once (the QMP server hands the event to its own loop; a slow client is its problem,
never the guest's).  A subscriber that raises is dropped, so one broken listener cannot stop the
others.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]
    seconds: int
    microseconds: int

    def as_qmp(self) -> dict[str, Any]:
        """The event as a QMP message: ``{"event", "data", "timestamp"}``."""
        message: dict[str, Any] = {"event": self.name}
        if self.data:
            message["data"] = self.data
        message["timestamp"] = {"seconds": self.seconds, "microseconds": self.microseconds}
        return message


Subscriber = Callable[[Event], None]


class EventBus:
    """Subscribers, and :meth:`emit` to all of them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        now = time.time_ns() // 1000
        event = Event(name, dict(data or {}), now // 1_000_000, now % 1_000_000)
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception:  # noqa: BLE001 - a broken listener must not stop the others
                self.unsubscribe(subscriber)
        return event
