"""``import pvio`` and ``import ringbuf`` are the front doors: every public name exported once."""

from __future__ import annotations

import types

import pytest

import pvio
import pvio.ringbuf


@pytest.mark.parametrize("module", [pvio, pvio.ringbuf])
def test_all_names_exist_and_are_unique(module: types.ModuleType) -> None:
    names = module.__all__
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(n for n in names if hasattr(module, n))


@pytest.mark.parametrize("module", [pvio, pvio.ringbuf])
def test_every_public_class_or_function_is_in_all(module: types.ModuleType) -> None:
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and isinstance(v, type | types.FunctionType)
    }
    assert public == set(module.__all__) - {n for n in module.__all__ if not callable(getattr(module, n))}
