"""Direct WireGuard paths through real NAT routers: the hub on the coordinator node learns each
device's NAT-mapped endpoint from its handshake; a pair told each other's mapped endpoint at the
same time gets a direct tunnel through two home-router (`firewall`) NATs, and does not through
`hard` or `symmetric` NATs (those need the relay). Real namespaces, iptables, wireguard-go."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from lab import Lab, parse_topology
from lab.wgmesh import WG_PORT, WireGuardLab

from .conftest import lab_skip_reason, lab_up

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

DEVICES = ["fwa-1", "fwb-1", "harda-1", "hardb-1", "sym-1", "cell-1"]


@pytest.fixture(scope="module")
def mesh() -> Iterator[WireGuardLab]:
    topology = parse_topology({"lan": [
        {"name": "fwa", "nat": "firewall", "devices": 1},
        {"name": "fwb", "nat": "firewall", "devices": 1},
        {"name": "harda", "nat": "hard", "devices": 1},
        {"name": "hardb", "nat": "hard", "devices": 1},
        {"name": "sym", "nat": "symmetric", "devices": 1},
        {"name": "cell", "nat": "double", "devices": 1},
    ]}, source="tests/lab/test_nat_traversal.py")
    with lab_up(topology) as lab, WireGuardLab(lab, DEVICES) as wg:
        yield wg


def wan_address_of(lab: Lab, device: str) -> ipaddress.IPv4Address:
    """The address a device's traffic leaves the lab's WAN with: its outermost router's."""
    lan = lab.node(device).lan
    assert lan is not None
    outer = [r for r in lab.routers if r.lan == lan and r.wan_ipv4 and
             ipaddress.IPv4Address(r.wan_ipv4) in lab.topology.wan_subnet]
    assert len(outer) == 1
    return ipaddress.IPv4Address(outer[0].wan_ipv4)


def test_hub_sees_nat_mapped_endpoints(mesh: WireGuardLab) -> None:
    for device in DEVICES:
        seen = mesh.observed_endpoint(device)
        # Not the device's own (private) address: the router's public one.
        assert seen.host == wan_address_of(mesh.lab, device), device
        assert seen.host != ipaddress.IPv4Address(mesh.lab.node(device).underlay_ipv4)
    # MASQUERADE keeps the source port where it can; --random-fully never does.
    assert mesh.observed_endpoint("fwa-1").port == WG_PORT
    assert mesh.observed_endpoint("harda-1").port == WG_PORT


def test_direct_tunnel_through_two_firewall_nats(mesh: WireGuardLab) -> None:
    mesh.punch("fwa-1", "fwb-1")
    assert mesh.wait_direct("fwa-1", "fwb-1"), "no handshake between fwa-1 and fwb-1"
    for a, b in (("fwa-1", "fwb-1"), ("fwb-1", "fwa-1")):
        assert mesh.ping(a, b, 4), f"{a} -> {b} over IPv4 in the tunnel"
        assert mesh.ping(a, b, 6), f"{a} -> {b} over IPv6 in the tunnel"
        # The path is direct: the peer's endpoint is the other router's WAN address,
        # not the hub's.
        peer = mesh.members[a].wg.backend().get().peer(mesh.members[b].keys.public)
        assert peer is not None and peer.endpoint is not None
        assert peer.endpoint.host == wan_address_of(mesh.lab, b)


def test_direct_tunnel_behind_carrier_nat(mesh: WireGuardLab) -> None:
    mesh.punch("fwb-1", "cell-1")
    assert mesh.wait_direct("fwb-1", "cell-1")
    assert mesh.ping("cell-1", "fwb-1", 4) and mesh.ping("fwb-1", "cell-1", 6)


def test_hard_nats_give_no_direct_path(mesh: WireGuardLab) -> None:
    # The first punch reaches the other router before that side has sent anything: with no
    # inbound drop rule it leaves an UNREPLIED conntrack entry there, MASQUERADE then remaps
    # the other side's source port, and neither side's packets match the other's mapping.
    mesh.punch("harda-1", "hardb-1", stagger=0.5)
    assert not mesh.wait_direct("harda-1", "hardb-1")
    assert not mesh.ping("harda-1", "hardb-1", 4)


def test_symmetric_nat_gives_no_direct_path(mesh: WireGuardLab) -> None:
    assert mesh.observed_endpoint("sym-1").host == wan_address_of(mesh.lab, "sym-1")
    mesh.punch("fwa-1", "sym-1")
    assert not mesh.wait_direct("fwa-1", "sym-1")
    assert not mesh.ping("sym-1", "fwa-1", 4)
