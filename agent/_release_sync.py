"""Release sync: the coordinator's targets, through the gossip node, into the applier.

    sync = ReleaseSync(data, enrollment, link, GossipSettings(...), peers=..., log=log,
                       on_apps_changed=reporter.wake)
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)
    sync.targets_changed()   # the peer map's targets revision moved: read them now

Four loops, each retried on its own errors and never stopping the agent:

- the mesh node (agent/_gossip.py) on the device's mesh address: gossip, blob exchange; a bind
  failure (the address is not on the interface yet) is retried every GOSSIP_RETRY;
- the targets: read at start, when the peer map says they changed, and every
  `targets_interval` as a safety net; the manifests of newer releases are offered to the node,
  the manifest of an older target (a pin back, or a newer release withdrawn while a peer still
  gossips it) is fetched and verified here, once; each target's release is handed to the node
  (`set_target`), which fetches that one, whatever newer manifest circulates;
- with `apply=ApplySettings()`: the applier (agent/_apply_driver.py) once the Docker engine
  answers, and AppSync (agent/_appsync.py) fed by events — the node's `changed()`, the
  applier's `changed()`, new targets, a node (re)start — not by a poll; the app's log lines go
  up through agent/_uploads.py LogUploader while someone reads them (`logs_wanted`, and
  `logs_wanted_changed()` when that may have changed), an app's last ones when it fails;
- with an underlay: LAN discovery (agent/_lan.py), whose neighbours the node prefers.

Manifest bytes are verified once where they arrive (the node for gossip and offers, here for a
pin back) and passed on as `mesh.release.VerifiedRelease`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from mesh.blobsched import SchedConfig
from mesh.control import AppStatus, DeviceTarget, Enrollment
from mesh.membership import LAN, METERED
from mesh.node import ServePolicy
from mesh.release import (
    ReleaseError,
    RootMetadata,
    SignedRoot,
    VerifiedRelease,
    machine_platform,
    verify_release,
)
from mesh.rumor import LAN_RUMOR, METERED_RUMOR

from ._appsync import AppSync
from ._blobstore import BlobStore
from ._crashpoints import arm
from ._freshness import FreshnessWatch
from ._gossip import GOSSIP_PORT, GossipNode, release_verifier
from ._lan import run_lan_discovery
from ._link import CALL_TIMEOUT, CoordinatorLink, ErrorOnce, Log, one_line
from ._rotation import RootWatch
from ._uploads import LogUploader

if TYPE_CHECKING:
    from ._apply_driver import Applier

# The targets are read when the peer map's `targets` revision changes (the coordinator bumps it
# on every target change: a release, a pin, a withdrawal, a new root) and at start; this slow
# poll is only a safety net. Each read is three TLS requests (targets, the fleet's timestamp,
# its roots), and an idle device's budget is 20 KB/h of WAN all included (issue 14). Every 6
# hours still renews the signed timestamp (valid for a day, coordinator/_releases.py
# TIMESTAMP_LIFETIME) four times before it expires.
TARGETS_INTERVAL: Final = 6 * 3600.0
TARGETS_RETRY: Final = 30.0  # after a failed read (coordinator unreachable)
GOSSIP_RETRY: Final = 5.0  # the mesh address may not be on the interface yet: retry the bind
LAN_RETRY: Final = 60.0  # LAN discovery failed (no such underlay, mDNS socket): try again
ENGINE_RETRY: Final = 10.0  # the Docker engine did not answer: try again
# The mesh node starts once the engine's image layers are known (a listing: well under a second)
# or after this long, whichever comes first.
LAYERS_WAIT: Final = 20.0

# run_lan_discovery's signature (agent/_lan.py): (name, fleet, public key, underlay, port,
# on_change, *, task_status) -> runs until cancelled.
LanDiscovery = Callable[..., Awaitable[None]]


class Neighbour(Protocol):
    """A LAN neighbour as discovery reports it (agent/_lan.py)."""

    @property
    def name(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ApplySettings:
    """Run the targeted releases on the device's Docker engine (`--no-apply` turns it off)."""

    docker_host: str | None = None  # None: DOCKER_HOST or the default socket
    engine_factory: Callable[[], Any] | None = None  # tests: a fake engine
    # the reserved app `fleetmesh-agent` hands the device over to a new agent
    # (agent/_selfupdate.py): the Agent sets this to stop itself
    on_handover: Callable[[int, float], None] | None = None


@dataclass(frozen=True, slots=True)
class GossipSettings:
    """The mesh node of `fleetmesh-agent run` (omitted: no gossip, `--no-gossip`)."""

    port: int = GOSSIP_PORT
    peer_sharing: bool = True  # False: every blob from the coordinator (`--no-peer-sharing`)
    # what the uplink carries for other LANs (`--seed-ratio`, `--unmetered`); default metered
    serve: ServePolicy = ServePolicy()
    underlay: str | None = None  # interface or IPv4 for LAN discovery; None: no discovery
    targets_interval: float = TARGETS_INTERVAL
    lan_discovery: LanDiscovery | None = None  # None: agent._lan.run_lan_discovery
    # Devices sit on metered links: probe and anti-entropy at memberlist's WAN pace, with the
    # LAN only while the coordinator answers, by default (mesh.membership.METERED); "lan" is
    # memberlist's DefaultLANConfig with the whole fleet, faster to notice deaths.
    profile: str = "metered"
    apply: ApplySettings | None = None  # None: fetch releases but do not run them


async def _wait_any(events: Iterable[trio.Event]) -> None:
    """Until one of `events` is set."""
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


class ReleaseSync:
    """The device's releases: mesh node, targets, applier, LAN discovery (module docstring)."""

    def __init__(self, data_path: Path, enrollment: Enrollment, public_key: str, wg_port: int,
                 link: CoordinatorLink, settings: GossipSettings, *,
                 peers: Callable[[], Mapping[str, str]], log: Log, rng: random.Random,
                 on_apps_changed: Callable[[], None] = lambda: None,
                 on_misbehaviour: Callable[[], None] = lambda: None,
                 roots: RootWatch | None = None,
                 on_rotation: Callable[[SignedRoot, RootMetadata], None] = lambda s, m: None,
                 logs_wanted: Callable[[], bool] = lambda: True) -> None:
        self.data_path = data_path
        self.enrollment = enrollment
        self.public_key = public_key
        self.wg_port = wg_port
        self.link = link
        self.settings = settings
        self.peers = peers
        self.log = log
        self.rng = rng
        self.on_apps_changed = on_apps_changed
        self.on_misbehaviour = on_misbehaviour  # a peer newly counted misbehaving
        # the device's trusted root (agent/_rotation.py), read with the targets; a newer one
        # naming another release key goes to `on_rotation`, which restarts this subsystem
        self.roots = roots
        self.on_rotation = on_rotation
        # someone reads the app logs (the peer map's logs_wanted_until): upload them
        self.logs_wanted = logs_wanted
        self.uploader: LogUploader | None = None  # once the applier runs
        self._failed_apps: set[str] = set()  # apps whose last lines were shipped on failure
        self._root_errors = ErrorOnce(log, settings.targets_interval)
        self.node: GossipNode | None = None  # the running mesh node
        self.store: BlobStore | None = None
        self.applier: Applier | None = None  # once the engine answers
        self.appsync: AppSync | None = None
        self._targeted: set[str] = set()  # apps the node was given a target for
        # targets older than the node's newest, verified here (kept while they are targets)
        self._older: dict[tuple[str, int], VerifiedRelease] = {}
        self._lan_names: frozenset[str] = frozenset()
        self._targets_wake = trio.Event()
        self._sync_wake = trio.Event()
        # the engine's layers are known (or there is no engine): the node that decides what
        # to fetch starts after it, so it never fetches a layer the engine has (agent/_selfupdate)
        self._layers_known = trio.Event()
        self._refused: set[tuple[str, int]] = set()
        # The device's platform (os/arch[/variant]): the engine's at `run`, else this host's.
        # Every release is verified narrowed to it (mesh.release.verify_release).
        self.platform = host_platform()
        self.freshness = (None if enrollment.release_key is None else FreshnessWatch(
            enrollment.release_key, enrollment.fleet, lambda m: log(f"freshness: {m}")))
        link.reachability.append(self._coordinator_reachable)

    def _coordinator_reachable(self, ok: bool) -> None:
        if self.node is not None:
            self.node.coordinator_reachable(ok)

    # -- inputs from the rest of the agent -----------------------------------------------------

    def targets_changed(self) -> None:
        self._targets_wake.set()

    def logs_wanted_changed(self) -> None:
        if self.uploader is not None:
            self.uploader.wake()

    def update_peers(self) -> None:
        if self.node is not None:
            self.node.update_peers(self.peers())

    def app_statuses(self) -> tuple[AppStatus, ...]:
        statuses = self.appsync.app_statuses() if self.appsync is not None else ()
        if self.freshness is not None and self.freshness.stale(time.time()):
            return tuple(replace(s, stale=True) for s in statuses)
        return statuses

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        if self.settings.apply is not None:
            self.platform = await trio.to_thread.run_sync(self._engine_platform,
                                                          self.settings.apply)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._gossip_loop)
            nursery.start_soon(self._targets_loop)
            if self.settings.underlay is not None:
                nursery.start_soon(self._lan_loop, self.settings.underlay)
            if self.settings.apply is not None:
                nursery.start_soon(self._apply_loop, self.settings.apply)
            task_status.started()

    def _engine_platform(self, settings: ApplySettings) -> str:
        """The platform the engine that runs the apps reports; this host's (`uname -m`) if it
        does not answer now (the same machine in every deployment: the engine's socket is
        local)."""
        try:
            engine = _make_engine(settings)
            try:
                return str(engine.platform())
            finally:
                if settings.engine_factory is None:
                    engine.close()
        except Exception as exc:  # noqa: BLE001 - EngineError, or a fake's
            self.log(f"platform: the Docker engine did not say ({one_line(exc)}); this host is "
                     f"{self.platform}")
            return self.platform

    # -- the mesh node -------------------------------------------------------------------------

    def _blob_store(self) -> BlobStore | None:
        if self.store is None:
            try:
                self.store = BlobStore(self.data_path / "blobs")
            except OSError as exc:
                self.log(f"cannot open the blob store: {one_line(exc)}")
        return self.store

    def _node_changed(self, node: GossipNode | None) -> None:
        self.node = node
        self._sync_wake.set()

    async def _gossip_loop(self) -> None:
        """Run the node on our mesh address; a bind failure (the address is not on the
        interface yet) is retried. The node carries on without the coordinator."""
        settings, enrollment = self.settings, self.enrollment
        store = self._blob_store()
        if store is None:
            self.log("gossip: no blob store; no mesh node")
            return
        verify = release_verifier(enrollment.release_key, enrollment.fleet, self.platform)
        address = f"{enrollment.mesh_ipv4}:{settings.port}"
        if settings.apply is not None:
            with trio.move_on_after(LAYERS_WAIT):
                await self._layers_known.wait()
        errors = ErrorOnce(self.log, GOSSIP_RETRY)
        while True:
            node = GossipNode(
                enrollment.name, enrollment.mesh_ipv4, peers=self.peers(), verify=verify,
                store=store, client=self.link, fleet=enrollment.fleet,
                port=settings.port, sched_config=SchedConfig(peer_sharing=settings.peer_sharing),
                membership_config=METERED if settings.profile == "metered" else LAN,
                rumor_config=METERED_RUMOR if settings.profile == "metered" else LAN_RUMOR,
                rng=random.Random(self.rng.random()), log=lambda m: self.log(f"gossip: {m}"),
                local_layers=self._engine_layers, serve=settings.serve,
                on_misbehaviour=self.on_misbehaviour, wan_bytes=self._gossip_bytes)
            node.set_lan(self._lan_names)
            if not self.link.reachable:
                node.coordinator_reachable(False)
            self._node_changed(node)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(node.run)
                    errors.ok(f"gossip: listening on {address}")
            except* OSError as group:  # the bind; the node's tasks handle their own I/O errors
                errors.failed(f"gossip: cannot listen on {address}: "
                              f"{one_line(group.exceptions[0])}")
            finally:
                self._node_changed(None)
            await trio.sleep(GOSSIP_RETRY)

    def _gossip_bytes(self, n: int) -> None:
        """Frames to and from peers off our LAN: through the tunnel, across the WAN."""
        self.link.account.add("gossip", n, in_tunnel=True, now=self.link.clock())

    def _engine_layers(self) -> frozenset[str]:
        return self.applier.local_diff_ids() if self.applier is not None else frozenset()

    # -- the targets ---------------------------------------------------------------------------

    async def _targets_loop(self) -> None:
        """Offer the manifests of the coordinator's targets to the node, every interval."""
        interval = self.settings.targets_interval
        errors = ErrorOnce(self.log, interval)
        progress: tuple[int, int] | None = None
        while not self.link.revoked:
            node = self.node
            try:
                if node is not None:
                    await self._read_targets(node)
            except Exception as exc:  # noqa: BLE001 - never exit on coordinator errors
                if self.link.failed(exc, errors, "targets"):
                    return
            else:
                errors.ok()
            wait = interval
            if node is None:  # the mesh address may still be missing: look again soon
                wait = min(1.0, wait)
            elif errors.last is not None:
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

    async def _read_targets(self, node: GossipNode) -> None:
        fleet = self.enrollment.fleet
        targets = await self.link.targets()
        await self._read_timestamp()
        if await self._read_roots():
            return  # the release key rotated: nothing more under the old one
        sync = self.appsync
        if sync is not None:
            sync.set_targets(targets)
        for t in targets:
            held = node.newest(fleet, t.app)
            if held is not None and held.manifest.version >= t.version:
                continue
            data = await self.link.manifest(fleet, t.app, t.version)
            if node.offer_manifest(data):
                self.log(f"release {fleet}/{t.app} v{t.version} from the coordinator")
        # The node fetches what each target needs, whatever newer manifest circulates (a pin
        # back, or a newer release the operator withdrew that a peer still gossips).
        for t in targets:
            release = await self._target_release(node, t)
            if release is not None:
                node.set_target(fleet, t.app, release)
        for app in self._targeted - {t.app for t in targets}:
            node.set_target(fleet, app, None)
        self._targeted = {t.app for t in targets}
        current = {(t.app, t.version) for t in targets}
        self._older = {k: v for k, v in self._older.items() if k in current}
        self._sync_wake.set()

    async def _target_release(self, node: GossipNode, target: DeviceTarget
                              ) -> VerifiedRelease | None:
        """The verified release of `target`: the node's newest if it is that version, one
        verified earlier, or (older than the node's newest) its manifest from the coordinator,
        verified here once. None while it is not to be had (newer than anything verified:
        the offer above failed; or no release key)."""
        fleet, sync = self.enrollment.fleet, self.appsync
        newest = node.newest(fleet, target.app)
        if newest is not None and newest.manifest.version == target.version:
            return newest
        if newest is None or newest.manifest.version < target.version \
                or self.enrollment.release_key is None:
            return None
        key = (target.app, target.version)
        known = self._older.get(key)
        if known is None:  # fetched and verified once, whether or not the applier runs yet
            known = self._verify(target, await self.link.manifest(fleet, *key))
            if known is None:
                return None
            self._older[key] = known
        if sync is not None:  # an applier started later gets it too
            sync.add_release(known)
        return known

    async def _read_timestamp(self) -> None:
        """The fleet's signed timestamp, with every target poll; a failure is no timestamp
        (the last good one then expires: freeze detection), never a failed poll."""
        if self.freshness is None:
            return
        try:
            stamp = await self.link.call(lambda c: c.timestamp(), CALL_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever the SDK raises: no timestamp
            self.freshness.unanswered(one_line(exc))
            return
        self.freshness.update(stamp, time.time())

    async def _read_roots(self) -> bool:
        """The fleet's roots newer than the trusted one, with every target poll; True when a
        verified one names another release key (handed to `on_rotation`). A failed read is
        logged once and tried again at the next poll, never a failed poll."""
        watch = self.roots
        if watch is None or watch.trusted is None:
            return False
        fleet, since = self.enrollment.fleet, watch.trusted.version
        try:
            chain = await self.link.call(lambda c: c.roots(fleet, since), CALL_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever the SDK raises: no new root
            self._root_errors.failed(f"root metadata: {one_line(exc)}")
            return False
        self._root_errors.ok()
        found = watch.advance(chain)
        if found is None:
            return False
        signed, meta = found
        if meta.release_key.hex() == self.enrollment.release_key:
            watch.adopt(signed, meta)
            self.log(f"root metadata: version {meta.version} verified; the release key stays")
            return False
        self.on_rotation(signed, meta)
        return True

    def _verify(self, target: DeviceTarget, data: bytes) -> VerifiedRelease | None:
        """An older release's manifest from the coordinator, verified once, here."""
        key = self.enrollment.release_key
        assert key is not None  # the applier (and so AppSync) runs only with a release key
        try:
            release = verify_release(data, bytes.fromhex(key), fleet=self.enrollment.fleet,
                                     app=target.app, platform=self.platform)
            if release.manifest.version != target.version:
                raise ReleaseError(f"it is version {release.manifest.version}")
        except ReleaseError as exc:
            if (target.app, target.version) not in self._refused:
                self._refused.add((target.app, target.version))
                self.log(f"apply: release {self.enrollment.fleet}/{target.app} "
                         f"v{target.version}: manifest refused: {exc}")
            return None
        return release

    # -- applying releases (agent/_apply_driver.py, docs/agent-apply.md) -----------------------

    async def _apply_loop(self, settings: ApplySettings) -> None:
        """Start the applier once the engine answers, then keep its inputs current and upload
        the app's logs. The applier never stops the agent: its errors are its state."""
        enrollment = self.enrollment
        if enrollment.release_key is None:
            self.log("apply: no release key was pinned at enrollment; releases are not run")
            return
        store = self._blob_store()
        if store is None:
            return
        # Start-up time: the applier brings the Docker SDK (~130 ms of imports), which only
        # `run` with releases applied needs, not every fleetmesh-agent command.
        from ._apply_driver import Applier

        arm(self.data_path)
        errors = ErrorOnce(self.log, ENGINE_RETRY)
        while True:
            try:
                engine = await trio.to_thread.run_sync(_make_engine, settings)
                break
            except Exception as exc:  # noqa: BLE001 - EngineError, or a fake's
                errors.failed(f"apply: Docker engine: {one_line(exc)}")
                self._layers_known.set()  # none known: the node need not wait for them
            await trio.sleep(ENGINE_RETRY)
        applier = Applier(device=enrollment.name, fleet=enrollment.fleet,
                          data_dir=self.data_path, engine=engine, store=store,
                          release_key_hex=enrollment.release_key, platform=self.platform,
                          log=lambda m: self.log(f"apply: {m}"), on_handover=settings.on_handover)
        appsync = self.appsync = AppSync(applier, enrollment.fleet)
        async with trio.open_nursery() as nursery:
            async def layers_known() -> None:
                await applier.layers_known.wait()
                self._layers_known.set()

            nursery.start_soon(layers_known)
            await nursery.start(applier.run)
            self.applier = applier
            self._targets_wake.set()  # read the targets now that they can be applied
            uploader = self.uploader = LogUploader(self.link, applier.logs, self.log,
                                                   self.logs_wanted)
            await nursery.start(uploader.run)
            while True:
                # taken before the sync: a change while it runs is not missed
                changes = [applier.changed(), self._sync_wake]
                node = self.node
                if node is not None:
                    changes.append(node.changed())
                if appsync.sync(node, trio.current_time()):
                    self.on_apps_changed()
                    self._ship_failures(uploader, appsync)
                await _wait_any(changes)
                if self._sync_wake.is_set():
                    self._sync_wake = trio.Event()

    def _ship_failures(self, uploader: LogUploader, appsync: AppSync) -> None:
        """An app newly failed: its last log lines go up at once, read or not."""
        failed = {st.app for st in appsync.app_statuses() if st.state == "failed"}
        for app in sorted(failed - self._failed_apps):
            uploader.ship_tail(app)
        self._failed_apps = failed

    # -- LAN discovery -------------------------------------------------------------------------

    def _on_lan_change(self, neighbours: Iterable[Neighbour]) -> None:
        names = frozenset(n.name for n in neighbours)
        if names != self._lan_names:
            self.log(f"LAN neighbours: {', '.join(sorted(names)) or 'none'}")
        self._lan_names = names
        if self.node is not None:
            self.node.set_lan(self._lan_names)

    async def _lan_loop(self, underlay: str) -> None:
        discover = self.settings.lan_discovery or run_lan_discovery
        errors = ErrorOnce(self.log, LAN_RETRY)
        while True:
            try:
                await discover(self.enrollment.name, self.enrollment.fleet, self.public_key,
                               underlay, self.wg_port, self._on_lan_change)
            except Exception as exc:  # noqa: BLE001 - LanDiscoveryError, OSError, zeroconf's
                errors.failed(f"LAN discovery on {underlay}: {one_line(exc)}")
            await trio.sleep(LAN_RETRY)


def host_platform() -> str:
    """This machine's platform as its kernel names it (`uname -m`: x86_64 -> linux/amd64)."""
    return machine_platform(os.uname().machine, os.uname().sysname.lower())


def _make_engine(settings: ApplySettings) -> Any:
    if settings.engine_factory is not None:
        return settings.engine_factory()
    # start-up time: the Docker SDK (~130 ms of imports), only when releases are applied
    from ._engine import DockerEngine

    return DockerEngine(base_url=settings.docker_host)


__all__ = ["ENGINE_RETRY", "GOSSIP_RETRY", "LAN_RETRY", "TARGETS_INTERVAL", "TARGETS_RETRY",
           "ApplySettings", "GossipSettings", "LanDiscovery", "ReleaseSync"]
