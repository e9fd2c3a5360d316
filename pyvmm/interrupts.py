"""Holding SIGINT and SIGTERM back from code that must not be cut in two.

Python runs signal handlers in the main thread, between any two bytecodes: a Ctrl-C can raise
``KeyboardInterrupt`` after a header is on disk but before the code that wrote it has recorded
so, and cleanup that trusts the record then cuts the file below what the header points to.
:func:`signals_held` closes that window: inside it, SIGINT and SIGTERM are only noted; on the
way out the handlers that were in force get them, in order, as if they had just arrived.

It acts only in the main thread (no other thread ever sees a Python signal handler run) and
restores every handler it replaced, whatever happens inside.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Notice = Callable[[int], None]


@contextmanager
def signals_held(on_signal: Notice | None = None) -> Iterator[list[int]]:
    """Note SIGINT/SIGTERM instead of acting on them until the block ends; then deliver them.

    Yields the list of signal numbers noted so far (the block may look at it).  ``on_signal``
    is called with each signal number as it arrives (e.g. to say on stderr that the work in
    flight is being finished first).  Nested uses are fine: the inner block hands its signals to
    the outer one's recorder.  Outside the main thread this holds nothing back and yields an
    empty list.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def note(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)
        if on_signal is not None:
            on_signal(signum)

    previous: dict[int, Any] = {}
    try:
        for held in HELD_SIGNALS:
            previous[int(held)] = signal.signal(held, note)
        yield caught
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        _deliver(caught, previous)


def _deliver(caught: list[int], previous: dict[int, Any]) -> None:
    """Give each noted signal to the handler that was in force (the first one that raises ends
    the delivery: what it raises is what the interrupted code would have seen)."""
    for signum in caught:
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL or handler is None:
            os.kill(os.getpid(), signum)  # the default action (termination), now
        # SIG_IGN: nothing
