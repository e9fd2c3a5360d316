"""``python -m pyvmm``: the command-line interface (see pyvmm.cli).

Until :func:`pyvmm.cli.main` has its own handlers, an interrupt (Ctrl-C, SIGTERM) during start-up
ends the process with one line and 130 / 143, never a traceback: nothing has been done yet.
Once it has returned, they are ignored: the exit status already says what happened.
"""

import os
import signal
import sys


def _early_exit(signum: int, _frame: object) -> None:
    # nothing is open or written yet; an exception raised from here could land inside an
    # import (a class body) and come out as another error with a traceback: leave at once
    name = signal.Signals(signum).name
    sys.stderr.write(f"pyvmm: interrupted ({name}) during start-up\n")
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _early_exit)
    signal.signal(signal.SIGTERM, _early_exit)
    from pyvmm.cli import main

    try:
        status = main()  # installs its own handlers as its work begins
    except KeyboardInterrupt:  # one that came as main() returned: it had said what it did
        status = 130
    # done: a signal now would only kill the exit (the interpreter's own clean-up restores the
    # default action) and replace the status that says what happened; one whose Python handler
    # had not run yet runs as these are set, and is dropped too
    for number in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(number, signal.SIG_IGN)
        except KeyboardInterrupt:
            signal.signal(number, signal.SIG_IGN)
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        # CPython remembers any KeyboardInterrupt that crossed an exec() of source text (a
        # dataclass or construct parser being built when the signal came), caught or not, and
        # then ends the process by SIGINT, whatever the status: leave with ours, work all done
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    raise SystemExit(status)
