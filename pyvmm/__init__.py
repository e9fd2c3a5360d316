"""pyvmm: a small ARM64 machine in Python with QEMU-like checkpoints (see README.md)."""

__version__ = "0.1.0"
