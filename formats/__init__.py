"""Declarations of pyvmm's binary formats (installed as ``pyvmm.formats``).

The files here are data for ``construct``, loaded by the module that owns each format (for
``chpt.construct.py``: ``pyvmm.migration.container.load_spec``); nothing here is imported by name.
"""
