"""Threads the host can name: ``ps -L``, ``top -H`` and gdb show which one is busy.

Python names its threads for itself only; :class:`NamedThread` also gives the kernel the name
(``PR_SET_NAME``, first 15 bytes) as the thread starts.  The C threads name themselves the same
way (``pthread_setname_np``: pyvmm-wp, pyvmm-saver, pyvmm-lazy-*, pyvmm-reader).
"""

from __future__ import annotations

import ctypes
import threading

_PR_SET_NAME = 15


def name_this_thread(name: str) -> None:
    """Give the calling thread's kernel task ``name`` (truncated to 15 bytes; best effort)."""
    try:
        libc = ctypes.CDLL(None)  # the interpreter's own symbols: libc's prctl among them
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl to ask: the Python name is still there


class NamedThread(threading.Thread):
    """A :class:`threading.Thread` whose name the kernel knows too."""

    def run(self) -> None:
        name_this_thread(self.name)
        super().run()

