"""QFS, the control filesystem, through real file operations on a real mount: a shell triggers
checkpoints, waits for them, reads their statistics (the file's own), reloads an increment,
stops and quits the guest; abuse gets errors only; the mount goes with the run however it ends,
and a stale one a SIGKILL left is cleaned by the next start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pyvmm_process
from pyvmm_process import DEADLINE, finish

from pyvmm.migration.container import CheckpointFile

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="QFS needs /dev/fuse and fusermount3 (scripts/install installs fuse3)")

WORKLOAD = "pattern=random,working_set=4M,passes=0,report=0"


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``command`` by bash (whose echo names the errno a write got; dash says I/O error)."""
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=DEADLINE, check=False)


def serving(path: Path) -> bool:
    """A mount at ``path`` that answers (a stale one a killed pyvmm left does not: ENOTCONN;
    a file is read, since the kernel may answer a stat from its cache)."""
    try:
        (path / "control/status").read_text()
    except OSError:
        return False
    return os.path.ismount(path)


def unmount_left(path: Path) -> None:
    """A test that killed its pyvmm leaves its mount behind: take it away (lazily)."""
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


@contextmanager
def cleaned(proc: subprocess.Popen[bytes], mount: Path) -> Iterator[None]:
    """Whatever a test does, its pyvmm does not outlive it, nor does its mount."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        unmount_left(mount)


def mounted(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not serving(path):
        if proc.poll() is not None:
            raise AssertionError(f"pyvmm ended ({proc.returncode}) before mounting: "
                                 f"{proc.stderr.read().decode() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "QFS did not appear"
        time.sleep(0.02)  # the mount is the event; nothing else to wait on


def start(tmp_path: Path, mount: Path, *args: str) -> subprocess.Popen[bytes]:
    proc = pyvmm_process.start("run", "--qfs", mount, "--workload", WORKLOAD, "-q",
                               "--checkpoint", f"chpt:{tmp_path / 'c.chpt'}", "--ram", "64M",
                               *args)
    mounted(mount, proc)
    # the mount comes up before the guest starts (prelaunch): its first instructions
    until("cat control/status", mount, lambda out: out == "running\n")
    return proc


def until(command: str, cwd: Path, predicate: Any) -> str:
    """Run ``command`` until ``predicate(its stdout)`` holds (within DEADLINE)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        out = sh(command, cwd).stdout
        if predicate(out):
            return out
        assert time.monotonic() < deadline, f"{command}: still {out!r}"
        time.sleep(0.05)


def test_a_shell_drives_checkpoints_statistics_and_a_reload(tmp_path: Path) -> None:
    mount = tmp_path / "qfs"
    proc = start(tmp_path, mount)
    with cleaned(proc, mount):
        q = mount / "checkpoints"
        assert sh("cat control/status", mount).stdout == "running\n"
        assert sh("cat checkpoints/destination", mount).stdout == f"chpt:{tmp_path}/c.chpt\n"
        assert sh("echo 'incremental on' > checkpoints/capabilities && "
                  "cat checkpoints/capabilities", mount).stdout.startswith("incremental on\n")
        # one increment: trigger, wait
        done = sh("echo now > checkpoints/trigger && cat checkpoints/wait_until_finished", mount)
        assert done.returncode == 0 and done.stdout == "completed\n", done.stderr
        assert (q / "info/count").read_text() == "1\n"
        # several, periodically; then stopped
        assert sh("echo periodic:0.2 > checkpoints/trigger", mount).returncode == 0
        until("cat checkpoints/info/count", mount, lambda out: int(out) >= 4)
        assert sh("echo periodic:0 > checkpoints/trigger", mount).returncode == 0
        sh("cat checkpoints/wait_until_finished", mount)
        count = int((q / "info/count").read_text())
        # the statistics files are the file's own (checkpoint info --json)
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "pyvmm", "checkpoint", "info", "--json", tmp_path / "c.chpt"],
            capture_output=True, text=True, check=True).stdout)
        assert len(info["increments"]) == count
        for inc in info["increments"][:3]:
            folder = q / f"info/checkpoint_{inc['index']:02d}"
            for key in ("downtime_ms", "total_ms", "pages", "kind", "bytes_written"):
                assert (folder / key).read_text() == f"{inc['stats'][key]}\n", key
            assert json.loads((folder / "stats.json").read_text()) == inc["stats"]
        assert sorted(os.listdir(q / "reload")) == [f"increment_{n:02d}"
                                                    for n in range(1, count + 1)]
        assert int((q / "info/nb_dirty_pages").read_text()) >= 0
        # every readable file reads as text ending in a newline (the blocking one aside)
        for folder, _dirs, files in os.walk(mount):
            for name in files:
                path = Path(folder) / name
                if name != "wait_until_finished" and os.stat(path).st_mode & 0o400:
                    text = path.read_text()
                    assert text.endswith("\n"), path
        assert float((q / "info/time_since_last").read_text()) >= 0
        # reload the first increment into this process: the guest runs on from it
        assert sh("touch checkpoints/reload/increment_01", mount).returncode == 0
        assert sh("cat control/status", mount).stdout == "running\n"
        assert (mount / "info/pid").read_text() == f"{proc.pid}\n"
        assert sh("echo stop > control/stop && cat control/status", mount).stdout == "paused\n"
        assert sh("touch control/cont && cat control/status", mount).stdout == "running\n"
        assert sh("touch control/quit", mount).returncode == 0
        code, _out, err = finish(proc)
        assert code == 0, err
        assert err == b"", err  # nothing said: no libfuse chatter either
        assert not os.path.ismount(mount)
        with CheckpointFile.open(tmp_path / "c.chpt") as container:
            assert len(container.header.increments) >= count  # quit's own checkpoint too


def test_two_readers_wake_and_a_trigger_gets_the_monitors_answer(tmp_path: Path) -> None:
    mount = tmp_path / "qfs"
    proc = start(tmp_path, mount)
    with cleaned(proc, mount):
        assert sh("echo periodic:0.3 > checkpoints/trigger", mount).returncode == 0
        readers = [subprocess.Popen(["cat", "checkpoints/wait_until_finished"], cwd=mount,
                                    stdout=subprocess.PIPE, text=True) for _ in range(2)]
        busy = sh("echo now > checkpoints/trigger", mount)  # while the periodic one runs
        assert busy.returncode != 0 and "Invalid argument" in busy.stderr
        assert sh("echo periodic:0 > checkpoints/trigger", mount).returncode == 0
        outs = [reader.communicate(timeout=DEADLINE)[0] for reader in readers]
        assert all(out in ("completed\n", "cancelled\n") for out in outs), outs
        sh("touch control/quit", mount)
        code, _out, err = finish(proc)
        assert code == 0
        # the refused trigger's reason is QMP's own for a migrate in that state
        assert "There's a migration process in progress" in err.decode()


def test_abuse_gets_errors_only_and_loses_nothing(tmp_path: Path) -> None:
    mount = tmp_path / "qfs"
    proc = start(tmp_path, mount)
    with cleaned(proc, mount):
        assert sh("echo now > checkpoints/trigger; cat checkpoints/wait_until_finished",
                  mount).stdout == "completed\n"
        for command in ("head -c 100000 /dev/zero > checkpoints/trigger",
                        "head -c 64 /dev/urandom > checkpoints/trigger",
                        "printf 'incremental maybe' > checkpoints/capabilities",
                        "echo periodic:-1 > checkpoints/trigger",
                        "echo block:none > checkpoints/trigger",
                        "echo chpt:2:x > checkpoints/destination",
                        "echo x > control/status",
                        "cat nothing/here", "touch checkpoints/reload/increment_99",
                        "mkdir new", "mv control other", "rm -rf checkpoints control info"):
            result = sh(command, mount)
            assert result.returncode != 0, command
            assert sh("cat control/status", mount).stdout == "running\n", command
        assert (mount / "checkpoints/info/count").read_text() == "1\n"
        assert sorted(os.listdir(mount)) == ["checkpoints", "control", "info"]
        sh("touch control/quit", mount)
        code, _out, err = finish(proc)
        assert code == 0, err
        text = err.decode()
        assert "pyvmm: qfs: /checkpoints/trigger: a write of" in text
        assert "block:none does not map onto pyvmm" in text


def test_the_mount_goes_with_the_run_and_a_stale_one_is_cleaned(tmp_path: Path) -> None:
    mount = tmp_path / "qfs"
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = start(tmp_path, mount)
        proc.send_signal(signum)
        code, _out, _err = finish(proc)
        assert code == 128 + signum and not os.path.ismount(mount), signum
    proc = start(tmp_path, mount)
    proc.kill()  # SIGKILL: nothing unmounts
    proc.communicate()
    assert os.path.ismount(mount) and not serving(mount)  # stale: ENOTCONN
    again = start(tmp_path, mount)
    with cleaned(again, mount):
        assert sh("cat control/status", mount).stdout == "running\n"
        sh("touch control/quit", mount)
        code, _out, err = finish(again)
        assert code == 0 and "qfs: cleaned a stale mount" in err.decode()
        assert not os.path.ismount(mount)  # its own unmount, before cleaned() looks


@pytest.mark.parametrize("make, message", [
    (lambda p: (p.mkdir(), (p / "x").write_text("x")), "not empty"),
    (lambda p: p.write_text("x"), "not a directory"),
    (lambda p: (p.mkdir(), os.chown(p, 65534, 65534)), "belongs to another user (uid 65534)"),
])
def test_negative_a_mount_point_that_cannot_be_used_is_one_line(
        tmp_path: Path, make: object, message: str) -> None:
    mount = tmp_path / "qfs"
    assert callable(make)
    make(mount)
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--qfs", str(mount), "-q",
                           "--max-insns", "1000"], capture_output=True, text=True,
                          timeout=DEADLINE, check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"pyvmm: error: --qfs {mount}: {message}\n"


def test_the_default_mount_point_is_named_by_the_vm_id_and_only_its_user_gets_in(
        tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "VM_UID": "qfs-test"}
    mount = tmp_path / "state/pyvmm/qfs/qfs-test"
    proc = pyvmm_process.start("run", "--qfs", "--workload", WORKLOAD, "-q", "--ram", "64M",
                               env=env)
    with cleaned(proc, mount):
        mounted(mount, proc)
        until("cat control/status", mount, lambda out: out == "running\n")
        assert (mount / "info/vm_id").read_text() == "qfs-test\n"
        assert oct(os.stat(mount).st_mode & 0o777) == "0o700"
        other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                "cat", str(mount / "control/status")],
                               capture_output=True, text=True, check=False)
        assert other.returncode != 0 and "Permission denied" in other.stderr, other
        sh("touch control/quit", mount)
        code, _out, err = finish(proc)
        assert code == 0, err


def test_negative_without_the_fuse_binding_qfs_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "mfusepy.py").write_text("raise ImportError('not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--qfs", str(tmp_path / "q"),
                           "-q", "--max-insns", "1000"], capture_output=True, text=True,
                          env=env, timeout=DEADLINE, check=False)
    assert proc.returncode == 1
    assert proc.stderr == "pyvmm: error: --qfs needs mfusepy: pip install 'pyvmm[qfs]'\n"


def test_a_quit_as_soon_as_it_is_mounted_ends_the_run(tmp_path: Path) -> None:
    """The mount is up before the guest starts: a quit then (found nothing running to stop)
    still ends the run rather than being lost."""
    mount = tmp_path / "qfs"
    proc = pyvmm_process.start("run", "--qfs", mount, "--workload", WORKLOAD, "-q")
    with cleaned(proc, mount):
        mounted(mount, proc)
        assert sh("touch control/quit", mount).returncode == 0
        code, _out, err = finish(proc)
        assert code == 0, err


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_a_reload_through_qfs_runs_on_like_a_reload_from_the_command_line(
        tmp_path: Path) -> None:
    """``touch reload/increment_01`` in a running pyvmm: from then on the guest prints what a
    new ``run --incoming chpt:1:FILE`` prints, to the end of the run."""
    mount, chain = tmp_path / "qfs", tmp_path / "c.chpt"
    workload = "pattern=sequential,working_set=16M,passes=600,report=50"
    proc = pyvmm_process.start("run", "--qfs", mount, "--workload", workload, "-q",
                               "--checkpoint", f"chpt:{chain}")
    with cleaned(proc, mount):
        mounted(mount, proc)
        until("cat control/status", mount, lambda out: out == "running\n")
        done = sh("echo now > checkpoints/trigger && cat checkpoints/wait_until_finished", mount)
        assert done.stdout == "completed\n", done
        # a progress line printed after the checkpoint's pause (everything in the pipe now was
        # printed before `completed` came back): the reload must print it again
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        before = b""
        while chunk := os.read(fd, 1 << 16) if _readable(fd) else b"":
            before += chunk
        os.set_blocking(fd, True)
        after = b""
        while not after.endswith(b"\n"):
            after += os.read(fd, 1)
        assert sh("touch checkpoints/reload/increment_01", mount).returncode == 0
        code, rest, err = finish(proc)
        assert code == 0, err
        out = before + after + rest
    again = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--incoming",
                            f"chpt:1:{chain}", "-q"], capture_output=True, timeout=DEADLINE,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert b"done passes=600" in again.stdout and out.endswith(again.stdout)
    assert after in again.stdout  # printed after the pause: once before the reload, once after
    assert out.count(after) == 2
