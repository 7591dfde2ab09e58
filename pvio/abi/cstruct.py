"""One description of a guest-visible C struct, read by Python and written out for C.

Design rationale
----------------
A layout that both the hypervisor (Python) and a guest kernel (C) use must come from one
place, or the two drift apart.  pvio's rule:

* layouts that belong to C code pvio compiles into the host (the ring and the netif
  structs, ``ringbuf/ring.h``) are defined in C, and Python reads them through cffi;
* every other guest-visible layout (Xen's shared_info and start_info, the devices'
  descriptors, the bench mailbox) is defined here, in Python, as a :class:`CStruct`, and the
  x86 guest kernel's header is generated from it (:mod:`pvio.abi.cheader`) with a
  ``_Static_assert`` per field, so the C compiler checks that it lays the struct out exactly
  as Python reads it.

Fields are C types with natural alignment (``u8``..``u64``, ``s8``..``s64``, arrays such as
``u8[6]`` or ``char[32]``), ``pad[N]`` for bytes the C compiler would pad (laid out, never
named), or another :class:`CStruct` (nested, optionally as an array: ``(name, inner,
count)``).  Little-endian, x86-64.
"""

from __future__ import annotations

import re
import struct
from collections import namedtuple
from collections.abc import Iterable, Mapping
from typing import Any

_SCALARS = {
    "u8": ("B", 1),
    "u16": ("H", 2),
    "u32": ("I", 4),
    "u64": ("Q", 8),
    "s8": ("b", 1),
    "s16": ("h", 2),
    "s32": ("i", 4),
    "s64": ("q", 8),
    "char": ("s", 1),
    "pad": ("x", 1),  # padding C inserts (a nested struct's tail, say): laid out, never named
}
_FIELD = re.compile(r"^(u8|u16|u32|u64|s8|s16|s32|s64|char|pad)(?:\[(\d+)\])?$")


class CStruct:
    """A C struct: named fields in order, their offsets, a :class:`struct.Struct` codec.

    ``fields`` is a sequence of ``(name, ctype)`` or ``(name, ctype, comment)``; ``packed``
    drops alignment padding (``__attribute__((packed))``).  ``size`` and :meth:`offset`
    are what both sides agree on; :meth:`pack`/:meth:`unpack` convert by field name
    (arrays of ``u8``/``char`` are ``bytes``, other arrays are not packed).
    """

    def __init__(
        self, name: str, fields: Iterable[tuple[Any, ...]], *, packed: bool = False, doc: str = ""
    ) -> None:
        self.name = name
        self.doc = doc
        self.packed = packed
        self.fields: list[tuple[str, Any, str]] = []
        self.size: int = 0
        self.align = 1
        self._offsets: dict[str, int] = {}
        self._nested: dict[str, tuple[CStruct, int]] = {}
        fmt = "<"
        pos = 0
        align_max = 1
        names = []
        for item in fields:
            fname, ctype = item[0], item[1]
            if isinstance(ctype, CStruct):  # a nested struct (or an array of them)
                count = int(item[2]) if len(item) > 2 else 1
                align = 1 if packed else ctype.align
                align_max = max(align_max, align)
                if pos % align:
                    fmt += f"{align - pos % align}x"
                    pos += align - pos % align
                self._offsets[fname] = pos
                fmt += f"{ctype.size * count}x"  # read it through the inner CStruct
                pos += ctype.size * count
                self.fields.append((fname, ctype, str(count)))
                self._nested[fname] = (ctype, count)
                continue
            comment = item[2] if len(item) > 2 else ""
            m = _FIELD.match(ctype)
            if m is None:
                raise ValueError(f"struct {name}: field {fname} has an unknown C type {ctype!r}")
            code, width = _SCALARS[m.group(1)]
            count = int(m.group(2)) if m.group(2) else 1
            align = 1 if packed else width
            align_max = max(align_max, align)
            if pos % align:
                fmt += f"{align - pos % align}x"
                pos += align - pos % align
            self._offsets[fname] = pos
            if code == "x":
                fmt += f"{count}x"
            elif m.group(2) is None and code != "s":
                fmt += code
                names.append(fname)
            elif width == 1:
                fmt += f"{count}s"
                names.append(fname)
            else:
                fmt += f"{count * width}x"  # a wide array: laid out, not packed by name
            pos += count * width
            self.fields.append((fname, ctype, comment))
        if pos % align_max:
            fmt += f"{align_max - pos % align_max}x"
            pos += align_max - pos % align_max
        self.struct = struct.Struct(fmt)
        self.size = pos
        self.align = align_max
        assert self.struct.size == self.size, (name, self.struct.size, self.size)
        self._names = tuple(names)
        self.Record: Any = namedtuple(name, names)  # type: ignore[misc]

    def offset(self, field: str) -> int:
        """Byte offset of ``field`` (KeyError naming the struct for an unknown field)."""
        try:
            return self._offsets[field]
        except KeyError:
            raise KeyError(f"struct {self.name} has no field {field!r}") from None

    def field_size(self, field: str) -> int:
        """Bytes that ``field`` occupies."""
        if field in self._nested:
            inner, count = self._nested[field]
            return inner.size * count
        for fname, ctype, _ in self.fields:
            if fname == field:
                m = _FIELD.match(ctype)
                assert m is not None
                return _SCALARS[m.group(1)][1] * (int(m.group(2)) if m.group(2) else 1)
        raise KeyError(f"struct {self.name} has no field {field!r}")

    def pack_field(self, field: str, value: Any) -> bytes:
        """The bytes of one field (a scalar, or a ``u8``/``char`` array as bytes): to write it
        in place at ``offset(field)``."""
        for fname, ctype, _ in self.fields:
            if fname == field and field not in self._nested:
                m = _FIELD.match(ctype)
                assert m is not None
                code, width = _SCALARS[m.group(1)]
                if m.group(2) is None and code != "s":
                    return struct.pack("<" + code, value)
                if width == 1:
                    return struct.pack(f"{int(m.group(2) or 1)}s", value)
        raise KeyError(f"struct {self.name} has no scalar or byte-array field {field!r}")

    def pack(self, **values: Any) -> bytes:
        """The struct's bytes; fields not given are 0 (or empty bytes)."""
        unknown = values.keys() - set(self._names)
        if unknown:
            raise TypeError(f"struct {self.name} has no field(s) {sorted(unknown)}")
        return self.struct.pack(*(values.get(n, self._zero(n)) for n in self._names))

    def unpack(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> Any:
        """The record at ``offset`` of ``buf`` (copied once)."""
        return self.Record._make(self.struct.unpack_from(buf, offset))

    def _zero(self, name: str) -> Any:
        ctype = str(next(c for n, c, _ in self.fields if n == name))
        return b"" if "[" in ctype or ctype == "char" else 0

    def nested(self) -> list[CStruct]:
        """The structs this one contains (declare them first)."""
        return [inner for inner, _ in self._nested.values()]

    def c_decl(self) -> str:
        """The C declaration with one ``_Static_assert`` per field offset and one for the size."""
        lines = []
        if self.doc:
            lines.append(f"/* {self.doc} */")
        lines.append(f"struct {self.name} {{")
        for fname, ctype, comment in self.fields:
            if fname in self._nested:
                inner, count = self._nested[fname]
                lines.append(f"    struct {inner.name} {fname}" + (f"[{count}]" if count > 1 else "") + ";")
                continue
            m = _FIELD.match(ctype)
            assert m is not None
            if m.group(1) == "pad":
                lines.append(f"    u8 {fname}[{m.group(2) or 1}];")
                continue
            arr = f"[{m.group(2)}]" if m.group(2) else ""
            tail = f" /* {comment} */" if comment else ""
            lines.append(f"    {m.group(1)} {fname}{arr};{tail}")
        lines.append("}" + (" __attribute__((packed))" if self.packed else "") + ";")
        for fname, _, _ in self.fields:
            lines.append(
                f"_Static_assert(__builtin_offsetof(struct {self.name}, {fname}) == {self._offsets[fname]}, "
                f'"{self.name}.{fname} at {self._offsets[fname]}");'
            )
        lines.append(
            f'_Static_assert(sizeof(struct {self.name}) == {self.size}, "{self.name} is {self.size} B");'
        )
        return "\n".join(lines)


def c_defines(values: Mapping[str, int], *, comment: str = "") -> str:
    """``#define NAME value`` lines (hex for values above 255), under an optional comment."""
    out = [f"/* {comment} */"] if comment else []
    for name, value in values.items():
        v = int(value)
        text = f"0x{v:X}" if v > 9 else str(v)
        out.append(f"#define {name} {text}" if v >= 0 else f"#define {name} ({v})")
    return "\n".join(out)
