"""The compress capability (page encoder ``zstd``): compressed page records written by every saver,
reloaded by every strategy (lazy included) to the machine that was saved, mixed with plain
increments in one chain, refused with the project's error when damaged, and driven from the
command line and the monitor as users drive it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyvmm.boot import GuestSpec, boot
from pyvmm.errors import ConfigError, FormatError
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine
from pyvmm.migration.algorithms import available
from pyvmm.migration.checkpoint import Checkpointer, reload
from pyvmm.migration.container import CheckpointFile
from pyvmm.migration.container_format import PageRun, load_spec
from pyvmm.migration.defaults import STRATEGIES
from pyvmm.migration.encoders import COMPRESSED_MAX
from pyvmm.migration.lazy import lazy_reload
from pyvmm.migration.page_index_format import decode_page_index, encode_page_index
from pyvmm.migration.squash import squash
from pyvmm.ram import PAGE_SIZE
from pyvmm.testing.digest import ram_digest

GUEST = WorkloadOptions.parse("pattern=random,working_set=2M,passes=0,report=0")
RAM = 8 << 20
RELOADS = (*STRATEGIES, "lazy")


def pyvmm(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *map(str, args)], capture_output=True,
                          text=True, timeout=300, check=False, cwd=cwd)


def host_writes(machine: Machine, round_: int) -> None:
    """Pages no encoder shrinks (random bytes) beside pages that shrink well (a short text
    repeated), so that one increment holds both compressed and plain records."""
    block = machine.ram_blocks[0]
    base = block.size - 64 * PAGE_SIZE
    for k in range(8):
        block.write(base + (round_ * 8 + k) % 64 * PAGE_SIZE, os.urandom(PAGE_SIZE))
    text = f"round {round_} of the compress test; ".encode()
    block.write(base - 16 * PAGE_SIZE, (text * (16 * PAGE_SIZE // len(text) + 1))[:16 * PAGE_SIZE])


def reloaded_digest(target: str, how: str) -> str:
    if how == "lazy":
        machine, loader = lazy_reload(target)
        with machine:
            try:
                assert loader.wait_filled(120)
                return ram_digest(machine)
            finally:
                loader.close()
    with reload(target, strategy=how) as machine:
        return ram_digest(machine)


def save_chain(path: Path, saver: str, encoders: list[str]) -> list[str]:
    """One incremental checkpoint per encoder name (the guest and the host writing between
    them); the RAM digest at each."""
    digests = []
    with boot(GuestSpec(workload=GUEST), ram_size=RAM) as machine:
        checkpointer = Checkpointer(machine, path, durable=False, capabilities=["incremental"],
                                    saver=saver)
        try:
            for round_, encoder in enumerate(encoders):
                checkpointer.set_encoder(encoder)
                machine.run(max_insns=40_000)
                host_writes(machine, round_)
                stats = checkpointer.checkpoint()
                assert stats.encoder == encoder
                if encoder == "zstd":
                    # both kinds of record in one increment
                    assert 0 < stats.compressed_pages < stats.pages, stats
                    assert stats.compressed_bytes < stats.compressed_pages * COMPRESSED_MAX
                else:
                    assert stats.compressed_pages == stats.compressed_bytes == 0
                digests.append(ram_digest(machine))
        finally:
            checkpointer.close()
    return digests


@pytest.mark.parametrize("saver", ["stop-and-copy", "live", "cow"])
def test_every_saver_writes_compressed_chains_that_every_reload_reads_back(
        tmp_path: Path, saver: str) -> None:
    path = tmp_path / "c.chpt"
    digests = save_chain(path, saver, ["zstd", "zstd", "zstd"])
    with CheckpointFile.open(path) as container:
        for info in container.header.increments:
            runs = container.page_index(info.index)
            assert any(run.compressed for run in runs) and any(
                not run.compressed and not run.zero for run in runs)
    for count, digest in enumerate(digests, start=1):
        for how in RELOADS:
            assert reloaded_digest(f"chpt:{count}:{path}", how) == digest, (saver, count, how)


def test_a_chain_mixes_compressed_and_plain_increments(tmp_path: Path) -> None:
    path = tmp_path / "mixed.chpt"
    encoders = ["plain", "zstd", "plain", "zstd"]
    digests = save_chain(path, "stop-and-copy", encoders)
    with CheckpointFile.open(path) as container:
        held = [any(run.compressed for run in container.page_index(i)) for i in range(4)]
    assert held == [encoder == "zstd" for encoder in encoders]
    for count, digest in enumerate(digests, start=1):
        for how in RELOADS:
            assert reloaded_digest(f"chpt:{count}:{path}", how) == digest, (count, how)
    # squashed into one file: plain by default, compressed when asked
    for encoder in ("plain", "zstd"):
        out = tmp_path / f"squashed-{encoder}.chpt"
        result = squash(path, output=out, durable=False, encoder=encoder)
        assert (result.stats.compressed_pages > 0) == (encoder == "zstd")
        assert reloaded_digest(f"chpt:{out}", "indexed") == digests[-1]


def compressed_file(tmp_path: Path) -> tuple[Path, PageRun]:
    path = tmp_path / "z.chpt"
    save_chain(path, "stop-and-copy", ["zstd"])
    verify = pyvmm("checkpoint", "verify", path)
    assert verify.returncode == 0, verify.stderr
    with CheckpointFile.open(path) as container:
        run = next(run for run in container.page_index(0) if run.compressed and run.npages > 2)
    return path, run


def damage(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def frame_length(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(2), "big")


@pytest.mark.parametrize("what", ["frame", "length", "header"])
def test_negative_damaged_compressed_records_are_refused_by_every_reload(
        tmp_path: Path, what: str) -> None:
    path, run = compressed_file(tmp_path)
    start = run.data_offset
    second = start + 2 + frame_length(path, start)  # the run's second record's header
    if what == "frame":  # a byte inside the first frame: its checksum no longer holds
        n = frame_length(path, start)
        with open(path, "rb") as f:
            f.seek(start + 2 + n // 2)
            byte = f.read(1)[0]
        damage(path, start + 2 + n // 2, bytes([byte ^ 0x40]))
        expected = "does not inflate"
    elif what == "length":
        damage(path, start, (COMPRESSED_MAX + 1).to_bytes(2, "big"))
        expected = "does not inflate"
    else:
        damage(path, second + 6, b"\x00\x28")  # COMPRESSED|CONTINUE becomes PAGE|CONTINUE
        expected = None  # what the first reader to see it says: a header, a record, a flag
    for how in RELOADS:
        with pytest.raises(FormatError, match=expected):
            reloaded_digest(f"chpt:{path}", how)
    proc = pyvmm("run", "--incoming", f"chpt:{path}", "-q")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("pyvmm: error: "), proc.stderr
    assert "increment 0" in proc.stderr or str(path) in proc.stderr, proc.stderr
    # found without loading a guest too, and named
    verify = pyvmm("checkpoint", "verify", path)
    assert verify.returncode == 1, verify.stderr
    assert f"pyvmm: {path}: increment 0: stream: " in verify.stdout, verify.stdout
    assert "Traceback" not in verify.stderr
    if expected:
        assert expected in verify.stdout, verify.stdout


def test_compress_makes_a_compressible_guest_file_3x_smaller(tmp_path: Path) -> None:
    """The built-in workload (64 bytes written per page touched) through the command line."""
    common = ["--workload", "working_set=32M,passes=8,report=0", "-q"]
    for name, extra in (("plain", []), ("small", ["--compress"])):
        proc = pyvmm("run", *extra, "--checkpoint", f"chpt:{name}.bin", *common, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    plain, small = (tmp_path / "plain.bin").stat().st_size, (tmp_path / "small.bin").stat().st_size
    assert plain >= 3 * small, (plain, small)
    info = pyvmm("checkpoint", "info", "small.bin", cwd=tmp_path)
    assert "encoder zstd level 1:" in info.stdout and "pages compressed into" in info.stdout
    stats = json.loads(pyvmm("checkpoint", "info", "--json", "small.bin",
                             cwd=tmp_path).stdout)["increments"][0]["stats"]
    assert stats["encoder"] == "zstd" and stats["compressed_pages"] > 0
    # the same machine comes back from either
    outs = [pyvmm("run", "--incoming", f"chpt:{name}.bin", "-q", cwd=tmp_path)
            for name in ("plain", "small")]
    assert outs[0].returncode == outs[1].returncode == 0
    assert outs[0].stdout == outs[1].stdout


@pytest.mark.parametrize("args, message", [
    (["--compress", "--checksum"], "the compress and checksum capabilities do not combine"),
    (["--compress", "--compress-level", "99"], "compress level 99 is not a zstd level"),
    (["--encoder", "nope"], "encoder must be one of plain, zstd"),
    (["--encoder", "plain", "--compress"], "the compress capability is the zstd encoder"),
    (["--compress-level", "3"], "the plain encoder compresses nothing"),
])
def test_negative_bad_compress_options_are_one_line(tmp_path: Path, args: list[str],
                                                     message: str) -> None:
    proc = pyvmm("run", *args, "--checkpoint", f"chpt:{tmp_path / 'x.bin'}", "-q")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"pyvmm: error: {message}"), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.bin").exists()


def test_export_refuses_compressed_records_and_squash_makes_them_plain(tmp_path: Path) -> None:
    path, _ = compressed_file(tmp_path)
    proc = pyvmm("checkpoint", "export", path, "-o", tmp_path / "out.qemu")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "compressed page records" in proc.stderr and "squash" in proc.stderr
    assert not (tmp_path / "out.qemu").exists()
    plain = tmp_path / "plain.chpt"
    assert pyvmm("checkpoint", "squash", path, "-o", plain, "-q").returncode == 0
    proc = pyvmm("checkpoint", "export", plain, "-o", tmp_path / "out.qemu")
    assert proc.returncode == 0, proc.stderr


def test_the_encoders_are_listed_and_chosen_by_name() -> None:
    assert set(available("encoder")) >= {"plain", "zstd"}
    proc = pyvmm("algorithms")
    assert proc.returncode == 0
    assert "encoders (--encoder NAME; plug-ins: entry point group pyvmm.encoders)" in proc.stdout
    for name in ("plain", "zstd"):
        assert any(line.split()[:1] == [name] for line in proc.stdout.splitlines())
    with boot(GuestSpec(workload=GUEST), ram_size=RAM) as machine, \
            pytest.raises(ConfigError, match="unknown encoder 'gzip'"):
        Checkpointer(machine, "unused.chpt", encoder="gzip")


def test_the_index_flag_is_the_declarations_and_a_run_is_one_kind() -> None:
    from pyvmm._native import lib

    spec = load_spec()
    assert spec.RUN_COMPRESSED == lib.PYVMM_RUN_COMPRESSED and spec.RUN_ZERO == lib.PYVMM_RUN_ZERO
    runs = [PageRun(0, 3, 2, 0x30000, False, True), PageRun(0, 5, 1, 0, True)]
    assert decode_page_index(encode_page_index(1, runs), increment=1) == runs
    both = bytearray(encode_page_index(1, [PageRun(0, 3, 2, 0x30000, False, True)]))
    both[12 + 2] = spec.RUN_ZERO | spec.RUN_COMPRESSED  # the run's flags, CRC made to hold
    both[-4:] = spec.crc32(bytes(both[:-4])).to_bytes(4, "big")
    with pytest.raises(FormatError, match="both zero and compressed"):
        decode_page_index(bytes(both), increment=1)


MONITOR_WORKLOAD = "pattern=sequential,working_set=64K,passes=1500000,report=0"


def test_qmp_turns_compress_on_and_off_between_increments_of_one_chain(tmp_path: Path) -> None:
    """migrate-set-capabilities compress and migrate-set-parameters compress-level between
    migrations: the chain grows (one checkpointer, its tracker kept), each increment written
    as asked; the chain reloads in a new process to the uninterrupted run's output."""
    import asyncio

    import pyvmm_process
    from pyvmm_process import finish, quit_disconnect, wait_for_socket
    from qemu.qmp import QMPClient

    from pyvmm.guests.workload import expected_output

    sock, chpt = tmp_path / "vm.qmp", tmp_path / "vm.chpt"

    async def completed(client: QMPClient) -> None:
        async for event in client.events:
            data: Any = event.get("data", {})
            if event["event"] == "MIGRATION" and data["status"] == "completed":
                return

    async def session() -> Any:
        client = QMPClient("compress")
        await client.connect(str(sock))
        await client.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "incremental", "state": True}]})
        await client.execute("cont")
        steps: list[tuple[bool | None, int | None]] = [(None, None), (True, None), (None, 3),
                                                       (False, 0)]
        for number, (compress, level) in enumerate(steps):
            if compress is not None:
                await client.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "compress", "state": compress}]})
            if level is not None:
                await client.execute("migrate-set-parameters", {"compress-level": level})
            if number == len(steps) - 1:
                await client.execute("stop")
            await client.execute("migrate", {"uri": f"chpt:{chpt}"})
            await asyncio.wait_for(completed(client), pyvmm_process.DEADLINE)
            if number == 2:
                parameters = await client.execute("query-migrate-parameters")
        with pytest.raises(Exception, match="do not combine"):
            await client.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "compress", "state": True},
                {"capability": "checksum", "state": True}]})
        await client.execute("quit")
        await quit_disconnect(client)
        return parameters

    proc = pyvmm_process.start("run", "--qmp", f"unix:{sock}", "--paused", "--no-fsync", "-q",
                               "--workload", MONITOR_WORKLOAD, stdin=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, proc)
        parameters = asyncio.run(session())
        code, first_out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, err
    assert parameters["encoder"] == "zstd" and parameters["compress-level"] == 3
    with CheckpointFile.open(chpt) as container:
        increments = container.header.increments
        assert [i.kind for i in increments] == ["full"] + ["incremental"] * 3
        stats = [container.stats(i.index) for i in increments]
    assert [s["encoder"] for s in stats] == ["plain", "zstd", "zstd", "plain"]
    assert [s["compress_level"] for s in stats] == [0, 1, 3, 0]
    rest = pyvmm("run", "--incoming", f"chpt:{chpt}", "-q")
    assert rest.returncode == 0, rest.stderr
    assert first_out + rest.stdout.encode() == expected_output(
        WorkloadOptions.parse(MONITOR_WORKLOAD))
