"""The machine: UART output, run states, pause/resume from another thread, exact instruction stops,
the virtual counter, and clear errors for what a guest may do wrong."""

from __future__ import annotations

import threading
import time

import pytest
from keystone import KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN, Ks

from pyvmm.devices.guest_inform import GuestRequest, RequestCode, RequestStatus
from pyvmm.errors import (
    ConfigError,
    GuestError,
    GuestMemoryError,
    RunStateError,
    UnsupportedInstruction,
)
from pyvmm.machine import RAM_BASE, Machine, RunState, StopReason

SYSTEM_OFF = """
    movz x0, #0x0008
    movk x0, #0x8400, lsl #16
    hvc #0
"""

PRINT_HELLO = """
    movz x1, #0x0900, lsl #16
    mov w2, #'h'
    str w2, [x1]
    mov w2, #'i'
    str w2, [x1]
    mov w2, #10
    str w2, [x1]
""" + SYSTEM_OFF

# Counts x0 up forever; x1 holds the loop count, stored to RAM so memory changes too.
COUNT_FOREVER = """
    movz x3, #0x4000, lsl #16
    add x3, x3, #0x10, lsl #12
loop:
    add x1, x1, #1
    str x1, [x3]
    b loop
"""


def assemble(source: str) -> bytes:
    encoding, _ = Ks(KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN).asm(source, RAM_BASE)
    return bytes(encoding)


def ran_on(machine: Machine) -> None:
    """Wait until a running COUNT_FOREVER guest has made progress (its counter in RAM moved):
    progress, not a sleep, so a busy host only makes the wait longer."""
    before = machine.read_memory(RAM_BASE + 0x10000, 8)
    deadline = time.monotonic() + 120
    while machine.read_memory(RAM_BASE + 0x10000, 8) == before:
        assert time.monotonic() < deadline, "the guest made no progress"
        time.sleep(0.001)


def machine_with(source: str, ram: int = 16 << 20) -> Machine:
    machine = Machine(ram, name="test")
    machine.write_memory(RAM_BASE, assemble(source))
    machine.set_entry(RAM_BASE)
    return machine


def test_uart_output_and_psci_power_off() -> None:
    with machine_with(PRINT_HELLO) as machine:
        result = machine.run()
        assert result.reason is StopReason.SHUTDOWN
        assert result.exit_code == 0
        assert machine.state is RunState.SHUTDOWN
        assert bytes(machine.uart_output) == b"hi\n"
        assert machine.uart.state.tx_count == 3


def test_uart_output_goes_to_the_given_sink() -> None:
    seen: list[bytes] = []
    machine = Machine(16 << 20, uart_sink=seen.append)
    machine.write_memory(RAM_BASE, assemble(PRINT_HELLO))
    machine.set_entry(RAM_BASE)
    with machine:
        machine.run()
    assert b"".join(seen) == b"hi\n"
    assert machine.uart_output == b""


def test_uart_identifies_as_pl011_and_reports_empty_rx() -> None:
    source = """
        movz x1, #0x0900, lsl #16
        ldr w2, [x1, #0x18]
        ldr w3, [x1, #0xfe0]
        ldr w4, [x1, #0xff0]
    """ + SYSTEM_OFF
    with machine_with(source) as machine:
        machine.run()
        regs = machine.cpu_state().x
        assert regs[2] & 0x90 == 0x90  # TXFE and RXFE
        assert regs[3] == 0x11 and regs[4] == 0x0D


def test_exact_stop_and_split_runs_reach_the_same_state() -> None:
    with machine_with(COUNT_FOREVER) as whole:
        result = whole.run(max_insns=10_001)
        assert result.reason is StopReason.INSN_LIMIT and result.insns == 10_001
        assert whole.state is RunState.PAUSED
        expected = whole.cpu_state()
        expected_ram = whole.read_memory(RAM_BASE + 0x10000, 8)
    with machine_with(COUNT_FOREVER) as split:
        split.run(max_insns=3_333)
        split.run(max_insns=6_000)
        result = split.run(max_insns=668)
        assert result.insns == 10_001
        assert split.cpu_state() == expected
        assert split.read_memory(RAM_BASE + 0x10000, 8) == expected_ram
    # the loop is 3 instructions after 2 of setup: the count says where it stopped
    assert expected.x[1] == (10_001 - 2) // 3


def test_pause_and_resume_from_another_thread() -> None:
    with machine_with(COUNT_FOREVER) as machine:
        machine.start()
        assert machine.state is RunState.RUNNING
        ran_on(machine)
        assert machine.pause()
        assert machine.state is RunState.PAUSED
        first = machine.cpu_state().x[1]
        assert first > 0
        time.sleep(0.02)  # a guest that did not stop would move on meanwhile
        assert machine.cpu_state().x[1] == first  # really stopped
        machine.resume()
        ran_on(machine)
        assert machine.pause(RunState.SAVE_VM)
        assert machine.state is RunState.SAVE_VM
        assert machine.cpu_state().x[1] > first
        machine.set_state(RunState.PAUSED)
        assert machine.wait().reason is StopReason.PAUSED
        assert machine.insns is None  # an uncounted run: the exact count is unknown


def test_close_ends_a_parked_vcpu_whose_wakeup_was_lost() -> None:
    """A second SIGTERM can cut close()'s notify short (seen once: the run hung at exit with
    the vCPU parked): close() wakes the parked thread again until it has gone."""
    machine = machine_with(COUNT_FOREVER)
    machine.start()
    ran_on(machine)
    assert machine.pause()
    condition = machine._cond
    notify_all = condition.notify_all
    dropped: list[bool] = []

    def lose_the_first() -> None:  # the wakeup an interrupt cut short
        if not dropped:
            dropped.append(True)
            return
        notify_all()

    condition.notify_all = lose_the_first  # type: ignore[method-assign]
    closer = threading.Thread(target=machine.close, daemon=True)
    closer.start()
    closer.join(timeout=20)
    assert dropped and not closer.is_alive(), "close() waited forever for the parked vCPU"


def test_many_pauses_never_lose_a_stop_request() -> None:
    with machine_with(COUNT_FOREVER) as machine:
        machine.start()
        values = []
        for _ in range(200):
            assert machine.pause()
            values.append(machine.cpu_state().x[1])
            machine.resume()
        machine.pause()
        assert values == sorted(values)


def test_a_stop_records_its_own_reason_even_before_the_vcpu_woke() -> None:
    """A checkpoint's stop (reason PAUSED), resume, then at once a Ctrl-C's pause (reason
    INTERRUPTED): when the vCPU had not woken from the resume, it stayed parked and recorded
    nothing, and wait() gave the checkpoint's reason: the run ended as "paused", exit 0 (issue
    14, found under load). Each pause's reason is the one waited for now."""
    with machine_with(COUNT_FOREVER) as machine:
        machine.start()
        for n in range(300):
            reason = (StopReason.INTERRUPTED, StopReason.TIME_LIMIT)[n % 2]
            assert machine.pause(RunState.SAVE_VM)
            machine.set_state(RunState.PAUSED)
            machine.resume()
            machine.pause(reason=reason)
            assert machine.wait().reason is reason, n
            machine.resume()


def test_pause_from_a_thread_while_main_thread_waits() -> None:
    with machine_with(COUNT_FOREVER) as machine:
        threading.Timer(0.05, machine.pause).start()
        result = machine.run()
        assert result.reason is StopReason.PAUSED


def test_time_limit() -> None:
    with machine_with(COUNT_FOREVER) as machine:
        started = time.monotonic()
        result = machine.run(seconds=0.1)
        assert result.reason is StopReason.TIME_LIMIT
        assert 0.09 < time.monotonic() - started < 5
        assert machine.state is RunState.PAUSED


def test_run_state_transitions_are_checked() -> None:
    with machine_with(PRINT_HELLO) as machine:
        with pytest.raises(RunStateError):
            machine.set_state(RunState.POSTMIGRATE)  # prelaunch -> postmigrate is not allowed
        machine.run()
        with pytest.raises(RunStateError, match="stopped for good"):
            machine.resume()
        with pytest.raises(RunStateError, match="stopped for good"):
            machine.start()


def test_state_listener_sees_every_transition() -> None:
    seen: list[tuple[str, str]] = []
    with machine_with(PRINT_HELLO) as machine:
        machine.add_state_listener(lambda old, new: seen.append((old.value, new.value)))
        machine.run()
    assert seen == [("prelaunch", "running"), ("running", "shutdown")]


def test_virtual_counter_is_deterministic_and_monotonic() -> None:
    source = """
        mrs x1, cntvct_el0
        mrs x2, cntvct_el0
        mrs x3, cntfrq_el0
        mrs x4, cntpct_el0
        mov x5, #1000
        msr cntv_cval_el0, x5
        mrs x6, cntv_cval_el0
    """ + SYSTEM_OFF
    results = []
    for _ in range(2):
        with machine_with(source) as machine:
            machine.run()
            results.append(machine.cpu_state().x[1:7])
    assert results[0] == results[1]
    x1, x2, x3, x4, _, x6 = results[0]
    assert 0 < x1 < x2 < x4
    assert x2 - x1 < 1000  # no host time leaked in: host counters are around 10**10
    assert x3 == 62_500_000
    assert x6 == 1000


def test_undefined_instruction_is_a_clear_guest_error() -> None:
    with machine_with("nop\n.word 0x00000000") as machine:
        result = machine.run()
    assert result.reason is StopReason.ERROR
    assert isinstance(result.error, UnsupportedInstruction)
    assert result.error.pc == RAM_BASE + 4
    assert "0x00000000" in str(result.error) and "guest test" in str(result.error)
    assert machine.state is RunState.GUEST_PANICKED


def test_unmapped_memory_access_names_the_address() -> None:
    source = """
        movz x1, #0x1234, lsl #16
        ldr x2, [x1]
    """
    with machine_with(source) as machine:
        result = machine.run()
    assert isinstance(result.error, GuestMemoryError)
    assert "read of unmapped memory at 0x12340000" in str(result.error)


def test_svc_without_syscall_layer_and_brk_are_errors() -> None:
    with machine_with("svc #0") as machine:
        error = machine.run().error
        assert isinstance(error, GuestError) and "no syscall layer" in str(error)
    with machine_with("brk #7") as machine:
        error = machine.run().error
        assert isinstance(error, GuestError) and "brk #7" in str(error)


def test_bad_ram_sizes_and_blocks() -> None:
    with pytest.raises(ConfigError):
        Machine(12345)
    with Machine(16 << 20) as machine:
        with pytest.raises(ConfigError, match="overlaps"):
            machine.add_ram_block("low", 0x0800_0000, 0x0200_0000)  # into the device window
        with pytest.raises(ConfigError, match="overlaps"):
            machine.add_ram_block("mid", 0x2000_0000, 1 << 20)  # wholly inside it
        with pytest.raises(ConfigError, match="overlaps"):
            machine.add_ram_block("twin", RAM_BASE, 1 << 20)
        block = machine.add_ram_block("low", 0x40_0000, 1 << 20)
        machine.write_memory(0x40_0000, b"abc")
        assert block.read(0, 3) == b"abc"
        with pytest.raises(GuestMemoryError):
            machine.read_memory(0x1000, 4)


def test_cpu_state_cannot_be_read_while_running() -> None:
    with machine_with(COUNT_FOREVER) as machine:
        machine.start()
        with pytest.raises(RunStateError, match="pause first"):
            machine.cpu_state()
        machine.pause()
        machine.cpu_state()


def test_fp_and_simd_are_enabled() -> None:
    source = """
        fmov d0, #1.5
        fadd d1, d0, d0
        movi v2.16b, #0x5a
    """ + SYSTEM_OFF
    with machine_with(source) as machine:
        assert machine.run().reason is StopReason.SHUTDOWN
        state = machine.cpu_state()
        assert state.v[1] == 0x4008000000000000  # 3.0
        assert state.v[2] == int("5a" * 16, 16)


def test_guest_inform_registers_are_visible_to_the_guest() -> None:
    source = """
        movz x1, #0x090f, lsl #16
        ldr w2, [x1]
        ldr w3, [x1, #8]
        mov w4, #1
        str w4, [x1, #0x14]
        ldr w5, [x1, #0x18]
        ldr w6, [x1, #0x20]
    """ + SYSTEM_OFF
    with machine_with(source) as machine:
        machine.guest_inform.checkpoint_started()
        machine.guest_inform.checkpoint_finished(ok=True)
        requests: list[GuestRequest] = []
        machine.guest_inform.on_request = requests.append
        machine.run()
        x = machine.cpu_state().x
    assert x[2] == 0x50564749 and x[3] == 1 and x[5] == 1
    assert x[6] == RequestStatus.PENDING  # a checkpoint request, handed to the host
    assert requests == [GuestRequest(RequestCode.CHECKPOINT, argument=0, sequence=1)]


def test_counted_run_after_a_free_run_stops_exactly() -> None:
    """Code translated during an uncounted run must not escape a later instruction budget."""
    with machine_with(COUNT_FOREVER) as machine:
        machine.start()
        ran_on(machine)
        machine.pause()
        before = machine.cpu_state().x[1]
        result = machine.run(max_insns=3_000)
        assert result.reason is StopReason.INSN_LIMIT
        assert machine.cpu_state().x[1] - before in (999, 1000, 1001)  # 3 instructions a loop
        machine.start()
        ran_on(machine)
        machine.pause()
        with_budget = machine.run(max_insns=30)
        assert with_budget.reason is StopReason.INSN_LIMIT


def test_vcpu_can_be_pinned_to_a_host_cpu() -> None:
    with machine_with(COUNT_FOREVER) as machine:
        machine.pin_vcpu(0)
        machine.start()
        time.sleep(0.02)
        thread = machine._thread
        assert thread is not None and thread.native_id is not None
        import os

        assert os.sched_getaffinity(thread.native_id) == {0}
        machine.pin_vcpu(None)
        assert os.sched_getaffinity(thread.native_id) == os.sched_getaffinity(0)
        machine.pause()
        with pytest.raises(ConfigError):
            machine.pin_vcpu(10_000)


def test_a_closed_machine_says_so_and_frees_its_engine_first() -> None:
    """close() frees the unicorn engine (with its mappings of guest RAM) before the RAM itself;
    using the machine afterwards is a RunStateError, never a touch of freed memory."""
    machine = machine_with(COUNT_FOREVER)
    machine.run(max_insns=1000)
    ram = machine.ram
    machine.close()
    assert ram.closed
    with pytest.raises(RunStateError, match="machine is closed"):
        machine.cpu_state()
    with pytest.raises(RunStateError, match="machine is closed"):
        machine.uc.reg_read(0)
    machine.close()  # twice is fine
