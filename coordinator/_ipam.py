"""Mesh addresses: host index i of each prefix. Index 1 is the hub; devices and operators take
2, 3, ... from one counter that only grows, so a revoked device's addresses are never reused
(a stale peer entry somewhere can never point at a new device)."""

from __future__ import annotations

import ipaddress
from typing import Final

from ._model import AddressSpaceExhausted

HUB_INDEX: Final = 1
FIRST_INDEX: Final = 2


def parse_prefixes(v4: str, v6: str) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    """Raises ValueError with one line."""
    try:
        n4 = ipaddress.ip_network(v4, strict=True)
    except ValueError as exc:
        raise ValueError(f"mesh IPv4 prefix {v4!r}: {exc}") from None
    try:
        n6 = ipaddress.ip_network(v6, strict=True)
    except ValueError as exc:
        raise ValueError(f"mesh IPv6 prefix {v6!r}: {exc}") from None
    if not isinstance(n4, ipaddress.IPv4Network) or n4.prefixlen > 29:
        raise ValueError(f"mesh IPv4 prefix {v4!r}: must be an IPv4 network of /29 or larger")
    if not isinstance(n6, ipaddress.IPv6Network) or n6.prefixlen > 120:
        raise ValueError(f"mesh IPv6 prefix {v6!r}: must be an IPv6 network of /120 or larger")
    return n4, n6


def capacity(v4: ipaddress.IPv4Network, v6: ipaddress.IPv6Network) -> int:
    """Highest usable index: v4 loses its broadcast address."""
    return min(v4.num_addresses - 2, v6.num_addresses - 1)


def addresses(v4: ipaddress.IPv4Network, v6: ipaddress.IPv6Network, index: int
              ) -> tuple[str, str]:
    if not 1 <= index <= capacity(v4, v6):
        raise AddressSpaceExhausted(
            f"mesh address space exhausted ({v4} / {v6}: {capacity(v4, v6)} addresses)")
    return str(v4.network_address + index), str(v6.network_address + index)
