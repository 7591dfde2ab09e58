"""The ``pvio`` command line, in xl's and virsh's words.

Running things:

- ``pvio run FILE`` boots a scenario file, runs its traffic, prints the result table
  (``--json``: the bench's schema) and exits 1 when traffic was lost or a check failed;
  while it runs it serves the control socket (``--socket``; ``--hold`` keeps it up);
- ``pvio demo [--guest py|x86] [--json]``: two guests exchange scapy-built traffic over the
  PV NIC; ``pvio ring-demo``: the bare ring; ``pvio bench``: the device models compared.

Talking to a running ``pvio run`` (its control socket, :mod:`pvio.harness.control`):
``pvio list``, ``pvio console DOM``, ``pvio top``, ``pvio stats DOM [--json|--prometheus]``,
``pvio pause|unpause|destroy DOM``, ``pvio xenstore ls|read|write|watch``, ``pvio shutdown``.

Every bad invocation prints one line naming the problem and exits 2; an internal error
prints one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, NoReturn

PROG = "pvio"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``pvio run: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pvio")
    except PackageNotFoundError:  # a source tree that was never installed
        import pvio

        return pvio.__version__


def build_parser() -> OneLineParser:
    """The whole command line (every subcommand and its options)."""
    p = OneLineParser(prog=PROG, description="pvio: a Xen-style paravirtual I/O framework")
    p.add_argument("--version", action="version", version=f"pvio {_version()}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    r = sub.add_parser("run", help="boot a scenario file and run its traffic")
    r.add_argument("file", help="the scenario (TOML; see docs/scenarios.md)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    r.add_argument("--socket", help="control socket path (default: %(default)s)", default=None)
    r.add_argument("--hold", action="store_true", help="keep running (and serving) after the traffic")
    r.add_argument("--check", action="store_true", help="validate the file and exit")
    r.add_argument("--clock", choices=("mock", "real"), help="override the scenario's clock")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    r.add_argument("--trace", metavar="FILE", help="record a Perfetto trace of the run (docs/trace.md)")
    r.add_argument(
        "--xenstore-socket", metavar="PATH", help="serve the store to Xen's tools (XENSTORED_PATH)"
    )

    d = sub.add_parser("demo", help="two guests exchange scapy-built traffic over the PV NIC")
    d.add_argument("--guest", choices=("py", "x86", "linux"), default="py",
                   help="guest B: py, x86 (pvio's C kernel) or linux (Debian's, PVH)")  # fmt: skip
    d.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    d.add_argument("--pcap", metavar="PATH", help="capture the switch's traffic (pcap; .pcapng for pcapng)")

    sub.add_parser("ring-demo", help="a frontend and a backend on one shared ring page")

    b = sub.add_parser("bench", help="compare the device models (pvio bench --help)", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    n = sub.add_parser("net", help="guests on the host's network: TAP, VXLAN, capture (pvio net --help)",
                       add_help=False)  # fmt: skip
    n.add_argument("rest", nargs=argparse.REMAINDER)

    def control(name: str, what: str, dom: bool = False) -> OneLineParser:
        c = sub.add_parser(name, help=what)
        c.add_argument("--socket", default=None, help="the control socket of the running pvio")
        if dom:
            c.add_argument("dom", help="a domain, by name or id")
        return c

    control("list", "the domains of the running pvio: id, name, state, memory, vifs")
    c = control("console", "a domain's console (like xl console)", dom=True)
    c.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    c.add_argument("--type", dest="input", metavar="TEXT", help="type TEXT (a newline is added)")
    t = control("top", "live counters per domain and device (like xentop)")
    t.add_argument("--delay", "-d", type=float, default=1.0, help="seconds between updates")
    t.add_argument("--iterations", "-n", type=int, default=0, help="stop after N updates (0: never)")
    s = control("stats", "a domain's vif, ring and interrupt counters (like virsh domifstat)", dom=True)
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--prometheus", action="store_true", help="Prometheus text exposition format")
    for name, what in (("pause", "pause a domain"), ("unpause", "unpause a domain"),
                       ("destroy", "destroy a domain")):  # fmt: skip
        control(name, what, dom=True)
    control("shutdown", "stop a pvio run --hold")
    na = control("network-attach", "hot-plug a vif into a domain (like xl network-attach)", dom=True)
    na.add_argument("--mac", help="its MAC (default: Xen's OUI, the domid and the device id)")
    nd = control("network-detach", "hot-unplug a domain's vif (like xl network-detach)", dom=True)
    nd.add_argument("devid", type=int, help="the vif's device id")
    control("network-list", "a domain's vifs (like xl network-list)", dom=True)
    cap = control("capture", "mirror a switch port (or the whole switch) to a pcap file")
    cap.add_argument("port", help="'switch', a domain (its NIC's port), or a port name (vif1.0, tap-x)")
    cap.add_argument("file", help="the pcap file (.pcapng: pcapng), written by the running pvio")
    cap.add_argument("--seconds", type=float, default=5.0, help="how long to capture (default 5)")
    tr = control("trace", "record a Perfetto trace of the running pvio (docs/trace.md)")
    tr.add_argument("file", help="the trace file, written by the running pvio")
    tr.add_argument("--seconds", type=float, default=2.0, help="how long to record (default 2)")
    x = control("xenstore", "browse and change the running pvio's xenstore")
    xs = x.add_subparsers(dest="op", metavar="OP", parser_class=OneLineParser, required=True)
    ops: dict[str, tuple[str, list[tuple[str, str | None]]]] = {
        "ls": ("the tree under PATH", [("path", "?")]),
        "read": ("one node's value", [("path", None)]),
        "write": ("set a node", [("path", None), ("value", None)]),
        "watch": ("print paths as they change", [("path", None)]),
    }
    for op, (what, positionals) in ops.items():
        o = xs.add_parser(op, help=what)
        for name, nargs in positionals:
            if nargs:
                o.add_argument(name, nargs=nargs, default="/")
            else:
                o.add_argument(name)
        o.add_argument("--socket", default=argparse.SUPPRESS, help="the control socket of the running pvio")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pvio`` command."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in DELEGATED:  # commands with their own option parsers
        sys.exit(DELEGATED[args_list[0]](args_list[1:]))
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    try:
        sys.exit(dispatch(args))
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as exc:  # one line, never a wall of exception groups
        if args.debug:
            raise
        leaf = _leaf(exc)
        print(f"pvio {args.command}: {type(leaf).__name__}: {leaf}", file=sys.stderr)
        sys.exit(1)


def _bench(argv: list[str]) -> int:
    if "--cpu" in argv:  # the CPU half: trap-and-emulate, binary translation, PV (pvio.harness.cpu_bench)
        from pvio.harness import cpu_bench

        return cpu_bench.main([a for a in argv if a != "--cpu"])
    from pvio.harness import bench

    return bench.main(argv)


def _net(argv: list[str]) -> int:
    from pvio.harness import net

    return net.main(argv)


#: Subcommands that parse their own options (argparse cannot hand them a remainder that
#: starts with an option).
DELEGATED = {"bench": _bench, "net": _net}


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit status."""
    from pvio.harness.control import ControlError

    cmd = args.command
    if cmd == "demo":
        from pvio.harness import demo

        argv = (["--json"] if args.json else []) + (["--pcap", args.pcap] if args.pcap else [])
        if args.guest == "linux":
            from pvio.harness import linux_demo

            return linux_demo.main(["--json"] if args.json else [])
        return demo.x86_main(argv) if args.guest == "x86" else demo.main(argv)
    if cmd == "ring-demo":
        from pvio.harness import ring_demo

        ring_demo.main()
        return 0
    if cmd == "run":
        return _run(args)
    try:
        return _control(args)
    except ControlError as e:
        print(f"pvio {cmd}: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import logging

    import trio
    import trio.testing

    from pvio.harness import scenario
    from pvio.harness.control import default_socket
    from pvio.harness.run import run

    try:
        sc = scenario.load(args.file)
    except scenario.ScenarioError as e:
        print(f"pvio run: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.file}: ok ({len(sc.domains)} domains, {len(sc.traffic)} traffic items)")
        return 0
    if args.clock:
        sc.clock = args.clock
    if args.hold:
        sc.clock = "real"  # an interactive hypervisor runs in wall time
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = None if args.quiet or args.json else (lambda what: print(f"  {what} ...", file=sys.stderr))
    clock = trio.testing.MockClock(autojump_threshold=0) if sc.clock == "mock" else None
    # Under the mock clock a run takes no wall time and must be reproducible, so it serves no
    # control socket (a socket's readiness would make its schedule depend on the host).
    sock = (args.socket or default_socket()) if sc.clock == "real" else None
    live = None
    if progress is not None and sys.stderr.isatty():  # a status line that rewrites itself

        def live(line: str) -> None:
            print(f"\r\x1b[K  {line[:150]}", end="", file=sys.stderr, flush=True)

    result = trio.run(
        lambda: run(
            sc, control=sock, hold=args.hold, progress=progress, trace=args.trace,
            xenstore_socket=args.xenstore_socket, live=live,
        ),
        clock=clock,
    )  # fmt: skip
    if live is not None:
        print("\r\x1b[K", end="", file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_json(), indent=2, sort_keys=True))
    else:
        print(format_run(result.as_json()))
    return 0 if result.ok else 1


def format_run(out: dict[str, Any]) -> str:
    """The human-readable result of ``pvio run``."""
    lines = [f"scenario {out['scenario']} ({out['file']}, {out['clock']} clock)", ""]
    lines.append(f"{'domid':>5}  {'name':<12}{'state':<10}{'MiB':>7}  vifs")
    for d in out["domains"]:
        vifs = ", ".join(f"{v['devid']}:{v['mac']}" for v in d["vifs"]) or "-"
        lines.append(f"{d['domid']:>5}  {d['name']:<12}{d['state']:<10}{d['memory_mib']:>7g}  {vifs}")
    lines.append("")
    if not out["rows"]:
        lines.append("no traffic")
    else:
        keys = list(out["rows"][0]["per_packet"])
        head = f"{'traffic':<22}{'model':<10}{'sent':>7}{'deliv.':>8}{'lost':>6}" + "".join(
            f"{k + '/pkt':>16}" for k in keys
        )
        lines.append(head)
        for row in out["rows"]:
            what = f"{row['scenario']} {row['from']}->{row['to']}"
            cells = "".join(f"{row['per_packet'][k]:>16.4f}" for k in keys)
            lines.append(
                f"{what:<22}{row['model']:<10}{row['sent']:>7}{row['packets']:>8}{row['lost']:>6}{cells}"
            )
            for failure in row["failed_checks"]:
                lines.append(f"    FAILED: {failure}")
    lines += ["", "result: " + ("ok" if out["ok"] else "FAILED (traffic lost or a check failed)")]
    return "\n".join(lines)


def _control(args: argparse.Namespace) -> int:
    from pvio.harness.control import default_socket, request, stream

    sock = args.socket or default_socket()
    cmd = args.command
    if cmd == "list":
        rows = request(sock, "list")
        print(f"{'Name':<16}{'ID':>4}{'Mem(MiB)':>10}  {'State':<10}{'Kernel':<18}Vifs")
        for d in rows:
            vifs = ",".join(str(v["devid"]) for v in d["vifs"]) or "-"
            mem = f"{d['memory_mib']:g}"
            print(f"{d['name']:<16}{d['domid']:>4}{mem:>10}  {d['state']:<10}{d['kernel']:<18}{vifs}")
        return 0
    if cmd == "console":
        if args.follow:
            for item in stream(sock, "console", dom=args.dom, follow=True):
                print(item["line"], flush=True)
            return 0
        text = None if args.input is None else args.input + "\n"
        for line in request(sock, "console", dom=args.dom, input=text):
            print(line)
        return 0
    if cmd == "stats":
        stats = request(sock, "stats", dom=args.dom)
        if args.json:
            print(json.dumps(stats, indent=2, sort_keys=True))
        elif args.prometheus:
            print(prometheus(stats), end="")
        else:
            print(format_stats(stats))
        return 0
    if cmd in ("pause", "unpause", "destroy"):
        state = request(sock, cmd, dom=args.dom)
        print(f"{args.dom}: {state}")
        return 0
    if cmd == "shutdown":
        print(request(sock, "shutdown"))
        return 0
    if cmd == "network-attach":
        vif = request(sock, "network-attach", dom=args.dom, mac=args.mac)
        print(f"{vif['domain']}: vif {vif['devid']} ({vif['mac']}) attached")
        return 0
    if cmd == "network-detach":
        request(sock, "network-detach", dom=args.dom, devid=args.devid)
        print(f"{args.dom}: vif {args.devid} detached")
        return 0
    if cmd == "network-list":
        print(f"{'Idx':>3}  {'MAC':<18}State")
        for v in request(sock, "network-list", dom=args.dom):
            print(f"{v['devid']:>3}  {v['mac']:<18}{v['state']}")
        return 0
    if cmd == "top":
        return _top(sock, args.delay, args.iterations)
    if cmd in ("capture", "trace"):
        import os

        args_ = {"file": os.path.abspath(args.file), "seconds": args.seconds}
        if cmd == "capture":
            args_["port"] = args.port
        done = request(sock, cmd, **args_)
        print(f"{done['file']}: {done['events']} {'frames' if cmd == 'capture' else 'events'}")
        return 0
    if cmd == "xenstore":
        if args.op == "ls":
            for path, value in request(sock, "xenstore-ls", path=args.path):
                print(f'{path} = "{value}"')
        elif args.op == "read":
            print(request(sock, "xenstore-read", path=args.path))
        elif args.op == "write":
            request(sock, "xenstore-write", path=args.path, value=args.value)
        else:
            for item in stream(sock, "xenstore-watch", path=args.path):
                print(item["path"], flush=True)
        return 0
    raise AssertionError(cmd)


VIF_KEYS = ("packets.rx", "bytes.rx", "packets.tx", "bytes.tx")


def format_stats(stats: dict[str, Any]) -> str:
    """``pvio stats DOM``: the domain's counters, then each device's, virsh-style."""
    lines = [f"domain {stats['domain']} (id {stats['domid']})"]
    for key in sorted(stats["counters"]):
        lines.append(f"  {key:<40}{stats['counters'][key]:>14}")
    for dev, counters in sorted(stats["devices"].items()):
        lines.append(f"{dev}")
        for key in sorted(counters):
            lines.append(f"  {key:<40}{counters[key]:>14}")
    return "\n".join(lines)


def prometheus(stats: dict[str, Any]) -> str:
    """The Prometheus text exposition format: one ``pvio_<counter>`` family per key, labelled
    by domain and device, so existing monitoring can scrape ``pvio stats --prometheus``."""
    families: dict[str, list[str]] = {}

    def add(key: str, labels: dict[str, str], value: int) -> None:
        name = "pvio_" + "".join(ch if ch.isalnum() else "_" for ch in key) + "_total"
        text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        families.setdefault(name, []).append(f"{name}{{{text}}} {value}")

    base = {"domain": str(stats["domain"]), "domid": str(stats["domid"])}
    for key, value in stats["counters"].items():
        add(key, base, value)
    for dev, counters in stats["devices"].items():
        for key, value in counters.items():
            add(key, {**base, "device": dev}, value)
    out = []
    for name in sorted(families):
        out.append(f"# TYPE {name} counter")
        out += sorted(families[name])
    return "\n".join(out) + "\n"


def _top(sock: str, delay: float, iterations: int) -> int:
    from pvio.harness.control import request

    prev = request(sock, "top")
    n = 0
    while iterations == 0 or n < iterations:
        time.sleep(delay)
        cur = request(sock, "top")
        print("\x1b[H\x1b[2J" + format_top(prev, cur), flush=True)
        prev = cur
        n += 1
    return 0


TOP_KEYS = (("interrupts", "INTR/s"), ("exits", "EXITS/s"), ("hypercalls", "HCALLS/s"))


def format_top(prev: dict[str, Any], cur: dict[str, Any]) -> str:
    """One ``pvio top`` screen: rates between two ``top`` answers, per domain and device."""
    dt = max(cur["time"] - prev["time"], 1e-9)
    names = cur["names"]
    lines = [f"pvio top - {len(names)} domains, interval {dt:.2f} s"]
    lines.append(f"{'NAME':<16}" + "".join(f"{h:>12}" for _, h in TOP_KEYS) + f"{'PKTS/s':>12}")
    owners = {**cur["counters"]["domains"], **cur["counters"]["devices"]}
    before = {**prev["counters"]["domains"], **prev["counters"]["devices"]}

    def rate(owner: str, key: str) -> float:
        return (owners.get(owner, {}).get(key, 0) - before.get(owner, {}).get(key, 0)) / dt

    for owner in sorted(owners, key=lambda o: (not o.startswith("dom"), o)):
        label = names.get(owner, owner)
        pkts = rate(owner, "packets.rx") + rate(owner, "packets.tx")
        cells = "".join(f"{rate(owner, key):>12.1f}" for key, _ in TOP_KEYS)
        lines.append(f"{label[:15]:<16}{cells}{pkts:>12.1f}")
    return "\n".join(lines)
