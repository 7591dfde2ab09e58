"""``pvio demo --guest x86``: a PyGuest and the x86 guest exchange the PV demo's traffic."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pvio.harness import cli, demo


async def test_every_probe_is_answered_and_checked_by_scapy(autojump_clock: Any) -> None:
    result = await demo.run_x86_demo()
    assert result.sent == result.received == 9
    assert [ok for _, _, ok in result.checked] == [True] * 9


async def test_the_json_has_the_pv_demos_schema(autojump_clock: Any) -> None:
    x86 = (await demo.run_x86_demo()).as_json()
    pv = (await demo.run_demo()).as_json()
    assert set(x86) == set(pv)
    assert set(x86["per_packet"]) == set(pv["per_packet"])
    assert x86["scenario"] != pv["scenario"] and "x86" in x86["scenario"]
    assert x86["per_packet"]["interrupts_by_domain"].keys() == {"dom0", "dom1", "dom2"}


def test_the_cli_runs_the_x86_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--guest", "x86", "--json"])
    assert exit_info.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["packets_lost"] == 0 and all(p["ok"] for p in out["probes"])


def test_an_unknown_guest_kind_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--guest", "arm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--guest: invalid choice: 'arm' (choose from 'py', 'x86', 'linux')" in err
