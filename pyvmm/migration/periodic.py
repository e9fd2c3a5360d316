"""Periodic checkpoints: a timer thread that checkpoints a running machine every PERIOD seconds.

As in the original QEMU fork, the period runs from the end of one checkpoint to the start of the
next (a slow checkpoint never piles up behind itself).  A period of 0 stops the timer.  A failed
checkpoint stops the timer too and is kept in :attr:`PeriodicCheckpointer.error` (the
checkpointer has already made sure nothing was lost: the next checkpoint, e.g. at the end of the
run, still saves every page dirtied since the last good one).  After ``max_checkpoints``
checkpoints the timer stops and ``on_limit`` is called (the CLI ends the run there).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from ..errors import ConfigError, PyvmmError
from ..threads import NamedThread
from .checkpoint import CheckpointStats


class SupportsCheckpoint(Protocol):
    """What the timer drives: a Checkpointer, or a VM controller's checkpoint into one file."""

    def checkpoint(self) -> CheckpointStats: ...


class PeriodicCheckpointer:
    """Drives ``checkpointer`` from its own thread; see the module docstring."""

    def __init__(self, checkpointer: SupportsCheckpoint, period: float, *,
                 max_checkpoints: int | None = None,
                 on_checkpoint: Callable[[CheckpointStats], None] | None = None,
                 on_limit: Callable[[], None] | None = None,
                 before_checkpoint: Callable[[], None] | None = None) -> None:
        check_period(period)
        if max_checkpoints is not None and max_checkpoints < 1:
            raise ConfigError(f"--max-checkpoints must be at least 1, not {max_checkpoints}")
        self.checkpointer = checkpointer
        self.max_checkpoints = max_checkpoints
        self.on_checkpoint = on_checkpoint
        self.on_limit = on_limit
        self.before_checkpoint = before_checkpoint
        self.count = 0
        self.error: PyvmmError | None = None
        self._period = period
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = NamedThread(target=self._loop, name="pyvmm-periodic", daemon=True)

    @property
    def period(self) -> float:
        return self._period

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> PeriodicCheckpointer:
        if self._period > 0:
            self._thread.start()
        return self

    def set_period(self, period: float) -> None:
        """Change the period (it takes effect at once: the wait restarts); 0 stops the timer."""
        check_period(period)
        with self._changed:
            self._period = period
            if period == 0:
                self._stopped = True
            self._changed.notify_all()

    def limit_reached(self) -> bool:
        return self.max_checkpoints is not None and self.count >= self.max_checkpoints

    def stop(self) -> None:
        """Stop the timer and wait for a checkpoint in progress to end."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _wait(self) -> bool:
        """Wait one period; False when stopped meanwhile."""
        with self._changed:
            while not self._stopped:
                period = self._period
                if not self._changed.wait(timeout=period):
                    return not self._stopped
                # woken: stopped, or a new period (wait the new one from now)
            return False

    def _loop(self) -> None:
        while self._wait():
            if self.before_checkpoint is not None:
                self.before_checkpoint()
            try:
                stats = self.checkpointer.checkpoint()
            except PyvmmError as err:
                self.error = err
                return
            except OSError as err:  # the checkpointer names its errors; this is a last resort
                self.error = PyvmmError(f"checkpoint failed: {err}")
                return
            self.count += 1
            if self.on_checkpoint is not None:
                self.on_checkpoint(stats)
            if self.limit_reached():
                if self.on_limit is not None:
                    self.on_limit()
                return


def check_period(period: float) -> float:
    if not period >= 0 or period == float("inf"):
        raise ConfigError(f"--period must be a number of seconds >= 0, not {period}")
    return period
