"""The rooms of pvio import downward only, read from the code itself (docs/architecture.md).

Every ``import`` and ``from ... import`` in every module, at any depth (lazy imports inside
functions and ``TYPE_CHECKING`` blocks included), is checked against the table below: a
room may import itself and the rooms listed for it, nothing else of pvio.  Nothing outside
``pvio`` that is part of the project (``examples``, ``tests``) may be imported by it, and no
module imports the old top-level names (``backends``, ``frontends``, ``cpu``, ``ringbuf``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Where each import package's source lives (the installed layout: pyproject's package-dir).
SOURCE_ROOTS = {
    "pvio": ROOT / "pvio",
    "pvio.ringbuf": ROOT / "ringbuf",
    "pvio.backends": ROOT / "backends",
    "pvio.frontends": ROOT / "frontends",
    "pvio.cpu": ROOT / "cpu",
}

#: room -> the rooms it may import (besides itself), from the bottom up.
ALLOWED: dict[str, set[str]] = {
    "pvio.ringbuf": set(),
    "pvio.abi": {"pvio.ringbuf"},
    "pvio.xenstore": {"pvio.abi"},
    "pvio.core": {"pvio.abi", "pvio.ringbuf", "pvio.xenstore"},
    "pvio.backend_api": {"pvio.core"},
    "pvio.guest": {"pvio.abi", "pvio.core", "pvio.xenstore"},
    "pvio.frontends": {"pvio.abi", "pvio.ringbuf", "pvio.core", "pvio.xenstore", "pvio.guest"},
    "pvio.backends": {
        "pvio.abi", "pvio.ringbuf", "pvio.core", "pvio.xenstore", "pvio.backend_api", "pvio.guest",
    },
    "pvio.cpu": {"pvio.abi", "pvio.core", "pvio.xenstore"},
    "pvio.toolstack": {
        "pvio.abi", "pvio.core", "pvio.xenstore", "pvio.backend_api", "pvio.guest",
        "pvio.frontends", "pvio.backends", "pvio.cpu",
    },
    # guests in their own processes: the host side (core) and the child's runtime (PyGuests,
    # and a driver domain's netback and switch)
    "pvio.remote": {
        "pvio.abi", "pvio.ringbuf", "pvio.core", "pvio.xenstore", "pvio.guest", "pvio.frontends",
        "pvio.backend_api", "pvio.backends", "pvio.toolstack",
    },
    "pvio.harness": {
        "pvio", "pvio.abi", "pvio.ringbuf", "pvio.core", "pvio.xenstore", "pvio.backend_api",
        "pvio.guest", "pvio.frontends", "pvio.backends", "pvio.cpu", "pvio.toolstack", "pvio.remote",
    },
    "pvio.__main__": {"pvio.harness"},  # ``python -m pvio`` is the command
    # the front door re-exports the public API
    "pvio": {"pvio.core", "pvio.xenstore", "pvio.backend_api", "pvio.guest", "pvio.toolstack", "pvio.abi"},
}  # fmt: skip
ROOMS = sorted(ALLOWED, key=len, reverse=True)
FORBIDDEN_TOP = {"backends", "frontends", "cpu", "ringbuf", "examples", "tests"}


def room_of(module: str) -> str:
    for room in ROOMS:
        if module == room or module.startswith(room + "."):
            return room
    raise AssertionError(f"{module} belongs to no room: add it to the table in {__file__}")


def modules() -> list[tuple[str, Path]]:
    found = {}
    for package, root in SOURCE_ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if name.startswith("pvio.") and package == "pvio" and rel.parts[0] in ("native",):
                continue
            found.setdefault(name, path)
    return sorted(found.items())


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # ``from pvio import bench`` imports the submodule pvio.bench
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names if target == "pvio"]
    return out


MODULES = modules()


def test_every_module_is_in_a_room() -> None:
    assert len(MODULES) > 50
    for name, _ in MODULES:
        room_of(name)


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_go_downward_only(module: str, path: Path) -> None:
    room = room_of(module)
    bad = []
    for line, target in imports_of(path, module):
        top = target.split(".")[0]
        if top in FORBIDDEN_TOP:
            bad.append(f"line {line}: {target} (not an installed name)")
        elif (top == "pvio" and target != "pvio") or target == "pvio":
            try:
                other = room_of(target)
            except AssertionError:
                bad.append(f"line {line}: {target} (no such room)")
                continue
            if other != room and other not in ALLOWED[room]:
                bad.append(f"line {line}: {target} ({room} may not import {other})")
    assert not bad, f"{module} imports upward:\n" + "\n".join(bad)


def test_the_table_is_acyclic() -> None:
    """Imports go one way: no two rooms may import each other, directly or through others."""

    def reach(room: str, seen: set[str]) -> set[str]:
        for other in ALLOWED[room]:
            if other not in seen:
                seen.add(other)
                reach(other, seen)
        return seen

    for room in ALLOWED:
        if room != "pvio":
            assert room not in reach(room, set()), f"{room} can reach itself"
