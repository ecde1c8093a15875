"""The coordinator's domain: devices, tokens, operators, and the errors the API turns into 4xx.

These are what the `Store` speaks; no SQL and no HTTP here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypedDict

from mesh.control import LinkState, LogLine, WanBudget, WanBytes


class DeviceState(enum.StrEnum):
    PROVISIONED = "provisioned"  # named by the operator, token handed out, not enrolled yet
    ACTIVE = "active"  # enrolled: has a public key, addresses and a credential
    REVOKED = "revoked"  # never comes back; its addresses are never given to anyone else


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    name: str
    fleet: str
    state: DeviceState
    created_at: float
    public_key: str | None = None
    mesh_ipv4: str | None = None
    mesh_ipv6: str | None = None
    agent_version: str = ""
    lan_endpoints: tuple[str, ...] = ()
    last_report: float | None = None
    enrolled_at: float | None = None
    revoked_at: float | None = None
    public_endpoint: str | None = None  # as the hub last saw it
    link: LinkState | None = None  # how it holds its NAT binding (its last report that said)
    # its own WAN byte account, UTC day -> purpose -> bytes (its reports, merged by day)
    wan_bytes: WanBytes | None = None
    wan_budget: WanBudget | None = None  # its WAN budget, as its last report said (None: none)
    # the operator's key=value tags (mesh.rollout.check_tags): selectors pick devices by them
    tags: dict[str, str] = field(default_factory=dict)
    timezone: str | None = None  # its local time zone, as its last report said (windows)
    # os/arch[/variant], as its enrollment or last report said (None: its agent does not say)
    platform: str | None = None


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    """Stored form of a token: only the SHA-256 of its secret is kept."""

    secret_hash: str
    fleet: str
    uses_left: int
    expires_at: float
    created_at: float
    name: str | None = None  # bound to this device name (provisioning)
    tags: dict[str, str] | None = None  # the tags of the device it enrolls (None: none)


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    public_key: str
    mesh_ipv4: str
    mesh_ipv6: str
    created_at: float


@dataclass(frozen=True, slots=True)
class EnrollParams:
    """Everything one enrollment writes, decided before the store's transaction."""

    secret_hash: str
    public_key: str
    credential_hash: str
    device_id: str  # used when the enrollment creates a new device row
    generated_name: str  # used when neither the token nor the request names the device
    now: float
    name: str | None = None
    lan_endpoints: tuple[str, ...] = ()
    agent_version: str = ""
    platform: str = ""  # os/arch[/variant] ("": an old agent that does not say)
    # The id of the device the caller proved to be (its credential or its private key), the
    # only way to enroll again a name that is active (docs/security.md)
    proven_device_id: str | None = None


@dataclass(frozen=True, slots=True)
class AppControl:
    """The operator's say over one app on one device (what /device/target adds to a target)."""

    force_version: int | None = None  # forced past the update lock for this version
    retry: int = 0  # retry counter: the agent retries a failed version when it grows


@dataclass(frozen=True, slots=True)
class LogPage:
    """Stored log lines of one device, oldest first, each with its sequence number."""

    lines: tuple[tuple[int, LogLine], ...]
    last_seq: int  # the newest sequence number stored for the device (0: none yet)
    dropped: int  # lines the agent reported dropped, in total


# --------------------------------------------------------------------------- errors


class CoordinatorError(Exception):
    """A refusal with an HTTP status; str() is one line for `{"error": ...}`."""

    status = 400


class Unauthorized(CoordinatorError):
    status = 401


class Forbidden(CoordinatorError):
    status = 403


class NotFound(CoordinatorError):
    status = 404


class Conflict(CoordinatorError):
    status = 409


class FleetFull(Conflict):
    """The fleet holds its quota of devices (ServiceSettings.max_fleet_devices)."""


class RequestTimeout(CoordinatorError):
    """A request's body did not arrive within its deadline (coordinator._listen.HttpLimits)."""

    status = 408


class TooLarge(CoordinatorError):
    status = 413


class StoreUnavailable(CoordinatorError, OSError):
    """The database did not answer (a PostgreSQL server down or restarting): worth a retry.
    An OSError too, so that the hub's loops log it and go on, as they do for a socket."""

    status = 503


class TokenUnknown(Unauthorized):
    def __init__(self) -> None:
        super().__init__("enrollment token unknown (never issued here, or mistyped)")


class TokenExpired(Unauthorized):
    def __init__(self) -> None:
        super().__init__("enrollment token expired; ask the operator for a new one")


class TokenUsedUp(Unauthorized):
    def __init__(self) -> None:
        super().__init__("enrollment token already used up; ask the operator for a new one")


class ProofRequired(Conflict):
    """Enrolling again an active device without proving to be it: its credential stays."""

    def __init__(self, name: str, public_key: str) -> None:
        super().__init__(
            f"device {name!r} is enrolled; enrolling it again needs a proof of possession "
            "(its current credential, or the answer to this challenge made with its WireGuard "
            "private key; docs/security.md)")
        self.name = name
        self.public_key = public_key
        self.challenge: str | None = None  # set by the service when it can check a key proof


class CredentialRevoked(Unauthorized):
    """The credential belonged to a device the operator revoked: the agent stops for good.
    Any other refused credential is not a revocation (docs/security.md)."""

    def __init__(self) -> None:
        super().__init__("device revoked by the operator")


class AddressSpaceExhausted(Conflict):
    pass


@dataclass(frozen=True, slots=True)
class MisbehaviourReport:
    """What one device (`reporter`) last reported another (`offender`) doing wrong: reason ->
    count since the reporter's agent started (mesh.control.MISBEHAVIOURS). A claim of the
    reporter's: the operator sees who says what (docs/security.md)."""

    reporter: str
    offender: str
    counts: dict[str, int]


class DeviceInfo(TypedDict):
    """`DeviceInfo` (docs/api.md)."""

    name: str
    fleet: str
    state: str
    online: bool
    public_key: str | None
    mesh_ipv4: str | None
    mesh_ipv6: str | None
    agent_version: str
    endpoint: str | None
    lan_endpoints: list[str]
    last_seen: float | None
    last_report: float | None  # when its last state report arrived (coordinator clock)
    enrolled_at: float | None
    release: int | None  # the running version of its app (the first by name if several)
    apps: list[dict[str, Any]]  # AppStatus JSON plus lock_stale
    # what other devices report this one doing wrong: [{"reporter", "counts"}]
    reported_by: list[dict[str, Any]]
    # what this device reports others doing wrong: [{"name", "counts"}]
    reports_about: list[dict[str, Any]]
    reported_misbehaving: int  # how many devices report it misbehaving
    link: dict[str, Any] | None  # mesh.control.LinkState JSON from its reports
    # the device's own WAN byte account from its reports: {"YYYY-MM-DD": {purpose: bytes}}
    wan_bytes: dict[str, dict[str, int]] | None
    wan_budget: dict[str, Any] | None  # mesh.control.WanBudget JSON from its last report
    tags: dict[str, str]  # the operator's key=value tags
    timezone: str | None  # its local time zone, from its last report
    platform: str | None  # os/arch[/variant] from its enrollment or last report


def device_info(device: Device, *, online: bool, endpoint: str | None,
                last_seen: float | None, release: int | None,
                apps: list[dict[str, Any]],
                reports: Sequence[MisbehaviourReport] = ()) -> DeviceInfo:
    """`DeviceInfo`: the stored device plus what only the running server knows;
    `reports`: its fleet's (those about or by others are left out)."""
    reported_by = [{"reporter": r.reporter, "counts": r.counts} for r in reports
                   if r.offender == device.name and r.reporter != device.name]
    reports_about = [{"name": r.offender, "counts": r.counts} for r in reports
                     if r.reporter == device.name]
    return {"name": device.name, "fleet": device.fleet, "state": str(device.state),
            "online": online, "public_key": device.public_key, "mesh_ipv4": device.mesh_ipv4,
            "mesh_ipv6": device.mesh_ipv6, "agent_version": device.agent_version,
            "endpoint": endpoint, "lan_endpoints": list(device.lan_endpoints),
            "last_seen": last_seen, "last_report": device.last_report,
            "enrolled_at": device.enrolled_at, "release": release,
            "apps": apps, "reported_by": reported_by, "reports_about": reports_about,
            "reported_misbehaving": len(reported_by),
            "link": device.link.to_json() if device.link is not None else None,
            "wan_bytes": None if device.wan_bytes is None else
            {day: dict(c) for day, c in sorted(device.wan_bytes.items(), reverse=True)},
            "wan_budget": None if device.wan_budget is None else device.wan_budget.to_json(),
            "tags": dict(sorted(device.tags.items())), "timezone": device.timezone,
            "platform": device.platform}


WAN_DAYS_KEPT = 7  # a device's byte account: the newest week of days it reported


def merge_wan_bytes(old: WanBytes | None, new: WanBytes) -> dict[str, dict[str, int]]:
    """A device's stored account with a new report's days: the report's figure for each day
    it names (the newest count of that day), the older days as they were, the newest
    WAN_DAYS_KEPT days kept (a report names only today and yesterday, so yesterday's final
    figure stays a week)."""
    merged = {day: dict(c) for day, c in (old or {}).items()}
    merged.update({day: dict(c) for day, c in new.items()})
    return {day: merged[day] for day in sorted(merged, reverse=True)[:WAN_DAYS_KEPT]}


# --------------------------------------------------------------------------- releases


@dataclass(frozen=True, slots=True)
class Release:
    """A published release: the operator-signed manifest bytes plus what the registry lists.

    `signed` is the encoded SignedManifest exactly as published (the only form devices get)."""

    fleet: str
    app: str
    version: int
    signed: bytes
    key_id: str
    created_at: int  # from the manifest
    published_at: float
    layers: int
    size: int  # uncompressed layer bytes
    stored_size: int  # chunk (zstd frame) bytes
    delta_size: int  # delta bytes
    blob_ids: tuple[str, ...] = ()  # every chunk and delta the manifest names (hex)


@dataclass(frozen=True, slots=True)
class FleetReleaseKey:
    """The public half of the key that signs `fleet`'s releases, as the operator registered it."""

    fleet: str
    public_key: str  # Ed25519, hex
    key_id: str
    set_at: float


@dataclass(frozen=True, slots=True)
class FleetTarget:
    """The release devices of `fleet` should run; `device` None means every device."""

    fleet: str
    app: str
    version: int
    device: str | None
    pin: bytes | None  # an encoded SignedPin (a rollback's authorisation), as given
    set_at: float


class ReleaseInfo(TypedDict):
    """`ReleaseInfo` (docs/api.md)."""

    fleet: str
    app: str
    version: int
    created_at: int
    key_id: str
    layers: int
    size: int
    stored_size: int
    delta_size: int
    published_at: float


class DeltaInfo(TypedDict):
    source_diff_id: str
    size: int
    method: str


class LayerInfo(TypedDict):
    diff_id: str
    size: int
    chunks: int
    stored_size: int
    deltas: list[DeltaInfo]
    platform: str  # of the image it belongs to; "" for an image stating none


class PlatformInfo(TypedDict):
    """One platform's image of a release (docs/releases.md, "Several platforms")."""

    platform: str
    layers: int
    size: int  # uncompressed layer bytes
    stored_size: int  # chunk bytes
    delta_size: int


class ReleaseDetail(TypedDict):
    """GET /releases/{fleet}/{app}/{version}: ReleaseInfo with its layers and platforms
    listed (`layers` is every platform's, in the order of `platforms`)."""

    fleet: str
    app: str
    version: int
    created_at: int
    key_id: str
    layers: list[LayerInfo]
    platforms: list[PlatformInfo]
    size: int
    stored_size: int
    delta_size: int
    published_at: float


class TargetInfo(TypedDict):
    """`Target` (docs/api.md): PUT /fleets/{fleet}/target's answer."""

    fleet: str
    app: str
    version: int
    device: str | None
    pin: str | None  # hex
    set_at: float


def release_info(r: Release) -> ReleaseInfo:
    return {"fleet": r.fleet, "app": r.app, "version": r.version, "created_at": r.created_at,
            "key_id": r.key_id, "layers": r.layers, "size": r.size,
            "stored_size": r.stored_size, "delta_size": r.delta_size,
            "published_at": r.published_at}


def target_info(t: FleetTarget) -> TargetInfo:
    return {"fleet": t.fleet, "app": t.app, "version": t.version, "device": t.device,
            "pin": None if t.pin is None else t.pin.hex(), "set_at": t.set_at}


ROLLOUT_ACTIVE: Final = ("running", "paused")  # a rollout that still moves devices
ROLLOUT_BAD: Final = ("halted", "aborted")  # its release is bad: never a default target


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """A release's rollout as stored: `state` is its mesh.rollout.ROLLOUT_STATES name (also
    inside `data`, kept apart so the store can find the active ones); `spec` the
    RolloutSpec JSON and `data` the coordinator._rollout.Rollout JSON (both None while
    `held`: published for nobody); `rollback_pin` the encoded SignedPin of `previous` that
    takes devices back when the release turns bad."""

    fleet: str
    app: str
    version: int
    state: str
    previous: int | None
    created_at: float
    updated_at: float
    spec: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    rollback_pin: bytes | None = None


@dataclass(frozen=True, slots=True)
class FleetPolicy:
    """A fleet's reachability policy as stored: the operator's text (valid mesh.policy when it
    was stored), its version (1 for the first, one more per change) and when it was set."""

    fleet: str
    policy: str
    version: int
    updated_at: float
