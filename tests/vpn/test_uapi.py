"""UAPI: parsing captured wireguard-go replies, formatting, errors, the client over sockets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_network
from pathlib import Path

import pytest
import trio

from vpn import (
    ZERO_KEY,
    DeviceConfig,
    DeviceStatus,
    Endpoint,
    PeerConfig,
    PeerStatus,
    UapiClient,
    UapiError,
    UapiProtocolError,
    WireGuardGo,
    format_set,
    generate_keypair,
    generate_preshared_key,
    key_to_hex,
    parse_errno,
    parse_get,
)

DATA = Path(__file__).parent / "data"

# Captured from wireguard-go 0.0.20220316 configured with `wg set` (see data/*.txt); the
# base64 values below are what `wg show` printed for the same device.
CAP_PRIVATE = "KPg6AUpqcxRI/oWWFa9JTjMrUsqSEmlHOi8KVK4JK14="
CAP_PUBLIC = "YKLVPL577tCqNChjuiZ3ZR0WV4Wp8RM+4UaB0MKb8jw="
CAP_PSK = "p466cc/Iax1vQFfZRY+BrP/eXigQu+TlVMcfc9f1DXY="
PEER_PSK = "vxZMMx/LM5XdMZifdP613DHcPbep4eo42yjSUexk90g="
PEER_V6 = "VNghlpvBMyudtCl+w1fF8OTolpI969s5Ynncwe9Jhi0="
PEER_BARE = "spT7T3MrZOVF/qKLc4MADKe+gUki6bkbUk4B+TNjmG0="
PEER_LIVE = "UZmJ1d3CkHNJ07jV1bIhNWKG8gRjkPJNC/Wf79JT31Q="

THREE_PEERS = (
    PeerStatus(
        public_key=PEER_PSK,
        preshared_key=CAP_PSK,
        endpoint=Endpoint(IPv4Address("198.51.100.7"), 51820),
        allowed_ips=(ip_network("10.77.0.2/32"), ip_network("fd77::2/128")),
        persistent_keepalive=25,
    ),
    PeerStatus(
        public_key=PEER_V6,
        endpoint=Endpoint(IPv6Address("2001:db8::5"), 4500),
        allowed_ips=(ip_network("10.77.1.0/24"), ip_network("fd77:1::/64")),
    ),
    PeerStatus(public_key=PEER_BARE),
)


def read(name: str) -> str:
    return (DATA / name).read_bytes().decode("ascii")


# --------------------------------------------------------------------------- parse_get


def test_parse_fresh_device() -> None:
    assert parse_get(read("get_empty.txt")) == DeviceStatus(listen_port=40315)


def test_parse_three_peers() -> None:
    assert parse_get(read("get_three_peers.txt")) == DeviceStatus(
        private_key=CAP_PRIVATE,
        public_key=CAP_PUBLIC,
        listen_port=51820,
        fwmark=0x1234,
        peers=THREE_PEERS,
    )


def test_parse_after_handshake() -> None:
    status = parse_get(read("get_handshake.txt"))
    assert status.public_key == CAP_PUBLIC
    assert status.peers[1:] == THREE_PEERS
    live = status.peers[0]
    assert live == PeerStatus(
        public_key=PEER_LIVE,
        endpoint=Endpoint(IPv4Address("127.0.0.1"), 51821),
        allowed_ips=(ip_network("10.78.0.2/32"), ip_network("fd78::2/128")),
        last_handshake=1795669502 + 373813696 / 1e9,
        rx_bytes=436,
        tx_bytes=92,
    )
    assert status.peer(PEER_LIVE) is live
    assert status.peer(generate_keypair().public) is None


def test_unknown_keys_are_ignored() -> None:
    text = (
        read("get_three_peers.txt")
        .replace("fwmark=4660\n", "fwmark=4660\nfuture_device_thing=x\n")
        .replace("protocol_version=1\n", "protocol_version=1\nfuture_peer_thing=7\n")
    )
    assert parse_get(text) == parse_get(read("get_three_peers.txt"))


def test_errno_in_get_reply_raises() -> None:
    with pytest.raises(UapiError) as info:
        parse_get("errno=-22\n\n")
    assert info.value.errno == 22
    assert "Invalid argument" in str(info.value)


PEER_HEX = key_to_hex(PEER_PSK)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "listen_port=1\n\n",  # no errno line
        "errno=zero\n\n",
        "listen_port=abc\nerrno=0\n\n",
        "listen_port=70000\nerrno=0\n\n",
        "listen_port=-1\nerrno=0\n\n",
        "private_key=abcd\nerrno=0\n\n",
        "private_key=" + "zz" * 32 + "\nerrno=0\n\n",
        "no equals sign\nerrno=0\n\n",
        "=value\nerrno=0\n\n",
        "allowed_ip=10.0.0.0/8\nerrno=0\n\n",  # peer key before any public_key
        "errno=0\nlisten_port=1\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nendpoint=198.51.100.1\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nendpoint=2001:db8::1:51820\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nendpoint=[2001:db8::1:51820\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nendpoint=198.51.100.1:99999\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nallowed_ip=10.0.0.0/33\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nallowed_ip=10.0.0.1\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nallowed_ip=banana/8\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nrx_bytes=1.5\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nrx_bytes=٣\nerrno=0\n\n",  # non-ASCII digit
        f"public_key={PEER_HEX}\nlast_handshake_time_nsec=1000000000\nerrno=0\n\n",
        f"public_key={PEER_HEX}\npersistent_keepalive_interval=65536\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nprotocol_version=2\nerrno=0\n\n",
        f"public_key={PEER_HEX}\nlisten_port=5\nerrno=0\n\n",
        f"public_key={PEER_HEX}\npublic_key={PEER_HEX}\nerrno=0\n\n",
    ],
)
def test_malformed_replies_raise_protocol_error(text: str) -> None:
    with pytest.raises(UapiProtocolError):
        parse_get(text)


def test_parse_errno() -> None:
    parse_errno("errno=0\n\n")
    with pytest.raises(UapiError) as info:
        parse_errno("errno=-22\n\n")
    assert info.value.errno == 22
    with pytest.raises(UapiError):
        parse_errno("errno=5\n\n")
    with pytest.raises(UapiProtocolError):
        parse_errno("ok\n\n")


# --------------------------------------------------------------------------- format_set

PSK = generate_preshared_key()
K1 = generate_keypair()
K2 = generate_keypair()
K3 = generate_keypair()

FULL_CONFIG = DeviceConfig(
    private_key=K1.private,
    listen_port=51820,
    fwmark=7,
    replace_peers=True,
    peers=(
        PeerConfig(
            K2.public,
            preshared_key=PSK,
            endpoint=Endpoint(IPv6Address("2001:db8::9"), 4500),
            persistent_keepalive=25,
            replace_allowed_ips=True,
            allowed_ips=(ip_network("10.9.0.2/32"), ip_network("fd09::2/128")),
        ),
        PeerConfig(K3.public, remove=True),
    ),
)


def test_format_set_exact() -> None:
    assert format_set(FULL_CONFIG) == (
        "set=1\n"
        f"private_key={key_to_hex(K1.private)}\n"
        "listen_port=51820\n"
        "fwmark=7\n"
        "replace_peers=true\n"
        f"public_key={key_to_hex(K2.public)}\n"
        f"preshared_key={key_to_hex(PSK)}\n"
        "endpoint=[2001:db8::9]:4500\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.9.0.2/32\n"
        "allowed_ip=fd09::2/128\n"
        f"public_key={key_to_hex(K3.public)}\n"
        "remove=true\n"
        "\n"
    )


def test_format_set_minimal_and_update_only() -> None:
    assert format_set(DeviceConfig()) == "set=1\n\n"
    cfg = DeviceConfig(peers=(PeerConfig(K2.public, update_only=True, persistent_keepalive=0),))
    assert format_set(cfg) == (
        f"set=1\npublic_key={key_to_hex(K2.public)}\nupdate_only=true\n"
        "persistent_keepalive_interval=0\n\n"
    )


def _status_from_set(text: str) -> DeviceStatus:
    """What a daemon would report after applying a set to an empty device (test oracle)."""
    get_like = "\n".join(
        line.replace("persistent_keepalive_interval", "persistent_keepalive_interval")
        for line in text.strip("\n").split("\n")[1:]
        if not line.startswith(("replace_", "update_only", "remove"))
    )
    return parse_get(get_like + "\nerrno=0\n\n")


def test_format_set_round_trips_through_parse() -> None:
    cfg = DeviceConfig(
        private_key=K1.private,
        listen_port=1234,
        peers=(
            PeerConfig(
                K2.public,
                preshared_key=PSK,
                endpoint=Endpoint(IPv4Address("203.0.113.4"), 9),
                persistent_keepalive=5,
                allowed_ips=(ip_network("10.0.0.0/24"),),
            ),
            PeerConfig(K3.public, endpoint=Endpoint(IPv6Address("::1"), 1)),
        ),
    )
    status = _status_from_set(format_set(cfg))
    assert status.private_key == K1.private and status.public_key == K1.public
    assert status.listen_port == 1234
    assert [p.public_key for p in status.peers] == [K2.public, K3.public]
    assert status.peers[0].preshared_key == PSK
    assert status.peers[0].endpoint == cfg.peers[0].endpoint
    assert status.peers[0].allowed_ips == cfg.peers[0].allowed_ips
    assert status.peers[0].persistent_keepalive == 5
    assert status.peers[1].endpoint == Endpoint(IPv6Address("::1"), 1)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        PeerConfig("short")
    with pytest.raises(ValueError):
        PeerConfig(K2.public, persistent_keepalive=70000)
    with pytest.raises(ValueError):
        PeerConfig(K2.public, remove=True, allowed_ips=(ip_network("10.0.0.0/8"),))
    with pytest.raises(TypeError):
        PeerConfig(K2.public, allowed_ips=("10.0.0.0/8",))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DeviceConfig(listen_port=65536)
    with pytest.raises(ValueError):
        DeviceConfig(fwmark=-1)
    with pytest.raises(ValueError):
        Endpoint(IPv4Address("1.2.3.4"), 70000)
    assert str(Endpoint.parse("[fd00::1]:5")) == "[fd00::1]:5"
    assert PeerConfig(K2.public, preshared_key=ZERO_KEY).preshared_key == ZERO_KEY


# --------------------------------------------------------------------------- client, fake daemon


async def _fake_daemon(path: str, reply: bytes, task_status: trio.TaskStatus[None]) -> None:
    """Accept one connection, read one request, answer `reply` (if any), keep it open."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(path)
        listener.listen(1)
        task_status.started()
        conn, _ = await listener.accept()
        with conn:
            buf = b""
            while not buf.endswith(b"\n\n"):
                chunk = await conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            if reply:
                await conn.send(reply)
            await trio.sleep_forever()


async def _with_fake(tmp_path: Path, reply: bytes, body: Callable[[UapiClient], object]) -> None:
    path = str(tmp_path / "fake.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(_fake_daemon, path, reply)
        try:
            await body(UapiClient(path, timeout=2.0))  # type: ignore[misc]
        finally:
            nursery.cancel_scope.cancel()


async def test_async_set_surfaces_errno(tmp_path: Path) -> None:
    async def body(client: UapiClient) -> None:
        with pytest.raises(UapiError) as info:
            await client.aset(DeviceConfig(listen_port=1))
        assert info.value.errno == 22 and info.value.raw_errno == -22

    with trio.fail_after(5):
        await _with_fake(tmp_path, b"errno=-22\n\n", body)


async def test_async_get_parses_captured_reply(tmp_path: Path) -> None:
    async def body(client: UapiClient) -> None:
        status = await client.aget()
        assert status.peers == THREE_PEERS

    with trio.fail_after(5):
        await _with_fake(tmp_path, (DATA / "get_three_peers.txt").read_bytes(), body)


async def test_async_timeout_when_daemon_is_silent(tmp_path: Path) -> None:
    # Real clock: autojump_clock would jump before the kernel delivers socket readiness.
    async def body(client: UapiClient) -> None:
        client.timeout = 0.2
        with pytest.raises(TimeoutError):
            await client.aget()

    with trio.fail_after(5):
        await _with_fake(tmp_path, b"", body)


async def test_async_reply_size_is_bounded(tmp_path: Path) -> None:
    async def body(client: UapiClient) -> None:
        client.max_reply_bytes = 1000
        with pytest.raises(UapiProtocolError, match="exceeds"):
            await client.aget()

    with trio.fail_after(5):
        await _with_fake(tmp_path, b"x=" + b"y" * 5000 + b"\n", body)


def _thread_daemon(path: str, reply: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                buf = b""
                while not buf.endswith(b"\n\n"):
                    buf += conn.recv(4096)
                conn.sendall(reply)
                # Short replies: then close, so a client waiting for more sees EOF.

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sync_client_errno_and_truncation(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    t = _thread_daemon(path, b"errno=-1\n\n")
    with pytest.raises(UapiError) as info:
        UapiClient(path, timeout=2).set(DeviceConfig(listen_port=1))
    assert info.value.errno == 1
    t.join(2)

    path = str(tmp_path / "b.sock")
    t = _thread_daemon(path, b"listen_port=1\n")  # closes mid-reply
    with pytest.raises(UapiProtocolError, match="closed"):
        UapiClient(path, timeout=2).get()
    t.join(2)


def test_sync_client_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        UapiClient(tmp_path / "nope.sock", timeout=1).get()
    with pytest.raises(ValueError):
        UapiClient(tmp_path / "x", timeout=0)


# --------------------------------------------------------------------------- real wireguard-go


@pytest.mark.lab
def test_real_daemon_round_trip_and_errno(
    make_netns: Callable[[str], str], make_wg: Callable[..., WireGuardGo]
) -> None:
    ns = make_netns("u")
    wg = make_wg("wgu0", ns)
    client = wg.client()
    cfg = DeviceConfig(
        private_key=K1.private,
        listen_port=51999,
        fwmark=0x42,
        peers=(
            PeerConfig(
                K2.public,
                preshared_key=PSK,
                endpoint=Endpoint(IPv6Address("2001:db8::9"), 4500),
                persistent_keepalive=25,
                allowed_ips=(ip_network("10.9.0.2/32"), ip_network("fd09::2/128")),
            ),
            PeerConfig(K3.public, endpoint=Endpoint(IPv4Address("203.0.113.9"), 51820)),
        ),
    )
    client.set(cfg)
    status = client.get()
    assert status.private_key == K1.private and status.public_key == K1.public
    assert (status.listen_port, status.fwmark) == (51999, 0x42)
    by_key = {p.public_key: p for p in status.peers}
    assert by_key[K2.public] == PeerStatus(
        public_key=K2.public,
        preshared_key=PSK,
        endpoint=Endpoint(IPv6Address("2001:db8::9"), 4500),
        allowed_ips=(ip_network("10.9.0.2/32"), ip_network("fd09::2/128")),
        persistent_keepalive=25,
    )
    assert by_key[K3.public].endpoint == Endpoint(IPv4Address("203.0.113.9"), 51820)

    # Removing a PSK is the all-zero key.
    client.set(
        DeviceConfig(peers=(PeerConfig(K2.public, update_only=True, preshared_key=ZERO_KEY),))
    )
    assert client.get().peer(K2.public).preshared_key is None  # type: ignore[union-attr]

    # wireguard-go refuses what it cannot parse and says so with an errno.
    bad = PeerConfig(K2.public, update_only=True)
    text = format_set(DeviceConfig(peers=(bad,))).replace(
        "update_only=true\n", "update_only=true\nallowed_ip=10.1.2.3/33\n"
    )
    with pytest.raises(UapiError) as info:
        # Raw text on purpose: our own formatter refuses to produce this.
        parse_errno(client.request(text))
    assert info.value.errno == 22
    # The device survives a rejected request.
    assert client.get().listen_port == 51999


@pytest.mark.lab
async def test_real_daemon_async_errno(
    make_netns: Callable[[str], str], make_wg: Callable[..., WireGuardGo]
) -> None:
    wg = make_wg("wgu1", make_netns("v"))
    client = wg.client()
    with trio.fail_after(5):
        await client.aset(DeviceConfig(listen_port=51998))
        assert (await client.aget()).listen_port == 51998
        with pytest.raises(UapiError) as info:
            parse_errno(await client.arequest("set=1\nlisten_port=banana\n\n"))
    assert info.value.errno == 22
