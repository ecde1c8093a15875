"""WireGuard device state as data: what a daemon reports (status) and what we ask of it (config)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final

from ._keys import validate_key

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

# Field limits from the UAPI / netlink definitions (u16 ports and keepalive, u32 fwmark).
MAX_PORT: Final = 0xFFFF
MAX_KEEPALIVE: Final = 0xFFFF
MAX_FWMARK: Final = 0xFFFF_FFFF


def _check_range(name: str, value: int | None, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ValueError(f"{name} must be an integer in 0..{high}, got {value!r}")


def _networks(values: object) -> tuple[IPNetwork, ...]:
    if isinstance(values, (str, bytes)):
        raise TypeError("allowed_ips must be a collection of networks, not a single string")
    out: list[IPNetwork] = []
    for v in values:  # type: ignore[attr-defined]
        if isinstance(v, (IPv4Network, IPv6Network)):
            out.append(v)
        else:
            raise TypeError(f"allowed_ips entries must be ip_network objects, got {v!r}")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A UDP endpoint; prints as `a.b.c.d:port` or `[v6addr]:port` like wg(8) and the UAPI."""

    host: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, (IPv4Address, IPv6Address)):
            raise TypeError(f"endpoint host must be an ip_address, got {self.host!r}")
        _check_range("endpoint port", self.port, MAX_PORT)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"endpoint must be host:port or [v6]:port, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            addr: IPAddress = IPv6Address(host[1:-1])
        else:
            addr = IPv4Address(host)  # a bare v6 address without brackets is ambiguous
        return cls(addr, int(port))

    def __str__(self) -> str:
        if isinstance(self.host, IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PeerStatus:
    public_key: str
    preshared_key: str | None = None  # None: no PSK (the daemon reports all zeros)
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    persistent_keepalive: int = 0  # seconds; 0 is off
    last_handshake: float | None = None  # epoch seconds; None: never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    private_key: str | None = None
    public_key: str | None = None  # derived from private_key; the UAPI does not report it
    listen_port: int | None = None
    fwmark: int = 0  # 0 is "no mark"; the daemon omits it then
    peers: tuple[PeerStatus, ...] = ()

    def peer(self, public_key: str) -> PeerStatus | None:
        for p in self.peers:
            if p.public_key == public_key:
                return p
        return None


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer's part of a `set`. None fields are left as they are on the device."""

    public_key: str
    remove: bool = False
    update_only: bool = False
    preshared_key: str | None = None  # ZERO_KEY removes an existing PSK
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None  # 0 turns it off
    replace_allowed_ips: bool = False
    allowed_ips: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", validate_key(self.public_key))
        if self.preshared_key is not None:
            object.__setattr__(self, "preshared_key", validate_key(self.preshared_key))
        if self.endpoint is not None and not isinstance(self.endpoint, Endpoint):
            raise TypeError(f"endpoint must be an Endpoint, got {self.endpoint!r}")
        _check_range("persistent_keepalive", self.persistent_keepalive, MAX_KEEPALIVE)
        object.__setattr__(self, "allowed_ips", _networks(self.allowed_ips))
        if self.remove and (
            self.update_only
            or self.preshared_key is not None
            or self.endpoint is not None
            or self.persistent_keepalive is not None
            or self.replace_allowed_ips
            or self.allowed_ips
        ):
            raise ValueError("a peer marked remove=True takes no other settings")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """A `set` request. None fields are left as they are on the device."""

    private_key: str | None = None
    listen_port: int | None = None
    fwmark: int | None = None  # 0 removes the mark
    replace_peers: bool = False
    peers: tuple[PeerConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.private_key is not None:
            object.__setattr__(self, "private_key", validate_key(self.private_key))
        _check_range("listen_port", self.listen_port, MAX_PORT)
        _check_range("fwmark", self.fwmark, MAX_FWMARK)
        peers = tuple(self.peers)
        for p in peers:
            if not isinstance(p, PeerConfig):
                raise TypeError(f"peers must be PeerConfig objects, got {p!r}")
        object.__setattr__(self, "peers", peers)

    @property
    def is_empty(self) -> bool:
        return (
            self.private_key is None
            and self.listen_port is None
            and self.fwmark is None
            and not self.replace_peers
            and not self.peers
        )


def parse_network(text: str) -> IPNetwork:
    """Parse an allowed-IP CIDR; host bits are masked off as WireGuard itself does."""
    return ipaddress.ip_network(text, strict=False)
