#!/usr/bin/env python3
"""Long, coverage-guided fuzzing of pyvmm's checkpoint readers with atheris (libFuzzer).

The targets are the suite's own (``tests/property/test_fuzz.py``): ``container`` feeds each
input to ``CheckpointFile.open`` and every increment's page index, stats and checksums;
``stream`` loads it as an increment's QEMU stream into a machine's save-state entries. Any
exception but a ``PyvmmError`` is a finding (libFuzzer stops and writes the input to
``crash-*``); so is an input that takes longer than ``-timeout`` seconds or more memory than
``-rss_limit_mb``, which bounds the work and the allocation one input may cause.

atheris is not a pyvmm dependency; install it only to fuzz::

    pip install atheris
    python scripts/fuzz-atheris.py container -max_total_time=3600 -rss_limit_mb=512 \\
        -timeout=10 corpus/container
    python scripts/fuzz-atheris.py stream -max_total_time=3600 -rss_limit_mb=512 \\
        -timeout=10 corpus/stream

Arguments after the target name go to libFuzzer (``-help=1`` lists them); a directory
argument is the corpus, grown as new coverage is found (seed it with real checkpoint files,
or with ``checkpoint export`` streams for the stream target). Reproduce a finding with
``python scripts/fuzz-atheris.py container crash-<hash>``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("container", "stream")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus]")
    target = sys.argv.pop(1)
    try:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris (it is not a pyvmm dependency)")
    sys.path.insert(0, str(ROOT / "tests" / "property"))
    with atheris.instrument_imports():
        import test_fuzz  # type: ignore[import-not-found]  # the suite's targets, instrumented

        from pyvmm.errors import PyvmmError
        from pyvmm.machine import Machine

    folder = Path(tempfile.mkdtemp(prefix="pyvmm-fuzz-"))
    machine = Machine(1 << 20) if target == "stream" else None

    def one_input(data: bytes) -> None:
        try:
            if machine is not None:
                test_fuzz.stream_target(data, machine)
            else:
                test_fuzz.container_target(data, folder)
        except PyvmmError:
            pass  # the targets catch their own; this one is for the set-up around them

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
