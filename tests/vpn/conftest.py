"""Shared helpers for vpn tests: real namespaces and wireguard-go, cleaned up even on failure."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator

import pytest
from pyroute2 import netns  # type: ignore[import-untyped]

from vpn import WireGuardGo

LAB_READY = (
    hasattr(os, "geteuid")
    and os.geteuid() == 0
    and all(shutil.which(t) for t in ("wireguard-go", "nsenter", "unshare"))
)


@pytest.fixture
def lab() -> None:
    """Skip (with the reason) unless real namespaces and wireguard-go can be used here."""
    if not LAB_READY:
        pytest.skip("lab test: needs root, wireguard-go, nsenter and unshare")


def _remove_netns(name: str) -> None:
    if name in netns.listnetns():
        netns.remove(name)


@pytest.fixture
def make_netns(lab: None) -> Iterator[Callable[[str], str]]:
    """Create namespaces named fm-t<hex>-<suffix>; all are removed at teardown."""
    prefix = f"fm-t{secrets.token_hex(3)}"
    created: list[str] = []

    def make(suffix: str) -> str:
        name = f"{prefix}-{suffix}"
        netns.create(name)
        created.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            _remove_netns(name)


@pytest.fixture
def make_wg(lab: None) -> Iterator[Callable[..., WireGuardGo]]:
    """Start wireguard-go daemons; every one is stopped by PID at teardown."""
    started: list[WireGuardGo] = []

    def make(ifname: str, netns: str | None, mountns: str | None = None) -> WireGuardGo:
        wg = WireGuardGo()
        started.append(wg)
        return wg.start(ifname, netns, mountns)

    try:
        yield make
    finally:
        for wg in reversed(started):
            wg.stop()
