"""The coordinator's domain operations: enrollment, reports, tokens, provisioning, revocation,
logs, peer maps and release targets, over the store, the release registry and the peer-map
core.

No sockets, TLS or HTTP server here: `coordinator._server.Coordinator` owns the process (data
directory, certificate, listening sockets, hypercorn, the WireGuard hub) and hands this service
what it decided (fingerprint, hub info, public URL); the routes in `coordinator.routes` call it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NotRequired, TypedDict

import trio

from mesh.control import (
    MAX_LOG_LINES,
    MAX_PEERS,
    PATH_KINDS,
    AppStatus,
    ControlError,
    DeviceReport,
    Enrollment,
    EnrollRequest,
    HubInfo,
    LogLine,
    LogUpload,
    PeerPath,
    TokenParts,
    key_proof_mac,
    x25519_secret,
)
from mesh.policy import Policy, Ports
from mesh.rollout import MAX_TAGS, Selector

from . import _secrets
from ._blobs import BlobBackend
from ._hub import HubPeer, Observation
from ._model import (
    Conflict,
    CredentialRevoked,
    Device,
    DeviceInfo,
    DeviceState,
    EnrollmentToken,
    EnrollParams,
    FleetFull,
    Forbidden,
    MisbehaviourReport,
    NotFound,
    ProofRequired,
    Unauthorized,
    device_info,
)
from ._peermap import Member, PeerMapCore, endpoint_ip
from ._policy import PolicyService, policy_of
from ._releases import ReleaseRegistry, lock_stale
from ._rollouts import RolloutService
from ._store import Store

log = logging.getLogger("fleetmesh.coordinator")

ONLINE_WINDOW: Final = 60.0  # s: a hub handshake (WireGuard rekeys every 120 s; devices keep
#                              a 25 s keepalive) or a report within this counts as online
# Peer-map versions: milliseconds x VERSION_STRIDE + a per-process tag (FleetService.__init__)
VERSION_STRIDE: Final = 1024
BATCH_WINDOW: Final = 0.2  # s: coalesce a burst so both sides of a pair hear it together
# One punch request per (device, peer) is passed on per this many seconds; more within it are
# answered but change nothing: a device cannot make its peers' maps churn (each new map is a
# long-poll answer over the peer's metered link).
PUNCH_SPACING: Final = 10.0
# A device polling with quiet=1 stays silent toward the hub for the poll's wait (a keepalive
# trial, agent/_keepalive.py): online until then, and a round trip after.
QUIET_SLACK: Final = 10.0
# An update lock held longer than this is shown as stale (issue 6); an hour covers a long
# recording or call, which is what apps hold their lock for.
LOCK_STALE_AFTER: Final = 3600.0
LOG_KEEP: Final = 5000  # newest log lines kept per device (docs/api.md)
# A read of a device's logs (`devices logs`, -f or not, the dashboard's log view) asks the
# device, through its peer map, to upload them for this long; a follower (a read every 30 s at
# most) renews it once less than half is left, so following costs one peer-map push per
# LOGS_WANTED_FOR / 2, and the device stops within LOGS_WANTED_FOR of the last read. Not
# wanted, its lines stay in its bounded buffer: no bytes at rest (issue 14).
LOGS_WANTED_FOR: Final = 300.0
# Log lines a device may store, per second on average and in one burst (docs/security.md,
# "Log uploads are rate-limited"). The agent sends at most MAX_LOG_LINES every 2 s (500 lines/s);
# an app that logs 50 lines a second for long is flooding, and every line is a database write.
# The burst takes two full uploads, e.g. the backlog an agent kept while the coordinator was away.
LOG_RATE: Final = 50.0
LOG_BURST: Final = 2 * MAX_LOG_LINES
# At most one "dropped N lines" marker line per device this often: the markers of a flooding
# device must not become the flood.
LOG_MARKER_SPACING: Final = 10.0
MAX_SECRET_LEN: Final = 200  # longer than any credential we hand out: refused unhashed
# An enrollment challenge (docs/security.md): answered within seconds by the SDK; a minute
# covers a slow link. The table is bounded (oldest dropped) and only a valid token fills it.
CHALLENGE_TTL: Final = 60.0
MAX_CHALLENGES: Final = 4096
# Devices per fleet, by default: a device's peer map lists every other device of its fleet and
# agents refuse a map of more than MAX_PEERS peers, so a larger fleet would cut all of them
# off; it also keeps one fleet's token from spending the whole mesh address range (a /16 holds
# 65,533 devices across all fleets). Operators may set it lower, never higher.
MAX_FLEET_DEVICES: Final = MAX_PEERS
# Each operator workstation adds its two mesh addresses to every peer map's relay_ips, which
# agents bound by MAX_PEERS too.
MAX_OPERATORS: Final = MAX_PEERS // 2


# --------------------------------------------------------------------------- API answers


class TokenCreated(TypedDict):
    """POST /tokens (docs/api.md)."""

    token: str
    fleet: str
    uses: int
    expires_at: float


class JoinObject(TypedDict):
    """What `fleetmesh-agent join --config` reads (device.json)."""

    url: str
    token: str
    name: str
    fleet: str
    urls: NotRequired[list[str]]  # every replica's URL, `url` first (none: one coordinator)


class Provisioned(TypedDict):
    """POST /devices (docs/api.md)."""

    device: DeviceInfo
    join: JoinObject


class PeerPathInfo(TypedDict):
    """One entry of GET /devices/{name}/peers."""

    peer: str | None
    public_key: str
    path: str
    endpoint: str | None
    last_handshake: float | None


class LogLineInfo(TypedDict):
    seq: int
    ts: float
    app: str
    stream: str
    line: str


class LogPageInfo(TypedDict):
    """GET /devices/{name}/logs (docs/api.md)."""

    lines: list[LogLineInfo]
    next: int
    dropped: int


class OperatorAdded(TypedDict):
    """POST /operators (docs/api.md)."""

    name: str
    mesh_ipv4: str
    mesh_ipv6: str
    hub: dict[str, Any]
    mesh_prefix_v4: str
    mesh_prefix_v6: str


# --------------------------------------------------------------------------- log rate


@dataclass(slots=True)
class LogBucket:
    """One device's log budget: a token bucket of `burst` lines refilled at `rate` per second,
    and the lines dropped since the last marker line told the operator."""

    tokens: float
    at: float  # when `tokens` was computed
    unreported: int = 0  # dropped lines no marker has counted yet
    app: str = ""  # the app of the first of them (the marker is filed under it)
    marker_at: float = float("-inf")

    def take(self, wanted: int, now: float, rate: float, burst: float) -> int:
        """How many of `wanted` lines fit now (spent from the bucket)."""
        self.tokens = min(burst, self.tokens + max(0.0, now - self.at) * rate)
        self.at = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


def drop_marker(count: int, app: str, now: float) -> LogLine:
    """The line the operator sees where the coordinator dropped `count` lines."""
    return LogLine(now, app, "stderr",
                   f"[fleetmesh coordinator] dropped {count} log lines of this device: over "
                   f"the log rate limit ({LOG_RATE:g} lines/s, bursts of {LOG_BURST})")


# --------------------------------------------------------------------------- the service


class PathSummary:
    """A device's reported peer paths as /metrics counts them: paths per kind, and the last
    handshake (epoch seconds) of each direct path that names one."""

    __slots__ = ("kinds", "direct_handshakes")

    def __init__(self, paths: Sequence[PeerPath]) -> None:
        self.kinds = {kind: 0 for kind in PATH_KINDS}
        for p in paths:
            self.kinds[p.path] += 1
        self.direct_handshakes = tuple(p.last_handshake for p in paths
                                       if p.path == "direct" and p.last_handshake is not None)


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    relay_hub: bool = True  # a WireGuard hub observes endpoints (else reports stand in)
    batch_window: float = BATCH_WINDOW
    online_window: float = ONLINE_WINDOW
    lock_stale_after: float = LOCK_STALE_AFTER
    max_fleet_devices: int = MAX_FLEET_DEVICES  # also the most uses a token may have
    clock: Callable[[], float] = field(default=time.time)


@dataclass(frozen=True, slots=True)
class CoordinatorIdentity:
    """What the process decided before the service starts: who it is and where it answers."""

    fingerprint: str  # SHA-256 of the TLS certificate, which every token carries
    operator_key_hash: str
    public_url: str  # where devices reach the API (the join object's url)
    hub: HubInfo
    prefix_v4: ipaddress.IPv4Network
    prefix_v6: ipaddress.IPv6Network
    # the hub's WireGuard private key: checks a device's key proof at re-enrollment ("": none)
    hub_private_key: str = field(default="", repr=False)
    # SHA-256 of the scrape token that reads /metrics and nothing else ("": none)
    metrics_token_hash: str = field(default="", repr=False)
    # every replica's public URL, this one's first (serve --peer-url; empty: no replicas)
    urls: tuple[str, ...] = ()


class FleetService:
    """The fleet as the API sees it. Built once the process knows its identity; `batcher` runs
    in the process's nursery; the hub (if any) reports through `observe` and asks `hub_peers`."""

    def __init__(self, settings: ServiceSettings, identity: CoordinatorIdentity, store: Store,
                 blobs: BlobBackend, sync_hub: Callable[[], Awaitable[None]] | None = None
                 ) -> None:
        self.settings = settings
        self.identity = identity
        self.store = store
        self.releases = ReleaseRegistry(store, blobs, settings.clock, self.targets_changed)
        self.rollouts = RolloutService(store, self.releases, self._site_of)
        self.policy = PolicyService(store, settings.clock, self._site_of, self._policy_set)
        # the process's hub, brought up to date after a change of members (None: no hub)
        self._sync_hub = sync_hub
        # Versions are the clock's milliseconds times VERSION_STRIDE plus this process's tag:
        # above any a previous run handed out, and never one another replica on the same
        # database hands out (a device that fails over must not get 304, or a delta, for a
        # number it holds from the other replica)
        self._version_tag = secrets.randbelow(VERSION_STRIDE)
        self.core = PeerMapCore(identity.hub, first_version=self._version_floor(),
                                stride=VERSION_STRIDE)
        self._key_names: dict[str, str] = {}  # public key -> active device name
        self._operator_names: dict[str, str] = {}
        self._last_handshake: dict[str, float] = {}  # or the last time rx_bytes grew
        self._rx_bytes: dict[str, int] = {}
        self._waiters: dict[str, trio.Event] = {}
        self._log_waiters: dict[str, trio.Event] = {}  # device id -> set on new lines
        self._log_buckets: dict[str, LogBucket] = {}  # device id -> its log budget
        # enrollment challenges: nonce -> (device name, public key, expiry)
        self._challenges: dict[str, tuple[str, str, float]] = {}
        self._dirty = trio.Event()
        # fan-out: when the pending batch's first change came (time.monotonic), and, per
        # device whose long poll waited when its batch was published, that time
        self._dirty_since: float | None = None
        self._fanout_marks: dict[str, float] = {}
        # told the seconds from a batch's first change to each waiting device's answer
        # (coordinator._metrics through build_app; None: nobody listens)
        self.fanout_observer: Callable[[float], None] | None = None
        # device id -> its PathSummary, dropped by each report (metrics: a scrape then parses
        # only the devices that reported since the last one, not every path of the fleet)
        self._path_summaries: dict[str, PathSummary] = {}
        self._punch_at: dict[tuple[str, str], float] = {}  # (requester, peer) -> last passed on
        self._quiet_until: dict[str, float] = {}  # device -> end of its keepalive trial
        # device -> when its agent said it stops (DeviceReport.stopping): offline until it is
        # seen again after that (a report or a hub handshake); in memory, so a restarted
        # coordinator falls back on the online window
        self._stopped_at: dict[str, float] = {}
        self._policy_read: set[str] = set()  # fleets whose stored policy the core was given
        for d in store.list_devices():
            if d.state is DeviceState.ACTIVE:
                self._add_member(d, None)
                if d.public_endpoint:
                    self.core.set_public(d.name, d.public_endpoint)
        self._set_operators()
        self.core.publish(self._version_floor())

    # ------------------------------------------------------------------ peer maps

    def _version_floor(self) -> int:
        """The lowest peer-map version a publish now hands out: the clock's milliseconds in
        the high bits, this process's tag in the low ones."""
        return int(self.settings.clock() * 1000) * VERSION_STRIDE + self._version_tag

    def _add_member(self, d: Device, public_ip: str | None) -> None:
        assert d.public_key and d.mesh_ipv4 and d.mesh_ipv6
        old = self.core.member(d.name)
        if d.fleet not in self._policy_read:  # partial maps follow the fleet's policy
            self._policy_read.add(d.fleet)
            self.core.set_policy(d.fleet, policy_of(self.store.get_policy(d.fleet)))
        self.core.add(Member(d.name, d.fleet, d.public_key, d.mesh_ipv4, d.mesh_ipv6,
                             d.lan_endpoints,
                             public_endpoint=old.public_endpoint if old else None,
                             public_ip=public_ip or (old.public_ip if old else None),
                             tags=tuple(sorted(d.tags.items()))))
        if old is not None and old.public_key != d.public_key:
            self._key_names.pop(old.public_key, None)
        self._key_names[d.public_key] = d.name

    def _policy_set(self, fleet: str, policy: Policy) -> None:
        self._policy_read.add(fleet)
        self.core.set_policy(fleet, policy)
        self._changed()

    def _site_of(self, name: str) -> str | None:
        """A device's site for phase selection: its public IP as the coordinator sees it."""
        member = self.core.member(name)
        if member is None:
            return None
        if member.public_ip:
            return member.public_ip
        return endpoint_ip(member.public_endpoint) if member.public_endpoint else None

    def _set_operators(self) -> None:
        ops = self.store.list_operators()
        self._operator_names = {o.public_key: o.name for o in ops}
        self.core.set_relay_ips([ip for o in ops for ip in (f"{o.mesh_ipv4}/32",
                                                            f"{o.mesh_ipv6}/128")])

    def targets_changed(self, fleet: str, device: str | None = None) -> None:
        """The release targets of one device of `fleet` (None: all) changed: their next peer
        map carries a new `targets` revision, which makes their agents read the targets."""
        if self.core.targets_changed(fleet, device):
            self._changed()

    def _changed(self) -> None:
        if self.core.pending:
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            self._dirty.set()

    async def batcher(self) -> None:
        """Publish pending peer-map changes a batch window after the first; runs until
        cancelled (the process's nursery owns it)."""
        while True:
            await self._dirty.wait()
            await trio.sleep(self.settings.batch_window)
            self._dirty = trio.Event()
            since, self._dirty_since = self._dirty_since, None
            filters = self.core.filter_version
            for name in self.core.publish(self._version_floor()):
                event = self._waiters.pop(name, None)
                if event is not None:
                    if since is not None:
                        self._fanout_marks[name] = since
                    event.set()
            if self.core.filter_version != filters and self._sync_hub is not None:
                # a fleet's compiled policy or members changed: the hub's filter follows now
                await self._sync_hub()

    async def wait_peermap(self, device: Device, version: int, wait: float,
                           quiet: bool = False, delta: bool = False) -> bytes | None:
        """The map as JSON if its version is not `version`, as soon as that is true within
        `wait` seconds; None (304) otherwise. Waits on an event, never polls. `quiet`: the
        device sends nothing to the hub meanwhile (a keepalive trial): online until then.
        `delta`: the device holds the map at `version` and takes the changes since (a
        PeerMapDelta) where the core can tell them; else the full map."""
        core = self.core
        deadline = trio.current_time() + wait
        if quiet:
            self._quiet_until[device.name] = self.settings.clock() + wait + QUIET_SLACK
        waited = False
        while True:
            member = core.member(device.name)
            if member is None or member.public_key != device.public_key:
                raise CredentialRevoked()  # revoke() took it out of the core just now
            if core.version(device.name) != version:
                # a fan-out only when this poll itself was waiting (a mark left by a poll
                # that went away is stale)
                since = self._fanout_marks.pop(device.name, None)
                if waited and since is not None and self.fanout_observer is not None:
                    self.fanout_observer(time.monotonic() - since)
                changes = core.render_delta(device.name, version) if delta else None
                return changes if changes is not None else core.render(device.name)
            if trio.current_time() >= deadline:
                return None
            event = self._waiters.setdefault(device.name, trio.Event())
            with trio.move_on_at(deadline):
                await event.wait()
                waited = True

    # ------------------------------------------------------------------ hub

    def hub_peers(self) -> list[HubPeer]:
        """Every device and operator workstation the hub relays for (with a fleet policy: the
        rule-edge sides each device is on, see `hub_policies`)."""
        sides = self.core.filter_rules()[1]
        peers = [HubPeer(m.public_key, m.mesh_ipv4, m.mesh_ipv6, m.fleet,
                         sides.get(m.name, frozenset()))
                 for m in self.core.members()]
        peers += [HubPeer(o.public_key, o.mesh_ipv4, o.mesh_ipv6, None)
                  for o in self.store.list_operators()]
        return peers

    def hub_policies(self) -> dict[str, list[Ports]]:
        """Per fleet with a policy, the ports of each of its rule edges (the hub's filter)."""
        return self.core.filter_rules()[0]

    def observe(self, observed: list[Observation]) -> None:
        """What the hub saw of its peers: handshakes, traffic, NAT-mapped endpoints."""
        for o in observed:
            name = self._key_names.get(o.public_key)
            if name is None:
                continue
            # A handshake happens only every ~2 minutes; the 25 s keepalives show up as
            # growing rx_bytes, so either counts as "seen" for the 60 s online window.
            seen = o.last_handshake
            # After its agent said it stops, traffic counted since (that very report, in
            # flight) is not a sign of life: only a new handshake or report is.
            if o.rx_bytes > self._rx_bytes.get(name, 0) and name not in self._stopped_at:
                seen = max(seen or 0.0, self.settings.clock())
            self._rx_bytes[name] = o.rx_bytes
            if seen is not None:
                self._last_handshake[name] = max(seen, self._last_handshake.get(name, 0.0))
            if o.endpoint is not None and self.core.set_public(name, o.endpoint):
                self._persist_endpoint(name, o.endpoint)
        self._changed()

    def _persist_endpoint(self, name: str, endpoint: str) -> None:
        device = self.store.device_by_name(name)
        if device is not None:
            self.store.record_public_endpoint(device.id, endpoint)

    async def hub_changed(self) -> None:
        """Bring the hub's peers up to date now (no-op without a hub)."""
        if self._sync_hub is not None:
            await self._sync_hub()

    # ------------------------------------------------------------------ auth

    def is_operator_key(self, secret: str) -> bool:
        key_hash = self.identity.operator_key_hash
        if not secret.startswith(_secrets.OPERATOR_PREFIX) or not key_hash:
            return False
        return hmac.compare_digest(_secrets.secret_hash(secret), key_hash)

    def is_metrics_token(self, secret: str) -> bool:
        """`secret` is the scrape token of `serve --metrics-token-file` (reads /metrics only)."""
        token_hash = self.identity.metrics_token_hash
        return bool(token_hash) and hmac.compare_digest(_secrets.secret_hash(secret),
                                                        token_hash)

    def device_for(self, secret: str) -> Device | None:
        if not secret.startswith(_secrets.DEVICE_PREFIX) or len(secret) > MAX_SECRET_LEN:
            return None
        return self.store.device_by_credential(_secrets.secret_hash(secret))

    def credential_refusal(self, secret: str) -> Unauthorized:
        """Why a device credential does not work: revoked (the agent stops for good) or only
        unknown (e.g. replaced by a later enrollment: the agent keeps its mesh and retries)."""
        if secret.startswith(_secrets.DEVICE_PREFIX) and len(secret) <= MAX_SECRET_LEN and \
                self.store.credential_revoked(_secrets.secret_hash(secret)):
            return CredentialRevoked()
        return Unauthorized("unknown device credential (never issued here, or replaced by a "
                            "later enrollment)")

    # ------------------------------------------------------------------ device side

    def enroll(self, req: EnrollRequest, client_ip: str | None) -> Enrollment:
        identity = self.identity
        parts = TokenParts.parse(req.token)
        if not hmac.compare_digest(parts.fingerprint, identity.fingerprint):
            raise Unauthorized("enrollment token is for another coordinator (certificate "
                               "fingerprint differs)")
        self._check_enroll_room(_secrets.secret_hash(parts.secret), req.name)
        credential = _secrets.new_device_credential()
        try:
            device = self.store.enroll(EnrollParams(
                secret_hash=_secrets.secret_hash(parts.secret), public_key=req.public_key,
                credential_hash=_secrets.secret_hash(credential),
                device_id=_secrets.new_id("d_"),
                generated_name=f"dev-{_secrets.new_id('')[:6]}", now=self.settings.clock(),
                name=req.name, lan_endpoints=req.lan_endpoints, agent_version=req.agent_version,
                platform=req.platform,
                proven_device_id=self._proven_device(req)))
        except ProofRequired as exc:
            if identity.hub_private_key:
                exc.challenge = self._challenge(exc.name, exc.public_key)
            raise
        self._add_member(device, None if self.settings.relay_hub else client_ip)
        self._changed()
        assert device.mesh_ipv4 and device.mesh_ipv6
        return Enrollment(device.id, device.name, device.fleet, credential, device.mesh_ipv4,
                          device.mesh_ipv6, str(identity.prefix_v4), str(identity.prefix_v6),
                          identity.hub, release_key=self.releases.release_key(device.fleet),
                          urls=identity.urls)

    def _proven_device(self, req: EnrollRequest) -> str | None:
        """The id of the device the request proves to be (docs/security.md), None if it
        carries no proof; Forbidden for a proof that does not hold."""
        if req.credential is not None:
            device = self.device_for(req.credential)
            if device is None or device.public_key != req.public_key or \
                    req.name not in (None, device.name):
                raise Forbidden("the credential given as proof is not the current one of the "
                                "active device with this name and public key")
            return device.id
        if req.key_proof is None:
            return None
        entry = self._challenges.pop(req.key_proof.challenge, None)
        if entry is None or entry[2] <= self.settings.clock() or entry[1] != req.public_key \
                or req.name not in (None, entry[0]):
            raise Forbidden("enrollment challenge unknown, used or expired, or for another "
                            "device; enroll again without a proof for a new one")
        name = entry[0]
        try:
            secret = x25519_secret(self.identity.hub_private_key, req.public_key)
        except (ValueError, RuntimeError):  # RuntimeError: a low-order key (all-zero secret)
            raise Forbidden("key proof: no usable X25519 secret with this public key") from None
        expected = key_proof_mac(secret, req.key_proof.challenge, req.public_key)
        if not hmac.compare_digest(expected, req.key_proof.mac):
            raise Forbidden("key proof does not match: not made with this device's private key")
        device = self.store.device_by_name(name)
        if device is None or device.state is not DeviceState.ACTIVE:
            return None  # gone meanwhile: enrolls as a new device, as any first enrollment
        return device.id

    def _challenge(self, name: str, public_key: str) -> str:
        now = self.settings.clock()
        for nonce, (_, _, expires) in list(self._challenges.items()):
            if expires <= now:
                del self._challenges[nonce]
        while len(self._challenges) >= MAX_CHALLENGES:
            del self._challenges[next(iter(self._challenges))]
        nonce = _secrets.new_secret()
        self._challenges[nonce] = (name, public_key, now + CHALLENGE_TTL)
        return nonce
    def _check_enroll_room(self, secret_hash: str, name: str | None) -> None:
        """FleetFull (409) if this enrollment would add a device to a full fleet. A device that
        is already the fleet's (provisioned, or enrolling again) takes no new place; a bad
        token is left to the store, which refuses it with its own message."""
        token = self.store.get_token(secret_hash)
        if token is None:
            return
        wanted = token.name or name
        existing = self.store.device_by_name(wanted) if wanted is not None else None
        if existing is None or existing.state is DeviceState.REVOKED or \
                existing.fleet != token.fleet:
            self._check_fleet_room(token.fleet)

    def _check_fleet_room(self, fleet: str) -> None:
        quota = self.settings.max_fleet_devices
        size = self.store.fleet_size(fleet)
        if size >= quota:
            raise FleetFull(f"fleet {fleet!r} is full: it has {size} devices, at most {quota} "
                            "allowed; revoke one or use another fleet")

    def report(self, device: Device, report: DeviceReport, client_ip: str | None) -> None:
        self._path_summaries.pop(device.id, None)
        cleared = self.store.record_report(device.id, report.lan_endpoints,
                                           report.agent_version, report.peers,
                                           self.settings.clock(), report.apps,
                                           report.misbehaving_peers, report.link,
                                           report.wan_bytes, report.wan_budget,
                                           report.timezone, report.platform)
        if cleared:  # a force the device no longer needs has left its targets
            self.releases.targets_changed(device.fleet, device.name)
        if report.stopping:
            self._stopped_at[device.name] = self.settings.clock()
            self._quiet_until.pop(device.name, None)
        else:
            self._stopped_at.pop(device.name, None)
        self.rollouts.device_reported(device)  # its report may end a soak or fail a phase
        self.core.set_lan(device.name, report.lan_endpoints)
        if not self.settings.relay_hub and client_ip is not None:
            # No hub to observe handshakes: the address the report came from is the best
            # public-IP evidence there is (it decides who shares a NAT, hence LAN endpoints).
            self.core.set_public(device.name, None, ip=client_ip)
        self._changed()

    def punch(self, device: Device, peer: str) -> None:
        """`device` wants a direct path to `peer` of its fleet now: `peer` hears it in its next
        map (PeerMapCore.punch), at most once per PUNCH_SPACING per pair."""
        if peer == device.name:
            raise ControlError("peer: a device cannot punch to itself")
        member = self.core.member(peer)
        if member is None or member.fleet != device.fleet:
            raise NotFound(f"no active device {peer!r} in fleet {device.fleet!r}")
        now = self.settings.clock()
        pair = (device.name, peer)
        if now - self._punch_at.get(pair, float("-inf")) < PUNCH_SPACING:
            return
        if len(self._punch_at) >= 4 * self.settings.max_fleet_devices:
            self._punch_at = {k: t for k, t in self._punch_at.items()
                              if now - t < PUNCH_SPACING}
        self._punch_at[pair] = now
        if self.core.punch(device.name, peer):
            self._changed()

    def upload_logs(self, device: Device, upload: LogUpload) -> None:
        """Store the lines within the device's log rate; the rest are dropped, counted in the
        device's `dropped` total and told by a marker line (at most one per
        LOG_MARKER_SPACING, counting every line dropped since the last)."""
        now = self.settings.clock()
        bucket = self._log_buckets.setdefault(device.id, LogBucket(LOG_BURST, now))
        granted = bucket.take(len(upload.lines), now, LOG_RATE, LOG_BURST)
        lines = list(upload.lines[:granted])
        over = len(upload.lines) - granted
        if over:
            if not bucket.unreported:
                bucket.app = upload.lines[granted].app
            bucket.unreported += over
        if bucket.unreported and now - bucket.marker_at >= LOG_MARKER_SPACING:
            lines.append(drop_marker(bucket.unreported, bucket.app, now))
            bucket.unreported, bucket.marker_at = 0, now
        self.store.append_logs(device.id, lines, upload.dropped + over, LOG_KEEP)
        event = self._log_waiters.pop(device.id, None)
        if event is not None:
            event.set()

    # ------------------------------------------------------------------ operator side

    def online(self, d: Device) -> bool:
        return self._seen(d)[0]

    def _seen(self, d: Device) -> tuple[bool, float | None]:
        """(online, last seen): a hub handshake or a report within the online window."""
        live = d.state is DeviceState.ACTIVE
        handshake = self._last_handshake.get(d.name) if live else None
        seen = [t for t in (d.last_report, handshake) if t is not None]
        last_seen = max(seen) if seen else None
        # A device that tuned its hub keepalive to its NAT (agent/_keepalive.py) sends a packet
        # only every hub_keepalive seconds: two of those may pass unseen before it is offline.
        window = self.settings.online_window
        if d.link is not None:
            window = max(window, 2.0 * d.link.hub_keepalive + 10.0)
        now = self.settings.clock()
        online = live and ((last_seen is not None and now - last_seen < window)
                           or now < self._quiet_until.get(d.name, 0.0))
        stopped_at = self._stopped_at.get(d.name)
        if stopped_at is not None and (last_seen is None or last_seen <= stopped_at):
            online = False  # its agent said it stops, and nothing was seen of it since
        return online, last_seen

    def _info(self, d: Device, apps: list[AppStatus] | None = None,
              reports: list[MisbehaviourReport] | None = None) -> DeviceInfo:
        """DeviceInfo; `apps` are the device's app statuses and `reports` its fleet's
        misbehaviour reports when the caller has them."""
        if reports is None:
            reports = self.store.misbehaviour_reports(d.fleet)
        member = self.core.member(d.name) if d.state is DeviceState.ACTIVE else None
        online, last_seen = self._seen(d)
        if apps is None:
            apps = self.store.app_statuses(d.fleet).get(d.id, [])
        now, stale_after = self.settings.clock(), self.settings.lock_stale_after
        return device_info(
            d, online=online, last_seen=last_seen,
            endpoint=member.public_endpoint if member else None,
            # "release": the running version of its app (the first by name if it has several)
            release=apps[0].running if apps else None,
            apps=[{**a.to_json(), "lock_stale": lock_stale(a, now, stale_after)}
                  for a in apps], reports=reports)

    def _token(self, fleet: str, uses: int, expires_in: int, name: str | None,
               tags: dict[str, str] | None = None) -> tuple[str, EnrollmentToken]:
        secret, now = _secrets.new_secret(), self.settings.clock()
        token = EnrollmentToken(_secrets.secret_hash(secret), fleet, uses, now + expires_in,
                                now, name, tags)
        return str(TokenParts(self.identity.fingerprint, secret)), token

    def create_token(self, fleet: str, uses: int, expires_in: int, name: str | None,
                     tags: dict[str, str] | None = None) -> TokenCreated:
        """`tags`: those of every device the token enrolls (None: none)."""
        text, token = self._token(fleet, uses, expires_in, name, tags)
        self.store.create_token(token)
        return {"token": text, "fleet": fleet, "uses": uses, "expires_at": token.expires_at}

    def provision(self, name: str, fleet: str, expires_in: int,
                  tags: dict[str, str] | None = None) -> Provisioned:
        self._check_fleet_room(fleet)
        text, token = self._token(fleet, 1, expires_in, name, tags)
        device = self.store.provision(_secrets.new_id("d_"), name, fleet, token,
                                      token.created_at)
        join: JoinObject = {"url": self.identity.public_url, "token": text, "name": name,
                            "fleet": fleet}
        if self.identity.urls:
            join["urls"] = list(self.identity.urls)
        return {"device": self._info(device), "join": join}

    def list_devices(self, fleet: str | None, selector: Selector | None = None
                     ) -> list[DeviceInfo]:
        """The devices (of `fleet`; whose tags match `selector`)."""
        apps = self.store.app_statuses(fleet)
        reports = self.store.misbehaviour_reports(fleet)
        return [self._info(d, apps.get(d.id, []), reports)
                for d in self.store.list_devices(fleet)
                if selector is None or selector.matches(d.tags)]

    def tag_device(self, name: str, set_tags: dict[str, str], remove: list[str]
                   ) -> dict[str, Any]:
        """Set and remove tags of a live device → `{"device", "tags"}`. Its targets may
        change with them (a rollout's selector, a window tag): its agent re-reads them."""
        device = self.store.update_tags(name, set_tags, remove, MAX_TAGS)
        if device.state is DeviceState.ACTIVE:
            self.releases.targets_changed(device.fleet, device.name)
            if self.core.set_tags(device.name, device.tags.items()):
                self._changed()
        return {"device": device.name, "tags": dict(sorted(device.tags.items()))}

    def _device(self, name: str) -> Device:
        device = self.store.device_by_name(name)
        if device is None:
            raise NotFound(f"no device {name!r}")
        return device

    def device_info(self, name: str) -> DeviceInfo:
        return self._info(self._device(name))

    async def revoke(self, name: str) -> DeviceInfo:
        device = self.store.revoke(name, self.settings.clock())
        member = self.core.member(name)
        if member is not None and member.public_key == device.public_key:
            await self._drop_member(member, device.id)
        return self._info(device)

    async def _drop_member(self, member: Member, device_id: str) -> None:
        """`member` is no longer active (revoked, here or on another replica)."""
        name = member.name
        self.core.remove(name)
        self._key_names.pop(member.public_key, None)
        self._last_handshake.pop(name, None)
        self._rx_bytes.pop(name, None)
        self._log_buckets.pop(device_id, None)
        self._path_summaries.pop(device_id, None)
        event = self._waiters.pop(name, None)
        if event is not None:
            event.set()  # its long poll ends now, with 401
        self._changed()
        await self.hub_changed()

    # ------------------------------------------------------------------ other replicas
    # (coordinator/_changes.py: what another replica on the same PostgreSQL database wrote)

    async def sync_device(self, name: str) -> None:
        """The device's row changed: its peer-map member made as the store has it now."""
        device = self.store.device_by_name(name)
        member = self.core.member(name)
        if device is None or device.state is not DeviceState.ACTIVE:
            if member is not None:
                await self._drop_member(member, device.id if device else "")
            return
        if member is None or member.public_key != device.public_key:
            self._add_member(device, None)
            event = self._waiters.pop(name, None)
            if event is not None:
                event.set()  # a poll with the old key ends (401)
            await self.hub_changed()
        else:
            self.core.set_lan(name, device.lan_endpoints)
        if device.public_endpoint:
            self.core.set_public(name, device.public_endpoint)
        self._changed()

    def sync_operators(self) -> None:
        self._set_operators()
        self._changed()

    def wake_logs(self, name: str) -> None:
        device = self.store.device_by_name(name)
        event = self._log_waiters.pop(device.id, None) if device is not None else None
        if event is not None:
            event.set()

    def wake_rollouts(self) -> None:
        self.rollouts.wake()

    def step_fleet(self, fleet: str) -> None:
        self.rollouts.step_reported(fleet)

    async def reload(self) -> None:
        """Everything re-read from the store (changes may have been missed): members,
        operators, and a new targets revision in every map."""
        devices = self.store.list_devices()
        for d in devices:
            await self.sync_device(d.name)
        active = {d.name for d in devices if d.state is DeviceState.ACTIVE}
        for member in list(self.core.members()):
            if member.name not in active:
                await self._drop_member(member, "")
        self._set_operators()
        for fleet in {d.fleet for d in devices}:
            self.core.targets_changed(fleet)
        self._changed()
        self.rollouts.wake()

    def release_status(self, fleet: str, app: str, version: int) -> dict[str, Any]:
        return self.releases.release_status(fleet, app, version, self.online,
                                            self.settings.lock_stale_after)

    async def device_logs(self, name: str, *, after: int, limit: int, wait: float,
                          tail: int | None) -> LogPageInfo:
        """The device's log lines after `after` (or its newest `tail`), waiting up to `wait`
        seconds for some to arrive; `next` is the `after` of the following call."""
        device = self._device(name)
        self._want_logs(device.name)
        if tail is not None:
            page = self.store.tail_logs(device.id, tail)
        else:
            deadline = trio.current_time() + wait
            while True:
                page = self.store.read_logs(device.id, after, limit)
                if page.lines or trio.current_time() >= deadline:
                    break
                event = self._log_waiters.setdefault(device.id, trio.Event())
                with trio.move_on_at(deadline):
                    await event.wait()
        if page.lines:
            next_seq = page.lines[-1][0]
        else:  # never beyond what exists: a follower of a reset database is not stuck
            next_seq = page.last_seq if tail is not None else min(after, page.last_seq)
        lines: list[LogLineInfo] = [
            {"seq": seq, "ts": line.ts, "app": line.app, "stream": line.stream,
             "line": line.line} for seq, line in page.lines]
        return {"lines": lines, "next": next_seq, "dropped": page.dropped}

    def _want_logs(self, name: str) -> None:
        """Someone reads `name`'s logs: its peer map asks for them (see LOGS_WANTED_FOR)."""
        now = self.settings.clock()
        if self.core.logs_wanted_until(name) - now >= LOGS_WANTED_FOR / 2:
            return
        if self.core.want_logs(name, now + LOGS_WANTED_FOR):
            self._changed()

    def path_summary(self, device: Device) -> PathSummary:
        """What `device` last reported of its paths, counted (kept until its next report)."""
        found = self._path_summaries.get(device.id)
        if found is None:
            found = self._path_summaries[device.id] = PathSummary(
                self.store.peer_paths(device.id))
        return found

    def device_peers(self, name: str) -> list[PeerPathInfo]:
        device = self._device(name)
        names = {**self._operator_names, **self._key_names}
        return [{"peer": names.get(p.public_key), "public_key": p.public_key, "path": p.path,
                 "endpoint": p.endpoint, "last_handshake": p.last_handshake}
                for p in self.store.peer_paths(device.id)]

    def add_operator(self, name: str, public_key: str) -> OperatorAdded:
        known = self.store.list_operators()
        if len(known) >= MAX_OPERATORS and \
                not any(o.name == name and o.public_key == public_key for o in known):
            raise Conflict(f"at most {MAX_OPERATORS} operator workstations (each adds two "
                           "addresses to every peer map); remove one first")
        op = self.store.add_operator(name, public_key, self.settings.clock())
        self._set_operators()
        self._changed()
        identity = self.identity
        return {"name": op.name, "mesh_ipv4": op.mesh_ipv4, "mesh_ipv6": op.mesh_ipv6,
                "hub": identity.hub.to_json(), "mesh_prefix_v4": str(identity.prefix_v4),
                "mesh_prefix_v6": str(identity.prefix_v6)}
