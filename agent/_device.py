"""The real WireGuard side of the agent: wireguard-go on an interface in this network namespace,
addressed so that the whole mesh routes into it, and the device's LAN endpoint candidates."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from ipaddress import IPv4Interface, IPv6Interface
from typing import Final

import trio

from mesh.control import MAX_ENDPOINTS, Enrollment
from vpn import UapiBackend, WireGuardGo, configure_link, iproute

from ._agent import stderr_log
from ._link import Log

DEFAULT_IFNAME: Final = "fm0"
DEFAULT_WG_PORT: Final = 51820  # WireGuard's customary port (wg-quick examples, IANA-unassigned)
# Interfaces whose addresses are never LAN candidates: container bridges and veths are local to
# this machine, and a neighbour trying them would only hit its own bridge.
SKIP_IFNAME_PREFIXES: Final = ("docker", "br-", "veth", "virbr", "cni", "flannel")


def mesh_addresses(enrollment: Enrollment) -> list[IPv4Interface | IPv6Interface]:
    """The device's mesh addresses with the mesh's prefix length, so the kernel's prefix route
    sends the whole mesh into the WireGuard interface."""
    out: list[IPv4Interface | IPv6Interface] = []
    for address, prefix in ((enrollment.mesh_ipv4, enrollment.mesh_prefix_v4),
                            (enrollment.mesh_ipv6, enrollment.mesh_prefix_v6)):
        net = ipaddress.ip_network(prefix, strict=False)
        out.append(ipaddress.ip_interface(f"{address}/{net.prefixlen}"))
    return out


class WireGuardGoDevice:
    """`BackendFactory` for `Agent`: starts wireguard-go (in a private mount namespace of its
    own, see vpn, or in `mountns` when given: then `wg` run in that namespace sees it), sets the
    addresses, yields its UAPI backend and stops the daemon by PID on the way out."""

    def __init__(self, ifname: str = DEFAULT_IFNAME, log: Log = stderr_log,
                 mountns: str | None = None) -> None:
        self.ifname = ifname
        self.log = log
        self.mountns = mountns
        self.wireguard: WireGuardGo | None = None

    @asynccontextmanager
    async def __call__(self, enrollment: Enrollment) -> AsyncIterator[UapiBackend]:
        wg = WireGuardGo()
        # start() blocks until the UAPI socket answers (up to 5 s): keep trio responsive.
        await trio.to_thread.run_sync(wg.start, self.ifname, None, self.mountns)
        self.wireguard = wg
        self.log(f"wireguard-go started on {self.ifname} (pid {wg.pid})")
        try:
            addresses = mesh_addresses(enrollment)
            await trio.to_thread.run_sync(configure_link, self.ifname, None, addresses)
            self.log(f"{self.ifname}: {', '.join(str(a) for a in addresses)}")
            yield wg.backend()
        finally:
            wg.stop()  # synchronous on purpose: it must happen even while cancelled
            self.log(f"wireguard-go on {self.ifname} stopped")


def lan_endpoints(port: int, exclude_ifnames: Iterable[str] = (),
                  exclude_networks: Iterable[str] = ()) -> tuple[str, ...]:
    """`a.b.c.d:port` for every non-loopback, non-link-local IPv4 address of this network
    namespace (pyroute2), skipping the given interfaces, container bridges and mesh prefixes."""
    skip = set(exclude_ifnames)
    nets = [ipaddress.ip_network(n, strict=False) for n in exclude_networks]
    out: list[str] = []
    # vpn.iproute: a netlink failure is an OSError, which the caller logs once and goes on
    with iproute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_addr(family=socket.AF_INET):
            name = names.get(msg["index"]) or ""
            if name in skip or name.startswith(SKIP_IFNAME_PREFIXES):
                continue
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not text:
                continue
            ip = ipaddress.IPv4Address(text)
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
                continue
            if any(ip in n for n in nets):
                continue
            out.append(f"{ip}:{port}")
    return tuple(dict.fromkeys(out))[:MAX_ENDPOINTS]
