"""Nothing lost, nothing destroyed: interrupted runs, a second writer, and bad targets.

Through the command line, as a user meets them (issue 14): two Ctrl-C during live periodic
checkpoints, a kill during the first checkpoint onto an existing file, a second writer on a
file in use, targets that are directories, FIFOs or devices, and ``-o`` onto them.  Every
assertion holds whatever instant a signal lands at; the random instants only widen coverage.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.errors import CheckpointWarning, PyvmmError
from pyvmm.migration.container import CheckpointFile
from pyvmm.migration.reload import reload_file
from pyvmm.migration.verify import verify_file

LONG_GUEST = ("--ram", "32M", "--workload",
              "pattern=random,working_set=8M,passes=1000000,report=100000")
SHORT_GUEST = ("--ram", "16M", "--workload", "pattern=sequential,working_set=1M,passes=2")


def pyvmm(*args: str | Path, timeout: float = 300,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *map(str, args)], capture_output=True,
                          timeout=timeout, check=False, env=env)


def start(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A run in the background; its guest output is dropped (a pipe nobody reads while the
    test waits would fill, and stop the guest on its next line).  Python's fault handler is on:
    :func:`finish` makes a hung run print where each of its threads is."""
    return subprocess.Popen([sys.executable, "-m", "pyvmm", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(env or os.environ, PYTHONFAULTHANDLER="1"))


def finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> str:
    """Wait for ``proc`` and return its stderr; a hang fails the test with the stacks of all
    its threads (SIGABRT: the fault handler prints them), and leaves no guest running on."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"the run hung; its threads:\n{err.decode()[-6000:]}") from None
    return err.decode()


def committed(path: Path) -> int:
    """Increments a reader sees in ``path`` now (0 while it does not exist)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            with CheckpointFile.open(path) as container:
                return len(container.header.increments)
    except PyvmmError:
        return 0


def wait_for(condition: object, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_whole(path: Path, at_least: int = 1) -> int:
    """``path`` opens with no slot passed over, verifies, and every prefix reloads."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        count = committed(path)
        report = verify_file(path)
    assert report.ok, report.problems
    assert count >= at_least
    for n in range(1, count + 1):
        machine, _ = reload_file(str(path), n)
        machine.close()
    return count


def one_error_line(proc: subprocess.CompletedProcess[bytes], *words: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("pyvmm: error: "), err
    for word in words:
        assert word in err, err
    return err


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (a test's unique temporary path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if text.encode() in cmdline and not zombie:
            found.append(int(entry))
    return found


# ----- item 1: two Ctrl-C during live periodic checkpointing --------------------------------------


def _double_interrupt(tmp_path: Path, seed: int, sig: signal.Signals) -> None:
    path = tmp_path / f"p{seed}.bin"
    rng = random.Random(seed)
    proc = start("run", "--checkpoint", f"chpt:{path}", "--live", "--incremental",
                 "--period", "0.05", *LONG_GUEST)
    wait_for(lambda: committed(path) >= 1 or proc.poll() is not None, "the first increment")
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(sig)
    time.sleep(rng.choice((0.0, 0.01, 0.05)))
    proc.send_signal(sig)
    text = finish(proc)
    assert proc.returncode == 128 + sig, text
    assert "Traceback" not in text, text
    assert all(line.startswith("pyvmm: ") for line in text.splitlines()), text
    assert f"interrupted ({sig.name})" in text, text
    assert_whole(path)
    assert not list(tmp_path.glob(f".{path.name}.*")), "an aside file was left behind"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_two_ctrl_c_during_live_periodic_checkpoints_leave_a_whole_file(
        tmp_path: Path, seed: int) -> None:
    """The 7-in-16 case of issue 14: the second Ctrl-C lands anywhere (in a commit, in the
    end-of-run checkpoint, while waiting for a periodic one): the run finishes the increment in
    flight, says so, exits 130, and the file verifies with every prefix reloadable."""
    _double_interrupt(tmp_path, seed, signal.SIGINT)


def test_two_sigterms_during_live_periodic_checkpoints_leave_a_whole_file(tmp_path: Path) -> None:
    _double_interrupt(tmp_path, 7, signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 26))
def test_two_ctrl_c_at_many_instants(tmp_path: Path, seed: int) -> None:
    _double_interrupt(tmp_path, seed, signal.SIGINT)


def _loading_unicorn(pid: int) -> bool:
    """Whether pyvmm's start-up has reached its imports (unicorn's library is mapped): from
    there on pyvmm's own handlers are in force (before, it is the interpreter's start)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            return b"unicorn" in maps.read()
    except OSError:
        return True  # gone already


def test_a_signal_during_start_up_is_one_line_never_a_traceback(tmp_path: Path) -> None:
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1):
        for sig in (signal.SIGINT, signal.SIGTERM):
            proc = start("run", "--checkpoint", f"chpt:{tmp_path / 's.bin'}", *SHORT_GUEST)
            wait_for(lambda pid=proc.pid: _loading_unicorn(pid), "pyvmm's imports")
            time.sleep(delay)
            proc.send_signal(sig)
            err = finish(proc, 120).encode()
            assert b"Traceback" not in err, err
            assert proc.returncode in (128 + sig, 0), (proc.returncode, err)
            if proc.returncode:
                assert err.decode().splitlines()[-1].startswith("pyvmm: interrupted"), err
                assert f"({sig.name})".encode() in err, err
            assert not (tmp_path / "s.bin").exists() or assert_whole(tmp_path / "s.bin")


# ----- items 2 and 8: a kill during the first checkpoint onto an existing file ---------------------


def _first_checkpoint_held(tmp_path: Path, target: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A run onto ``target`` whose first (cow) checkpoint is held open: its child sleeps before
    writing.  Returns the process once the child exists, and the aside file it writes."""
    env = dict(os.environ, PYVMM_COW_CHILD_DELAY_MS="600000")
    proc = start("run", "-q", "--checkpoint", f"chpt:{target}", "--cow", *SHORT_GUEST, env=env)
    aside = target.with_name(f".{target.name}.new-{proc.pid}")
    wait_for(lambda: aside.exists() or proc.poll() is not None, "the aside file")
    wait_for(lambda: len(processes_naming(str(target))) >= 2 or proc.poll() is not None,
             "the cow child")
    assert proc.poll() is None, proc.communicate()
    return proc, aside


def test_a_kill_during_the_first_checkpoint_onto_an_existing_file_keeps_it_whole(
        tmp_path: Path) -> None:
    """Item 2: the old file is byte for byte as it was; item 8: the cow child dies with its
    parent (it held the lock and wrote on), and the next run removes the aside left over."""
    target = tmp_path / "old.bin"
    made = pyvmm("run", "-q", "--checkpoint-at", "100K", "--checkpoint", f"chpt:{target}",
                 *SHORT_GUEST)
    assert made.returncode == 0, made.stderr
    before = target.read_bytes()
    assert assert_whole(target) == 2
    proc, aside = _first_checkpoint_held(tmp_path, target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    wait_for(lambda: not processes_naming(str(target)), "the cow child to die with its parent",
             timeout=60)
    assert target.read_bytes() == before
    assert aside.exists()  # a kill -9 leaves it; the next writer cleans it up
    again = pyvmm("run", "-q", "--checkpoint", f"chpt:{target}", *SHORT_GUEST)
    assert again.returncode == 0, again.stderr
    assert not aside.exists()
    assert assert_whole(target) == 1  # replaced by the new run's chain, once it was safe


def test_a_failed_first_checkpoint_leaves_the_old_file(tmp_path: Path) -> None:
    """A first checkpoint that fails (here: its cow child is killed) replaces nothing."""
    target = tmp_path / "old.bin"
    assert pyvmm("run", "-q", "--checkpoint", f"chpt:{target}", *SHORT_GUEST).returncode == 0
    before = target.read_bytes()
    proc, aside = _first_checkpoint_held(tmp_path, target)
    children = [pid for pid in processes_naming(str(target)) if pid != proc.pid]
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    err = finish(proc, 120).encode()
    assert proc.returncode == 1 and b"Traceback" not in err, err
    assert target.read_bytes() == before
    assert not aside.exists()


# ----- item 3: a second writer is refused at its start ---------------------------------------------


def test_a_second_writer_is_refused_before_its_guest_runs(tmp_path: Path) -> None:
    target = tmp_path / "chain.bin"
    first = start("run", "-q", "--checkpoint", f"chpt:{target}", "--incremental",
                  "--period", "0.05", *LONG_GUEST)
    try:
        wait_for(lambda: committed(target) >= 2 or first.poll() is not None, "two increments")
        second = pyvmm("run", "--checkpoint", f"chpt:{target}", *SHORT_GUEST)
        one_error_line(second, str(target), "open for writing in another process")
        assert second.stdout == b"", "the second writer's guest ran"
    finally:
        first.send_signal(signal.SIGINT)
        first_err = finish(first)
    assert first.returncode == 130, first_err
    assert assert_whole(target) >= 2


def test_a_writer_refuses_a_path_whose_first_chain_another_is_writing(tmp_path: Path) -> None:
    """No file yet, but a live writer's aside: refused at start too."""
    target = tmp_path / "new.bin"
    proc, _aside = _first_checkpoint_held(tmp_path, target)
    try:
        second = pyvmm("run", "--checkpoint", f"chpt:{target}", *SHORT_GUEST)
        one_error_line(second, "being written by another process", str(proc.pid))
        assert second.stdout == b""
    finally:
        proc.kill()
        proc.wait()


# ----- items 3, 4, 5: targets that are not regular files -------------------------------------------


@pytest.fixture
def odd_files(tmp_path: Path) -> Iterator[dict[str, Path]]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    chardev = tmp_path / "null"
    os.mknod(chardev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    blockdev = tmp_path / "loop"
    os.mknod(blockdev, 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    directory = tmp_path / "dir"
    directory.mkdir()
    yield {"a FIFO": fifo, "a character device": chardev, "a block device": blockdev,
           "a directory": directory}


def _unchanged(files: dict[str, Path]) -> None:
    tests = {"a FIFO": stat.S_ISFIFO, "a character device": stat.S_ISCHR,
             "a block device": stat.S_ISBLK, "a directory": stat.S_ISDIR}
    for kind, path in files.items():
        assert tests[kind](os.lstat(path).st_mode), f"{path} is no longer {kind}"


def test_bad_checkpoint_targets_are_refused_before_the_guest_runs(
        tmp_path: Path, odd_files: dict[str, Path]) -> None:
    for kind, path in odd_files.items():
        proc = pyvmm("run", "--checkpoint", f"chpt:{path}", *SHORT_GUEST, timeout=60)
        one_error_line(proc, str(path), kind)
        assert proc.stdout == b"", f"{kind}: the guest ran"
    missing = tmp_path / "no" / "such" / "dir" / "c.bin"
    proc = pyvmm("run", "--checkpoint", f"chpt:{missing}", *SHORT_GUEST)
    one_error_line(proc, "does not exist")
    assert proc.stdout == b""
    _unchanged(odd_files)


def test_no_permission_is_refused_before_the_guest_runs(tmp_path: Path) -> None:
    """As an unprivileged user (root may write anywhere): a directory without write access."""
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    tmp_path.chmod(0o755)
    # root passes every permission check: drop the capability that lets it (util-linux)
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
              "-all"] if os.geteuid() == 0 else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "pyvmm", "run", "--checkpoint",
                           f"chpt:{locked / 'c.bin'}", *SHORT_GUEST], capture_output=True,
                          timeout=120, check=False)
    one_error_line(proc, "no permission to create files in")
    assert proc.stdout == b""


def test_a_fifo_as_checkpoint_file_is_one_error_line_not_a_hang(
        tmp_path: Path, odd_files: dict[str, Path]) -> None:
    fifo = odd_files["a FIFO"]
    for args in (("checkpoint", "info", fifo), ("checkpoint", "verify", fifo),
                 ("checkpoint", "squash", fifo, "-o", tmp_path / "s.bin"),
                 ("checkpoint", "export", fifo, "-o", tmp_path / "e.bin"),
                 ("run", "--incoming", f"chpt:{fifo}"),
                 ("run", "--incoming", f"chpt:{fifo}", "--lazy")):
        proc = pyvmm(*args, timeout=60)
        one_error_line(proc, "is a FIFO")
    _unchanged(odd_files)


def test_dash_o_onto_fifos_and_devices_writes_in_place_and_refuses_the_rest(
        tmp_path: Path, odd_files: dict[str, Path]) -> None:
    """Item 4: `-o` never renames over or unlinks a non-regular file: a FIFO and a character
    device get the bytes in order, a block device or directory is refused."""
    chain = tmp_path / "c.bin"
    made = pyvmm("run", "-q", "--incremental", "--checkpoint-at", "100K", "--checkpoint",
                 f"chpt:{chain}", *SHORT_GUEST)
    assert made.returncode == 0, made.stderr
    regular = tmp_path / "full.bin"
    assert pyvmm("checkpoint", "squash", chain, "-q", "-o", regular).returncode == 0
    exported = tmp_path / "e.qemu"
    assert pyvmm("checkpoint", "export", chain, "-o", exported).returncode == 0

    fifo = odd_files["a FIFO"]
    for args, reference in ((("checkpoint", "squash", chain, "-q", "-o", fifo), regular),
                            (("checkpoint", "export", chain, "-o", fifo), exported)):
        received = bytearray()

        def drain(into: bytearray = received) -> None:
            with open(fifo, "rb") as reader:
                into.extend(reader.read())

        reader = threading.Thread(target=drain)
        reader.start()
        proc = pyvmm(*args, timeout=120)
        reader.join(timeout=120)
        assert proc.returncode == 0, proc.stderr
        if reference is exported:
            assert bytes(received) == reference.read_bytes()
        else:  # a container: same state (its vm id and times are its own)
            through_fifo = tmp_path / "via-fifo.bin"
            through_fifo.write_bytes(bytes(received))
            assert assert_whole(through_fifo) == 1
            a, _ = reload_file(str(through_fifo))
            b, _ = reload_file(str(regular))
            with a, b:
                assert a.cpu_state() == b.cpu_state()
                assert bytes(a.ram_blocks[0].mem) == bytes(b.ram_blocks[0].mem)
    for args in (("checkpoint", "squash", chain, "-q", "-o", odd_files["a character device"]),
                 ("checkpoint", "export", chain, "-o", odd_files["a character device"])):
        proc = pyvmm(*args, timeout=120)
        assert proc.returncode == 0, proc.stderr
    for kind in ("a block device", "a directory"):
        for args in (("checkpoint", "squash", chain, "-o", odd_files[kind]),
                     ("checkpoint", "export", chain, "-o", odd_files[kind])):
            one_error_line(pyvmm(*args, timeout=60), kind)
    _unchanged(odd_files)
    piped = subprocess.run(f"{sys.executable} -m pyvmm checkpoint export {chain} -o /dev/stdout"
                           f" | cat > {tmp_path / 'piped.qemu'}", shell=True, check=False,
                           capture_output=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert (tmp_path / "piped.qemu").read_bytes() == exported.read_bytes()


def test_dash_o_onto_a_regular_file_replaces_it_only_when_complete(tmp_path: Path) -> None:
    """A squash that fails (the input is damaged past its header) leaves the old output."""
    chain = tmp_path / "c.bin"
    assert pyvmm("run", "-q", "--checkpoint", f"chpt:{chain}", *SHORT_GUEST).returncode == 0
    out = tmp_path / "out.bin"
    out.write_bytes(b"precious")
    with open(chain, "r+b") as f:  # zero a block in the middle of the stream
        f.seek(os.path.getsize(chain) // 2)
        f.write(bytes(4096))
    proc = pyvmm("checkpoint", "squash", chain, "-o", out)
    assert proc.returncode == 1, proc.stderr
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _file_size_limit(limit: int) -> None:
    """In the child: writes past ``limit`` bytes fail with EFBIG, as on a full disk (ENOSPC
    takes a file system of its own to make)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_write_failure_in_the_first_checkpoint_leaves_the_old_file(tmp_path: Path) -> None:
    """A full disk during the first checkpoint onto an existing file: one error line, the old
    file byte for byte, no aside left."""
    target = tmp_path / "old.bin"
    made = pyvmm("run", "-q", "--checkpoint-at", "100K", "--checkpoint", f"chpt:{target}",
                 *SHORT_GUEST)
    assert made.returncode == 0, made.stderr
    before = target.read_bytes()
    limit = 256 << 10  # past the 128 KiB header, inside the first increment (1 MiB dirty)
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--checkpoint",
                           f"chpt:{target}", *SHORT_GUEST], capture_output=True, timeout=120,
                          check=False, preexec_fn=lambda: _file_size_limit(limit))
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("pyvmm: error: "), err
    assert "File too large" in err.splitlines()[-1], err
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["old.bin"]


# ----- item 6: a slot passed over is said on stderr, every time ------------------------------------


def test_a_header_slot_passed_over_is_said_by_every_command(tmp_path: Path) -> None:
    """A file cut inside its newest increment (a writer stopped between publishing its header
    and finishing the file): info, run --incoming, --lazy and squash load the increment before
    it and say so in one warning line; verify reports it as a problem (exit 1)."""
    path = tmp_path / "c.bin"
    made = pyvmm("run", "-q", "--incremental", "--checkpoint-at", "100K", "--checkpoint",
                  f"chpt:{path}", *SHORT_GUEST)
    assert made.returncode == 0, made.stderr
    with CheckpointFile.open(path) as container:
        first_end = container.header.increments[0].end
    os.truncate(path, first_end + 4096)
    for args in (("checkpoint", "info", path), ("run", "-q", "--incoming", f"chpt:{path}"),
                 ("run", "-q", "--incoming", f"chpt:{path}", "--lazy"),
                 ("checkpoint", "squash", "-q", path, "-o", tmp_path / "s.bin")):
        proc = pyvmm(*args)
        err = proc.stderr.decode()
        assert proc.returncode == 0, (args, err)
        warned = [line for line in err.splitlines() if line.startswith("pyvmm: warning: ")]
        assert len(warned) == 1 and "points past the end of the file" in warned[0], (args, err)
        assert "using slot" in warned[0] and "(sequence" in warned[0], err
    verify = pyvmm("checkpoint", "verify", path)
    assert verify.returncode == 1
    assert b"points past the end of the file" in verify.stdout
    assert b"pyvmm: warning" not in verify.stderr  # verify reports it itself, once
