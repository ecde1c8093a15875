"""The device's own firewall on the mesh interface (docs/policy.md, "Enforcement"): an nftables
table of the agent's, `inet fleetmesh_dev`, that accepts on the mesh interface only what the
peer map allows, and drops the rest. Traffic on other interfaces is left alone.

What it accepts, entering the mesh interface:

- replies of connections (conntrack established/related);
- anything from the hub and from operator workstations (`relay_ips`: they reach every device,
  docs/policy.md "The default");
- fleetmesh's own port (gossip and blobs: this agent's `--gossip-port`, mesh.policy MESH_PORTS
  by default) from any peer in the map;
- from each peer, what its entry's `accept` says. Peers are grouped by their `accept`: one
  address set per distinct port set, one rule per protocol of it (rules grow with the distinct
  port sets, never with peers).

A map whose entries carry no ports (a fleet without a policy: the transition rule) installs no
table, and removes one installed earlier. `ruleset` is pure (text in, text out); `DeviceFilter`
applies it with `nft -f -` (one atomic transaction that replaces the whole table) when it
changes, and deletes the table on `stop`.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from mesh.control import PeerMap
from mesh.policy import ANY, MESH_PORTS, Ports, nft_matches
from vpn import NftError, nft_accept, nft_set, run_nft

TABLE: Final = "fleetmesh_dev"
DEFAULT_MESH: Final = Ports(MESH_PORTS)  # the default --gossip-port


DeviceFilterError = NftError  # nft could not apply (or remove) the table: one line




def ruleset(ifname: str, peermap: PeerMap, mesh: Ports = DEFAULT_MESH) -> str | None:
    """The `inet fleetmesh_dev` table for this map as an nft script that replaces an earlier one
    atomically; None when the map carries no ports (no policy: no table). `mesh`: the ports
    of fleetmesh's own traffic, open to every peer in the map."""
    if not ifname.replace("-", "").replace("_", "").isalnum() or not ifname.isascii() \
            or len(ifname) > 15:
        raise ValueError(f"bad interface name {ifname!r}")
    if not any(p.accept is not None for p in peermap.peers):
        return None
    trusted = [peermap.hub.mesh_ipv4, peermap.hub.mesh_ipv6, *peermap.relay_ips]
    trusted4 = [a for a in trusted if ipaddress.ip_network(a, strict=False).version == 4]
    trusted6 = [a for a in trusted if ipaddress.ip_network(a, strict=False).version == 6]
    groups: dict[Ports, list[tuple[str, str]]] = {}
    for p in peermap.peers:
        ports = ANY if p.accept is None else p.accept
        groups.setdefault(ports, []).append((p.mesh_ipv4, p.mesh_ipv6))
    q = f'"{ifname}"'
    lines = [f"table inet {TABLE} {{",
             nft_set("trusted4", "ipv4_addr", trusted4, interval=True),
             nft_set("trusted6", "ipv6_addr", trusted6, interval=True),
             nft_set("peers4", "ipv4_addr", (p.mesh_ipv4 for p in peermap.peers)),
             nft_set("peers6", "ipv6_addr", (p.mesh_ipv6 for p in peermap.peers))]
    body = ["    type filter hook input priority filter; policy accept;",
            f"    iifname != {q} accept",
            "    ct state established,related accept",
            "    ip saddr @trusted4 accept",
            "    ip6 saddr @trusted6 accept"]
    body += [nft_accept("ip saddr @peers4", m) for m in nft_matches(mesh, "4")]
    body += [nft_accept("ip6 saddr @peers6", m) for m in nft_matches(mesh, "6")]
    for k, (ports, members) in enumerate(sorted(groups.items(), key=lambda g: g[0].text())):
        if not ports.ranges:
            continue  # nothing beyond our own port: the drop below
        lines += [nft_set(f"accept{k}_4", "ipv4_addr", (a for a, _ in members)),
                  nft_set(f"accept{k}_6", "ipv6_addr", (b for _, b in members))]
        body += [nft_accept(f"ip saddr @accept{k}_4", m) for m in nft_matches(ports, "4")]
        body += [nft_accept(f"ip6 saddr @accept{k}_6", m) for m in nft_matches(ports, "6")]
    lines += ["  chain input {", *body, "    counter drop", "  }", "}"]
    return f"add table inet {TABLE}\ndelete table inet {TABLE}\n" + "\n".join(lines) + "\n"


class DeviceFilter:
    """The table on this host. `apply` and `stop` are synchronous (run them in a worker
    thread); `apply` does nothing when the script did not change."""

    def __init__(self, ifname: str, gossip_port: int | None = None) -> None:
        self.ifname = ifname
        self.mesh = DEFAULT_MESH if gossip_port is None else \
            Ports((("tcp", gossip_port, gossip_port),))
        self._applied: str | None = None

    @property
    def installed(self) -> bool:
        return self._applied is not None

    def apply(self, peermap: PeerMap) -> None:
        script = ruleset(self.ifname, peermap, self.mesh)
        if script is None:
            self.stop()
            return
        if script == self._applied:
            return
        run_nft(script)  # one transaction: all of it or, on error, nothing
        self._applied = script

    def stop(self) -> None:
        if self._applied is not None:
            run_nft(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")
            self._applied = None


__all__ = ["TABLE", "DeviceFilter", "DeviceFilterError", "ruleset"]
