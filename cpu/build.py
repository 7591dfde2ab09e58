"""Building the x86 guest kernel images from ``frontends/x86`` with the system's gcc.

``build_image()`` compiles every ``*.c`` and ``*.S`` of the guest kernel's source folder
(freestanding x86-64: ``-ffreestanding -nostdlib -static -fno-pic -mno-red-zone
-mgeneral-regs-only``, linked with the folder's own ``linker.ld``) and returns the path of
the ELF image.  Images are cached by content: the cache key hashes every source file,
the flags and the compiler's version, so an unchanged tree never recompiles and a
changed one always does.  The cache lives in ``frontends/x86/build/`` (ignored by git)
or, when that is not writable (an installed package), in ``$XDG_CACHE_HOME/pvio``;
``PVIO_X86_CACHE`` overrides both.

Without a compiler the build fails with :class:`BuildError` naming what is missing and
how to get it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pvio.abi import cheader

SOURCE_DIR = Path(str(importlib.resources.files("pvio.frontends"))) / "x86"
#: The ring every pvio component uses: ring.h is included and ring.c linked into the kernel.
RING_DIR = Path(str(importlib.resources.files("pvio.ringbuf")))
ABI_HEADER = "pvio_abi.h"  # generated from pvio.abi (pvio.abi.cheader) into the build directory
CFLAGS = (
    "-std=gnu11", "-O2", "-g0", "-Wall", "-Wextra", "-Werror", "-ffreestanding", "-fno-pic", "-fno-pie",
    "-fno-stack-protector", "-fno-builtin", "-fno-asynchronous-unwind-tables", "-mno-red-zone",
    "-mgeneral-regs-only", "-mcmodel=small", "-fno-strict-aliasing", "-fno-tree-loop-distribute-patterns",
)  # fmt: skip
LDFLAGS = ("-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,-z,noexecstack")
IMAGE_NAME = "pvio-x86.elf"


class BuildError(RuntimeError):
    """The guest image could not be built (no compiler, or a compile error)."""


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None or shutil.which(cc) is None:
        raise BuildError(
            "building the x86 guest kernel needs gcc (for x86-64), and none was found on PATH "
            f"(CC={os.environ.get('CC')!r}); install it (e.g. `apt-get install gcc`) or set CC"
        )
    return cc


def _sources(source_dir: Path) -> list[Path]:
    files = sorted(p for p in source_dir.iterdir() if p.suffix in (".c", ".S", ".h", ".ld"))
    if not any(p.suffix == ".c" for p in files):
        raise BuildError(f"no guest kernel sources in {source_dir}")
    if (source_dir / "pvio.h").is_file():  # pvio's kernel (or a copy of it): it links the ring
        files += [RING_DIR / "ring.h", RING_DIR / "ring.c"]
    return files


def _cache_dir() -> Path:
    env = os.environ.get("PVIO_X86_CACHE")
    if env:
        return Path(env)
    local = SOURCE_DIR / "build"
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pvio"


@functools.cache
def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"the compiler {cc!r} does not run: {e}") from None


def source_hash(source_dir: Path = SOURCE_DIR, cc: str | None = None) -> str:
    """The cache key: sources, flags and compiler version."""
    cc = cc or _compiler()
    h = hashlib.sha256()
    for path in _sources(source_dir):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(cheader.generate().encode())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(_compiler_version(cc).encode())
    return h.hexdigest()[:16]


def build_image(source_dir: Path = SOURCE_DIR) -> Path:
    """The guest kernel ELF image, compiled on first use and cached by content."""
    cc = _compiler()
    key = source_hash(source_dir, cc)
    out_dir = _cache_dir() / key
    image = out_dir / IMAGE_NAME
    if image.is_file():
        return image
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        (Path(tmp) / ABI_HEADER).write_text(cheader.generate())
        includes = ["-I", tmp, "-I", str(source_dir), "-I", str(RING_DIR)]
        objs = []
        for src in _sources(source_dir):
            if src.suffix not in (".c", ".S"):
                continue
            obj = Path(tmp) / (src.stem + src.suffix.replace(".", "_") + ".o")
            _run([cc, *CFLAGS, *includes, "-c", str(src), "-o", str(obj)], src.name)
            objs.append(str(obj))
        linked = Path(tmp) / IMAGE_NAME
        _run([cc, *CFLAGS, *LDFLAGS, "-T", str(source_dir / "linker.ld"), *objs, "-o", str(linked)], "link")
        os.replace(linked, image)  # atomic: a concurrent build sees a whole image or none
    return image


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"building the x86 guest kernel failed at {what}:\n{proc.stderr.strip()}")
