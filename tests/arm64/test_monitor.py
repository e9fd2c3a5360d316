"""The monitor, through the paths its users take: QEMU's own QMP client library (``qemu.qmp``'s
QMPClient), ``qmp-shell``, the ``pyvmm monitor`` client, HMP on a socket and on the terminal.

Every run here is a real ``python -m pyvmm run`` process.  Nothing depends on host speed: the
guests are started paused (``--paused``) and stopped before what must be exact is checked, and
every wait is for an event or a reply, with a generous deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pyvmm_process
from pyvmm_process import DEADLINE, finish, quit_disconnect, wait_for_socket
from qemu.qmp import QMPClient

from pyvmm.guests.workload import WorkloadOptions, expected_output
from pyvmm.migration.container import CheckpointFile

# ~1G guest instructions (8 s at 123M/s): far longer than the checkpoints taken while it runs
WORKLOAD = "pattern=sequential,working_set=64K,passes=1500000,report=0"


def start(*args: str | Path, env: dict[str, str] | None = None,
          stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return pyvmm_process.start("run", *args, env=env, stdin=stdin)


def drive(proc: subprocess.Popen[bytes], session: Any) -> Any:
    """Run the coroutine ``session`` against ``proc``; if it fails, say what pyvmm said."""
    try:
        return asyncio.run(session)
    except Exception as err:
        proc.kill()
        _out, stderr = proc.communicate()
        raise AssertionError(f"{err!r}; pyvmm ended {proc.returncode}: "
                             f"{stderr.decode(errors='replace')[-3000:]}") from err


@contextmanager
def running(*args: str | Path, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    proc = start(*args, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def wait_event(client: QMPClient, name: str, **data: Any) -> dict[str, Any]:
    """The next event ``name`` whose data holds ``data`` (earlier ones are skipped)."""
    async def match() -> dict[str, Any]:
        async for event in client.events:
            if event["event"] == name and all(event.get("data", {}).get(k) == v
                                              for k, v in data.items()):
                return dict(event)
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(match(), DEADLINE)


def test_qmp_client_drives_live_incremental_checkpoints_and_a_deferred_reload(
        tmp_path: Path) -> None:
    """QEMU's QMPClient: negotiate, set capabilities, take live incremental checkpoints while
    the guest runs (each awaited through MIGRATION events), read query-migrate; then reload the
    file into a second pyvmm started with --incoming defer, through migrate-incoming, and the
    guest goes on to exactly the output of an uninterrupted run."""
    sock, chpt = tmp_path / "vm.qmp", tmp_path / "vm.chpt"
    options = WorkloadOptions.parse(WORKLOAD)

    async def save() -> dict[str, Any]:
        client = QMPClient("save")
        await client.connect(str(sock))
        assert (await client.execute("query-status"))["status"] == "prelaunch"
        await client.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "incremental", "state": True},
            {"capability": "live", "state": True}]})
        await client.execute("migrate-set-parameters", {"tracker": "wp"})
        await client.execute("cont")
        for _ in range(3):
            await client.execute("migrate", {"uri": f"chpt:{chpt}"})
            event = await wait_event(client, "CHECKPOINT")
            await wait_event(client, "MIGRATION", status="completed")
        assert (await client.execute("query-status"))["running"] is True
        await client.execute("stop")
        await client.execute("migrate", {"uri": f"chpt:{chpt}"})
        await wait_event(client, "MIGRATION", status="completed")
        reply = await client.execute("query-migrate")
        checkpoints = await client.execute("query-checkpoints")
        await client.execute("quit")
        await quit_disconnect(client)
        return {"migrate": reply, "event": event, "checkpoints": checkpoints}

    with running("--qmp", f"unix:{sock}", "--paused", "--no-fsync", "-q",
                 "--workload", WORKLOAD) as proc:
        wait_for_socket(sock, proc)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        saved = drive(proc, save())
        code, first_out, err = finish(proc)
    assert code == 0, err
    reply = saved["migrate"]
    assert reply["status"] == "completed"
    ram = reply["ram"]
    assert ram["page-size"] == 4096 and ram["total"] == 256 << 20
    assert ram["dirty-sync-count"] == 4 and ram["remaining"] == 0
    assert ram["transferred"] >= ram["normal"] * 4096 and reply["downtime"] <= reply["total-time"]
    assert saved["event"]["data"]["capabilities"] == ["incremental", "live"]
    with CheckpointFile.open(chpt) as container:
        kinds = [i.kind for i in container.header.increments]
    assert kinds == ["full", "incremental", "incremental", "incremental"]
    assert [i["kind"] for i in saved["checkpoints"]["increments"]] == kinds

    async def reload() -> None:
        client = QMPClient("reload")
        await client.connect(str(sock))
        assert (await client.execute("query-status"))["status"] == "inmigrate"
        await client.execute("migrate-incoming", {"uri": f"chpt:{chpt}"})
        await client.disconnect()

    with running("--qmp", f"unix:{sock}", "--incoming", "defer", "-q") as proc:
        wait_for_socket(sock, proc)
        drive(proc, reload())
        code, rest_out, err = finish(proc)
    assert code == 0, err
    assert first_out + rest_out == expected_output(options)


def test_qmp_shell_and_its_hmp_mode_drive_pyvmm(tmp_path: Path) -> None:
    """qmp-shell (qemu.qmp's, unmodified) in QMP and in HMP mode (-H)."""
    sock, chpt = tmp_path / "vm.qmp", tmp_path / "vm.chpt"
    shell = Path(sys.executable).with_name("qmp-shell")
    assert shell.exists(), "qmp-shell comes with qemu.qmp (a test dependency)"
    with running("--qmp", f"unix:{sock}", "--paused", "--no-fsync", "-q",
                 "--workload", WORKLOAD) as proc:
        wait_for_socket(sock, proc)
        qmp = subprocess.run([shell, str(sock)], input=(
            b"query-status\n"
            b"migrate-set-capabilities capabilities=[{\"capability\":\"incremental\","
            b"\"state\":true}]\n"
            b"query-migrate-capabilities\n"
            b"no-such-command\n"), capture_output=True, timeout=DEADLINE, check=False)
        text = qmp.stdout.decode()
        assert '"status": "prelaunch"' in text, text
        assert '{"capability": "incremental", "state": true}' in text, text
        assert "CommandNotFound" in text, text
        hmp = subprocess.run([shell, "-H", str(sock)], input=(
            "info migrate_capabilities\n"
            f"migrate chpt:{chpt}\n"
            "info status\n"
            "quit\n").encode(), capture_output=True, timeout=DEADLINE, check=False)
        text = hmp.stdout.decode()
        assert "incremental: on" in text, text
        assert "checkpoint 0 (full)" in text, text
        assert "VM status: paused (prelaunch)" in text, text
        code, _out, err = finish(proc)
    assert code == 0, err
    with CheckpointFile.open(chpt) as container:
        assert [i.kind for i in container.header.increments] == ["full"]


def hmp_client(address: str, lines: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", "monitor", address], input=lines,
                          capture_output=True, text=True, timeout=DEADLINE, check=False)


@pytest.mark.parametrize("kind", ["qmp", "hmp"])
def test_pyvmm_monitor_client_runs_an_hmp_session(tmp_path: Path, kind: str) -> None:
    """``pyvmm monitor unix:PATH`` on a QMP socket (through human-monitor-command) and on an
    HMP socket: capabilities show before the first checkpoint, set/stop/migrate/info, errors
    as text, and quit ends the run."""
    sock, chpt = tmp_path / "vm.sock", tmp_path / "vm.chpt"
    option = "--qmp" if kind == "qmp" else "--monitor"
    with running(option, f"unix:{sock}", "--no-fsync", "-q", "--workload",
                 WORKLOAD.replace("passes=1500000", "passes=0")) as proc:
        wait_for_socket(sock, proc)
        session = hmp_client(f"unix:{sock}", "\n".join([
            "info migrate",
            "migrate_set_capability checksum on",
            "migrate_set_capability bogus on",
            "migrate_set_parameter max-increments 5",
            "info migrate_parameters",
            "stop",
            "info status",
            f"migrate {chpt}",
            f"migrate chpt:{chpt}",
            "info migrate",
            "cont",
            "info status",
            "frobnicate",
            "quit",
        ]) + "\n")
        code, _out, err = finish(proc)
    assert session.returncode == 0, session.stderr
    out = session.stdout
    assert out.startswith("capabilities: incremental: off live: off cow: off checksum: off "
                          "compress: off\n")
    assert "Error: Parameter 'capability' does not accept value 'bogus'" in out
    assert "max-increments: 5" in out
    assert "VM status: paused\n" in out and "VM status: running\n" in out
    assert "Error: invalid checkpoint target" in out
    assert "checkpoint 0 (full)" in out
    assert "capabilities: incremental: off live: off cow: off checksum: on compress: off\n" \
           "Migration status: completed" in out
    assert "unknown command: 'frobnicate'" in out
    assert code == 0, err
    with CheckpointFile.open(chpt) as container:
        assert container.header.capabilities == ("checksum",)
        assert len(container.header.increments) == 1


def test_pyvmm_monitor_qmp_one_shot_and_its_errors(tmp_path: Path) -> None:
    sock = tmp_path / "vm.qmp"

    def qmp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pyvmm", "monitor", f"unix:{sock}",
                               "--qmp", *args], capture_output=True, text=True,
                              timeout=DEADLINE, check=False)

    env = {"VM_UID": "lab-vm-7"}
    with running("--qmp", f"unix:{sock}", "--paused", "-q", env=env) as proc:
        wait_for_socket(sock, proc)
        name = qmp("query-name")
        assert name.returncode == 0 and json.loads(name.stdout) == {"name": "lab-vm-7"}
        bad = qmp("migrate", '{"uri": 5}')
        assert bad.returncode == 1
        assert bad.stderr == "pyvmm: error: GenericError: Invalid parameter type for 'uri', " \
                             "expected: string\n"
        assert qmp("migrate", "{not json").returncode == 1
        assert qmp("no-such").stderr.startswith("pyvmm: error: CommandNotFound: ")
        assert qmp("quit").returncode == 0
        code, _out, err = finish(proc)
    assert code == 0, err
    missing = subprocess.run([sys.executable, "-m", "pyvmm", "monitor", f"unix:{sock}"],
                             capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"pyvmm: error: cannot connect to unix:{sock}")


def test_migrate_to_the_default_destination_names_the_vm(tmp_path: Path) -> None:
    """``migrate chpt:`` writes to the VM's default destination, named after its VM id."""
    sock = tmp_path / "vm.qmp"
    env = {"VM_UID": "lab-vm-8", "XDG_STATE_HOME": str(tmp_path / "state")}
    with running("--qmp", f"unix:{sock}", "--paused", "-q", "--no-fsync", env=env) as proc:
        wait_for_socket(sock, proc)
        session = hmp_client(f"unix:{sock}", "migrate chpt:\ninfo name\nquit\n")
        code, _out, err = finish(proc)
    assert code == 0, err
    assert "lab-vm-8\n" in session.stdout
    default = tmp_path / "state" / "pyvmm" / "checkpoints" / "lab-vm-8.chpt"
    with CheckpointFile.open(default) as container:
        assert len(container.header.increments) == 1


def test_hmp_on_the_terminal(tmp_path: Path) -> None:
    """``--monitor stdio``: commands read from standard input; quit ends the run (and the
    --checkpoint end-of-run checkpoint is still written)."""
    chpt = tmp_path / "vm.chpt"
    proc = start("--monitor", "stdio", "--paused", "--no-fsync", "--checkpoint", f"chpt:{chpt}",
                 stdin=subprocess.PIPE)
    out, err = proc.communicate(b"info status\ncont\ninfo status\nstop\nquit\n",
                                timeout=DEADLINE)
    assert proc.returncode == 0, err
    text = out.decode()
    assert "VM status: paused (prelaunch)\n" in text and "VM status: running\n" in text
    assert b"ended by quit" in err
    with CheckpointFile.open(chpt) as container:
        assert len(container.header.increments) == 1


@pytest.mark.parametrize("args, message", [
    (("--incoming", "defer"), "--incoming defer waits for a monitor's migrate-incoming"),
    (("--paused",), "--paused waits for a monitor's cont"),
    (("--qmp", "udp:1.2.3.4:5"), "--qmp udp:1.2.3.4:5: expected unix:PATH or tcp:HOST:PORT"),
    (("--monitor", "stdio", "--stdin", "-", "--guest", "x"), "--monitor stdio and --stdin -"),
])
def test_negative_monitor_options_are_one_line(args: tuple[str, ...], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", *args], capture_output=True,
                          text=True, timeout=DEADLINE, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"pyvmm: error: {message}"), proc.stderr
    assert proc.stderr.count("\n") == 1


def listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_negative_socket_paths_refused_or_reclaimed(tmp_path: Path) -> None:
    """A regular file is never replaced; a live socket is not taken over; a stale one (its
    pyvmm killed) is replaced."""
    taken = tmp_path / "file"
    taken.write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--qmp", f"unix:{taken}"],
                          capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert proc.returncode == 1 and "is not a socket" in proc.stderr
    assert taken.read_text() == "keep me"
    live = tmp_path / "live.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(live))
    server.listen(1)
    try:
        proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--qmp", f"unix:{live}"],
                              capture_output=True, text=True, timeout=DEADLINE, check=False)
        assert proc.returncode == 1 and "another process is listening" in proc.stderr
    finally:
        server.close()
    # now stale: nobody listens on it
    with running("--qmp", f"unix:{live}", "--paused", "-q") as run:
        deadline = time.monotonic() + DEADLINE
        while not listening(live):
            assert run.poll() is None and time.monotonic() < deadline, "never replaced"
            time.sleep(0.01)
        session = hmp_client(f"unix:{live}", "info status\nquit\n")
        assert "VM status: paused (prelaunch)" in session.stdout, session.stderr
        code, _out, err = finish(run)
    assert code == 0, err
    assert not live.exists()  # removed at the end of the run
