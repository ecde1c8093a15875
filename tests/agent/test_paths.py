"""The path core with exact timestamps: every transition, and what it asks of WireGuard."""

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
from mesh.control import PeerEntry, PeerMap
from vpn import DesiredPeer, DeviceStatus, Endpoint, diff, generate_keypair

from .fakes import HUB, KEYS, FakeWireGuard, host, peer, peermap

ME = generate_keypair()
A, B = "203.0.113.7:51820", "192.168.1.7:51820"


class Harness:
    """The selector plus a fake device that applies each plan, as the reconcile loop does."""

    def __init__(self) -> None:
        self.sel = PathSelector(ME.private, HUB, 51820)
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


def test_constants_follow_wireguard_timers() -> None:
    assert DIRECT_TIMEOUT == 6.0 and REJECT_AFTER_TIME == 180.0
    assert KEEPALIVE == 25 and PUNCH_KEEPALIVE == 1 and RELAY_PROBE_DWELL > KEEPALIVE


def test_new_peer_tries_first_candidate_then_goes_direct_on_handshake() -> None:
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
    assert plan.next_deadline == 1000.0 + DIRECT_TIMEOUT

    # A handshake older than the attempt does not count; a newer one does.
    h.wg.handshake(KEYS[1].public, 1000.0)
    assert h.tick(pm, 1001.0).changes == ()
    h.wg.handshake(KEYS[1].public, 1002.0)
    plan = h.tick(pm, 1002.5)
    assert [str(c) for c in plan.changes] == [f"peer home-1: direct via {A} (punched)"]
    want = desired_peer(plan, KEYS[1].public)
    assert want.endpoint is None  # don't care: WireGuard roaming keeps working
    assert want.persistent_keepalive == KEEPALIVE
    assert set(want.allowed_ips) == mesh(1)
    assert path(plan, 1) == ("direct", A)
    assert plan.next_deadline == 1002.0 + REJECT_AFTER_TIME


def test_no_handshake_walks_candidates_then_relays_and_probes() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A, B))
    h.tick(pm, 1000.0)
    assert h.tick(pm, 1005.9).changes == ()
    plan = h.tick(pm, 1006.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {B} (no handshake in 6 s; candidate 2/2)"]
    assert desired_peer(plan, KEYS[1].public).endpoint == Endpoint.parse(B)
    assert plan.next_deadline == 1012.0
    assert h.tick(pm, 1011.9).changes == ()
    plan = h.tick(pm, 1012.0)
    assert [str(c) for c in plan.changes] == [
        "peer home-1: relay via hub (no direct handshake on 2 candidates; probing)"]
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
    assert plan.changes == ()
    assert desired_peer(plan, KEYS[1].public).endpoint == Endpoint.parse(B)
    plan = h.tick(pm, 1072.0)
    assert desired_peer(plan, KEYS[1].public).endpoint == Endpoint.parse(A)

    # A fresh handshake while relayed moves the addresses back to the peer.
    h.wg.handshake(KEYS[1].public, 1080.0)
    plan = h.tick(pm, 1080.5)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: direct via {A} (direct path found while relayed)"]
    assert set(desired_peer(plan, KEYS[1].public).allowed_ips) == mesh(1)
    assert hub_ips(plan) == {host(HUB.mesh_ipv4), host(HUB.mesh_ipv6)}
    assert set(h.wg.peers[KEYS[1].public].allowed) == mesh(1)


def test_single_candidate_relays_after_one_timeout_and_does_not_cycle() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 0.0)
    plan = h.tick(pm, DIRECT_TIMEOUT)
    assert path(plan, 1) == ("relay", None)
    assert plan.next_deadline is None
    plan = h.tick(pm, 500.0)
    assert desired_peer(plan, KEYS[1].public).endpoint == Endpoint.parse(A)


def test_direct_peer_with_stale_handshake_tries_again() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A, B))
    h.tick(pm, 1990.0)
    h.wg.handshake(KEYS[1].public, 2000.0)
    assert path(h.tick(pm, 2000.5), 1) == ("direct", A)
    assert h.tick(pm, 2180.0).changes == ()  # exactly REJECT_AFTER_TIME: still direct
    plan = h.tick(pm, 2180.1)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {A} (last handshake 180 s ago; candidate 1/2)"]
    want = desired_peer(plan, KEYS[1].public)
    assert want.endpoint == Endpoint.parse(A) and want.persistent_keepalive == PUNCH_KEEPALIVE


def test_direct_peer_lost_from_the_device_tries_again() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 10.0)
    h.wg.handshake(KEYS[1].public, 11.0)
    h.tick(pm, 11.5)
    h.wg.peers.clear()  # wireguard-go restarted under us
    plan = h.tick(pm, 12.0)
    assert [str(c) for c in plan.changes] == [
        f"peer home-1: trying {A} (no handshake; candidate 1/1)"]
    assert h.wg.peers[KEYS[1].public].endpoint == Endpoint.parse(A)


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


def test_restart_with_a_live_session_starts_direct() -> None:
    h = Harness()
    pm = peermap(1, peer(1, A))
    h.tick(pm, 100.0)
    h.wg.handshake(KEYS[1].public, 101.0)
    h.sel = PathSelector(ME.private, HUB, 51820)  # a new agent process, same device
    plan = h.tick(pm, 150.0)
    assert [str(c) for c in plan.changes] == [f"peer home-1: direct via {A} (session already up)"]
    # but a session past REJECT_AFTER_TIME does not count
    h.sel = PathSelector(ME.private, HUB, 51820)
    assert path(h.tick(pm, 281.5), 1) == ("none", A)


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
        plan = h.tick(pm, now)  # asserts diff(desired, applied) == []
        # applying the same plan again changes nothing
        status = h.wg.status()
        assert diff(h.sel.update(pm, status, now).desired, status) == []
        # every mesh address is owned by exactly one peer: the peer itself or the hub
        expected = {e.public_key for e in (pm.peers if pm else ())}
        assert {p.public_key for p in plan.paths} == expected
        hub = hub_ips(plan)
        for p in plan.paths:
            own = set(desired_peer(plan, p.public_key).allowed_ips)
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
def test_relay_deadline_only_with_several_candidates(n: int) -> None:
    h = Harness()
    eps = [A, B, "203.0.113.9:4000"][:n]
    pm = peermap(1, peer(1, *eps))
    for k in range(n + 1):
        plan = h.tick(pm, k * DIRECT_TIMEOUT)
    assert path(plan, 1) == ("relay", None)
    assert plan.next_deadline == (None if n == 1 else n * DIRECT_TIMEOUT + RELAY_PROBE_DWELL)
