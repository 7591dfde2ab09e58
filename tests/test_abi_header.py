"""The guest kernel's ABI header is generated from pvio.abi: the C side sees Python's values.

``pvio_abi.h`` is the only place the x86 kernel gets ABI numbers and layouts from.  These
tests compile it with the system's gcc and check what C computes against what Python holds:
every ``#define`` evaluates to Python's value, every struct has Python's size and offsets
(the header's own ``_Static_assert`` lines, which the compile checks), and no kernel source
defines an ABI name a second time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pvio.abi import bench, cheader, smartnic, xen
from pvio.abi.cstruct import CStruct
from pvio.cpu.build import RING_DIR, SOURCE_DIR

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc: apt-get install gcc")


def _all_defines() -> dict[str, int]:
    out: dict[str, int] = {}
    for values in cheader.defines().values():
        for name, value in values.items():
            assert name not in out, f"{name} is defined twice in the generated header"
            out[name] = int(value)
    return out


@needs_gcc
def test_every_define_evaluates_in_c_to_the_python_value(tmp_path: Path) -> None:
    defines = _all_defines()
    (tmp_path / "pvio_abi.h").write_text(cheader.generate())
    prints = "\n".join(f'    printf("{n} %lld\\n", (long long)({n}));' for n in defines)
    (tmp_path / "dump.c").write_text(
        f'#include <stdio.h>\n#include "pvio_abi.h"\nint main(void)\n{{\n{prints}\n}}\n'
    )
    exe = tmp_path / "dump"
    subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-I", str(tmp_path), str(tmp_path / "dump.c"),
                    "-o", str(exe)], check=True)  # fmt: skip
    seen = dict(
        line.rsplit(" ", 1)
        for line in subprocess.run([exe], capture_output=True, text=True).stdout.split("\n")
        if line
    )
    assert {k: int(v) for k, v in seen.items()} == defines


@needs_gcc
def test_a_struct_laid_out_differently_does_not_compile(tmp_path: Path) -> None:
    """The _Static_asserts are live: a header claiming another offset is refused by gcc."""
    text = cheader.generate()
    assert "__builtin_offsetof(struct snic_desc, len) == 6" in text
    broken = text.replace(
        "__builtin_offsetof(struct snic_desc, len) == 6", "__builtin_offsetof(struct snic_desc, len) == 8"
    )
    (tmp_path / "pvio_abi.h").write_text(broken)
    proc = subprocess.run(["gcc", "-fsyntax-only", "-std=gnu11", "-x", "c", str(tmp_path / "pvio_abi.h")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and "static assertion failed" in proc.stderr and "snic_desc" in proc.stderr


def test_the_layouts_are_xens_and_pvios_documented_ones() -> None:
    assert (xen.VCPU_INFO_T.size, xen.VCPU_TIME_INFO, xen.SHARED_INFO_SIZE) == (64, 32, 3136)
    assert (xen.SHARED_INFO_EVTCHN_PENDING, xen.SHARED_INFO_EVTCHN_MASK, xen.SHARED_INFO_WC_VERSION) == (
        2048,
        2560,
        3072,
    )
    assert (xen.SI_STORE_MFN, xen.SI_STORE_EVTCHN, xen.SI_CONSOLE_MFN, xen.SI_CMD_LINE) == (56, 64, 72, 128)
    assert xen.PVIO_START_EXT_T.size == 40 and xen.PVIO_SI_EXT_STRUCT.format == "<4sHHQQQQ"
    assert (smartnic.SNIC_DESC.size, smartnic.SNIC_CMPL.size, smartnic.SNIC_RING_ENTRIES) == (16, 8, 128)
    assert bench.BENCH_MBOX.size == 112 and bench.BENCH_MBOX.offset("rtt_ns") == 104
    assert bench.NICDRV_STATS.size == 9 * 8


def test_no_kernel_source_defines_an_abi_name_again() -> None:
    """The kernel's own #defines are its internals only: nothing the generated header defines."""
    abi_names = set(_all_defines()) | {s.name for s in cheader.structs()}
    sources = [*SOURCE_DIR.glob("*.[chS]"), RING_DIR / "ring.h"]
    for src in sources:
        text = src.read_text()
        redefined = {n for n in re.findall(r"^\s*#define (\w+)", text, re.M) if n in abi_names}
        restructed = {n for n in re.findall(r"^struct (\w+) \{", text, re.M) if n in abi_names}
        assert not redefined | restructed, f"{src.name} redefines {sorted(redefined | restructed)}"


def test_cstruct_packs_and_unpacks_by_name() -> None:
    s = CStruct("demo", [("a", "u8"), ("b", "u32"), ("mac", "u8[6]"), ("c", "s16")])
    assert (s.size, s.offset("b"), s.offset("mac"), s.offset("c")) == (16, 4, 8, 14)
    raw = s.pack(a=1, b=0x01020304, mac=b"\xaa" * 6, c=-2)
    assert s.unpack(raw) == s.Record(1, 0x01020304, b"\xaa" * 6, -2)
    assert s.pack_field("c", -2) == b"\xfe\xff"
    with pytest.raises(KeyError, match="struct demo has no field 'nope'"):
        s.offset("nope")
    with pytest.raises(ValueError, match="unknown C type 'float'"):
        CStruct("bad", [("x", "float")])
