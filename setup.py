"""Build the C extensions: two cffi modules (the ring; the grant copy and the net data path) and
four CPython extensions whose methods use METH_FASTCALL (the ring's batch calls, a batch of frames
to and from guest memory, the smart NIC's DMA loops and its PyGuest driver's loops), where cffi's
per-call cost would dominate small batches, or where cffi cannot take or make a list of bytes."""

from setuptools import Extension, setup

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    cffi_modules=["ringbuf/_build.py:ffibuilder", "pvio/core/_native_build.py:ffibuilder"],
    ext_modules=[
        Extension(
            "pvio.ringbuf._ringfast",
            ["ringbuf/ringfast.c", "ringbuf/ring.c"],
            include_dirs=["ringbuf"],
            extra_compile_args=CFLAGS,
        ),
        Extension("pvio.core._frames", ["pvio/core/native/frames.c"], extra_compile_args=CFLAGS),
        Extension("pvio.backends._snic_dma", ["backends/native/snic_dma.c"], extra_compile_args=CFLAGS),
        Extension("pvio.frontends._snic_driver", ["frontends/native/snic_driver.c"], extra_compile_args=CFLAGS),
    ],
)
