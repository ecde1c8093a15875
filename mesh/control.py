"""Control-plane messages between coordinator, agents and operator tools: one place for their
shapes, their JSON form and their limits (docs/api.md describes the HTTP API that carries them).

Every `from_json` validates what arrives from the network: types, sizes, counts, formats; bad
input raises `ControlError` with one line naming the field, which the server turns into a 4xx.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from nacl.bindings import crypto_scalarmult

from mesh.names import APP_NAME_RE, DEVICE_NAME_RE, MAX_APP_NAME
from mesh.policy import PolicyError, Ports, parse_ports
from mesh.release import ManifestError, parse_platform
from mesh.rollout import RolloutSpecError, Window

# A request body (anything a device or an operator sends); answers name their own bounds
MAX_BODY_BYTES: Final = 256 * 1024
MAX_NAME_LEN: Final = 63  # a DNS label (RFC 1035), so device names can become host names
MAX_ENDPOINTS: Final = 8  # LAN candidates per device: a few interfaces, v4 and v6
MAX_PEERS: Final = 10_000  # a fleet's devices (the coordinator's quota), a report's peers
# Peers an agent accepts in one peer map: twice the largest fleet, so a map is never what caps
# a fleet. Its byte bound follows from it (MAX_PEERMAP_BYTES), not the other way round.
MAX_MAP_PEERS: Final = 2 * MAX_PEERS
# One peer's share of a map's JSON at its largest: an entry with a 63-character name,
# MAX_ENDPOINTS IPv6 endpoints and the longest `send`/`accept` is < 900 bytes, its `punch`
# stamp < 100, and relay_ips
# (MAX_PEERS networks) add < 50 bytes per map peer (tests/mesh/test_peermap_codec.py checks it).
PEER_JSON_BYTES: Final = 1024
# A whole peer map (or delta) as JSON: what the agent reads from the wire and its cache.
MAX_PEERMAP_BYTES: Final = MAX_MAP_PEERS * PEER_JSON_BYTES + 64 * 1024
MAX_TEXT_LEN: Final = 256
# a peer entry's allowed ports (PeerEntry.send/accept) as text, about 8 port ranges: the
# coordinator widens a longer set to its whole protocols, so an entry stays within
# PEER_JSON_BYTES
MAX_PORTS_TEXT: Final = 96
PathKind = Literal["direct", "relay", "none"]
PATH_KINDS: Final = ("direct", "relay", "none")


class ControlError(ValueError):
    """A control message is malformed; str() is one line naming the field."""


# --------------------------------------------------------------------------- field checks

T = TypeVar("T")


def _get(obj: Mapping[str, Any], key: str, kind: type[T], where: str, optional: bool = False
         ) -> T:
    if not isinstance(obj, Mapping):
        raise ControlError(f"{where}: must be an object")
    if key not in obj or obj[key] is None:
        if optional:
            return None  # type: ignore[return-value]
        raise ControlError(f"{where}.{key}: missing")
    value = obj[key]
    # bool is an int in Python; never accept it where a number is meant
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ControlError(f"{where}.{key}: must be an integer")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ControlError(f"{where}.{key}: must be a number")
    if kind not in (int, float) and not isinstance(value, kind):
        raise ControlError(f"{where}.{key}: must be {kind.__name__}")
    if isinstance(value, str) and len(value) > MAX_TEXT_LEN:
        raise ControlError(f"{where}.{key}: longer than {MAX_TEXT_LEN} characters")
    return float(value) if kind is float else value  # type: ignore[return-value]


def check_name(name: str, where: str = "name") -> str:
    if not isinstance(name, str) or not DEVICE_NAME_RE.match(name):
        raise ControlError(f"{where}: must be 1-63 of a-z, 0-9 and '-' (not at either end)")
    return name


def check_key(key: str, where: str) -> str:
    """A WireGuard public key in base64 (32 bytes)."""
    try:
        raw = base64.b64decode(key, validate=True) if isinstance(key, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ControlError(f"{where}: not a WireGuard key (base64 of 32 bytes)")
    return key


def check_endpoint(text: str, where: str) -> str:
    """host:port with an IP literal host ([v6]:port for IPv6)."""
    if not isinstance(text, str):
        raise ControlError(f"{where}: must be a string")
    host, sep, port = text.rpartition(":")
    try:
        if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ValueError
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        else:
            ipaddress.IPv4Address(host)
    except ValueError:
        raise ControlError(f"{where}: must be a.b.c.d:port or [v6]:port, got {text!r}") from None
    return text


def _endpoints(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    items = _get(obj, key, list, where, optional=True) or []
    if len(items) > MAX_ENDPOINTS:
        raise ControlError(f"{where}.{key}: more than {MAX_ENDPOINTS} endpoints")
    return tuple(check_endpoint(e, f"{where}.{key}[{i}]") for i, e in enumerate(items))


def _address(obj: Mapping[str, Any], key: str, version: int, where: str) -> str:
    text = _get(obj, key, str, where)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ControlError(f"{where}.{key}: not an IP address") from None
    if addr.version != version:
        raise ControlError(f"{where}.{key}: must be an IPv{version} address")
    return str(addr)


# --------------------------------------------------------------------------- enrollment


# A proof of possession of a device's WireGuard private key (docs/security.md, "Enrollment
# cannot take over a device"): X25519 is no signature scheme, so the device answers the
# coordinator's challenge with an HMAC keyed by the Diffie-Hellman secret of its key and the
# hub's key, which only the two holders of those private keys can compute.
KEY_PROOF_LABEL: Final = b"fleetmesh enroll key proof v1"
MAX_CHALLENGE_LEN: Final = 64  # the coordinator's nonces are 43 characters (32 bytes, base64url)
MAC_HEX_LEN: Final = 64  # HMAC-SHA256


def key_proof_mac(shared_secret: bytes, challenge: str, public_key: str) -> str:
    """HMAC-SHA256(X25519 secret, label | challenge | public key), hex. The coordinator bound
    the challenge to one device name and key and accepts it once, so the MAC proves nothing
    anywhere else."""
    message = b"\0".join((KEY_PROOF_LABEL, challenge.encode(), public_key.encode()))
    return hmac.new(shared_secret, message, hashlib.sha256).hexdigest()


def x25519_secret(private_key: str, peer_public_key: str) -> bytes:
    """The X25519 shared secret of a base64 private key and a base64 public key (RFC 7748)."""
    return bytes(crypto_scalarmult(base64.b64decode(private_key),
                                   base64.b64decode(peer_public_key)))


@dataclass(frozen=True, slots=True)
class KeyProof:
    """The answer to an enrollment challenge: `key_proof_mac` under X25519(device, hub)."""

    challenge: str
    mac: str

    def to_json(self) -> dict[str, Any]:
        return {"challenge": self.challenge, "mac": self.mac}

    @classmethod
    def from_json(cls, obj: Any) -> KeyProof:
        w = "enroll.key_proof"
        challenge, mac = _get(obj, "challenge", str, w), _get(obj, "mac", str, w)
        if not 0 < len(challenge) <= MAX_CHALLENGE_LEN:
            raise ControlError(f"{w}.challenge: 1-{MAX_CHALLENGE_LEN} characters")
        if len(mac) != MAC_HEX_LEN or not all(c in "0123456789abcdef" for c in mac):
            raise ControlError(f"{w}.mac: must be {MAC_HEX_LEN} lowercase hex digits")
        return cls(challenge, mac)


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    """A device's first call: its token, its own public key (the private key never leaves it).

    Enrolling a name that is already active needs a proof that the caller is that device: its
    current `credential`, or a `key_proof` answering the coordinator's challenge. A first
    enrollment carries neither (and is unchanged)."""

    token: str
    public_key: str
    name: str | None = None  # None: the token names the device (provisioned) or the server picks
    lan_endpoints: tuple[str, ...] = ()
    agent_version: str = ""
    credential: str | None = None
    key_proof: KeyProof | None = None
    # the device's platform, os/arch[/variant] (docs/releases.md, "Several platforms");
    # "" from old agents
    platform: str = ""

    def __repr__(self) -> str:
        # Keep the token and the credential out of logs and tracebacks by accident.
        return (f"EnrollRequest(public_key={self.public_key!r}, name={self.name!r}, "
                f"credential={'<hidden>' if self.credential else None}, "
                f"key_proof={self.key_proof is not None})")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "token": self.token, "public_key": self.public_key, "name": self.name,
            "lan_endpoints": list(self.lan_endpoints), "agent_version": self.agent_version}
        if self.credential is not None:
            out["credential"] = self.credential
        if self.key_proof is not None:
            out["key_proof"] = self.key_proof.to_json()
        if self.platform:
            out["platform"] = self.platform
        return out

    @classmethod
    def from_json(cls, obj: Any) -> EnrollRequest:
        w = "enroll"
        name = _get(obj, "name", str, w, optional=True)
        proof = _get(obj, "key_proof", dict, w, optional=True)
        return cls(
            token=_get(obj, "token", str, w),
            public_key=check_key(_get(obj, "public_key", str, w), f"{w}.public_key"),
            name=None if name is None else check_name(name, f"{w}.name"),
            lan_endpoints=_endpoints(obj, "lan_endpoints", w),
            agent_version=_get(obj, "agent_version", str, w, optional=True) or "",
            credential=_get(obj, "credential", str, w, optional=True),
            key_proof=None if proof is None else KeyProof.from_json(proof),
            platform=check_platform(obj.get("platform"), f"{w}.platform") or "",
        )


@dataclass(frozen=True, slots=True)
class HubInfo:
    """The coordinator's WireGuard hub: every device keeps a keepalive to it."""

    public_key: str
    endpoint: str  # the hub's underlay host:port as devices reach it
    mesh_ipv4: str
    mesh_ipv6: str
    api_url: str  # the API through the hub tunnel, used after enrollment

    def to_json(self) -> dict[str, Any]:
        return {"public_key": self.public_key, "endpoint": self.endpoint,
                "mesh_ipv4": self.mesh_ipv4, "mesh_ipv6": self.mesh_ipv6, "api_url": self.api_url}

    @classmethod
    def from_json(cls, obj: Any) -> HubInfo:
        w = "hub"
        return cls(check_key(_get(obj, "public_key", str, w), f"{w}.public_key"),
                   check_endpoint(_get(obj, "endpoint", str, w), f"{w}.endpoint"),
                   _address(obj, "mesh_ipv4", 4, w), _address(obj, "mesh_ipv6", 6, w),
                   _get(obj, "api_url", str, w))


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What a device gets back once: identity, credential, addresses, the hub."""

    device_id: str
    name: str
    fleet: str
    credential: str  # bearer secret for the device API; the coordinator keeps only its hash
    mesh_ipv4: str
    mesh_ipv6: str
    mesh_prefix_v4: str  # the whole mesh, routed into the WireGuard interface
    mesh_prefix_v6: str
    hub: HubInfo
    # The fleet's Ed25519 release key (hex) when the operator has set one: the agent pins it
    # and trusts only manifests signed with it. Absent from the JSON when not set.
    release_key: str | None = None
    # Every coordinator replica's URL (docs/scale.md, "Replicas"): the agent fails over to
    # them. Absent from the JSON for a single coordinator.
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {"device_id": self.device_id, "name": self.name, "fleet": self.fleet,
               "credential": self.credential, "mesh_ipv4": self.mesh_ipv4,
               "mesh_ipv6": self.mesh_ipv6, "mesh_prefix_v4": self.mesh_prefix_v4,
               "mesh_prefix_v6": self.mesh_prefix_v6, "hub": self.hub.to_json()}
        if self.release_key is not None:
            out["release_key"] = self.release_key
        if self.urls:
            out["urls"] = list(self.urls)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Enrollment:
        w = "enrollment"
        return cls(_get(obj, "device_id", str, w), check_name(_get(obj, "name", str, w)),
                   check_name(_get(obj, "fleet", str, w), f"{w}.fleet"),
                   _get(obj, "credential", str, w), _address(obj, "mesh_ipv4", 4, w),
                   _address(obj, "mesh_ipv6", 6, w), _get(obj, "mesh_prefix_v4", str, w),
                   _get(obj, "mesh_prefix_v6", str, w),
                   HubInfo.from_json(_get(obj, "hub", dict, w)),
                   _release_key(_get(obj, "release_key", str, w, optional=True),
                                f"{w}.release_key"),
                   coordinator_urls(_get(obj, "urls", list, w, optional=True) or [],
                                    f"{w}.urls"))


MAX_COORDINATOR_URLS: Final = 16  # replicas a device or operator knows at most
MAX_URL_LEN: Final = 2048


def coordinator_urls(urls: list[Any], where: str) -> tuple[str, ...]:
    """Replica URLs as the wire carries them: at most MAX_COORDINATOR_URLS https:// strings.
    (Each is checked in full, host and port, where it is used: mesh.tlspin.split_url.)"""
    if len(urls) > MAX_COORDINATOR_URLS:
        raise ControlError(f"{where}: more than {MAX_COORDINATOR_URLS} URLs")
    for u in urls:
        if not isinstance(u, str) or not u.startswith("https://") or len(u) > MAX_URL_LEN \
                or any(c.isspace() or c == "," for c in u):
            raise ControlError(f"{where}: each must be an https:// URL")
    return tuple(urls)


def _release_key(key: str | None, where: str) -> str | None:
    """An Ed25519 public key as 64 lowercase hex digits, or None."""
    if key is not None and not re.fullmatch(r"[0-9a-f]{64}", key):
        raise ControlError(f"{where}: not an Ed25519 public key (64 hex digits)")
    return key


# --------------------------------------------------------------------------- peer maps


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """One peer as a device must configure it.

    `endpoints` are candidates in order of preference: the peer's LAN endpoints when both sit
    behind the same public address, else its NAT-mapped endpoint as the hub saw it. Empty means
    no endpoint is known yet: the pair can only use the relay.

    `send` and `accept` (docs/policy.md): what the fleet's policy lets the map's holder send to
    this peer and accept from it, beyond fleetmesh's own traffic; an empty set: nothing else.
    None (absent: a fleet without a policy, or a coordinator from before the field): anything.
    """

    name: str
    public_key: str
    mesh_ipv4: str
    mesh_ipv6: str
    endpoints: tuple[str, ...] = ()
    lan: bool = False  # endpoints are LAN endpoints (same public address)
    send: Ports | None = None
    accept: Ports | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "public_key": self.public_key,
                               "mesh_ipv4": self.mesh_ipv4, "mesh_ipv6": self.mesh_ipv6,
                               "endpoints": list(self.endpoints), "lan": self.lan}
        if self.send is not None:
            out["send"] = self.send.text()
        if self.accept is not None:
            out["accept"] = self.accept.text()
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str = "peer") -> PeerEntry:
        return cls(check_name(_get(obj, "name", str, where), f"{where}.name"),
                   check_key(_get(obj, "public_key", str, where), f"{where}.public_key"),
                   _address(obj, "mesh_ipv4", 4, where), _address(obj, "mesh_ipv6", 6, where),
                   _endpoints(obj, "endpoints", where),
                   bool(_get(obj, "lan", bool, where, optional=True)),
                   _ports(obj, "send", where), _ports(obj, "accept", where))


def _ports(obj: Mapping[str, Any], key: str, where: str) -> Ports | None:
    text = _get(obj, key, str, where, optional=True)
    if text is None:
        return None
    if len(text) > MAX_PORTS_TEXT:
        raise ControlError(f"{where}.{key}: longer than {MAX_PORTS_TEXT} characters")
    if text == "":
        return Ports(())
    try:
        return parse_ports(text, f"{where}.{key}")
    except PolicyError as exc:
        raise ControlError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class PeerMap:
    """Everything one device needs to configure its WireGuard interface, versioned.

    `relay_ips` are mesh addresses always reached through the hub (operator workstations).
    `targets` is the revision of the device's release targets: when it changes, the agent reads
    /device/target again (so it need not poll that often; docs/gossip.md "Idle cost").
    `punch` names the peers that asked (POST /device/punch) for a direct path to this device,
    each with a stamp that grows with every new request: a device whose path to such a peer
    went lazy (no keepalives, docs/metered.md) punches again at once, so that both sides send
    at the same time, which is what opens two NATs.
    `logs_wanted_until` (epoch seconds, the coordinator's clock; 0: not wanted): until then
    someone reads the device's app logs and the agent uploads them; otherwise it keeps them.
    None (absent: a coordinator from before the field, which never asks) means always.
    """

    version: int
    hub: HubInfo
    peers: tuple[PeerEntry, ...] = ()
    relay_ips: tuple[str, ...] = ()
    targets: int = 0
    punch: tuple[tuple[str, int], ...] = ()  # (peer name, stamp), sorted by name
    logs_wanted_until: float | None = None

    def to_json(self) -> dict[str, Any]:
        return _map_json(self, {"peers": [p.to_json() for p in self.peers]})

    @classmethod
    def from_json(cls, obj: Any) -> PeerMap:
        w = "peermap"
        version, hub, relay_ips, targets, punch, logs = _map_head(obj, w)
        return cls(version, hub, _peer_entries(obj, "peers", w), relay_ips, targets,
                   punch=punch, logs_wanted_until=logs)


def _map_json(m: PeerMap | PeerMapDelta, body: dict[str, Any]) -> dict[str, Any]:
    """A map's or a delta's JSON: its head around `body` (peers, or base/upsert/remove)."""
    out: dict[str, Any] = {"version": m.version, "hub": m.hub.to_json(), **body,
                           "relay_ips": list(m.relay_ips), "targets": m.targets,
                           "punch": dict(m.punch)}
    if m.logs_wanted_until is not None:
        out["logs_wanted_until"] = m.logs_wanted_until
    return out


def _peer_entries(obj: Mapping[str, Any], key: str, w: str) -> tuple[PeerEntry, ...]:
    peers = _get(obj, key, list, w)
    if len(peers) > MAX_MAP_PEERS:
        raise ControlError(f"{w}.{key}: more than {MAX_MAP_PEERS}")
    return tuple(PeerEntry.from_json(p, f"{w}.{key}[{i}]") for i, p in enumerate(peers))


_MapHead = tuple[int, HubInfo, tuple[str, ...], int, tuple[tuple[str, int], ...], float | None]


def _map_head(obj: Mapping[str, Any], w: str) -> _MapHead:
    """What a full map and a delta both carry whole: version, hub, relay_ips, targets, punch,
    logs_wanted_until."""
    relay = _get(obj, "relay_ips", list, w, optional=True) or []
    if len(relay) > MAX_PEERS:
        raise ControlError(f"{w}.relay_ips: more than {MAX_PEERS}")
    for i, r in enumerate(relay):
        try:
            ipaddress.ip_network(r)
        except (ValueError, TypeError):
            raise ControlError(f"{w}.relay_ips[{i}]: not an IP network") from None
    targets = _get(obj, "targets", int, w, optional=True) or 0
    punch = _get(obj, "punch", dict, w, optional=True) or {}
    if len(punch) > MAX_MAP_PEERS:
        raise ControlError(f"{w}.punch: more than {MAX_MAP_PEERS}")
    for name, stamp in punch.items():
        check_name(name, f"{w}.punch")
        if not isinstance(stamp, int) or isinstance(stamp, bool) or stamp < 0:
            raise ControlError(f"{w}.punch.{name}: must be a non-negative integer")
    logs_wanted_until = _time(obj, "logs_wanted_until", w, optional=True)
    return (_get(obj, "version", int, w), HubInfo.from_json(_get(obj, "hub", dict, w)),
            tuple(str(r) for r in relay), targets, tuple(sorted(punch.items())),
            logs_wanted_until)


@dataclass(frozen=True, slots=True)
class PeerMapDelta:
    """The change from a device's map at version `base` to its map at `version` (docs/api.md,
    "Incremental peer maps"): the peers added or changed since (`upsert`, whole entries), the
    names gone (`remove`), and the head, which is small and always whole (hub, relay_ips,
    targets, punch, logs_wanted_until). `apply` to the map at `base` gives the full map at
    `version`, peers sorted by name as the coordinator sends them."""

    version: int
    base: int
    hub: HubInfo
    upsert: tuple[PeerEntry, ...] = ()
    remove: tuple[str, ...] = ()
    relay_ips: tuple[str, ...] = ()
    targets: int = 0
    punch: tuple[tuple[str, int], ...] = ()
    logs_wanted_until: float | None = None

    def to_json(self) -> dict[str, Any]:
        return _map_json(self, {"base": self.base,
                                "upsert": [p.to_json() for p in self.upsert],
                                "remove": list(self.remove)})

    @classmethod
    def from_json(cls, obj: Any) -> PeerMapDelta:
        w = "peermap"
        version, hub, relay_ips, targets, punch, logs = _map_head(obj, w)
        base = _get(obj, "base", int, w)
        if base < 0 or base == version:
            raise ControlError(f"{w}.base: must be a non-negative version other than "
                               f"{w}.version")
        upsert = _peer_entries(obj, "upsert", w)
        remove = _get(obj, "remove", list, w)
        if len(remove) > MAX_MAP_PEERS:
            raise ControlError(f"{w}.remove: more than {MAX_MAP_PEERS}")
        gone = tuple(check_name(n, f"{w}.remove[{i}]") for i, n in enumerate(remove))
        names = [p.name for p in upsert]
        if len(set(names)) != len(names) or len(set(gone)) != len(gone) \
                or not set(names).isdisjoint(gone):
            raise ControlError(f"{w}: a name is upserted or removed twice")
        return cls(version, base, hub, upsert, gone, relay_ips, targets, punch, logs)

    def apply(self, held: PeerMap) -> PeerMap:
        """The full map at `version`, from `held`, the map at `base` (ControlError if it is
        another version, or if the result would hold more than MAX_MAP_PEERS peers). A removal
        of a name `held` lacks is no error: the peer came and went since `base`."""
        if held.version != self.base:
            raise ControlError(f"peermap.base: {self.base}, but the map held is "
                               f"v{held.version}")
        peers = {p.name: p for p in held.peers}
        for name in self.remove:
            peers.pop(name, None)
        for p in self.upsert:
            peers[p.name] = p
        if len(peers) > MAX_MAP_PEERS:
            raise ControlError(f"peermap.upsert: the map would hold more than {MAX_MAP_PEERS} "
                               "peers")
        return PeerMap(self.version, self.hub, tuple(peers[n] for n in sorted(peers)),
                       self.relay_ips, self.targets, self.punch, self.logs_wanted_until)


def peermap_answer(obj: Any) -> PeerMap | PeerMapDelta:
    """A 200 of `GET /device/peermap`: a delta when it names a `base`, else a full map."""
    if isinstance(obj, Mapping) and "base" in obj:
        return PeerMapDelta.from_json(obj)
    return PeerMap.from_json(obj)


# --------------------------------------------------------------------------- device state


@dataclass(frozen=True, slots=True)
class PeerPath:
    """How a device reaches one peer right now, as the device itself sees it."""

    public_key: str
    path: PathKind
    endpoint: str | None = None
    last_handshake: float | None = None  # epoch seconds of the last direct handshake

    def to_json(self) -> dict[str, Any]:
        return {"public_key": self.public_key, "path": self.path, "endpoint": self.endpoint,
                "last_handshake": self.last_handshake}

    @classmethod
    def from_json(cls, obj: Any, where: str = "peer") -> PeerPath:
        path = _get(obj, "path", str, where)
        if path not in PATH_KINDS:
            raise ControlError(f"{where}.path: must be one of {', '.join(PATH_KINDS)}")
        endpoint = _get(obj, "endpoint", str, where, optional=True)
        return cls(check_key(_get(obj, "public_key", str, where), f"{where}.public_key"),
                   path,  # type: ignore[arg-type]
                   None if endpoint is None else check_endpoint(endpoint, f"{where}.endpoint"),
                   _get(obj, "last_handshake", float, where, optional=True))


# The agent's apply states, one definition for the agent's core (agent/_apply_core.py) and the
# reports that name one per app (docs/apply.md).
APP_STATES: Final = ("idle", "downloading", "waiting-lock", "loading", "stopping", "starting",
                     "checking-health", "running", "failed", "rolling-back",
                     # downloaded, held until the device's rollout phase starts (target.hold)
                     "waiting-phase",
                     # downloaded, waiting for the device's maintenance window (target.window)
                     "waiting-window",
                     # the target release has no image for the device's platform: it keeps
                     # running what it runs (docs/releases.md, "Several platforms")
                     "no-platform")
BYTE_SOURCES: Final = ("lan", "wan_peer", "coordinator")
MAX_APPS: Final = 16  # apps per device: a device runs a handful of containerised apps
MAX_ERROR_LEN: Final = 500  # one line an operator reads, not a stack trace
MAX_FAILED: Final = 32  # failed versions an agent remembers per app
MAX_COUNT: Final = (1 << 63) - 1  # byte counts and versions fit SQLite's INTEGER


def check_app(app: str, where: str = "app") -> str:
    """An app name as the release format spells it (mesh.names)."""
    if not isinstance(app, str) or len(app) > MAX_APP_NAME or not APP_NAME_RE.match(app):
        raise ControlError(f"{where}: must be 1-{MAX_APP_NAME} of A-Z, a-z, 0-9, '.', '_' and "
                           "'-', starting with a letter or digit")
    return app


def _count(obj: Mapping[str, Any], key: str, where: str) -> int:
    """A non-negative integer; absent or null is 0."""
    value = _get(obj, key, int, where, optional=True)
    if value is None:
        return 0
    if not 0 <= value <= MAX_COUNT:
        raise ControlError(f"{where}.{key}: must be 0..{MAX_COUNT}")
    return int(value)


def _version(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise ControlError(f"{where}: must be a release version (a positive integer)")
    return value


def _opt_version(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    value = _get(obj, key, int, where, optional=True)
    return None if value is None else _version(value, f"{where}.{key}")


def _time(obj: Mapping[str, Any], key: str, where: str, optional: bool = False
          ) -> float | None:
    """Epoch seconds: finite and not negative."""
    value = _get(obj, key, float, where, optional=optional)
    if value is None:
        return None
    if not 0.0 <= value < 1e11:  # also rejects NaN and infinities
        raise ControlError(f"{where}.{key}: must be epoch seconds")
    return value


def _text(obj: Mapping[str, Any], key: str, limit: int, where: str) -> str | None:
    """A string of at most `limit` characters, optional; lone surrogates (which no database
    or terminal takes) become '?'."""
    if not isinstance(obj, Mapping):
        raise ControlError(f"{where}: must be an object")
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ControlError(f"{where}.{key}: must be a string")
    if len(value) > limit:
        raise ControlError(f"{where}.{key}: longer than {limit} characters")
    return value.encode("utf-8", "replace").decode("utf-8")


@dataclass(frozen=True, slots=True)
class SourceBytes:
    """Where the bytes of a download came from."""

    lan: int = 0  # LAN neighbours
    wan_peer: int = 0  # peers behind another NAT (they cost WAN bytes on both ends)
    coordinator: int = 0

    def to_json(self) -> dict[str, int]:
        return {"lan": self.lan, "wan_peer": self.wan_peer, "coordinator": self.coordinator}

    @classmethod
    def from_json(cls, obj: Any, where: str = "by_source") -> SourceBytes:
        if obj is None:
            return cls()
        return cls(*(_count(obj, k, where) for k in BYTE_SOURCES))


@dataclass(frozen=True, slots=True)
class AppStatus:
    """One app on one device, as its agent last saw it (the coordinator keeps the newest)."""

    app: str
    state: str  # one of APP_STATES
    running: int | None = None  # the version running now
    target: int | None = None  # the version the agent is working towards
    bytes_done: int = 0
    bytes_total: int = 0  # blob bytes of the target release this device needs
    by_source: SourceBytes = field(default_factory=SourceBytes)
    lock_since: float | None = None  # when the app's update lock was first seen held
    error: str | None = None  # one line
    failed: tuple[int, ...] = ()  # versions that failed here
    retry_seen: int = 0  # the highest operator retry counter the agent has acted on
    updated_at: float = 0.0
    # The fleet's signed timestamp expired and no newer one came: the coordinator may be frozen
    # (docs/security.md). In the JSON only when true, so older coordinators see no change.
    stale: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {"app": self.app, "running": self.running, "target": self.target,
               "state": self.state, "bytes_done": self.bytes_done,
               "bytes_total": self.bytes_total, "by_source": self.by_source.to_json(),
               "lock_since": self.lock_since, "error": self.error,
               "failed": list(self.failed), "retry_seen": self.retry_seen,
               "updated_at": self.updated_at}
        if self.stale:
            out["stale"] = True
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str = "app") -> AppStatus:
        state = _get(obj, "state", str, where)
        if state not in APP_STATES:
            raise ControlError(f"{where}.state: must be one of {', '.join(APP_STATES)}")
        failed = _get(obj, "failed", list, where, optional=True) or []
        if len(failed) > MAX_FAILED:
            raise ControlError(f"{where}.failed: more than {MAX_FAILED} versions")
        error = _text(obj, "error", MAX_ERROR_LEN, where)
        return cls(
            app=check_app(_get(obj, "app", str, where), f"{where}.app"), state=state,
            running=_opt_version(obj, "running", where), target=_opt_version(obj, "target", where),
            bytes_done=_count(obj, "bytes_done", where),
            bytes_total=_count(obj, "bytes_total", where),
            by_source=SourceBytes.from_json(_get(obj, "by_source", dict, where, optional=True),
                                            f"{where}.by_source"),
            lock_since=_time(obj, "lock_since", where, optional=True),
            error=None if error is None else " ".join(error.split()) or None,
            failed=tuple(_version(v, f"{where}.failed[{i}]") for i, v in enumerate(failed)),
            retry_seen=_count(obj, "retry_seen", where),
            updated_at=_time(obj, "updated_at", where, optional=True) or 0.0,
            stale=_get(obj, "stale", bool, where, optional=True) or False)


# What a device counts against a peer of its peer map (mesh.node.MeshNode.misbehaving_peers,
# docs/security.md "Misbehaving peers"): a piece or blob that failed validation, an undecodable
# frame, a membership update about a node outside the peer map, a third party's incarnation
# claim too far ahead, a manifest the verifier refused.
MISBEHAVIOURS: Final = ("corrupt_blob", "bad_frame", "ghost_member", "implausible_incarnation",
                        "forged_manifest")


@dataclass(frozen=True, slots=True)
class PeerMisbehaviour:
    """A device's totals, since its agent started, of what one peer did wrong (reason ->
    count, reasons from MISBEHAVIOURS). A claim of the reporter's, not a fact: a hostile
    reporter can accuse an honest device (docs/security.md)."""

    name: str
    counts: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "counts": dict(self.counts)}

    @classmethod
    def from_json(cls, obj: Any, where: str = "misbehaving_peer") -> PeerMisbehaviour:
        name = check_name(_get(obj, "name", str, where), f"{where}.name")
        counts = _get(obj, "counts", dict, where)
        for reason in counts:
            if reason not in MISBEHAVIOURS:
                raise ControlError(f"{where}.counts: unknown reason {str(reason)[:40]!r} (one of "
                                   f"{', '.join(MISBEHAVIOURS)})")
        out = {}
        for reason in MISBEHAVIOURS:
            if counts.get(reason) is not None:  # null is no count, as in every count here
                out[reason] = _count(counts, reason, f"{where}.counts")
        return cls(name, out)


MAX_LINK_SECONDS: Final = 86400.0


def _seconds(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    value = _get(obj, key, float, where, optional=True)
    if value is not None and not 0.0 <= value <= MAX_LINK_SECONDS:  # also NaN, infinities
        raise ControlError(f"{where}.{key}: must be seconds from 0 to {MAX_LINK_SECONDS:g}")
    return value


@dataclass(frozen=True, slots=True)
class LinkState:
    """How the device holds its NAT binding to the hub (agent/_keepalive.py): the hub
    keepalive in use, the longest silence the binding was seen to survive (0: none measured
    yet) and the shortest it did not (None: none found)."""

    hub_keepalive: int
    binding_survived: float = 0.0
    binding_lost: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"hub_keepalive": self.hub_keepalive, "binding_survived": self.binding_survived,
                "binding_lost": self.binding_lost}

    @classmethod
    def from_json(cls, obj: Any, where: str = "link") -> LinkState:
        keepalive = _get(obj, "hub_keepalive", int, where)
        if not 0 <= keepalive <= MAX_LINK_SECONDS:
            raise ControlError(f"{where}.hub_keepalive: must be seconds from 0 to "
                               f"{MAX_LINK_SECONDS:g}")
        return cls(keepalive, _seconds(obj, "binding_survived", where) or 0.0,
                   _seconds(obj, "binding_lost", where))


# What a device's WAN bytes went to (agent/_account.py; docs/metered.md, "The byte account"):
# WireGuard's own cost (framing, keepalives, handshakes, the TCP/TLS overhead of calls through
# the tunnel), coordinator API calls (control, logs, blobs) and gossip frames.
WAN_PURPOSES: Final = ("wireguard", "control", "gossip", "blobs", "logs")
MAX_WAN_DAYS: Final = 8  # a week and today
MAX_WAN_BYTES: Final = 2**53  # exclusive: every count is exact in a JSON reader's double

WanBytes = Mapping[str, Mapping[str, int]]  # UTC day (YYYY-MM-DD) -> purpose -> bytes


def wan_bytes_from_json(obj: Any, where: str = "wan_bytes") -> dict[str, dict[str, int]]:
    """`{"YYYY-MM-DD": {purpose: bytes}}`, validated: at most MAX_WAN_DAYS days, known
    purposes only, integers from 0 to below MAX_WAN_BYTES."""
    if not isinstance(obj, Mapping):
        raise ControlError(f"{where}: must be an object")
    if len(obj) > MAX_WAN_DAYS:
        raise ControlError(f"{where}: more than {MAX_WAN_DAYS} days")
    out: dict[str, dict[str, int]] = {}
    for day, counts in obj.items():
        try:
            valid = isinstance(day, str) and len(day) == 10 and \
                datetime.date.fromisoformat(day).isoformat() == day
        except ValueError:
            valid = False
        if not valid:
            raise ControlError(f"{where}: {str(day)[:20]!r} is not a day (YYYY-MM-DD)")
        if not isinstance(counts, Mapping):
            raise ControlError(f"{where}.{day}: must be an object")
        day_out: dict[str, int] = {}
        for purpose, n in counts.items():
            if purpose not in WAN_PURPOSES:
                raise ControlError(f"{where}.{day}: unknown purpose {str(purpose)[:20]!r} "
                                   f"(known: {', '.join(WAN_PURPOSES)})")
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < MAX_WAN_BYTES:
                raise ControlError(f"{where}.{day}.{purpose}: must be an integer from 0 to "
                                   f"2**53 - 1")
            day_out[purpose] = n
        out[day] = day_out
    return out


WAN_BUDGET_PERIODS: Final = ("day", "month")  # UTC calendar days and months


@dataclass(frozen=True, slots=True)
class WanBudget:
    """The device's WAN budget (`fleetmesh-agent run --wan-budget`): `limit` bytes per UTC
    `period`, `used` so far this period by its own account. Past the limit (`over`) it defers
    log shipping (all but the tail of an app that fails)."""

    limit: int
    period: str
    used: int

    @property
    def over(self) -> bool:
        return self.used >= self.limit

    def to_json(self) -> dict[str, Any]:
        return {"limit": self.limit, "period": self.period, "used": self.used,
                "over": self.over}

    @classmethod
    def from_json(cls, obj: Any, where: str = "wan_budget") -> WanBudget:
        period = _get(obj, "period", str, where)
        if period not in WAN_BUDGET_PERIODS:
            raise ControlError(f"{where}.period: must be day or month")
        values = []
        for key in ("limit", "used"):
            n = obj.get(key)
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < MAX_WAN_BYTES:
                raise ControlError(f"{where}.{key}: must be an integer from 0 to 2**53 - 1")
            values.append(n)
        if values[0] == 0:
            raise ControlError(f"{where}.limit: must be at least 1 byte")
        # derived from limit and used (to_json writes it), but a report may not say nonsense
        over = obj.get("over")
        if over is not None and not isinstance(over, bool):
            raise ControlError(f"{where}.over: must be true or false")
        return cls(values[0], period, values[1])


MAX_TIMEZONE_LEN: Final = 64
_TIMEZONE_RE: Final = re.compile(rf"[A-Za-z0-9_+:/-]{{1,{MAX_TIMEZONE_LEN}}}")


def check_timezone(value: Any, where: str = "timezone") -> str | None:
    """A device's time zone as its agent names it: an IANA name (`Europe/Berlin`) or
    `UTC±HH:MM`; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str) or not _TIMEZONE_RE.fullmatch(value):
        raise ControlError(f"{where}: must be 1-{MAX_TIMEZONE_LEN} of A-Z, a-z, 0-9, '_', '+', "
                           "':', '/' and '-'")
    return value


def check_platform(value: Any, where: str = "platform") -> str | None:
    """A device's platform in its canonical `os/arch[/variant]` form (mesh.release
    parse_platform); None stays None."""
    if value is None:
        return None
    try:
        platform = parse_platform(value)
    except ManifestError as exc:
        raise ControlError(f"{where}: {exc}") from None
    if platform != value:
        raise ControlError(f"{where}: {value!r} is not canonical (send {platform!r})")
    return platform


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """What an agent reports about itself: LAN candidates, version, per-peer paths, the state
    of each app (absent from old agents: no apps) and the peers its mesh node counted
    misbehaving (absent from old agents: none)."""

    lan_endpoints: tuple[str, ...] = ()
    agent_version: str = ""
    peers: tuple[PeerPath, ...] = field(default_factory=tuple)
    apps: tuple[AppStatus, ...] = ()
    misbehaving_peers: tuple[PeerMisbehaviour, ...] = ()
    link: LinkState | None = None  # absent from old agents
    # the device's own byte account, today and yesterday (absent from old agents)
    wan_bytes: WanBytes | None = field(default=None, hash=False)
    wan_budget: WanBudget | None = None  # absent: no budget set
    # the device's time zone (IANA name or UTC±HH:MM), in which a target's window is read;
    # absent from old agents
    timezone: str | None = None
    # the device's platform, os/arch[/variant] (its engine's); absent from old agents
    platform: str | None = None
    # the agent's last report before it stops on purpose (SIGTERM, `systemctl stop`): the
    # device is offline from now on, not only once the online window has passed
    stopping: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lan_endpoints": list(self.lan_endpoints), "agent_version": self.agent_version,
            "peers": [p.to_json() for p in self.peers], "apps": [a.to_json() for a in self.apps],
            "misbehaving_peers": [m.to_json() for m in self.misbehaving_peers]}
        if self.link is not None:
            out["link"] = self.link.to_json()
        if self.wan_bytes is not None:
            out["wan_bytes"] = {day: dict(counts) for day, counts in self.wan_bytes.items()}
        if self.wan_budget is not None:
            out["wan_budget"] = self.wan_budget.to_json()
        if self.timezone is not None:
            out["timezone"] = self.timezone
        if self.platform is not None:
            out["platform"] = self.platform
        if self.stopping:
            out["stopping"] = True
        return out

    @classmethod
    def from_json(cls, obj: Any) -> DeviceReport:
        w = "report"
        peers: Sequence[Any] = _get(obj, "peers", list, w, optional=True) or []
        if len(peers) > MAX_PEERS:
            raise ControlError(f"{w}.peers: more than {MAX_PEERS}")
        items: Sequence[Any] = _get(obj, "apps", list, w, optional=True) or []
        if len(items) > MAX_APPS:
            raise ControlError(f"{w}.apps: more than {MAX_APPS}")
        apps = tuple(AppStatus.from_json(a, f"{w}.apps[{i}]") for i, a in enumerate(items))
        if len({a.app for a in apps}) != len(apps):
            raise ControlError(f"{w}.apps: an app is named twice")
        named: Sequence[Any] = _get(obj, "misbehaving_peers", list, w, optional=True) or []
        if len(named) > MAX_PEERS:
            raise ControlError(f"{w}.misbehaving_peers: more than {MAX_PEERS}")
        misbehaving = tuple(PeerMisbehaviour.from_json(m, f"{w}.misbehaving_peers[{i}]")
                            for i, m in enumerate(named))
        if len({m.name for m in misbehaving}) != len(misbehaving):
            raise ControlError(f"{w}.misbehaving_peers: a peer is named twice")
        return cls(_endpoints(obj, "lan_endpoints", w),
                   _get(obj, "agent_version", str, w, optional=True) or "",
                   tuple(PeerPath.from_json(p, f"{w}.peers[{i}]") for i, p in enumerate(peers)),
                   apps, misbehaving,
                   None if obj.get("link") is None else LinkState.from_json(obj["link"],
                                                                            f"{w}.link"),
                   None if obj.get("wan_bytes") is None
                   else wan_bytes_from_json(obj["wan_bytes"], f"{w}.wan_bytes"),
                   None if obj.get("wan_budget") is None
                   else WanBudget.from_json(obj["wan_budget"], f"{w}.wan_budget"),
                   check_timezone(obj.get("timezone"), f"{w}.timezone"),
                   check_platform(obj.get("platform"), f"{w}.platform"),
                   _get(obj, "stopping", bool, w, optional=True) or False)


# --------------------------------------------------------------------------- device targets


# An encoded SignedPin, as mesh.release's codec bounds it (MAX_PIN_BYTES + 1024).
MAX_SIGNED_PIN_BYTES: Final = 5 * 1024


@dataclass(frozen=True, slots=True)
class DeviceTarget:
    """What `GET /device/target` answers for one app: the release this device should run.

    `pin` is the operator's encoded SignedPin when the target goes back to an older release
    (hex in JSON; the agent checks its signature, the coordinator only passes it on); `force`
    goes past the app's update lock and the window (never past `hold`); `retry` is the
    operator's retry counter for this device. `hold`: download the release but do not apply it
    (the device's rollout phase has not started). `window`: the maintenance window's text
    (`HH:MM-HH:MM` or `HH:MM:SS-HH:MM:SS`, mesh.rollout.Window, kept in its canonical form):
    the release is applied only inside it, in the device's local time.
    """

    app: str
    version: int
    pin: bytes | None = None
    force: bool = False
    retry: int = 0
    hold: bool = False
    window: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"app": self.app, "version": self.version,
                "pin": None if self.pin is None else self.pin.hex(), "force": self.force,
                "retry": self.retry, "hold": self.hold, "window": self.window}

    @classmethod
    def from_json(cls, obj: Any, where: str = "target") -> DeviceTarget:
        app = check_app(_get(obj, "app", str, where), f"{where}.app")
        version = _version(obj.get("version"), f"{where}.version")
        raw = obj.get("pin")
        pin: bytes | None = None
        if raw is not None:
            if not isinstance(raw, str) or len(raw) > 2 * MAX_SIGNED_PIN_BYTES:
                raise ControlError(f"{where}.pin: must be hex of at most "
                                   f"{MAX_SIGNED_PIN_BYTES} bytes")
            try:
                pin = bytes.fromhex(raw)
            except ValueError:
                raise ControlError(f"{where}.pin: not hex") from None
        return cls(app, version, pin, _flag(obj, "force", where), _count(obj, "retry", where),
                   _flag(obj, "hold", where), check_window(obj.get("window"), f"{where}.window"))


def _flag(obj: Mapping[str, Any], key: str, where: str) -> bool:
    """A boolean; absent or null is false."""
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ControlError(f"{where}.{key}: must be true or false")
    return value


def check_window(value: Any, where: str = "window") -> str | None:
    """A maintenance window's text (`HH:MM-HH:MM` or `HH:MM:SS-HH:MM:SS`, mesh.rollout.Window),
    in its canonical form; None stays None."""
    if value is None:
        return None
    try:
        return str(Window.parse(value))
    except RolloutSpecError as exc:
        raise ControlError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- device logs


LOG_STREAMS: Final = ("stdout", "stderr")
MAX_LOG_LINE: Final = 4096  # characters per line; the agent cuts longer ones
MAX_LOG_LINES: Final = 1000  # lines per upload
MAX_LOG_BODY: Final = 1024 * 1024  # bytes per upload (the lines' JSON, escapes included)


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line an app's container wrote, as the agent captured it."""

    ts: float  # epoch seconds
    app: str
    stream: str  # stdout or stderr
    line: str  # as written, without its newline

    def to_json(self) -> dict[str, Any]:
        return {"ts": self.ts, "app": self.app, "stream": self.stream, "line": self.line}

    @classmethod
    def from_json(cls, obj: Any, where: str = "line") -> LogLine:
        stream = _get(obj, "stream", str, where)
        if stream not in LOG_STREAMS:
            raise ControlError(f"{where}.stream: must be stdout or stderr")
        line = _text(obj, "line", MAX_LOG_LINE, where)
        if line is None:
            raise ControlError(f"{where}.line: missing")
        ts = _time(obj, "ts", where)
        assert ts is not None
        return cls(ts, check_app(_get(obj, "app", str, where), f"{where}.app"), stream, line)


@dataclass(frozen=True, slots=True)
class LogUpload:
    """POST /api/v1/device/logs: lines in the order written, and how many the agent dropped
    (its buffer was full) since its last successful upload."""

    lines: tuple[LogLine, ...]
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"lines": [x.to_json() for x in self.lines], "dropped": self.dropped}

    @classmethod
    def from_json(cls, obj: Any) -> LogUpload:
        w = "logs"
        lines: Sequence[Any] = _get(obj, "lines", list, w)
        if len(lines) > MAX_LOG_LINES:
            raise ControlError(f"{w}.lines: more than {MAX_LOG_LINES}")
        return cls(tuple(LogLine.from_json(x, f"{w}.lines[{i}]") for i, x in enumerate(lines)),
                   _count(obj, "dropped", w))


# --------------------------------------------------------------------------- tokens


TOKEN_PREFIX: Final = "fm1"
ROOT_FP_PREFIX: Final = "r"  # a token's fourth part that names a root, not a release key


@dataclass(frozen=True, slots=True)
class TokenParts:
    """`fm1.<sha256 of the coordinator's certificate, hex>.<secret>[.<release key fingerprint>
    | .r<root fingerprint>]`.

    The certificate fingerprint lets `join` verify the coordinator with no CA and no trust on
    first use (as k3s join tokens do). The optional fourth part, written by the operator's
    tooling, never by the coordinator, names what the device is to trust for releases
    (docs/security.md): the fleet's release key (`mesh.release.key_fingerprint`, 64 hex
    digits), so the device refuses an enrollment that hands it any other key; or, for a fleet
    with root metadata, `r` and its root version 1's fingerprint (`mesh.release.
    root_fingerprint`), so the device verifies the chain of roots from there and pins the
    release key the newest one names. The coordinator reads only the secret."""

    fingerprint: str
    secret: str
    release_key_fp: str | None = None
    root_fp: str | None = None

    def __post_init__(self) -> None:
        if self.release_key_fp is not None and self.root_fp is not None:
            raise ControlError("token: names a release key or a root, not both")

    def __str__(self) -> str:
        text = f"{TOKEN_PREFIX}.{self.fingerprint}.{self.secret}"
        if self.root_fp is not None:
            return f"{text}.{ROOT_FP_PREFIX}{self.root_fp}"
        return text if self.release_key_fp is None else f"{text}.{self.release_key_fp}"

    @classmethod
    def parse(cls, text: str) -> TokenParts:
        parts = text.strip().split(".") if isinstance(text, str) else []
        if len(parts) not in (3, 4) or parts[0] != TOKEN_PREFIX:
            raise ControlError("token: not a fleetmesh enrollment token "
                               "(fm1.<fingerprint>.<secret>[.<release key fingerprint>|"
                               ".r<root fingerprint>])")
        fp, secret = parts[1], parts[2]
        if not re.fullmatch(r"[0-9a-f]{64}", fp):
            raise ControlError("token: fingerprint must be 64 hex digits")
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", secret):
            raise ControlError("token: malformed secret")
        last = parts[3] if len(parts) == 4 else None
        if last is not None and last.startswith(ROOT_FP_PREFIX):
            if not re.fullmatch(r"[0-9a-f]{64}", last[len(ROOT_FP_PREFIX):]):
                raise ControlError("token: root fingerprint must be r and 64 hex digits")
            return cls(fp, secret, None, last[len(ROOT_FP_PREFIX):])
        if last is not None and not re.fullmatch(r"[0-9a-f]{64}", last):
            raise ControlError("token: release key fingerprint must be 64 hex digits")
        return cls(fp, secret, last)
