"""A second pvio instance for the VXLAN tests: its own hypervisor, switch and echo guest.

``python -m tests.vxlan_peer --vni N --ip A.B.C.D --remote HOST:PORT`` boots dom0 and one
:class:`EchoGuest`, attaches a VXLAN port on 127.0.0.1 (a free port) with ``HOST:PORT`` as
its static remote, prints ``ready <port>`` and serves until its stdin closes; then it
prints its VXLAN port's counters as JSON and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from pvio.backends.vxlan import VxlanPort
from tests.netenv import EchoGuest, net_env

PEER_MAC = "00:16:3e:7e:00:02"


async def serve(vni: int, ip: str, remote: tuple[str, int]) -> dict[str, int]:
    # Its own MAC: the toolstack's default derives from the domid, the same in both instances.
    async with net_env(EchoGuest("peer", ip), timeout_s=30, macs=[PEER_MAC]) as env:
        port = VxlanPort(env.switch, vni, local=("127.0.0.1", 0), remotes=[remote])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(port.run)
            print(f"ready {port.local[1]}", flush=True)
            stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
            while await stdin.receive_some():
                pass
            nursery.cancel_scope.cancel()
        port.close()
        return dict(port.counters.items())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vni", type=int, required=True)
    parser.add_argument("--ip", required=True)
    parser.add_argument("--remote", required=True)
    args = parser.parse_args()
    host, _, port = args.remote.rpartition(":")
    counters = trio.run(serve, args.vni, args.ip, (host, int(port)))
    print(json.dumps(counters, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
