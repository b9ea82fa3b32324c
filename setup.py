"""The C core in native/ is compiled by cffi (API mode, out of line) into ``comms._native``.

pyproject.toml holds all metadata; setuptools has no pyproject key for ``cffi_modules``, so it lives here.
"""
from setuptools import setup

setup(cffi_modules=["native/build_cffi.py:ffibuilder"])
