"""``python -m pyvmm``: the command-line interface (see pyvmm.cli).

Until :func:`pyvmm.cli.main` has its own handlers, an interrupt (Ctrl-C, SIGTERM) during start-up
ends the process with one line and 130 / 143, never a traceback: nothing has been done yet.
Once it has returned, they are ignored: the exit status already says what happened.
"""

import signal
import sys


def _early_exit(signum: int, _frame: object) -> None:
    name = signal.Signals(signum).name
    sys.stderr.write(f"pyvmm: interrupted ({name}) during start-up\n")
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _early_exit)
    signal.signal(signal.SIGTERM, _early_exit)
    from pyvmm.cli import main

    status = main()  # installs its own handlers as its work begins
    # done: a signal now would only kill the exit (the interpreter's own clean-up restores the
    # default action) and replace the status that says what happened
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(status)
