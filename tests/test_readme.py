"""The README's run examples, as a newcomer runs them: top to bottom, in an empty directory.

Every ``sh`` code block of the README's "Run" section (the set-up block above it installs and
runs the suite, so it is not rerun here) is run line by line, in order, in one bash session in a
new temporary directory, so that each line sees the files and variables the lines before it made.
Each line must exit 0. The only change to the environment: the repository root is put on
PYTHONPATH, standing in for the ``pip install -e`` of ``scripts/install`` (the examples then run
``python -m pyvmm`` from a directory that is not the repository).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BUSYBOX = ROOT / "tests" / "data" / "busybox" / "bin" / "busybox"


def run_examples(text: str) -> list[str]:
    """The command lines of the ``sh`` blocks between "## Run" and the next "## " heading."""
    section = text.split("\n## Run\n", 1)[1].split("\n## ", 1)[0]
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL):
        lines += [line for line in block.splitlines() if line.strip()]
    return lines


def test_the_run_section_holds_the_examples_the_issue_names() -> None:
    lines = run_examples(README.read_text())
    assert lines[0] == "python -m pyvmm run --checkpoint chpt:out.bin"
    assert any("--stdin -" in line and not line.startswith("some-producer") for line in lines)
    assert any("squash:4:p.bin" in line for line in lines)


def test_readme_run_examples_work_in_an_empty_directory(tmp_path: Path) -> None:
    assert BUSYBOX.is_file(), f"the busybox guest is missing ({BUSYBOX}): run scripts/install"
    lines = run_examples(README.read_text())
    status = tmp_path.parent / f"{tmp_path.name}.status"
    logs = tmp_path.parent / f"{tmp_path.name}.logs"
    logs.mkdir()
    # each line on its own (a trailing comment ends at its newline), its output kept aside
    script = [f"exec 3>{status}"]
    for i, line in enumerate(lines):
        script += ["{", line, f"}} >{logs}/{i}.out 2>{logs}/{i}.err", f"echo \"{i} $?\" >&3"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    codes = dict(line.split() for line in status.read_text().splitlines())
    for i, line in enumerate(lines):
        err = (logs / f"{i}.err").read_text(errors="replace").strip().splitlines()[-3:]
        assert codes.get(str(i)) == "0", f"{line!r} exited {codes.get(str(i))}: {err}"
    # what the lines were meant to make
    made = {p.name for p in tmp_path.iterdir()}
    assert {"out.bin", "a.bin", "a.qemu", "data.bin", "numbers.gz", "c.bin", "sums.bin",
            "p.bin", "full.bin", "p.bin_squashed"} <= made
    assert subprocess.run(["gzip", "-dc", str(tmp_path / "numbers.gz")], capture_output=True,
                          check=True).stdout == (tmp_path / "data.bin").read_bytes()
