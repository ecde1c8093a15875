"""Desired-vs-actual for one WireGuard device: a pure diff and an apply step (innernet's PeerDiff).

Only what differs is sent, with update_only for existing peers, so an unchanged peer's session
(handshake, counters, roamed endpoint) is never touched and applying twice sends nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._backend import AsyncWireGuardBackend, WireGuardBackend
from ._keys import ZERO_KEY, clamp_private_key, validate_key
from ._model import (
    MAX_FWMARK,
    MAX_KEEPALIVE,
    MAX_PORT,
    DeviceConfig,
    DeviceStatus,
    Endpoint,
    IPNetwork,
    PeerConfig,
    _check_range,
    _networks,
)


@dataclass(frozen=True, slots=True)
class DesiredPeer:
    public_key: str
    allowed_ips: frozenset[IPNetwork] = frozenset()
    endpoint: Endpoint | None = None  # None: don't care, so a roaming peer is not pulled back
    persistent_keepalive: int = 0  # 0: off
    preshared_key: str | None = None  # None: no PSK

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", validate_key(self.public_key))
        if self.preshared_key is not None:
            psk = validate_key(self.preshared_key)
            object.__setattr__(self, "preshared_key", None if psk == ZERO_KEY else psk)
        object.__setattr__(self, "allowed_ips", frozenset(_networks(self.allowed_ips)))
        if self.endpoint is not None and not isinstance(self.endpoint, Endpoint):
            raise TypeError(f"endpoint must be an Endpoint, got {self.endpoint!r}")
        _check_range("persistent_keepalive", self.persistent_keepalive, MAX_KEEPALIVE)


@dataclass(frozen=True, slots=True)
class DesiredDevice:
    private_key: str
    peers: tuple[DesiredPeer, ...] = ()
    listen_port: int | None = None  # None: don't care (the daemon picks one)
    fwmark: int | None = None  # None: don't care; 0: no mark

    def __post_init__(self) -> None:
        # Clamped, because that is the form the daemon reports back.
        object.__setattr__(self, "private_key", clamp_private_key(self.private_key))
        _check_range("listen_port", self.listen_port, MAX_PORT)
        _check_range("fwmark", self.fwmark, MAX_FWMARK)
        peers = tuple(self.peers)
        object.__setattr__(self, "peers", peers)
        keys: set[str] = set()
        owner: dict[IPNetwork, str] = {}
        for p in peers:
            if p.public_key in keys:
                raise ValueError(f"peer {p.public_key} listed twice")
            keys.add(p.public_key)
            # WireGuard moves an allowed IP to the last peer that claims it; two claimants would
            # make every reconcile flip it back and forth.
            for net in p.allowed_ips:
                if net in owner:
                    raise ValueError(
                        f"allowed IP {net} given to both {owner[net]} and {p.public_key}"
                    )
                owner[net] = p.public_key


# --------------------------------------------------------------------------- changes


@dataclass(frozen=True, slots=True)
class SetDevice:
    """Device fields to change; None fields are unchanged."""

    private_key: str | None = None
    listen_port: int | None = None
    fwmark: int | None = None


@dataclass(frozen=True, slots=True)
class AddPeer:
    peer: DesiredPeer


@dataclass(frozen=True, slots=True)
class RemovePeer:
    public_key: str


@dataclass(frozen=True, slots=True)
class UpdatePeer:
    """Only the fields that differ are set; None means unchanged."""

    public_key: str
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None
    preshared_key: str | None = None  # ZERO_KEY removes the PSK
    allowed_ips: frozenset[IPNetwork] | None = None


Change = SetDevice | AddPeer | RemovePeer | UpdatePeer


def diff(desired: DesiredDevice, actual: DeviceStatus) -> list[Change]:
    """Changes that take `actual` to `desired`, in the order: device, removals, updates, adds."""
    changes: list[Change] = []
    set_dev = SetDevice(
        private_key=desired.private_key if desired.private_key != actual.private_key else None,
        listen_port=(
            desired.listen_port
            if desired.listen_port is not None and desired.listen_port != actual.listen_port
            else None
        ),
        fwmark=(
            desired.fwmark
            if desired.fwmark is not None and desired.fwmark != actual.fwmark
            else None
        ),
    )
    if set_dev != SetDevice():
        changes.append(set_dev)

    wanted = {p.public_key: p for p in desired.peers}
    have = {p.public_key: p for p in actual.peers}
    for key in have:
        if key not in wanted:
            changes.append(RemovePeer(key))
    for key, want in wanted.items():
        cur = have.get(key)
        if cur is None:
            continue
        endpoint = (
            want.endpoint if want.endpoint is not None and want.endpoint != cur.endpoint else None
        )
        keepalive = (
            want.persistent_keepalive
            if want.persistent_keepalive != cur.persistent_keepalive
            else None
        )
        psk = None
        if want.preshared_key != cur.preshared_key:
            psk = want.preshared_key if want.preshared_key is not None else ZERO_KEY
        allowed = want.allowed_ips if want.allowed_ips != frozenset(cur.allowed_ips) else None
        update = UpdatePeer(key, endpoint, keepalive, psk, allowed)
        if update != UpdatePeer(key):
            changes.append(update)
    for key, want in wanted.items():
        if key not in have:
            changes.append(AddPeer(want))
    return changes


def _sorted(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    # Deterministic order makes the request text (and tests) stable.
    return tuple(sorted(nets, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def changes_to_config(changes: Sequence[Change]) -> DeviceConfig:
    """One DeviceConfig carrying all the changes; pure, for inspection and tests."""
    private_key = listen_port = fwmark = None
    peers: list[PeerConfig] = []
    for ch in changes:
        if isinstance(ch, SetDevice):
            private_key = ch.private_key if ch.private_key is not None else private_key
            listen_port = ch.listen_port if ch.listen_port is not None else listen_port
            fwmark = ch.fwmark if ch.fwmark is not None else fwmark
        elif isinstance(ch, RemovePeer):
            peers.append(PeerConfig(ch.public_key, remove=True))
        elif isinstance(ch, UpdatePeer):
            peers.append(
                PeerConfig(
                    ch.public_key,
                    update_only=True,  # if the peer vanished meanwhile, don't resurrect half of it
                    preshared_key=ch.preshared_key,
                    endpoint=ch.endpoint,
                    persistent_keepalive=ch.persistent_keepalive,
                    replace_allowed_ips=ch.allowed_ips is not None,
                    allowed_ips=_sorted(ch.allowed_ips or ()),
                )
            )
        elif isinstance(ch, AddPeer):
            p = ch.peer
            peers.append(
                PeerConfig(
                    p.public_key,
                    preshared_key=p.preshared_key,
                    endpoint=p.endpoint,
                    persistent_keepalive=p.persistent_keepalive or None,
                    # replace: a peer added concurrently by someone else gets exactly our list
                    replace_allowed_ips=True,
                    allowed_ips=_sorted(p.allowed_ips),
                )
            )
        else:
            raise TypeError(f"not a Change: {ch!r}")
    return DeviceConfig(
        private_key=private_key, listen_port=listen_port, fwmark=fwmark, peers=tuple(peers)
    )


def apply(changes: Sequence[Change], backend: WireGuardBackend) -> DeviceConfig | None:
    """Send the changes as one `set`; nothing at all when there are none. Returns what was sent."""
    if not changes:
        return None
    config = changes_to_config(changes)
    backend.set(config)
    return config


def reconcile(desired: DesiredDevice, backend: WireGuardBackend) -> list[Change]:
    changes = diff(desired, backend.get())
    apply(changes, backend)
    return changes


async def areconcile(desired: DesiredDevice, backend: AsyncWireGuardBackend) -> list[Change]:
    changes = diff(desired, await backend.aget())
    if changes:
        await backend.aset(changes_to_config(changes))
    return changes
