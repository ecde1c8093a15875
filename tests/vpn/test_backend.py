"""Backend selection and the kernel backend's netlink translation (no kernel module needed:
messages are encoded and decoded by pyroute2's own WireGuard message class)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_network
from pathlib import Path
from socket import AF_INET, AF_INET6, inet_pton

import pytest
from pyroute2.netlink.generic.wireguard import wgmsg  # type: ignore[import-untyped]

from vpn import (
    ZERO_KEY,
    Endpoint,
    KernelBackend,
    PeerConfig,
    PeerStatus,
    UapiBackend,
    WireGuardBackend,
    generate_keypair,
    generate_preshared_key,
    kernel_wireguard_available,
    open_backend,
)
from vpn._backend import _peer_to_pyroute2, _status_from_netlink


def _allowed(family: int, addr: str, mask: int) -> dict[str, object]:
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", inet_pton(family, addr)],
            ["WGALLOWEDIP_A_CIDR_MASK", mask],
        ]
    }


def _round_trip(attrs: list[list[object]]) -> object:
    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["attrs"] = attrs
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def test_status_from_netlink_dump_merges_split_peers() -> None:
    me, p1, p2 = generate_keypair(), generate_keypair().public, generate_keypair().public
    psk = generate_preshared_key()
    first = _round_trip(
        [
            ["WGDEVICE_A_IFNAME", "wg0"],
            ["WGDEVICE_A_PRIVATE_KEY", me.private],
            ["WGDEVICE_A_LISTEN_PORT", 51820],
            ["WGDEVICE_A_FWMARK", 7],
            [
                "WGDEVICE_A_PEERS",
                [
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", p1],
                            ["WGPEER_A_PRESHARED_KEY", psk],
                            ["WGPEER_A_ENDPOINT", {"addr": "198.51.100.3", "port": 51820}],
                            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                            [
                                "WGPEER_A_LAST_HANDSHAKE_TIME",
                                {"tv_sec": 1700000000, "tv_nsec": 500000000},
                            ],
                            ["WGPEER_A_RX_BYTES", 10],
                            ["WGPEER_A_TX_BYTES", 20],
                            ["WGPEER_A_ALLOWEDIPS", [_allowed(AF_INET, "10.0.0.0", 24)]],
                        ]
                    }
                ],
            ],
        ]
    )
    # The kernel continues a big peer in the next message, repeating its public key.
    second = _round_trip(
        [
            ["WGDEVICE_A_IFNAME", "wg0"],
            [
                "WGDEVICE_A_PEERS",
                [
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", p1],
                            ["WGPEER_A_ALLOWEDIPS", [_allowed(AF_INET6, "fd00::", 64)]],
                        ]
                    },
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", p2],
                            ["WGPEER_A_PRESHARED_KEY", ZERO_KEY],
                            [
                                "WGPEER_A_ENDPOINT",
                                {"addr": "2001:db8::1", "port": 4500, "flowinfo": 0, "scope_id": 0},
                            ],
                        ]
                    },
                ],
            ],
        ]
    )
    status = _status_from_netlink([first, second])
    assert (status.private_key, status.public_key) == (me.private, me.public)
    assert (status.listen_port, status.fwmark) == (51820, 7)
    assert status.peers == (
        PeerStatus(
            public_key=p1,
            preshared_key=psk,
            endpoint=Endpoint(IPv4Address("198.51.100.3"), 51820),
            allowed_ips=(ip_network("10.0.0.0/24"), ip_network("fd00::/64")),
            persistent_keepalive=25,
            last_handshake=1700000000.5,
            rx_bytes=10,
            tx_bytes=20,
        ),
        PeerStatus(public_key=p2, endpoint=Endpoint(IPv6Address("2001:db8::1"), 4500)),
    )


def test_peer_config_to_pyroute2_dict() -> None:
    k = generate_keypair().public
    assert _peer_to_pyroute2(PeerConfig(k, remove=True)) == {"public_key": k, "remove": True}
    assert _peer_to_pyroute2(
        PeerConfig(
            k,
            update_only=True,
            endpoint=Endpoint(IPv6Address("2001:db8::1"), 9),
            persistent_keepalive=0,
            replace_allowed_ips=True,
        )
    ) == {
        "public_key": k,
        "update_only": True,
        "endpoint_addr": "2001:db8::1",
        "endpoint_port": 9,
        "persistent_keepalive": 0,
        "replace_allowed_ips": True,
        "allowed_ips": [],
    }


def test_open_backend_choice(tmp_path: Path) -> None:
    b = open_backend("wg0", socket_path=tmp_path / "wg0.sock")
    assert isinstance(b, UapiBackend) and isinstance(b, WireGuardBackend)
    assert isinstance(KernelBackend("wg0"), WireGuardBackend)
    if kernel_wireguard_available():
        assert isinstance(open_backend("fmnosuch0", netns="x"), KernelBackend)
    else:
        with pytest.raises(FileNotFoundError, match="kernel module"):
            open_backend("fmnosuch0", netns="x")
