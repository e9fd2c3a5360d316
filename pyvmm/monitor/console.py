"""HMP on the terminal (``--monitor stdio``): a prompt, line editing and history where the
terminal allows it (``readline``), one command per line.

It runs on its own thread (``pyvmm-hmp``), reading pyvmm's standard input; the guest's output
goes to standard output as before, so both show on the terminal.  End of input (Ctrl-D, or a
pipe that ends) closes the monitor, not the run: ``quit`` ends the run.
"""

from __future__ import annotations

import os
import sys
import threading

from ..threads import NamedThread
from .controller import VmController
from .hmp import execute_line

PROMPT = "(pyvmm) "


class StdioMonitor:
    """HMP over stdin/stdout for one controller; :meth:`start`, then :meth:`close`."""

    def __init__(self, vm: VmController) -> None:
        self.vm = vm
        self._thread = NamedThread(target=self._main, name="pyvmm-hmp", daemon=True)
        self._tty = os.isatty(0)

    def start(self) -> StdioMonitor:
        if self._tty:
            try:
                import readline  # noqa: F401 - input() gains line editing and history
            except ImportError:
                pass
        self._thread.start()
        return self

    def _main(self) -> None:
        from .. import __version__

        print(f"pyvmm {__version__} monitor - type 'help' for more information",
              file=sys.stderr, flush=True)
        while True:
            try:
                line = input(PROMPT) if self._tty else sys.stdin.readline()
            except (EOFError, OSError, ValueError):
                return
            if not self._tty and not line:
                return  # end of a piped input
            text = line.strip()
            if not text:
                continue
            output = execute_line(self.vm, text).replace("\r\n", "\n")
            if output:
                sys.stdout.write(output)
                sys.stdout.flush()
            if self.vm.quit_requested:
                return

    def close(self) -> None:
        """The thread is a daemon blocked in a read of stdin: it is left to end with the
        process (a read cannot be interrupted portably)."""
        if threading.current_thread() is self._thread:
            return
