"""Freeze detection: a signed, expiring statement of a fleet's newest releases.

Two signed objects (docs/security.md, "A frozen coordinator is detected"):

- a **timestamp grant**, signed once by the operator with the fleet's release key: "the key
  `public_key` may sign timestamps for fleet `fleet`". The coordinator holds that timestamp key
  online; it never holds the release key, and the timestamp key can sign nothing else (its own
  domain-separation prefix; devices accept it for timestamps only);
- a **timestamp**, signed by the coordinator with the granted key whenever a device asks:
  the fleet, the newest version of each app, when it was issued and when it expires. It carries
  the grant, so a device needs nothing but its pinned release key to check both.

A device that cannot get a timestamp newer than the last one's expiry is looking at a frozen
coordinator (or a front replaying its old answers) and says "stale".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from nacl.signing import SigningKey, VerifyKey

from mesh.release._codec import (
    MAX_KEY_ID,
    MAX_VERSION,
    _bin,
    _canonical,
    _int,
    _list,
    _name,
    _pack,
    _str,
    _unpack,
)
from mesh.release._model import ManifestError, VerificationError
from mesh.release._signing import _check, _verify_key, key_id

_GRANT_TAG: Final = "fleetmesh.timestamp-grant/1"
_TIMESTAMP_TAG: Final = "fleetmesh.timestamp/1"
_SIGNED_GRANT_TAG: Final = "fleetmesh.signed-timestamp-grant/1"
_SIGNED_TAG: Final = "fleetmesh.signed-timestamp/1"
_GRANT_CONTEXT: Final = b"fleetmesh timestamp grant v1\x00"
_TIMESTAMP_CONTEXT: Final = b"fleetmesh timestamp v1\x00"
MAX_TIMESTAMP_APPS: Final = 256  # mesh.control.MAX_APPS: the apps one device may run
MAX_TIMESTAMP_BYTES: Final = 64 * 1024  # 256 apps of 64-character names, both signatures


@dataclass(frozen=True, slots=True)
class TimestampGrant:
    """The operator's word (release key) that `public_key` signs `fleet`'s timestamps."""

    fleet: str
    public_key: bytes  # Ed25519, 32 bytes
    granted_at: int  # Unix seconds


@dataclass(frozen=True, slots=True)
class Timestamp:
    """The coordinator's signed statement of `fleet`'s newest release per app, until
    `expires_at`."""

    fleet: str
    newest: tuple[tuple[str, int], ...]  # (app, version), sorted by app
    issued_at: int  # Unix seconds
    expires_at: int


@dataclass(frozen=True, slots=True)
class Freshness:
    """A verified timestamp, and whether it had expired at the time it was checked."""

    timestamp: Timestamp
    stale: bool


def _grant_obj(g: TimestampGrant) -> list[Any]:
    return [_GRANT_TAG, g.fleet, g.public_key, g.granted_at]


def _timestamp_obj(t: Timestamp) -> list[Any]:
    return [_TIMESTAMP_TAG, t.fleet, [[app, v] for app, v in t.newest], t.issued_at,
            t.expires_at]


def _decode_grant(data: bytes) -> TimestampGrant:
    f = _list(_unpack(data, MAX_TIMESTAMP_BYTES), 4, what="timestamp grant")
    if f[0] != _GRANT_TAG:
        raise ManifestError("not a fleetmesh timestamp grant")
    grant = TimestampGrant(_name(f[1], "fleet"), _bin(f[2], "public key", size=32),
                           _int(f[3], 0, MAX_VERSION, "grant time"))
    _canonical(data, _grant_obj(grant), "timestamp grant")
    return grant


def _decode_timestamp(data: bytes) -> Timestamp:
    f = _list(_unpack(data, MAX_TIMESTAMP_BYTES), 5, what="timestamp")
    if f[0] != _TIMESTAMP_TAG:
        raise ManifestError("not a fleetmesh timestamp")
    newest = []
    for i, entry in enumerate(_list(f[2], max_len=MAX_TIMESTAMP_APPS, what="timestamp apps")):
        app, version = _list(entry, 2, what=f"timestamp apps[{i}]")
        newest.append((_name(app, "app"), _int(version, 1, MAX_VERSION, "version")))
    if [a for a, _ in newest] != sorted({a for a, _ in newest}):
        raise ManifestError("timestamp apps: not sorted or an app named twice")
    ts = Timestamp(_name(f[1], "fleet"), tuple(newest), _int(f[3], 0, MAX_VERSION, "issued"),
                   _int(f[4], 0, MAX_VERSION, "expiry"))
    _canonical(data, _timestamp_obj(ts), "timestamp")
    return ts


def sign_timestamp_grant(grant: TimestampGrant, release_key: SigningKey) -> bytes:
    """The encoded grant, signed with the fleet's release key (the operator's side)."""
    data = _pack(_grant_obj(grant))
    _decode_grant(data)
    signature = release_key.sign(_GRANT_CONTEXT + data).signature
    return _pack([_SIGNED_GRANT_TAG, data, signature, key_id(release_key.verify_key)])


def verify_timestamp_grant(encoded: bytes, release_key: VerifyKey | bytes,
                           fleet: str) -> TimestampGrant:
    """The grant, if the fleet's release key signed it for `fleet` (VerificationError or
    ManifestError otherwise)."""
    f = _list(_unpack(encoded, MAX_TIMESTAMP_BYTES), 4, what="signed timestamp grant")
    if f[0] != _SIGNED_GRANT_TAG:
        raise ManifestError("not a signed fleetmesh timestamp grant")
    data = _bin(f[1], "timestamp grant", max_len=MAX_TIMESTAMP_BYTES)
    signature = _bin(f[2], "signature", size=64)
    kid = _str(f[3], MAX_KEY_ID, "key id")
    _check(_GRANT_CONTEXT, data, signature, kid, _verify_key(release_key))
    grant = _decode_grant(data)
    if grant.fleet != fleet:
        raise VerificationError(f"timestamp grant is for fleet {grant.fleet!r}, not {fleet!r}")
    return grant


def sign_timestamp(timestamp: Timestamp, grant: bytes, timestamp_key: SigningKey) -> bytes:
    """The encoded timestamp, signed with the granted key, carrying the encoded grant."""
    data = _pack(_timestamp_obj(timestamp))
    _decode_timestamp(data)
    signature = timestamp_key.sign(_TIMESTAMP_CONTEXT + data).signature
    return _pack([_SIGNED_TAG, data, signature, key_id(timestamp_key.verify_key), grant])


def verify_timestamp(encoded: bytes, release_key: VerifyKey | bytes, fleet: str,
                     now: float) -> Freshness:
    """Check a timestamp from the coordinator: its grant signed by the fleet's release key for
    this fleet, the timestamp signed by the granted key for this fleet; stale if it expired
    at `now`. ManifestError or VerificationError if anything does not hold."""
    f = _list(_unpack(encoded, 2 * MAX_TIMESTAMP_BYTES), 5, what="signed timestamp")
    if f[0] != _SIGNED_TAG:
        raise ManifestError("not a signed fleetmesh timestamp")
    data = _bin(f[1], "timestamp", max_len=MAX_TIMESTAMP_BYTES)
    signature = _bin(f[2], "signature", size=64)
    kid = _str(f[3], MAX_KEY_ID, "key id")
    grant = verify_timestamp_grant(_bin(f[4], "grant", max_len=MAX_TIMESTAMP_BYTES),
                                   release_key, fleet)
    _check(_TIMESTAMP_CONTEXT, data, signature, kid, VerifyKey(grant.public_key))
    ts = _decode_timestamp(data)
    if ts.fleet != fleet:
        raise VerificationError(f"timestamp is for fleet {ts.fleet!r}, not {fleet!r}")
    return Freshness(ts, stale=ts.expires_at <= now)
