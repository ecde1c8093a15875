"""Reconcile: exact diffs, the DeviceConfig apply sends, and convergence on a faithful fake."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, ip_network

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from vpn import (
    ZERO_KEY,
    AddPeer,
    DesiredDevice,
    DesiredPeer,
    DeviceConfig,
    DeviceStatus,
    Endpoint,
    IPNetwork,
    PeerConfig,
    PeerStatus,
    RemovePeer,
    SetDevice,
    UpdatePeer,
    apply,
    changes_to_config,
    diff,
    generate_keypair,
    generate_preshared_key,
    public_key_from_private,
    reconcile,
)


class FakeBackend:
    """Applies `set` with the UAPI's semantics (update_only, replace_allowed_ips, allowed IPs
    unique per device) and keeps session fields, so tests see what a daemon would keep."""

    def __init__(self, status: DeviceStatus | None = None) -> None:
        self.status = status or DeviceStatus(listen_port=40000)
        self.sent: list[DeviceConfig] = []

    def get(self) -> DeviceStatus:
        return self.status

    def set(self, config: DeviceConfig) -> None:
        self.sent.append(config)
        st_ = self.status
        priv = config.private_key if config.private_key is not None else st_.private_key
        peers = {} if config.replace_peers else {p.public_key: p for p in st_.peers}
        for pc in config.peers:
            cur = peers.get(pc.public_key)
            if pc.remove:
                peers.pop(pc.public_key, None)
                continue
            if cur is None:
                if pc.update_only:
                    continue
                cur = PeerStatus(pc.public_key)
            ips = () if pc.replace_allowed_ips else cur.allowed_ips
            new_ips = tuple(dict.fromkeys(ips + pc.allowed_ips))
            # An allowed IP belongs to one peer: claiming it takes it from the others.
            for k, other in peers.items():
                if k != pc.public_key:
                    peers[k] = dataclasses.replace(
                        other,
                        allowed_ips=tuple(n for n in other.allowed_ips if n not in pc.allowed_ips),
                    )
            psk = cur.preshared_key
            if pc.preshared_key is not None:
                psk = None if pc.preshared_key == ZERO_KEY else pc.preshared_key
            peers[pc.public_key] = dataclasses.replace(
                cur,
                preshared_key=psk,
                endpoint=pc.endpoint if pc.endpoint is not None else cur.endpoint,
                persistent_keepalive=(
                    pc.persistent_keepalive
                    if pc.persistent_keepalive is not None
                    else cur.persistent_keepalive
                ),
                allowed_ips=new_ips,
            )
        self.status = DeviceStatus(
            private_key=priv,
            public_key=public_key_from_private(priv) if priv else None,
            listen_port=config.listen_port if config.listen_port is not None else st_.listen_port,
            fwmark=config.fwmark if config.fwmark is not None else st_.fwmark,
            peers=tuple(peers.values()),
        )


ME = generate_keypair()
A = generate_keypair().public
B = generate_keypair().public
C = generate_keypair().public
PSK = generate_preshared_key()
EP_A = Endpoint(IPv4Address("198.51.100.10"), 51820)
EP_A2 = Endpoint(IPv4Address("198.51.100.11"), 51820)


def net(s: str) -> IPNetwork:
    return ip_network(s)


def test_empty_device_gets_everything() -> None:
    desired = DesiredDevice(
        ME.private,
        listen_port=51820,
        peers=(DesiredPeer(A, frozenset({net("10.0.0.2/32")}), EP_A, 25, PSK),),
    )
    changes = diff(desired, DeviceStatus(listen_port=40000))
    assert changes == [
        SetDevice(private_key=ME.private, listen_port=51820),
        AddPeer(desired.peers[0]),
    ]
    assert changes_to_config(changes) == DeviceConfig(
        private_key=ME.private,
        listen_port=51820,
        peers=(
            PeerConfig(
                A,
                preshared_key=PSK,
                endpoint=EP_A,
                persistent_keepalive=25,
                replace_allowed_ips=True,
                allowed_ips=(net("10.0.0.2/32"),),
            ),
        ),
    )


def actual_with(*peers: PeerStatus, fwmark: int = 0) -> DeviceStatus:
    return DeviceStatus(ME.private, ME.public, 51820, fwmark, peers)


def test_in_sync_is_empty_and_sends_nothing() -> None:
    actual = actual_with(
        PeerStatus(A, PSK, EP_A, (net("10.0.0.2/32"), net("fd00::2/128")), 25, 1700000000.5, 10, 20)
    )
    desired = DesiredDevice(
        ME.private,
        listen_port=51820,
        peers=(DesiredPeer(A, frozenset({net("fd00::2/128"), net("10.0.0.2/32")}), EP_A, 25, PSK),),
    )
    assert diff(desired, actual) == []
    backend = FakeBackend(actual)
    assert reconcile(desired, backend) == []
    assert backend.sent == []
    assert apply([], backend) is None and backend.sent == []


def test_endpoint_none_is_dont_care_so_roaming_is_kept() -> None:
    actual = actual_with(PeerStatus(A, endpoint=EP_A2, allowed_ips=(net("10.0.0.2/32"),)))
    desired = DesiredDevice(ME.private, peers=(DesiredPeer(A, frozenset({net("10.0.0.2/32")})),))
    assert diff(desired, actual) == []
    pinned = DesiredDevice(
        ME.private, peers=(DesiredPeer(A, frozenset({net("10.0.0.2/32")}), EP_A),)
    )
    assert diff(pinned, actual) == [UpdatePeer(A, endpoint=EP_A)]


def test_update_carries_only_what_differs() -> None:
    actual = actual_with(
        PeerStatus(A, PSK, EP_A, (net("10.0.0.2/32"),), 25),
        PeerStatus(B, None, None, (net("10.0.0.3/32"),), 0),
        PeerStatus(C, None, None, (net("10.0.0.4/32"),), 0),
        fwmark=5,
    )
    desired = DesiredDevice(
        ME.private,
        fwmark=0,
        peers=(
            DesiredPeer(A, frozenset({net("10.0.0.2/32")}), EP_A, 0, None),  # keepalive, psk off
            DesiredPeer(B, frozenset({net("10.0.0.3/32"), net("10.1.0.0/16")})),  # more IPs
        ),
    )
    changes = diff(desired, actual)
    assert changes == [
        SetDevice(fwmark=0),
        RemovePeer(C),
        UpdatePeer(A, persistent_keepalive=0, preshared_key=ZERO_KEY),
        UpdatePeer(B, allowed_ips=frozenset({net("10.0.0.3/32"), net("10.1.0.0/16")})),
    ]
    assert changes_to_config(changes) == DeviceConfig(
        fwmark=0,
        peers=(
            PeerConfig(C, remove=True),
            PeerConfig(A, update_only=True, persistent_keepalive=0, preshared_key=ZERO_KEY),
            PeerConfig(
                B,
                update_only=True,
                replace_allowed_ips=True,
                allowed_ips=(net("10.0.0.3/32"), net("10.1.0.0/16")),
            ),
        ),
    )
    backend = FakeBackend(actual)
    assert reconcile(desired, backend) == changes
    assert len(backend.sent) == 1
    assert diff(desired, backend.get()) == []
    assert reconcile(desired, backend) == [] and len(backend.sent) == 1


def test_private_key_change_and_dont_care_fields() -> None:
    other = generate_keypair()
    actual = actual_with()
    desired = DesiredDevice(other.private)  # listen_port/fwmark None: don't care
    assert diff(desired, actual) == [SetDevice(private_key=other.private)]


def test_desired_validation() -> None:
    with pytest.raises(ValueError, match="twice"):
        DesiredDevice(ME.private, peers=(DesiredPeer(A), DesiredPeer(A)))
    with pytest.raises(ValueError, match="both"):
        DesiredDevice(
            ME.private,
            peers=(
                DesiredPeer(A, frozenset({net("10.0.0.0/24")})),
                DesiredPeer(B, frozenset({net("10.0.0.0/24")})),
            ),
        )
    with pytest.raises(ValueError):
        DesiredPeer("nope")
    with pytest.raises(ValueError):
        DesiredPeer(A, persistent_keepalive=-1)
    assert DesiredPeer(A, preshared_key=ZERO_KEY).preshared_key is None


# --------------------------------------------------------------------------- property

KEYS = [generate_keypair().public for _ in range(6)]
PSKS = [generate_preshared_key() for _ in range(2)]
NETS = [net(f"10.{i}.0.0/16") for i in range(6)] + [net(f"fd00:{i}::/64") for i in range(4)]
ENDPOINTS = [Endpoint(IPv4Address(f"203.0.113.{i}"), 51820 + i) for i in range(1, 4)]
PRIVS = [generate_keypair().private for _ in range(2)]

peer_status = st.builds(
    PeerStatus,
    public_key=st.sampled_from(KEYS),
    preshared_key=st.none() | st.sampled_from(PSKS),
    endpoint=st.none() | st.sampled_from(ENDPOINTS),
    allowed_ips=st.lists(st.sampled_from(NETS), unique=True, max_size=4).map(tuple),
    persistent_keepalive=st.sampled_from([0, 25]),
    last_handshake=st.none() | st.just(1700000000.0),
)


@st.composite
def device_status(draw: st.DrawFn) -> DeviceStatus:
    peers = draw(st.lists(peer_status, unique_by=lambda p: p.public_key, max_size=5))
    # Make allowed IPs unique per device, as WireGuard guarantees.
    seen: set[IPNetwork] = set()
    fixed = []
    for p in peers:
        ips = tuple(n for n in p.allowed_ips if n not in seen)
        seen.update(ips)
        fixed.append(dataclasses.replace(p, allowed_ips=ips))
    priv = draw(st.none() | st.sampled_from(PRIVS))
    return DeviceStatus(
        priv,
        public_key_from_private(priv) if priv else None,
        draw(st.none() | st.sampled_from([40000, 51820])),
        draw(st.sampled_from([0, 7])),
        tuple(fixed),
    )


@st.composite
def desired_device(draw: st.DrawFn) -> DesiredDevice:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=5))
    pool = list(NETS)
    draw(st.randoms(use_true_random=False)).shuffle(pool)
    peers = []
    for k in keys:
        n = draw(st.integers(0, 2))
        ips, pool = pool[:n], pool[n:]
        peers.append(
            DesiredPeer(
                k,
                frozenset(ips),
                draw(st.none() | st.sampled_from(ENDPOINTS)),
                draw(st.sampled_from([0, 25])),
                draw(st.none() | st.sampled_from(PSKS)),
            )
        )
    return DesiredDevice(
        draw(st.sampled_from(PRIVS)),
        tuple(peers),
        draw(st.none() | st.sampled_from([51820, 51821])),
        draw(st.none() | st.sampled_from([0, 7])),
    )


@settings(max_examples=300, deadline=None)
@given(actual=device_status(), desired=desired_device())
def test_apply_converges_in_one_step(actual: DeviceStatus, desired: DesiredDevice) -> None:
    backend = FakeBackend(actual)
    first = reconcile(desired, backend)
    assert len(backend.sent) == (1 if first else 0)
    assert diff(desired, backend.get()) == []
    assert reconcile(desired, backend) == []
    assert len(backend.sent) == (1 if first else 0)
    # Sessions of peers that stay are kept (nothing re-created them).
    for p in actual.peers:
        after = backend.get().peer(p.public_key)
        if after is not None:
            assert after.last_handshake == p.last_handshake
