from setuptools import setup; setup(cffi_modules=["ringbuf/_build.py:ffibuilder"])
