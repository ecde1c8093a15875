"""The agent's trio driver: peer-map long poll, WireGuard reconcile, state reports, and (with
`gossip=GossipSettings(...)`) the mesh node: gossip, manifests from the coordinator's targets,
blob exchange, LAN discovery; and (with `GossipSettings(apply=ApplySettings())`) the applier,
which runs the targeted releases on the device's Docker engine (docs/agent-apply.md).

    agent = Agent(data_dir, backend_factory, client_factory)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)     # returns once the first reconcile has run

`backend_factory(enrollment)` is an async context manager yielding a vpn `AsyncWireGuardBackend`
(`WireGuardGoDevice` for the real thing); `client_factory(url, credential, cert_der)` makes a
`DeviceApi` (`coordinator.client.DeviceClient` fits). Everything that talks to the network or
the daemon has a deadline; the coordinator being down never stops the reconcile loop, which runs
on the last peer map (cached in the data directory), so the data plane outlives the control plane.
"""

from __future__ import annotations

import functools
import random
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import trio

from mesh.blobsched import SchedConfig
from mesh.clikit import package_version
from mesh.control import (
    MAX_LOG_LINES,
    ControlError,
    DeviceReport,
    Enrollment,
    LogLine,
    PeerMap,
    PeerPath,
)
from mesh.membership import LAN, METERED
from mesh.rumor import LAN_RUMOR, METERED_RUMOR
from vpn import (
    AsyncWireGuardBackend,
    DeviceStatus,
    UapiError,
    UapiProtocolError,
    changes_to_config,
    diff,
    public_key_from_private,
)

from ._appsync import AppSync, pin_checker
from ._blobstore import BlobStore
from ._datadir import DataDir, DataDirError, Identity
from ._gossip import GOSSIP_PORT, GossipNode, release_verifier
from ._paths import REJECT_AFTER_TIME, PathPlan, PathSelector

T = TypeVar("T")

RECONCILE_INTERVAL: Final = 1.0  # brief: read the device and converge once a second
# A heartbeat only: what changes (paths, LAN candidates, app state) is reported at once, and
# "online" comes from the hub's WireGuard session (docs/api.md). Each report is a TLS request
# over a metered link, so the idle rate is low (docs/gossip.md "Idle cost").
REPORT_INTERVAL: Final = 300.0
# Long enough that an idle device costs one request every ~2 minutes (the API goes through the
# hub tunnel, whose 25 s WireGuard keepalive holds the NAT mapping); below the server's 120 s.
POLL_WAIT: Final = 110
# The SDK already adds 10 s of read slack to a long poll; ours is the outer bound on top of it.
POLL_SLACK: Final = 15.0
CALL_TIMEOUT: Final = 15.0  # a report or anything that is not a long poll
BACKEND_TIMEOUT: Final = 5.0  # the UAPI client's own default deadline
BACKOFF_INITIAL: Final = 1.0
BACKOFF_MAX: Final = 30.0  # bounded: a device that was cut off finds the coordinator within 30 s
# A coordinator that answers 304 at once (a bug, or a proxy) must not make us spin.
MIN_POLL_INTERVAL: Final = 1.0
MIN_REPORT_SPACING: Final = 1.0  # path flaps cannot turn into a report storm
# A nudge (agent/_paths.py) is one datagram into the tunnel; the discard port (RFC 863). What the
# peer's WireGuard answers does not depend on anything listening there.
NUDGE_PORT: Final = 9


class DeviceApi(Protocol):
    """The part of `coordinator.client.DeviceClient` the agent uses.

    Errors: an exception with an integer `status` attribute is an answer from the coordinator
    (`ApiError`); 401 means the credential was revoked. Anything else means no usable answer.
    """

    async def peermap(self, version: int, wait: float) -> PeerMap | None: ...

    async def report(self, report: DeviceReport) -> None: ...


ClientFactory = Callable[[str, str, bytes], DeviceApi]  # (url, credential, cert_der)
BackendFactory = Callable[[Enrollment], AbstractAsyncContextManager[AsyncWireGuardBackend]]
Log = Callable[[str], None]
Nudger = Callable[[Sequence[str]], Awaitable[None]]  # send one datagram to each mesh address
# run_lan_discovery's signature (agent/_lan.py): (name, fleet, public key, underlay, port,
# on_change, *, task_status) -> runs until cancelled.
LanDiscovery = Callable[..., Awaitable[None]]

# The targets are read when the peer map's `targets` revision changes (the coordinator bumps it
# on every target change) and at start; this slow poll is only a safety net.
TARGETS_INTERVAL: Final = 600.0
TARGETS_RETRY: Final = 30.0  # after a failed read (coordinator unreachable)
# A blob from the coordinator: the gossip node's own fetch deadline (blobsched.fetch_timeout) is
# the real bound; this only caps one attempt per URL.
BLOB_CALL_TIMEOUT: Final = 600.0
GOSSIP_RETRY: Final = 5.0  # the mesh address may not be on the interface yet: retry the bind
LAN_RETRY: Final = 60.0  # LAN discovery failed (no such underlay, mDNS socket): try again
APPLY_SYNC_INTERVAL: Final = 1.0  # targets and download progress into the applier (in memory)
ENGINE_RETRY: Final = 10.0  # the Docker engine did not answer: try again
LOG_UPLOAD_INTERVAL: Final = 2.0  # app log lines go up in batches, at most this often


@dataclass(frozen=True, slots=True)
class ApplySettings:
    """Run the targeted releases on the device's Docker engine (`--no-apply` turns it off)."""

    docker_host: str | None = None  # None: DOCKER_HOST or the default socket
    engine_factory: Callable[[], Any] | None = None  # tests: a fake engine


@dataclass(frozen=True, slots=True)
class GossipSettings:
    """The mesh node of `fleetmesh-agent run` (omitted: no gossip, `--no-gossip`)."""

    port: int = GOSSIP_PORT
    peer_sharing: bool = True  # False: every blob from the coordinator (`--no-peer-sharing`)
    underlay: str | None = None  # interface or IPv4 for LAN discovery; None: no discovery
    targets_interval: float = TARGETS_INTERVAL
    lan_discovery: LanDiscovery | None = None  # None: agent._lan.run_lan_discovery
    # Devices sit on metered links: probe and anti-entropy at memberlist's WAN pace by default
    # (mesh.membership.METERED); "lan" is memberlist's DefaultLANConfig, faster to notice deaths.
    profile: str = "metered"
    apply: ApplySettings | None = None  # None: fetch releases but do not run them


def udp_nudger(ifname: str) -> Nudger:
    """Nudges through the WireGuard interface only (SO_BINDTODEVICE): they can never leave by
    another route, e.g. when the interface is gone."""

    async def nudge(addresses: Sequence[str]) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            for address in addresses:
                await sock.sendto(b"\0", (address, NUDGE_PORT))

    return nudge


def stderr_log(message: str) -> None:
    print(f"fleetmesh-agent: {message}", file=sys.stderr, flush=True)


def error_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def _poll(client: DeviceApi, *, version: int, wait: float) -> PeerMap | None:
    return await client.peermap(version, wait)


async def _report(client: DeviceApi, *, report: DeviceReport) -> None:
    await client.report(report)


async def _upload_logs(client: Any, *, lines: list[LogLine], dropped: int) -> None:
    await client.upload_logs(lines, dropped)


async def _targets(client: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await client.targets()
    return result


async def _manifest(client: Any, *, fleet: str, app: str, version: int) -> bytes:
    result: bytes = await client.manifest(fleet, app, version)
    return result


async def _blob(client: Any, *, blob_id: str, start: int | None, end: int | None) -> bytes:
    result: bytes = await client.blob(blob_id, start, end)
    return result


class _Started:
    """A task_status that only calls back (the node runs in the caller's task)."""

    def __init__(self, callback: Callable[[Any], None]) -> None:
        self.callback = callback

    def started(self, value: Any = None) -> None:
        self.callback(value)


class _CoordinatorBlobs:
    """The gossip node's blob seed: the coordinator, through the agent's URL fallback."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        return await self.agent._call(
            functools.partial(_blob, blob_id=blob_id, start=start, end=end), BLOB_CALL_TIMEOUT)


class Backoff:
    """Exponential backoff with "equal jitter" (AWS Architecture Blog, "Exponential Backoff and
    Jitter"): half the step is fixed, half random, so retries spread out but never collapse to 0."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX,
                 rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.rng = rng or random.Random()
        self.failures = 0

    def next(self) -> float:
        step = min(self.maximum, self.initial * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return step / 2 + self.rng.random() * step / 2

    def reset(self) -> None:
        self.failures = 0


class Agent:
    """One enrolled device: keeps its WireGuard interface converged on the peer map."""

    def __init__(
        self,
        data_dir: DataDir | str,
        backend_factory: BackendFactory,
        client_factory: ClientFactory,
        *,
        wg_port: int | None = None,
        lan_endpoints: Callable[[], Sequence[str]] | Sequence[str] | None = None,
        agent_version: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        log: Log = stderr_log,
        reconcile_interval: float = RECONCILE_INTERVAL,
        report_interval: float = REPORT_INTERVAL,
        poll_wait: int = POLL_WAIT,
        nudge: Nudger | None = None,
        gossip: GossipSettings | None = None,
    ) -> None:
        self.data = data_dir if isinstance(data_dir, DataDir) else DataDir(data_dir)
        # Both raise DataDirError (one line) when the directory is not usable.
        self.identity: Identity = self.data.read_identity()
        private_key = self.data.read_key()
        self.public_key = public_key_from_private(private_key)
        self.backend_factory = backend_factory
        if nudge is None:
            # Only a real interface (WireGuardGoDevice names it) gets nudges; fakes get none.
            ifname = getattr(backend_factory, "ifname", None)
            nudge = udp_nudger(ifname) if isinstance(ifname, str) else None
        self.nudge = nudge
        self.nudges_sent = 0
        self._nudge_error: str | None = None
        self.client_factory = client_factory
        self.wg_port = wg_port if wg_port is not None else self.identity.wg_port
        if lan_endpoints is None:
            lan_endpoints = self.identity.lan_endpoints or ()
        self._lan = lan_endpoints
        self.agent_version = agent_version if agent_version is not None else package_version()
        self.clock = clock
        self.log = log
        self.reconcile_interval = reconcile_interval
        self.report_interval = report_interval
        self.poll_wait = poll_wait
        self.backoff = Backoff(rng=rng)
        enrollment = self.identity.enrollment
        self.selector = PathSelector(private_key, enrollment.hub, self.wg_port)

        self.peermap: PeerMap | None = None
        try:
            self.peermap = self.data.read_peermap()
        except DataDirError as exc:
            self.log(f"ignoring the peer map cache: {exc}")
        if self.peermap is not None:
            self.log(f"peer map v{self.peermap.version} from the cache: "
                     f"{len(self.peermap.peers)} peers")
        self.status: DeviceStatus | None = None
        self.plan: PathPlan | None = None
        self.revoked = False
        self.sets_sent = 0  # UAPI `set` requests sent: a steady state sends none
        self.reconciles = 0
        self._clients: dict[str, DeviceApi] = {}
        self._last_url: str | None = None
        self._reconcile_wake = trio.Event()
        self._report_wake = trio.Event()
        self._targets_wake = trio.Event()
        self._apply_wake = trio.Event()
        self.applier: Any = None  # agent._applier.Applier once the engine answers
        self.appsync: AppSync | None = None
        self.store: BlobStore | None = None
        self._backend_error: str | None = None
        self.gossip_settings = gossip
        self.gossip: GossipNode | None = None  # the running mesh node
        self._lan_names: frozenset[str] = frozenset()
        self._rng = rng or random.Random()

    # -- public ------------------------------------------------------------

    @property
    def enrollment(self) -> Enrollment:
        return self.identity.enrollment

    @property
    def paths(self) -> tuple[PeerPath, ...]:
        return self.plan.paths if self.plan is not None else ()

    def hub_up(self) -> bool:
        """A live hub session: the API through the tunnel is worth trying first."""
        if self.status is None:
            return False
        hub = self.peermap.hub if self.peermap is not None else self.enrollment.hub
        peer = self.status.peer(hub.public_key)
        hs = peer.last_handshake if peer is not None else None
        return hs is not None and self.clock() - hs < REJECT_AFTER_TIME

    def lan_endpoints(self) -> tuple[str, ...]:
        if callable(self._lan):
            try:
                return tuple(self._lan())
            except OSError as exc:
                self.log(f"cannot list LAN addresses: {_one_line(exc)}")
                return ()
        return tuple(self._lan)

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Bring the interface up and run the loops until cancelled."""
        async with self.backend_factory(self.enrollment) as backend:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._reconcile_loop, backend)
                    nursery.start_soon(self._peermap_loop)
                    nursery.start_soon(self._report_loop)
                    if self.gossip_settings is not None:
                        nursery.start_soon(self._gossip_loop, self.gossip_settings)
                        nursery.start_soon(self._targets_loop, self.gossip_settings)
                        if self.gossip_settings.underlay is not None:
                            nursery.start_soon(self._lan_loop, self.gossip_settings)
                        if self.gossip_settings.apply is not None:
                            nursery.start_soon(self._apply_loop, self.gossip_settings.apply)
                    task_status.started(self)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self._close_clients()

    # -- reconcile ---------------------------------------------------------

    async def reconcile_once(self, backend: AsyncWireGuardBackend) -> PathPlan | None:
        """Read the device, choose paths, send only what differs. Never raises for the daemon's
        failures: they are logged once each and retried on the next tick."""
        try:
            with trio.fail_after(BACKEND_TIMEOUT):
                status = await backend.aget()
                plan = self.selector.update(self.peermap, status, self.clock())
                changes = diff(plan.desired, status)
                if changes:
                    await backend.aset(changes_to_config(changes))
                    self.sets_sent += 1
        except (OSError, trio.TooSlowError, UapiError, UapiProtocolError) as exc:
            message = f"WireGuard: {_one_line(exc)}"
            if message != self._backend_error:
                self.log(f"{message}; retrying every {self.reconcile_interval:g} s")
                self._backend_error = message
            return None
        if self._backend_error is not None:
            self.log("WireGuard answers again")
            self._backend_error = None
        self.reconciles += 1
        if plan.nudges and self.nudge is not None:
            await self._send_nudges(plan.nudges)
        old = self.plan
        self.status, self.plan = status, plan
        for change in plan.changes:
            self.log(str(change))
        if old is None or [(p.public_key, p.path, p.endpoint) for p in old.paths] != \
                [(p.public_key, p.path, p.endpoint) for p in plan.paths]:
            self._report_wake.set()
        return plan

    async def _send_nudges(self, addresses: Sequence[str]) -> None:
        """After the apply, so that each datagram goes through the peer's own entry. A failure
        only costs the path core a slower answer: log it once, never raise."""
        assert self.nudge is not None
        try:
            with trio.fail_after(BACKEND_TIMEOUT):
                await self.nudge(addresses)
        except (OSError, trio.TooSlowError) as exc:
            message = f"cannot nudge peers: {_one_line(exc)}"
            if message != self._nudge_error:
                self.log(message)
                self._nudge_error = message
            return
        self.nudges_sent += len(addresses)
        self._nudge_error = None

    async def _reconcile_loop(self, backend: AsyncWireGuardBackend, *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
        await self.reconcile_once(backend)
        task_status.started()
        while True:
            with trio.move_on_after(self.reconcile_interval):
                await self._reconcile_wake.wait()
            self._reconcile_wake = trio.Event()
            await self.reconcile_once(backend)

    # -- coordinator -------------------------------------------------------

    def _urls(self) -> list[str]:
        tunnel = self.enrollment.hub.api_url
        if self.hub_up() and tunnel and tunnel != self.identity.url:
            return [tunnel, self.identity.url]
        return [self.identity.url]

    def _client(self, url: str) -> DeviceApi:
        client = self._clients.get(url)
        if client is None:
            client = self.client_factory(url, self.enrollment.credential, self.identity.cert_der)
            self._clients[url] = client
        return client

    async def _close_clients(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            aclose: Any = getattr(client, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001 - closing must not mask the real exit reason
                    pass

    async def _call(self, op: Callable[[DeviceApi], Awaitable[T]], timeout: float) -> T:
        """Through the hub tunnel first when it is up, else (or if that gives no answer) the URL
        given at join. An error answer from the coordinator is final: it did answer."""
        urls = self._urls()
        last: BaseException | None = None
        for url in urls:
            try:
                with trio.fail_after(timeout):
                    result = await op(self._client(url))
            except trio.TooSlowError:
                last = TimeoutError(f"no answer from {url} within {timeout:g} s")
                continue
            except Exception as exc:  # noqa: BLE001 - the SDK's errors, whatever their class
                if error_status(exc) is not None:
                    raise
                last = exc
                continue
            if url != self._last_url:
                via = "the hub tunnel" if url != self.identity.url else "the direct URL"
                self.log(f"coordinator reached at {url} ({via})")
                self._last_url = url
            return result
        assert last is not None
        raise last

    def _revoke(self, exc: BaseException) -> None:
        if not self.revoked:
            self.revoked = True
            self.log(f"coordinator refused our credential ({_one_line(exc)}): this device was "
                     "revoked; keeping the mesh as it is and no longer polling or reporting")

    def accept_peermap(self, peermap: PeerMap) -> None:
        old = self.peermap
        self.peermap = peermap
        was = f" (was v{old.version})" if old is not None else ""
        self.log(f"peer map v{peermap.version}: {len(peermap.peers)} peers{was}")
        if old is not None and old.targets != peermap.targets:  # the first read is at start
            self._targets_wake.set()
        try:
            self.data.write_peermap(peermap)
        except DataDirError as exc:
            self.log(f"cannot cache the peer map: {exc}")
        if self.gossip is not None:
            self.gossip.update_peers(self.gossip_peers())
        self._reconcile_wake.set()

    async def _peermap_loop(self) -> None:
        version = self.peermap.version if self.peermap is not None else 0
        failing = False
        while not self.revoked:
            started = trio.current_time()
            try:
                peermap = await self._call(
                    functools.partial(_poll, version=version, wait=self.poll_wait),
                    self.poll_wait + POLL_SLACK)
            except Exception as exc:  # noqa: BLE001 - never exit on coordinator errors
                if error_status(exc) == 401:
                    self._revoke(exc)
                    return
                delay = self.backoff.next()
                self.log(f"peer map: {_one_line(exc)}; retrying in {delay:.1f} s")
                failing = True
                self._last_url = None
                await trio.sleep(delay)
                continue
            self.backoff.reset()
            if failing:
                failing = False
                self.log("peer map: coordinator answers again")
            if peermap is None or peermap.version == version:
                spent = trio.current_time() - started
                if spent < MIN_POLL_INTERVAL:
                    await trio.sleep(MIN_POLL_INTERVAL - spent)
                continue
            version = peermap.version
            self.accept_peermap(peermap)

    def _failed(self, what: str, exc: Exception, last: str | None, interval: float) -> bool:
        """A coordinator call of a periodic loop failed: True if the device was revoked (the
        loop ends); otherwise the error is logged once per distinct message."""
        if error_status(exc) == 401:
            self._revoke(exc)
            return True
        message = _one_line(exc)
        if message != last:
            self.log(f"{what}: {message}; retrying every {interval:g} s")
        return False

    def report(self) -> DeviceReport:
        apps = self.appsync.app_statuses() if self.appsync is not None else ()
        return DeviceReport(self.lan_endpoints(), self.agent_version, self.paths, apps)

    async def _report_loop(self) -> None:
        error: str | None = None
        while not self.revoked:
            sent_at = trio.current_time()
            report = self.report()
            try:
                await self._call(functools.partial(_report, report=report), CALL_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - never exit on coordinator errors
                if self._failed("report", exc, error, self.report_interval):
                    return
                error = _one_line(exc)
            else:
                if error is not None:
                    self.log("report: delivered again")
                    error = None
            with trio.move_on_after(self.report_interval):
                await self._report_wake.wait()
            self._report_wake = trio.Event()
            spent = trio.current_time() - sent_at
            if spent < MIN_REPORT_SPACING:
                await trio.sleep(MIN_REPORT_SPACING - spent)

    # -- mesh node (gossip, manifests, blobs, LAN discovery) ---------------

    def gossip_peers(self) -> dict[str, str]:
        """name -> mesh IPv4 of every peer in the peer map."""
        if self.peermap is None:
            return {}
        return {p.name: p.mesh_ipv4 for p in self.peermap.peers}

    async def _gossip_loop(self, settings: GossipSettings) -> None:
        """Run the node on our mesh address; a bind failure (the address is not on the
        interface yet) is retried. The node carries on without the coordinator."""
        enrollment = self.enrollment
        store = self._blob_store()
        if store is None:
            self.log("gossip: no blob store; no mesh node")
            return
        verify = release_verifier(enrollment.release_key, enrollment.fleet)
        error: str | None = None
        while True:
            node = GossipNode(
                enrollment.name, enrollment.mesh_ipv4, peers=self.gossip_peers(), verify=verify,
                store=store, client=_CoordinatorBlobs(self), fleet=enrollment.fleet,
                port=settings.port, sched_config=SchedConfig(peer_sharing=settings.peer_sharing),
                membership_config=METERED if settings.profile == "metered" else LAN,
                rumor_config=METERED_RUMOR if settings.profile == "metered" else LAN_RUMOR,
                rng=random.Random(self._rng.random()), log=lambda m: self.log(f"gossip: {m}"),
                local_layers=self._engine_layers)
            node.set_lan(self._lan_names)
            self.gossip = node

            def started(_node: Any = None) -> None:
                nonlocal error
                if error is not None:
                    self.log(f"gossip: listening on {enrollment.mesh_ipv4}:{settings.port}")
                    error = None

            try:
                await node.run(task_status=_Started(started))
            except OSError as exc:  # the bind; the node's tasks handle their own I/O errors
                message = f"gossip: cannot listen on {enrollment.mesh_ipv4}:{settings.port}: " \
                          f"{_one_line(exc)}"
                if message != error:
                    self.log(f"{message}; retrying every {GOSSIP_RETRY:g} s")
                    error = message
            finally:
                self.gossip = None
            await trio.sleep(GOSSIP_RETRY)

    async def _targets_loop(self, settings: GossipSettings) -> None:
        """Offer the manifests of the coordinator's targets to the node, every interval."""
        error: str | None = None
        progress: tuple[int, int] | None = None
        fleet = self.enrollment.fleet
        while not self.revoked:
            node = self.gossip
            try:
                if node is not None:
                    targets = await self._call(_targets, CALL_TIMEOUT)
                    if self.appsync is not None:
                        self.appsync.set_targets(targets)
                    for t in targets:
                        app, version = t.get("app"), t.get("version")
                        if not isinstance(app, str) or type(version) is not int:
                            continue
                        held = node.rumor.newest(fleet, app)
                        if held is not None and held[0] >= version:
                            continue
                        data = await self._call(functools.partial(
                            _manifest, fleet=fleet, app=app, version=version), CALL_TIMEOUT)
                        if node.offer_manifest(data):
                            self.log(f"release {fleet}/{app} v{version} from the coordinator")
                    sync = self.appsync
                    for app in list(sync.targets) if sync is not None else []:
                        assert sync is not None
                        version = sync.needs_manifest(app)  # a pin back to an older release
                        if version is not None:
                            sync.add_manifest(app, version, await self._call(functools.partial(
                                _manifest, fleet=fleet, app=app, version=version),
                                CALL_TIMEOUT))
                    self._apply_wake.set()
            except Exception as exc:  # noqa: BLE001 - never exit on coordinator errors
                if self._failed("targets", exc, error, settings.targets_interval):
                    return
                error = _one_line(exc)
            else:
                error = None
            wait = settings.targets_interval
            if node is None:  # the mesh address may still be missing: look again soon
                wait = min(1.0, wait)
            elif error is not None:
                wait = min(TARGETS_RETRY, wait)
            if node is not None:
                st = node.stats
                now = (st.blobs_done, st.blobs_total)
                if now != progress and st.blobs_total:
                    progress = now
                    self.log(f"blobs {st.blobs_done}/{st.blobs_total}; received from LAN "
                             f"{st.bytes_lan} B, WAN peers {st.bytes_wan} B, coordinator "
                             f"{st.bytes_coordinator} B")
            with trio.move_on_after(wait):
                await self._targets_wake.wait()
            self._targets_wake = trio.Event()

    # -- applying releases (agent/_applier.py, docs/agent-apply.md) --------

    def _blob_store(self) -> BlobStore | None:
        if self.store is None:
            try:
                self.store = BlobStore(self.data.path / "blobs")
            except OSError as exc:
                self.log(f"cannot open the blob store: {_one_line(exc)}")
        return self.store

    def _engine_layers(self) -> frozenset[str]:
        return self.applier.local_diff_ids() if self.applier is not None else frozenset()

    def _make_engine(self, settings: ApplySettings) -> Any:
        if settings.engine_factory is not None:
            return settings.engine_factory()
        from ._engine import DockerEngine

        return DockerEngine(base_url=settings.docker_host)

    async def _apply_loop(self, settings: ApplySettings) -> None:
        """Start the applier once the engine answers, then keep its inputs current and upload
        the app's logs. The applier never stops the agent: its errors are its state."""
        from ._applier import Applier
        from ._crashpoints import arm

        enrollment = self.enrollment
        if enrollment.release_key is None:
            self.log("apply: no release key was pinned at enrollment; releases are not run")
            return
        store = self._blob_store()
        if store is None:
            return
        arm(self.data.path)
        error: str | None = None
        while True:
            try:
                engine = await trio.to_thread.run_sync(self._make_engine, settings)
                break
            except Exception as exc:  # noqa: BLE001 - EngineError, or a fake's
                message = f"apply: Docker engine: {_one_line(exc)}"
                if message != error:
                    self.log(f"{message}; retrying every {ENGINE_RETRY:g} s")
                    error = message
            await trio.sleep(ENGINE_RETRY)
        applier = Applier(device=enrollment.name, fleet=enrollment.fleet,
                          data_dir=self.data.path, engine=engine, store=store,
                          release_key_hex=enrollment.release_key,
                          log=lambda m: self.log(f"apply: {m}"))
        self.appsync = AppSync(applier, enrollment.fleet, self._newest_manifest,
                               lambda m: self.log(f"apply: {m}"),
                               pin_checker(enrollment.release_key, enrollment.fleet,
                                           enrollment.name))
        async with trio.open_nursery() as nursery:
            await nursery.start(applier.run)
            self.applier = applier
            self._targets_wake.set()  # read the targets now that they can be applied
            nursery.start_soon(self._logs_loop, applier)
            while True:
                if self.appsync.sync(self.gossip, trio.current_time()):
                    self._report_wake.set()
                with trio.move_on_after(APPLY_SYNC_INTERVAL):
                    await self._apply_wake.wait()
                self._apply_wake = trio.Event()

    def _newest_manifest(self, app: str) -> tuple[int, bytes] | None:
        node = self.gossip
        return node.rumor.newest(self.enrollment.fleet, app) if node is not None else None

    async def _logs_loop(self, applier: Any) -> None:
        """The app's log lines to the coordinator; kept (within the buffer's bound) while it
        cannot be reached."""
        error: str | None = None
        while not self.revoked:
            lines, dropped = applier.logs.take(MAX_LOG_LINES)
            batch: list[LogLine] = []
            for x in lines:  # one the coordinator would refuse is dropped, not retried forever
                try:
                    batch.append(LogLine.from_json(x) if isinstance(x, dict) else x)
                except ControlError:
                    dropped += 1
            lines = [x.to_json() for x in batch]
            if batch or dropped:
                try:
                    await self._call(functools.partial(_upload_logs, lines=batch,
                                                       dropped=dropped), CALL_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - never exit on coordinator errors
                    applier.logs.put_back(lines, dropped)
                    if self._failed("logs", exc, error, LOG_UPLOAD_INTERVAL):
                        return
                    error = _one_line(exc)
                else:
                    error = None
            await trio.sleep(LOG_UPLOAD_INTERVAL)

    def _on_lan_change(self, neighbours: Any) -> None:
        self._lan_names = frozenset(n.name for n in neighbours)
        if self.gossip is not None:
            self.gossip.set_lan(self._lan_names)

    async def _lan_loop(self, settings: GossipSettings) -> None:
        discover = settings.lan_discovery
        if discover is None:
            from ._lan import run_lan_discovery

            discover = run_lan_discovery
        assert settings.underlay is not None
        error: str | None = None
        while True:
            try:
                await discover(self.enrollment.name, self.enrollment.fleet, self.public_key,
                               settings.underlay, self.wg_port, self._on_lan_change)
            except Exception as exc:  # noqa: BLE001 - LanDiscoveryError, OSError, zeroconf's
                message = f"LAN discovery on {settings.underlay}: {_one_line(exc)}"
                if message != error:
                    self.log(f"{message}; retrying every {LAN_RETRY:g} s")
                    error = message
            await trio.sleep(LAN_RETRY)
