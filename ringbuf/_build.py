"""cffi build script for the ring's C core (API mode, compiled at install time).

The cdef is the marked section of ``ring.h`` itself, so each layout and signature is
declared once, in C, and Python sees exactly what the compiler sees.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def ring_cdef() -> str:
    """Return the declarations between the cffi markers of ring.h."""
    text = (HERE / "ring.h").read_text()
    begin = text.index("/* cffi-cdef-begin */") + len("/* cffi-cdef-begin */")
    end = text.index("/* cffi-cdef-end */")
    return text[begin:end]


ffibuilder = FFI()
ffibuilder.cdef(ring_cdef())
ffibuilder.set_source(
    "pvio.ringbuf._ringbuf",
    '#include "ring.h"',
    sources=[str(Path("ringbuf") / "ring.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
