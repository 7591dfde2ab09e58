"""Many guests on one switch: dom0 sized for its vifs, 64 guests booted through the pytest
fixture, concurrent streams that each arrive whole and in order, and ``pvio bench --guests``.

Under trio's MockClock (``autojump_clock``) and the hypervisor's seeded scheduler the counts
are exact; nothing here asserts a time or a rate (the benchmark is tests/bench/test_bench_scale.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pvio.core.hypervisor import DEFAULT_DOM0_PAGES
from pvio.frontends.guests import ModelGuest
from pvio.harness import bench
from pvio.toolstack import DOM0_BASE_PAGES, Dom0TooSmall, boot_network, dom0_pages_for, vif_staging_pages


def vif_counts(result: bench.StreamsResult, env: bench.ModelEnv) -> dict[str, tuple[int, int]]:
    """Each guest's vif as netback counted it in the streams: (packets.tx, packets.rx) by guest name."""
    assert result.diff is not None
    devices = result.diff.devices()
    out = {}
    for g in env.guests:
        c = devices.get(f"netback/vif{g.domain.domid}.0", {})
        out[g.name] = (c.get("packets.tx", 0), c.get("packets.rx", 0))
    return out


def test_dom0_is_sized_for_the_vifs_it_serves() -> None:
    assert vif_staging_pages() == 512  # 256 TX + 256 RX staging pages (Xen's 256-slot rings)
    assert dom0_pages_for(0) == dom0_pages_for(2) == DEFAULT_DOM0_PAGES  # small networks: as before
    assert dom0_pages_for(64) == DOM0_BASE_PAGES + 64 * 512 == 33792


async def test_64_guests_through_the_fixture_each_stream_arrives_once_and_in_order(
    pvio_env: Any, autojump_clock: Any
) -> None:
    async with pvio_env("pv", n_guests=64) as env:
        assert env.hv.dom0 is not None and env.hv.dom0.mem.nr_pages == dom0_pages_for(64)
        names = [g.name for g in env.guests]
        assert names[:3] == ["a", "b", "c"] and names[25:28] == ["z", "g26", "g27"] and len(set(names)) == 64
        assert len(env.netback.vifs) == 64 and all(v.connected for v in env.netback.vifs.values())
        result = await bench.run_streams(env, packets=8)  # raises at a frame out of order
        assert (result.streams, result.delivered) == (32, 256)
        counts = vif_counts(result, env)
        assert all(counts[g.name] == ((8, 0) if i % 2 == 0 else (0, 8)) for i, g in enumerate(env.guests))
        assert result.totals["copies"] == 2 * 256  # a TX and an RX grant copy per frame
        assert result.diff is not None
        switch = result.diff.devices()["switch/switch0"]
        assert switch.get("forwarded", 0) == 256 and switch.get("flooded", 0) == 0
        assert not any(k.startswith("drops") and v for k, v in switch.items())


async def run_four_streams() -> bench.StreamsResult:
    async with bench.model_env("pv", n_guests=8) as env:
        result = await bench.run_streams(env, packets=300, batch=32)
        assert vif_counts(result, env) == {
            "a": (300, 0), "b": (0, 300), "c": (300, 0), "d": (0, 300),
            "e": (300, 0), "f": (0, 300), "g": (300, 0), "h": (0, 300),
        }  # fmt: skip
        return result


async def test_concurrent_streams_count_exactly_and_the_same_on_every_run(autojump_clock: Any) -> None:
    first = await run_four_streams()
    second = await run_four_streams()
    assert (first.streams, first.delivered) == (4, 1200)
    assert first.totals["copies"] == 2400
    # Seeded scheduler, MockClock: the same interleaving of the four streams, so every counter
    # of every domain and device is the same both times.
    assert first.diff is not None and second.diff is not None
    assert first.totals == second.totals
    assert first.diff.domains() == second.diff.domains()


async def test_a_dom0_too_small_for_the_vifs_is_refused_in_one_line(autojump_clock: Any) -> None:
    with pytest.raises(Dom0TooSmall) as caught:
        async with bench.model_env("pv", n_guests=8, dom0_pages=DEFAULT_DOM0_PAGES):
            pass
    message = str(caught.value)
    assert "\n" not in message
    # dom0 keeps 41 pages of its 4096 for itself; 8 vifs need 8 x 512.
    assert message == (
        "dom0 has 4055 free pages, 8 PV vifs need 4096 (512 each): "
        "give dom0_pages >= 4137 (or leave it unset)"
    )


async def test_boot_network_sizes_dom0_from_its_pv_vifs(autojump_clock: Any) -> None:
    guests = [ModelGuest(bench.guest_name(i), f"10.0.0.{i + 1}", "pv") for i in range(10)]
    async with boot_network(guests) as net:
        assert net.hv.dom0 is not None and net.hv.dom0.mem.nr_pages == dom0_pages_for(10)
        assert net.netback is not None and len(net.netback.vifs) == 10


async def test_model_env_refuses_more_guests_than_it_has_addresses() -> None:
    with pytest.raises(ValueError, match=r"n_guests=255: model_env boots 1\.\.254 guests"):
        async with bench.model_env("pv", n_guests=255):
            pass


def test_pvio_bench_guests_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--guests", "4", "--packets", "20", "--rounds", "1", "--mock-clock", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scale"]["guests"] == 4 and out["scale"]["streams"] == 2 and out["scale"]["delivered"] == 40
    assert out["base"]["guests"] == 2 and out["base"]["streams"] == 1 and out["base"]["delivered"] == 40
    assert out["scale"]["per_packet"]["copies"] == out["base"]["per_packet"]["copies"] == 2.0
    assert set(out) == {"base", "scale", "ratio", "cpu_ratio", "memory"}


def test_pvio_bench_guests_refuses_an_odd_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--guests", "5"])
    assert "--guests 5: an even number of guests, 4 to 253" in capsys.readouterr().err
