"""The path core with exact timestamps: every transition, what it asks of WireGuard, and whom
it nudges. Liveness is rx growth on the peer's own entry (agent/_paths.py docstring)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import (
    DIRECT_TIMEOUT,
    KEEPALIVE,
    PUNCH_KEEPALIVE,
    REJECT_AFTER_TIME,
    RELAY_PROBE_DWELL,
    PathPlan,
    PathSelector,
)
from agent._paths import (
    DIRECT_IDLE,
    DIRECT_TIMEOUT_WITH_SESSION,
    KEEPALIVE_TIMEOUT,
    LAZY_AFTER,
    NUDGE_AFTER,
    NUDGE_INTERVAL,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    RELAY_PROBE_FREE,
)
from mesh.control import PeerEntry, PeerMap
from vpn import DesiredPeer, DeviceStatus, Endpoint, diff, generate_keypair

from .fakes import HUB, KEYS, FakeWireGuard, host, peer, peermap

ME = generate_keypair()
A, B = "203.0.113.7:51820", "192.168.1.7:51820"


class Harness:
    """The selector plus a fake device that applies each plan, as the reconcile loop does."""

    def __init__(self, lazy_after: float = 0) -> None:
        # Laziness off unless a test is about it: the keepalive-held rules below are what LAN
        # neighbours (and a device with --lazy-after 0) live by.
        self.sel = PathSelector(ME.private, HUB, 51820, lazy_after=lazy_after)
        self.wg = FakeWireGuard()

    def tick(self, pm: PeerMap | None, now: float) -> PathPlan:
        status = self.wg.status()
        plan = self.sel.update(pm, status, now)
        changes = diff(plan.desired, status)
        if changes:
            from vpn import changes_to_config

            self.wg.apply(changes_to_config(changes))
        assert diff(plan.desired, self.wg.status()) == []
        return plan


def desired_peer(plan: PathPlan, key: str) -> DesiredPeer:
    return next(p for p in plan.desired.peers if p.public_key == key)


def hub_ips(plan: PathPlan) -> set[Any]:
    return set(desired_peer(plan, HUB.public_key).allowed_ips)


def mesh(i: int) -> set[Any]:
    e = peer(i)
    return {host(e.mesh_ipv4), host(e.mesh_ipv6)}


def path(plan: PathPlan, i: int) -> tuple[str, str | None]:
    p = next(p for p in plan.paths if p.public_key == KEYS[i].public)
    return p.path, p.endpoint


def rx(h: Harness, i: int) -> int:
    return h.wg.peers[KEYS[i].public].rx_bytes


def test_constants_follow_wireguard_timers() -> None:
    assert DIRECT_TIMEOUT == 6.0 and REJECT_AFTER_TIME == 180.0
    assert KEEPALIVE == 25 and PUNCH_KEEPALIVE == 1 and RELAY_PROBE_DWELL > KEEPALIVE
    assert KEEPALIVE_TIMEOUT == 10.0 and REKEY_TIMEOUT == 5.0
    # a nudge is answered by a passive keepalive (10 s) or a re-handshake (10 + 5 s)
    assert NUDGE_INTERVAL == 15.0 and DIRECT_TIMEOUT_WITH_SESSION == 16.0
    # a live path renews its handshake every REKEY_AFTER_TIME: nudge only past that, then
    # twice unanswered (130 s, 145 s; answers due by 140 s, 155 s) before trying again
    assert REKEY_AFTER_TIME == 120.0 and NUDGE_AFTER == 130.0 > REKEY_AFTER_TIME
    assert DIRECT_IDLE == 155.0 == NUDGE_AFTER + NUDGE_INTERVAL + KEEPALIVE_TIMEOUT
    assert DIRECT_IDLE < REJECT_AFTER_TIME


def test_new_peer_tries_first_candidate_then_goes_direct_on_rx_growth() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A, B))
    plan = h.tick(pm, 1000.0)
    want = desired_peer(plan, KEYS[1].public)
    assert want.endpoint == Endpoint.parse(A)
    assert want.persistent_keepalive == PUNCH_KEEPALIVE
    assert set(want.allowed_ips) == mesh(1)
    assert hub_ips(plan) == {host(HUB.mesh_ipv4), host(HUB.mesh_ipv6)}
    assert desired_peer(plan, HUB.public_key).endpoint == Endpoint.parse(HUB.endpoint)
    assert desired_peer(plan, HUB.public_key).persistent_keepalive == KEEPALIVE
    assert plan.desired.listen_port == 51820
    assert path(plan, 1) == ("none", A)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {A} (new peer; candidate 1/2)"]
    assert plan.nudges == (peer(1).mesh_ipv4,)  # once per candidate, through its own entry
    assert plan.next_deadline == 1000.0 + DIRECT_TIMEOUT  # no session: a handshake decides

    # A handshake older than the attempt with no bytes does not count; nothing is nudged twice.
    h.wg.peers[KEYS[1].public].last_handshake = 999.0
    plan = h.tick(pm, 1001.0)
    assert plan.changes == () and plan.nudges == ()
    # Bytes on the peer's own entry do (here a handshake response).
    h.wg.handshake(KEYS[1].public, 1002.0)
    plan = h.tick(pm, 1002.5)
    assert [str(c) for c in plan.changes] == [f"peer home-1: direct via {A} (punched)"]
    want = desired_peer(plan, KEYS[1].public)
    assert want.endpoint is None  # don't care: WireGuard roaming keeps working
    assert want.persistent_keepalive == KEEPALIVE
    assert set(want.allowed_ips) == mesh(1)
    assert path(plan, 1) == ("direct", A)
    assert plan.nudges == ()
    assert plan.next_deadline == 1002.5 + NUDGE_AFTER  # the first nudge, if silent


def test_handshake_newer_than_the_attempt_counts_without_counters() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 1000.0)
    h.wg.peers[KEYS[1].public].last_handshake = 1003.0  # a status without rx counters
    assert path(h.tick(pm, 1003.5), 1) == ("direct", A)


def test_nothing_received_walks_candidates_then_relays_and_probes() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A, B))
    h.tick(pm, 1000.0)
    assert h.tick(pm, 1005.9).changes == ()
    plan = h.tick(pm, 1006.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {B} (nothing received in 6 s; candidate 2/2)"]
    assert desired_peer(plan, KEYS[1].public).endpoint == Endpoint.parse(B)
    assert plan.nudges == (peer(1).mesh_ipv4,)
    assert plan.next_deadline == 1012.0
    assert h.tick(pm, 1011.9).changes == ()
    plan = h.tick(pm, 1012.0)
    assert [str(c) for c in plan.changes] == [
        "peer home-1: relay via hub (nothing received from 2 candidates; probing)"]
    assert plan.nudges == ()  # no allowed IPs on the probe: a datagram would take the hub
    probe = desired_peer(plan, KEYS[1].public)
    assert probe.allowed_ips == frozenset()
    assert probe.endpoint == Endpoint.parse(A) and probe.persistent_keepalive == KEEPALIVE
    assert hub_ips(plan) == {host(HUB.mesh_ipv4), host(HUB.mesh_ipv6)} | mesh(1)
    assert path(plan, 1) == ("relay", None)
    assert plan.next_deadline == 1012.0 + RELAY_PROBE_DWELL

    # The probe cycles the candidates, silently.
    plan = h.tick(pm, 1041.9)
    assert desired_peer(plan, KEYS[1].public).endpoint == Endpoint.parse(A)
    plan = h.tick(pm, 1042.0)
    assert plan.changes == () and plan.nudges == ()
    assert desired_peer(plan, KEYS[1].public).endpoint == Endpoint.parse(B)
    plan = h.tick(pm, 1072.0)
    assert desired_peer(plan, KEYS[1].public).endpoint == Endpoint.parse(A)

    # rx growth on the probe entry (no handshake needed) moves the addresses back to the peer.
    h.wg.receive(KEYS[1].public)
    plan = h.tick(pm, 1080.5)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: direct via {A} (direct path found while relayed)"]
    assert set(desired_peer(plan, KEYS[1].public).allowed_ips) == mesh(1)
    assert hub_ips(plan) == {host(HUB.mesh_ipv4), host(HUB.mesh_ipv6)}
    assert set(h.wg.peers[KEYS[1].public].allowed) == mesh(1)


def test_single_candidate_relays_after_one_timeout_and_keeps_probing_it() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 0.0)
    plan = h.tick(pm, DIRECT_TIMEOUT)
    assert path(plan, 1) == ("relay", None)
    assert plan.next_deadline == DIRECT_TIMEOUT + RELAY_PROBE_DWELL
    plan = h.tick(pm, 100.0)
    probe = desired_peer(plan, KEYS[1].public)
    assert probe.endpoint == Endpoint.parse(A) and probe.persistent_keepalive == KEEPALIVE


def test_a_relayed_peer_is_probed_in_rounds_with_pauses_that_double_up_to_an_hour() -> None:
    """A probe with a keepalive and no session sends a handshake initiation every 5 s, ~135 KB
    per hour per relayed peer (a device behind a symmetric NAT paid it for each of its peers,
    and each peer for it): free probing for RELAY_PROBE_FREE, then a round of candidates and a
    pause without the entry, 1, 2, 4 ... 60 minutes."""
    h = Harness()
    pm = peermap(1, peer(1, A, B))
    h.tick(pm, 0.0)
    h.tick(pm, DIRECT_TIMEOUT)
    plan = h.tick(pm, 2 * DIRECT_TIMEOUT)
    assert path(plan, 1) == ("relay", None)
    start = 2 * DIRECT_TIMEOUT
    silent: list[tuple[float, float]] = []  # (from, until) without a probe entry
    quiet_from: float | None = None
    t = start
    while t < start + 6 * 3600:
        assert plan.next_deadline is not None and plan.next_deadline > t
        t = plan.next_deadline
        plan = h.tick(pm, t)
        assert path(plan, 1) == ("relay", None)
        probing = any(p.public_key == KEYS[1].public for p in plan.desired.peers)
        if probing:
            probe = desired_peer(plan, KEYS[1].public)
            assert probe.allowed_ips == frozenset() and probe.persistent_keepalive == KEEPALIVE
        if not probing and quiet_from is None:
            quiet_from = t
        elif probing and quiet_from is not None:
            silent.append((quiet_from, t))
            quiet_from = None
    free_end = start + RELAY_PROBE_FREE  # a round (two dwells) ends at or after it
    assert silent[0][0] == free_end
    pauses = [until - since for since, until in silent]
    assert pauses[:7] == [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0]
    assert set(pauses[7:]) == {3600.0}
    # between two pauses, one round: each candidate for one dwell
    rounds = [b[0] - a[1] for a, b in zip(silent, silent[1:], strict=False)]
    assert set(rounds) == {2 * RELAY_PROBE_DWELL}

    # The peer reaches us during a pause: direct at once, the pause is over.
    while any(p.public_key == KEYS[1].public for p in plan.desired.peers):
        assert plan.next_deadline is not None
        t = plan.next_deadline
        plan = h.tick(pm, t)
    assert KEYS[1].public not in h.wg.peers  # no entry: nothing retried, nothing sent
    # The peer punches while we pause: our pause ends, its map stamp wakes us (a test below);
    # here it reaches us when the next round re-adds the entry.
    t = plan.next_deadline or t
    plan = h.tick(pm, t)
    h.wg.receive(KEYS[1].public)
    plan = h.tick(pm, t + 1.0)
    assert path(plan, 1)[0] == "direct"


def test_lan_neighbours_with_a_session_go_direct_without_a_new_handshake() -> None:
    """The lab's failure: the pair handshook through the probe entry a moment before this side
    started trying; WireGuard will not handshake again for REKEY_AFTER_TIME, and our 1 s punch
    keepalives keep re-arming the peer's own keepalive timer, so only the nudge's answer (the
    peer's passive keepalive, KEEPALIVE_TIMEOUT after our datagram) can come."""
    h = Harness()
    h.tick(peermap(1, peer(1)), 990.0)  # relayed: no endpoints known yet
    h.wg.handshake(KEYS[1].public, 999.0)  # the neighbour punched through to our probe entry
    h.wg.peers[KEYS[1].public].endpoint = Endpoint.parse(B)
    pm = peermap(2, peer(1, B))  # ... and a moment later the map gives its LAN endpoint
    plan = h.tick(pm, 1000.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {B} (endpoints changed; candidate 1/1)"]
    assert plan.nudges == (peer(1).mesh_ipv4,)
    assert plan.next_deadline == 1000.0 + DIRECT_TIMEOUT_WITH_SESSION
    assert h.tick(pm, 1006.0).changes == ()  # no newer handshake, but the session window holds
    assert h.tick(pm, 1009.9).changes == ()
    h.wg.receive(KEYS[1].public)  # the passive keepalive, 10 s after the nudge
    plan = h.tick(pm, 1010.0)
    assert [str(c) for c in plan.changes] == [f"peer home-1: direct via {B} (punched)"]
    assert h.wg.peers[KEYS[1].public].last_handshake == 999.0  # no handshake was needed


def test_session_window_expires_to_the_next_candidate() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A, B))
    h.tick(pm, 900.0)
    h.wg.handshake(KEYS[1].public, 901.0)
    h.tick(pm, 901.0)  # direct
    h.sel = PathSelector(ME.private, HUB, 51820)  # restarted agent: the entry has a session
    plan = h.tick(pm, 1000.0)
    assert [str(c) for c in plan.changes] == [f"peer home-1: trying {A} (new peer; candidate 1/2)"]
    assert plan.next_deadline == 1016.0
    assert h.tick(pm, 1015.9).changes == ()
    plan = h.tick(pm, 1016.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {B} (nothing received in 16 s; candidate 2/2)"]
    assert plan.nudges == (peer(1).mesh_ipv4,)
    assert plan.next_deadline == 1032.0  # still a live session (99 s old): the long window


def test_direct_peer_is_nudged_when_silent_and_stays_while_answering() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 1990.0)
    h.wg.handshake(KEYS[1].public, 1991.0)
    plan = h.tick(pm, 2000.0)
    assert path(plan, 1) == ("direct", A) and plan.next_deadline == 2000.0 + NUDGE_AFTER
    # the peer's keepalive every KEEPALIVE: never silent long enough for a nudge
    for t in (2020.0, 2045.0):
        h.wg.receive(KEYS[1].public)
        plan = h.tick(pm, t)
        assert plan.nudges == () and plan.changes == ()
        assert plan.next_deadline == t + NUDGE_AFTER
    # a renewed handshake (our keepalives renew it every REKEY_AFTER_TIME) counts as heard
    h.wg.peers[KEYS[1].public].last_handshake = 2160.0
    plan = h.tick(pm, 2160.0)
    assert plan.nudges == () and plan.next_deadline == 2160.0 + NUDGE_AFTER
    # silence past NUDGE_AFTER: a nudge; its answer refreshes
    assert h.tick(pm, 2289.9).nudges == ()
    plan = h.tick(pm, 2290.0)
    assert plan.nudges == (peer(1).mesh_ipv4,)
    assert plan.next_deadline == 2290.0 + NUDGE_INTERVAL
    assert h.tick(pm, 2290.0).nudges == ()  # not twice
    h.wg.receive(KEYS[1].public)
    plan = h.tick(pm, 2299.0)
    assert plan.changes == () and plan.nudges == ()
    assert plan.next_deadline == 2299.0 + NUDGE_AFTER
    assert path(plan, 1) == ("direct", A)


def test_silent_direct_peer_tries_again_after_direct_idle() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A, B))
    h.tick(pm, 1990.0)
    h.wg.handshake(KEYS[1].public, 2000.0)
    assert path(h.tick(pm, 2000.0), 1) == ("direct", A)
    # the path broke: no byte arrives, no handshake is renewed
    assert h.tick(pm, 2129.9).nudges == ()
    assert h.tick(pm, 2130.0).nudges == (peer(1).mesh_ipv4,)
    assert h.tick(pm, 2144.9).nudges == ()
    plan = h.tick(pm, 2145.0)
    assert plan.nudges == (peer(1).mesh_ipv4,) and plan.next_deadline == 2155.0
    plan = h.tick(pm, 2154.9)
    assert plan.changes == () and path(plan, 1) == ("direct", A)
    plan = h.tick(pm, 2155.0)  # exactly DIRECT_IDLE, before the session's REJECT_AFTER_TIME
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {A} (nothing received for 155 s; candidate 1/2)"]
    want = desired_peer(plan, KEYS[1].public)
    assert want.endpoint == Endpoint.parse(A) and want.persistent_keepalive == PUNCH_KEEPALIVE
    assert plan.nudges == (peer(1).mesh_ipv4,)
    # the session is not past REJECT_AFTER_TIME yet: only a nudge's answer can confirm it
    assert plan.next_deadline == 2155.0 + DIRECT_TIMEOUT_WITH_SESSION


def test_rx_counter_going_backwards_is_a_new_baseline_not_growth() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 0.0)
    h.wg.receive(KEYS[1].public, 500)
    assert path(h.tick(pm, 1.0), 1) == ("direct", A)
    h.wg.peers[KEYS[1].public].rx_bytes = 100  # the daemon restarted and counted anew
    h.tick(pm, 2.0)
    assert h.sel.state(KEYS[1].public).heard == 1.0  # type: ignore[union-attr]
    h.wg.receive(KEYS[1].public)  # 132 > 100: growth over the new baseline
    h.tick(pm, 3.0)
    assert h.sel.state(KEYS[1].public).heard == 3.0  # type: ignore[union-attr]
    # a reset while trying does not count as the answer either
    h.sel = PathSelector(ME.private, HUB, 51820)
    h.tick(pm, 10.0)
    h.wg.peers[KEYS[1].public].rx_bytes = 0
    assert h.tick(pm, 11.0).changes == ()
    h.wg.receive(KEYS[1].public)
    assert path(h.tick(pm, 12.0), 1) == ("direct", A)


def test_direct_peer_lost_from_the_device_tries_again() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 10.0)
    h.wg.handshake(KEYS[1].public, 11.0)
    h.tick(pm, 11.5)
    h.wg.peers.clear()  # wireguard-go restarted under us
    plan = h.tick(pm, 12.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {A} (entry missing from the device; candidate 1/1)"]
    assert h.wg.peers[KEYS[1].public].endpoint == Endpoint.parse(A)
    assert plan.next_deadline == 12.0 + DIRECT_TIMEOUT


def test_changed_endpoints_restart_trying_with_the_new_candidates() -> None:
    h = Harness()
    h.tick(peermap(1, peer(1, A)), 0.0)
    h.tick(peermap(1, peer(1, A)), 6.0)  # relayed now
    pm2 = peermap(2, peer(1, B))
    plan = h.tick(pm2, 7.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {B} (endpoints changed; candidate 1/1)"]
    assert set(desired_peer(plan, KEYS[1].public).allowed_ips) == mesh(1)
    assert hub_ips(plan) == {host(HUB.mesh_ipv4), host(HUB.mesh_ipv6)}
    h.wg.handshake(KEYS[1].public, 8.0)
    assert path(h.tick(pm2, 8.0), 1) == ("direct", B)
    # a direct peer whose endpoints change tries again too
    plan = h.tick(peermap(3, peer(1, A, B)), 9.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {A} (endpoints changed; candidate 1/2)"]


def test_peer_without_endpoints_is_relayed_but_answers_its_punches() -> None:
    h = Harness()
    pm = peermap(1, peer(1))
    plan = h.tick(pm, 0.0)
    assert [str(c) for c in plan.changes] == [
        "peer home-1: relay via hub (new peer; no endpoints known)"]
    probe = desired_peer(plan, KEYS[1].public)
    assert probe == DesiredPeer(KEYS[1].public, frozenset(), None, 0)
    assert mesh(1) <= hub_ips(plan)
    h.wg.handshake(KEYS[1].public, 3.0)  # the peer punched through to us
    h.wg.peers[KEYS[1].public].endpoint = Endpoint.parse(A)
    plan = h.tick(pm, 3.5)
    assert path(plan, 1) == ("direct", A)


def test_removed_peers_disappear() -> None:
    h = Harness()
    h.tick(peermap(1, peer(1, A), peer(2, B)), 0.0)
    plan = h.tick(peermap(2, peer(2, B)), 1.0)
    assert [str(c) for c in plan.changes] == ["peer home-1: removed from the peer map"]
    assert {p.public_key for p in plan.desired.peers} == {HUB.public_key, KEYS[2].public}
    assert KEYS[1].public not in h.wg.peers


def test_restart_with_a_live_session_tries_and_the_nudge_confirms_it() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 100.0)
    h.wg.handshake(KEYS[1].public, 101.0)
    h.sel = PathSelector(ME.private, HUB, 51820)  # a new agent process, same device
    plan = h.tick(pm, 150.0)
    assert [str(c) for c in plan.changes] == [f"peer home-1: trying {A} (new peer; candidate 1/1)"]
    assert plan.nudges == (peer(1).mesh_ipv4,)
    assert plan.next_deadline == 150.0 + DIRECT_TIMEOUT_WITH_SESSION
    h.wg.receive(KEYS[1].public)
    assert [str(c) for c in h.tick(pm, 151.0).changes] == [
        f"peer home-1: direct via {A} (punched)"]
    # a session past REJECT_AFTER_TIME is none: the short window
    h.sel = PathSelector(ME.private, HUB, 51820)
    plan = h.tick(pm, 281.5)
    assert path(plan, 1) == ("none", A) and plan.next_deadline == 281.5 + DIRECT_TIMEOUT


def test_relay_ips_self_hub_and_duplicates_are_handled() -> None:
    h = Harness()
    me = peer(0, A, key=ME.public)
    hub_again = peer(3, A, key=HUB.public_key)
    dup_key = peer(4, B, key=KEYS[1].public)
    clash = PeerEntry("home-5", KEYS[5].public, "10.250.0.11", "fd7a:f1ee::15", (B,))
    pm = peermap(1, me, peer(1, A), hub_again, dup_key, clash, relay_ips=("10.250.9.0/24",))
    plan = h.tick(pm, 0.0)
    assert {p.public_key for p in plan.desired.peers} == {HUB.public_key, KEYS[1].public}
    assert host("10.250.0.1") in hub_ips(plan)
    assert ipaddress.ip_network("10.250.9.0/24") in hub_ips(plan)


def test_without_a_map_only_the_hub_is_configured() -> None:
    h = Harness()
    plan = h.tick(None, 0.0)
    assert [p.public_key for p in plan.desired.peers] == [HUB.public_key]
    assert plan.paths == () and plan.next_deadline is None


def test_steady_state_sends_nothing() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A), peer(2, B), peer(3))
    h.tick(pm, 0.0)
    h.wg.handshake(KEYS[1].public, 0.5)
    h.tick(pm, 1.0)
    h.tick(pm, 7.0)
    before = h.wg.status()
    for t in (8.0, 9.0, 10.0):
        plan = h.sel.update(pm, h.wg.status(), t)
        assert diff(plan.desired, h.wg.status()) == []
        assert plan.changes == ()
    assert h.wg.status() == before


# --------------------------------------------------------------------------- property

ENDPOINTS = st.sampled_from([A, B, "203.0.113.9:4000", "[2001:db8::7]:51820"])
PEER = st.tuples(st.integers(1, 6), st.lists(ENDPOINTS, max_size=3, unique=True))
STEP = st.one_of(
    st.tuples(st.just("map"), st.lists(PEER, max_size=5, unique_by=lambda p: p[0]),
              st.lists(st.sampled_from(["10.250.9.0/24", "fd7a:f1ee:9::/64"]), unique=True)),
    st.tuples(st.just("handshake"), st.integers(1, 6), st.floats(-5, 0)),  # never in the future
    st.tuples(st.just("wait"), st.floats(0, 200)),
    st.tuples(st.just("forget"), st.integers(1, 6)),
    st.tuples(st.just("rx"), st.integers(1, 6), st.integers(-1, 200)),  # -1: counter reset
)


@settings(max_examples=150, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=40))
def test_any_sequence_converges_in_one_apply(steps: list[Any]) -> None:
    h = Harness()
    now = 1000.0
    pm: PeerMap | None = None
    version = 0
    for step in steps:
        if step[0] == "map":
            version += 1
            pm = peermap(version, *(peer(i, *eps) for i, eps in step[1]),
                         relay_ips=tuple(step[2]))
        elif step[0] == "handshake" and KEYS[step[1]].public in h.wg.peers:
            h.wg.handshake(KEYS[step[1]].public, now + step[2])
        elif step[0] == "wait":
            now += step[1]
        elif step[0] == "forget":
            h.wg.peers.pop(KEYS[step[1]].public, None)
        elif step[0] == "rx" and KEYS[step[1]].public in h.wg.peers:
            if step[2] < 0:
                h.wg.peers[KEYS[step[1]].public].rx_bytes = 0
            else:
                h.wg.receive(KEYS[step[1]].public, step[2])
        plan = h.tick(pm, now)  # asserts diff(desired, applied) == []
        # nudges only go where the peer's own entry holds its address, each once
        nudgeable = {e.mesh_ipv4 for e in (pm.peers if pm else ())
                     if any(q.public_key == e.public_key and q.path != "relay"
                            for q in plan.paths)}
        assert set(plan.nudges) <= nudgeable and len(set(plan.nudges)) == len(plan.nudges)
        assert plan.next_deadline is None or plan.next_deadline > now
        # applying the same plan again changes nothing
        status = h.wg.status()
        assert diff(h.sel.update(pm, status, now).desired, status) == []
        # every mesh address is owned by exactly one peer: the peer itself or the hub
        expected = {e.public_key for e in (pm.peers if pm else ())}
        assert {p.public_key for p in plan.paths} == expected
        hub = hub_ips(plan)
        for p in plan.paths:
            own = {a for q in plan.desired.peers if q.public_key == p.public_key
                   for a in q.allowed_ips}  # a relayed peer between probe rounds has no entry
            i = KEYS.index(next(k for k in KEYS if k.public == p.public_key))
            if p.path == "relay":
                assert own == set() and mesh(i) <= hub
            else:
                assert own == mesh(i) and not (mesh(i) & hub)


def test_status_without_private_key_is_handled() -> None:
    sel = PathSelector(ME.private, HUB)
    plan = sel.update(peermap(1, peer(1, A)), DeviceStatus(), 0.0)
    assert len(plan.desired.peers) == 2


@pytest.mark.parametrize("n", [1, 3])
def test_relay_deadline_is_the_end_of_the_candidates_dwell(n: int) -> None:
    h = Harness()
    eps = [A, B, "203.0.113.9:4000"][:n]
    pm = peermap(1, peer(1, *eps))
    for k in range(n + 1):
        plan = h.tick(pm, k * DIRECT_TIMEOUT)
    assert path(plan, 1) == ("relay", None)
    assert plan.next_deadline == n * DIRECT_TIMEOUT + RELAY_PROBE_DWELL


def test_direct_peer_stays_direct_when_the_map_forgets_its_endpoints() -> None:
    # A restarted coordinator may hand out maps without endpoints until it hears from the
    # devices again: no news about a path that works, so it keeps working.
    h = Harness()
    h.tick(peermap(1, peer(1, A)), 0.0)
    h.wg.handshake(KEYS[1].public, 1.0)
    assert path(h.tick(peermap(1, peer(1, A)), 1.0), 1) == ("direct", A)
    plan = h.tick(peermap(2, peer(1)), 2.0)
    assert not plan.changes
    assert path(plan, 1)[0] == "direct"
    assert set(desired_peer(plan, KEYS[1].public).allowed_ips) == mesh(1)
    # ...until it is silent for DIRECT_IDLE: with no endpoint to try, the relay
    plan = h.tick(peermap(2, peer(1)), 2.0 + DIRECT_IDLE + 1)
    assert path(plan, 1)[0] == "relay"
    # and when the map knows the endpoint again, the pair tries direct again
    plan = h.tick(peermap(3, peer(1, A)), 3.0 + DIRECT_IDLE + 1)
    assert path(plan, 1)[0] == "none" and [c.state for c in plan.changes] == ["trying"]


# -- lazy paths (issue 14: nothing crosses the WAN for an idle pair) -----------------------


def direct_at(h: Harness, pm: PeerMap, t: float) -> None:
    h.tick(pm, t)
    h.wg.receive(KEYS[1].public)
    plan = h.tick(pm, t + 1)
    assert path(plan, 1)[0] == "direct" and plan.changes[0].state == "direct"


def keepalives(h: Harness, pm: PeerMap, start: float, end: float) -> PathPlan:
    """What an idle pair exchanges: a keepalive each way every 25 s, a handshake every 120 s;
    a reconcile every 5 s (the agent's is every second; the windows are 30 s)."""
    t = start
    plan = h.tick(pm, t)
    while t + 5 <= end:
        t += 5
        if t % KEEPALIVE < 5:
            h.wg.send(KEYS[1].public, 32)
            h.wg.receive(KEYS[1].public, 32)
        if t % REKEY_AFTER_TIME < 5:
            h.wg.send(KEYS[1].public, 148)
            h.wg.receive(KEYS[1].public, 92)
        plan = h.tick(pm, t)
        if plan.changes:
            return plan
    return plan


def test_a_quiet_path_to_another_nat_goes_lazy_and_our_traffic_wakes_it_with_a_punch() -> None:
    h = Harness(lazy_after=LAZY_AFTER)
    pm = peermap(1, peer(1, A))
    direct_at(h, pm, 0.0)
    plan = keepalives(h, pm, 1.0, 1000.0)
    assert [str(c) for c in plan.changes] == [
        "peer home-1: lazy, no keepalive (nothing but keepalives for 120 s)"]
    lazy_at = 1.0 + LAZY_AFTER
    want = desired_peer(plan, KEYS[1].public)
    assert want.persistent_keepalive == 0  # nothing is sent while nothing is wanted
    assert set(want.allowed_ips) == mesh(1)  # our traffic still goes to the entry: it wakes it
    assert path(plan, 1)[0] == "direct" and plan.punch == ()
    assert plan.next_deadline is None  # no nudges, no idle timeout: silence means nothing

    # The peer's late rekey draws a handshake response from us (92 B): not traffic of ours.
    h.wg.send(KEYS[1].public, 92)
    assert h.tick(pm, lazy_at + 10).changes == ()
    for t in range(int(lazy_at) + 11, int(lazy_at) + 3600, 60):
        assert h.tick(pm, float(t)).changes == ()

    # A ping to the peer: WireGuard starts a handshake (the session has expired).
    h.wg.send(KEYS[1].public, 148)
    plan = h.tick(pm, 5000.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {A} (traffic to it; candidate 1/1)"]
    assert plan.punch == ("home-1",)  # the peer must send too: ask it through the coordinator
    want = desired_peer(plan, KEYS[1].public)
    assert want.persistent_keepalive == PUNCH_KEEPALIVE and want.endpoint == Endpoint.parse(A)
    assert h.tick(pm, 5001.0).punch == ()  # asked once
    h.wg.handshake(KEYS[1].public, 5002.0)
    plan = h.tick(pm, 5002.0)
    assert path(plan, 1) == ("direct", A)
    assert desired_peer(plan, KEYS[1].public).persistent_keepalive == KEEPALIVE


def test_a_busy_path_and_a_lan_neighbour_never_go_lazy() -> None:
    h = Harness(lazy_after=LAZY_AFTER)
    lan = PeerEntry("home-2", KEYS[2].public, "10.250.0.12", "fd7a:f1ee::c", (B,), lan=True)
    pm = peermap(1, peer(1, A), lan)
    h.tick(pm, 0.0)
    h.wg.receive(KEYS[1].public)
    h.wg.receive(KEYS[2].public)
    assert {c.state for c in h.tick(pm, 1.0).changes} == {"direct"}
    for t in range(2, 1200):
        h.wg.send(KEYS[1].public, 40)  # 2.4 kB per 30 s window: data, not keepalives
        h.wg.receive(KEYS[1].public, 40)
        h.wg.receive(KEYS[2].public, 32)
        plan = h.tick(pm, float(t))
        assert plan.changes == (), plan.changes
    assert {p.persistent_keepalive for p in plan.desired.peers} == {KEEPALIVE}


def test_a_punch_request_in_the_map_wakes_a_lazy_or_a_relayed_peer_once() -> None:
    h = Harness(lazy_after=LAZY_AFTER)
    pm = peermap(1, peer(1, A), peer(2, B))
    h.tick(pm, 0.0)
    h.wg.receive(KEYS[1].public)
    h.tick(pm, 1.0)  # home-1 direct, home-2 will relay
    for t in range(2, 200):
        plan = h.tick(pm, float(t))
    assert path(plan, 2) == ("relay", None)
    assert desired_peer(plan, KEYS[1].public).persistent_keepalive == 0  # lazy

    asked = PeerMap(2, HUB, pm.peers, punch=(("home-1", 7), ("home-2", 3)))
    plan = h.tick(asked, 200.0)
    assert sorted(str(c) for c in plan.changes) == [
        f"peer home-1: trying {A} (home-1 asked for a direct path; candidate 1/1)",
        f"peer home-2: trying {B} (home-2 asked for a direct path; candidate 1/1)"]
    assert plan.punch == ()  # they asked: nothing to ask back
    # the same stamps in the next map are old news
    again = PeerMap(3, HUB, pm.peers, punch=(("home-1", 7), ("home-2", 3)))
    assert h.tick(again, 201.0).changes == ()
    h.wg.receive(KEYS[1].public)
    assert path(h.tick(again, 202.0), 1)[0] == "direct"
    # a new stamp for a direct peer changes nothing: the path is there
    newer = PeerMap(4, HUB, pm.peers, punch=(("home-1", 9), ("home-2", 3)))
    assert [c.name for c in h.tick(newer, 203.0).changes] == []


def test_without_the_coordinator_nothing_goes_lazy_and_lazy_paths_wake() -> None:
    h = Harness(lazy_after=LAZY_AFTER)
    pm = peermap(1, peer(1, A))
    direct_at(h, pm, 0.0)
    assert keepalives(h, pm, 1.0, 1000.0).changes[0].state == "lazy"
    h.sel.coordinator_ok = False
    plan = h.tick(pm, 1000.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {A} (the coordinator does not answer; candidate 1/1)"]
    assert plan.punch == ()  # it could not be delivered; the peer wakes for the same reason
    h.wg.receive(KEYS[1].public)
    assert path(h.tick(pm, 1001.0), 1)[0] == "direct"
    plan = keepalives(h, pm, 1002.0, 2000.0)
    assert plan.changes == ()  # no laziness while the coordinator is away
    assert desired_peer(plan, KEYS[1].public).persistent_keepalive == KEEPALIVE


def test_a_relayed_peer_whose_endpoint_changes_is_tried_once_and_keeps_its_pauses() -> None:
    """A symmetric NAT gives the peer a new port whenever its binding lapses: each change used
    to restart three minutes of free probing (~135 kB/h each) on every device of the fleet."""
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 0.0)
    t = DIRECT_TIMEOUT
    plan = h.tick(pm, t)
    while not any(p.public_key == KEYS[1].public for p in plan.desired.peers) or t < 400:
        assert plan.next_deadline is not None
        t = plan.next_deadline
        plan = h.tick(pm, t)
    paused = h.sel.state(KEYS[1].public)
    assert paused is not None and paused.pauses >= 2
    moved = peermap(2, peer(1, "203.0.113.7:40001"))
    plan = h.tick(moved, t + 1)
    assert [c.state for c in plan.changes] == ["trying"]
    plan = h.tick(moved, t + 1 + DIRECT_TIMEOUT)
    assert path(plan, 1) == ("relay", None)
    st = h.sel.state(KEYS[1].public)
    assert st is not None and st.pauses == paused.pauses and st.relay_since == 0.0 + DIRECT_TIMEOUT
    # one round of the new candidate, then the next (longer) pause: no free probing
    plan = h.tick(moved, t + 1 + DIRECT_TIMEOUT + RELAY_PROBE_DWELL)
    assert not any(p.public_key == KEYS[1].public for p in plan.desired.peers)
