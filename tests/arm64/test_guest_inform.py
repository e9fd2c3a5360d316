"""guest-inform both ways, through the paths users take: a guest that asks for its own checkpoints,
reloads and quit (a VmController with the service :func:`start_guest_inform` gives it, as
``pyvmm run`` does), listeners on the ``--guest-inform`` socket, and ``python -m pyvmm run``.

Nothing waits on host speed: every wait is for a socket read, a run's end or a guest's answer,
with a generous deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import pytest
from keystone import KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN, Ks
from pyvmm_process import finish, start, wait_for_socket

from pyvmm.devices.guest_inform import (
    ERR_FAILED,
    ERR_INTERRUPTED,
    ERR_NO_FILE,
    ERR_NO_HOST,
    ERR_UNKNOWN_REQUEST,
    VMSTATE_GUEST_INFORM,
    GuestInform,
    GuestInformState,
    GuestRequest,
    RequestCode,
    RequestStatus,
)
from pyvmm.errors import FormatError
from pyvmm.guests.workload import WorkloadOptions, build_workload, expected_output
from pyvmm.machine import RAM_BASE, Machine, RunResult, StopReason
from pyvmm.migration.container import CheckpointFile
from pyvmm.migration.reload import reload_file
from pyvmm.migration.stream import QEMUFile
from pyvmm.migration.vmstate_interpreter import load_state, save_state
from pyvmm.monitor.controller import VmController
from pyvmm.monitor.inform import (
    HELP,
    MAX_LISTENERS,
    GuestInformService,
    start_guest_inform,
)
from pyvmm.monitor.settings import MigrationSettings
from pyvmm.monitor.sockets import SocketAddress

DEADLINE = 60.0
RAM = 16 << 20
INFORM = "movz x1, #0x090f, lsl #16\n"
SYSTEM_OFF = """
    movz x0, #0x0008
    movk x0, #0x8400, lsl #16
    hvc #0
"""


def poll(label: str) -> str:
    """Wait till the request is answered; x3 = REQUEST_STATUS, x4 = REQUEST_RESULT,
    x5 = RESTORE_COUNT."""
    return f"""
{label}:
    ldr w3, [x1, #0x20]
    cmp w3, #1
    b.eq {label}
    ldr w4, [x1, #0x24]
    ldr w5, [x1, #0x10]
"""


def ask(code: int, argument: int = 0) -> str:
    return f"""
    mov w2, #{argument}
    str w2, [x1, #0x1c]
    mov w2, #{code}
    str w2, [x1, #0x14]
"""


def guest(source: str) -> Machine:
    code, _ = Ks(KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN).asm(source, RAM_BASE)
    machine = Machine(RAM, name="inform-test")
    machine.write_memory(RAM_BASE, bytes(code))
    machine.set_entry(RAM_BASE)
    return machine


def workload(text: str) -> Machine:
    image = build_workload(WorkloadOptions.parse(text), RAM_BASE, RAM)
    machine = Machine(RAM, name="inform-workload")
    machine.write_memory(image.load_gpa, image.code)
    machine.set_entry(image.entry, image.registers)
    return machine


class Served:
    """A machine under a VmController with the guest-inform service, as ``pyvmm run`` has it."""

    def __init__(self, vm: VmController, service: GuestInformService) -> None:
        self.vm = vm
        self.service = service
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    def run(self) -> RunResult:
        return self.vm.run()

    def run_aside(self) -> concurrent.futures.Future[RunResult]:
        """vm.run() on a thread of its own, while the test talks to the socket."""
        return self._pool.submit(self.vm.run)

    def x(self) -> tuple[int, ...]:
        machine = self.vm.machine
        assert machine is not None
        return machine.cpu_state().x


@contextmanager
def serving(machine: Machine, chpt: Path | None = None, address: SocketAddress | None = None
            ) -> Iterator[Served]:
    vm = VmController(machine, settings=MigrationSettings(durable=False))
    try:
        if chpt is not None:
            vm.claim(str(chpt))
        service = start_guest_inform(vm, address)
        served = Served(vm, service)
        try:
            yield served
        finally:
            if vm.machine is not None and not vm.quit_requested:
                vm.quit()
            served._pool.shutdown(wait=True)
            service.close()
    finally:
        vm.close()
        current = vm.machine or machine
        current.close()
        if current is not machine:
            machine.close()


def increments(path: Path) -> int:
    with CheckpointFile.open(path) as container:
        return len(container.header.increments)


# -- the device on its own -------------------------------------------------------------------

def test_device_requests_are_pending_one_at_a_time_and_answered_once() -> None:
    device = GuestInform()
    device.write(0x14, 4, 1)  # nobody serves requests
    assert (device.read(0x20, 4), device.read(0x24, 4)) == (RequestStatus.FAILED, ERR_NO_HOST)
    device.write(0x14, 4, 9)  # not a request
    assert (device.read(0x20, 4), device.read(0x24, 4)) == (RequestStatus.FAILED,
                                                            ERR_UNKNOWN_REQUEST)
    handed: list[GuestRequest] = []
    device.on_request = handed.append
    device.write(0x1c, 4, 3)
    device.write(0x14, 4, 2)
    assert handed == [GuestRequest(RequestCode.RELOAD, 3, sequence=3)]
    assert device.read(0x20, 4) == RequestStatus.PENDING and device.read(0x24, 4) == 0
    device.write(0x14, 4, 3)  # ignored: one request at a time
    assert len(handed) == 1 and device.read(0x14, 4) == 2 and device.read(0x18, 4) == 4
    device.answer(handed[0], True, 2)
    device.answer(handed[0], False, ERR_FAILED)  # answered already: no-op
    assert (device.read(0x20, 4), device.read(0x24, 4)) == (RequestStatus.DONE, 2)
    assert device.read(0x04, 4) == 2  # VERSION: the request registers are there


def test_device_checkpoint_answers_a_pending_checkpoint_request_in_the_saved_state_first() -> None:
    """The saved state says done (with the increment) while the running guest still sees
    pending; the commit makes it done, a failure failed."""
    for ok in (True, False):
        device = GuestInform(on_request=lambda request: None)
        device.write(0x14, 4, 1)
        request = GuestRequest(RequestCode.CHECKPOINT, 0, 1)
        device.checkpoint_started(increment=5)
        assert not device.is_pending(request)  # the worker need not take another one
        saved = QEMUFile.memory()
        save_state(saved, VMSTATE_GUEST_INFORM, device.state)
        assert device.read(0x20, 4) == RequestStatus.PENDING  # the running guest waits
        loaded = GuestInformState()
        load_state(QEMUFile.memory(saved.getvalue()), VMSTATE_GUEST_INFORM, loaded, 1)
        assert (loaded.request_status, loaded.request_result) == (RequestStatus.DONE, 5)
        device.checkpoint_finished(ok)
        assert (device.read(0x20, 4), device.read(0x24, 4)) == \
            ((RequestStatus.DONE, 5) if ok else (RequestStatus.FAILED, ERR_FAILED))


def test_device_a_request_pending_in_a_reloaded_state_fails_as_interrupted() -> None:
    device = GuestInform(on_request=lambda request: None)
    device.write(0x14, 4, 2)
    device.restored()
    assert (device.read(0x20, 4), device.read(0x24, 4)) == (RequestStatus.FAILED,
                                                            ERR_INTERRUPTED)
    assert device.read(0x10, 4) == 1


def test_vmstate_request_subsection_bytes_and_v1_streams() -> None:
    """No request made: the bytes of guest-inform v1.  A request: a subsection after them.
    A v1 stream loads with the request registers idle, whatever they held."""
    state = GuestInformState(checkpoint_count=3, restore_count=1, request=0, request_count=0)
    f = QEMUFile.memory()
    save_state(f, VMSTATE_GUEST_INFORM, state)
    v1 = bytes.fromhex("00000003" "00000000" "00000001" "00000000" "00000000")
    assert f.getvalue() == v1
    state.request, state.request_count = 2, 1
    state.request_argument, state.request_status, state.request_result = 7, 3, 5
    f = QEMUFile.memory()
    save_state(f, VMSTATE_GUEST_INFORM, state)
    assert f.getvalue() == b"".join([
        bytes.fromhex("00000003" "00000000" "00000001" "00000002" "00000001"),
        b"\x05",  # QEMU_VM_SUBSECTION
        b"\x14guest-inform/request",  # u8 length, name
        b"\x00\x00\x00\x01",  # be32 version 1
        b"\x00\x00\x00\x07",  # request_argument
        b"\x00\x00\x00\x03",  # request_status (FAILED)
        b"\x00\x00\x00\x05",  # request_result
    ])
    target = GuestInformState(request_argument=9, request_status=1, request_result=4)
    load_state(QEMUFile.memory(v1), VMSTATE_GUEST_INFORM, target, 1)
    assert (target.checkpoint_count, target.restore_count) == (3, 1)
    assert (target.request_argument, target.request_status, target.request_result) == (0, 0, 0)


def test_negative_vmstate_request_status_out_of_range() -> None:
    state = GuestInformState(request_status=2)
    f = QEMUFile.memory()
    save_state(f, VMSTATE_GUEST_INFORM, state)
    data = f.getvalue()
    with pytest.raises(FormatError, match="request status 7"):
        load_state(QEMUFile.memory(data[:-8] + b"\x00\x00\x00\x07" + data[-4:]),
                   VMSTATE_GUEST_INFORM, GuestInformState(), 1)


# -- the guest's own requests, carried out --------------------------------------------------

CHECKPOINT_THEN_OFF = INFORM + ask(1) + poll("wait") + SYSTEM_OFF


def test_guest_checkpoint_request_is_taken_and_a_reload_of_it_goes_on_from_the_poll(
        tmp_path: Path) -> None:
    chpt = tmp_path / "guest.chpt"
    with serving(guest(CHECKPOINT_THEN_OFF), chpt) as served:
        assert served.run().reason is StopReason.SHUTDOWN
        x = served.x()
    assert (x[3], x[5]) == (RequestStatus.DONE, 0)  # never restored
    assert x[4] == 0  # increment 0
    assert increments(chpt) == 1
    machine, _ = reload_file(str(chpt))
    with machine:
        # saved while the guest polled: the state there says done already
        assert machine.guest_inform.state.request_status == RequestStatus.DONE
        assert machine.run().reason is StopReason.SHUTDOWN
        again = machine.cpu_state().x
    assert (again[3], again[5]) == (RequestStatus.DONE, 1)
    assert again[4] == 0


def test_guest_checkpoint_request_saved_state_holds_the_increment_index(tmp_path: Path) -> None:
    chpt = tmp_path / "guest.chpt"
    twice = INFORM + ask(1) + poll("first") + ask(1) + poll("second") + SYSTEM_OFF
    with serving(guest(twice), chpt) as served:
        served.run()
    for count in (1, 2):
        machine, _ = reload_file(str(chpt), count)
        with machine:
            assert machine.guest_inform.state.request_result == count - 1


RELOAD_GUEST = INFORM + ask(1) + poll("wait_checkpoint") + """
    cbnz w5, finish                // the second life, reloaded from the checkpoint: done
    movz x6, #0x4010, lsl #16      // the first life leaves a mark the reload must undo
    mov x7, #0x77
    str x7, [x6]
""" + ask(2, argument=1) + poll("wait_reload") + """
    mov x9, #0xbad                 // reached only if the reload failed
finish:
""" + SYSTEM_OFF


def test_guest_reload_request_swaps_in_the_machine_of_its_checkpoint(tmp_path: Path) -> None:
    chpt, sock = tmp_path / "guest.chpt", tmp_path / "inform.sock"
    with serving(guest(RELOAD_GUEST), chpt, SocketAddress("unix", path=str(sock))) as served:
        with Listener(sock) as listener:
            first = served.vm.machine
            result = served.run()
            told = listener.until(b"R1\n")
        assert result.reason is StopReason.SHUTDOWN
        machine = served.vm.machine
        assert machine is not None and machine is not first
        x = served.x()
        assert machine.read_memory(0x4010_0000, 8) == bytes(8)  # RAM as at the checkpoint
        assert (x[3], x[5], x[9]) == (RequestStatus.DONE, 1, 0)
    assert told == b"cCR1\n"


def test_guest_quit_request_ends_the_run(tmp_path: Path) -> None:
    with serving(guest(INFORM + ask(3) + poll("wait") + "spin:\n    b spin\n")) as served:
        result = served.run()
        machine = served.vm.machine
        assert machine is not None
        assert result.reason is StopReason.QUIT
        assert machine.guest_inform.state.request_status == RequestStatus.DONE


def test_guest_requests_that_cannot_be_carried_out_fail_and_the_guest_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a reload with no checkpoint file yet; then a checkpoint to the default destination,
    # which cannot be made (its state directory is a file)
    (tmp_path / "state").write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    source = INFORM + ask(2) + poll("wait_reload") + "mov x6, x3\nmov x7, x4\n" + \
        ask(1) + poll("wait_checkpoint") + SYSTEM_OFF
    with serving(guest(source)) as served:
        assert served.run().reason is StopReason.SHUTDOWN
        x = served.x()
    assert (x[6], x[7]) == (RequestStatus.FAILED, ERR_NO_FILE)
    assert (x[3], x[4]) == (RequestStatus.FAILED, ERR_FAILED)


def test_workload_asks_for_its_own_checkpoints_and_each_reloads_to_the_rest_of_its_run(
        tmp_path: Path) -> None:
    text = "pattern=random,working_set=64K,passes=6,report=1,checkpoint_every=2,seed=3"
    expected = expected_output(WorkloadOptions.parse(text))
    chpt = tmp_path / "workload.chpt"
    with serving(workload(text), chpt) as served:
        assert served.run().reason is StopReason.SHUTDOWN
        machine = served.vm.machine
        assert machine is not None
        assert bytes(machine.uart_output) == expected
    assert increments(chpt) == 3
    lines = expected.splitlines(keepends=True)
    for count, after in ((1, 2), (2, 4), (3, 6)):
        rest = b"".join(lines[lines.index(f"pyvmm-workload: checkpoint after pass {after}\n"
                                          .encode()) + 1:])
        machine, _ = reload_file(str(chpt), count)
        with machine:  # no host serves it now: its later requests fail, and it goes on
            assert machine.run().reason is StopReason.SHUTDOWN
            assert bytes(machine.uart_output) == rest


# -- listeners on the socket --------------------------------------------------------------------

class Listener:
    """A listener's connection, read up to a marker at a time (the rest kept for later)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(str(path))
        self.buffer = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, end: bytes) -> bytes:
        """What arrives up to and including the first ``end`` (AssertionError at EOF first)."""
        while end not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, f"EOF after {self.buffer!r}, waiting for {end!r}"
            self.buffer += chunk
        at = self.buffer.index(end) + len(end)
        data, self.buffer = self.buffer[:at], self.buffer[at:]
        return data

    def rest(self) -> int:
        """Read to EOF (or a reset); how many bytes came."""
        received = len(self.buffer)
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += len(chunk)


FOREVER = "pattern=sequential,working_set=64K,passes=0,report=0"


def test_listeners_are_told_and_obeyed(tmp_path: Path) -> None:
    chpt, path = tmp_path / "vm.chpt", tmp_path / "inform.sock"
    with serving(workload(FOREVER), chpt, SocketAddress("unix", path=str(path))) as served:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        run = served.run_aside()
        with Listener(path) as one, Listener(path) as two:
            one.send(b"h")
            assert one.until(HELP[-40:]) == HELP
            one.send(b"x\n\x01")
            assert one.until(b"\n") == b"!unknown request 'x' (h: help)\n"
            assert one.until(b"\n") == b"!unknown request '\\x01' (h: help)\n"
            one.send(b"c")
            assert one.until(b"C") == two.until(b"C") == b"cC"
            served.vm.checkpoint()  # anyone's checkpoint is told
            assert two.until(b"C") == b"cC"
            assert one.until(b"C") == b"cC"
            two.send(b"r1\n")
            assert one.until(b"\n") == two.until(b"\n") == b"R1\n"
            two.send(b"r")
            assert two.until(b"\n") == b"R2\n"
            assert one.until(b"\n") == b"R2\n"
            two.send(b"r7")
            error = two.until(b"\n")
            assert error.startswith(b"!r7: ") and error.endswith(b"holds 2 increment(s), not 7\n"), error
            one.send(b"q")
            assert run.result(DEADLINE).reason is StopReason.QUIT
        assert increments(chpt) == 2
    assert not path.exists()  # removed at the end


def test_a_request_of_a_machine_a_reload_replaced_acts_on_no_other(tmp_path: Path) -> None:
    """A request still queued when a reload swapped its machine out is not carried out on the
    machine that replaced it."""
    chpt, path = tmp_path / "vm.chpt", tmp_path / "inform.sock"
    with serving(workload(FOREVER), chpt, SocketAddress("unix", path=str(path))) as served:
        run = served.run_aside()
        old = served.vm.machine
        assert old is not None
        stale = old.guest_inform
        with Listener(path) as listener:
            listener.send(b"c")
            assert listener.until(b"C") == b"cC"
            listener.send(b"r")
            assert listener.until(b"\n") == b"R1\n"
            stale.write(0x14, 4, 1)  # the old guest's checkpoint request, late
            listener.send(b"c")  # carried out after it, in order
            assert listener.until(b"C") == b"cC"
        assert (stale.read(0x20, 4), stale.read(0x24, 4)) == (RequestStatus.FAILED,
                                                              ERR_INTERRUPTED)
        assert increments(chpt) == 2  # the listener's two checkpoints, no third
        served.vm.quit()
        assert run.result(DEADLINE).reason is StopReason.QUIT


def test_a_listener_that_does_not_read_is_dropped_and_holds_nobody(tmp_path: Path) -> None:
    chpt, path = tmp_path / "vm.chpt", tmp_path / "inform.sock"
    flood = 8192
    with serving(workload(FOREVER), chpt, SocketAddress("unix", path=str(path))) as served:
        run = served.run_aside()
        with Listener(path) as deaf, Listener(path) as other:
            deaf.send(b"h" * flood)  # owed megabytes it never reads
            other.send(b"c")
            assert other.until(b"C") == b"cC"  # the guest and the checkpoint go on
            assert deaf.rest() < flood * len(HELP) // 4  # dropped, not paid in full
            other.send(b"h")
            assert other.until(HELP[-40:]) == HELP
            served.vm.quit()
            assert run.result(DEADLINE).reason is StopReason.QUIT


def test_listeners_past_the_limit_are_turned_away(tmp_path: Path) -> None:
    path = tmp_path / "inform.sock"
    with serving(workload(FOREVER), address=SocketAddress("unix", path=str(path))):
        kept = [Listener(path) for _ in range(MAX_LISTENERS)]
        try:
            for listener in kept:  # each one served: each was accepted before the next came
                listener.send(b"h")
                listener.until(HELP[-40:])
            with Listener(path) as extra:
                assert extra.rest() == 0
        finally:
            for listener in kept:
                listener.sock.close()


def test_after_the_channel_closes_guest_requests_fail_at_once() -> None:
    """Nobody serves requests any more: the guest is told so at once, never left polling."""
    machine = guest(CHECKPOINT_THEN_OFF)
    vm = VmController(machine, settings=MigrationSettings(durable=False))
    try:
        start_guest_inform(vm, None).close()
        assert vm.run().reason is StopReason.SHUTDOWN
        x = machine.cpu_state().x
        assert (x[3], x[4]) == (RequestStatus.FAILED, ERR_NO_HOST)
    finally:
        vm.close()
        machine.close()


# -- through python -m pyvmm run ----------------------------------------------------------------

def test_cli_listener_checkpoints_reloads_and_quits_a_running_pyvmm(tmp_path: Path) -> None:
    path, chpt = tmp_path / "inform.sock", tmp_path / "vm.chpt"
    proc = start("run", "--guest-inform", f"unix:{path}", "--checkpoint", f"chpt:{chpt}",
                 "--no-fsync", "-q", "--workload", FOREVER)
    try:
        wait_for_socket(path, proc)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with Listener(path) as listener:
            listener.send(b"c")
            assert listener.until(b"C") == b"cC"
            listener.send(b"r\n")
            assert listener.until(b"\n") == b"R1\n"
            listener.send(b"q")
            # the run ends with its --checkpoint: told too, then the channel closes
            assert listener.until(b"C") == b"cC"
            assert listener.rest() == 0
        code, _out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, err
    assert increments(chpt) == 2
    assert not path.exists()


def test_cli_workload_checkpoint_every_and_a_reload_of_one_of_them(tmp_path: Path) -> None:
    text = "pattern=sequential,working_set=64K,passes=6,report=0,checkpoint_every=2"
    expected = expected_output(WorkloadOptions.parse(text))
    chpt = tmp_path / "self.chpt"
    code, out, err = finish(start("run", "--checkpoint", f"chpt:{chpt}", "--no-fsync", "-q",
                                  "--workload", text))
    assert code == 0, err
    assert out == expected
    assert increments(chpt) == 4  # after passes 2, 4, 6, and the end of the run
    code, out, err = finish(start("run", "--incoming", f"chpt:2:{chpt}", "-q"))
    assert code == 0, err
    assert out == expected[expected.index(b"checkpoint after pass 4\n") + 24:]


def test_qemu_analyzer_reads_the_request_subsection(tmp_path: Path) -> None:
    """QEMU's own analyze-migration.py walks a checkpoint the guest asked for with nothing but
    its VMDESCRIPTION: the subsection is QEMU's format, and says done."""
    analyzer = Path(os.environ.get("PYVMM_QEMU_ANALYZER") or
                    Path(__file__).resolve().parents[2] / "tests/data/qemu/analyze-migration.py")
    if not analyzer.is_file():
        pytest.fail(f"QEMU's analyzer is missing ({analyzer}): run scripts/fetch-qemu-analyzer")
    chpt, stream = tmp_path / "asked.chpt", tmp_path / "asked.qemu"
    text = "pattern=sequential,working_set=64K,passes=2,report=0,checkpoint_every=1"
    code, _out, err = finish(start("run", "--checkpoint", f"chpt:{chpt}", "--no-fsync", "-q",
                                   "--workload", text))
    assert code == 0, err
    states = []
    for increment in (0, 2):  # the guest's first checkpoint; the run's end (nothing pending)
        code, _out, err = finish(start("checkpoint", "export", "--increment", str(increment),
                                       "-o", stream, chpt))
        assert code == 0, err
        dump = subprocess.run([sys.executable, str(analyzer), "-f", str(stream), "-d", "state"],
                              capture_output=True, text=True, timeout=DEADLINE, check=True)
        states.append(json.loads(dump.stdout)["guest-inform (4)"])
    asked, ended = states
    assert asked["request"] == "0x00000001"  # a checkpoint
    assert asked["guest-inform/request"]["request_status"] == "0x00000002"  # done
    assert ended["guest-inform/request"]["request_status"] == "0x00000002"  # the 2nd, done
