"""cffi build script for pvio's native fast path (API mode, compiled at install time).

As for the ring, the cdef is the marked section of the C header, so the struct layouts
and signatures are declared once.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent / "native"


def native_cdef() -> str:
    """The declarations between the cffi markers of native/gnttab.h."""
    text = (HERE / "gnttab.h").read_text()
    begin = text.index("/* cffi-cdef-begin */") + len("/* cffi-cdef-begin */")
    return text[begin : text.index("/* cffi-cdef-end */")]


ffibuilder = FFI()
ffibuilder.cdef(native_cdef())
ffibuilder.set_source(
    "pvio.core._native",
    '#include "gnttab.h"',
    sources=[str(Path("pvio") / "core" / "native" / "gnttab.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
