"""Fakes for agent tests: a WireGuard device with UAPI `set` semantics and simulated handshakes,
and a coordinator that long-polls, fails and revokes on demand."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from mesh.control import DeviceReport, Enrollment, HubInfo, PeerEntry, PeerMap
from vpn import (
    DeviceConfig,
    DeviceStatus,
    Endpoint,
    IPNetwork,
    PeerStatus,
    generate_keypair,
    public_key_from_private,
)

REKEY_AFTER_TIME = 120.0  # WireGuard renews a used session this often
HANDSHAKE_RESPONSE = 92  # bytes: what an initiator receives for a handshake (whitepaper 5.4.3)
KEEPALIVE_BYTES = 32  # an empty transport data message (whitepaper 5.4.6)


@dataclass
class _FakePeer:
    endpoint: Endpoint | None = None
    keepalive: int = 0
    allowed: list[IPNetwork] = field(default_factory=list)
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0


class FakeWireGuard:
    """Applies DeviceConfig like wireguard-go's UAPI `set`. With a `clock`, every `get` first
    simulates handshakes: a peer whose endpoint is in `reachable` (and that sends, i.e. has a
    keepalive) completes one when it has none or its session is due for renewal."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock
        self.private_key: str | None = None
        self.listen_port: int | None = None
        self.peers: dict[str, _FakePeer] = {}
        self.reachable: set[str] = set()
        self.sets: list[DeviceConfig] = []
        self.gets = 0
        self.broken: OSError | None = None
        self.nudged: list[str] = []

    # -- set semantics -----------------------------------------------------

    def apply(self, config: DeviceConfig) -> None:
        if config.private_key is not None:
            self.private_key = config.private_key
        if config.listen_port is not None:
            self.listen_port = config.listen_port
        if config.replace_peers:
            self.peers.clear()
        for pc in config.peers:
            if pc.remove:
                self.peers.pop(pc.public_key, None)
                continue
            peer = self.peers.get(pc.public_key)
            if peer is None:
                if pc.update_only:
                    continue
                peer = self.peers[pc.public_key] = _FakePeer()
            if pc.endpoint is not None:
                peer.endpoint = pc.endpoint
            if pc.persistent_keepalive is not None:
                peer.keepalive = pc.persistent_keepalive
            if pc.replace_allowed_ips:
                peer.allowed = []
            for net in pc.allowed_ips:
                for other in self.peers.values():  # an allowed IP belongs to one peer only
                    if net in other.allowed:
                        other.allowed.remove(net)
                peer.allowed.append(net)

    def status(self) -> DeviceStatus:
        return DeviceStatus(
            private_key=self.private_key,
            public_key=public_key_from_private(self.private_key) if self.private_key else None,
            listen_port=self.listen_port,
            peers=tuple(PeerStatus(k, None, p.endpoint, tuple(p.allowed), p.keepalive,
                                   p.last_handshake, p.rx_bytes, p.tx_bytes)
                  for k, p in self.peers.items()))

    def handshake(self, public_key: str, at: float) -> None:
        """A completed handshake: it also brings the response's bytes in."""
        self.peers[public_key].last_handshake = at
        self.peers[public_key].rx_bytes += HANDSHAKE_RESPONSE

    def receive(self, public_key: str, nbytes: int = KEEPALIVE_BYTES) -> None:
        """Bytes from the peer on its own entry, without a handshake (a keepalive, data)."""
        self.peers[public_key].rx_bytes += nbytes

    def send(self, public_key: str, nbytes: int) -> None:
        """Bytes we sent on the peer's own entry (a keepalive, a handshake, data)."""
        self.peers[public_key].tx_bytes += nbytes

    async def nudge(self, addresses: Sequence[str]) -> None:
        """The agent's datagram: a reachable peer answers with its passive keepalive (here at
        once, in WireGuard within KEEPALIVE_TIMEOUT)."""
        await trio.lowlevel.checkpoint()
        self.nudged.extend(addresses)
        for address in addresses:
            net = ipaddress.ip_network(f"{address}/32")
            for p in self.peers.values():
                if net in p.allowed and p.endpoint is not None \
                        and str(p.endpoint) in self.reachable:
                    p.rx_bytes += KEEPALIVE_BYTES

    def simulate(self) -> None:
        if self.clock is None:
            return
        now = self.clock()
        for peer in self.peers.values():
            if peer.endpoint is None or str(peer.endpoint) not in self.reachable:
                continue
            if peer.keepalive and (peer.last_handshake is None
                                   or now - peer.last_handshake >= REKEY_AFTER_TIME):
                peer.last_handshake = now
                peer.rx_bytes += HANDSHAKE_RESPONSE

    # -- backend protocols ---------------------------------------------------

    def get(self) -> DeviceStatus:
        self.gets += 1
        if self.broken is not None:
            raise self.broken
        self.simulate()
        return self.status()

    def set(self, config: DeviceConfig) -> None:
        if self.broken is not None:
            raise self.broken
        self.sets.append(config)
        self.apply(config)

    async def aget(self) -> DeviceStatus:
        await trio.lowlevel.checkpoint()
        return self.get()

    async def aset(self, config: DeviceConfig) -> None:
        await trio.lowlevel.checkpoint()
        self.set(config)

    def factory(self) -> Callable[[Enrollment], Any]:
        @asynccontextmanager
        async def make(enrollment: Enrollment) -> AsyncIterator[FakeWireGuard]:
            self.started_with = enrollment
            self.running = True
            try:
                yield self
            finally:
                self.running = False
        return make


# --------------------------------------------------------------------------- coordinator


class FakeApiError(Exception):
    def __init__(self, status: int, message: str, *, revoked: bool = False) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.revoked = revoked  # the coordinator's explicit {"revoked": true} on a 401


class FakeUnreachable(Exception):
    pass


class FakeCoordinator:
    """Serves one device. `down` makes every call fail as unreachable; `down_urls` only some."""

    def __init__(self, peermap: PeerMap | None = None) -> None:
        self.peermap = peermap
        self.changed = trio.Event()
        self.down = False
        self.down_urls: set[str] = set()
        self.revoked = False  # 401 saying "revoked" (the operator revoked the device)
        self.unknown_credential = False  # 401 without it (e.g. replaced by an enrollment)
        # URLs that take requests and never answer nor close (a coordinator that vanished)
        self.silent_urls: set[str] = set()
        self.polls: list[tuple[str, int]] = []
        self.poll_waits: list[tuple[str, float]] = []  # (url, wait) of each long poll
        self.held: list[PeerMap | None] = []  # the map each long poll said it holds
        self.reports: list[tuple[str, DeviceReport]] = []
        self.punches: list[str] = []  # peers this device asked to punch to it
        self.clients: list[FakeClient] = []

    def publish(self, peermap: PeerMap) -> None:
        self.peermap = peermap
        self.changed.set()
        self.changed = trio.Event()

    def factory(self, url: str, credential: str, cert_der: bytes) -> FakeClient:
        client = FakeClient(self, url, credential, cert_der)
        self.clients.append(client)
        return client


class FakeClient:
    def __init__(self, coord: FakeCoordinator, url: str, credential: str, cert: bytes) -> None:
        self.coord, self.url, self.credential, self.cert = coord, url, credential, cert
        self.closed = False

    async def _gate(self) -> None:
        await trio.sleep(0.01)
        if self.url in self.coord.silent_urls:
            await trio.sleep_forever()
        if self.coord.down or self.url in self.coord.down_urls:
            raise FakeUnreachable(f"cannot reach the coordinator at {self.url}")
        if self.coord.revoked:
            raise FakeApiError(401, "device revoked by the operator", revoked=True)
        if self.coord.unknown_credential:
            raise FakeApiError(401, "unknown device credential")

    async def peermap(self, version: int, wait: float, hold: float = 0.0,
                      quiet: bool = False, held: PeerMap | None = None) -> PeerMap | None:
        self.coord.polls.append((self.url, version))
        self.coord.held.append(held)
        self.coord.poll_waits.append((self.url, wait))
        await self._gate()
        c = self.coord
        if c.peermap is not None and c.peermap.version != version:
            return c.peermap
        with trio.move_on_after(wait):
            await c.changed.wait()
            return c.peermap
        return None

    async def report(self, report: DeviceReport) -> None:
        await self._gate()
        self.coord.reports.append((self.url, report))

    async def punch(self, peer: str) -> None:
        await self._gate()
        self.coord.punches.append(peer)

    async def aclose(self) -> None:
        self.closed = True


# --------------------------------------------------------------------------- builders

HUB_KEYS = generate_keypair()
HUB = HubInfo(HUB_KEYS.public, "198.51.100.1:51820", "10.250.0.1", "fd7a:f1ee::1",
              "https://10.250.0.1:8443")


def peer(i: int, *endpoints: str, key: str | None = None) -> PeerEntry:
    return PeerEntry(f"home-{i}", key or KEYS[i].public, f"10.250.0.{10 + i}",
                     f"fd7a:f1ee::{10 + i:x}", tuple(endpoints))


KEYS = [generate_keypair() for _ in range(12)]


def peermap(version: int, *peers: PeerEntry, relay_ips: tuple[str, ...] = ()) -> PeerMap:
    return PeerMap(version, HUB, tuple(peers), relay_ips)


def enrollment(name: str = "home-0", public_key: str = "") -> Enrollment:
    return Enrollment("dev-1", name, "cams", "fmd_secret", "10.250.0.2", "fd7a:f1ee::2",
                      "10.250.0.0/16", "fd7a:f1ee::/64", HUB)


def host(address: str) -> IPNetwork:
    ip = ipaddress.ip_address(address)
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
