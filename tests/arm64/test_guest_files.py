"""The guest's file overlay is bounded host memory: sparse files, ENOSPC/EFBIG, checkpoints.

Through the command line as a user runs it (busybox truncate/dd, peak RSS of the pyvmm process
measured with wait4), through the Python faces (load_program, reload, state_from_dict) for what
the guest cannot show in one single-process run, and a model test of the sparse file store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.errors import ConfigError
from pyvmm.linux import state_from_dict
from pyvmm.linux.abi import Errno, LinuxErrno
from pyvmm.linux.filedata import CHUNK_SIZE, MAX_FILE_SIZE, FileData, page_up
from pyvmm.linux.state import MAX_FILES_LIMIT, FileState, OverlayNode
from pyvmm.linux.vfs import ENTRY_COST, FileSystem, default_files_limit
from pyvmm.machine import Machine

#: Peak RSS a run that only makes sparse files may take: pyvmm and a guest touching little of
#: its 256 MiB (before the fix, ``truncate -s 2G`` took 2.1 GB).
RSS_BOUND = 400 << 20


def pyvmm(*args: str | Path, tmp_path: Path) -> tuple[int, bytes, bytes, int]:
    """Run ``pyvmm ARGS``: (exit status, stdout, stderr, peak RSS in bytes of that process
    alone, from its own VmHWM: see tests/peak_memory.py)."""
    from tests.peak_memory import run_measured

    del tmp_path  # the output is captured in memory
    return run_measured(args)


# ------------------------------------------------------------------------------ the CLI
def test_truncate_2g_and_pwrite_at_2_62_take_no_host_memory(busybox: str,
                                                           tmp_path: Path) -> None:
    chpt = tmp_path / "c.bin"
    code, _out, err, rss = pyvmm("run", "--checkpoint", f"chpt:{chpt}", "--guest", busybox,
                                "truncate", "-s", "2G", "/tmp/f", tmp_path=tmp_path)
    assert code == 0, err
    assert rss < RSS_BOUND, f"peak RSS {rss >> 20} MiB"
    assert chpt.stat().st_size < 64 << 20  # the hole is not in the checkpoint either
    code, _out, err, rss = pyvmm("run", "--incoming", f"chpt:{chpt}", tmp_path=tmp_path)
    assert code == 0, err
    assert rss < RSS_BOUND

    code, _out, err, rss = pyvmm("run", "--guest", busybox, "dd", "if=/dev/zero", "of=/tmp/f",
                                "bs=1", "count=1", f"seek={1 << 62}", tmp_path=tmp_path)
    assert code == 0, err
    assert b"1+0 records out" in err
    assert rss < RSS_BOUND


def test_writes_past_the_limit_get_enospc_and_the_run_goes_on(busybox: str,
                                                             tmp_path: Path) -> None:
    code, _out, err, _rss = pyvmm("run", "--files-limit", "1M", "--guest", busybox, "dd",
                                  "if=/dev/zero", "of=/tmp/f", "bs=64k", "count=32",
                                  tmp_path=tmp_path)
    assert code == 1  # busybox dd's own status for a failed write
    assert b"dd: error writing '/tmp/f': No space left on device" in err
    assert b"guest exited with code 1" in err  # the run ended normally, not with an error
    code, _out, err, _rss = pyvmm("run", "--files-limit", "4M", "--guest", busybox, "dd",
                                  "if=/dev/zero", "of=/tmp/f", "bs=64k", "count=32",
                                  tmp_path=tmp_path)
    assert code == 0, err


def test_a_write_at_the_largest_file_size_gets_efbig(busybox: str, tmp_path: Path) -> None:
    code, _out, err, _rss = pyvmm("run", "--guest", busybox, "dd", "if=/dev/zero",
                                  "of=/tmp/f", "bs=1", "count=1", f"seek={MAX_FILE_SIZE}",
                                  tmp_path=tmp_path)
    assert code == 1
    assert b"File too large" in err
    assert b"guest exited with code 1" in err


def test_ls_shows_sizes_and_allocated_blocks(busybox: str, tmp_path: Path) -> None:
    code, out, err, _rss = pyvmm("run", "-q", "--guest", busybox, "sh", "-c",
                                 "echo hello > /tmp/a; ls -ls /tmp", tmp_path=tmp_path)
    assert code == 0, err
    assert out.split(b"\n")[1].split()[:1] + out.split(b"\n")[1].split()[5:6] == [b"4", b"6"]


@pytest.mark.parametrize(("args", "message"), [
    (["--files-limit", "lots"], b"invalid overlay size (--files-limit) 'lots'"),
    (["--files-limit", "1G"], b"--files-limit 1G: at most 512M"),
])
def test_negative_files_limit_option(busybox: str, tmp_path: Path, args: list[str],
                                     message: bytes) -> None:
    code, _out, err, _rss = pyvmm("run", *args, "--guest", busybox, "true", tmp_path=tmp_path)
    assert code != 0
    (line,) = err.strip().splitlines()  # one line, no traceback
    assert line.startswith(b"pyvmm: error: " + message)


def test_negative_files_limit_with_the_builtin_workload(tmp_path: Path) -> None:
    code, _out, err, _rss = pyvmm("run", "--files-limit", "1M", tmp_path=tmp_path)
    assert code != 0 and b"--files-limit bounds the ELF guest's files" in err


def test_a_sparse_overlay_survives_a_checkpoint_taken_mid_write(busybox: str,
                                                               tmp_path: Path) -> None:
    """dd writes 4 MiB at 2 GiB; stopped halfway, checkpointed, reloaded in a new process, it
    ends as the uninterrupted run does, and the reloaded overlay holds only the data."""
    from pyvmm.migration.checkpoint import reload

    dd = ["dd", "if=/dev/zero", "of=/tmp/f", "bs=64k", "seek=32768", "count=64"]
    code, whole_out, whole_err, _rss = pyvmm("run", "-q", "--guest", busybox, *dd,
                                             tmp_path=tmp_path)
    assert code == 0, whole_err
    chpt, end = tmp_path / "mid.bin", tmp_path / "end.bin"
    code, out, err, _rss = pyvmm("run", "-q", "--max-insns", "300K", "--checkpoint",
                                 f"chpt:{chpt}", "--guest", busybox, *dd, tmp_path=tmp_path)
    assert code == 0, err
    code, out2, err2, rss = pyvmm("run", "-q", "--incoming", f"chpt:{chpt}", "--checkpoint",
                                  f"chpt:{end}", tmp_path=tmp_path)
    assert code == 0, err2
    assert (out + out2, err + err2) == (whole_out, whole_err)
    assert rss < RSS_BOUND
    with reload(f"chpt:{end}") as machine:
        process = machine.extra_state["linux"]
        node = process.state.files.overlay["/tmp/f"]
        assert node.data.size == (2 << 30) + (4 << 20)
        assert node.data.allocated == 4 << 20
        assert process.fs.read("/tmp/f", 1 << 30, 16) == bytes(16)
        assert process.state.files.files_limit == default_files_limit(256 << 20)


# ------------------------------------------------------------------------------ Python faces
def test_guest_sees_sizes_holes_and_seek_data(run_busybox: Any) -> None:
    run = run_busybox("dd", "if=/dev/urandom", "of=/tmp/f", "bs=4096", "count=2", "seek=100")
    assert run.exit_code == 0, run.stderr
    fs = run.process.fs
    info = fs.lookup("/tmp/f")
    assert info is not None and info.size == 102 * 4096 and info.blocks == 16
    assert fs.read("/tmp/f", 0, 4096) == bytes(4096)
    assert fs.read("/tmp/f", 100 * 4096, 8192).count(0) < 100
    assert fs.seek_data("/tmp/f", 0, hole=False) == 100 * 4096
    assert fs.seek_data("/tmp/f", 100 * 4096, hole=True) == 102 * 4096


def _fs(tmp_path: Path, limit: int) -> FileSystem:
    return FileSystem(FileState(cwd="/", exports=[str(tmp_path)], files_limit=limit), "/prog")


def _errno(call: Any, *args: Any) -> Errno:
    with pytest.raises(LinuxErrno) as info:
        call(*args)
    return info.value.errno


def test_enospc_writes_what_fits_and_frees_on_unlink(tmp_path: Path) -> None:
    root = str(tmp_path)
    fs = _fs(tmp_path, 64 << 10)
    node = fs.create_file(f"{root}/a", 0o644, 0)
    room = fs.state.files_limit - fs.usage
    assert fs.write(node, 0, bytes(100 << 10)) == room // 4096 * 4096  # a prefix, by pages
    assert _errno(fs.write, node, node.data.size, b"x") == Errno.ENOSPC
    assert fs.write(node, 0, b"overwrite costs nothing") == 23
    made = 0
    with pytest.raises(LinuxErrno) as info:  # entries are charged too
        for made in range(64):
            fs.mkdir(f"{root}/d{made}", 0o755, 0)
    assert info.value.errno == Errno.ENOSPC and made < 4
    assert fs.usage <= fs.state.files_limit
    for name in ["a", *(f"d{i}" for i in range(made))]:
        fs.remove(f"{root}/{name}", directory=name != "a")
    assert fs.usage == 0 and fs.state.overlay == {}
    fs.mkdir(f"{root}/d", 0o755, 0)
    assert fs.usage == ENTRY_COST + len(json.dumps(f"{root}/d"))


def test_copy_up_and_rename_of_a_host_file_are_charged_all_or_nothing(tmp_path: Path) -> None:
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(b"x" * (200 << 10))
    with open(small, "wb") as handle:  # a sparse host file: its holes stay holes
        handle.truncate(1 << 30)
        handle.seek(5 << 20)
        handle.write(b"data")
    fs = _fs(tmp_path, 128 << 10)
    assert _errno(fs.writable, str(big)) == Errno.ENOSPC
    assert _errno(fs.rename, str(big), f"{tmp_path}/moved") == Errno.ENOSPC
    assert fs.state.overlay == {} and fs.usage == 0
    node = fs.writable(str(small))
    assert node.data.size == 1 << 30 and node.data.allocated == 4096
    fs.rename(str(small), f"{tmp_path}/moved")
    assert fs.read(f"{tmp_path}/moved", (5 << 20) - 2, 8) == b"\0\0data\0\0"
    assert fs.lookup(str(small)) is None
    assert fs.usage == sum(ENTRY_COST + len(json.dumps(p)) + n.data.allocated
                           for p, n in fs.state.overlay.items())


def test_reads_build_no_more_than_the_guest_buffer_takes(tmp_path: Path) -> None:
    """read(fd, buf, 2**40) of a 2**50-byte sparse file: the zeros built are bounded by the
    guest RAM behind ``buf`` (Linux copies up to the fault)."""
    from elfbuild import EXIT, write_program

    from pyvmm.linux import load_program
    from pyvmm.linux.sys_io import sys_openat, sys_read

    prog = write_program(tmp_path, "mov x0, #0\n" + EXIT)
    with Machine(32 << 20) as machine:
        process = load_program(machine, prog, ["prog"])
        process.fs.create_file("/tmp/f", 0o644, 0)
        process.fs.truncate("/tmp/f", 1 << 50)
        ram = machine.ram
        path_at = ram.gpa + ram.size - 4096
        machine.write_memory(path_at, b"/tmp/f\0")
        fd = sys_openat(process, (1 << 64) - 100, path_at, 0, 0)
        buf = ram.gpa + ram.size - (1 << 20)
        assert sys_read(process, fd, buf, 1 << 40) == 1 << 20
        with pytest.raises(LinuxErrno) as info:
            sys_read(process, fd, ram.gpa + ram.size + (1 << 30), 1 << 40)
        assert info.value.errno == Errno.EFAULT


# ------------------------------------------------------------------------------ saved states
def _state_with_file(tmp_path: Path, **file: Any) -> dict[str, Any]:
    from elfbuild import EXIT, write_program

    from pyvmm.linux import load_program

    prog = write_program(tmp_path, "mov x0, #0\n" + EXIT)
    with Machine(32 << 20) as machine:
        data = load_program(machine, prog, ["prog"]).state_to_dict()
    data["files"]["overlay"]["/tmp/f"] = {"kind": "file", "data": file}
    return data


@pytest.mark.parametrize(("file", "message"), [
    ({"size": MAX_FILE_SIZE + 1}, "size 9223372036854775808 is outside"),
    ({"size": -1}, "size -1 is outside"),
    ({"size": 10, "chunks": {"0": "A" * (4 * CHUNK_SIZE)}}, "more than a chunk"),
    ({"size": 10, "chunks": {"5": "AAAA"}}, "chunk 5 (3 bytes) does not lie in a file of 10"),
    ({"size": 2, "chunks": {"0": "AAAA"}}, "chunk 0 (3 bytes) does not lie"),
    ({"size": 10, "chunks": {"0": ""}}, "chunk 0 (0 bytes)"),
    ({"size": 10, "blocks": 5}, "expected an object with size and chunks"),
    ({"size": 10, "chunks": {"x": "AAAA"}}, "key 'x' is not an integer"),
])
def test_negative_saved_file_sizes_are_checked_before_allocation(
        tmp_path: Path, file: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        state_from_dict(_state_with_file(tmp_path, **file))


def test_negative_saved_overlay_past_its_limit_or_the_most(tmp_path: Path) -> None:
    data = _state_with_file(tmp_path, size=8, chunks={"0": "AAAAAAAAAAA="})
    data["files"]["files_limit"] = 100
    with pytest.raises(ConfigError, match="holds 4096 bytes, more than its limit of 100"):
        state_from_dict(data)
    data["files"]["files_limit"] = MAX_FILES_LIMIT + 1
    with pytest.raises(ConfigError, match="files_limit .* is outside"):
        state_from_dict(data)
    data["files"]["files_limit"] = 4096
    data["files"]["overlay"]["/tmp/f"]["kind"] = "fifo"
    with pytest.raises(ConfigError, match="has kind 'fifo'"):
        state_from_dict(data)


def test_negative_saved_image_block_is_bounded_before_it_is_made(tmp_path: Path) -> None:
    from pyvmm.linux import attach_process

    data = _state_with_file(tmp_path, size=0)
    data["memory"]["image_size"] = 32 << 40
    with Machine(32 << 20) as machine, pytest.raises(ConfigError, match="image block"):
        attach_process(machine, data)


def test_version_1_state_still_loads(tmp_path: Path) -> None:
    data = _state_with_file(tmp_path, size=0)
    data["version"] = 1
    data["files"].pop("files_limit")
    data["files"]["overlay"]["/tmp/f"] = {"kind": "file", "data": "aGVsbG8="}
    state = state_from_dict(data)
    assert bytes(state.files.overlay["/tmp/f"].data) == b"hello"


# ------------------------------------------------------------------------------ the store
_OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 5 * CHUNK_SIZE), st.integers(1, 2 * CHUNK_SIZE),
              st.integers(0, 1 << 20)),
    st.tuples(st.just("truncate"), st.integers(0, 6 * CHUNK_SIZE), st.just(0), st.just(0)),
), max_size=12)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_file_data_reads_as_a_flat_model(ops: list[tuple[str, int, int, int]]) -> None:
    """Writes (with a room that may cut them), truncates: the sparse store reads as a flat
    bytearray would, charges what it says, keeps its invariants, and seeks to its data."""
    from pyvmm.linux.filedata import check_file_data

    data, model, charged = FileData(), bytearray(), 0
    for step, (op, offset, length, room) in enumerate(ops):
        if op == "write":
            blob = bytes([step + 1]) * length
            written, growth = data.write(offset, blob, room)
            assert growth <= room
            charged += growth
            if written:
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset:offset + written] = blob[:written]
        else:
            charged -= data.truncate(offset)
            del model[offset:]
            model.extend(bytes(offset - len(model)))
        assert check_file_data(data) is None
        assert data.allocated == charged
        assert data.size == len(model)
    assert bytes(data) == bytes(model)
    assert data.read(CHUNK_SIZE - 3, CHUNK_SIZE + 7) == bytes(model[CHUNK_SIZE - 3:2 * CHUNK_SIZE + 4])
    first = data.next_data(0)
    assert first is None or (first == 0 or not any(model[:first])) and first < len(model)
    hole = data.next_hole(0)
    assert hole == len(model) or data.chunks.get(hole // CHUNK_SIZE) is None or \
        hole % CHUNK_SIZE >= len(data.chunks[hole // CHUNK_SIZE])
    assert all(page_up(len(c)) for c in data.chunks.values())


def test_default_limit_is_half_of_ram_capped() -> None:
    assert default_files_limit(256 << 20) == 128 << 20
    assert default_files_limit(8 << 30) == MAX_FILES_LIMIT
    node = OverlayNode("file")
    assert node.data == FileData()


@given(st.text())
def test_an_entry_is_charged_its_path_as_saved(path: str) -> None:
    """The path's share of an entry's charge is its length as JSON text in the saved state
    (counted without json, which a start-up does not import)."""
    from pyvmm.linux.vfs import _json_length

    assert _json_length(path) == len(json.dumps(path))
