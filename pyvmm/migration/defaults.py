"""Defaults of the checkpoint and reload options, in a module that imports nothing.

The command line shows these in its help and uses them as argument defaults for every command;
keeping them here lets it build its parser without importing the migration layer, which a run
that neither checkpoints nor reloads never needs (start-up time, benchmarks/bench_startup.py).
:mod:`pyvmm.migration.checkpoint` and :mod:`pyvmm.migration.reload` take them from here.
"""

from __future__ import annotations

# nice value of a live checkpoint's saver thread (see Checkpointer).  bench_live, 1 GiB guest, 2
# shared cores, guest speed during a live full checkpoint, medians of 4-6 per run (all samples):
#   writing every page: nice 0  26-31 % (15-42), nice 5  34-42 % (25-59), nice 10 34-57 % (29-82)
#   random writes:      nice 0  31-38 % (18-84), nice 5  27-48 % (18-76), nice 10 32-41 % (17-98)
# the more other load, the more it helps; the price: longer checkpoints on a busy host (random
# writes: ~2.5 s -> 5-9 s)
SAVER_NICE = 10

#: How a chain of increments is reloaded (see :func:`pyvmm.migration.reload.reload_file`).
STRATEGIES = ("indexed", "partial", "sequential")
DEFAULT_STRATEGY = "indexed"

#: Migration capabilities of a checkpoint (QEMU's ``migrate-set-capabilities``), the built-in
#: dirty trackers and page savers (pyvmm.migration.algorithms) and who resolves write-protect
#: faults (see Checkpointer).
CAPABILITIES = ("incremental", "live", "cow", "checksum")
#: The capability that is the page encoder's choice rather than the file's: it may change from
#: one increment to the next (a chain may mix compressed and plain increments).
COMPRESS = "compress"
#: What migrate-set-capabilities and the run's options take.
MIGRATION_CAPABILITIES = (*CAPABILITIES, COMPRESS)
TRACKERS = ("async", "wp", "hash")
SAVERS = ("stop-and-copy", "live", "cow")
ENCODERS = ("plain", "zstd")
FAULT_MODES = ("thread", "signal")
