"""Build hook: compiles pyvmm's C parts (cffi API mode) during `pip install`."""

from setuptools import setup

setup(cffi_modules=["pyvmm/native/build.py:ffibuilder"])
