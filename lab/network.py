"""The lab's network: one network namespace per node, a WAN bridge namespace, NAT routers
(iptables), WAN shaping (tbf + iptables statistic) and private mount namespaces, planned from a
topology, built, and run in (`LabNetwork`: its nodes, `command`/`run`/`spawn` in a node, link
counters, moving a device). It imports only lab._host and lab.topology: the engines, the fleet
and the session build on it (docs/lab.md, "Layout"); lab.session tears it down.

Nothing here touches the host's own network: every link, address, route, rule and qdisc lives
inside a namespace named ``fm-*``; the host only gets /run/fleetmesh-lab (the state file) and an
empty /run/wireguard mount point directory. Each non-router node's private mount namespace is
kept alive by a holder process inside the node's network namespace.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

from pyroute2 import IPRoute, netns

from . import _host
from ._host import (
    CONTAINERD_RUN_DIR,
    NETNS_DIR,
    NETNS_PREFIX,
    WG_RUN_DIR,
    LabError,
    LabUsageError,
)
from .topology import Topology

__all__ = [
    "WAN_BRIDGE",
    "WAN_NETNS",
    "LabNetwork",
    "Link",
    "Node",
    "Router",
    "build",
    "initial_state",
    "plan",
    "with_holders",
    "write_net_sysctls",
]

WAN_NETNS: Final = f"{NETNS_PREFIX}wan"
WAN_BRIDGE: Final = "br0"
LAN_BRIDGE: Final = "lan0"
HOST_IF: Final = "eth0"
WAN_IF: Final = "wan0"
LINK_STATS: Final = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
STATE_VERSION: Final = 1
VENV_BIN: Final = os.path.dirname(sys.executable)
MOVED_FIRST_HOST: Final = 100  # moved devices get .100 and up in their new LAN

# tbf: the bucket must hold at least a few full-size (GSO-split) packets, and a deeper queue
# than the classic 50 ms keeps a single TCP flow from sawing below the rate (measured with
# iperf3 at 4mbit: ~3.8 Mbit/s both directions with these values).
TBF_MIN_BURST_BYTES: Final = 16 * 1024
TBF_BURST_SECONDS: Final = 0.01
TBF_LATENCY_MS: Final = 100


@dataclass(frozen=True, slots=True)
class Node:
    """One namespace of the lab. underlay_ipv4 is the address on its uplink interface."""

    name: str
    role: str  # device | router | coordinator | operator
    lan: str | None  # None for nodes on the WAN
    netns: str
    underlay_ipv4: str
    prefixlen: int
    iface: str  # the uplink interface inside the namespace
    gateway: str | None  # next hop of the default route, None if there is none
    mountns_path: str | None  # persistent mount namespace file (non-routers only)

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["netns_path"] = self.netns_path
        return d


@dataclass(frozen=True, slots=True)
class Router(Node):
    """A NAT router. tier "home" is a LAN's router, "carrier" the CGNAT of a nat="double" LAN.

    The home router of a double LAN has nat == "double" and its WAN side on the carrier subnet.
    """

    nat: str = "firewall"
    tier: str = "home"
    wan_if: str = WAN_IF
    wan_ipv4: str = ""
    lan_if: str = LAN_BRIDGE
    lan_ipv4: str = ""
    lan_subnet: str = ""


@dataclass(frozen=True, slots=True)
class Link:
    """A veth pair: (a_ns, a_if) is the node's side, (b_ns, b_if) its upstream's side."""

    a_ns: str
    a_if: str
    b_ns: str
    b_if: str
    b_master: str | None  # bridge on the b side, if any
    shaped: bool  # tbf/loss applied to this link (both directions)
    lan: str | None


def _ns(node_name: str) -> str:
    return f"{NETNS_PREFIX}{node_name}"


def _mnt(node_name: str) -> str:
    """Placeholder until the node's mount-namespace holder runs (see _start_holders)."""
    return f"{HOLDER_PLACEHOLDER}{node_name}"


HOLDER_PLACEHOLDER: Final = "holder:"


def root_of(mountns_path: str) -> str:
    """/proc/PID/ns/mnt -> /proc/PID/root: entering a mount namespace resets the root directory
    to the namespace's, which is wrong inside a chroot; nsenter --root puts it back."""
    return mountns_path.removesuffix("/ns/mnt") + "/root"


def with_holders(nodes: Sequence[Node], holders: dict[str, Any]) -> list[Node]:
    out: list[Node] = []
    for n in nodes:
        if n.mountns_path and n.mountns_path.startswith(HOLDER_PLACEHOLDER):
            h = holders.get(n.name)
            out.append(replace(n, mountns_path=f"/proc/{h['pid']}/ns/mnt" if h else None))
        else:
            out.append(n)
    return out


def plan(topo: Topology) -> tuple[list[Node], list[Link]]:
    """The nodes and links a topology makes, in build order. Pure."""
    nodes: list[Node] = []
    links: list[Link] = []
    wan_plen = topo.wan_subnet.prefixlen
    port = 0

    def wan_port(node: str, ifname: str, shaped: bool = False, lan: str | None = None) -> None:
        nonlocal port
        links.append(Link(_ns(node), ifname, WAN_NETNS, f"p{port}", WAN_BRIDGE, shaped, lan))
        port += 1

    nodes.append(
        Node("coordinator", "coordinator", None, _ns("coordinator"), str(topo.coordinator_ipv4),
             wan_plen, HOST_IF, None, _mnt("coordinator"))
    )
    wan_port("coordinator", HOST_IF)
    op_on = topo.operator.on if topo.operator else None
    if op_on == "wan":
        nodes.append(
            Node("operator", "operator", None, _ns("operator"), str(topo.operator_wan_ipv4),
                 wan_plen, HOST_IF, None, _mnt("operator"))
        )
        wan_port("operator", HOST_IF)

    for lan in topo.lans:
        shaped = lan.shaping.active
        if lan.nat == "none":
            for n in range(1, lan.devices + 1):
                name = lan.device_name(n)
                nodes.append(
                    Node(name, "device", lan.name, _ns(name), str(lan.device_ipv4(n)), wan_plen,
                         HOST_IF, None, _mnt(name))
                )
                wan_port(name, HOST_IF, shaped, lan.name)
            continue

        router = f"{lan.name}-router"
        if lan.nat == "double":
            assert lan.carrier_subnet is not None
            cgnat = f"{lan.name}-cgnat"
            carrier_gw = lan.carrier_subnet.network_address + 1
            home_wan = lan.carrier_subnet.network_address + 2
            nodes.append(
                Router(cgnat, "router", lan.name, _ns(cgnat), str(lan.wan_addresses[0]), wan_plen,
                       WAN_IF, None, None, nat="firewall", tier="carrier",
                       wan_ipv4=str(lan.wan_addresses[0]), lan_if=LAN_BRIDGE,
                       lan_ipv4=str(carrier_gw), lan_subnet=str(lan.carrier_subnet))
            )
            wan_port(cgnat, WAN_IF)
            nodes.append(
                Router(router, "router", lan.name, _ns(router), str(home_wan),
                       lan.carrier_subnet.prefixlen, WAN_IF, str(carrier_gw), None,
                       nat="double", tier="home", wan_ipv4=str(home_wan),
                       lan_ipv4=str(lan.router_lan_ipv4), lan_subnet=str(lan.subnet))
            )
            links.append(Link(_ns(router), WAN_IF, _ns(cgnat), LAN_BRIDGE, None, shaped, lan.name))
        else:
            nodes.append(
                Router(router, "router", lan.name, _ns(router), str(lan.wan_addresses[0]),
                       wan_plen, WAN_IF, None, None, nat=lan.nat, tier="home",
                       wan_ipv4=str(lan.wan_addresses[0]), lan_ipv4=str(lan.router_lan_ipv4),
                       lan_subnet=str(lan.subnet))
            )
            wan_port(router, WAN_IF, shaped, lan.name)

        gw = str(lan.router_lan_ipv4)
        plen = lan.subnet.prefixlen
        if op_on == lan.name:
            nodes.append(
                Node("operator", "operator", lan.name, _ns("operator"), str(lan.operator_ipv4),
                     plen, HOST_IF, gw, _mnt("operator"))
            )
            links.append(Link(_ns("operator"), HOST_IF, _ns(router), "op", LAN_BRIDGE, False,
                               lan.name))
        for n in range(1, lan.devices + 1):
            name = lan.device_name(n)
            nodes.append(
                Node(name, "device", lan.name, _ns(name), str(lan.device_ipv4(n)), plen, HOST_IF,
                     gw, _mnt(name))
            )
            links.append(Link(_ns(name), HOST_IF, _ns(router), f"d{n}", LAN_BRIDGE, False,
                               lan.name))
    return nodes, links


def nat_rules(router: Router, loss: float) -> str:
    """iptables-restore input for a router namespace (documented verbatim in docs/lab.md)."""
    w = router.wan_if
    filt = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    if router.nat in ("firewall", "double"):
        filt += [
            f"-A INPUT -i {w} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A INPUT -i {w} -j DROP",
            f"-A FORWARD -i {w} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A FORWARD -i {w} -j DROP",
        ]
    filt.append("COMMIT")
    masq = f"-A POSTROUTING -o {w} -j MASQUERADE"
    if router.nat == "symmetric":
        masq += " --random-fully"
    nat = [
        "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]", masq, "COMMIT",
    ]
    mangle: list[str] = []
    if loss > 0:
        mangle = [
            "*mangle", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]",
            *_loss_rules(w, loss), "COMMIT",
        ]
    return "\n".join(filt + nat + mangle) + "\n"


def _loss_rules(ifname: str, loss: float) -> list[str]:
    p = f"{loss:.6f}"
    return [
        f"-A PREROUTING -i {ifname} -m statistic --mode random --probability {p} -j DROP",
        f"-A POSTROUTING -o {ifname} -m statistic --mode random --probability {p} -j DROP",
    ]


def loss_only_rules(ifname: str, loss: float) -> str:
    return "\n".join(
        ["*mangle", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
         ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]", *_loss_rules(ifname, loss),
         "COMMIT"]
    ) + "\n"


def tbf_args(rate_bps: int) -> list[str]:
    burst = max(TBF_MIN_BURST_BYTES, int(rate_bps / 8 * TBF_BURST_SECONDS))
    return ["tbf", "rate", f"{rate_bps}bit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]


_CLONE_NEWNET: Final = 0x40000000


def write_net_sysctls(keys: dict[str, list[str]]) -> None:
    """Set /proc/sys/net/<key> = 1 (or <key>=<value>) inside each namespace, from a throwaway
    thread (setns moves only the calling thread, and this one dies afterwards, so no other
    thread ever changes namespace)."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            for ns, names in keys.items():
                fd = os.open(f"{NETNS_DIR}/{ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns {ns}")
                finally:
                    os.close(fd)
                for entry in names:
                    name, _, value = entry.partition("=")
                    with open(f"/proc/sys/net/{name}", "w") as f:
                        f.write(value or "1")
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    t = threading.Thread(target=work, name="fm-lab-sysctl")
    t.start()
    t.join()
    if errors:
        raise LabError(f"setting sysctls failed: {errors[0]}")


def _nsenter_net(ns: str) -> list[str]:
    return ["nsenter", f"--net={NETNS_DIR}/{ns}", "--"]


def _run_all(jobs: Sequence[tuple[list[str], str | None]], what: str) -> None:
    """Run commands concurrently; raise LabError naming the first that failed."""
    procs = []
    for argv, stdin in jobs:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else
                             subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        procs.append((argv, stdin, p))
    errors = []
    for argv, stdin, p in procs:
        _, err = p.communicate(stdin, timeout=30)
        if p.returncode != 0:
            last = (err or "").strip().splitlines()[-1:] or [f"exit {p.returncode}"]
            errors.append(f"{' '.join(argv)}: {last[0]}")
    if errors:
        raise LabError(f"{what} failed: {errors[0]}")


class LabNetwork:
    """A built lab network: its topology, nodes and state. lab.session's Lab is one (with
    up/load/down/status); the layers between (engines, fleet) take a LabNetwork."""

    def __init__(self, topology: Topology, nodes: Sequence[Node], state: dict[str, Any]):
        self.topology = topology
        moved = state.get("moves", {})
        self.nodes: tuple[Node, ...] = tuple(
            replace(n, **moved[n.name]) if n.name in moved else n for n in nodes)
        self._by_name = {n.name: n for n in self.nodes}
        self._state = state

    # --- nodes -----------------------------------------------------------------------------

    @property
    def routers(self) -> tuple[Router, ...]:
        return tuple(n for n in self.nodes if isinstance(n, Router))

    @property
    def devices(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.role == "device")

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self._by_name)
            raise LabUsageError(f"unknown node {name!r} (known: {known})") from None

    def router(self, lan: str, tier: str = "home") -> Router:
        for r in self.routers:
            if r.lan == lan and r.tier == tier:
                return r
        raise LabError(f"LAN {lan!r} has no {tier} router")

    def move(self, device: str, lan: str) -> Node:
        """Unplug a device from its LAN and plug it into another LAN's router with a new
        address (a laptop carried to another site): its namespace, processes and mount
        namespace stay; only its underlay link, address and default route change."""
        n = self.node(device)
        target = self.router(lan)
        if n.role != "device" or n.gateway is None:
            raise LabUsageError(f"{device}: only a device behind a router can move")
        if n.lan == lan:
            raise LabUsageError(f"{device} is already on LAN {lan!r}")
        with _host.state_lock():
            state = self.state_now()
            moves: dict[str, Any] = state.setdefault("moves", {})
            subnet = ipaddress.IPv4Network(target.lan_subnet)
            taken = {x.underlay_ipv4 for x in self.nodes}
            address = next(str(subnet.network_address + h) for h in range(MOVED_FIRST_HOST,
                                                                          subnet.num_addresses - 1)
                           if str(subnet.network_address + h) not in taken)
            port = f"m{len(moves)}"
            with IPRoute(netns=n.netns) as ipr:
                ipr.link("del", index=ipr.link_lookup(ifname=n.iface)[0])
            with IPRoute(netns=target.netns) as ipr:
                ipr.link("add", ifname=port, kind="veth",
                         peer={"ifname": n.iface, "net_ns_fd": n.netns})
                idx = ipr.link_lookup(ifname=port)[0]
                ipr.link("set", index=idx, master=ipr.link_lookup(ifname=target.lan_if)[0])
            write_net_sysctls({target.netns: [f"ipv6/conf/{port}/disable_ipv6"],
                                n.netns: [f"ipv6/conf/{n.iface}/disable_ipv6"]})
            with IPRoute(netns=target.netns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], state="up")
            with IPRoute(netns=n.netns) as ipr:
                idx = ipr.link_lookup(ifname=n.iface)[0]
                ipr.addr("add", index=idx, address=address, prefixlen=subnet.prefixlen)
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=target.lan_ipv4)
            change = {"lan": lan, "underlay_ipv4": address, "prefixlen": subnet.prefixlen,
                      "gateway": target.lan_ipv4}
            moves[device] = change
            _host.write_state(state)
            self._state = state
        moved = replace(n, lan=lan, underlay_ipv4=address, prefixlen=subnet.prefixlen,
                        gateway=target.lan_ipv4)
        self.nodes = tuple(moved if x.name == device else x for x in self.nodes)
        self._by_name[device] = moved
        return moved

    # --- running things in nodes -----------------------------------------------------------

    def command(self, node: str | Node, argv: Sequence[str]) -> list[str]:
        """argv prefixed with nsenter into the node's network (and mount) namespace."""
        n = node if isinstance(node, Node) else self.node(node)
        cmd = ["nsenter", f"--net={n.netns_path}"]
        if n.mountns_path:
            # entering a mount namespace resets root and cwd to the namespace's; keep ours
            cmd += [f"--mount={n.mountns_path}", f"--root={root_of(n.mountns_path)}",
                    f"--wd={os.getcwd()}"]
        return cmd + ["--", "env", *(f"{k}={v}" for k, v in self.node_env(n).items()), *argv]

    def node_env(self, node: str | Node) -> dict[str, str]:
        """What `command` sets in a node: fleetmesh's own commands on PATH; DOCKER_HOST for a
        node with an engine; on the operator the fleet's operator config, release key and fleet
        name, so `fleetmesh release create IMAGE --app A` needs no flags."""
        n = node if isinstance(node, Node) else self.node(node)
        state = self.state_now()
        env = {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
        engine = state.get("engines", {}).get(n.name)
        if engine:
            env["DOCKER_HOST"] = engine["docker_host"]
        fleet = state.get("fleet") if n.role == "operator" else None
        if fleet:
            env |= {"FLEETMESH_URL": fleet["url"], "FLEETMESH_API_KEY": fleet["api_key"],
                    "FLEETMESH_FINGERPRINT": fleet["fingerprint"]}
            env |= fleet.get("operator_env", {})
        return env

    def run(self, node: str | Node, argv: Sequence[str], **kwargs: Any
            ) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("timeout", 120)
        check = kwargs.pop("check", False)
        return subprocess.run(self.command(node, argv), check=check, **kwargs)

    def spawn(self, node: str | Node, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process in a node; its PID goes into the state file so that
        `down` stops it even if the caller dies."""
        p = subprocess.Popen(self.command(node, argv), **kwargs)
        name = node.name if isinstance(node, Node) else node
        with _host.state_lock():
            state = _host.read_state() or self._state
            state.setdefault("processes", []).append(
                {"pid": p.pid, "start": _host.proc_start_time(p.pid), "node": name,
                 "argv": list(argv)}
            )
            _host.write_state(state)
            self._state = state
        return p

    # --- counters and status ---------------------------------------------------------------

    def link_stats(self, node: str | Node, ifname: str) -> dict[str, int]:
        """The kernel's 64-bit counters of an interface inside a node's namespace (LINK_STATS)."""
        n = node if isinstance(node, Node) else self.node(node)
        with IPRoute(netns=n.netns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise LabError(f"{n.name}: no interface {ifname}")
            link = ipr.get_links(idx[0])[0]
        stats = link.get("stats64") or link.get("IFLA_STATS64") or {}
        return {k: int(stats.get(k) or 0) for k in LINK_STATS}

    def link_counters(self, node: str | Node, ifname: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of an interface inside a node's namespace."""
        stats = self.link_stats(node, ifname)
        return stats.get("rx_bytes", 0), stats.get("tx_bytes", 0)

    def wan_counters(self, router: str | Router) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of a router's WAN interface."""
        r = router if isinstance(router, Router) else self.node(router)
        assert isinstance(r, Router), f"{r.name} is not a router"
        return self.link_counters(r, r.wan_if)

    def wan_stats(self, router: str | Router) -> dict[str, int]:
        """All counters of a router's WAN interface (bytes and packets, both ways)."""
        r = router if isinstance(router, Router) else self.node(router)
        assert isinstance(r, Router), f"{r.name} is not a router"
        return self.link_stats(r, r.wan_if)

    def state_now(self) -> dict[str, Any]:
        """The state file as it is now (processes and the fleet are added after `up`)."""
        return _host.read_state() or self._state


# --- build ---------------------------------------------------------------------------------


def initial_state(topo: Topology, nodes: Sequence[Node]) -> dict[str, Any]:
    """The state file's content before the first namespace is created (phase "building"): with
    it written, a crash at any later point leaves `down` everything it needs."""
    return {
        "version": STATE_VERSION,
        "phase": "building",
        "created": time.time(),
        "owner_pid": os.getpid(),
        "source": topo.source,
        "topology": topo.to_dict(),
        "netns": [WAN_NETNS] + [n.netns for n in nodes],
        "holders": {},
        "nodes": [n.to_dict() | {"kind": type(n).__name__} for n in nodes],
        "processes": [],
    }


def build(topo: Topology, nodes: list[Node], links: list[Link], state: dict[str, Any]
          ) -> list[Node]:
    """Create what plan() gave: namespaces, links, routers, shaping, then the mount namespace
    holders, which go into `state` (written). Returns the nodes with their mount namespace
    paths. On failure whatever was made stays: the caller (lab.session) tears the lab down."""
    _build(topo, nodes, links)
    holders = _start_holders(nodes)
    state["holders"] = holders
    state["processes"] += [dict(h, node=name, argv=["mount-namespace holder"])
                           for name, h in holders.items()]
    _host.write_state(state)
    return with_holders(nodes, holders)


def _build(topo: Topology, nodes: list[Node], links: list[Link]) -> None:
    all_ns = [WAN_NETNS] + [n.netns for n in nodes]
    for ns in all_ns:
        netns.create(ns)
    routers = [n for n in nodes if isinstance(n, Router)]
    # Underlay interfaces per namespace: IPv6 goes off on them before they come up, so the
    # WAN byte counters see only what the lab's nodes send (no RS/MLD/DAD chatter).
    underlay: dict[str, list[str]] = {ns: [] for ns in all_ns}
    up_later: list[tuple[str, str]] = []
    ipr: dict[str, IPRoute] = {}
    try:
        for ns in all_ns:
            ipr[ns] = IPRoute(netns=ns)
            ipr[ns].link("set", index=ipr[ns].link_lookup(ifname="lo")[0], state="up")

        def idx(ns: str, ifname: str) -> int:
            found = ipr[ns].link_lookup(ifname=ifname)
            if not found:
                raise LabError(f"{ns}: interface {ifname} missing")
            return int(found[0])

        def addr(ns: str, ifname: str, ip: str, plen: int) -> None:
            ipr[ns].addr("add", index=idx(ns, ifname), address=ip, prefixlen=plen)

        ipr[WAN_NETNS].link("add", ifname=WAN_BRIDGE, kind="bridge")
        underlay[WAN_NETNS].append(WAN_BRIDGE)
        up_later.append((WAN_NETNS, WAN_BRIDGE))
        for r in routers:
            if r.tier == "home":
                ipr[r.netns].link("add", ifname=LAN_BRIDGE, kind="bridge")
                addr(r.netns, LAN_BRIDGE, r.lan_ipv4, ipaddress.IPv4Network(r.lan_subnet).prefixlen)
                underlay[r.netns].append(LAN_BRIDGE)
                up_later.append((r.netns, LAN_BRIDGE))

        for link in links:
            ipr[link.a_ns].link("add", ifname=link.a_if, kind="veth",
                                peer={"ifname": link.b_if, "net_ns_fd": link.b_ns})
            if link.b_master:
                ipr[link.b_ns].link("set", index=idx(link.b_ns, link.b_if),
                                    master=idx(link.b_ns, link.b_master))
            underlay[link.a_ns].append(link.a_if)
            underlay[link.b_ns].append(link.b_if)
            up_later += [(link.a_ns, link.a_if), (link.b_ns, link.b_if)]

        for r in routers:
            if r.tier == "carrier":
                addr(r.netns, LAN_BRIDGE, r.lan_ipv4, ipaddress.IPv4Network(r.lan_subnet).prefixlen)
        for n in nodes:
            addr(n.netns, n.iface, n.underlay_ipv4, n.prefixlen)

        sysctls = {ns: [f"ipv6/conf/{i}/disable_ipv6" for i in ifs] for ns, ifs in underlay.items()}
        for r in routers:
            sysctls[r.netns].append("ipv4/ip_forward")
        write_net_sysctls(sysctls)

        for ns, ifname in up_later:
            ipr[ns].link("set", index=idx(ns, ifname), state="up")
        for n in nodes:
            if n.gateway:
                ipr[n.netns].route("add", dst="0.0.0.0/0", gateway=n.gateway)
            elif isinstance(n, Router):
                # The WAN is one flat segment: a router's default route points straight at it.
                ipr[n.netns].route("add", dst="0.0.0.0/0", oif=idx(n.netns, n.iface), scope=253)
    finally:
        for h in ipr.values():
            h.close()

    jobs: list[tuple[list[str], str | None]] = []
    lans = {lan.name: lan for lan in topo.lans}
    for r in routers:
        lan = lans[r.lan] if r.lan else None
        loss = lan.shaping.loss if (lan is not None and r.tier == "home") else 0.0
        jobs.append((
            _nsenter_net(r.netns) + ["iptables-restore"],
            nat_rules(r, loss),
        ))
    for link in links:
        if not link.shaped or link.lan is None:
            continue
        lan = lans[link.lan]
        if lan.shaping.rate_bps is not None:
            for ns, ifname in ((link.a_ns, link.a_if), (link.b_ns, link.b_if)):
                jobs.append((_nsenter_net(ns) + ["tc", "qdisc", "replace", "dev", ifname, "root",
                                                 *tbf_args(lan.shaping.rate_bps)], None))
        if lan.nat == "none" and lan.shaping.loss > 0:
            jobs.append((_nsenter_net(link.a_ns) + ["iptables-restore"],
                         loss_only_rules(link.a_if, lan.shaping.loss)))

    _run_all(jobs, "configuring routers and shaping")
    # After the NAT rules: conntrack's sysctls appear in a namespace once it is in use there.
    timeouts = {r.netns: [f"netfilter/nf_conntrack_udp_timeout={t}",
                          f"netfilter/nf_conntrack_udp_timeout_stream={t}"]
                for r in routers if r.lan and (t := lans[r.lan].udp_timeout) is not None}
    if timeouts:
        write_net_sysctls(timeouts)


# containerd puts its shims' sockets in /run/containerd/s (a path it does not let us change);
# a private tmpfs there keeps a node engine's sockets off the host's and out of its containerd.
HOLDER_SCRIPT: Final = (
    f"mkdir -p {WG_RUN_DIR} {CONTAINERD_RUN_DIR}"
    f" && mount -t tmpfs -o size=4m,mode=0755 fm-wg {WG_RUN_DIR}"
    f" && mount -t tmpfs -o size=4m,mode=0711 fm-containerd {CONTAINERD_RUN_DIR}"
    " && exec sleep infinity"
)
HOLDER_READY_TIMEOUT: Final = 5.0


def _start_holders(nodes: Sequence[Node]) -> dict[str, dict[str, Any]]:
    """One process per non-router node keeps a private mount namespace (with its own tmpfs on
    /run/wireguard, wireguard-go's socket directory) alive; it sits in the node's network
    namespace, so a crash cleanup finds it there. A holder process rather than a bind-mounted
    namespace file: binding nsfs files fails (EINVAL) inside chroots such as fresh-debian's."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for n in nodes:
        if n.mountns_path:
            procs[n.name] = subprocess.Popen(
                _nsenter_net(n.netns) + ["unshare", "--mount", "--propagation", "private",
                                         "sh", "-c", HOLDER_SCRIPT],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True)
    holders: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + HOLDER_READY_TIMEOUT
    for name, p in procs.items():
        while not _has_mount(p.pid, str(WG_RUN_DIR)):
            if p.poll() is not None or time.monotonic() > deadline:
                err = (p.stderr.read().decode(errors="replace").strip() if p.stderr else "")
                raise LabError(f"{name}: mount namespace holder failed: {err or 'timed out'}")
            time.sleep(0.01)
        holders[name] = {"pid": p.pid, "start": _host.proc_start_time(p.pid)}
    return holders


def _has_mount(pid: int, mountpoint: str) -> bool:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return any(line.split()[4] == mountpoint for line in f)
    except OSError:
        return False
