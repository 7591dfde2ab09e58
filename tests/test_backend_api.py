"""The custom Backend API: entry-point registry, fault containment, and the example lossy backend."""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Iterator

import pytest
import trio

from pvio import backend_api
from pvio.backend_api import (
    Backend,
    BackendContext,
    BackendError,
    BackendHost,
    BackendLoadError,
    DelayLine,
    Direction,
    PassthroughBackend,
    available_backends,
    load_backend,
    register_backend,
    unregister_backend,
)
from pvio.backends.lossy import LossyLinkBackend
from pvio.core.counters import CounterRegistry

FRAMES = [bytes([i]) * 60 for i in range(10)]


def ctx_for(options: dict[str, object] | None = None, **kwargs: object) -> BackendContext:
    return BackendContext("vif1.0", 1, options=options, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = dict(backend_api._registered)
    yield
    backend_api._registered.clear()
    backend_api._registered.update(saved)


# -- the registry -----------------------------------------------------------------------


def test_builtin_backends_are_found_through_the_entry_point_group() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="pvio.backends")}
    assert eps["passthrough"].value == "pvio.backend_api:PassthroughBackend"
    assert eps["lossy"].value == "pvio.backends.lossy:LossyLinkBackend"
    # Found there, and not through register_backend: the plugin path is the one used.
    assert "passthrough" not in backend_api._registered
    assert "lossy" not in backend_api._registered
    assert load_backend("passthrough") is eps["passthrough"].load() is PassthroughBackend
    assert load_backend("lossy") is eps["lossy"].load() is LossyLinkBackend


def test_available_backends_names_module_and_attribute() -> None:
    found = available_backends()
    assert found["passthrough"] == "pvio.backend_api:PassthroughBackend"
    assert found["lossy"] == "pvio.backends.lossy:LossyLinkBackend"


def test_unknown_backend_name_lists_the_available_ones() -> None:
    with pytest.raises(
        LookupError, match=r"no backend named 'nope'; available backends: .*lossy.*passthrough"
    ):
        load_backend("nope")


def test_register_backend_makes_a_runtime_class_loadable(clean_registry: None) -> None:
    @register_backend
    class Counting(Backend):
        name = "counting-test"

    assert load_backend("counting-test") is Counting
    assert available_backends()["counting-test"].endswith(
        ":test_register_backend_makes_a_runtime_class_loadable.<locals>.Counting"
    )
    unregister_backend("counting-test")
    with pytest.raises(LookupError):
        load_backend("counting-test")


def test_register_backend_refuses_a_name_an_entry_point_already_has(clean_registry: None) -> None:
    class Impostor(Backend):
        name = "lossy"

    with pytest.raises(
        ValueError,
        match=re.escape("'lossy' is already provided by entry point lossy = pvio.backends.lossy"),
    ):
        register_backend(Impostor)


def test_register_backend_refuses_non_backends_and_nameless_classes(clean_registry: None) -> None:
    class Nameless(Backend):
        pass

    with pytest.raises(BackendLoadError, match=re.escape("not a subclass of pvio.backend_api.Backend")):
        register_backend(dict)  # type: ignore[arg-type]
    with pytest.raises(BackendLoadError, match="Nameless has no class attribute 'name'"):
        register_backend(Nameless)


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, *specs: tuple[str, str]) -> None:
    eps = importlib.metadata.EntryPoints(
        importlib.metadata.EntryPoint(name, value, "pvio.backends") for name, value in specs
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps)


def test_an_entry_point_that_fails_to_import_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_entry_points(monkeypatch, ("broken", "no_such_module_for_pvio:Thing"))
    with pytest.raises(
        BackendLoadError, match=r"entry point broken = no_such_module_for_pvio:Thing .*failed to import"
    ):
        load_backend("broken")


def test_an_entry_point_that_is_not_a_backend_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_entry_points(monkeypatch, ("notone", "collections:OrderedDict"))
    with pytest.raises(
        BackendLoadError, match=r"entry point notone = collections:OrderedDict.*not a subclass"
    ):
        load_backend("notone")


def test_an_entry_point_whose_class_has_another_name_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_entry_points(monkeypatch, ("alias", "pvio.backend_api:PassthroughBackend"))
    with pytest.raises(
        BackendLoadError, match=re.escape("named 'alias' but PassthroughBackend.name is 'passthrough'")
    ):
        load_backend("alias")


def test_two_entry_points_claiming_one_name_differently_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_entry_points(monkeypatch, ("lossy", "a.b:C"), ("lossy", "x.y:Z"))
    with pytest.raises(BackendLoadError, match=re.escape("several entry points: a.b:C, x.y:Z")):
        load_backend("lossy")


# -- the host: fault containment --------------------------------------------------------


class Raising(Backend):
    name = "raising"

    def process_tx(self, frames: list[bytes]) -> list[bytes]:
        raise RuntimeError("bug in user code")


class Flaky(Backend):
    """Raises on the calls whose index is in ``fail_on`` (shared by both directions)."""

    name = "flaky"

    def __init__(self, fail_on: set[int]) -> None:
        self.fail_on = fail_on
        self.calls = 0
        self.detached = 0

    def _maybe_fail(self, frames: list[bytes]) -> list[bytes]:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"call {self.calls}")
        return frames

    process_tx = _maybe_fail
    process_rx = _maybe_fail

    def on_detach(self) -> None:
        self.detached += 1


class Returning(Backend):
    name = "returning"

    def __init__(self, value: object) -> None:
        self.value = value

    def process_rx(self, frames: list[bytes]) -> list[bytes]:
        return self.value  # type: ignore[return-value]


def test_passthrough_host_returns_the_frames_unchanged() -> None:
    host = BackendHost(PassthroughBackend(), ctx_for())
    assert host.tx(FRAMES) == FRAMES
    assert host.rx(FRAMES[:3]) == FRAMES[:3]
    assert dict(host.counters.freeze()) == {}


def test_context_counters_come_from_the_registry_under_backend_slash_vif() -> None:
    registry = CounterRegistry()
    ctx = BackendContext("vif3.1", 3, registry)
    assert registry["backend/vif3.1"] is ctx.counters
    assert ctx.counters.kind == "device"


def test_a_raising_backend_drops_the_batch_counts_it_and_logs_its_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = BackendHost(Raising(), ctx_for())
    with caplog.at_level(logging.ERROR, logger="pvio.backend"):
        assert host.tx(FRAMES[:4]) == []
    assert host.counters["backend_errors"] == 1
    assert host.counters["backend_errors.raised"] == 1
    assert host.counters["drops.backend_error"] == 4
    (record,) = caplog.records
    assert record.name == "pvio.backend"
    assert record.getMessage() == "backend 'raising' on vif1.0 (dom1): process_tx raised; 4 frames dropped"
    assert record.exc_info is not None and "bug in user code" in str(record.exc_info[1])
    assert host.rx(FRAMES[:2]) == FRAMES[:2]  # the other hook still works
    assert not host.disabled


def test_consecutive_errors_disable_the_backend_and_frames_then_pass_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Flaky(fail_on={1, 2, 4, 5, 6})
    host = BackendHost(backend, ctx_for())
    with caplog.at_level(logging.ERROR, logger="pvio.backend"):
        host.tx(FRAMES[:1])  # 1 fails
        host.rx(FRAMES[:1])  # 2 fails
        assert host.tx(FRAMES[:2]) == FRAMES[:2]  # 3 succeeds: the run is reset
        host.tx(FRAMES[:1])  # 4 fails
        host.rx(FRAMES[:1])  # 5 fails
        assert not host.disabled
        assert host.tx(FRAMES[:3]) == []  # 6 fails: third in a row -> disabled
        assert host.disabled
        assert host.tx(FRAMES[:5]) == FRAMES[:5]
        assert host.rx(FRAMES[:2]) == FRAMES[:2]
    assert backend.calls == 6  # not called once disabled
    assert backend.detached == 1
    host.detach()
    assert backend.detached == 1  # on_detach runs once
    assert host.counters["backend_errors"] == 5
    assert host.counters["drops.backend_error"] == 1 + 1 + 1 + 1 + 3
    assert host.counters["backend_disabled"] == 1
    assert host.counters["bypassed"] == 7
    disabled_logs = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert [r.getMessage() for r in disabled_logs] == [
        "backend 'flaky' on vif1.0 (dom1): disabled after 3 consecutive errors; "
        "frames now pass through unchanged"
    ]


def test_a_fail_closed_backend_drops_everything_once_disabled() -> None:
    class Firewall(Raising):
        name = "firewall"
        fail_open = False

    host = BackendHost(Firewall(), ctx_for(), max_consecutive_errors=1)
    assert host.tx(FRAMES[:2]) == []
    assert host.disabled
    assert host.tx(FRAMES[:4]) == []
    assert host.rx(FRAMES[:1]) == []
    assert host.counters["drops.backend_disabled"] == 5
    assert host.counters["drops.backend_error"] == 2
    assert host.counters["bypassed"] == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (tuple(FRAMES[:2]), "process_rx returned tuple (b'"),
        (None, "process_rx returned NoneType None, expected list[bytes]"),
        ([FRAMES[0], "text"], "process_rx returned a list whose item 1 is str 'text', expected bytes"),
        ([bytearray(b"ab")], "item 0 is bytearray bytearray(b'ab'), expected bytes"),
    ],
)
def test_a_bad_return_value_is_a_clear_counted_error(
    value: object, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    host = BackendHost(Returning(value), ctx_for())
    with caplog.at_level(logging.ERROR, logger="pvio.backend"):
        assert host.rx(FRAMES[:3]) == []
    (record,) = caplog.records
    assert record.getMessage().startswith("backend 'returning' on vif1.0 (dom1): ")
    assert message in record.getMessage()
    assert record.getMessage().endswith("; 3 frames dropped")
    assert host.counters["backend_errors.bad_return"] == 1
    assert host.counters["drops.backend_error"] == 3


def test_an_on_attach_error_is_raised_naming_backend_and_vif() -> None:
    with pytest.raises(
        BackendError, match=r"backend 'lossy' on vif1.0 \(dom1\): on_attach failed: .*drop_every"
    ):
        BackendHost(LossyLinkBackend(), ctx_for({"drop_every": -1}))


def test_schedule_without_a_host_scheduler_is_a_clear_error() -> None:
    ctx = ctx_for()
    with pytest.raises(BackendError, match=re.escape("host of vif vif1.0 does not support delayed release")):
        ctx.schedule(0.1, FRAMES[:1], "tx")
    with pytest.raises(ValueError, match="direction must be 'tx' or 'rx', got 'up'"):
        ctx.schedule(0.1, FRAMES[:1], "up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delay_s must be finite and >= 0"):
        ctx.schedule(-1.0, FRAMES[:1], "tx")


# -- the example: LossyLinkBackend ------------------------------------------------------


def lossy(options: dict[str, object], **kwargs: object) -> BackendHost:
    return BackendHost(load_backend("lossy")(), ctx_for(options, **kwargs))


def test_lossy_drop_every_drops_exactly_every_nth_frame_across_batches() -> None:
    host = lossy({"drop_every": 3})
    kept = host.tx(FRAMES[:4]) + host.tx(FRAMES[4:])
    assert kept == [f for i, f in enumerate(FRAMES, start=1) if i % 3 != 0]
    assert host.counters["drops.injected_loss"] == 3  # frames 3, 6, 9


def test_lossy_counts_each_direction_separately() -> None:
    host = lossy({"drop_every": 2})
    assert host.tx(FRAMES[:3]) == [FRAMES[0], FRAMES[2]]
    assert host.rx(FRAMES[:1]) == [FRAMES[0]]  # rx frame 1: its own count
    assert host.tx(FRAMES[3:5]) == [FRAMES[4]]  # tx frame 4 dropped
    assert host.counters["drops.injected_loss"] == 2


def test_lossy_direction_option_limits_the_impairment() -> None:
    host = lossy({"drop_every": 1, "direction": "rx"})
    assert host.tx(FRAMES) == FRAMES
    assert host.rx(FRAMES) == []


def test_lossy_probability_is_deterministic_for_a_seed() -> None:
    frames = [bytes([i % 256, i // 256]) * 30 for i in range(1000)]
    runs = [lossy({"drop_probability": 0.25, "seed": seed}).tx(frames) for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert 600 < len(runs[0]) < 900  # about 750 of 1000 kept
    assert lossy({"drop_probability": 1.0}).tx(frames) == []
    assert lossy({"drop_probability": 0.0}).tx(frames) == frames


def test_lossy_tx_pattern_does_not_depend_on_rx_traffic() -> None:
    quiet = lossy({"drop_probability": 0.5, "seed": 1})
    busy = lossy({"drop_probability": 0.5, "seed": 1})
    busy.rx(FRAMES)
    assert busy.tx(FRAMES) == quiet.tx(FRAMES)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"drop_every": 2.5}, "option drop_every must be an integer"),
        ({"drop_every": True}, "option drop_every must be an integer"),
        ({"drop_probability": 1.5}, r"option drop_probability must be a number in \[0.0, 1.0\], got 1.5"),
        ({"latency_ms": "10"}, "option latency_ms must be a number"),
        ({"direction": "up"}, "direction must be both/tx/rx, got 'up'"),
        ({"dorp_every": 2}, r"unknown options \['dorp_every'\]"),
    ],
)
def test_lossy_rejects_bad_options_naming_them(options: dict[str, object], message: str) -> None:
    with pytest.raises(BackendError, match=message):
        lossy(options)


def test_lossy_latency_hands_surviving_frames_to_schedule() -> None:
    calls: list[tuple[float, list[bytes], Direction]] = []
    host = lossy(
        {"drop_every": 2, "latency_ms": 25},
        scheduler=lambda delay, frames, direction: calls.append((delay, frames, direction)),
    )
    assert host.tx(FRAMES[:4]) == []
    assert host.rx(FRAMES[:1]) == []
    assert calls == [(0.025, [FRAMES[0], FRAMES[2]], "tx"), (0.025, [FRAMES[0]], "rx")]
    assert host.counters["delayed"] == 3
    assert host.counters["drops.injected_loss"] == 2


async def test_delay_line_releases_lossy_frames_after_the_latency_on_the_trio_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    to_switch: list[tuple[float, list[bytes]]] = []
    to_guest: list[tuple[float, list[bytes]]] = []
    registry = CounterRegistry()
    ctx_counters = registry.new("backend/vif1.0", "device")
    line = DelayLine(
        lambda fs: to_switch.append((trio.current_time(), fs)),
        lambda fs: to_guest.append((trio.current_time(), fs)),
        ctx_counters,
    )
    host = lossy({"latency_ms": 40}, counters=ctx_counters, scheduler=line.schedule)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(line.run)
        start = trio.current_time()
        assert host.tx(FRAMES[:2]) == []
        await trio.sleep(0.010)
        assert host.rx(FRAMES[2:3]) == []
        await trio.sleep(0.005)
        assert host.tx(FRAMES[3:4]) == []
        assert line.held == 4
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert [(round(t - start, 6), fs) for t, fs in to_switch] == [(0.040, FRAMES[:2]), (0.055, FRAMES[3:4])]
    assert [(round(t - start, 6), fs) for t, fs in to_guest] == [(0.050, FRAMES[2:3])]
    assert line.held == 0
    assert dict(registry.snapshot()["backend/vif1.0"]) == {"delayed": 4, "delayed.released": 4}


async def test_delay_line_bounds_the_frames_it_holds(autojump_clock: trio.testing.MockClock) -> None:
    line = DelayLine(lambda fs: None, lambda fs: None, max_frames=3)
    line.schedule(1.0, FRAMES[:2], "tx")
    line.schedule(1.0, FRAMES[:2], "rx")
    line.schedule(1.0, FRAMES[:1], "rx")
    assert line.held == 3
    assert line.counters["drops.delay_full"] == 2
