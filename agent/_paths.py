"""Path selection for every mesh peer: punched direct, still trying, or relayed through the hub.

A protocol core (docs/architecture.md, principle 1): no I/O, time passed in.
`PathSelector.update(peermap, status, now)` takes the current peer map, the WireGuard device's
state and the time (epoch seconds, the clock WireGuard's `last_handshake` uses) and gives back the
`DesiredDevice` for `vpn.diff`, every peer's `PeerPath` for the report, the path changes worth one
log line, and the mesh addresses to *nudge*: the driver applies the desired device first, then
sends one small datagram to each (through the tunnel, bound to the WireGuard interface).

The liveness signal is **received bytes on the peer's own entry** (`PeerStatus.rx_bytes`). That
entry is only ever reached directly (relayed traffic arrives on the hub's entry), so rx growth on
it proves a working direct path. A handshake is not a usable signal: WireGuard does not handshake
again while a session lives (REKEY_AFTER_TIME = 120 s, whitepaper section 6.1), so a pair that
handshook a moment before an attempt sees no newer one, and a peer that moved keeps a recent
`last_handshake` over a dead path.

Silence is no proof of a dead path either. A persistent keepalive is sent only after
"persistent-keepalive seconds without any authenticated packet sent *or received*" (wireguard-go
`timersAnyAuthenticatedPacketTraversal`, Linux `wg_timers_any_authenticated_packet_traversal`):
between two idle peers the one whose timer fires first keeps re-arming the other's, so
keepalives flow one way only, and while we punch with PUNCH_KEEPALIVE the peer sends none at all.
The side that only sends hears nothing until the next rekey (up to ~REJECT_AFTER_TIME). What
always draws an answer is *data*: a peer that receives a data packet and has nothing to send back
answers with a keepalive within KEEPALIVE_TIMEOUT = 10 s (passive keepalive, section 6.5; the
timer starts before the inner source address is checked, so it answers even while it relays us),
and a sender whose data gets no answer at all starts a new handshake after KEEPALIVE_TIMEOUT +
REKEY_TIMEOUT = 15 s (section 6.2), which a live peer with a lost session answers. The nudge is
that data packet.

Per peer:

- `trying` candidate `i`, since `t0`: the entry holds the peer's mesh /32 and /128, points at
  candidate `i` with PUNCH_KEEPALIVE (a handshake starts at once when there is no session), and
  the peer is nudged once. rx above its value at `t0`, or a handshake newer than `t0` -> `direct`.
  Neither within the window -> the next candidate; after the last one -> `relay`. The window is
  DIRECT_TIMEOUT (one handshake retransmission) when our entry had no live session at `t0`, and
  DIRECT_TIMEOUT_WITH_SESSION (the passive keepalive, or the re-handshake if the peer lost the
  session) when it had one: then no handshake comes, only the answer to the nudge.
- `direct`: the entry holds the mesh addresses; endpoint "don't care" so WireGuard's roaming
  keeps working. Every rx growth (or newer handshake) refreshes "last heard". After KEEPALIVE of
  silence the peer is nudged, again every NUDGE_INTERVAL; no growth for DIRECT_IDLE -> `trying`
  (candidates from the map). An entry missing from the device (daemon restarted) -> `trying`.
- `relay`: the mesh addresses belong to the hub peer; the peer's own entry stays as a probe with
  no allowed IPs, an endpoint and a keepalive (it still handshakes, docs/architecture.md "Platform
  facts"), cycling the candidates every RELAY_PROBE_DWELL. rx above its value when the current
  probe candidate started (or a handshake newer than that) -> `direct`. No nudges: with no allowed
  IPs on the entry, a datagram would go through the hub. A probe with a keepalive and no session
  sends a handshake initiation every REKEY_TIMEOUT: ~135 KB per hour per relayed peer, the
  largest idle cost of a device behind a symmetric NAT. So probing is free for RELAY_PROBE_FREE
  after the relay began (a peer that restarts or moves within minutes is found at once), then
  each round of candidates is followed by a pause without the probe entry (a keepalive of 0
  would not stop the handshake WireGuard keeps retrying for 90 s), RELAY_PAUSE_FIRST doubling
  up to RELAY_PAUSE_MAX. The pause ends early when the peer reaches us (rx growth), and a peer
  whose endpoints change in the map starts `trying` anyway.

A peer whose endpoints change in the map starts `trying` again; a peer without endpoints is
relayed (its entry can still answer the peer's own punches); peers gone from the map are dropped.
A peer seen for the first time starts `trying` even when its entry shows a live session (an agent
restart): the nudge confirms the session within DIRECT_TIMEOUT_WITH_SESSION. An rx counter that
goes backwards (the daemon restarted, the entry was re-created) resets the baseline and is not
growth.
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
# Whitepaper section 6.1: REJECT_AFTER_TIME = 180 s; no session older than that carries data, so
# a last handshake younger than this means our entry holds a live session.
REJECT_AFTER_TIME: Final = 180.0
# While relayed, each candidate is probed this long: more than one KEEPALIVE, so every candidate
# gets at least one keepalive-driven handshake initiation.
RELAY_PROBE_DWELL: Final = 30.0
# Probing without pauses this long after the relay began: six dwells, a peer back within three
# minutes (an agent or router restart) meets probes on both sides at once.
RELAY_PROBE_FREE: Final = 180.0
# Then a pause after each round of candidates: 1, 2, 4 ... 60 minutes of silence. At the cap a
# relayed peer costs one round (RELAY_PROBE_DWELL per candidate) per hour.
RELAY_PAUSE_FIRST: Final = 60.0
RELAY_PAUSE_MAX: Final = 3600.0
# Whitepaper section 6.5 (wireguard-go KeepaliveTimeout): a peer that received data and has
# nothing to send back answers with a keepalive after this long.
KEEPALIVE_TIMEOUT: Final = 10.0
# Whitepaper section 6.4 (wireguard-go RekeyTimeout).
REKEY_TIMEOUT: Final = 5.0
# The longest a live peer takes to answer a nudge: its passive keepalive after KEEPALIVE_TIMEOUT,
# or, if it lost the session, our new handshake after KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
# (section 6.2, wireguard-go `timersDataSent`) answered within a round trip. Also the spacing of
# nudges in `direct`, so that one nudge is answered (or not) before the next.
NUDGE_INTERVAL: Final = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
# A candidate tried while our entry holds a live session: no handshake will come, only the
# answer to the nudge; one second of round-trip slack.
DIRECT_TIMEOUT_WITH_SESSION: Final = NUDGE_INTERVAL + 1.0
# Whitepaper section 6.1 (wireguard-go RekeyAfterTime): a sender whose session is this old starts
# a new handshake with its next packet, keepalives included.
REKEY_AFTER_TIME: Final = 120.0
# A live direct path is heard from at least this often without any extra packets: every
# KEEPALIVE when the peer's keepalives flow our way, and when ours suppress them (module
# docstring), through the handshake our own keepalives renew every REKEY_AFTER_TIME. Only past
# that (plus the passive-keepalive slack) do we nudge: nudging every silent peer after KEEPALIVE
# cost each device ~3 packets per peer per half minute of idle metered traffic.
NUDGE_AFTER: Final = REKEY_AFTER_TIME + KEEPALIVE_TIMEOUT
# Nothing heard this long on a direct path -> try again: the nudge at NUDGE_AFTER and the one
# NUDGE_INTERVAL later both unanswered, with KEEPALIVE_TIMEOUT of slack for the round trip. A
# moved peer is usually caught sooner: its new endpoint changes the peer map.
DIRECT_IDLE: Final = NUDGE_AFTER + NUDGE_INTERVAL + KEEPALIVE_TIMEOUT

# A direct path to a peer behind another NAT that carried nothing but keepalives and
# handshakes this long goes lazy: no keepalive, so an idle pair sends nothing at all over the
# WAN (each keepalive-held pair cost ~20 kB/h: a keepalive every 25 s and, as keepalives are
# traffic, a handshake every REKEY_AFTER_TIME). Traffic wakes it: `trying` at once, and the
# peer is asked through the coordinator to punch too (both sides must send for two NATs to
# open). 0 turns laziness off.
LAZY_AFTER: Final = 120.0
# Quiet is judged over windows of this length: at most QUIET_BYTES (both ways) in one, which
# keepalives both ways (2 x 2 x 32 B), a handshake (148 + 92 B) and one retry stay under.
QUIET_WINDOW: Final = 30.0
QUIET_BYTES: Final = 600
# More than this sent on a lazy peer's entry within one reconcile tick is traffic that wants
# the peer: a handshake initiation (148 B, the session has expired) or a data packet (a ping is
# 144 B on the wire); a handshake *response* to the peer's late rekey (92 B) is not.
LAZY_WAKE_BYTES: Final = 100

PathState = Literal["trying", "direct", "relay", "lazy"]


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
        if self.state == "lazy":
            return f"peer {self.name}: lazy, no keepalive{tail}"
        return f"peer {self.name}: removed from the peer map"


@dataclass(frozen=True, slots=True)
class PathPlan:
    desired: DesiredDevice
    paths: tuple[PeerPath, ...]
    changes: tuple[PathChange, ...]
    next_deadline: float | None  # the next time a timer fires without new input; None: none
    # Mesh addresses to send one datagram to, after `desired` is applied (module docstring).
    nudges: tuple[str, ...] = ()
    # Peers (names) to ask through the coordinator to punch to us now: a lazy path woke up.
    punch: tuple[str, ...] = ()


@dataclass(slots=True)
class _Peer:
    name: str
    endpoints: tuple[str, ...]
    state: PathState
    candidate: int  # index into endpoints (trying, and the relay probe)
    since: float  # when the current candidate (or state) began
    rx: int  # rx_bytes baseline: growth above it is news from the peer
    heard: float  # trying/relay: the candidate's start; direct: the last rx growth
    window: float = DIRECT_TIMEOUT  # trying: how long this candidate gets
    nudged: float | None = None  # when the peer was last nudged in this state/candidate
    relay_since: float = 0.0  # relay: when it began (kept across endpoint changes)
    active: float = 0.0  # direct: the end of the last window with more than QUIET_BYTES
    win_from: float = 0.0  # direct: the current quiet window's start ...
    win_base: int = 0  # ... and rx + tx then
    tx: int = 0  # lazy: tx_bytes baseline
    paused_until: float | None = None  # relay: no probing until then
    pauses: int = 0  # relay: pauses taken, for the doubling


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

    def __init__(self, private_key: str, hub: HubInfo, listen_port: int | None = None,
                 lazy_after: float = LAZY_AFTER) -> None:
        self.private_key = private_key
        self.public_key = public_key_from_private(private_key)
        self.listen_port = listen_port
        self.hub = hub  # used until a peer map arrives
        self.lazy_after = lazy_after
        # the hub peer's keepalive, set by the driver (agent/_keepalive.py tunes it to the NAT)
        self.hub_keepalive = KEEPALIVE
        # The driver's view of the coordinator: while it does not answer, no path goes lazy and
        # lazy ones wake (a punch request could not reach the peer; both sides wake alike).
        self.coordinator_ok = True
        self._peers: dict[str, _Peer] = {}
        self._punch_seen: dict[str, int] = {}  # peer name -> the newest punch stamp in the map
        self._punch_out: list[str] = []

    def state(self, public_key: str) -> _Peer | None:
        return self._peers.get(public_key)

    # -- transitions -------------------------------------------------------

    @staticmethod
    def _window(handshake: float | None, now: float) -> float:
        live = handshake is not None and now - handshake < REJECT_AFTER_TIME
        return DIRECT_TIMEOUT_WITH_SESSION if live else DIRECT_TIMEOUT

    def _start(self, entry: PeerEntry, now: float, rx: int, handshake: float | None,
               reason: str) -> tuple[_Peer, PathChange]:
        if not entry.endpoints:
            st = _Peer(entry.name, entry.endpoints, "relay", 0, now, rx, now, relay_since=now)
            return st, PathChange(entry.name, entry.public_key, "relay", None,
                                  f"{reason}; no endpoints known")
        st = _Peer(entry.name, entry.endpoints, "trying", 0, now, rx, now,
                   self._window(handshake, now))
        return st, self._trying_change(entry, st, reason)

    @staticmethod
    def _trying_change(entry: PeerEntry, st: _Peer, reason: str) -> PathChange:
        n = len(st.endpoints)
        return PathChange(entry.name, entry.public_key, "trying", st.endpoints[st.candidate],
                          f"{reason}; candidate {st.candidate + 1}/{n}")

    def _may_idle(self, entry: PeerEntry) -> bool:
        """LAN neighbours keep their keepalives: no NAT between us, and no WAN bytes."""
        return self.lazy_after > 0 and not entry.lan and self.coordinator_ok

    @staticmethod
    def _watch_quiet(st: _Peer, total: int, now: float) -> None:
        if total < st.win_base:  # counters restarted
            st.win_base = total
        if now - st.win_from >= QUIET_WINDOW:
            if total - st.win_base > QUIET_BYTES:
                st.active = now
            st.win_from, st.win_base = now, total

    def _step(self, entry: PeerEntry, status: DeviceStatus, now: float,
              punched: bool = False) -> list[PathChange]:
        key = entry.public_key
        peer_status = status.peer(key)
        handshake = peer_status.last_handshake if peer_status else None
        rx = peer_status.rx_bytes if peer_status else 0
        tx = peer_status.tx_bytes if peer_status else 0
        actual_ep = str(peer_status.endpoint) if peer_status and peer_status.endpoint else None
        st = self._peers.get(key)
        if st is None:
            # First sight (e.g. an agent restart). A live session is not assumed to be direct: it
            # gets the longer window, and the nudge confirms it (module docstring).
            st, change = self._start(entry, now, rx, handshake, "new peer")
            self._peers[key] = st
            return [change]
        st.name = entry.name
        if st.endpoints != entry.endpoints and not entry.endpoints and st.state == "direct":
            # The map no longer knows where the peer is (e.g. a coordinator restarted and has
            # not heard from it yet): no news about a path that works, so keep it; DIRECT_IDLE
            # still catches it if it dies.
            st.endpoints = entry.endpoints
        if st.endpoints != entry.endpoints:
            old = st
            st, change = self._start(entry, now, rx, handshake, "endpoints changed")
            if old.state == "relay":
                # A relayed peer behind a symmetric NAT gets a new port whenever its binding
                # lapses: one try, and if it falls back to the relay it goes on with the
                # pauses it had reached, not three more minutes of free probing.
                st.relay_since, st.pauses = old.relay_since, old.pauses
            self._peers[key] = st
            return [change]
        if punched and st.state in ("lazy", "relay"):
            st, change = self._start(entry, now, rx, handshake,
                                     f"{entry.name} asked for a direct path")
            self._peers[key] = st
            return [change]
        if st.state == "lazy":
            return self._step_lazy(entry, st, peer_status is not None, rx, tx, handshake, now)
        if rx < st.rx:
            st.rx = rx  # the daemon restarted or re-created the entry: a new baseline, no news
        grew = rx > st.rx
        st.rx = rx
        # A handshake always adds rx bytes too; accepting it as well covers a status that lacks
        # the counters.
        fresh = grew or (handshake is not None and handshake > st.heard)
        if st.state == "direct":
            if peer_status is None:
                st, change = self._start(entry, now, 0, None, "entry missing from the device")
                self._peers[key] = st
                return [change]
            self._watch_quiet(st, rx + tx, now)
            if fresh:
                st.heard = now
                st.nudged = None
            if self._may_idle(entry) and now - st.active >= self.lazy_after:
                st.state, st.since, st.tx, st.nudged = "lazy", now, tx, None
                actual = str(peer_status.endpoint) if peer_status.endpoint else None
                return [PathChange(entry.name, key, "lazy", actual,
                                   f"nothing but keepalives for {now - st.active:.0f} s")]
            if fresh:
                return []
            if now - st.heard >= DIRECT_IDLE:
                st, change = self._start(entry, now, rx, handshake,
                                         f"nothing received for {now - st.heard:.0f} s")
                self._peers[key] = st
                return [change]
            return []
        if fresh:
            was = st.state
            st.state, st.since, st.heard, st.nudged = "direct", now, now, None
            st.active, st.win_from, st.win_base = now, now, rx + tx
            reason = "punched" if was == "trying" else "direct path found while relayed"
            return [PathChange(entry.name, key, "direct", actual_ep, reason)]
        if st.state == "trying":
            if now - st.since < st.window:
                return []
            if st.candidate + 1 < len(st.endpoints):
                why = f"nothing received in {st.window:g} s"
                st.candidate += 1
                st.since = st.heard = now
                st.window = self._window(handshake, now)
                st.nudged = None
                return [self._trying_change(entry, st, why)]
            st.state, st.candidate, st.since, st.heard, st.nudged = "relay", 0, now, now, None
            if st.pauses == 0:
                st.relay_since = now
            n = len(st.endpoints)
            return [PathChange(entry.name, key, "relay", None,
                               f"nothing received from {n} candidate{'s' * (n != 1)}; probing")]
        # relay: keep probing, cycling the candidates, with pauses after RELAY_PROBE_FREE; not
        # worth a log line each time
        if st.paused_until is not None:
            if now >= st.paused_until:
                st.paused_until, st.candidate, st.since, st.heard = None, 0, now, now
            return []
        if st.endpoints and now - st.since >= RELAY_PROBE_DWELL:
            if st.candidate + 1 < len(st.endpoints) or now - st.relay_since < RELAY_PROBE_FREE:
                st.candidate = (st.candidate + 1) % len(st.endpoints)
                st.since = st.heard = now
            else:
                pause = min(RELAY_PAUSE_MAX, RELAY_PAUSE_FIRST * 2 ** min(st.pauses, 16))
                st.pauses += 1
                st.candidate, st.paused_until = 0, now + pause
        return []

    def _step_lazy(self, entry: PeerEntry, st: _Peer, present: bool, rx: int, tx: int,
                   handshake: float | None, now: float) -> list[PathChange]:
        """No keepalive: nothing to hear, so silence means nothing. Our own traffic to the
        peer wakes it (and asks the peer to punch too); so does a coordinator gone away."""
        sent, st.tx = tx - st.tx, tx
        st.rx = rx
        why = ("entry missing from the device" if not present
               else "traffic to it" if sent > LAZY_WAKE_BYTES
               else "the coordinator does not answer" if not self.coordinator_ok
               else None)
        if why is None:
            return []
        new, change = self._start(entry, now, rx, handshake, why)
        self._peers[entry.public_key] = new
        if present and self.coordinator_ok:
            self._punch_out.append(entry.name)
        return [change]

    def _nudge_due(self, st: _Peer, now: float) -> float | None:
        """When the peer should next be nudged (<= now: now); None: not in this state."""
        if st.state == "trying":
            return st.since if st.nudged is None else None
        if st.state == "direct":
            due = st.heard + NUDGE_AFTER
            if st.nudged is not None:
                due = max(due, st.nudged + NUDGE_INTERVAL)
            return due
        return None

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
        punched: set[str] = set()
        stamps = dict(peermap.punch) if peermap is not None else {}
        for name, stamp in stamps.items():
            if self._punch_seen.get(name) != stamp:
                punched.add(name)
        self._punch_seen = stamps
        for entry in entries:
            changes.extend(self._step(entry, status, now, entry.name in punched))

        hub_ips: set[IPNetwork] = {_host_net(hub.mesh_ipv4), _host_net(hub.mesh_ipv6)}
        hub_ips |= relay_ips
        peers: list[DesiredPeer] = []
        paths: list[PeerPath] = []
        deadlines: list[float] = []
        nudges: list[str] = []
        for entry in entries:
            st = self._peers[entry.public_key]
            mesh = {_host_net(entry.mesh_ipv4), _host_net(entry.mesh_ipv6)}
            peer_status = status.peer(entry.public_key)
            handshake = peer_status.last_handshake if peer_status else None
            due = self._nudge_due(st, now)
            if due is not None:
                if due <= now:
                    nudges.append(entry.mesh_ipv4)
                    st.nudged = now
                    due = self._nudge_due(st, now)
                if due is not None:
                    deadlines.append(due)
            if st.state == "relay":
                hub_ips |= mesh
                ep = _endpoint(st.endpoints[st.candidate]) if st.endpoints else None
                paths.append(PeerPath(entry.public_key, "relay", None, handshake))
                if st.paused_until is not None:
                    # No entry at all: a keepalive of 0 would not stop the handshake WireGuard
                    # is retrying (every REKEY_TIMEOUT for 90 s after the last attempt).
                    deadlines.append(st.paused_until)
                    continue
                peers.append(DesiredPeer(entry.public_key, frozenset(), ep,
                                         KEEPALIVE if ep is not None else 0))
                if st.endpoints:
                    deadlines.append(st.since + RELAY_PROBE_DWELL)
            elif st.state == "trying":
                ep = _endpoint(st.endpoints[st.candidate])
                peers.append(DesiredPeer(entry.public_key, frozenset(mesh), ep, PUNCH_KEEPALIVE))
                paths.append(PeerPath(entry.public_key, "none", str(ep) if ep else None,
                                      handshake))
                deadlines.append(st.since + st.window)
            else:
                actual = peer_status.endpoint if peer_status else None
                lazy = st.state == "lazy"
                peers.append(DesiredPeer(entry.public_key, frozenset(mesh), None,
                                         0 if lazy else KEEPALIVE))
                paths.append(PeerPath(entry.public_key, "direct",
                                      str(actual) if actual else None, handshake))
                if not lazy:
                    deadlines.append(st.heard + DIRECT_IDLE)
                    if self._may_idle(entry):
                        deadlines.append(st.active + self.lazy_after)
        hub_peer = DesiredPeer(hub.public_key, frozenset(hub_ips), Endpoint.parse(hub.endpoint),
                               self.hub_keepalive)
        desired = DesiredDevice(self.private_key, (hub_peer, *peers), self.listen_port)
        punch, self._punch_out = tuple(self._punch_out), []
        return PathPlan(desired, tuple(paths), tuple(changes),
                        min(deadlines) if deadlines else None, tuple(nudges), punch)

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
