"""fleetmesh-lab: bring a namespace fleet up, look at it, run things in it, tear it down.

Exit codes: 0 ok; 1 nothing is up (status, exec, agent); 2 bad input (usage, topology file,
unknown node, not root, a lab already up, a subnet that overlaps the host; agent: a node that is
not a device, a lab without a fleet, killing an agent that is not running); 3 the lab operation
itself failed (a kernel or tool error while building or tearing down, an agent that does not
start). exec returns the command's code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from mesh.clikit import SERVER_STACK, missing_extra

from ._host import LabError, LabUsageError
from .fleet import API_PORT, FLEET, kill_agent, start_agent, stop_agent
from .session import Lab, LabNotUp, teardown_all
from .topology import TopologyError, load_topology

EXIT_NOT_UP = 1
EXIT_USAGE = 2
EXIT_FAILED = 3

_PROG = "fleetmesh-lab"


def _err(msg: str) -> None:
    print(f"{_PROG}: {msg}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_PROG, description="A fleet of network namespaces.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="build the lab described by a topology file")
    up.add_argument("file", metavar="FILE", help="topology file (TOML)")
    up.add_argument("--network-only", action="store_true",
                    help="build only the network: no coordinator, agents or operator access")
    sub.add_parser("down", help="remove everything a lab made (also after a crash)")
    st = sub.add_parser("status", help="show nodes, addresses and router counters")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ex = sub.add_parser("exec", help="run a command in a node: exec NODE -- CMD...")
    ex.add_argument("node", metavar="NODE")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD")
    ag = sub.add_parser("agent", help="stop, start or kill (SIGKILL) a device's agent")
    ag.add_argument("node", metavar="NODE")
    ag.add_argument("action", choices=("stop", "start", "kill"), metavar="stop|start|kill")
    return p


def _require_root() -> int | None:
    if os.geteuid() != 0:
        _err("must run as root (the lab creates network and mount namespaces)")
        return EXIT_USAGE
    return None


def _cmd_up(args: argparse.Namespace) -> int:
    topo = load_topology(args.file)  # bad file: TopologyError before anything else
    if (rc := _require_root()) is not None:
        return rc
    t0 = time.monotonic()
    lab = Lab.up(topo, network_only=args.network_only)
    took = time.monotonic() - t0
    print(f"lab up in {took:.1f}s: {len(lab.nodes) + 1} namespaces, "
          f"WAN {topo.wan_subnet}, coordinator {topo.coordinator_ipv4}")
    for lan in topo.lans:
        extra = []
        if lan.shaping.rate_text:
            extra.append(f"uplink {lan.shaping.rate_text}")
        if lan.shaping.loss:
            extra.append(f"loss {lan.shaping.loss:g}")
        where = "on the WAN" if lan.nat == "none" else str(lan.subnet)
        print(f"  {lan.name}: nat={lan.nat}, {lan.devices} device(s) {where}"
              + (f", {', '.join(extra)}" if extra else ""))
    if topo.operator:
        print(f"  operator on {topo.operator.on}")
    if not args.network_only:
        print(f"  coordinator https://{topo.coordinator_ipv4}:{API_PORT}, "
              f"{len(lab.devices)} agent(s) enrolled and online in fleet {FLEET!r}"
              + ("; try: fleetmesh-lab exec operator -- fleetmesh devices list"
                 if topo.operator else ""))
        st = lab.status()
        print(f"  dashboard {st['dashboard_url']} (from this host), operator key "
              f"{st['operator_key']}")
        if st["engines"]:
            print(f"  {len(st['engines'])} Docker engine(s): "
                  f"fleetmesh-lab exec NODE -- docker ...")
    return 0


def _cmd_down(_: argparse.Namespace) -> int:
    if (rc := _require_root()) is not None:
        return rc
    removed = teardown_all()
    print(f"lab down ({len(removed)} namespaces removed)" if removed else "nothing was up")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    if (rc := _require_root()) is not None:
        return rc
    try:
        lab = Lab.load()
    except LabNotUp:
        if args.json:
            print(json.dumps({"up": False, "nodes": [], "routers": []}))
        else:
            _err("no lab is up")
        return EXIT_NOT_UP
    st = lab.status()
    if args.json:
        print(json.dumps({"up": True, **st}, indent=2))
        return 0
    # rich only for the table: `exec` and `agent` start without it (start-up time)
    from rich.console import Console
    from rich.table import Table  # start-up time, as above

    # Not a terminal (a pipe, a log): don't squeeze the addresses into 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    nodes = Table(title=f"fleetmesh lab ({st['source'] or 'topology'}), WAN {st['wan']['subnet']}")
    for col in ("node", "role", "lan", "netns", "underlay", "gateway"):
        nodes.add_column(col)
    for n in st["nodes"]:
        nodes.add_row(n["name"], n["role"], n["lan"] or "-", n["netns"], n["underlay_ipv4"],
                      n["gateway"] or "-")
    console.print(nodes)
    routers = Table(title="routers")
    for col in ("router", "nat", "wan", "lan", "WAN rx bytes", "WAN tx bytes"):
        routers.add_column(col)
    for r in st["routers"]:
        routers.add_row(r["name"], r["nat"] + (" (carrier)" if r["tier"] == "carrier" else ""),
                        f"{r['wan_if']} {r['wan_ipv4']}", r["lan_subnet"],
                        str(r["wan_rx_bytes"]), str(r["wan_tx_bytes"]))
    console.print(routers)
    if st["agents"]:
        agents = Table(title="agents")
        for col in ("device", "state", "pid", "restarts", "engine", "engine memory"):
            agents.add_column(col)
        engines = {e["node"]: e for e in st["engines"]}
        for a in st["agents"]:
            e = engines.get(a["node"])
            memory = f"{e['memory_kib'] / 1024:.0f} MiB" if e and e["memory_kib"] else "-"
            agents.add_row(a["node"], a["state"], str(a["pid"] or "-"), str(a["restarts"]),
                           (e["docker_host"] if e["running"] else "not running") if e else "-",
                           memory)
        console.print(agents)
    if st["dashboard_url"]:
        console.print(f"dashboard {st['dashboard_url']}  operator key {st['operator_key']}")
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        _err("exec: no command given (usage: exec NODE -- CMD...)")
        return EXIT_USAGE
    lab = _lab_that_is_up()
    if isinstance(lab, int):
        return lab
    node = lab.node(args.node)  # LabError (exit 2) for an unknown node
    try:
        proc = subprocess.Popen(lab.command(node, argv))
    except OSError as e:
        _err(f"exec: {e}")
        return EXIT_FAILED
    # Let the child have ^C; we just wait for it and hand its status back.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old)
    return rc if rc >= 0 else 128 - rc


def _lab_that_is_up() -> Lab | int:
    """The lab that is up, or the exit code to return (not root, nothing up)."""
    if (rc := _require_root()) is not None:
        return rc
    try:
        return Lab.load()
    except LabNotUp:
        _err("no lab is up")
        return EXIT_NOT_UP


def _cmd_agent(args: argparse.Namespace) -> int:
    lab = _lab_that_is_up()
    if isinstance(lab, int):
        return lab
    if args.action == "stop":
        n = stop_agent(lab, args.node)
        print(f"{args.node}: agent stopped" if n else f"{args.node}: agent was not running")
    elif args.action == "start":
        print(f"{args.node}: agent running, pid {start_agent(lab, args.node)}")
    else:
        pid = kill_agent(lab, args.node)
        print(f"{args.node}: agent pid {pid} killed (SIGKILL); its supervisor restarts it")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "up" and not args.network_only:  # it runs `fleetmesh coordinator serve`
        line = missing_extra("the lab needs the lab extra", "lab", SERVER_STACK)
        if line is not None:
            _err(line)
            return EXIT_USAGE
    try:
        if args.cmd == "up":
            return _cmd_up(args)
        if args.cmd == "down":
            return _cmd_down(args)
        if args.cmd == "status":
            return _cmd_status(args)
        if args.cmd == "agent":
            return _cmd_agent(args)
        return _cmd_exec(args)
    except TopologyError as e:
        _err(str(e))
        return EXIT_USAGE
    except LabUsageError as e:  # not root, already up, overlap with the host, unknown node
        _err(str(e))
        return EXIT_USAGE
    except LabError as e:
        _err(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
