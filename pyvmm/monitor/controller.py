"""The VM controller: the one object that changes a running machine on a monitor's request.

QMP, HMP, the guest-inform channel and the command line all act through a
:class:`VmController`: stop, cont and quit; checkpoints (QEMU's ``migrate`` to ``chpt:FILE``,
once or every ``period`` seconds) and their cancellation; reloads into the running process
(``migrate-incoming`` after ``--incoming defer``, a guest's or listener's reload request);
migration capabilities and parameters; what ``query-migrate`` and ``query-status`` report.

Threads.  The main thread calls :meth:`VmController.run` and waits there while the guest runs;
a monitor's ``stop`` does not end that wait, its ``cont`` goes on, ``quit`` ends it.  Every other
method may be called from any thread but the vCPU's (the guest-inform device queues its requests
to a worker for that reason).  Checkpoints and reloads are serialised by one lock; queries never
take it, so they answer at once even while a checkpoint runs.  A reload builds a new machine and
swaps it in: :attr:`VmController.machine` is always the current one.

Errors are :class:`CommandError` (a PyvmmError) carrying QEMU's error class; the message is the
one line a monitor user sees.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PyvmmError
from ..interrupts import signals_held
from ..machine import Machine, RunResult, RunState, StopReason
from ..migration.defaults import (
    DEFAULT_STRATEGY,
    MIGRATION_CAPABILITIES,
)

if TYPE_CHECKING:  # the migration layer is loaded by the first checkpoint or reload only
    from ..migration.checkpoint import Checkpointer, CheckpointStats, CheckpointTarget
from ..threads import NamedThread
from .events import EventBus
from .migration_status import ACTIVE, MigrationStatus, stats_data
from .settings import PARAMETERS, MigrationSettings

OutputSink = Callable[[bytes], None]
MIGRATION_IN_PROGRESS = "There's a migration process in progress"
_ENDED = (RunState.SHUTDOWN, RunState.GUEST_PANICKED, RunState.INTERNAL_ERROR)


class CommandError(PyvmmError):
    """A monitor command failed; ``error_class`` is QEMU's (GenericError, CommandNotFound,
    DeviceNotActive, ...)."""

    def __init__(self, message: str, error_class: str = "GenericError") -> None:
        super().__init__(message)
        self.error_class = error_class


@dataclasses.dataclass(frozen=True)
class MachineSinks:
    """Where a machine built here (a reload) sends the guest's output."""

    uart: OutputSink | None = None
    stdout: OutputSink | None = None
    stderr: OutputSink | None = None


class VmController:
    """See the module docstring.  ``machine`` None: ``--incoming defer``, the machine comes
    from :meth:`migrate_incoming`."""

    def __init__(self, machine: Machine | None, *, settings: MigrationSettings | None = None,
                 sinks: MachineSinks = MachineSinks(), reload_strategy: str = DEFAULT_STRATEGY,
                 incoming_path: str | None = None, start_paused: bool = False,
                 before_ram_use: Callable[[], None] | None = None,
                 on_checkpoint: Callable[[str, CheckpointStats], None] | None = None) -> None:
        self.events = EventBus()
        self.settings = settings or MigrationSettings()
        self.settings.check()
        self._sinks = sinks
        self._strategy = reload_strategy
        self._before_ram_use = before_ram_use
        self._on_checkpoint = on_checkpoint
        self._cond = threading.Condition()
        self._work = threading.RLock()  # checkpoints, reloads: one at a time
        self._machine: Machine | None = None
        self._machine_listeners: list[Callable[[Machine], None]] = []
        self._checkpointer: Checkpointer | None = None
        self._checkpointer_settings: MigrationSettings | None = None
        #: chains this process writes or reloaded from: a new checkpointer grows them
        self._own_chains: set[str] = set()
        self._status = MigrationStatus()
        self._migrating = False  # a monitor's migrate (once or periodic) is under way
        self._migrate_thread: threading.Thread | None = None
        self._cancel = threading.Event()  # set: the checkpoint in flight commits nothing
        self._wake = threading.Event()  # set: a periodic migration takes no further checkpoint
        self._quit = False
        self._started = not start_paused
        self._deferred = machine is None
        if incoming_path:
            self._own_chains.add(os.path.realpath(incoming_path))
        if machine is not None:
            self._adopt(machine)

    # ------------------------------------------------------------------ machine and run state
    @property
    def machine(self) -> Machine | None:
        return self._machine

    @property
    def quit_requested(self) -> bool:
        return self._quit

    def add_machine_listener(self, listener: Callable[[Machine], None]) -> None:
        """Call ``listener(machine)`` for the current machine (if any) and every one swapped in
        later by a reload (e.g. to hook its guest-inform device)."""
        self._machine_listeners.append(listener)
        if self._machine is not None:
            listener(self._machine)

    def _adopt(self, machine: Machine) -> None:
        def on_state(old: RunState, new: RunState) -> None:
            if machine is not self._machine:
                return
            if new is RunState.RUNNING:
                self.events.emit("RESUME")
            elif old is RunState.RUNNING:
                self.events.emit("STOP")
            if new is RunState.SHUTDOWN and old is not RunState.SHUTDOWN:
                self.events.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
            with self._cond:
                self._cond.notify_all()

        machine.add_state_listener(on_state)
        with self._cond:
            self._machine = machine
            self._cond.notify_all()
        for listener in self._machine_listeners:
            listener(machine)

    def status(self) -> dict[str, Any]:
        """QMP ``query-status``."""
        machine = self._machine
        state = machine.settled_state() if machine is not None else RunState.INMIGRATE
        if machine is not None and not self._started and state is RunState.PAUSED:
            state = RunState.PRELAUNCH
        return {"status": state.value, "running": state is RunState.RUNNING,
                "singlestep": False}

    def stop(self) -> None:
        """QMP ``stop``: pause the guest (returns once it is stopped; the run goes on)."""
        machine = self._machine
        if machine is None or not self._started:
            self._started = False
            return
        if machine.state is RunState.RUNNING or machine.state is RunState.SAVE_VM:
            machine.pause()

    def cont(self) -> None:
        """QMP ``cont``: run a stopped guest again (waits for a checkpoint holding it)."""
        machine = self._machine
        with self._cond:
            if not self._started:
                self._started = True  # the run (or the incoming reload) starts the guest:
                self._cond.notify_all()  # cont returns once it runs, as QEMU's does
                deadline = time.monotonic() + 10
                while machine is not None and not self._quit and \
                        machine.state in (RunState.PRELAUNCH, RunState.PAUSED) and \
                        time.monotonic() < deadline:
                    self._cond.wait(0.05)
                return
        if machine is None:
            return
        if machine.state in _ENDED:
            raise CommandError(f"the guest has stopped for good ({machine.state.value}); it "
                               f"cannot continue")
        machine.resume()

    def quit(self) -> None:
        """QMP ``quit``: end the run (a checkpoint in flight is finished; periodic ones
        stop).  The main thread's :meth:`run` returns with reason QUIT."""
        self._end(announce=True)

    def end_run(self) -> None:
        """End the run as ``quit`` does, for a limit of the run's own (--max-checkpoints):
        no SHUTDOWN event, the guest paused with reason QUIT."""
        self._end(announce=False)

    def _end(self, *, announce: bool) -> None:
        with self._cond:
            if self._quit:
                return
            self._quit = True
            self._cond.notify_all()
        self._wake.set()
        if announce:
            self.events.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        machine = self._machine
        if machine is not None and machine.state in (RunState.RUNNING, RunState.SAVE_VM):
            machine.pause(reason=StopReason.QUIT)

    # ------------------------------------------------------------------ the main thread's run
    def wait_for_machine(self) -> Machine | None:
        """Main thread, ``--incoming defer``: wait until ``migrate-incoming`` has built the
        machine (returned), or ``quit`` (None).  Ctrl-C raises KeyboardInterrupt."""
        with self._cond:
            while self._machine is None and not self._quit:
                self._cond.wait(0.2)
            return None if self._quit else self._machine

    def run(self, *, max_insns: int | None = None, seconds: float | None = None) -> RunResult:
        """Main thread: run the guest until the run ends — the guest's end, a limit, Ctrl-C,
        ``quit`` (reason QUIT).  A monitor's ``stop`` is not an end: the run waits for
        ``cont``, on whichever machine is current then (a reload may have swapped it)."""
        machine = self._machine
        if machine is None:
            raise CommandError("no machine to run")
        try:
            with self._cond:
                while not self._started and not self._quit:
                    self._cond.wait(0.2)
            if self._quit:
                return self._quit_result(machine.last_result)
            if machine.state in _ENDED:
                return machine.last_result
            if machine.state is not RunState.RUNNING:  # (a reload may have started it)
                machine.start(max_insns=max_insns, seconds=seconds)
            if self._quit and machine.state is RunState.RUNNING:
                # a quit that came while the guest started found nothing running to stop
                machine.pause(reason=StopReason.QUIT)
            result = machine.wait_interruptible()
            while not self._quit and result.reason is StopReason.PAUSED:
                result = self._next_result()
        except KeyboardInterrupt:
            current = self._machine or machine
            while True:  # a second Ctrl-C while this pause lands asks for the same stop
                try:
                    with signals_held():
                        current.pause(reason=StopReason.INTERRUPTED)
                except KeyboardInterrupt:
                    continue
                return dataclasses.replace(current.last_result,
                                           reason=StopReason.INTERRUPTED)
        return self._quit_result(result) if self._quit else result

    @staticmethod
    def _quit_result(result: RunResult) -> RunResult:
        if result.reason in (StopReason.SHUTDOWN, StopReason.ERROR):
            return result
        return dataclasses.replace(result, reason=StopReason.QUIT)

    def _next_result(self) -> RunResult:
        """After a stop: wait till the current machine runs again (or the run is quit), then
        till it stops."""
        with self._cond:
            while True:
                machine = self._machine
                assert machine is not None
                if self._quit or machine.state in _ENDED:
                    return machine.last_result
                if machine.state in (RunState.RUNNING, RunState.SAVE_VM):
                    break
                self._cond.wait(0.2)
        return machine.wait_interruptible()

    # ------------------------------------------------------------------ checkpoints
    def capabilities(self) -> list[dict[str, Any]]:
        """QMP ``query-migrate-capabilities``."""
        return [{"capability": name, "state": self.settings.capabilities.get(name, False)}
                for name in MIGRATION_CAPABILITIES]

    def set_capabilities(self, changes: dict[str, bool]) -> None:
        with self._cond:
            if self._migrating or self._status.status in ACTIVE[:2]:
                raise CommandError(MIGRATION_IN_PROGRESS)
            new = dataclasses.replace(self.settings, capabilities={
                **self.settings.capabilities, **changes})
            _checked(new)
            self.settings = new

    def set_parameters(self, changes: dict[str, Any]) -> None:
        """QMP ``migrate-set-parameters`` (names as in :data:`PARAMETERS`, values checked)."""
        fields = {}
        for name, value in changes.items():
            field, _kind = PARAMETERS[name]
            if field in ("max_increments", "compress_level"):
                value = value or None  # 0: none / the encoder's default
            fields[field] = value
        with self._cond:
            if self._migrating or self._status.status in ACTIVE[:2]:
                raise CommandError(MIGRATION_IN_PROGRESS)
            new = dataclasses.replace(self.settings, **fields)
            _checked(new)
            self.settings = new

    def claim(self, path: str) -> None:
        """Open the checkpoint file ``path`` now (the ``--checkpoint`` target is checked and
        locked before the guest runs)."""
        with self._work:
            self._checkpointer_for(path)

    @property
    def checkpointer(self) -> Checkpointer | None:
        return self._checkpointer

    def checkpoint(self, path: str | None = None, *, cancel: threading.Event | None = None,
                   ending: Callable[[str], None] | None = None) -> CheckpointStats:
        """Take one checkpoint into ``path`` (None: the file of the last one, else the VM's
        default destination) with the current settings; blocks until it is committed.
        MIGRATION events tell its status, a CHECKPOINT event its statistics.  ``ending`` is
        called with the final status (completed, failed, cancelled) just before it is
        announced: a client that reacts to it must find the migration over."""
        from ..migration.checkpoint import CheckpointCancelled

        with self._work:
            if self._machine is None:
                raise CommandError("there is no machine to checkpoint yet (waiting for "
                                   "migrate-incoming)")
            if self._before_ram_use is not None:
                self._before_ram_use()
            checkpointer = self._checkpointer_for(path)
            where = str(checkpointer.path)
            self._set_status("setup", path=where, started=time.monotonic())
            self._set_status("active")
            def end(status: str, error: str | None = None) -> None:
                if ending is not None:
                    ending(status)
                self._set_status(status, error=error)

            try:
                stats = checkpointer.checkpoint(cancel=cancel)
            except CheckpointCancelled:
                end("cancelled")
                raise
            except PyvmmError as err:
                end("failed", str(err))
                raise
            except OSError as err:
                end("failed", str(err))
                raise PyvmmError(f"checkpoint into {where} failed: {err}") from err
            self._own_chains.add(os.path.realpath(where))
            with self._cond:
                self._status.stats = stats
                self._status.completed += 1
            self.events.emit("CHECKPOINT", {"file": where, **stats_data(stats)})
            end("completed")
            if self._on_checkpoint is not None:
                self._on_checkpoint(where, stats)
            return stats

    def _set_status(self, status: str, *, path: str | None = None, started: float | None = None,
                    error: str | None = None) -> None:
        with self._cond:
            self._status.status = status
            if path is not None:
                self._status.path = path
            if started is not None:
                self._status.started = started
                self._status.error = None
            if error is not None:
                self._status.error = error
            # under the lock: whoever reads this status afterwards was sent the event first
            self.events.emit("MIGRATION", {"status": status})

    def _checkpointer_for(self, path: str | None) -> Checkpointer:
        """The open checkpointer for ``path`` (``_work`` held): the current one when it writes
        there with the current settings for the current machine; else a new one, which grows
        the chain in ``path`` if this process wrote or reloaded it, and replaces it otherwise."""
        from ..migration.checkpoint import Checkpointer, CheckpointTarget

        machine = self._machine
        assert machine is not None
        current = self._checkpointer
        if path is None:
            if current is not None and current.machine is machine:
                path = str(current.path)
            else:
                path = self._status.path or CheckpointTarget("").resolved().path
        real = os.path.realpath(path)
        settings = dataclasses.replace(self.settings,
                                       capabilities=dict(self.settings.capabilities))
        if current is not None and os.path.realpath(current.path) == real and \
                current.machine is machine and \
                self._checkpointer_settings == settings.file_settings():
            # the encoder may change between increments of one chain
            current.set_encoder(settings.encoder_name(), settings.compress_level)
            return current
        if current is not None:
            self._checkpointer = None
            current.close()
        # a chain committed by this process (or reloaded from) grows; any other file, a chain
        # a killed run left included, is replaced once the new chain holds an increment
        append = real in self._own_chains and os.path.exists(path)
        checkpointer = Checkpointer(
            machine, path, append=append, durable=settings.durable,
            capabilities=settings.enabled(), tracker=settings.tracker, saver=settings.saver,
            unprotect_pages=settings.unprotect_pages, max_increments=settings.max_increments,
            sanity_checks=settings.sanity_checks, fault_mode=settings.fault_mode,
            saver_nice=settings.saver_nice, encoder=settings.encoder_name(),
            compress_level=settings.compress_level)
        self._checkpointer, self._checkpointer_settings = checkpointer, settings.file_settings()
        return checkpointer

    def migrate(self, uri: str, *, period: float | None = None) -> None:
        """QMP ``migrate``: checkpoint into ``chpt:FILE`` (``chpt:`` alone: the default
        destination) on a thread of its own, once, or every ``period`` seconds (the first at
        once) until ``migrate_cancel``.  The file is claimed here: a bad target is this call's
        error.  Another migrate while one runs gets QEMU's error."""
        target = _save_target(uri)
        if period is not None and not (0 < period < float("inf")):
            raise CommandError(f"period must be a number of seconds > 0, not {period}")
        with self._cond:
            if self._migrating:
                raise CommandError(MIGRATION_IN_PROGRESS)
            if self._machine is None:
                raise CommandError("there is no machine to checkpoint yet (waiting for "
                                   "migrate-incoming)")
            if self._quit:
                raise CommandError("the run is ending (quit)")
            self._migrating = True
        try:
            with self._work:
                self._checkpointer_for(target.path)
            self._cancel, self._wake = threading.Event(), threading.Event()
            thread = NamedThread(target=self._migrate_loop, args=(target.path, period,
                                                                  self._cancel, self._wake),
                                 name="pyvmm-migrate", daemon=True)
            self._migrate_thread = thread
            thread.start()
        except BaseException as err:
            with self._cond:
                self._migrating = False
            if isinstance(err, ConfigError):
                raise CommandError(str(err)) from err
            raise

    def _migrate_loop(self, path: str, period: float | None, cancel: threading.Event,
                      wake: threading.Event) -> None:
        def ending(status: str) -> None:
            if status != "completed" or period is None:
                self._migration_over()

        try:
            while True:
                try:
                    self.checkpoint(path, cancel=cancel, ending=ending)
                except PyvmmError:
                    return  # its status (failed, cancelled) is on record and announced
                if period is None or wake.wait(period) or self._quit:
                    if cancel.is_set():
                        self._migration_over()
                        self._set_status("cancelled")
                    return
        finally:
            self._migration_over()

    def _migration_over(self) -> None:
        with self._cond:
            self._migrating = False
            self._cond.notify_all()

    def migrate_cancel(self) -> None:
        """QMP ``migrate_cancel``: a checkpoint in flight commits nothing (its pages stay
        dirty for the next one); periodic checkpoints stop.  Nothing to cancel: no-op."""
        with self._cond:
            busy = self._migrating
        if not busy:
            return
        if self._status.status in ACTIVE[:2]:
            self._set_status("cancelling")
        self._cancel.set()
        self._wake.set()

    def wait_migration(self) -> dict[str, Any]:
        """Wait until the monitor's migration (a single checkpoint) has ended; its
        ``query-migrate`` reply."""
        with self._cond:
            while self._migrating:
                self._cond.wait(0.2)
        return self.query_migrate()

    def finish(self) -> None:
        """End monitor migrations: periodic ones stop after the checkpoint in flight, which
        is waited for (the run's end: nothing half done is left behind)."""
        self._wake.set()
        thread = self._migrate_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def close(self) -> None:
        """:meth:`finish`, then close the checkpoint file (a new chain without increments is
        removed).  The machine is the caller's to close."""
        self.finish()
        with self._work:
            if self._checkpointer is not None:
                checkpointer, self._checkpointer = self._checkpointer, None
                checkpointer.close()

    def query_migrate(self) -> dict[str, Any]:
        """QMP ``query-migrate``, QEMU's field names."""
        with self._cond:
            status = dataclasses.replace(self._status)
        machine = self._machine
        ram_total = sum(b.size for b in machine.ram_blocks) if machine is not None else 0
        return status.reply(ram_total)

    def checkpoint_file(self) -> str | None:
        """The file the last checkpoint went to (or the one this run writes or came from)."""
        if self._status.path is not None:
            return self._status.path
        if self._checkpointer is not None:
            return str(self._checkpointer.path)
        return next(iter(self._own_chains), None)

    # ------------------------------------------------------------------ reloads
    def migrate_incoming(self, uri: str) -> None:
        """QMP ``migrate-incoming``: build the machine from ``chpt:[N:]FILE`` (``--incoming
        defer`` only, as QEMU).  The guest then runs unless the run was started paused."""
        with self._cond:
            if not self._deferred:
                raise CommandError("'-incoming' was not specified on the command line "
                                   "(run with --incoming defer)")
            if self._machine is not None:
                raise CommandError("The incoming migration has already been started")
        self.reload(uri)

    def reload(self, uri: str) -> int:
        """Reload ``chpt:[N:]FILE`` into this process: a new machine from the file replaces the
        current one (stopped first, closed after), and runs if the old one ran.  Returns the
        number of increments loaded; a RELOAD event says so.  On an error the old machine
        goes on as it was."""
        from ..migration.reload import reload_file

        target = _reload_target(uri)
        with self._work:
            old = self._machine
            was_running = old is not None and old.state in (RunState.RUNNING,
                                                            RunState.SAVE_VM)
            if old is not None:
                old.pause()
                if self._before_ram_use is not None:
                    self._before_ram_use()
            if old is None:
                self._set_status("setup", path=target.path, started=time.monotonic())
                self._set_status("active")
            try:
                machine, report = reload_file(target.path, target.count,
                                              strategy=self._strategy,
                                              uart_sink=self._sinks.uart,
                                              stdout=self._sinks.stdout,
                                              stderr=self._sinks.stderr)
            except PyvmmError as err:
                if old is None:
                    self._set_status("failed", error=str(err))
                elif was_running and old.state is RunState.PAUSED:
                    old.resume()
                raise CommandError(str(err)) from err
            if self._checkpointer is not None:  # its dirty tracking followed the old RAM
                checkpointer, self._checkpointer = self._checkpointer, None
                checkpointer.close()
            self._own_chains.add(os.path.realpath(target.path))
            self._adopt(machine)
            if old is not None:
                old.close()
            self.events.emit("RELOAD", {"file": target.path, "increments": report.increments})
            if old is None:
                self._set_status("completed")  # after RELOAD: "completed" is announced last
            if was_running and machine.state is RunState.PAUSED:
                machine.resume()  # (a first machine, --incoming defer, is started by run())
            with self._cond:
                self._cond.notify_all()
            return report.increments


def _checked(settings: MigrationSettings) -> None:
    try:
        settings.check()
    except ConfigError as err:
        raise CommandError(str(err)) from err


def _save_target(uri: str) -> CheckpointTarget:
    from ..migration.checkpoint import parse_target

    try:
        target = parse_target(uri)
        if target.count is not None or target.squash:
            raise ConfigError(f"migrate takes chpt:FILE (or chpt: alone), not {uri}")
        return target.resolved()
    except ConfigError as err:
        raise CommandError(str(err)) from err


def _reload_target(uri: str) -> CheckpointTarget:
    from ..migration.checkpoint import parse_target

    try:
        target = parse_target(uri)
        if target.squash:
            raise ConfigError(f"{uri} squashes a file; a reload takes chpt:[N:]FILE")
        return target.resolved()
    except ConfigError as err:
        raise CommandError(str(err)) from err
