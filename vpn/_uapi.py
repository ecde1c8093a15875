"""The cross-platform userspace WireGuard protocol (https://www.wireguard.com/xplatform/).

Requests are `get=1\\n\\n` or `set=1\\n` + key=value lines + `\\n`; every reply ends with
`errno=N\\n\\n`. Keys travel as hex. Parsing is strict about values and lenient about unknown
keys, which the protocol reserves for future versions.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Iterator
from typing import Final

import trio

from ._keys import ZERO_KEY, InvalidKeyError, key_from_hex, key_to_hex, public_key_from_private
from ._model import (
    MAX_FWMARK,
    MAX_KEEPALIVE,
    MAX_PORT,
    DeviceConfig,
    DeviceStatus,
    Endpoint,
    IPNetwork,
    PeerStatus,
    parse_network,
)

# 1000 peers x ~500 bytes each fits easily; beyond this a reply is not one we trust.
MAX_REPLY_BYTES: Final = 4 * 1024 * 1024
# A local daemon answers in microseconds; seconds mean it is wedged.
DEFAULT_TIMEOUT: Final = 5.0
_U64_MAX: Final = 2**64 - 1


class UapiProtocolError(ValueError):
    """The daemon's reply (or the text given to parse_get) is not valid UAPI."""


class UapiError(OSError):
    """The daemon answered errno != 0 (wireguard-go sends it negated, e.g. -22 for EINVAL)."""

    def __init__(self, errno: int, operation: str = "request") -> None:
        code = abs(errno)
        super().__init__(code, f"WireGuard UAPI {operation} failed: {os.strerror(code)}")
        self.raw_errno = errno


# --------------------------------------------------------------------------- formatting


def _b(value: bool) -> str:
    return "true" if value else "false"


def format_set(config: DeviceConfig) -> str:
    """The full `set=1` request for a DeviceConfig, terminated by the blank line."""
    lines = ["set=1"]
    if config.private_key is not None:
        lines.append(f"private_key={key_to_hex(config.private_key)}")
    if config.listen_port is not None:
        lines.append(f"listen_port={config.listen_port}")
    if config.fwmark is not None:
        lines.append(f"fwmark={config.fwmark}")
    if config.replace_peers:
        lines.append("replace_peers=true")
    for peer in config.peers:
        # public_key opens the peer's section; flags must precede the values they modify.
        lines.append(f"public_key={key_to_hex(peer.public_key)}")
        if peer.remove:
            lines.append("remove=true")
            continue
        if peer.update_only:
            lines.append("update_only=true")
        if peer.preshared_key is not None:
            lines.append(f"preshared_key={key_to_hex(peer.preshared_key)}")
        if peer.endpoint is not None:
            lines.append(f"endpoint={peer.endpoint}")
        if peer.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        if peer.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        for net in peer.allowed_ips:
            lines.append(f"allowed_ip={net}")
    return "\n".join(lines) + "\n\n"


# --------------------------------------------------------------------------- parsing

_DEVICE_KEYS: Final = frozenset({"private_key", "listen_port", "fwmark"})
_PEER_KEYS: Final = frozenset(
    {
        "preshared_key",
        "endpoint",
        "allowed_ip",
        "persistent_keepalive_interval",
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "rx_bytes",
        "tx_bytes",
        "protocol_version",
    }
)


def _int(key: str, value: str, high: int) -> int:
    if not value.isascii() or not value.isdigit():
        raise UapiProtocolError(f"{key}: expected a decimal integer, got {value!r}")
    n = int(value)
    if n > high:
        raise UapiProtocolError(f"{key}: {n} is out of range 0..{high}")
    return n


def _key(key: str, value: str) -> str:
    try:
        return key_from_hex(value)
    except InvalidKeyError as exc:
        raise UapiProtocolError(f"{key}: {exc}") from exc


def _lines(text: str) -> Iterator[tuple[str, str]]:
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UapiProtocolError(f"malformed line {line[:80]!r}")
        yield key, value


def _split_errno(text: str) -> tuple[str, int]:
    """Separate the body from the trailing errno line, which every reply must have."""
    body = text[:-1] if text.endswith("\n\n") else text
    head, _, last = body.rstrip("\n").rpartition("\n")
    key, sep, value = last.partition("=")
    if key != "errno" or not sep:
        raise UapiProtocolError("reply does not end with an errno line")
    digits = value.removeprefix("-")
    if not digits.isascii() or not digits.isdigit():
        raise UapiProtocolError(f"errno: expected an integer, got {value!r}")
    return head, int(value)


def parse_errno(text: str, operation: str = "set") -> None:
    """Check a `set` reply: raise UapiError for errno != 0, UapiProtocolError if malformed."""
    _, code = _split_errno(text)
    if code != 0:
        raise UapiError(code, operation)


class _PeerBuilder:
    __slots__ = (
        "allowed_ips",
        "endpoint",
        "hs_nsec",
        "hs_sec",
        "keepalive",
        "preshared_key",
        "public_key",
        "rx_bytes",
        "tx_bytes",
    )

    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        self.preshared_key: str | None = None
        self.endpoint: Endpoint | None = None
        self.keepalive = 0
        self.allowed_ips: list[IPNetwork] = []
        self.hs_sec = 0
        self.hs_nsec = 0
        self.rx_bytes = 0
        self.tx_bytes = 0

    def build(self) -> PeerStatus:
        handshake = None
        if self.hs_sec or self.hs_nsec:
            handshake = self.hs_sec + self.hs_nsec / 1e9
        return PeerStatus(
            public_key=self.public_key,
            preshared_key=None if self.preshared_key == ZERO_KEY else self.preshared_key,
            endpoint=self.endpoint,
            allowed_ips=tuple(self.allowed_ips),
            persistent_keepalive=self.keepalive,
            last_handshake=handshake,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
        )


def parse_get(text: str) -> DeviceStatus:
    """Parse a complete `get=1` reply (including its errno line) into a DeviceStatus."""
    body, code = _split_errno(text)
    if code != 0:
        raise UapiError(code, "get")
    private_key: str | None = None
    listen_port: int | None = None
    fwmark = 0
    peers: list[PeerStatus] = []
    seen: set[str] = set()
    cur: _PeerBuilder | None = None
    for key, value in _lines(body):
        if key == "public_key":
            if cur is not None:
                peers.append(cur.build())
            pub = _key(key, value)
            if pub in seen:
                raise UapiProtocolError(f"peer {pub} listed twice")
            seen.add(pub)
            cur = _PeerBuilder(pub)
        elif cur is None:
            if key == "private_key":
                private_key = _key(key, value)
            elif key == "listen_port":
                listen_port = _int(key, value, MAX_PORT)
            elif key == "fwmark":
                fwmark = _int(key, value, MAX_FWMARK)
            elif key == "errno":
                raise UapiProtocolError("errno line before the end of the reply")
            elif key in _PEER_KEYS:
                raise UapiProtocolError(f"peer key {key!r} before any public_key")
            # other device-level keys: reserved for future versions, ignored
        elif key in _DEVICE_KEYS or key == "errno":
            raise UapiProtocolError(f"device key {key!r} inside peer {cur.public_key}")
        elif key == "preshared_key":
            cur.preshared_key = _key(key, value)
        elif key == "endpoint":
            try:
                cur.endpoint = Endpoint.parse(value)
            except ValueError as exc:
                raise UapiProtocolError(f"endpoint: {exc}") from exc
        elif key == "allowed_ip":
            try:
                net = parse_network(value)
            except ValueError as exc:
                raise UapiProtocolError(f"allowed_ip: {exc}") from exc
            if "/" not in value:
                raise UapiProtocolError(f"allowed_ip: missing prefix length in {value!r}")
            cur.allowed_ips.append(net)
        elif key == "persistent_keepalive_interval":
            cur.keepalive = _int(key, value, MAX_KEEPALIVE)
        elif key == "last_handshake_time_sec":
            cur.hs_sec = _int(key, value, _U64_MAX)
        elif key == "last_handshake_time_nsec":
            cur.hs_nsec = _int(key, value, 999_999_999)
        elif key == "rx_bytes":
            cur.rx_bytes = _int(key, value, _U64_MAX)
        elif key == "tx_bytes":
            cur.tx_bytes = _int(key, value, _U64_MAX)
        elif key == "protocol_version" and _int(key, value, _U64_MAX) != 1:
            raise UapiProtocolError(f"unsupported protocol_version {value}")
        # other peer-level keys: reserved for future versions, ignored
    if cur is not None:
        peers.append(cur.build())
    return DeviceStatus(
        private_key=private_key,
        public_key=public_key_from_private(private_key) if private_key else None,
        listen_port=listen_port,
        fwmark=fwmark,
        peers=tuple(peers),
    )


# --------------------------------------------------------------------------- transport


def _reply_complete(buf: bytes | bytearray) -> bool:
    # A blank line occurs only at the end of a reply, so "\n\n" at the tail marks completion.
    return buf.endswith(b"\n\n")


def _decode_reply(buf: bytes) -> str:
    if not _reply_complete(buf):
        raise UapiProtocolError("daemon closed the connection before a complete reply")
    try:
        return buf.decode("ascii")
    except UnicodeDecodeError as exc:
        raise UapiProtocolError("reply is not ASCII") from exc


class UapiClient:
    """Talks to one userspace WireGuard daemon's control socket, one request per connection."""

    __slots__ = ("max_reply_bytes", "socket_path", "timeout")

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        timeout: float = DEFAULT_TIMEOUT,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds")
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self.max_reply_bytes = max_reply_bytes

    def __repr__(self) -> str:
        return f"UapiClient({self.socket_path!r})"

    # sync ---------------------------------------------------------------

    def request(self, request: str) -> str:
        """Send one raw request; return the complete raw reply (errno not interpreted)."""
        # One overall deadline: per-call socket timeouts alone would let a trickling peer
        # stretch the total wait without bound.
        end = time.monotonic() + self.timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
                sock.sendall(request.encode("ascii"))
                buf = bytearray()
                while not _reply_complete(buf):
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no complete UAPI reply from {self.socket_path}")
                    sock.settimeout(remaining)
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > self.max_reply_bytes:
                        raise UapiProtocolError(
                            f"reply exceeds {self.max_reply_bytes} bytes; refusing it"
                        )
            except TimeoutError as exc:
                raise TimeoutError(f"no UAPI reply from {self.socket_path}") from exc
        return _decode_reply(bytes(buf))

    def get(self) -> DeviceStatus:
        return parse_get(self.request("get=1\n\n"))

    def set(self, config: DeviceConfig) -> None:
        parse_errno(self.request(format_set(config)), "set")

    # trio ---------------------------------------------------------------

    async def arequest(self, request: str) -> str:
        """Trio version of request(), under one trio.fail_after deadline."""
        buf = bytearray()
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_unix_socket(self.socket_path)
                async with stream:
                    await stream.send_all(request.encode("ascii"))
                    while not _reply_complete(buf):
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        buf += chunk
                        if len(buf) > self.max_reply_bytes:
                            raise UapiProtocolError(
                                f"reply exceeds {self.max_reply_bytes} bytes; refusing it"
                            )
        except trio.TooSlowError as exc:
            raise TimeoutError(f"no UAPI reply from {self.socket_path}") from exc
        return _decode_reply(bytes(buf))

    async def aget(self) -> DeviceStatus:
        return parse_get(await self.arequest("get=1\n\n"))

    async def aset(self, config: DeviceConfig) -> None:
        parse_errno(await self.arequest(format_set(config)), "set")
