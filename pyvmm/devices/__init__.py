"""Emulated devices of the pyvmm machine; each module owns one device and its state."""
