"""``pvio bench --steady``: one warmed-up environment per model, timed rounds of a checked stream."""

from __future__ import annotations

import json

import pytest
import trio

from pvio.harness import bench


@pytest.mark.parametrize("model", ["pv", "smartnic"])
def test_a_steady_stream_times_its_rounds_after_the_warm_up(model: str) -> None:
    run = trio.run(bench.steady_stream, model, 2000, 500, 2)
    assert run.model == model and run.packets == 2000 and len(run.rates) == 2
    assert all(r > 0 for r in run.rates)
    # PV: two copies outside the guests per frame (the grant copies); the smart NIC: one DMA per
    # frame, two for a frame that waited for an RX buffer (how many did depends on the host)
    copies = run.per_packet["copies"]
    assert copies == 2.0 if model == "pv" else 1.0 <= copies <= 2.0
    row = run.row()
    assert row["pps"] == round(max(run.rates), 1) and row["rounds"] == 2 and row["copies_per_pkt"] == copies


def test_pvio_bench_steady_json_and_a_bad_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--steady", "--quick", "--json", "--models", "pv"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "pv" and row["packets"] == bench.STEADY_PACKETS // 10 and row["rounds"] == 3
    with pytest.raises(SystemExit):
        bench.main(["--steady", "--models", "pv,bogus"])
    assert "unknown model 'bogus' (choose from emulated, pv, smartnic)" in capsys.readouterr().err
