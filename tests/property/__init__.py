"""Property-based tests: pyvmm objects against plain Python models."""
