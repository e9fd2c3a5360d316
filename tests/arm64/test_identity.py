"""VM identity, the default checkpoint destination, and named host threads (issue 15 item 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.boot import GuestSpec, boot
from pyvmm.errors import ConfigError
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.identity import default_checkpoint_dir, default_checkpoint_path, vm_id
from pyvmm.migration.checkpoint import Checkpointer, parse_target
from pyvmm.migration.periodic import PeriodicCheckpointer

SHORT_GUEST = ("--ram", "16M", "--workload", "pattern=sequential,working_set=1M,passes=2")


def test_the_vm_id_comes_from_vm_uid_then_user_and_vm_id_then_user_and_pid() -> None:
    assert vm_id({"VM_UID": "lab-7", "USER": "ann", "VM_ID": "3"}, pid=9) == "lab-7"
    assert vm_id({"USER": "ann", "VM_ID": "3"}, pid=9) == "ann.3"
    assert vm_id({"USER": "ann"}, pid=9) == "ann.9"
    for bad in ("../x", ".hidden", "a b", "x" * 129, "a/b"):
        with pytest.raises(ConfigError, match="VM id"):
            vm_id({"VM_UID": bad})


def test_the_default_destination_is_a_private_directory_of_the_user(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "VM_UID": "vm1"}
    path = default_checkpoint_path(env)
    assert path == tmp_path / "home/.local/state/pyvmm/checkpoints/vm1.chpt"
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    xdg = {"XDG_STATE_HOME": str(tmp_path / "state"), "VM_UID": "vm2"}
    assert default_checkpoint_path(xdg) == tmp_path / "state/pyvmm/checkpoints/vm2.chpt"


def test_negative_a_default_directory_others_could_write_or_own_is_refused(
        tmp_path: Path) -> None:
    shared = {"XDG_STATE_HOME": str(tmp_path / "shared"), "VM_UID": "v"}
    default_checkpoint_dir(shared).mkdir(parents=True)
    default_checkpoint_dir(shared).chmod(0o777)
    with pytest.raises(ConfigError, match="writable by others"):
        default_checkpoint_path(shared)
    linked = {"XDG_STATE_HOME": str(tmp_path / "linked"), "VM_UID": "v"}
    default_checkpoint_dir(linked).parent.mkdir(parents=True)
    default_checkpoint_dir(linked).symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        default_checkpoint_path(linked)
    if os.geteuid() == 0:  # only root can give a directory away
        foreign = {"XDG_STATE_HOME": str(tmp_path / "foreign"), "VM_UID": "v"}
        default_checkpoint_dir(foreign).mkdir(parents=True, mode=0o700)
        os.chown(default_checkpoint_dir(foreign), 65534, 65534)
        with pytest.raises(ConfigError, match="belongs to another user"):
            default_checkpoint_path(foreign)


def test_chpt_without_a_path_writes_and_reloads_the_default_file(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), VM_UID="cli-vm")
    run = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-q", "--checkpoint", "chpt:",
                          *SHORT_GUEST], capture_output=True, env=env, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    path = tmp_path / "state/pyvmm/checkpoints/cli-vm.chpt"
    info = subprocess.run([sys.executable, "-m", "pyvmm", "checkpoint", "info", str(path)],
                          capture_output=True, env=env, timeout=60, check=False)
    assert info.returncode == 0 and b"VM id         cli-vm" in info.stdout, info
    again = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--incoming", "chpt:"],
                           capture_output=True, env=env, timeout=120, check=False)
    assert again.returncode == 0 and b"already powered off" in again.stderr, again.stderr
    os.chmod(path.parent, 0o777)
    refused = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--checkpoint", "chpt:",
                              *SHORT_GUEST], capture_output=True, env=env, timeout=120,
                             check=False)
    assert refused.returncode == 1 and refused.stdout == b"", refused
    assert refused.stderr.decode().count("\n") == 1 and b"writable by others" in refused.stderr
    assert parse_target("chpt:").path == "" and parse_target("chpt:2:").count == 2


def _thread_names() -> set[str]:
    names = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.add(comm.read().strip())
        except OSError:
            pass
    return names


def test_host_threads_are_named_for_ps_and_gdb(tmp_path: Path) -> None:
    options = WorkloadOptions(pattern="random", working_set=1 << 20, passes=10**6,
                              report_every=10**6)
    with boot(GuestSpec(workload=options), ram_size=16 << 20,
              uart_sink=lambda _b: None) as machine:
        machine.start()
        checkpointer = Checkpointer(machine, tmp_path / "t.bin", durable=False,
                                    capabilities=["incremental"], tracker="wp",
                                    vm_name="named")
        periodic = PeriodicCheckpointer(checkpointer, 30.0).start()
        try:
            stats = checkpointer.checkpoint()  # the wp tracker's handler thread runs from here
            wanted = {"vcpu-workload", "pyvmm-periodic", "pyvmm-wp"}
            deadline = time.monotonic() + 60  # a thread names itself once it is scheduled
            names = _thread_names()
            while not wanted <= names and time.monotonic() < deadline:
                time.sleep(0.01)
                names = _thread_names()
        finally:
            periodic.stop()
            checkpointer.close()
            machine.pause()
    assert stats.vm_name == "named"
    assert {"vcpu-workload", "pyvmm-periodic", "pyvmm-wp"} <= names, names
