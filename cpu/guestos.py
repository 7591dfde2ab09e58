"""Building pvio's teaching kernel (``frontends/x86os``) in its two flavours.

The same sources compile to two images: ``native`` (written for bare x86-64 hardware:
run deprivileged under trap-and-emulate or binary translation) and ``pv`` (``-DPVIO_PV``:
hypercalls instead of privileged instructions).  The user programs (``user.c``) are
compiled into both unchanged; only their 4-instruction system-call stub differs.
Images are cached by content exactly as :mod:`pvio.cpu.build` caches pvio's other
kernel (sources, flags, compiler version and the generated ABI header are the key).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import tempfile
from pathlib import Path

from pvio.abi import cheader
from pvio.cpu.build import (
    ABI_HEADER,
    CFLAGS,
    LDFLAGS,
    BuildError,
    _cache_dir,
    _compiler,
    _compiler_version,
    _run,
)

SOURCE_DIR = Path(str(importlib.resources.files("pvio.frontends"))) / "x86os"
FLAVOURS = {"native": (), "pv": ("-DPVIO_PV",)}

__all__ = ["FLAVOURS", "SOURCE_DIR", "BuildError", "build_guestos"]


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".S", ".h", ".ld"))


def build_guestos(flavour: str) -> Path:
    """The ELF image of the teaching kernel in ``flavour`` ("native" or "pv"), built once."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown kernel flavour {flavour!r}: one of {sorted(FLAVOURS)}")
    cc = _compiler()
    flags = (*CFLAGS, *FLAVOURS[flavour])
    h = hashlib.sha256()
    for path in _sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(cheader.generate().encode())
    h.update(" ".join(flags + LDFLAGS).encode())
    h.update(_compiler_version(cc).encode())
    out_dir = _cache_dir() / f"x86os-{flavour}-{h.hexdigest()[:16]}"
    image = out_dir / f"pvio-x86os-{flavour}.elf"
    if image.is_file():
        return image
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        (Path(tmp) / ABI_HEADER).write_text(cheader.generate())
        includes = ["-I", tmp, "-I", str(SOURCE_DIR)]
        objs = []
        for src in _sources():
            if src.suffix not in (".c", ".S"):
                continue
            obj = Path(tmp) / (src.stem + src.suffix.replace(".", "_") + ".o")
            _run([cc, *flags, *includes, "-c", str(src), "-o", str(obj)], src.name)
            objs.append(str(obj))
        linked = Path(tmp) / image.name
        _run([cc, *flags, *LDFLAGS, "-T", str(SOURCE_DIR / "linker.ld"), *objs, "-o", str(linked)], "link")
        os.replace(linked, image)
    return image
