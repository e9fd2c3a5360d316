"""The machine's run states (QEMU's), the transitions allowed between them, and run outcomes.

:class:`RunState` and its table :data:`TRANSITIONS` (modelled on QEMU's
``runstate_transitions_def``) say which changes :class:`~pyvmm.machine.Machine` allows;
:class:`StopReason` and :class:`RunResult` say why and how a run of the vCPU ended. Plain values,
shared by any threads.
"""

from __future__ import annotations

import dataclasses
import enum

from .errors import PyvmmError


class RunState(enum.Enum):
    """QEMU's run states (``qapi/run-state.json``), the subset this machine can be in."""

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    SAVE_VM = "save-vm"
    RESTORE_VM = "restore-vm"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"
    GUEST_PANICKED = "guest-panicked"
    INTERNAL_ERROR = "internal-error"


_R = RunState
#: Allowed transitions, modelled on QEMU's ``runstate_transitions_def``.  Stopped states may go to
#: SAVE_VM so that a paused machine can be checkpointed without running it first.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _R.PRELAUNCH: frozenset({_R.RUNNING, _R.PAUSED, _R.INMIGRATE, _R.RESTORE_VM, _R.FINISH_MIGRATE,
                             _R.SAVE_VM, _R.SHUTDOWN}),
    _R.RUNNING: frozenset({_R.PAUSED, _R.SAVE_VM, _R.RESTORE_VM, _R.FINISH_MIGRATE, _R.SHUTDOWN,
                           _R.GUEST_PANICKED, _R.INTERNAL_ERROR}),
    _R.PAUSED: frozenset({_R.RUNNING, _R.SAVE_VM, _R.RESTORE_VM, _R.FINISH_MIGRATE, _R.POSTMIGRATE,
                          _R.SHUTDOWN}),
    _R.SAVE_VM: frozenset({_R.RUNNING, _R.PAUSED, _R.SHUTDOWN, _R.GUEST_PANICKED,
                           _R.INTERNAL_ERROR}),
    _R.RESTORE_VM: frozenset({_R.RUNNING, _R.PAUSED, _R.PRELAUNCH, _R.INTERNAL_ERROR}),
    _R.INMIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.POSTMIGRATE, _R.PRELAUNCH, _R.SHUTDOWN,
                             _R.INTERNAL_ERROR, _R.FINISH_MIGRATE}),
    _R.FINISH_MIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.POSTMIGRATE, _R.INTERNAL_ERROR,
                                  _R.SHUTDOWN}),
    _R.POSTMIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.FINISH_MIGRATE, _R.SAVE_VM,
                               _R.SHUTDOWN}),
    _R.SHUTDOWN: frozenset({_R.PAUSED, _R.FINISH_MIGRATE, _R.SAVE_VM, _R.PRELAUNCH}),
    _R.GUEST_PANICKED: frozenset({_R.PAUSED, _R.FINISH_MIGRATE, _R.SAVE_VM, _R.PRELAUNCH}),
    _R.INTERNAL_ERROR: frozenset({_R.PAUSED, _R.FINISH_MIGRATE, _R.PRELAUNCH}),
}
#: States from which the guest may not simply be resumed: it has ended.
ENDED = frozenset({_R.SHUTDOWN, _R.GUEST_PANICKED, _R.INTERNAL_ERROR})
#: States in which an operation (a checkpoint) holds the stopped guest: resume() waits for it
#: to finish, pause() is taken when it ends (Machine.resume_after).
HELD = frozenset({_R.SAVE_VM})


class StopReason(enum.Enum):
    """Why the vCPU stopped running guest code."""

    SHUTDOWN = "shutdown"  # the guest powered off / exited
    INSN_LIMIT = "insn-limit"  # the instruction budget of this run is used up (exact)
    TIME_LIMIT = "time-limit"
    PAUSED = "paused"  # another thread paused the machine
    INTERRUPTED = "interrupted"  # Ctrl-C in :meth:`Machine.run`
    QUIT = "quit"  # a monitor's quit (or a limit of the run's own) ended the run
    ERROR = "error"  # guest error or internal error; see ``RunResult.error``


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The outcome of the latest run (what :meth:`Machine.wait` returns)."""

    reason: StopReason
    state: RunState
    exit_code: int | None = None
    error: PyvmmError | None = None
    #: Exact number of guest instructions executed since power-on, or None once it is unknown
    #: (an uncounted run, or a counted run cut short by a pause from another thread).
    insns: int | None = None
