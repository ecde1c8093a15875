"""The relay hub: the coordinator's own WireGuard interface (wireguard-go, `fmhub0`) in the
coordinator process's network namespace.

Every active device and every operator workstation is a hub peer whose allowed IPs are its mesh
/32 and /128; with forwarding on, packets that arrive on the tunnel for another mesh address
leave on it again, to that peer (device<->device relay within a fleet, operator->device), and
nothing else: coordinator/_hubfilter.py's nftables table drops what a device sends to another
fleet, to the coordinator host's other services or to the networks behind it. Desired peers go
through `vpn.areconcile` (get, pure diff, one set), so a sync is idempotent. The watcher reads
the UAPI `get` once a second: the endpoint each handshake came from is the device's NAT-mapped
endpoint, the handshake time makes it online.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import trio

from mesh.policy import Ports
from vpn import (
    DesiredDevice,
    DesiredPeer,
    DeviceStatus,
    UapiBackend,
    WireGuardGo,
    areconcile,
    configure_link,
)

from ._hubfilter import FilterPeer, HostFilter

log = logging.getLogger("fleetmesh.coordinator.hub")

IFNAME: Final = "fmhub0"
UAPI_TIMEOUT: Final = 5.0
SYNC_INTERVAL: Final = 10.0  # re-converge even if nobody asked (a peer removed by hand, ...)


@dataclass(frozen=True, slots=True)
class HubPeer:
    public_key: str
    mesh_ipv4: str
    mesh_ipv6: str
    fleet: str | None  # None: an operator workstation (may reach every device)
    sides: frozenset[str] = frozenset()  # its fleet policy's rule-edge sides (FilterPeer)


@dataclass(frozen=True, slots=True)
class Observation:
    public_key: str
    endpoint: str | None
    last_handshake: float | None
    rx_bytes: int = 0


def desired_device(private_key: str, listen_port: int, peers: Iterable[HubPeer]
                   ) -> DesiredDevice:
    return DesiredDevice(private_key, listen_port=listen_port, peers=tuple(
        DesiredPeer(p.public_key, allowed_ips=frozenset({
            ipaddress.ip_network(f"{p.mesh_ipv4}/32"),
            ipaddress.ip_network(f"{p.mesh_ipv6}/128")}))
        for p in peers))


def observations(status: DeviceStatus) -> list[Observation]:
    return [Observation(p.public_key, str(p.endpoint) if p.endpoint else None, p.last_handshake,
                        p.rx_bytes) for p in status.peers]


def filter_peers(peers: Iterable[HubPeer]) -> list[FilterPeer]:
    return [FilterPeer(p.mesh_ipv4, p.mesh_ipv6, p.fleet, p.sides) for p in peers]


class Hub:
    """Owns the wireguard-go child. `run` (for `nursery.start`) brings it up, then reconciles
    on demand and watches handshakes until cancelled; the child is stopped by PID on the way
    out, whatever happened."""

    def __init__(self, private_key: str, listen_port: int, addresses: list[str],
                 peers: Callable[[], list[HubPeer]],
                 observe: Callable[[list[Observation]], None],
                 poll_interval: float = 1.0, *, api_port: int,
                 policies: Callable[[], dict[str, list[Ports]]] | None = None) -> None:
        self.private_key = private_key
        self.listen_port = listen_port
        self.addresses = [ipaddress.ip_interface(a) for a in addresses]
        self._peers = peers
        # per fleet with a policy, its rule edges' ports (read right after `peers`, which
        # carries the sides: no await between, so the two agree)
        self._policies = policies or dict
        self._observe = observe
        self.poll_interval = poll_interval
        self.wg: WireGuardGo | None = None
        self._backend: UapiBackend | None = None
        self._lock = trio.Lock()
        self._wanted = trio.Event()
        hub4 = next(str(a.ip) for a in self.addresses if a.version == 4)
        hub6 = next(str(a.ip) for a in self.addresses if a.version == 6)
        self._filter = HostFilter(IFNAME, hub4, hub6, api_port)

    async def sync(self) -> None:
        """Make the hub's peers exactly the desired ones, now (revocation calls this)."""
        if self._backend is None:
            return
        async with self._lock:
            peers, policies = self._peers(), self._policies()
            with trio.fail_after(UAPI_TIMEOUT):
                await areconcile(desired_device(self.private_key, self.listen_port, peers),
                                 self._backend)
            # a revoked peer is gone from the tunnel already; its addresses leave the filter
            # (and a new device's join it) right after
            await trio.to_thread.run_sync(self._filter.update, filter_peers(peers), policies)

    def request_sync(self) -> None:
        self._wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        wg = WireGuardGo()
        try:
            await trio.to_thread.run_sync(wg.start, IFNAME)
            self.wg = wg
            self._backend = wg.backend()
            await trio.to_thread.run_sync(configure_link, IFNAME, None, self.addresses)
            peers, policies = self._peers(), self._policies()
            await trio.to_thread.run_sync(self._filter.start, filter_peers(peers), policies)
            await self.sync()
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sync_loop)
                nursery.start_soon(self._watch_loop)
        finally:
            self._backend = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._filter.stop)
                await trio.to_thread.run_sync(wg.stop)

    async def _sync_loop(self) -> None:
        while True:
            with trio.move_on_after(SYNC_INTERVAL):
                await self._wanted.wait()
            self._wanted = trio.Event()
            try:
                await self.sync()
            except (OSError, ValueError, trio.TooSlowError) as exc:  # FilterError is an OSError
                log.warning("hub sync failed (retrying): %s", exc)

    async def _watch_loop(self) -> None:
        assert self._backend is not None
        while True:
            try:
                with trio.fail_after(UAPI_TIMEOUT):
                    status = await self._backend.aget()
                self._observe(observations(status))
            except (OSError, ValueError, trio.TooSlowError) as exc:
                log.warning("hub get failed: %s", exc)
            await trio.sleep(self.poll_interval)
