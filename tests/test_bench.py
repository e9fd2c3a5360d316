"""``pyvmm bench`` as a researcher runs it: a tiny matrix through the command line gives results
that match the documented schema, a CSV and a table; its numbers are the checkpoint files' own
and include a slowed saver's time; an interrupted run keeps its finished cells; two runs compare;
bad input is one line."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pyvmm.bench.spec import Cell, expand_workload, matrix, parse_algorithm
from pyvmm.errors import ConfigError
from pyvmm.migration.container import CheckpointFile

SCHEMA = json.loads((Path(__file__).parents[1] / "pyvmm/bench/results.schema.json").read_text())
TINY = ["--workload", "pattern=random,working_set=4M", "--ram", "32M", "--repeat", "1",
        "--checkpoints", "2", "--interval", "0.1", "--qemu", "off"]
NO_QEMU = {**os.environ, "PATH": "/nonexistent"}

SLOW_SAVER = '''
import time
from pyvmm.migration.savers import StopAndCopySaver

class SlowSaver(StopAndCopySaver):
    """stop-and-copy that takes a quarter of a second longer over every save"""
    def save(self, job):
        time.sleep(0.25)
        return super().save(job)
'''


def bench(*args: str | Path, cwd: Path, timeout: float = 600,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(env or os.environ), "PYTHONPATH": os.pathsep.join([str(cwd), *sys.path])}
    return subprocess.run([sys.executable, "-m", "pyvmm", "bench", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                          check=False)


def test_a_tiny_matrix_gives_schema_valid_json_csv_and_a_table(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW_SAVER)
    proc = bench(*TINY, "--algorithm", "stop-and-copy", "--algorithm", "incremental,live",
                 "--algorithm", "saver=slow:SlowSaver", "-o", "r.json", "--csv", "r.csv",
                 "--keep-files", "--plots", "figures", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(results, SCHEMA)
    records = results["records"]
    assert [r["cell"]["algorithm"] for r in records] == [
        "stop-and-copy", "incremental,live", "stop-and-copy,saver=slow:SlowSaver"]
    assert all(r["error"] is None and len(r["checkpoints"]) == 2 for r in records)
    assert [c["kind"] for c in records[1]["checkpoints"]] == ["full", "incremental"]
    assert len(records[0]["reloads"]) == 2 and records[0]["baselines"]["raw_write_mib_s"] > 0
    assert results["host"]["cores"] == os.cpu_count() and results["host"]["kernel"]
    # honest: each number is the checkpoint file's own statistic
    for record in records:
        with CheckpointFile.open(record["file"]) as container:
            for checkpoint, info in zip(record["checkpoints"], container.header.increments):
                stored = container.stats(info.index)
                for key in ("downtime_ms", "total_ms", "bytes_written", "pages"):
                    assert checkpoint[key] == stored[key], key
    # ... and a slowed saver shows up slower, by at least what it slept, pause included
    slowed = records[2]["checkpoints"]
    assert all(c["saver"] == "slow:SlowSaver" for c in slowed)
    assert all(c["total_ms"] >= 250 and c["downtime_ms"] >= 250 for c in slowed)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert len(rows) == 6 and {row["algorithm"] for row in rows} == {
        r["cell"]["algorithm"] for r in records}
    assert "downtime ms" in proc.stdout and "incremental,live" in proc.stdout
    assert "pyvmm bench: [3/3]" in proc.stderr

    again = bench("compare", "r.json", "r.json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("downtime ms 1.00x") == 3
    # the figures, drawn after the run and again from the saved results; each PNG decodes
    redrawn = bench("plot", "r.json", cwd=tmp_path)
    assert redrawn.returncode == 0, redrawn.stderr
    for directory in (tmp_path / "figures", tmp_path / "r-plots"):
        for name in ("downtime.png", "slowdown.png", "bytes.png", "reload.png"):
            image = plt.imread(directory / name)
            assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_an_interrupted_run_keeps_its_finished_cells(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "bench", *TINY, "--repeat", "20",
                             "--algorithm", "stop-and-copy", "--no-reloads", "-o", "r.json"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first finished cell, then Ctrl-C
            if line.startswith("pyvmm bench: [1/20]"):
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, rest
    assert "interrupted" in rest
    results = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(results, SCHEMA)
    assert 1 <= len(results["records"]) < 20
    assert not list(tmp_path.glob("pyvmm-bench-*")), "a cell's files were left behind"


@pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                    reason="qemu-system-aarch64 is not installed (scripts/install installs it)")
def test_qemu_runs_the_same_workload_beside_pyvmm_and_its_snapshots_are_measured(
        tmp_path: Path) -> None:
    proc = bench(*TINY[:-2], "--qemu", "on", "--algorithm", "stop-and-copy", "-o", "r.json",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(results, SCHEMA)
    by_algorithm = {r["cell"]["algorithm"]: r for r in results["records"]}
    assert set(by_algorithm) == {"stop-and-copy", "qemu:savevm", "qemu:background-snapshot"}
    ours = by_algorithm["stop-and-copy"]["uart"]
    assert ours.startswith("pyvmm-workload: start pattern=random pages=1024")
    for name in ("qemu:savevm", "qemu:background-snapshot"):
        record = by_algorithm[name]
        assert record["error"] is None, record["error"]
        assert record["uart"] == ours  # the same guest, run by QEMU
        assert len(record["checkpoints"]) == 2 and len(record["reloads"]) == 2
        for checkpoint in record["checkpoints"]:
            # QEMU skips zero pages too: at least the working set, far less than the RAM
            assert 4 << 20 <= checkpoint["bytes_written"] < 32 << 20
            assert checkpoint["guest_ips_during"] is None  # not measured, never guessed
        assert all(row["qemu_incoming_s"] > 0 for row in record["reloads"])
    assert "qemu:savevm" in proc.stdout


def test_a_static_arm64_program_is_a_workload_too(tmp_path: Path) -> None:
    """A busybox applet: measured like the built-in guest (here it ends within the first
    interval: checkpoints of an ended guest, reloads that do not run it); QEMU, which runs only
    the bare-metal workload, adds no row for it."""
    busybox = Path(__file__).resolve().parent / "data/busybox/bin/busybox"
    (tmp_path / "data.txt").write_text("".join(f"{n}\n" for n in range(20000)))
    proc = bench("--program", f"{busybox} sha256sum {tmp_path / 'data.txt'}", "--ram", "32M",
                 "--repeat", "1", "--checkpoints", "2", "--interval", "0.1",
                 "--algorithm", "incremental", "-o", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(results, SCHEMA)
    [record] = results["records"]
    assert record["error"] is None and record["cell"]["workload"].startswith("program:")
    assert [c["kind"] for c in record["checkpoints"]] == ["full", "incremental"]
    assert len(record["reloads"]) == 2


def test_without_qemu_its_rows_are_skipped_with_a_note_or_refused_when_asked(
        tmp_path: Path) -> None:
    auto = bench(*TINY[:-2], "--algorithm", "stop-and-copy", "-o", "r.json", "--no-reloads",
                 cwd=tmp_path, env=NO_QEMU)
    assert auto.returncode == 0, auto.stderr
    assert "note: qemu-system-aarch64 is not installed: the QEMU rows are skipped" in auto.stderr
    records = json.loads((tmp_path / "r.json").read_text())["records"]
    assert [r["cell"]["algorithm"] for r in records] == ["stop-and-copy"]
    required = bench(*TINY[:-2], "--qemu", "on", cwd=tmp_path, env=NO_QEMU)
    assert required.returncode == 1
    assert required.stderr == "pyvmm: error: --qemu on: qemu-system-aarch64 is not installed\n"


def test_a_local_dask_cluster_measures_the_same_cells_and_names_its_hosts(
        tmp_path: Path) -> None:
    from distributed import LocalCluster

    args = [*TINY, "--algorithm", "stop-and-copy", "--algorithm", "incremental",
            "--no-reloads"]
    local = bench(*args, "-o", "local.json", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        remote = bench(*args, "--dask", cluster.scheduler_address, "-o", "dask.json",
                       cwd=tmp_path)
        assert remote.returncode == 0, remote.stderr
    results = {name: json.loads((tmp_path / f"{name}.json").read_text())
               for name in ("local", "dask")}
    jsonschema.validate(results["dask"], SCHEMA)
    cells = {name: sorted(json.dumps(r["cell"], sort_keys=True) for r in data["records"])
             for name, data in results.items()}
    assert cells["local"] == cells["dask"] and len(cells["dask"]) == 2
    for record in results["dask"]["records"]:
        assert record["error"] is None and len(record["checkpoints"]) == 2
        assert record["host"]["hostname"] and record["host"]["cores"] >= 1
    unreachable = bench(*args, "--dask", "tcp://127.0.0.1:9", cwd=tmp_path)
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("pyvmm: error: --dask tcp://127.0.0.1:9: cannot reach")


@pytest.mark.parametrize("args, message", [
    (["--algorithm", "engine=x"], "'engine' is not one of tracker, saver, encoder"),
    (["--algorithm", "saver=nope"], "unknown saver 'nope'"),
    (["--algorithm", "fast"], "'fast' is not a capability"),
    (["--workload", "pattern=bogus"], "workload option 'pattern'"),
    (["--workload", "working_set=1M..1T"], "more than 16 values"),
    (["--ram", "1M"], "a bench guest needs at least 16M"),
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["compare", "missing.json", "missing.json"], "cannot read missing.json"),
    (["frobnicate"], "bench takes options to run a matrix, or: compare A.json B.json"),
    (["plot", "missing.json"], "cannot read missing.json"),
])
def test_negative_bad_bench_input_is_one_line(tmp_path: Path, args: list[str],
                                              message: str) -> None:
    proc = bench(*args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("pyvmm: error: ") and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not list(tmp_path.glob("*.json"))


def test_the_matrix_spells_lists_ranges_and_parts() -> None:
    assert expand_workload("pattern=random|hotcold,working_set=16M..64M") == [
        f"pattern={p},working_set={w},passes=0,report=0"
        for p in ("random", "hotcold") for w in ("16M", "32M", "64M")]
    algorithm = parse_algorithm("live,incremental,tracker=wp,encoder=zstd")
    assert algorithm.label == "incremental,live,tracker=wp,encoder=zstd"
    assert algorithm.checkpointer_options() == {"capabilities": ("incremental", "live"),
                                                "tracker": "wp", "encoder": "zstd"}
    cells = matrix(["a", "b"], ["x"], [1 << 25], repeat=2, checkpoints=3, interval=0.1,
                   directory="/tmp")
    assert [(c.workload, c.repetition) for c in cells] == [("a", 0), ("b", 0), ("a", 1),
                                                           ("b", 1)]
    assert Cell.from_json(cells[0].to_json()) == cells[0]
    with pytest.raises(ConfigError, match="unknown field"):
        Cell.from_json({**cells[0].to_json(), "extra": 1})


def test_the_peak_memory_window_counts_what_is_touched_in_it_and_never_goes_negative() -> None:
    """Memory freed in the window is no negative growth (a bench record once read -77824
    bytes: the kernel's RSS counters are approximate); memory touched in it is counted."""
    from pyvmm.bench.host import peak_rss_growth, reset_peak_rss

    before = b"\x01" * (32 << 20)
    baseline = reset_peak_rss()
    if baseline is None:
        pytest.skip("this kernel refuses /proc/self/clear_refs")
    del before  # freed inside the window
    assert 0 <= peak_rss_growth(baseline) < (1 << 20)
    inside = b"\x02" * (64 << 20)  # 32 MiB above where the window started
    assert peak_rss_growth(baseline) >= (32 << 20) - (1 << 20), len(inside)
    assert peak_rss_growth(None) == -1
