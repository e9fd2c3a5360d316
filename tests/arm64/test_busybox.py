"""A real guest: Debian's static arm64 busybox, run by the Linux layer, checked against Python.

Every expected output is computed on the host in Python (hashlib, gzip, bz2, sorted...), so a
wrong instruction, syscall or byte anywhere shows up as a difference.  The 16 MiB sha256sum is the
acceptance test of the Linux layer.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyvmm.linux import state_from_dict, state_to_dict

#: The ``run_busybox`` fixture (conftest.py): runs an applet, returns a ``GuestRun``.
RunBusybox = Callable[..., Any]


def _text_lines(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "Echo", "fox", "42", "zulu", "x-ray", "ünï"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(count)]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text("\n".join(_text_lines(7, 300)) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def binary_file(tmp_path: Path) -> Path:
    path = tmp_path / "random.bin"
    path.write_bytes(random.Random(11).randbytes(200_003))
    return path


# ------------------------------------------------------------------------------ hashes
@pytest.mark.parametrize("applet,algorithm", [("sha256sum", "sha256"), ("md5sum", "md5")])
def test_hash_applets_match_hashlib(run_busybox: RunBusybox, tmp_path: Path, text_file: Path,
                                    binary_file: Path, applet: str, algorithm: str) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    paths = [text_file, binary_file, empty]
    run = run_busybox(applet, *map(str, paths), files=[str(tmp_path)])
    expected = "".join(f"{hashlib.new(algorithm, p.read_bytes()).hexdigest()}  {p}\n"
                       for p in paths)
    assert run.exit_code == 0, run.stderr
    assert run.stdout.decode() == expected


def test_sha256sum_of_stdin(run_busybox: RunBusybox) -> None:
    data = random.Random(3).randbytes(70_000)
    run = run_busybox("sha256sum", stdin=data)
    assert run.stdout == f"{hashlib.sha256(data).hexdigest()}  -\n".encode()
    run = run_busybox("sha256sum", "/dev/stdin", stdin=data)
    assert run.stdout == f"{hashlib.sha256(data).hexdigest()}  /dev/stdin\n".encode()


def test_sha256sum_16mib_matches_hashlib(run_busybox: RunBusybox, tmp_path: Path) -> None:
    """The acceptance test: busybox sha256sum of a 16 MiB file equals hashlib's (~2-4 s)."""
    path = tmp_path / "big.bin"
    data = random.Random(2024).randbytes(16 << 20)
    path.write_bytes(data)
    run = run_busybox("sha256sum", str(path), files=[str(path)])
    assert run.exit_code == 0, run.stderr
    assert run.stdout == f"{hashlib.sha256(data).hexdigest()}  {path}\n".encode()
    assert run.process.state.stdout_bytes == len(run.stdout)


# ------------------------------------------------------------------------------ compression
def test_gzip_c_output_decompresses_to_the_input(run_busybox: RunBusybox,
                                                 binary_file: Path, text_file: Path) -> None:
    for path in (text_file, binary_file):
        run = run_busybox("gzip", "-c", str(path), files=[str(path)])
        assert run.exit_code == 0, run.stderr
        assert run.stdout[:2] == b"\x1f\x8b"
        assert gzip.decompress(run.stdout) == path.read_bytes()


def test_gzip_d_decompresses_python_gzip(run_busybox: RunBusybox, text_file: Path,
                                         tmp_path: Path) -> None:
    data = text_file.read_bytes() * 20
    run = run_busybox("gzip", "-d", stdin=gzip.compress(data, mtime=0))
    assert run.exit_code == 0, run.stderr
    assert run.stdout == data
    packed = tmp_path / "packed.gz"
    packed.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
    run = run_busybox("gzip", "-dc", str(packed), files=[str(packed)])
    assert run.stdout == data


def test_bzip2_round_trips_with_python_bz2(run_busybox: RunBusybox, text_file: Path) -> None:
    data = text_file.read_bytes() * 10
    run = run_busybox("bzip2", "-c", stdin=data)
    assert run.exit_code == 0, run.stderr
    assert run.stdout[:3] == b"BZh"
    assert bz2.decompress(run.stdout) == data
    run = run_busybox("bzip2", "-dc", stdin=bz2.compress(data))
    assert run.stdout == data


# ------------------------------------------------------------------------------ text tools
def test_sort_plain_numeric_and_reverse(run_busybox: RunBusybox, tmp_path: Path) -> None:
    rng = random.Random(5)
    ascii_lines = [f"{rng.choice('abcXYZ_ 019')}{rng.randint(0, 999)}{rng.choice('qQ.-')}"
                   for _ in range(400)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(ascii_lines) + "\n")
    files = [str(path)]
    run = run_busybox("sort", str(path), files=files)
    assert run.stdout.decode().splitlines() == sorted(ascii_lines)
    run = run_busybox("sort", "-r", str(path), files=files)
    assert run.stdout.decode().splitlines() == sorted(ascii_lines, reverse=True)

    numbers = [str(n) for n in rng.sample(range(-5000, 5000), 500)]
    run = run_busybox("sort", "-n", stdin=("\n".join(numbers) + "\n").encode())
    assert run.stdout.decode().splitlines() == sorted(numbers, key=int)
    run = run_busybox("sort", "-n", "-r", stdin=("\n".join(numbers) + "\n").encode())
    assert run.stdout.decode().splitlines() == sorted(numbers, key=int, reverse=True)


def test_awk_sums_and_prints_fields(run_busybox: RunBusybox) -> None:
    rng = random.Random(9)
    rows = [(f"item{i}", rng.randint(-1000, 1000)) for i in range(250)]
    table = "".join(f"{name} {value}\n" for name, value in rows).encode()
    program = '{ s += $2; if ($2 > m) m = $2 } END { printf "%d %d %d\\n", NR, s, m }'
    run = run_busybox("awk", program, stdin=table)
    assert run.stdout == f"{len(rows)} {sum(v for _, v in rows)} " \
                         f"{max(0, *(v for _, v in rows))}\n".encode()
    run = run_busybox("awk", "NR % 50 == 1 { print $2, $1 }", stdin=table)
    assert run.stdout.decode() == "".join(f"{v} {n}\n" for n, v in rows[::50])


def test_sed_global_substitution(run_busybox: RunBusybox, text_file: Path) -> None:
    run = run_busybox("sed", "s/a/<A>/g; s/^/> /", str(text_file), files=[str(text_file)])
    expected = "".join("> " + line.replace("a", "<A>") + "\n"
                       for line in text_file.read_text().splitlines())
    assert run.stdout.decode() == expected


def _od_hex(data: bytes) -> str:
    lines = [f"{off:06x}" + "".join(f" {b:02x}" for b in data[off:off + 16]) + "\n"
             for off in range(0, len(data), 16)]
    return "".join(lines) + f"{len(data):06x}\n"


def test_od_and_hexdump(run_busybox: RunBusybox) -> None:
    data = random.Random(4).randbytes(1000) + bytes(100)
    run = run_busybox("od", "-v", "-A", "x", "-t", "x1", stdin=data)
    assert run.stdout.decode() == _od_hex(data)
    run = run_busybox("hexdump", "-v", "-C", stdin=data)
    first = data[:16]
    ascii_part = "".join(chr(b) if 32 <= b < 127 else "." for b in first)
    hex_part = " ".join(f"{b:02x}" for b in first[:8]) + "  " + \
        " ".join(f"{b:02x}" for b in first[8:])
    assert run.stdout.decode().splitlines()[0] == f"00000000  {hex_part}  |{ascii_part}|"
    assert run.stdout.decode().splitlines()[-1] == f"{len(data):08x}"


def test_wc_counts(run_busybox: RunBusybox, text_file: Path) -> None:
    data = text_file.read_bytes()
    run = run_busybox("wc", "-l", "-w", "-c", str(text_file), files=[str(text_file)])
    counts = (data.count(b"\n"), len(data.split()), len(data))
    assert run.stdout.decode() == f"{counts[0]:9d} {counts[1]:9d} {counts[2]:9d} {text_file}\n"


def test_sh_builtins_without_fork(run_busybox: RunBusybox) -> None:
    script = ('x=6; echo "x*7=$((x * 7))"; for i in 1 2 3; do printf "%s-" "$i"; done; echo; '
              'n=0; while [ $n -lt 5 ]; do n=$((n + 1)); done; printf "%05d|%x\\n" $n 255; '
              'case abc in a*) echo matched;; esac')
    run = run_busybox("sh", "-c", script)
    assert run.exit_code == 0, run.stderr
    assert run.stdout == b"x*7=42\n1-2-3-\n00005|ff\nmatched\n"


# ------------------------------------------------------------------------------ process behaviour
def test_exit_codes_propagate(run_busybox: RunBusybox) -> None:
    assert run_busybox("false").exit_code == 1
    assert run_busybox("true").exit_code == 0
    assert run_busybox("sh", "-c", "exit 3").exit_code == 3
    missing = run_busybox("cat", "/etc/passwd")
    assert missing.exit_code == 1
    assert b"No such file or directory" in missing.stderr


def test_same_seed_same_bytes_and_ram(run_busybox: RunBusybox) -> None:
    # awk's srand() reads the clock and the sort reads getrandom-seeded state: both must be
    # functions of the seed only.
    program = "BEGIN { srand(); print rand(), rand(), srand() }"
    first = run_busybox("awk", program, seed=5, hash_ram=True)
    second = run_busybox("awk", program, seed=5, hash_ram=True)
    other = run_busybox("awk", program, seed=6, hash_ram=True)
    assert first.stdout == second.stdout
    assert first.ram_hash == second.ram_hash
    assert state_to_dict(first.process.state) == state_to_dict(second.process.state)
    assert first.ram_hash != other.ram_hash  # AT_RANDOM, hence the stack guard, differs


def test_guest_writes_never_reach_host_files(run_busybox: RunBusybox, tmp_path: Path) -> None:
    target = tmp_path / "data.txt"
    target.write_text("one\ntwo\n")
    before = target.read_bytes()
    script = (f'echo replaced > {target}; read line < {target}; echo "$line"; '
              f'echo more >> {target}; echo new > {tmp_path}/created')
    run = run_busybox("sh", "-c", script, files=[str(tmp_path)])
    assert run.stdout == b"replaced\n"
    overlay = run.process.state.files.overlay
    assert bytes(overlay[str(target)].data) == b"replaced\nmore\n"
    assert bytes(overlay[f"{tmp_path}/created"].data) == b"new\n"
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]

    run = run_busybox("sed", "-i", "s/one/ONE/", str(target), files=[str(tmp_path)])
    assert run.exit_code == 0, run.stderr
    assert bytes(run.process.state.files.overlay[str(target)].data) == b"ONE\ntwo\n"
    assert target.read_bytes() == before
    run = run_busybox("rm", str(target), files=[str(tmp_path)])
    assert run.exit_code == 0 and target.exists()


def test_unlisted_host_paths_do_not_exist(run_busybox: RunBusybox, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "a.txt").write_text("a")
    run = run_busybox("ls", str(tmp_path), str(shared), files=[str(shared)])
    assert run.stdout.decode() == f"{tmp_path}:\nshared\n\n{shared}:\na.txt\n"
    run = run_busybox("cat", str(secret), files=[str(shared)])
    assert run.exit_code == 1 and b"No such file" in run.stderr


def test_state_after_a_run_round_trips_through_json(run_busybox: RunBusybox,
                                                   tmp_path: Path) -> None:
    script = "umask 027; echo data > /tmp/f; exec 7</tmp/f 8>>/tmp/g; echo more >&8"
    run = run_busybox("sh", "-c", script, files=[str(tmp_path)])
    state = run.process.state
    text = json.dumps(state_to_dict(state))
    assert state_from_dict(json.loads(text)) == state
    assert state.files.umask == 0o027 and state.exit_code == 0
    assert bytes(state.files.overlay["/tmp/g"].data) == b"more\n"
    assert {7, 8} <= set(state.files.fds)
