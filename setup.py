from setuptools import setup; setup(cffi_modules=["ringbuf/_build.py:ffibuilder", "pvio/_native_build.py:ffibuilder"])
