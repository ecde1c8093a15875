"""WireGuard on lab nodes: a hub on the coordinator node, devices peered with it, and direct
punches between devices using the endpoints the hub observed.

This is the manual form of what the coordinator automates (endpoint discovery from the hub's
view of each handshake, then telling both sides of a pair each other's NAT-mapped endpoint):
the lab tests and the demo use it to show which NAT kinds allow a direct path.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from vpn import (
    DesiredDevice,
    DesiredPeer,
    DeviceConfig,
    Endpoint,
    IPNetwork,
    KeyPair,
    PeerConfig,
    WireGuardGo,
    configure_link,
    generate_keypair,
    reconcile,
)

from .network import LabNetwork, Node

WG_IF: Final = "wg0"
WG_PORT: Final = 51820  # WireGuard's conventional port (wg-quick examples)
MESH_V4: Final = ipaddress.IPv4Network("10.250.0.0/24")
MESH_V6: Final = ipaddress.IPv6Network("fd7a:f1ee:7000::/64")  # ULA (RFC 4193)
KEEPALIVE: Final = 1  # seconds: fast enough for a test to see a punch or its failure quickly
# WireGuard's REKEY_TIMEOUT is 5 s: a punch that has not handshaken after two initiation
# rounds plus slack will not (the NAT state that blocks it persists).
PUNCH_TIMEOUT: Final = 12.0


@dataclass(frozen=True, slots=True)
class MeshMember:
    node: Node
    keys: KeyPair
    mesh_ipv4: ipaddress.IPv4Address
    mesh_ipv6: ipaddress.IPv6Address
    wg: WireGuardGo

    @property
    def host_routes(self) -> tuple[IPNetwork, ...]:
        return (ipaddress.ip_network(f"{self.mesh_ipv4}/32"),
                ipaddress.ip_network(f"{self.mesh_ipv6}/128"))


class WireGuardLab:
    """Hub on `coordinator` plus the given devices, each with a keepalive to the hub."""

    def __init__(self, lab: LabNetwork, devices: list[str]) -> None:
        self.lab = lab
        self.members: dict[str, MeshMember] = {}
        self._device_names = devices

    def __enter__(self) -> Self:
        try:
            for i, name in enumerate(["coordinator", *self._device_names]):
                self._start(name, i + 1)
            self._configure_hub_links()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for m in self.members.values():
            m.wg.stop()
        self.members.clear()

    @property
    def hub(self) -> MeshMember:
        return self.members["coordinator"]

    def _start(self, name: str, host: int) -> None:
        node = self.lab.node(name)
        wg = WireGuardGo().start(WG_IF, netns=node.netns_path, mountns=node.mountns_path)
        member = MeshMember(node, generate_keypair(), MESH_V4.network_address + host,
                            MESH_V6.network_address + host, wg)
        self.members[name] = member
        configure_link(WG_IF, node.netns_path, [
            ipaddress.ip_interface(f"{member.mesh_ipv4}/{MESH_V4.prefixlen}"),
            ipaddress.ip_interface(f"{member.mesh_ipv6}/{MESH_V6.prefixlen}"),
        ])
        reconcile(DesiredDevice(private_key=member.keys.private, listen_port=WG_PORT, peers=()),
                  wg.backend())

    def _configure_hub_links(self) -> None:
        hub = self.hub
        hub_endpoint = Endpoint(ipaddress.IPv4Address(hub.node.underlay_ipv4), WG_PORT)
        reconcile(DesiredDevice(
            private_key=hub.keys.private, listen_port=WG_PORT,
            peers=tuple(DesiredPeer(m.keys.public, allowed_ips=frozenset(m.host_routes))
                        for name, m in self.members.items() if name != "coordinator")),
            hub.wg.backend())
        for name, m in self.members.items():
            if name == "coordinator":
                continue
            reconcile(DesiredDevice(
                private_key=m.keys.private, listen_port=WG_PORT,
                peers=(DesiredPeer(hub.keys.public, endpoint=hub_endpoint,
                                   allowed_ips=frozenset(hub.host_routes),
                                   persistent_keepalive=KEEPALIVE),)),
                m.wg.backend())

    def observed_endpoint(self, device: str, timeout: float = 10.0) -> Endpoint:
        """The device's endpoint as the hub sees it: its NAT-mapped address and port."""
        key = self.members[device].keys.public
        deadline = time.monotonic() + timeout
        while True:
            peer = self.hub.wg.backend().get().peer(key)
            if peer is not None and peer.endpoint is not None and peer.last_handshake:
                return peer.endpoint
            if time.monotonic() > deadline:
                raise TimeoutError(f"{device} made no handshake with the hub in {timeout:.0f} s")
            time.sleep(0.1)

    def punch(self, a: str, b: str, stagger: float = 0.0) -> None:
        """Give each of a and b the other's hub-observed endpoint, allowed IPs and a keepalive
        (a first, then b after `stagger` seconds): a simultaneous open when stagger is 0."""
        ends = {a: self.observed_endpoint(a), b: self.observed_endpoint(b)}
        for me, other in ((a, b), (b, a)):
            peer = self.members[other]
            self.members[me].wg.backend().set(DeviceConfig(peers=(PeerConfig(
                peer.keys.public, endpoint=ends[other], persistent_keepalive=KEEPALIVE,
                replace_allowed_ips=True, allowed_ips=peer.host_routes),)))
            if stagger and me == a:
                time.sleep(stagger)

    def handshake_time(self, a: str, b: str) -> float | None:
        peer = self.members[a].wg.backend().get().peer(self.members[b].keys.public)
        return None if peer is None else peer.last_handshake

    def wait_direct(self, a: str, b: str, timeout: float = PUNCH_TIMEOUT) -> bool:
        """True once a has completed a handshake with b directly (there is no relay here)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.handshake_time(a, b) and self.handshake_time(b, a):
                return True
            time.sleep(0.2)
        return False

    def ping(self, a: str, b: str, version: int = 4, count: int = 1) -> bool:
        target = self.members[b].mesh_ipv4 if version == 4 else self.members[b].mesh_ipv6
        argv = ["ping", "-n", f"-{version}", "-c", str(count), "-W", "2", str(target)]
        result = self.lab.run(a, argv, capture_output=True, text=True, timeout=10 + 3 * count)
        # ping exits 1 when no reply came; anything else (no ping, bad address) is a broken
        # test setup, which must not pass for "unreachable".
        if result.returncode not in (0, 1):
            raise RuntimeError(f"{a}: {' '.join(argv)} failed: {result.stderr.strip()}")
        return result.returncode == 0
