"""What the relay hub forwards, and the host settings it needs: an nftables table of the
project's own (`inet fleetmesh_hub`) and the forwarding sysctls, both undone on stop.

The hub is a router: with forwarding on and no rules, any device could reach every operator
workstation, every device of every other fleet, the coordinator host's other services and the
networks behind it. The table lets through, for traffic that enters or leaves the hub interface:

- forward, hub to hub: replies of allowed connections (conntrack); operator workstations to any
  device; a device to a device of its own fleet (one verdict map from source address to a chain
  per fleet, each holding that fleet's addresses: rules grow with fleets, not with pairs). A
  fleet with a reachability policy (docs/policy.md) gets instead, in its chain, fleetmesh's own
  port (mesh.policy MESH_PORTS: gossip and blobs) to any device of the fleet, and per rule edge
  two address sets (its sources, its destinations) and one rule per protocol of its ports:
  rules grow with the policy's rules, sets with its devices, never with pairs;
- input on the hub interface: the coordinator's API port on the hub's own addresses
  (`HubInfo.api_url` points there) and ICMP echo to them;
- everything else that enters or leaves the hub interface is counted and dropped. Traffic that
  touches neither (Docker, other routing on the host) is left alone: the chains accept it.

`ruleset` is pure (text in, text out) so it is tested without a kernel; `HostFilter` applies it
(`nft -f -`, one atomic transaction that replaces the whole table) and restores the host.

Forwarding: `net.ipv4.ip_forward` and `net.ipv6.conf.all.forwarding` are switched on, with
their previous values remembered and put back on stop. Turning IPv6 forwarding on makes every
interface stop accepting router advertisements unless its `accept_ra` is 2, which would silently
take a host's IPv6 default route away; interfaces with `accept_ra = 1` are set to 2 first (and
restored).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mesh.policy import MESH_PORTS, Ports, nft_matches
from vpn import NftError, nft_accept, nft_set, run_nft

log = logging.getLogger("fleetmesh.coordinator.hub")

TABLE: Final = "fleetmesh_hub"
IPV4_FORWARD: Final = Path("/proc/sys/net/ipv4/ip_forward")
IPV6_CONF: Final = Path("/proc/sys/net/ipv6/conf")


@dataclass(frozen=True, slots=True)
class FilterPeer:
    """A hub peer as the filter sees it: `fleet` None is an operator workstation."""

    mesh_ipv4: str
    mesh_ipv6: str
    fleet: str | None
    # with a fleet policy: the rule-edge sides the device is on ("3s": a source of edge 3,
    # "3d": a destination; PeerMapCore.filter_rules)
    sides: frozenset[str] = frozenset()


FilterError = NftError  # nft could not apply (or remove) the table: one line




def _policy_chain(fleet: str, i: int, members: list[FilterPeer], rules: list[Ports]
                  ) -> list[str]:
    """Fleet i's sets and chain under its policy (see the module docstring)."""
    mesh = Ports(MESH_PORTS)
    lines: list[str] = []
    body = [nft_accept(f"ip daddr @fleet{i}_4", m) for m in nft_matches(mesh, "4")]
    body += [nft_accept(f"ip6 daddr @fleet{i}_6", m) for m in nft_matches(mesh, "6")]
    for k, ports in enumerate(rules):
        for side in ("s", "d"):
            on = [p for p in members if f"{k}{side}" in p.sides]
            lines += [nft_set(f"f{i}e{k}{side}4", "ipv4_addr", (p.mesh_ipv4 for p in on)),
                      nft_set(f"f{i}e{k}{side}6", "ipv6_addr", (p.mesh_ipv6 for p in on))]
        body += [nft_accept(f"ip saddr @f{i}e{k}s4 ip daddr @f{i}e{k}d4", m)
                 for m in nft_matches(ports, "4")]
        body += [nft_accept(f"ip6 saddr @f{i}e{k}s6 ip6 daddr @f{i}e{k}d6", m)
                 for m in nft_matches(ports, "6")]
    return lines + [f"  chain fleet{i} {{", f"    comment \"fleet {_comment(fleet)} (policy)\""] \
        + body + ["  }"]


def ruleset(ifname: str, hub_ipv4: str, hub_ipv6: str, api_port: int,
            peers: Iterable[FilterPeer], policies: Mapping[str, list[Ports]] | None = None
            ) -> str:
    """The whole `inet fleetmesh_hub` table for these peers, as an nft script that replaces an
    earlier one atomically. `policies`: per fleet with a reachability policy, the ports of each
    rule edge (PeerMapCore.filter_rules); other fleets reach themselves on any port."""
    hub4, hub6 = ipaddress.IPv4Address(hub_ipv4), ipaddress.IPv6Address(hub_ipv6)
    if not (0 < api_port < 65536):
        raise ValueError(f"api port {api_port} out of range")
    if not ifname.replace("-", "").replace("_", "").isalnum() or not ifname.isascii():
        raise ValueError(f"bad interface name {ifname!r}")
    peer_list = list(peers)
    fleets = sorted({p.fleet for p in peer_list if p.fleet is not None})
    index = {fleet: i for i, fleet in enumerate(fleets)}
    devices = [p for p in peer_list if p.fleet is not None]
    operators = [p for p in peer_list if p.fleet is None]
    q = f'"{ifname}"'
    lines = [f"table inet {TABLE} {{",
             nft_set("operators4", "ipv4_addr", (p.mesh_ipv4 for p in operators)),
             nft_set("operators6", "ipv6_addr", (p.mesh_ipv6 for p in operators)),
             nft_set("devices4", "ipv4_addr", (p.mesh_ipv4 for p in devices)),
             nft_set("devices6", "ipv6_addr", (p.mesh_ipv6 for p in devices))]
    for fleet, i in index.items():
        members = [p for p in devices if p.fleet == fleet]
        lines += [nft_set(f"fleet{i}_4", "ipv4_addr", (p.mesh_ipv4 for p in members)),
                  nft_set(f"fleet{i}_6", "ipv6_addr", (p.mesh_ipv6 for p in members))]
    for family, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
        entries = sorted(((p.mesh_ipv4 if family == "4" else p.mesh_ipv6), index[p.fleet])
                         for p in devices if p.fleet is not None)
        body = ", ".join(f"{addr} : jump fleet{i}" for addr, i in entries)
        lines.append(f"  map source_fleet{family} {{ type {kind} : verdict; "
                     + (f"elements = {{ {body} }}" if body else "") + " }")
    policies = policies or {}
    for fleet, i in index.items():
        if fleet in policies:
            members = [p for p in devices if p.fleet == fleet]
            lines += _policy_chain(fleet, i, members, policies[fleet])
            continue
        lines += [f"  chain fleet{i} {{",
                  f"    comment \"fleet {_comment(fleet)}\"",
                  f"    ip daddr @fleet{i}_4 accept",
                  f"    ip6 daddr @fleet{i}_6 accept",
                  "  }"]
    lines += ["  chain forward {",
              "    type filter hook forward priority filter; policy accept;",
              f"    iifname != {q} oifname != {q} accept",
              f"    iifname {q} oifname {q} ct state established,related accept",
              f"    iifname {q} oifname {q} ip saddr @operators4 ip daddr @devices4 accept",
              f"    iifname {q} oifname {q} ip6 saddr @operators6 ip6 daddr @devices6 accept",
              f"    iifname {q} oifname {q} ip saddr vmap @source_fleet4",
              f"    iifname {q} oifname {q} ip6 saddr vmap @source_fleet6",
              "    counter drop",
              "  }",
              "  chain input {",
              "    type filter hook input priority filter; policy accept;",
              f"    iifname != {q} accept",
              "    ct state established,related accept",
              f"    ip daddr {hub4} tcp dport {api_port} accept",
              f"    ip6 daddr {hub6} tcp dport {api_port} accept",
              f"    ip daddr {hub4} icmp type echo-request accept",
              f"    ip6 daddr {hub6} icmpv6 type echo-request accept",
              "    counter drop",
              "  }",
              "}"]
    head = f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
    return head + "\n".join(line for line in lines) + "\n"


def _comment(fleet: str) -> str:
    # fleet names are DNS labels (mesh.names); keep the comment safe whatever comes in
    return "".join(c for c in fleet if c.isascii() and (c.isalnum() or c in "-_."))[:64]


class HostFilter:
    """The hub's host-side state: forwarding on (previous values kept) and the table. `start`
    and `stop` are synchronous (run them in a worker thread); `stop` undoes whatever `start`
    and `update` did, also after a partial start."""

    def __init__(self, ifname: str, hub_ipv4: str, hub_ipv6: str, api_port: int) -> None:
        self.ifname = ifname
        self.hub_ipv4, self.hub_ipv6 = hub_ipv4, hub_ipv6
        self.api_port = api_port
        self._saved: dict[Path, str] = {}
        self._applied: str | None = None
        self._table = False

    def start(self, peers: Iterable[FilterPeer],
              policies: Mapping[str, list[Ports]] | None = None) -> None:
        # the table first: forwarding is never on without it
        self.update(peers, policies)
        for conf in sorted(IPV6_CONF.iterdir()) if IPV6_CONF.is_dir() else []:
            accept_ra = conf / "accept_ra"
            if conf.name not in ("all", "default") and accept_ra.exists() \
                    and accept_ra.read_text().strip() == "1":
                self._write(accept_ra, "2")
        self._write(IPV4_FORWARD, "1")
        if (IPV6_CONF / "all" / "forwarding").exists():
            self._write(IPV6_CONF / "all" / "forwarding", "1")

    def update(self, peers: Iterable[FilterPeer],
               policies: Mapping[str, list[Ports]] | None = None) -> None:
        script = ruleset(self.ifname, self.hub_ipv4, self.hub_ipv6, self.api_port, peers,
                         policies)
        if script == self._applied:
            return
        run_nft(script)  # one transaction: all of it or, on error, nothing
        self._table = True
        self._applied = script

    def stop(self) -> None:
        for path, value in reversed(list(self._saved.items())):
            try:
                path.write_text(value + "\n")
            except OSError as exc:
                log.warning("cannot restore %s to %s: %s", path, value, exc)
        self._saved.clear()
        if self._table:
            try:
                run_nft(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")
            except FilterError as exc:
                log.warning("cannot remove the hub's nftables table: %s", exc)
            self._table = False
            self._applied = None

    def _write(self, path: Path, value: str) -> None:
        old = path.read_text().strip()
        if old != value:
            self._saved.setdefault(path, old)
            path.write_text(value + "\n")


__all__ = ["TABLE", "FilterError", "FilterPeer", "HostFilter", "ruleset"]
