"""Debian's own binaries for real-guest tests: Linux, xen-netfront, BusyBox, GRUB for Xen PVH.

Nothing here is shipped with pvio: the packages are fetched with ``apt-get download``
(no root needed) into a cache outside the repository (``$PVIO_CACHE/debian``, default
``~/.cache/pvio/debian``), verified against the SHA256 that apt's signed indexes give for
them (``apt-cache show``) and unpacked with ``dpkg-deb -x``.  Without apt, or when a
package is unknown, :class:`DebianUnavailable` says in one line what to install; tests
turn it into a skip with that line.

* :func:`grub_pvh_image` -- ``grub-xen-host``'s ``grub-i386-xen_pvh.bin``.
* :func:`linux_kernel` -- the ``vmlinux`` ELF of ``linux-image-6.1.0-*-amd64`` (the
  package the ``linux-image-amd64`` metapackage depends on): the bzImage's payload is
  xz, found by its magic and decompressed with :mod:`lzma`.
* :func:`netfront_module` -- that kernel's ``xen-netfront.ko`` (decompressed if ``.ko.xz``).
* :func:`busybox` -- ``busybox-static``'s static ``/bin/busybox``.
* :func:`initramfs` -- a newc cpio written here: BusyBox, the module and an ``/init``
  that loads it, configures ``eth0`` from ``pvio.ip=`` on the kernel command line, runs
  the scenario's commands (printing their output between markers on hvc0) and then
  gives a shell on the console.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
import re
import shutil
import subprocess
from pathlib import Path

KERNEL_METAPACKAGE = "linux-image-amd64"
XZ_MAGIC = b"\xfd7zXZ\x00"
READY_MARKER = "PVIO-READY"
BEGIN_MARKER = "PVIO-BEGIN"
END_MARKER = "PVIO-END"


class DebianUnavailable(RuntimeError):
    """A Debian package cannot be had here; the message says what to install (one line)."""


def cache_dir() -> Path:
    """Where packages and what is extracted from them live (outside the repository)."""
    root = Path(os.environ.get("PVIO_CACHE") or Path.home() / ".cache" / "pvio")
    path = root / "debian"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise DebianUnavailable(f"{cmd[0]} not found: install apt and dpkg (a Debian or Ubuntu system)")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        first = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[:1]
        raise DebianUnavailable(f"`{' '.join(cmd)}` failed: {first[0] if first else proc.returncode}")
    return proc.stdout


@functools.cache
def _apt_updated() -> bool:
    _run(["apt-get", "update", "-qq"])
    return True


def _show(package: str) -> dict[str, str]:
    """The apt-cache record of ``package`` (runs ``apt-get update`` once if apt does not know it)."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DebianUnavailable(
                f"{tool} not found: install apt and dpkg (a Debian or Ubuntu system) to fetch {package}"
            )
    try:
        text = _run(["apt-cache", "show", "--no-all-versions", package])
    except DebianUnavailable:
        text = ""
    if not text.strip():
        try:
            _apt_updated()
            text = _run(["apt-cache", "show", "--no-all-versions", package])
        except DebianUnavailable:
            text = ""
    if not text.strip():
        raise DebianUnavailable(
            f"Debian package {package} is not available: add a Debian 12 (bookworm) apt source"
        )
    record: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith(" "):
            key, _, value = line.partition(":")
            record.setdefault(key.strip(), value.strip())
    return record


def kernel_package() -> str:
    """The ``linux-image-6.1.0-*-amd64`` package the metapackage currently names."""
    depends = _show(KERNEL_METAPACKAGE).get("Depends", "")
    match = re.search(r"(linux-image-6\.1\.0-[0-9]+-amd64)", depends)
    if match is None:
        raise DebianUnavailable(f"{KERNEL_METAPACKAGE} does not name a 6.1 kernel ({depends!r})")
    return match.group(1)


def fetch(package: str) -> Path:
    """The verified .deb of ``package`` in the cache (downloaded with apt-get if missing)."""
    record = _show(package)
    sha = record.get("SHA256", "")
    filename = record.get("Filename", "")
    name = Path(filename).name if filename else ""
    cache = cache_dir()
    candidates = [cache / name] if name else []
    candidates += sorted(cache.glob(f"{package}_*.deb"))
    for deb in candidates:
        if deb.is_file() and (not sha or _sha256(deb) == sha):
            return deb
    _run(["apt-get", "download", "-q", package], cwd=cache)
    for deb in sorted(cache.glob(f"{package}_*.deb")):
        if not sha or _sha256(deb) == sha:
            _run(["dpkg-deb", "--info", str(deb)])
            return deb
    raise DebianUnavailable(f"{package}: the downloaded .deb does not match apt's SHA256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract(deb: Path) -> Path:
    """``dpkg-deb -x`` of ``deb`` into the cache (once)."""
    dest = cache_dir() / "extract" / deb.stem
    if not (dest / ".done").exists():
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(dest)])
        (dest / ".done").touch()
    return dest


def grub_pvh_image() -> Path:
    """Debian's GRUB for Xen PVH (an ELF with a PHYS32 entry note)."""
    path = extract(fetch("grub-xen-host")) / "usr/lib/grub-xen/grub-i386-xen_pvh.bin"
    if not path.is_file():
        raise DebianUnavailable(
            "grub-xen-host has no grub-i386-xen_pvh.bin: install grub-xen-host (bookworm)"
        )
    return path


def _kernel_root() -> Path:
    return extract(fetch(kernel_package()))


def linux_kernel() -> Path:
    """Debian's Linux 6.1 as a ``vmlinux`` ELF (the bzImage's xz payload, decompressed once)."""
    root = _kernel_root()
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise DebianUnavailable(f"{kernel_package()} has no /boot/vmlinuz-*")
    out = cache_dir() / f"vmlinux-{vmlinuz[0].name.removeprefix('vmlinuz-')}"
    if not out.exists():
        data = vmlinuz[0].read_bytes()
        at = data.find(XZ_MAGIC)
        if at < 0:
            raise DebianUnavailable(f"{vmlinuz[0].name}: no xz payload (not a Debian amd64 bzImage?)")
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
        if elf[:4] != b"\x7fELF":
            raise DebianUnavailable(f"{vmlinuz[0].name}: the xz payload is not an ELF")
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(elf)
        tmp.rename(out)
    return out


def netfront_module() -> bytes:
    """That kernel's ``xen-netfront.ko`` (uncompressed)."""
    found = sorted(_kernel_root().glob("lib/modules/*/kernel/drivers/net/xen-netfront.ko*"))
    if not found:
        raise DebianUnavailable(f"{kernel_package()} has no xen-netfront module")
    data = found[0].read_bytes()
    if found[0].suffix == ".xz":
        data = lzma.decompress(data)
    return data


def kernel_module(name: str) -> bytes:
    """That kernel's module ``name`` (e.g. ``pktgen``), uncompressed; DebianUnavailable if absent."""
    found = sorted(_kernel_root().glob(f"lib/modules/*/kernel/**/{name}.ko*"))
    if not found:
        raise DebianUnavailable(f"{kernel_package()} has no {name} module")
    data = found[0].read_bytes()
    return lzma.decompress(data) if found[0].suffix == ".xz" else data


def busybox() -> bytes:
    """busybox-static's ``/bin/busybox``."""
    path = extract(fetch("busybox-static")) / "bin/busybox"
    if not path.is_file():
        raise DebianUnavailable("busybox-static has no /bin/busybox: install busybox-static")
    return path.read_bytes()


# --------------------------------------------------------------------------- initramfs
def _cpio_entry(
    name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0
) -> bytes:
    name_b = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
    header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = header + name_b
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc cpio archive of ``(name, mode, data, (rdev major, minor))`` entries."""
    out = b"".join(_cpio_entry(n, m, d, r, i + 1) for i, (n, m, d, r) in enumerate(entries))
    return out + _cpio_entry("TRAILER!!!", 0)


INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    pvio.ip=*) PVIO_IP="${arg#pvio.ip=}" ;;
  esac
done
if [ -f /lib/xen-netfront.ko ]; then insmod /lib/xen-netfront.ko; fi
if [ -n "$PVIO_IP" ]; then
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  ip link set lo up
  ip addr add "$PVIO_IP" dev eth0
  ip link set eth0 up
fi
echo __READY__
if [ -f /scenario.sh ]; then
  echo __BEGIN__
  sh /scenario.sh 2>&1
  echo "__END__ rc=$?"
fi
exec setsid cttyhack sh
"""


def init_script() -> str:
    """The ``/init`` pvio's initramfs runs."""
    return (
        INIT_SCRIPT.replace("__READY__", READY_MARKER)
        .replace("__BEGIN__", BEGIN_MARKER)
        .replace("__END__", END_MARKER)
    )


def initramfs(
    scenario: str = "", with_netfront: bool = True, bb: bytes | None = None, modules: tuple[str, ...] = ()
) -> bytes:
    """The initramfs: BusyBox, xen-netfront.ko, /init and the scenario's commands.

    ``modules`` names more of the kernel's modules to put in ``/lib`` (not loaded:
    ``insmod /lib/pktgen.ko`` when a scenario wants it).
    """
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        ("bin", 0o040755, b"", (0, 0)),
        ("dev", 0o040755, b"", (0, 0)),
        ("dev/console", 0o020600, b"", (5, 1)),
        ("lib", 0o040755, b"", (0, 0)),
        ("bin/busybox", 0o100755, bb if bb is not None else busybox(), (0, 0)),
        ("init", 0o100755, init_script().encode(), (0, 0)),
    ]
    if with_netfront:
        entries.append(("lib/xen-netfront.ko", 0o100644, netfront_module(), (0, 0)))
    for name in modules:
        entries.append((f"lib/{name}.ko", 0o100644, kernel_module(name), (0, 0)))
    if scenario:
        entries.append(("scenario.sh", 0o100755, scenario.encode(), (0, 0)))
    return cpio_newc(entries)


def scenario_output(console: str) -> str | None:
    """The scenario's output between the markers in a console transcript (None: not finished)."""
    begin = console.find(BEGIN_MARKER)
    end = console.find(END_MARKER, begin + 1)
    if begin < 0 or end < 0:
        return None
    return console[begin + len(BEGIN_MARKER) : end].strip("\n")


__all__ = [
    "DebianUnavailable",
    "busybox",
    "cache_dir",
    "cpio_newc",
    "fetch",
    "grub_pvh_image",
    "initramfs",
    "kernel_module",
    "kernel_package",
    "linux_kernel",
    "netfront_module",
    "scenario_output",
]


def main() -> int:
    """``python -m pvio.cpu.debian``: fetch, verify and unpack everything the real-guest tests use."""
    try:
        print(f"grub:    {grub_pvh_image()}")
        print(f"linux:   {linux_kernel()}")
        print(f"netfront: {len(netfront_module())} bytes")
        print(f"busybox: {len(busybox())} bytes")
    except DebianUnavailable as e:
        print(f"pvio: {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
