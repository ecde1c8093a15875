"""wg-quick(8) configuration export, for an operator's workstation joining the mesh."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from wgconfig import WGConfig  # type: ignore[import-untyped]

from ._keys import validate_key
from ._link import IPInterface
from ._model import MAX_KEEPALIVE, MAX_PORT, Endpoint, IPNetwork, _check_range, _networks


@dataclass(frozen=True, slots=True)
class QuickPeer:
    public_key: str
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None
    preshared_key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", validate_key(self.public_key))
        if self.preshared_key is not None:
            object.__setattr__(self, "preshared_key", validate_key(self.preshared_key))
        object.__setattr__(self, "allowed_ips", _networks(self.allowed_ips))
        _check_range("persistent_keepalive", self.persistent_keepalive, MAX_KEEPALIVE)


def _one_line(name: str, value: str) -> str:
    # wg-quick reads line by line; a newline smuggled into a value would inject directives
    # (PostUp runs shell commands).
    if "\n" in value or "\r" in value or "#" in value:
        raise ValueError(f"{name} must be a single plain line, got {value!r}")
    return value


def export_wg_quick(
    private_key: str,
    addresses: Iterable[IPInterface],
    peers: Sequence[QuickPeer],
    listen_port: int | None = None,
    dns: Iterable[IPv4Address | IPv6Address | str] | None = None,
    mtu: int | None = None,
) -> str:
    """An [Interface] + [Peer] config that `wg-quick up` and `wg-quick strip` accept."""
    _check_range("listen_port", listen_port, MAX_PORT)
    cfg = WGConfig()
    cfg.initialize_file()
    cfg.add_attr(None, "PrivateKey", validate_key(private_key))
    addrs = [str(a) for a in addresses]
    if addrs:
        cfg.add_attr(None, "Address", ", ".join(addrs))
    if listen_port is not None:
        cfg.add_attr(None, "ListenPort", listen_port)
    if dns is not None:
        servers = [_one_line("DNS", str(d)) for d in dns]
        if servers:
            cfg.add_attr(None, "DNS", ", ".join(servers))
    if mtu is not None:
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} out of range 68..65535")
        cfg.add_attr(None, "MTU", mtu)
    seen: set[str] = set()
    for p in peers:
        if p.public_key in seen:
            raise ValueError(f"peer {p.public_key} listed twice")
        seen.add(p.public_key)
        cfg.add_peer(p.public_key)
        if p.preshared_key is not None:
            cfg.add_attr(p.public_key, "PresharedKey", p.preshared_key)
        if p.allowed_ips:
            cfg.add_attr(p.public_key, "AllowedIPs", ", ".join(str(n) for n in p.allowed_ips))
        if p.endpoint is not None:
            cfg.add_attr(p.public_key, "Endpoint", str(p.endpoint))
        if p.persistent_keepalive:
            cfg.add_attr(p.public_key, "PersistentKeepalive", p.persistent_keepalive)
    out = io.StringIO()
    cfg.write_to_fileobj(out)
    return out.getvalue()
