"""The example scripts run as a user would run them, and say what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_pv_demo_script_gets_every_answer() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "pv_demo.py")], capture_output=True, text=True, timeout=99, check=True
    ).stdout
    assert out.count("  got 'Ether / IP /") == 2
    assert "echo-reply" in out and "per frame: 3.00 interrupts" in out
