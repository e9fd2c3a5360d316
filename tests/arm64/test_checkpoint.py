"""Full checkpoints and reload, end to end (DESIGN.md §9, the central oracle): run N instructions,
checkpoint, reload in a NEW process, run on == one uninterrupted run, in output bytes and final
state.  Plus the errors a user sees for bad checkpoint files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.boot import GuestSpec, boot
from pyvmm.errors import FormatError
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine, RunState
from pyvmm.migration.checkpoint import Checkpointer, parse_target, reload
from pyvmm.migration.container import CheckpointFile
from pyvmm.migration.machine_state import machine_save_state
from pyvmm.migration.stream import QEMUFile
from pyvmm.testing.digest import ram_digest

WORKLOAD = ("--ram", "32M", "--seed", "5", "--workload",
            "pattern=random,working_set=4M,passes=40,report=8")


def pyvmm(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *map(str, args)], capture_output=True,
                          timeout=timeout, check=False)


def machine_digest(machine: Machine) -> dict[str, object]:
    """Everything that must be equal between two runs that should be the same."""
    process = machine.extra_state.get("linux")
    return {
        "ram": ram_digest(machine),
        "cpu": machine.cpu_state(),
        "uart": machine.uart.state,
        "counter": machine.counter.state,
        "state": machine.state,
        "exit": machine.exit_code,
        "linux": None if process is None else json.dumps(process.state_to_dict(), sort_keys=True),
    }


def final_state(path: Path) -> dict[str, object]:
    with reload(f"chpt:{path}") as machine:
        return machine_digest(machine)


def split_run_equals_whole(tmp: Path, guest: tuple[str | Path, ...], n: int) -> None:
    whole_file, split_file = tmp / "whole.bin", tmp / "split.bin"
    whole = pyvmm("run", "-q", "--checkpoint", f"chpt:{whole_file}", *guest)
    first = pyvmm("run", "-q", "--max-insns", n, "--checkpoint", f"chpt:{split_file}", *guest)
    assert first.returncode in (0, whole.returncode), first.stderr
    second = pyvmm("run", "-q", "--incoming", f"chpt:{split_file}",
                   "--checkpoint", f"chpt:{split_file}")
    assert second.stderr == b"" or b"already powered off" in second.stderr, second.stderr
    assert first.stdout + second.stdout == whole.stdout
    assert second.returncode == whole.returncode
    assert final_state(split_file) == final_state(whole_file)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 2_900_000))
def test_workload_checkpoint_reload_in_new_process_equals_whole_run(
        tmp_path: Path, n: int) -> None:
    split_run_equals_whole(tmp_path, (*WORKLOAD, "--guest", "workload"), n)


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 2_900_000), pattern=st.sampled_from(["sequential", "hotcold", "increment"]))
def test_workload_oracle_exhaustive(tmp_path: Path, n: int, pattern: str) -> None:
    guest = ("--ram", "32M", "--seed", "9", "--workload",
             f"pattern={pattern},working_set=2M,passes=60,report=10", "--guest", "workload")
    split_run_equals_whole(tmp_path, guest, n)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.bin"
    path.write_bytes(hashlib.shake_256(b"pyvmm").digest(1 << 20))
    return path


@pytest.mark.parametrize("applet", [("sha256sum",), ("gzip", "-c"), ("od", "-N", "32768", "-A", "x", "-t", "x1")])
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 3_000_000))
def test_busybox_checkpoint_reload_in_new_process_equals_whole_run(
        tmp_path: Path, busybox: Path, data_file: Path, applet: tuple[str, ...], n: int) -> None:
    guest = ("--ram", "64M", "--files", data_file, "--guest", busybox, *applet, data_file)
    split_run_equals_whole(tmp_path, guest, n)


def test_checkpoint_at_counts_and_info(tmp_path: Path) -> None:
    out = tmp_path / "c.bin"
    proc = pyvmm("run", *WORKLOAD, "--checkpoint-at", "100K,1M", "--max-insns", "2M",
                 "--checkpoint", f"chpt:{out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(b"pyvmm: checkpoint ") == 3
    info = json.loads(pyvmm("checkpoint", "info", out, "--json").stdout)
    assert [i["kind"] for i in info["increments"]] == ["full"] * 3
    assert info["ram_blocks"] == [{"name": "mach-virt.ram", "gpa": 0x40000000, "size": 32 << 20}]
    for inc in info["increments"]:
        assert inc["stats"]["pages"] == inc["pages"]  # stats agree with the file
        assert inc["stats"]["zero_pages"] == inc["zero_pages"]
        assert "cpu/0 v1" in inc["stats"]["devices"]
    # reloading the first increment resumes at exactly 100K instructions
    with reload(f"chpt:1:{out}") as machine:
        assert machine.insns == 100_000
        assert machine.state is RunState.PAUSED
    text = pyvmm("checkpoint", "info", out).stdout.decode()
    assert "increments    3" in text and "mach-virt.ram" in text


def test_checkpoint_every_n_instructions(tmp_path: Path) -> None:
    """--checkpoint-every N checkpoints at N, 2N, ... of this run, merged with --checkpoint-at;
    a --max-insns that is itself a point gets one checkpoint, not two."""
    out = tmp_path / "e.bin"
    proc = pyvmm("run", *WORKLOAD, "--incremental", "--checkpoint-every", "300K",
                 "--checkpoint-at", "450K", "--max-insns", "900K", "--checkpoint", f"chpt:{out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(b"pyvmm: checkpoint ") == 4
    for k, insns in enumerate([300_000, 450_000, 600_000, 900_000], start=1):
        with reload(f"chpt:{k}:{out}") as machine:
            assert machine.insns == insns
    # no instruction limit: every N until the guest powers off, then the end of the run
    whole = tmp_path / "w.bin"
    proc = pyvmm("run", *WORKLOAD, "--checkpoint-every", "400K", "--checkpoint", f"chpt:{whole}")
    assert proc.returncode == 0, proc.stderr
    with CheckpointFile.open(whole) as container:
        count = len(container.header.increments)
    assert count >= 3  # 400K, 800K (the guest runs past 900K), ..., the end
    for k in range(1, count):
        with reload(f"chpt:{k}:{whole}") as machine:
            assert machine.insns == 400_000 * k
    for bad, message in (("0", b"--checkpoint-every must be > 0"),
                         ("x", b"invalid --checkpoint-every 'x'")):
        proc = pyvmm("run", "--checkpoint-every", bad, "--checkpoint", f"chpt:{tmp_path / 'n'}")
        assert proc.returncode == 1 and message in proc.stderr.splitlines()[-1]
    proc = pyvmm("run", "--checkpoint-every", "1M")
    assert proc.returncode == 1 and b"needs --checkpoint" in proc.stderr
    assert not (tmp_path / "n").exists()


def test_mostly_zero_guest_gives_a_small_file(tmp_path: Path) -> None:
    out = tmp_path / "small.bin"
    proc = pyvmm("run", "--ram", "1G", "--workload", "working_set=64K,passes=1", "--checkpoint",
                 f"chpt:{out}")
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size < 8 << 20  # RAM in use is a few MiB at most (huge pages)


def test_export_writes_the_raw_qemu_stream(tmp_path: Path) -> None:
    out, raw = tmp_path / "c.bin", tmp_path / "inc0.qemu"
    assert pyvmm("run", "-q", *WORKLOAD, "--max-insns", "100K", "--checkpoint",
                 f"chpt:{out}").returncode == 0
    proc = pyvmm("checkpoint", "export", out, "--increment", "0", "-o", raw)
    assert proc.returncode == 0, proc.stderr
    data = raw.read_bytes()
    assert data[:8] == b"QEVM\x00\x00\x00\x03"
    assert b'"devices"' in data[-4096:]
    # "-": standard output (a pipe here), the same bytes
    piped = pyvmm("checkpoint", "export", out, "--increment", "0", "-o", "-")
    assert piped.returncode == 0 and piped.stdout == data, piped.stderr
    assert b"to standard output" in piped.stderr
    # the checkpoint file itself is never overwritten
    before = out.read_bytes()
    refused = pyvmm("checkpoint", "export", out, "-o", out)
    assert refused.returncode == 1 and b"is the checkpoint file itself" in refused.stderr
    assert out.read_bytes() == before


def test_in_process_checkpoint_of_paused_machine_keeps_its_state(tmp_path: Path) -> None:
    spec = GuestSpec(workload=WorkloadOptions.parse("pattern=hotcold,working_set=1M,passes=0"))
    with boot(spec, ram_size=16 << 20) as machine:
        machine.run(max_insns=50_000)
        before = machine_digest(machine)
        checkpointer = Checkpointer(machine, tmp_path / "p.bin")
        stats = checkpointer.checkpoint()
        checkpointer.close()
        assert machine.state is RunState.PAUSED
        assert machine.guest_inform.state.checkpoint_count == 1
        assert stats.pages + stats.zero_pages > 0
        assert machine_digest(machine) == before
        with reload(f"chpt:{tmp_path / 'p.bin'}") as copy:
            after = machine_digest(copy)
            assert copy.guest_inform.state.restore_count == 1
        assert {k: v for k, v in after.items() if k != "state"} == \
            {k: v for k, v in before.items() if k != "state"}


def test_targets_parse() -> None:
    assert parse_target("chpt:a.bin").path == "a.bin"
    assert parse_target("chpt:3:dir/a.bin").count == 3
    squash = parse_target("chpt:squash:2:a.bin")
    assert squash.squash and squash.count == 2 and squash.path == "a.bin"
    assert parse_target("chpt:squash:a.bin").count is None


@pytest.mark.parametrize("uri", ["a.bin", "chpt:", "file:a.bin", "chpt:0:a.bin"])
def test_negative_bad_targets(uri: str) -> None:
    proc = pyvmm("run", "--incoming", uri)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("pyvmm: error: ")


def test_negative_bad_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(300_000))
    good = tmp_path / "good.bin"
    assert pyvmm("run", "-q", *WORKLOAD, "--max-insns", "50K", "--checkpoint",
                 f"chpt:{good}").returncode == 0
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {
        tmp_path / "missing.bin": "missing.bin",
        junk: "not a pyvmm checkpoint",
        truncated: "truncated.bin",
    }
    for path, message in cases.items():
        for args in (("run", "--incoming", f"chpt:{path}"), ("checkpoint", "info", path)):
            proc = pyvmm(*args)
            err = proc.stderr.decode()
            assert proc.returncode == 1, (args, err)
            assert err.count("\n") == 1 and err.startswith("pyvmm: error: "), err
            assert message in err, (args, err)
    proc = pyvmm("run", "--incoming", f"chpt:5:{good}")
    assert b"holds 1 increment(s), not 5" in proc.stderr
    proc = pyvmm("run", "--incoming", f"chpt:{good}", "--ram", "64M")
    assert b"--ram cannot be combined with --incoming" in proc.stderr


def test_negative_ram_size_mismatch_in_stream(tmp_path: Path) -> None:
    spec = GuestSpec(workload=WorkloadOptions.parse("working_set=64K,passes=1"))
    with boot(spec, ram_size=16 << 20) as small:
        small.run()
        entries = machine_save_state(small)
        entries.ram.select({b.name: b.populated_pages() for b in small.ram_blocks})
        f = QEMUFile.memory()
        entries.save_state.save_header(f)
        entries.save_state.save_setup(f)
        stream = f.getvalue() + b"\x00"
    with Machine(32 << 20) as big:
        with pytest.raises(FormatError, match="RAM size mismatch"):
            machine_save_state(big).save_state.load(QEMUFile.memory(stream))


def test_reloading_a_powered_off_guest_keeps_its_exit_code(tmp_path: Path, busybox: Path) -> None:
    out = tmp_path / "ended.bin"
    first = pyvmm("run", "-q", "--checkpoint", f"chpt:{out}", "--guest", busybox, "sh", "-c",
                  "echo bye; exit 3")
    assert first.returncode == 3 and first.stdout == b"bye\n"
    second = pyvmm("run", "--incoming", f"chpt:{out}")
    assert second.returncode == 3
    assert second.stdout == b""  # nothing runs: the guest had ended
    assert b"had already powered off" in second.stderr
    with reload(f"chpt:{out}") as machine:
        assert machine.state is RunState.SHUTDOWN and machine.exit_code == 3


def test_no_fsync_checkpoints_reload_the_same(tmp_path: Path) -> None:
    durable, fast = tmp_path / "d.bin", tmp_path / "f.bin"
    for path, extra in ((durable, ()), (fast, ("--no-fsync",))):
        proc = pyvmm("run", "-q", *extra, "--max-insns", "300K", "--checkpoint", f"chpt:{path}",
                     *WORKLOAD)
        assert proc.returncode == 0, proc.stderr
    assert final_state(fast) == final_state(durable)
