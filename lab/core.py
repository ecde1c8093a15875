"""Build, inspect and tear down a lab: one network namespace per node, a WAN bridge namespace,
NAT routers (iptables), WAN shaping (tbf + iptables statistic) and private mount namespaces.

Nothing here touches the host's own network: every link, address, route, rule and qdisc lives
inside a namespace named ``fm-*``; the host only gets /run/fleetmesh-lab (the state file) and an
empty /run/wireguard mount point directory. Each non-router node's private mount namespace is
kept alive by a holder process inside the node's network namespace.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

from pyroute2 import IPRoute, NetlinkError, netns

from . import _host
from ._host import (
    CONTAINERD_RUN_DIR,
    NETNS_DIR,
    NETNS_PREFIX,
    STATE_DIR,
    STATE_FILE,
    WG_RUN_DIR,
    LabError,
    LabUsageError,
)
from .topology import Topology, TopologyError, parse_topology

__all__ = [
    "WAN_BRIDGE",
    "WAN_NETNS",
    "Lab",
    "LabAlreadyUp",
    "LabError",
    "LabNotUp",
    "LabUsageError",
    "Node",
    "Router",
    "teardown_all",
]

WAN_NETNS: Final = f"{NETNS_PREFIX}wan"
WAN_BRIDGE: Final = "br0"
LAN_BRIDGE: Final = "lan0"
HOST_IF: Final = "eth0"
WAN_IF: Final = "wan0"
STATE_VERSION: Final = 1
VENV_BIN: Final = os.path.dirname(sys.executable)
MOVED_FIRST_HOST: Final = 100  # moved devices get .100 and up in their new LAN

# tbf: the bucket must hold at least a few full-size (GSO-split) packets, and a deeper queue
# than the classic 50 ms keeps a single TCP flow from sawing below the rate (measured with
# iperf3 at 4mbit: ~3.8 Mbit/s both directions with these values).
TBF_MIN_BURST_BYTES: Final = 16 * 1024
TBF_BURST_SECONDS: Final = 0.01
TBF_LATENCY_MS: Final = 100


class LabAlreadyUp(LabUsageError):
    pass


class LabNotUp(LabError):
    pass


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
class _Link:
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
SUPERVISOR_MODULE: Final = "lab.supervise"  # in the argv of every agent supervisor
TEARDOWN_ROUNDS: Final = 5


def root_of(mountns_path: str) -> str:
    """/proc/PID/ns/mnt -> /proc/PID/root: entering a mount namespace resets the root directory
    to the namespace's, which is wrong inside a chroot; nsenter --root puts it back."""
    return mountns_path.removesuffix("/ns/mnt") + "/root"


def _with_holders(nodes: Sequence[Node], holders: dict[str, Any]) -> list[Node]:
    out: list[Node] = []
    for n in nodes:
        if n.mountns_path and n.mountns_path.startswith(HOLDER_PLACEHOLDER):
            h = holders.get(n.name)
            out.append(replace(n, mountns_path=f"/proc/{h['pid']}/ns/mnt" if h else None))
        else:
            out.append(n)
    return out


def plan(topo: Topology) -> tuple[list[Node], list[_Link]]:
    """The nodes and links a topology makes, in build order. Pure."""
    nodes: list[Node] = []
    links: list[_Link] = []
    wan_plen = topo.wan_subnet.prefixlen
    port = 0

    def wan_port(node: str, ifname: str, shaped: bool = False, lan: str | None = None) -> None:
        nonlocal port
        links.append(_Link(_ns(node), ifname, WAN_NETNS, f"p{port}", WAN_BRIDGE, shaped, lan))
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
            links.append(_Link(_ns(router), WAN_IF, _ns(cgnat), LAN_BRIDGE, None, shaped, lan.name))
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
            links.append(_Link(_ns("operator"), HOST_IF, _ns(router), "op", LAN_BRIDGE, False,
                               lan.name))
        for n in range(1, lan.devices + 1):
            name = lan.device_name(n)
            nodes.append(
                Node(name, "device", lan.name, _ns(name), str(lan.device_ipv4(n)), plen, HOST_IF,
                     gw, _mnt(name))
            )
            links.append(_Link(_ns(name), HOST_IF, _ns(router), f"d{n}", LAN_BRIDGE, False,
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


def _write_net_sysctls(keys: dict[str, list[str]]) -> None:
    """Set /proc/sys/net/<key> = 1 inside each namespace, from a throwaway thread (setns moves
    only the calling thread, and this one dies afterwards, so no other thread ever changes
    namespace)."""
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
                for name in names:
                    with open(f"/proc/sys/net/{name}", "w") as f:
                        f.write("1")
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


class Lab:
    """A running lab. Get one with Lab.up(topology) or Lab.load()."""

    def __init__(self, topology: Topology, nodes: Sequence[Node], state: dict[str, Any]):
        self.topology = topology
        moved = state.get("moves", {})
        self.nodes: tuple[Node, ...] = tuple(
            replace(n, **moved[n.name]) if n.name in moved else n for n in nodes)
        self._by_name = {n.name: n for n in self.nodes}
        self._state = state

    # --- lifecycle -------------------------------------------------------------------------

    @staticmethod
    def is_up() -> bool:
        return STATE_FILE.exists() or bool(_host.lab_netns_names())

    @classmethod
    def up(cls, topology: Topology, *, network_only: bool = True) -> Lab:
        """Build the lab's network and, unless network_only, start the fleet on it (lab.fleet:
        coordinator, enrolled agents, operator access). Raises LabAlreadyUp, LabError (host
        overlap, build or start failure: everything made so far is removed again)."""
        _host.require_root()
        if Lab.is_up():
            raise LabAlreadyUp("a lab is already up (run `fleetmesh-lab down` first)")
        _host.check_host_overlap(topology.subnets())  # before anything is written
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with _host.state_lock():
            if Lab.is_up():  # again, under the lock: someone may have been faster
                raise LabAlreadyUp("a lab is already up (run `fleetmesh-lab down` first)")
            nodes, links = plan(topology)
            state: dict[str, Any] = {
                "version": STATE_VERSION,
                "phase": "building",
                "created": time.time(),
                "owner_pid": os.getpid(),
                "source": topology.source,
                "topology": topology.to_dict(),
                "netns": [WAN_NETNS] + [n.netns for n in nodes],
                "holders": {},
                "nodes": [n.to_dict() | {"kind": type(n).__name__} for n in nodes],
                "processes": [],
            }
            _host.write_state(state)
            try:
                _build(topology, nodes, links)
                holders = _start_holders(nodes)
                state["holders"] = holders
                state["processes"] += [dict(h, node=name, argv=["mount-namespace holder"])
                                       for name, h in holders.items()]
                _host.write_state(state)
                nodes = _with_holders(nodes, holders)
            except BaseException as e:
                try:
                    teardown_all()
                except Exception as cleanup:  # noqa: BLE001 - the build error matters more
                    e.add_note(f"cleanup after the failed build also failed: {cleanup}")
                if isinstance(e, LabError):
                    raise
                if isinstance(e, Exception):
                    raise LabError(f"building the lab failed: {type(e).__name__}: {e}") from e
                raise
            state["phase"] = "up"
            _host.write_state(state)
        lab = cls(topology, nodes, state)
        if not network_only:
            from .fleet import start_fleet  # the fleet builds on the lab, not the other way

            try:
                start_fleet(lab)
            except BaseException:
                teardown_all()
                raise
        return lab

    @classmethod
    def load(cls) -> Lab:
        state = _host.read_state()
        if state is None:
            raise LabNotUp("no lab is up")
        try:
            topo = parse_topology(state["topology"], source=state.get("source"))
        except (KeyError, TypeError, TopologyError) as e:
            raise LabError(
                f"{STATE_FILE}: unreadable state ({e}); run `fleetmesh-lab down`"
            ) from None
        nodes, _ = plan(topo)
        return cls(topo, _with_holders(nodes, state.get("holders", {})), state)

    def down(self) -> None:
        teardown_all()

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
            _write_net_sysctls({target.netns: [f"ipv6/conf/{port}/disable_ipv6"],
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

    def link_counters(self, node: str | Node, ifname: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of an interface inside a node's namespace."""
        n = node if isinstance(node, Node) else self.node(node)
        with IPRoute(netns=n.netns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise LabError(f"{n.name}: no interface {ifname}")
            link = ipr.get_links(idx[0])[0]
        stats = link.get("stats64") or link.get("IFLA_STATS64") or {}
        return int(stats.get("rx_bytes", 0)), int(stats.get("tx_bytes", 0))

    def wan_counters(self, router: str | Router) -> tuple[int, int]:
        r = router if isinstance(router, Router) else self.node(router)
        assert isinstance(r, Router), f"{r.name} is not a router"
        return self.link_counters(r, r.wan_if)

    def status(self) -> dict[str, Any]:
        from .engines import memory_kib
        from .fleet import API_PORT, agent_status  # the fleet builds on the lab

        state = self.state_now()
        fleet = state.get("fleet") if state.get("fleet", {}).get("api_key") else None
        routers = []
        for r in self.routers:
            try:
                rx, tx = self.wan_counters(r)
            except (LabError, OSError, NetlinkError):
                rx = tx = -1  # a namespace vanished under us: show the rest anyway
            routers.append({
                "name": r.name, "lan": r.lan, "netns": r.netns, "nat": r.nat, "tier": r.tier,
                "wan_if": r.wan_if, "wan_ipv4": r.wan_ipv4, "lan_ipv4": r.lan_ipv4,
                "lan_subnet": r.lan_subnet, "wan_rx_bytes": rx, "wan_tx_bytes": tx,
            })
        lans = []
        for lan in self.topology.lans:
            lans.append({
                "name": lan.name, "nat": lan.nat, "subnet": str(lan.subnet),
                "carrier_subnet": str(lan.carrier_subnet) if lan.carrier_subnet else None,
                "devices": lan.devices, "uplink": lan.shaping.rate_text,
                "uplink_bps": lan.shaping.rate_bps, "loss": lan.shaping.loss,
            })
        return {
            "phase": self._state.get("phase", "up"),
            "source": self.topology.source,
            "wan": {"subnet": str(self.topology.wan_subnet), "netns": WAN_NETNS,
                    "bridge": WAN_BRIDGE},
            "lans": lans,
            "nodes": [
                {"name": n.name, "role": n.role, "lan": n.lan, "netns": n.netns,
                 "netns_path": n.netns_path, "mountns": n.mountns_path,
                 "underlay_ipv4": n.underlay_ipv4, "iface": n.iface, "gateway": n.gateway}
                for n in self.nodes
            ],
            "routers": routers,
            "processes": [
                p for p in state.get("processes", [])
                if p.get("start") is not None and _host.proc_start_time(p["pid"]) == p["start"]
            ],
            "engines": [
                {"node": name, "pid": e["pid"], "docker_host": e["docker_host"],
                 "data_root": e["data_root"], "running": running,
                 # dockerd + containerd + shims: what one engine per device costs
                 "memory_kib": memory_kib(e["pid"]) if running else None}
                for name, e in sorted(state.get("engines", {}).items())
                for running in [_host.proc_start_time(e["pid"]) == e["start"]]
            ],
            "agents": [agent_status(self, d.name) for d in self.devices] if fleet else [],
            "dashboard_url": (f"https://{self.topology.coordinator_ipv4}:{API_PORT}/"
                              if fleet else None),
            "operator_key": fleet["api_key"] if fleet else None,
            "host_link": state.get("host_link"),
        }

    def state_now(self) -> dict[str, Any]:
        """The state file as it is now (processes and the fleet are added after `up`)."""
        return _host.read_state() or self._state


# --- build ---------------------------------------------------------------------------------


def _build(topo: Topology, nodes: list[Node], links: list[_Link]) -> None:
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
        _write_net_sysctls(sysctls)

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


# --- teardown ------------------------------------------------------------------------------


def teardown_all() -> list[str]:
    """Remove everything any lab made, with or without a state file (after a crash too).

    Returns the names of the network namespaces removed. Touches only fm-* namespaces, the
    host's fm-lab0 link and its two `fleetmesh-lab` FORWARD rules, the processes inside the lab's
    namespaces or its container cgroups, the lab's cgroups, /run/fleetmesh-lab and
    /var/lib/fleetmesh-lab (the engines' data roots).
    """
    from . import engines, hostlink
    from .supervise import STOP_TIMEOUT

    _host.require_root()
    hostlink.unlink_host()  # first: the host stops reaching into the lab
    state = _host.read_state() or {}
    recorded = [p for p in state.get("processes", []) if isinstance(p.get("pid"), int)
                and p.get("start") is not None and _host.proc_start_time(p["pid"]) == p["start"]]
    # Supervisors first (they stop their agents, which stop their wireguard-go), so that none
    # restarts an agent the sweep below has just stopped.
    supervisors = [p["pid"] for p in recorded if SUPERVISOR_MODULE in p.get("argv", [])]
    if supervisors:
        _host.kill_pids(supervisors, timeout=STOP_TIMEOUT + 2)
    names = _host.lab_netns_names()
    inodes = [i for i in (_host.ns_inode(NETNS_DIR / ns) for ns in names) if i is not None]
    for _ in range(TEARDOWN_ROUNDS):  # a process may start while we kill: look again
        victims = {p["pid"] for p in recorded}
        for ino in inodes:
            victims.update(_host.pids_in_ns("net", ino))
        victims |= engines.cgroup_pids()  # containers with a network namespace of their own
        victims.discard(os.getpid())
        victims = {v for v in victims if _host.proc_start_time(v) is not None}
        if not victims:
            break
        _host.kill_pids(victims)
        recorded = []

    # Mounts a lab of an older layout may have left under the state directory.
    for mp in _host.mounts_under(STATE_DIR):
        _host.umount(mp)
    left = _host.mounts_under(STATE_DIR)
    if left:
        raise LabError(f"could not unmount {left[0]}; not removing {STATE_DIR}")

    for ns in names:
        try:
            netns.remove(ns)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LabError(f"could not remove network namespace {ns}: {e}") from e
    stuck = engines.remove_cgroups()
    if stuck:
        raise LabError(f"could not remove cgroup {stuck[0]}")
    engines.remove_data()
    if STATE_DIR.exists():
        shutil.rmtree(STATE_DIR)
    return names
