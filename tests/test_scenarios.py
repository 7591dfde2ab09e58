"""Scenario files and ``pvio run``: every example runs, mistakes are one line naming file, line
and key (exit 2), the result's JSON parses, and a running ``pvio run --hold`` answers the
CLI's commands through its control socket."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvio.harness import scenario

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "examples" / "scenarios"
PVIO = [sys.executable, "-m", "pvio"]


def pvio(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PVIO, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout)


# ---------------------------------------------------------------------- the examples
RUNNABLE = sorted(p.name for p in SCENARIOS.glob("*.toml") if p.name != "tap.toml")


@pytest.mark.parametrize("name", RUNNABLE)
def test_each_example_scenario_runs_and_exits_0(name: str, tmp_path: Path) -> None:
    done = pvio("run", "--json", str(SCENARIOS / name), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] is True
    for row in out["rows"]:
        assert row["lost"] == 0 and row["packets"] > 0 and set(row["per_packet"]) == {
            "interrupts", "exits", "hypercalls", "copies",
        }  # fmt: skip


def test_the_tap_example_is_valid() -> None:
    """(Running it needs CAP_NET_ADMIN and makes a device in the host's namespace: tests/test_tap.py
    covers TAP ports inside namespaces of their own.)"""
    done = pvio("run", "--check", str(SCENARIOS / "tap.toml"))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok (1 domains, 0 traffic items)")


def test_the_capture_example_writes_both_files(tmp_path: Path) -> None:
    from scapy.utils import rdpcap

    assert pvio("run", "-q", str(SCENARIOS / "capture.toml"), cwd=tmp_path).returncode == 0
    assert len(rdpcap(str(tmp_path / "pvio-switch.pcap"))) == 18  # 9 probes and their answers
    assert len(rdpcap(str(tmp_path / "pvio-a.pcapng"))) == 18  # a's port: both directions


def test_lost_traffic_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "lossy.toml"
    path.write_text(
        '[[domain]]\nname = "a"\nnic = { model = "pv", backend = "lossy", options = { drop_every = 10 } }\n'
        '[[domain]]\nname = "b"\n[[traffic]]\ntype = "stream"\nfrom = "a"\nto = "b"\npackets = 100\n'
    )
    done = pvio("run", "--json", str(path))
    assert done.returncode == 1
    [row] = json.loads(done.stdout)["rows"]
    assert (row["sent"], row["packets"], row["lost"], row["ok"]) == (100, 90, 10, False)


# ---------------------------------------------------------------------- mistakes
BASE = '[[domain]]\nname = "a"\n\n[[domain]]\nname = "b"\n'


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        (BASE + 'kynd = "py"\n', 6, "domain[1].kynd", "unknown key; valid keys here: app, cmdline"),
        (BASE + 'kind = "arm"\n', 6, "domain[1].kind", "'arm' is not one of: linux, py, x86"),
        (BASE + '[domain.nic]\nmodel = "pv"\nbackend = "nope"\n', 8, "domain[1].nic.backend",
         "'nope' is not one of: lossy, passthrough"),
        (BASE + '[[traffic]]\ntype = "stream"\nfrom = "a"\nto = "c"\n', 9, "traffic[0].to",
         "'c' is not one of: a, b"),
        (BASE + '[[traffic]]\ntype = "stream"\nfrom = "a"\nto = "b"\nsize = 100000\n', 10, "traffic[0].size",
         "100000 must be a whole number from 46 to 65535"),
        ('clock = "fast"\n' + BASE, 1, "clock", "'fast' is not one of: mock, real"),
        (BASE + '[[domain]]\nname = "a"\n', 7, "domain[2].name", "'a' names two domains"),
        ("[[domain]\n", 1, "(syntax)", "Expected ']]' at the end of an array declaration"),
    ],
)  # fmt: skip
def test_a_mistake_is_one_line_naming_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, problem: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = pvio("run", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    [message] = done.stderr.splitlines()
    assert message.startswith(f"pvio run: {path}:{line}: {key}: "), message
    assert problem in message


def test_frame_sizes_are_checked_per_device_model() -> None:
    text = BASE.replace('name = "b"\n', 'name = "b"\nnic = { model = "emulated" }\n')
    with pytest.raises(scenario.ScenarioError, match=r"size: 2000 must be a whole number from 46 to 1518"):
        scenario.parse(text + '[[traffic]]\ntype = "stream"\nfrom = "a"\nto = "b"\nsize = 2000\n')


def test_a_missing_file_is_one_line() -> None:
    done = pvio("run", "/nonexistent/x.toml")
    assert (
        done.returncode == 2
        and done.stderr
        == "pvio run: /nonexistent/x.toml: (file): cannot read it: No such file or directory\n"
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["ring-demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "--models", ""], "--models names no model"),
        (["run"], "the following arguments are required: file"),
        (["stats"], "the following arguments are required: dom"),
    ],
)
def test_every_bad_invocation_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    done = pvio(*args)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and needle in done.stderr, done.stderr


def test_version() -> None:
    done = pvio("--version")
    assert done.returncode == 0 and done.stdout.startswith("pvio ")


def test_talking_to_no_pvio_is_one_line(tmp_path: Path) -> None:
    done = pvio("list", "--socket", str(tmp_path / "none.sock"))
    assert done.returncode == 1
    assert (
        done.stderr
        == f"pvio list: no pvio running at {tmp_path / 'none.sock'} (start one with `pvio run FILE --hold`)\n"
    )


# ---------------------------------------------------------------------- a running pvio
HOLD = """
[[domain]]
name = "a"
[[domain]]
name = "b"
[[traffic]]
type = "stream"
from = "a"
to = "b"
packets = 50
"""


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> object:
    tmp = tmp_path_factory.mktemp("hold")
    (tmp / "hold.toml").write_text(HOLD)
    sock = str(tmp / "control.sock")
    cmd = [
        *PVIO,
        "run",
        "--hold",
        "--socket",
        sock,
        "--xenstore-socket",
        str(tmp / "xs.sock"),
        str(tmp / "hold.toml"),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock) or pvio("list", "--socket", sock).returncode != 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "pvio run --hold did not come up"
        time.sleep(0.2)
    yield sock
    said = pvio("shutdown", "--socket", sock)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        pytest.fail(f"pvio run --hold did not stop ({said.stdout!r} {said.stderr!r}): {err[-2000:]}")


def test_list_shows_the_domains(running: str) -> None:
    done = pvio("list", "--socket", running)
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["Name", "ID", "Mem(MiB)", "State", "Kernel", "Vifs"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["dom0", "0", "16", "running"], ["a", "1", "8", "running"], ["b", "2", "8", "running"],
    ]  # fmt: skip


def test_stats_json_and_prometheus(running: str) -> None:
    stats = json.loads(pvio("stats", "a", "--json", "--socket", running).stdout)
    assert stats["domid"] == 1 and stats["counters"]["interrupts"] > 0
    assert stats["devices"]["netback/vif1.0"]["packets.tx"] >= 50  # the stream, taken by netback
    prom = pvio("stats", "1", "--prometheus", "--socket", running).stdout
    assert "# TYPE pvio_interrupts_total counter" in prom
    assert 'pvio_packets_tx_total{device="netback/vif1.0",domain="a",domid="1"}' in prom
    for line in prom.splitlines():
        assert line.startswith("# TYPE pvio_") or line.split(" ")[-1].isdigit()


def test_xenstore_ls_read_write(running: str) -> None:
    tree = pvio("xenstore", "ls", "/local/domain/1/device", "--socket", running).stdout
    assert '/local/domain/1/device/vif/0/state = "4"' in tree
    assert pvio("xenstore", "write", "/tool/test", "hello", "--socket", running).returncode == 0
    assert pvio("xenstore", "read", "/tool/test", "--socket", running).stdout == "hello\n"
    missing = pvio("xenstore", "read", "/tool/none", "--socket", running)
    assert missing.returncode == 1 and "ENOENT" in missing.stderr


@pytest.mark.skipif(
    shutil.which("xenstore-ls") is None, reason="needs xenstore-ls: apt-get install xenstore-utils"
)
def test_xens_own_xenstore_ls_reads_the_running_store(running: str) -> None:
    env = {**os.environ, "XENSTORED_PATH": str(Path(running).parent / "xs.sock")}
    done = subprocess.run(["xenstore-ls", "/local/domain/2/device/vif/0"], env=env, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert 'state = "4"' in done.stdout and 'mac = "00:16:3e:00:02:00"' in done.stdout


def test_network_attach_then_detach(running: str) -> None:
    """Hot-plug through the XenbusState handshake: the guest's frontend connects the new vif
    (state 4), and on detach both ends close and the toolstack removes the directories."""
    done = pvio("network-attach", "a", "--socket", running)
    assert done.stdout == "a: vif 1 (00:16:3e:00:01:01) attached\n", done.stderr
    deadline = time.monotonic() + 30
    while "  1  00:16:3e:00:01:01 4" not in pvio("network-list", "a", "--socket", running).stdout:
        assert time.monotonic() < deadline, "the hot-plugged vif did not connect"
        time.sleep(0.1)
    assert pvio("network-detach", "a", "1", "--socket", running).stdout == "a: vif 1 detached\n"
    assert pvio("network-list", "a", "--socket", running).stdout.splitlines()[1:] == [
        "  0  00:16:3e:00:01:00 4"
    ]
    missing = pvio("network-detach", "a", "7", "--socket", running)
    assert missing.returncode == 1 and "a has no vif 7" in missing.stderr


def test_console_pause_unpause(running: str) -> None:
    assert pvio("console", "a", "--socket", running).returncode == 0
    assert pvio("pause", "b", "--socket", running).stdout == "b: paused\n"
    assert "paused" in pvio("list", "--socket", running).stdout
    assert pvio("unpause", "b", "--socket", running).stdout == "b: running\n"
    unknown = pvio("pause", "zz", "--socket", running)
    assert unknown.returncode == 1 and "no domain 'zz'" in unknown.stderr


def test_capture_and_trace_against_the_running_pvio(running: str, tmp_path: Path) -> None:
    from scapy.utils import rdpcap

    done = pvio("capture", "switch", str(tmp_path / "c.pcap"), "--seconds", "0.3", "--socket", running)
    assert done.returncode == 0 and done.stdout == f"{tmp_path / 'c.pcap'}: 0 frames\n"  # a quiet network
    assert len(rdpcap(str(tmp_path / "c.pcap"))) == 0
    bad = pvio("capture", "nobody", str(tmp_path / "d.pcap"), "--socket", running)
    assert bad.returncode == 1 and "no domain 'nobody'" in bad.stderr
    done = pvio("trace", str(tmp_path / "t.json"), "--seconds", "0.3", "--socket", running)
    assert done.returncode == 0, done.stderr
    trace = json.loads((tmp_path / "t.json").read_text())
    assert trace["displayTimeUnit"] == "ns" and any(e["ph"] == "M" for e in trace["traceEvents"])


def test_destroy_then_list(running: str) -> None:
    assert pvio("destroy", "dom0", "--socket", running).returncode == 1
    done = pvio("destroy", "b", "--socket", running)
    assert done.returncode == 0
    assert "b" not in [
        line.split()[0] for line in pvio("list", "--socket", running).stdout.splitlines()[1:]
    ] or ("dying" in done.stdout or "dead" in done.stdout)


def test_the_trace_of_a_fixed_scenario_is_byte_identical_and_matches_the_counters(tmp_path: Path) -> None:
    runs = []
    for i in range(2):
        path = tmp_path / f"t{i}.json"
        done = pvio("run", "-q", "--json", "--trace", str(path), str(SCENARIOS / "pv.toml"), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        runs.append((path.read_bytes(), json.loads(done.stdout)))
    assert runs[0][0] == runs[1][0]
    events = json.loads(runs[0][0])["traceEvents"]
    interrupts = sum(e["args"]["delta"] for e in events if e["ph"] == "i" and e["name"] == "interrupts")
    rows = runs[0][1]["rows"]
    in_traffic = sum(r["totals"]["interrupts"] for r in rows)
    assert interrupts >= in_traffic > 0  # the trace has the boot too


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_top_draws_a_screen_in_a_terminal(running: str) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: pvio top on the pty
        os.execv(sys.executable, [*PVIO, "top", "-n", "2", "-d", "0.2", "--socket", running])
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(re.findall(r"pvio top - \d domains, interval", text)) == 2 and "\x1b[2J" in text
    assert "INTR/s" in text and "netback/vif1.0" in text


# ---------------------------------------------------------------------- driver domains
REAL_DD = 'clock = "real"\n[[driver]]\nname = "dd"\n'
SERVED = 'nic = { model = "pv", backend_domain = "dd" }\n'


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        ('[[driver]]\nname = "dd"\n' + BASE, 1, "driver[0]", 'it needs clock = "real"'),
        (REAL_DD + '[[domain]]\nname = "a"\nnic = { model = "pv", backend_domain = "xx" }\n', 6,
         "domain[0].nic.backend_domain", "'xx' is not one of: dd"),
        ('[[domain]]\nname = "a"\n' + SERVED, 3, "domain[0].nic.backend_domain",
         "names no driver domain: add a [[driver]] table"),
        (REAL_DD + '[[domain]]\nname = "a"\nnic = { model = "emulated", backend_domain = "dd" }\n', 6,
         "domain[0].nic.backend_domain", "a driver domain serves PV vifs, not emulated NICs"),
        (REAL_DD + '[[domain]]\nname = "a"\n'
         'nic = { model = "pv", backend_domain = "dd", backend = "lossy" }\n', 6,
         "domain[0].nic.backend", "takes that domain's backend: name it in its [[driver]] table"),
        (REAL_DD + '[[domain]]\nname = "a"\n' + SERVED + '[[domain]]\nname = "b"\n'
         '[[traffic]]\ntype = "stream"\nfrom = "a"\nto = "b"\n', 9, "traffic[0]",
         "a is on driver domain dd's switch and b on dom0's: traffic stays on one switch"),
        (REAL_DD + '[[domain]]\nname = "a"\n' + SERVED
         + '[[port]]\ntype = "capture"\nfile = "x.pcap"\nof = "a"\n', 10,
         "port[0].of", "a's NIC is on driver domain dd's switch: ports are dom0's"),
        (REAL_DD + '[[domain]]\nname = "dd"\n', 3, "driver[0].name", "'dd' names two domains"),
    ],
)  # fmt: skip
def test_a_driver_domain_mistake_is_one_line(text: str, line: int, key: str, problem: str) -> None:
    with pytest.raises(scenario.ScenarioError) as err:
        scenario.parse(text, "dd.toml")
    assert str(err.value).startswith(f"dd.toml:{line}: {key}: "), str(err.value)
    assert problem in str(err.value)


def test_the_driver_domain_example_counts_the_copies_it_makes_in_its_process(tmp_path: Path) -> None:
    """The stream's grant copies are made in the driver domain's process: the report has them
    (2 per frame at least; more when frames waited in netback's RX queue there), and exits
    equal hypercalls for every PV domain, as in one process."""
    done = pvio("run", "--json", str(SCENARIOS / "driver-domain.toml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    stream = next(r for r in out["rows"] if r["scenario"] == "stream")
    assert stream["packets"] == 20000 and stream["per_packet"]["copies"] >= 2.0
    assert stream["per_packet"]["exits"] == stream["per_packet"]["hypercalls"]
    assert stream["by_domain"]["netdd"]["hypercalls"] > 0


def test_a_frame_flooded_by_an_earlier_item_is_not_read_by_the_next(tmp_path: Path) -> None:
    """a's probes flood an ARP request to c as well; c's stream afterwards gets its own frames,
    every one (before, the stale 42-byte ARP request was read as the stream's first frame)."""
    path = tmp_path / "flood.toml"
    path.write_text(
        '[[domain]]\nname = "a"\n[[domain]]\nname = "b"\napp = "echo"\n[[domain]]\nname = "c"\n'
        '[[traffic]]\ntype = "probes"\nfrom = "a"\nto = "b"\n'
        '[[traffic]]\ntype = "stream"\nfrom = "a"\nto = "c"\npackets = 500\n'
    )
    done = pvio("run", "--json", str(path))
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert [(r["scenario"], r["lost"], r["ok"]) for r in rows] == [("probes", 0, True), ("stream", 0, True)]
