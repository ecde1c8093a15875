"""The peer-map codec (mesh.control): a full 10,000-peer map is accepted, the byte bound
follows from the peer bound, and a delta is validated and applied only to its own base."""

from __future__ import annotations

import json

import pytest

from mesh.control import (
    MAX_ENDPOINTS,
    MAX_MAP_PEERS,
    MAX_PEERMAP_BYTES,
    MAX_PEERS,
    MAX_PORTS_TEXT,
    PEER_JSON_BYTES,
    ControlError,
    HubInfo,
    PeerEntry,
    PeerMap,
    PeerMapDelta,
    peermap_answer,
)
from mesh.policy import ANY, Ports, parse_ports
from vpn import generate_keypair

HUB = HubInfo(generate_keypair().public, "198.51.100.1:51820", "10.250.0.1", "fd7a:f1ee:7000::1",
              "https://10.250.0.1:8443")
KEY = generate_keypair().public


def peer(i: int, endpoints: tuple[str, ...] = ("203.0.113.9:41641",)) -> PeerEntry:
    return PeerEntry(f"device-{i:05d}", KEY, f"10.250.{i // 250}.{i % 250 + 2}",
                     f"fd7a:f1ee:7000::{i + 2:x}", endpoints)


def test_a_full_10000_peer_map_is_accepted() -> None:
    m = PeerMap(7, HUB, tuple(peer(i) for i in range(10_000)), ("10.250.255.1/32",), 3)
    raw = json.dumps(m.to_json()).encode()
    assert 1024 * 1024 < len(raw) <= MAX_PEERMAP_BYTES  # over the old 256 KiB / 1 MiB bounds
    assert PeerMap.from_json(json.loads(raw)) == m


# the longest ports text the codec takes: ranges of five-digit ports up to MAX_PORTS_TEXT
WIDEST_PORTS = parse_ports(",".join(f"udp/{10000 + 4 * i}-{10001 + 4 * i}" for i in range(64))
                           [:MAX_PORTS_TEXT].rpartition(",")[0])


def test_ports_are_optional_and_round_trip() -> None:
    plain = peer(1).to_json()
    assert "send" not in plain and "accept" not in plain  # no policy: as before the field
    assert PeerEntry.from_json(plain).send is None
    for send, accept in ((parse_ports("tcp/554,udp/5000-5100"), Ports(())), (ANY, WIDEST_PORTS)):
        e = PeerEntry("p", KEY, "10.250.0.9", "fd7a:f1ee:7000::9", send=send, accept=accept)
        back = PeerEntry.from_json(json.loads(json.dumps(e.to_json())))
        assert (back.send, back.accept) == (send, accept)
    assert PeerEntry.from_json({**plain, "send": ""}).send == Ports(())  # nothing beyond ours


@pytest.mark.parametrize(("value", "error"), [
    ("tcp/0", "peer.send: 'tcp/0' must be ports 1-65535"),
    ("ftp", "peer.send: 'ftp' is not any"),
    (5, "peer.send: must be str"),
    ("tcp," * 30, "peer.send: longer than 96 characters"),
])
def test_bad_ports_are_one_error_line(value: object, error: str) -> None:
    with pytest.raises(ControlError, match=error):
        PeerEntry.from_json({**peer(1).to_json(), "send": value})


def test_the_byte_bound_covers_the_largest_peer() -> None:
    """PEER_JSON_BYTES is what one peer can add to a map at most: its largest entry, its punch
    stamp, and its share of relay_ips (MAX_PEERS networks spread over MAX_MAP_PEERS peers)."""
    name = "a" * 63
    widest = PeerEntry(name, KEY, "255.255.255.255",
                       "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                       ("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",) * MAX_ENDPOINTS, True,
                       send=WIDEST_PORTS, accept=WIDEST_PORTS)
    entry = len(json.dumps(widest.to_json())) + len(", ")
    stamp = len(json.dumps({name: 2**63 - 1})) - 2 + len(", ")
    relay = len(json.dumps(["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"])) * MAX_PEERS
    assert entry + stamp + relay / MAX_MAP_PEERS <= PEER_JSON_BYTES


def test_more_peers_than_the_bound_are_refused() -> None:
    m = PeerMap(7, HUB).to_json()
    m["peers"] = [peer(0).to_json()] * (MAX_MAP_PEERS + 1)
    with pytest.raises(ControlError, match=f"peers: more than {MAX_MAP_PEERS}"):
        PeerMap.from_json(m)


def _delta(**kw: object) -> dict[str, object]:
    d = PeerMapDelta(9, 7, HUB, (peer(1),), ("device-00002",)).to_json()
    d.update(kw)
    return d


@pytest.mark.parametrize(("change", "message"), [
    ({"base": 9}, "base: must be"),
    ({"base": -1}, "base: must be"),
    ({"base": True}, "base: must be an integer"),
    ({"remove": ["Not A Name"]}, r"remove\[0\]"),
    ({"remove": ["device-00001"]}, "twice"),
    ({"upsert": [peer(1).to_json(), peer(1).to_json()]}, "twice"),
    ({"remove": ["device-00003"] * 2}, "twice"),
    ({"upsert": [{"name": "x"}]}, r"upsert\[0\]"),
    ({"remove": None}, "remove: missing"),
    ({"upsert": [peer(0).to_json()] * (MAX_MAP_PEERS + 1)}, "more than"),
])
def test_a_malformed_delta_is_one_line(change: dict[str, object], message: str) -> None:
    with pytest.raises(ControlError, match=message) as exc:
        peermap_answer(_delta(**change))
    assert "\n" not in str(exc.value)


def test_a_delta_applies_only_to_its_base() -> None:
    held = PeerMap(7, HUB, (peer(0), peer(2), peer(3)))
    delta = PeerMapDelta.from_json(_delta())
    after = delta.apply(held)
    assert [p.name for p in after.peers] == ["device-00000", "device-00001", "device-00003"]
    assert after.version == 9
    with pytest.raises(ControlError, match="base"):
        delta.apply(PeerMap(8, HUB, held.peers))
    # removing a name the map lacks is no error: that peer came and went since the base
    assert PeerMapDelta(9, 7, HUB, remove=("device-00042",)).apply(held).peers == held.peers


def test_a_delta_cannot_grow_a_map_past_the_bound() -> None:
    held = PeerMap(7, HUB, tuple(peer(i) for i in range(MAX_MAP_PEERS)))
    with pytest.raises(ControlError, match="more than"):
        PeerMapDelta(9, 7, HUB, (peer(MAX_MAP_PEERS),)).apply(held)
