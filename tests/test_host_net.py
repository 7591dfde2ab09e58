"""``pvio net``: guests run until interrupted, with the store on a socket and a capture;
a port that cannot be created is reported in one line and the rest runs on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.utils import rdpcap

ROOT = Path(__file__).resolve().parent.parent


def test_pvio_net_serves_the_store_captures_and_survives_a_bad_port(tmp_path: Path) -> None:
    sock, pcap = tmp_path / "xs.sock", tmp_path / "all.pcap"
    cmd = [sys.executable, "-m", "pvio", "net", "--guests", "2", "--first-ip", "5", "--tap", "bad/name"]
    cmd += ["--vxlan", "7", "--local", "192.0.2.9:4789", "--pcap", str(pcap), "--xenstore-socket", str(sock)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line == "ready\n":
                break
        assert lines[:2] == [
            "guest guest-1 10.0.0.5 mac 00:16:3e:00:00:05",
            "guest guest-2 10.0.0.6 mac 00:16:3e:00:00:06",
        ]
        errors = [line for line in lines if line.startswith("error: ")]
        assert errors == [
            "error: tap 'bad/name': not a valid interface name (1-15 bytes); running without it",
            "error: vxlan 192.0.2.9:4789: address not available on this host; running without it",
        ]
        if shutil.which("xenstore-read"):
            env = {**os.environ, "XENSTORED_PATH": str(sock)}
            mac = subprocess.run(
                ["xenstore-read", "/local/domain/1/device/vif/0/mac"], env=env, capture_output=True, text=True
            )
            assert mac.stdout == "00:16:3e:00:00:05\n", mac.stderr
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "capture: 0 frames" in out  # the guests were quiet: nothing crossed the switch
    assert len(rdpcap(str(pcap))) == 0
    assert not sock.exists()


@pytest.mark.parametrize("args", [["--guests", "300"], ["--first-ip", "254"]])
def test_pvio_net_refuses_addresses_that_do_not_fit(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pvio", "net", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "must fit in 10.0.0.1-254" in done.stderr
