# pyproject.toml cannot declare cffi modules; this file only does that.
from setuptools import setup

setup(cffi_modules=["native/build_shim.py:ffibuilder"])
