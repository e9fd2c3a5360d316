"""``python -m pyvmm``: the command-line interface (see pyvmm.cli)."""

from pyvmm.cli import main

raise SystemExit(main())
