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


def test_the_driver_domain_script_gets_every_answer_and_survives_the_kill() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "driver_domain.py")],
        capture_output=True, text=True, timeout=99, check=True,
    ).stdout  # fmt: skip
    assert out.count("  got 'Ether / IP /") == 2
    assert "per frame: 2.00 grant copies, made in the driver domain's process" in out
    assert "was killed by SIGKILL" in out
    assert "guests still running: True; their pages still mapped by others: 0" in out
