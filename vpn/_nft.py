"""nftables scripts applied on this host (`nft -f -`): one atomic transaction, all of it or,
on error, nothing. The hub's filter (coordinator/_hubfilter.py) and the device's
(agent/_devfilter.py) write the scripts from the pieces here; `run_nft` runs them."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable
from typing import Final

NFT_TIMEOUT: Final = 10.0


class NftError(OSError):
    """nft could not be run or refused the script: one line."""


def run_nft(script: str, timeout: float = NFT_TIMEOUT) -> None:
    try:
        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"nft: {exc}") from None
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise NftError(f"nft: {last[0]}")


def nft_set(name: str, kind: str, addresses: Iterable[str], interval: bool = False) -> str:
    """A named address set of a table, its elements sorted (`interval`: prefixes allowed)."""
    items = sorted(set(addresses), key=lambda a: ipaddress.ip_network(a, strict=False))
    flags = " flags interval;" if interval else ""
    elements = f"elements = {{ {', '.join(items)} }}" if items else ""
    return f"  set {name} {{ type {kind};{flags} {elements} }}"


def nft_accept(*parts: str) -> str:
    """A chain's rule: its non-empty match parts, then accept."""
    return "    " + " ".join(part for part in parts if part) + " accept"
