"""Installing pvio adds one import name, ``pvio``, with its types, C sources and entry points.

The wheel is built from this checkout (no build isolation: the venv already has setuptools
and cffi), installed into a fresh virtual environment, and a user's script is type-checked
against it with mypy, as a user's CI would.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a clean copy of the sources: an in-tree build reuses whatever build/ holds.
    src = tmp_path_factory.mktemp("src") / "pvio"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*.so", "__pycache__", ".*cache")
    shutil.copytree(ROOT, src, ignore=junk)
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "-w", str(out), str(src)], check=True, capture_output=True)
    [whl] = out.glob("pvio-*.whl")
    return whl


def test_the_wheel_installs_only_pvio(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pvio", "pvio-0.1.0.dist-info"}
    for expected in (
        "pvio/py.typed",
        "pvio/ringbuf/ring.h",
        "pvio/ringbuf/ring.c",
        "pvio/frontends/x86/main.c",
        "pvio/frontends/x86/linker.ld",
        "pvio/core/native/gnttab.c",
        "pvio/backends/netback.py",
        "pvio/cpu/vcpu.py",
    ):
        assert expected in names
    assert any(n.startswith("pvio/ringbuf/_ringbuf") and n.endswith(".so") for n in names)
    entry_points = zipfile.ZipFile(wheel).read("pvio-0.1.0.dist-info/entry_points.txt").decode()
    assert "lossy = pvio.backends.lossy:LossyLinkBackend" in entry_points
    assert "pvio = pvio.harness.pytest_plugin" in entry_points
    assert "examples" not in entry_points


def test_mypy_type_checks_a_users_script_against_the_installed_package(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = subprocess.run([python, "-c", "import sys; print(sys.path[-1])"], capture_output=True, text=True)
    top = {p.name for p in Path(site.stdout.strip()).iterdir()} - {"__pycache__", "_distutils_hack"}
    assert {n for n in top if not n.endswith((".pth", ".dist-info"))} == {"pvio"}, top
    good = tmp_path / "good.py"
    good.write_text("import pvio\n\nhv: pvio.Hypervisor = pvio.Hypervisor(seed=1)\nprint(hv.seed)\n")
    bad = tmp_path / "bad.py"
    bad.write_text("import pvio\n\npvio.Hypervisor(seed='one')\n")
    mypy = [sys.executable, "-m", "mypy", "--no-incremental", "--python-executable", str(python)]
    ok = subprocess.run([*mypy, str(good)], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    wrong = subprocess.run([*mypy, str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert wrong.returncode == 1 and 'incompatible type "str"; expected "int | None"' in wrong.stdout
