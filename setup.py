from setuptools import setup; setup(cffi_modules=["ringbuf/_build.py:ffibuilder", "pvio/core/_native_build.py:ffibuilder"])
