"""The pyvmm machine: one unicorn ARM64 vCPU, RAM blocks, MMIO devices, run states and the vCPU thread.

Layout of the guest-physical address space (a subset of QEMU's ``virt`` board)::

    0x0900_0000  PL011 UART                  (pyvmm.devices.pl011)
    0x090f_0000  guest-inform device         (pyvmm.devices.guest_inform)
    0x4000_0000  main RAM, "mach-virt.ram"   (pyvmm.ram)

plus, for Linux user-mode guests, extra RAM blocks where their ELF image wants to live.
The generic timer's counter is served through intercepted ``mrs``/``msr`` (pyvmm.devices.counter).

Threads: :meth:`Machine.start` runs the guest on a dedicated vCPU thread.  While guest code runs,
unicorn has released the GIL, so other Python threads (savers, timers, a monitor) make progress.
Hooks (MMIO, SVC, MRS: :mod:`pyvmm.vcpu_engine`) run on the vCPU thread with the GIL held.
:meth:`Machine.pause`, :meth:`Machine.resume` and, for operations such as a checkpoint,
:meth:`Machine.hold` / :meth:`Machine.release` may be called from any other thread: every
asynchronous stop goes through them and lands between translated blocks, outside any hook
(:mod:`pyvmm.vcpu_gate`). The run states and their allowed transitions are
:mod:`pyvmm.run_state`'s.

This module knows nothing about migration: a checkpointer reaches the machine through
``ram_blocks``, ``devices``, :meth:`cpu_state` and pause/resume.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, UC_PROT_ALL, Uc, UcError
from unicorn import arm64_const as a64

from .cpu import CPACR_FPEN, CpuState, read_cpu_state, write_cpu_state
from .devices.base import MmioDevice
from .devices.counter import VirtualCounter
from .devices.guest_inform import GuestInform
from .devices.pl011 import Pl011, UartSink
from .errors import ConfigError, GuestError, GuestMemoryError, PyvmmError, RunStateError
from .interrupts import signals_held
from .ram import PAGE_SIZE, RamBlock
from .run_state import ENDED as _ENDED
from .run_state import HELD as _HELD
from .run_state import TRANSITIONS as _TRANSITIONS
from .run_state import RunResult, RunState, StopReason
from .threads import NamedThread
from .vcpu_engine import EXCP_SWI, ClosedEngine, VcpuHooks, map_mmio, release_engine
from .vcpu_gate import StopGate

RAM_BASE = 0x4000_0000
DEFAULT_RAM_SIZE = 256 << 20
MAIN_RAM_NAME = "mach-virt.ram"
#: Guest-physical addresses below this are free for extra RAM blocks (ELF images sit at 0x400000).
LOW_MEMORY_LIMIT = 0x0900_0000
#: Seconds between the wakeups close() sends a parked vCPU thread until it has gone.
_CLOSE_NOTIFY_EVERY = 0.5
#: emu_start's "until" address: one the guest never executes, so only our stop conditions end a run.
_NEVER_PC = 0xFFFF_FFFF_FFFF_FFFC

#: RunState, StopReason and RunResult are pyvmm.run_state's, offered here as they always were:
#: the project's owner fixed them on this module, and the rest of pyvmm imports them from it.
__all__ = ["DEFAULT_RAM_SIZE", "LOW_MEMORY_LIMIT", "MAIN_RAM_NAME", "RAM_BASE", "Machine",
           "RunResult", "RunState", "StopReason", "SvcHandler"]


SvcHandler = Callable[["Machine"], None]


class Machine:
    """An ARM64 machine.  Create, load a guest (write RAM, set registers), then :meth:`run`.

    ``uart_sink`` receives the guest's UART output; by default it is collected in
    :attr:`uart_output`.  ``seed`` is the machine's source of all guest-visible randomness.
    """

    def __init__(self, ram_size: int = DEFAULT_RAM_SIZE, *, seed: int = 0,
                 uart_sink: UartSink | None = None, name: str = "guest") -> None:
        if ram_size < PAGE_SIZE or ram_size % PAGE_SIZE:
            raise ConfigError(f"RAM size {ram_size} is not a positive multiple of {PAGE_SIZE}")
        if ram_size > (64 << 30):
            raise ConfigError(f"RAM size {ram_size >> 30} GiB is more than the 64 GiB supported")
        self.seed = seed
        self.name = name
        self.uart_output = bytearray()
        self.uc: Any = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
        self.ram_blocks: list[RamBlock] = []
        self.ram = self.add_ram_block(MAIN_RAM_NAME, RAM_BASE, ram_size)
        self.uart = Pl011(uart_sink if uart_sink is not None else self.uart_output.extend)
        self.counter = VirtualCounter()
        self.guest_inform = GuestInform()
        self.mmio_devices: list[MmioDevice] = [self.uart, self.guest_inform]
        for dev in self.mmio_devices:
            map_mmio(self.uc, dev)
        self._svc_handler: SvcHandler | None = None
        #: Extra objects whose state belongs to the machine (e.g. the Linux syscall layer);
        #: keyed by a QEMU-style id string.  The migration code saves them with the devices.
        self.extra_state: dict[str, Any] = {}
        self._hooks()
        self.uc.reg_write(a64.UC_ARM64_REG_CPACR_EL1, CPACR_FPEN)

        self._cond = threading.Condition()
        self._state = RunState.PRELAUNCH
        self._thread: threading.Thread | None = None
        self._parked = True
        self._closing = False
        self._budget: int | None = None
        self._counted_code = True  # no code translated yet
        #: Host CPU the vCPU thread is pinned to (see :meth:`pin_vcpu`), or None.
        self.vcpu_cpu: int | None = None
        self._pause_reason = StopReason.PAUSED
        self._icount: int | None = 0
        self._exit_code: int | None = None
        self._guest_error: PyvmmError | None = None
        self._result = RunResult(StopReason.PAUSED, RunState.PRELAUNCH, insns=0)
        self._timer: threading.Timer | None = None
        self._state_listeners: list[Callable[[RunState, RunState], None]] = []
        #: A pause asked for while an operation held the stopped guest (see _HELD): taken when
        #: the operation ends with resume_after(); its (target, reason).
        self._pending_pause: tuple[RunState, StopReason] | None = None
        #: The thread that put the machine into its _HELD state (its resume() ends the hold).
        self._holder: threading.Thread | None = None

    # ----------------------------------------------------------------------------- memory
    def add_ram_block(self, name: str, gpa: int, size: int) -> RamBlock:
        """Create a RAM block at ``gpa`` and map it into the vCPU's address space (before start)."""
        if getattr(self, "_state", RunState.PRELAUNCH) is not RunState.PRELAUNCH:
            raise RunStateError("RAM blocks can only be added before the machine starts")
        if any(b.name == name for b in self.ram_blocks):
            raise ConfigError(f"a RAM block named {name!r} exists already")
        block = RamBlock(name, size, gpa)
        for other in self.ram_blocks:
            if gpa < other.gpa + other.size and other.gpa < gpa + size:
                block.close()
                raise ConfigError(f"RAM block {name} [0x{gpa:x}, 0x{gpa + size:x}) overlaps "
                                  f"{other.name}")
        if gpa < RAM_BASE and gpa + size > LOW_MEMORY_LIMIT:
            block.close()
            raise ConfigError(f"RAM block {name} [0x{gpa:x}, 0x{gpa + size:x}) overlaps the "
                              f"device window [0x{LOW_MEMORY_LIMIT:x}, 0x{RAM_BASE:x})")
        self.uc.mem_map_ptr(gpa, size, UC_PROT_ALL, block.host_addr)
        self.ram_blocks.append(block)
        return block

    def block_for(self, gpa: int, length: int = 1) -> tuple[RamBlock, int]:
        """The RAM block holding ``[gpa, gpa+length)`` and the offset of ``gpa`` in it."""
        for block in self.ram_blocks:
            if block.gpa <= gpa and gpa + length <= block.gpa + block.size:
                return block, gpa - block.gpa
        raise GuestMemoryError(f"guest-physical range 0x{gpa:x}+{length} is not in RAM")

    def read_memory(self, gpa: int, length: int) -> bytes:
        """Host-side read of guest RAM (does not go through the vCPU)."""
        if length == 0:
            return b""
        block, off = self.block_for(gpa, length)
        return block.read(off, length)

    def write_memory(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Host-side write of guest RAM.  Code written here after it ran once must be followed by
        :meth:`invalidate_code` (unicorn caches translated code)."""
        if len(data) == 0:
            return
        block, off = self.block_for(gpa, len(data))
        block.write(off, data)

    def memory_view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM (no copy); valid until the machine is closed."""
        block, off = self.block_for(gpa, length)
        return block.mem[off:off + length]

    def invalidate_code(self, gpa: int, length: int) -> None:
        """Drop translated code for a range the host rewrote."""
        self.uc.ctl_remove_cache(gpa, gpa + length)

    # ----------------------------------------------------------------------------- CPU
    def cpu_state(self) -> CpuState:
        """The vCPU's registers (machine must not be running)."""
        self._require_stopped("read the CPU state")
        return read_cpu_state(self.uc)

    def set_cpu_state(self, state: CpuState) -> None:
        self._require_stopped("write the CPU state")
        write_cpu_state(self.uc, state)

    def set_entry(self, pc: int, registers: dict[str, int] | None = None) -> None:
        """Set PC and general registers (by name: ``x0``..``x30``, ``sp``) before starting."""
        self._require_stopped("set the entry point")
        for name, value in (registers or {}).items():
            rid = getattr(a64, f"UC_ARM64_REG_{name.upper()}", None)
            if rid is None:
                raise ConfigError(f"unknown register {name!r}")
            self.uc.reg_write(rid, value)
        self.uc.reg_write(a64.UC_ARM64_REG_PC, pc)

    def set_svc_handler(self, handler: SvcHandler | None) -> None:
        """Who serves ``svc`` (a Linux syscall layer).  Runs on the vCPU thread, GIL held."""
        self._svc_handler = handler

    # ----------------------------------------------------------------------------- run states
    @property
    def state(self) -> RunState:
        return self._state

    def settled_state(self) -> RunState:
        """:attr:`state`, once a change in progress has been told to every state listener: a
        monitor that reports it has emitted its event first (query-status after STOP)."""
        with self._cond:
            return self._state

    @property
    def insns(self) -> int | None:
        """Exact guest instructions executed so far, or None when unknown (see RunResult)."""
        return self._icount

    def set_insns(self, count: int | None) -> None:
        """Set the instruction counter (used when a machine's state is reloaded)."""
        self._icount = count

    @property
    def pause_requested(self) -> bool:
        """Whether a pause has been asked for and has not landed yet.  A hook on the vCPU
        thread that could block (a system call waiting for input) checks it, and returns so
        that the pause is served (see :meth:`pause`)."""
        return self._gate.requested or self._pending_pause is not None

    @property
    def executed_insns(self) -> int:
        """About how many guest instructions this machine has run in this process (the
        instructions of every translated block entered: a block an exception leaves early
        counts whole).  Cheap at any time; exact counts need a counted run (``max_insns``)."""
        return self._gate.insns

    @property
    def pause_fd(self) -> int:
        """A file descriptor that polls readable while a pause waits for the vCPU: a hook that
        blocks on host input polls it too, and gives way (:attr:`pause_requested`)."""
        return self._gate.fd

    @property
    def exit_code(self) -> int | None:
        """The guest's exit code once it has powered off, else None."""
        return self._exit_code

    def mark_shutdown(self, exit_code: int) -> None:
        """Put a stopped machine into SHUTDOWN as if its guest had powered off with
        ``exit_code`` (used when the reloaded state is that of a guest that had ended)."""
        with self._cond:
            if self._state is RunState.RUNNING:
                raise RunStateError("cannot mark a running machine as shut down")
            self._exit_code = exit_code
            self._transition(RunState.SHUTDOWN)
            self._result = RunResult(StopReason.SHUTDOWN, self._state, exit_code=exit_code,
                                     insns=self._icount)

    @property
    def last_result(self) -> RunResult:
        """Why the vCPU last stopped (what :meth:`wait` would return now)."""
        return self._result

    def add_state_listener(self, listener: Callable[[RunState, RunState], None]) -> None:
        """Call ``listener(old, new)`` on every run-state change (on the changing thread)."""
        self._state_listeners.append(listener)

    def set_state(self, new: RunState) -> None:
        """Change the run state of a stopped machine (e.g. PAUSED → SAVE_VM and back).

        Use :meth:`pause`/:meth:`resume`/:meth:`start` to stop or run the vCPU.
        """
        with self._cond:
            if new is RunState.RUNNING:
                raise RunStateError("use start() or resume() to run the machine")
            self._transition(new)

    def _transition(self, new: RunState) -> None:
        old = self._state
        if new is old:
            return
        if new not in _TRANSITIONS[old]:
            raise RunStateError(f"invalid run state transition {old.value} -> {new.value}")
        self._state = new
        self._holder = threading.current_thread() if new in _HELD else None
        for listener in self._state_listeners:
            listener(old, new)
        self._cond.notify_all()

    def _require_stopped(self, what: str) -> None:
        if (self._state is RunState.RUNNING or not self._parked) and \
                threading.current_thread() is not self._thread:
            raise RunStateError(f"cannot {what} while the vCPU is running; pause first")

    # ----------------------------------------------------------------------------- running
    def start(self, *, max_insns: int | None = None, seconds: float | None = None) -> None:
        """Run the guest on the vCPU thread and return at once.

        ``max_insns``: stop after exactly that many instructions (a counted run, somewhat slower);
        ``seconds``: stop after that much host time.  Both stop into the PAUSED state, from which
        :meth:`start` or :meth:`resume` continues.
        """
        if max_insns is not None and max_insns < 0:
            raise ConfigError("max_insns must be >= 0")
        if seconds is not None and seconds <= 0:
            raise ConfigError("seconds must be > 0")
        with self._cond:
            if self._state in _ENDED:
                raise RunStateError(f"the machine has stopped for good ({self._state.value})")
            if self._state is RunState.RUNNING:
                raise RunStateError("the machine is running already")
            self._budget = max_insns
            self._pause_reason = StopReason.PAUSED
            if max_insns == 0:
                self._transition(RunState.PAUSED)
                self._result = RunResult(StopReason.INSN_LIMIT, self._state, insns=self._icount)
                return
            self._ensure_thread()
            self._transition(RunState.RUNNING)
        if seconds is not None:
            self._timer = threading.Timer(seconds, self._time_up)
            self._timer.daemon = True
            self._timer.start()

    def resume(self) -> None:
        """Continue a stopped machine, without an instruction budget (a pause from outside ends
        a counted run: how much of the budget was used is unknown).

        While an operation holds the stopped guest (a checkpoint, in SAVE_VM), waits until it is
        done, as QEMU's ``cont`` waits for the big lock a stop-and-copy save holds; from the
        thread that holds it, it is :meth:`resume_after`."""
        with self._cond:
            if self._state in _HELD and self._holder is threading.current_thread():
                self.resume_after(self._state)
                return
            while self._state in _HELD:
                self._wait_unless_closing()
            self._resume_locked()

    def hold(self, target: RunState = RunState.SAVE_VM) -> RunState:
        """Stop the guest for an operation (a checkpoint) and put the machine into ``target``,
        whatever it was doing, in one step (no other thread's pause or resume can come in
        between); waits while another operation holds it.  Returns the state to give back to
        :meth:`release`: RUNNING if the guest was running, else the state it was in (an
        ended one if the guest powered off before the stop landed)."""
        if threading.current_thread() is self._thread:
            raise RunStateError("hold() called from the vCPU thread")
        with self._cond:
            while self._state in _HELD:
                self._wait_unless_closing()
            before = self._state
            if before is RunState.RUNNING:
                self._pause_reason = StopReason.PAUSED
                self._transition(target)
                if not self._parked:
                    self._gate.request()
            while not self._parked:
                self._wait_unless_closing()
            if self._state is not target:  # stopped already, or ended before the stop
                before = self._state
                self._transition(target)
            return before

    def release(self, before: RunState) -> None:
        """End a :meth:`hold`: back to ``before`` (a PRELAUNCH machine to PAUSED), the guest
        running again if it ran; a pause asked for meanwhile is taken (:meth:`resume_after`)."""
        with self._cond:
            if before is RunState.RUNNING:
                self.resume_after(self._state)
            else:  # a pause asked for meanwhile finds the guest not running (pause() False)
                self._transition(before if before is not RunState.PRELAUNCH
                                 else RunState.PAUSED)

    def _wait_unless_closing(self) -> None:
        if self._closing:
            raise RunStateError("the machine was closed while this thread waited for it")
        self._cond.wait(0.2)

    def resume_after(self, held: RunState) -> None:
        """End ``held``, the state the caller paused a running machine into (SAVE_VM for a
        checkpoint), and run the guest on; or, if a pause was asked for meanwhile, stop there
        instead: a Ctrl-C, a time limit or a monitor's ``stop`` during a checkpoint is never
        lost."""
        with self._cond:
            if self._state is not held:
                raise RunStateError(f"resume_after({held.value}) in state {self._state.value}")
            pending, self._pending_pause = self._pending_pause, None
            if pending is None:
                self._resume_locked()
                return
            target, reason = pending
            self._transition(target)
            self._result = RunResult(reason, self._state, insns=self._icount)
            self._cond.notify_all()

    def _resume_locked(self) -> None:
        if self._state in _ENDED:
            raise RunStateError(f"the machine has stopped for good ({self._state.value})")
        if self._state is RunState.RUNNING:
            return
        self._pause_reason = StopReason.PAUSED
        self._ensure_thread()
        self._transition(RunState.RUNNING)

    def pause(self, target: RunState = RunState.PAUSED, *,
              reason: StopReason = StopReason.PAUSED) -> bool:
        """Stop the vCPU and put the machine into ``target`` (PAUSED, SAVE_VM, FINISH_MIGRATE...).

        Blocks until the vCPU thread is parked: on return no guest code runs and the CPU state
        can be read.  The vCPU stops before the next translation block it enters: at an
        instruction boundary, never inside an MMIO, MRS or SVC hook (a hook running when the
        pause is asked for completes first), so registers, RAM, devices and the syscall layer
        agree (:mod:`pyvmm.vcpu_gate`).  Every asynchronous stop (a timer, ``seconds``, Ctrl-C,
        a checkpoint, a monitor command) comes through here.  Call from any thread but the
        vCPU's.  Returns False if the machine was not running, or if its guest powered off or
        failed before the stop landed (it is then left in that state).
        """
        if threading.current_thread() is self._thread:
            raise RunStateError("pause() called from the vCPU thread; use request_stop()")
        with self._cond:
            if self._state in _HELD and self._state is not target:
                return self._pause_when_released(target, reason)
            if self._state is not RunState.RUNNING:
                while not self._parked:  # another thread's pause is landing: wait for it
                    self._cond.wait(0.2)
                return False
            self._pause_reason = reason
            self._transition(target)
            # Served by the vCPU thread before the next translation block it enters (also in a
            # run that has not begun yet), never from here: see pyvmm.vcpu_gate for why.
            # A parked vCPU (resumed, not yet woken) sees the new state and stays parked: asking
            # it would leave a request behind that stops the next run at its first block.
            if not self._parked:
                self._gate.request()
            else:
                # resumed but not woken yet: the vCPU stays parked and records no stop, so the
                # stop's reason is recorded here (else wait() returned the reason of the stop
                # before the resume: a Ctrl-C during periodic checkpoints ended as "paused")
                self._result = RunResult(reason, self._state, insns=self._icount)
            while not self._parked:
                self._cond.wait(0.2)  # bounded: the calling thread stays responsive to Ctrl-C
            # The guest may have powered off (or failed) in the instructions before the stop:
            # then it is in that end state, not paused, and the caller must know.  (Another
            # operation may hold the stopped guest already: the pause has landed all the same.)
            return not self._ended_on_its_own()

    def _pause_when_released(self, target: RunState, reason: StopReason) -> bool:
        """pause() while an operation holds the stopped guest: taken by its resume_after()."""
        request = (target, reason)
        self._pending_pause = request
        while self._state in _HELD:
            self._wait_unless_closing()
        if self._pending_pause is request:  # released without running the guest again
            self._pending_pause = None
            return False
        return not self._ended_on_its_own()

    def _ended_on_its_own(self) -> bool:
        """Whether the vCPU's last run ended with the guest (power-off, error), not a stop."""
        return self._result.reason in (StopReason.SHUTDOWN, StopReason.ERROR)

    def request_stop(self, exit_code: int | None = None) -> None:
        """From a hook on the vCPU thread: power the machine off after the current instruction."""
        self._exit_code = exit_code if exit_code is not None else 0
        self.uc.emu_stop()

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the vCPU stops (limit, pause, shutdown, error); return why.

        A checkpoint's pause (SAVE_VM, from another thread) does not end the wait: the guest
        resumes when the checkpoint is taken, and the run goes on to its own end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._state in (RunState.RUNNING, RunState.SAVE_VM) or not self._parked:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                # A bounded wait keeps the calling (main) thread responsive to Ctrl-C.
                self._cond.wait(0.2 if remaining is None else min(0.2, remaining))
            return self._result

    def run(self, *, max_insns: int | None = None, seconds: float | None = None) -> RunResult:
        """Start and wait: run until shutdown, an error, or a limit.  Ctrl-C pauses cleanly."""
        self.start(max_insns=max_insns, seconds=seconds)
        return self.wait_interruptible()

    def wait_interruptible(self) -> RunResult:
        """:meth:`wait` on the main thread: a Ctrl-C (or SIGTERM) meanwhile pauses the guest
        cleanly (reason INTERRUPTED) and returns once it is stopped."""
        try:
            return self.wait()
        except KeyboardInterrupt:
            # a second Ctrl-C (or SIGTERM) while this one's pause lands asks for the same stop:
            # it must neither leave the pause half taken nor, landing just before it, skip it
            # (pause() again is harmless: a stopped machine stays as it is)
            while True:
                try:
                    with signals_held():
                        self.pause(reason=StopReason.INTERRUPTED)
                except KeyboardInterrupt:
                    continue
                return self.wait()

    def close(self) -> None:
        """Stop the vCPU thread and release RAM.  The machine cannot be used afterwards.

        A guest that another thread holds stopped (a checkpoint in save-vm) is stopped once that
        thread lets it go: it would run on otherwise, and the vCPU thread with it."""
        held_elsewhere = self._state in _HELD and self._holder is not threading.current_thread()
        if self._state is RunState.RUNNING or held_elsewhere:
            self.pause()
        with signals_held(), self._cond:  # a second Ctrl-C/SIGTERM must not cut the notify
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # and should a wakeup still be lost (an interrupt that cut an earlier notify short
            # left the parked vCPU waiting: seen once, the run hung at exit), it comes again
            while thread.is_alive():
                thread.join(_CLOSE_NOTIFY_EVERY)
                if thread.is_alive():
                    with self._cond:
                        self._cond.notify_all()
        if self._timer is not None:
            self._timer.cancel()
        self._release_engine()
        self._gate.close()
        for block in self.ram_blocks:
            block.close()

    def _release_engine(self) -> None:
        """Free the unicorn engine, whose mappings point into our RAM, before the RAM goes
        (:func:`~pyvmm.vcpu_engine.release_engine`). Any later use of ``self.uc`` raises
        RunStateError instead of touching freed memory."""
        uc, self.uc = self.uc, ClosedEngine()
        release_engine(uc, self.ram_blocks)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _time_up(self) -> None:
        self.pause(reason=StopReason.TIME_LIMIT)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = NamedThread(target=self._vcpu_main, name=f"vcpu-{self.name}",
                                            daemon=True)
            self._thread.start()

    def pin_vcpu(self, cpu: int | None) -> None:
        """Run the vCPU thread on host CPU ``cpu`` only (None: any CPU).

        A userfaultfd fault handler on the same CPU as the faulting vCPU resolves faults many
        times faster than one on another CPU (DESIGN.md §8): checkpointers pin both.
        """
        if cpu is not None and cpu not in os.sched_getaffinity(0):
            raise ConfigError(f"CPU {cpu} is not available to this process")
        self.vcpu_cpu = cpu
        thread = self._thread
        if thread is not None and thread.native_id is not None:
            os.sched_setaffinity(thread.native_id, {cpu} if cpu is not None else
                                 os.sched_getaffinity(0))

    def _vcpu_main(self) -> None:
        """The vCPU thread: park while not RUNNING, otherwise run guest code (GIL released)."""
        if self.vcpu_cpu is not None:
            os.sched_setaffinity(0, {self.vcpu_cpu})
        while True:
            with self._cond:
                while self._state is not RunState.RUNNING:
                    if self._closing:
                        return
                    self._parked = True
                    self._gate.clear()
                    self._cond.notify_all()
                    self._cond.wait()
                self._parked = False
                budget = self._budget
            error: PyvmmError | None = None
            try:
                pc = self.uc.reg_read(a64.UC_ARM64_REG_PC)
                if budget and not self._counted_code:
                    # unicorn counts instructions in code translated while a count is set:
                    # blocks translated by an uncounted run would run on uncounted
                    self.uc.ctl_flush_tb()
                self._counted_code = bool(budget)
                self.uc.emu_start(pc, _NEVER_PC, 0, budget or 0)
            except PyvmmError as err:
                error = err
            except UcError as err:
                error = self._vcpu_hooks.translate_uc_error(err)
            except Exception as err:  # noqa: BLE001 - a host bug must not kill the thread silently
                error = PyvmmError(f"internal error in the vCPU thread: {err!r}")
                error.__cause__ = err
            self._after_run(budget, error)

    def _after_run(self, budget: int | None, error: PyvmmError | None) -> None:
        with self._cond:
            interrupted = self._state is not RunState.RUNNING
            if self._timer is not None and (self._exit_code is not None or error is not None):
                self._timer.cancel()
            if self._exit_code is not None:
                self._icount = None
                self._force_state(RunState.SHUTDOWN)
                self._result = RunResult(StopReason.SHUTDOWN, self._state,
                                         exit_code=self._exit_code, insns=self._icount)
            elif error is not None:
                self._icount = None
                bad = RunState.GUEST_PANICKED if isinstance(error, GuestError) else \
                    RunState.INTERNAL_ERROR
                self._force_state(bad)
                self._result = RunResult(StopReason.ERROR, self._state, error=error)
            elif interrupted:
                # Paused from outside: the run stopped at an instruction we cannot count.
                self._icount = None
                self._budget = None
                self._result = RunResult(self._pause_reason, self._state, insns=self._icount)
            elif budget:
                if self._icount is not None:
                    self._icount += budget
                self._budget = None
                self._transition(RunState.PAUSED)
                self._result = RunResult(StopReason.INSN_LIMIT, self._state, insns=self._icount)
            else:
                return  # emu_start returned for no reason of ours: run on
            self._gate.clear()  # a pause that came as the run ended is served by parking
            self._parked = True
            self._cond.notify_all()

    def _force_state(self, new: RunState) -> None:
        """Enter an end state from whatever state a concurrent pause left us in."""
        if new not in _TRANSITIONS[self._state]:
            self._state = RunState.RUNNING  # the guest ended while a pause was being requested
        self._transition(new)

    # ----------------------------------------------------------------------------- hooks
    def _hooks(self) -> None:
        self._gate = StopGate(self.uc)
        self._vcpu_hooks = VcpuHooks(self)
        self._vcpu_hooks.install(self.uc, self._on_interrupt)

    def _on_interrupt(self, uc: Any, intno: int, _ud: Any) -> None:
        if intno == EXCP_SWI:
            # The hot path of Linux guests: no register reads here (each costs microseconds).
            if self._svc_handler is None:
                raise GuestError("svc (system call) in a guest that has no syscall layer",
                                 pc=uc.reg_read(a64.UC_ARM64_REG_PC) - 4, guest=self.name)
            self._svc_handler(self)
            return
        self._vcpu_hooks.on_exception(uc, intno)
