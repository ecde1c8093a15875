"""Path selection for every mesh peer: punched direct, still trying, or relayed through the hub.

A protocol core (DESIGN principle 1): no I/O, time passed in. `PathSelector.update(peermap,
status, now)` takes the current peer map, the WireGuard device's state and the time (epoch
seconds, the clock WireGuard's `last_handshake` uses) and gives back the `DesiredDevice` for
`vpn.diff`, every peer's `PeerPath` for the report, and the path changes worth one log line.

Per peer:

- `trying`: the peer entry holds the peer's mesh /32 and /128 and points at endpoint candidate
  `i` with a short keepalive, so the punch (simultaneous open) starts at once. A handshake newer
  than the start of the attempt means the direct path works -> `direct`. None within
  DIRECT_TIMEOUT -> the next candidate; after the last one -> `relay`.
- `direct`: the entry holds the mesh addresses; endpoint "don't care" so WireGuard's roaming
  keeps working. A last handshake older than REJECT_AFTER_TIME (the session is dead) -> `trying`.
- `relay`: the mesh addresses belong to the hub peer; the peer's own entry stays as a probe with
  no allowed IPs, an endpoint and a keepalive (it still handshakes, DESIGN "Relay and direct
  probing"), cycling the candidates every RELAY_PROBE_DWELL. A handshake newer than the start of
  the attempt -> `direct`.

A peer whose endpoints change in the map starts `trying` again; a peer without endpoints is
relayed (its entry can still answer the peer's own punches); peers gone from the map are dropped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from mesh.control import HubInfo, PeerEntry, PeerMap, PeerPath
from vpn import (
    DesiredDevice,
    DesiredPeer,
    DeviceStatus,
    Endpoint,
    IPNetwork,
    public_key_from_private,
)

# wg(8) and Tailscale use 25 s: under the 30 s UDP mapping timeout of most NATs and firewalls.
KEEPALIVE: Final = 25
# While trying a candidate: keep the NAT mapping and the handshake initiations going at once.
# WireGuard itself rate-limits initiations to one per REKEY_TIMEOUT, so 1 s costs nothing more.
PUNCH_KEEPALIVE: Final = 1
# WireGuard whitepaper section 6.4: REKEY_TIMEOUT = 5 s between handshake initiations (plus up
# to 1/3 s of jitter); one retransmission plus a round trip of slack decides a candidate.
DIRECT_TIMEOUT: Final = 6.0
# Whitepaper section 6.1: REJECT_AFTER_TIME = 180 s; no session older than that carries data.
# With a 25 s keepalive a live session is renewed every REKEY_AFTER_TIME (120 s).
REJECT_AFTER_TIME: Final = 180.0
# While relayed, each candidate is probed this long: more than one KEEPALIVE, so every candidate
# gets at least one keepalive-driven handshake initiation.
RELAY_PROBE_DWELL: Final = 30.0

PathState = Literal["trying", "direct", "relay"]


@dataclass(frozen=True, slots=True)
class PathChange:
    """One peer's path changed: worth one log line."""

    name: str
    public_key: str
    state: PathState | Literal["removed"]
    endpoint: str | None = None
    reason: str = ""

    def __str__(self) -> str:
        tail = f" ({self.reason})" if self.reason else ""
        if self.state == "direct":
            return f"peer {self.name}: direct via {self.endpoint or 'unknown endpoint'}{tail}"
        if self.state == "trying":
            return f"peer {self.name}: trying {self.endpoint}{tail}"
        if self.state == "relay":
            return f"peer {self.name}: relay via hub{tail}"
        return f"peer {self.name}: removed from the peer map"


@dataclass(frozen=True, slots=True)
class PathPlan:
    desired: DesiredDevice
    paths: tuple[PeerPath, ...]
    changes: tuple[PathChange, ...]
    next_deadline: float | None  # the next time a timer fires without new input; None: none


@dataclass(slots=True)
class _Peer:
    name: str
    endpoints: tuple[str, ...]
    state: PathState
    candidate: int  # index into endpoints (trying, and the relay probe)
    since: float  # when the current candidate (or state) began
    attempt_start: float  # a handshake newer than this proves the direct path


def _host_net(address: str) -> IPNetwork:
    ip = ipaddress.ip_address(address)
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")


def _endpoint(text: str | None) -> Endpoint | None:
    if text is None:
        return None
    try:
        return Endpoint.parse(text)
    except ValueError:
        return None


class PathSelector:
    """Per-peer path state; see the module docstring for the rules."""

    def __init__(self, private_key: str, hub: HubInfo, listen_port: int | None = None) -> None:
        self.private_key = private_key
        self.public_key = public_key_from_private(private_key)
        self.listen_port = listen_port
        self.hub = hub  # used until a peer map arrives
        self._peers: dict[str, _Peer] = {}

    def state(self, public_key: str) -> _Peer | None:
        return self._peers.get(public_key)

    # -- transitions -------------------------------------------------------

    def _start(self, entry: PeerEntry, now: float, reason: str) -> tuple[_Peer, PathChange]:
        if not entry.endpoints:
            st = _Peer(entry.name, entry.endpoints, "relay", 0, now, now)
            return st, PathChange(entry.name, entry.public_key, "relay", None,
                                  f"{reason}; no endpoints known")
        st = _Peer(entry.name, entry.endpoints, "trying", 0, now, now)
        return st, self._trying_change(entry, st, reason)

    @staticmethod
    def _trying_change(entry: PeerEntry, st: _Peer, reason: str) -> PathChange:
        n = len(st.endpoints)
        return PathChange(entry.name, entry.public_key, "trying", st.endpoints[st.candidate],
                          f"{reason}; candidate {st.candidate + 1}/{n}")

    def _step(self, entry: PeerEntry, status: DeviceStatus, now: float) -> list[PathChange]:
        key = entry.public_key
        peer_status = status.peer(key)
        handshake = peer_status.last_handshake if peer_status else None
        actual_ep = str(peer_status.endpoint) if peer_status and peer_status.endpoint else None
        st = self._peers.get(key)
        if st is None:
            # First sight (e.g. an agent restart): a live session already proves the direct path.
            if handshake is not None and now - handshake < REJECT_AFTER_TIME and entry.endpoints:
                self._peers[key] = _Peer(entry.name, entry.endpoints, "direct", 0, now, now)
                return [PathChange(entry.name, key, "direct", actual_ep, "session already up")]
            st, change = self._start(entry, now, "new peer")
            self._peers[key] = st
            return [change]
        st.name = entry.name
        if st.endpoints != entry.endpoints:
            st, change = self._start(entry, now, "endpoints changed")
            self._peers[key] = st
            return [change]
        if st.state == "direct":
            if handshake is None or now - handshake > REJECT_AFTER_TIME:
                age = "no handshake" if handshake is None else \
                    f"last handshake {now - handshake:.0f} s ago"
                st, change = self._start(entry, now, age)
                self._peers[key] = st
                return [change]
            return []
        fresh = handshake is not None and handshake > st.attempt_start
        if fresh:
            was = st.state
            st.state, st.since = "direct", now
            reason = "punched" if was == "trying" else "direct path found while relayed"
            return [PathChange(entry.name, key, "direct", actual_ep, reason)]
        if st.state == "trying":
            if now - st.since < DIRECT_TIMEOUT:
                return []
            if st.candidate + 1 < len(st.endpoints):
                st.candidate += 1
                st.since = now
                return [self._trying_change(entry, st, f"no handshake in {DIRECT_TIMEOUT:g} s")]
            st.state, st.candidate, st.since = "relay", 0, now
            n = len(st.endpoints)
            return [PathChange(entry.name, key, "relay", None,
                               f"no direct handshake on {n} candidate{'s' * (n != 1)}; probing")]
        # relay: keep probing, cycling the candidates; not worth a log line each time
        if len(st.endpoints) > 1 and now - st.since >= RELAY_PROBE_DWELL:
            st.candidate = (st.candidate + 1) % len(st.endpoints)
            st.since = now
        return []

    # -- the whole plan ----------------------------------------------------

    def update(self, peermap: PeerMap | None, status: DeviceStatus, now: float) -> PathPlan:
        hub = peermap.hub if peermap is not None else self.hub
        relay_ips = {ipaddress.ip_network(r, strict=False)
                     for r in (peermap.relay_ips if peermap is not None else ())}
        entries = self._usable(peermap.peers if peermap is not None else (), hub, relay_ips)
        changes: list[PathChange] = []
        wanted = {e.public_key for e in entries}
        for key in [k for k in self._peers if k not in wanted]:
            changes.append(PathChange(self._peers.pop(key).name, key, "removed"))
        for entry in entries:
            changes.extend(self._step(entry, status, now))

        hub_ips: set[IPNetwork] = {_host_net(hub.mesh_ipv4), _host_net(hub.mesh_ipv6)}
        hub_ips |= relay_ips
        peers: list[DesiredPeer] = []
        paths: list[PeerPath] = []
        deadlines: list[float] = []
        for entry in entries:
            st = self._peers[entry.public_key]
            mesh = {_host_net(entry.mesh_ipv4), _host_net(entry.mesh_ipv6)}
            peer_status = status.peer(entry.public_key)
            handshake = peer_status.last_handshake if peer_status else None
            if st.state == "relay":
                hub_ips |= mesh
                ep = _endpoint(st.endpoints[st.candidate]) if st.endpoints else None
                peers.append(DesiredPeer(entry.public_key, frozenset(), ep,
                                         KEEPALIVE if ep is not None else 0))
                paths.append(PeerPath(entry.public_key, "relay", None, handshake))
                if len(st.endpoints) > 1:
                    deadlines.append(st.since + RELAY_PROBE_DWELL)
            elif st.state == "trying":
                ep = _endpoint(st.endpoints[st.candidate])
                peers.append(DesiredPeer(entry.public_key, frozenset(mesh), ep, PUNCH_KEEPALIVE))
                paths.append(PeerPath(entry.public_key, "none", str(ep) if ep else None,
                                      handshake))
                deadlines.append(st.since + DIRECT_TIMEOUT)
            else:
                actual = peer_status.endpoint if peer_status else None
                peers.append(DesiredPeer(entry.public_key, frozenset(mesh), None, KEEPALIVE))
                paths.append(PeerPath(entry.public_key, "direct",
                                      str(actual) if actual else None, handshake))
                if handshake is not None:
                    deadlines.append(handshake + REJECT_AFTER_TIME)
        hub_peer = DesiredPeer(hub.public_key, frozenset(hub_ips), Endpoint.parse(hub.endpoint),
                               KEEPALIVE)
        desired = DesiredDevice(self.private_key, (hub_peer, *peers), self.listen_port)
        return PathPlan(desired, tuple(paths), tuple(changes),
                        min(deadlines) if deadlines else None)

    def _usable(self, entries: Iterable[PeerEntry], hub: HubInfo,
                relay_ips: set[IPNetwork]) -> list[PeerEntry]:
        """Peers that can be configured: never ourselves or the hub, each key and each mesh
        address once (a coordinator bug must not make every reconcile fail)."""
        taken: set[str] = {self.public_key, hub.public_key}
        addresses: set[IPNetwork] = {_host_net(hub.mesh_ipv4), _host_net(hub.mesh_ipv6)}
        addresses |= relay_ips
        out: list[PeerEntry] = []
        for e in entries:
            mesh = {_host_net(e.mesh_ipv4), _host_net(e.mesh_ipv6)}
            if e.public_key in taken or mesh & addresses:
                continue
            taken.add(e.public_key)
            addresses |= mesh
            out.append(e)
        return out
