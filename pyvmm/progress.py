"""Progress lines and summaries on stderr, shared by the commands that do long work."""

from __future__ import annotations

import sys
from typing import Any

from .units import format_size


def squash_summary(result: Any, quiet: bool) -> None:
    if not quiet:
        print(f"pyvmm: squashed {result.increments} increment(s) into {result.output}: "
              f"{result.stats.pages} pages + {result.stats.zero_pages} zero, "
              f"{format_size(result.stats.bytes_written)} in {result.seconds:.2f} s",
              file=sys.stderr)


class Progress:
    """A progress line on stderr: redrawn in place on a terminal, a line per 10 % otherwise."""

    def __init__(self, what: str, quiet: bool) -> None:
        self.what = what
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        percent = 100 * done // total if total else 100
        if self.tty:
            bar = "#" * (percent // 5)
            print(f"\rpyvmm: {self.what} [{bar:<20}] {percent:3d}%", end="", file=sys.stderr,
                  flush=True)
            if percent >= 100:
                print(file=sys.stderr)
                self.shown = 100
        elif percent // 10 > self.shown // 10 or self.shown < 0:
            self.shown = percent
            print(f"pyvmm: {self.what}: {percent}%", file=sys.stderr, flush=True)
