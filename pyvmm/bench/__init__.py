"""``pyvmm bench``: checkpoint algorithms compared side by side on a matrix of workloads.

* :mod:`pyvmm.bench.spec`: the matrix (workloads, algorithms, RAM sizes, repetitions) and its
  cells, JSON in and out;
* :mod:`pyvmm.bench.cell`: one cell measured in a process of its own;
* :mod:`pyvmm.bench.runner`: the cells through an executor, progress, results saved per cell;
* :mod:`pyvmm.bench.report`: the summary table, CSV, and the ratios between two runs;
* :mod:`pyvmm.bench.host`: the machine the numbers come from;
* ``results.schema.json``: the documented JSON schema of a results file.
"""
