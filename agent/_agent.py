"""The agent: one enrolled device, composed of components that each own their loop.

    agent = Agent(data_dir, backend_factory, client_factory)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)     # returns once the first reconcile has run

- `link`     agent/_link.py CoordinatorLink: every coordinator call (deadlines, the hub-tunnel
             URL first, backoff, revocation), errors logged once per distinct message;
- `wg`       agent/_wg_sync.py WireGuardSync: peer-map long poll, paths, WireGuard reconcile;
- `reporter` agent/_uploads.py Reporter: the state report, at once when something changed;
- `releases` agent/_release_sync.py ReleaseSync (with `gossip=GossipSettings(...)`): the mesh
             node, the coordinator's targets, LAN discovery and (with `apply=ApplySettings()`)
             the applier, which runs the targeted releases on the device's Docker engine
             (docs/agent-apply.md).

`backend_factory(enrollment)` is an async context manager yielding a vpn `AsyncWireGuardBackend`
(`WireGuardGoDevice` for the real thing); `client_factory(url, credential, cert_der)` makes a
`DeviceApi` (the SDK's `DeviceClient` fits). Everything that talks to the network or the daemon
has a deadline; the coordinator being down never stops the reconcile loop, which runs on the
last peer map (cached in the data directory), so the data plane outlives the control plane.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Final

import trio

from mesh.clikit import package_version
from mesh.control import (
    MAX_PEERS,
    MAX_WAN_BYTES,
    DeviceReport,
    Enrollment,
    PeerMap,
    PeerMisbehaviour,
    PeerPath,
    WanBudget,
)
from mesh.release import RootMetadata, SignedRoot
from vpn import AsyncWireGuardBackend, public_key_from_private

from ._account import AccountError, WanAccount
from ._datadir import DataDir, DataDirError, Identity
from ._devfilter import DeviceFilter, DeviceFilterError
from ._gossip import GossipNode
from ._lan import LanPeerJoin, run_lan_discovery
from ._link import ClientFactory, CoordinatorLink, ErrorOnce, Log, one_line
from ._paths import LAZY_AFTER, PathSelector
from ._release_sync import GossipSettings, ReleaseSync, host_platform
from ._rotation import RootWatch
from ._timezone import device_timezone
from ._uploads import REPORT_INTERVAL, Reporter
from ._wg_sync import POLL_WAIT, RECONCILE_INTERVAL, Nudger, WireGuardSync, udp_nudger

# The WAN byte account is saved this often (when it changed) and on shutdown: a crash loses at
# most this much of the day's count, and the flash sees a few writes an hour.
ACCOUNT_SAVE_INTERVAL: Final = 300.0
# Reports carry the account's last this many UTC days: today and yesterday (yesterday's final
# figure goes up with the first report of the new day).
REPORTED_DAYS: Final = 2
# The device's LAN addresses are read this often (a netlink dump: no network traffic); when
# they change the device has moved, and the hub and the coordinator hear of it at once.
NETWORK_CHECK_INTERVAL: Final = 2.0
# On a deliberate stop the last report (stopping: offline now) gets this long; the stop never
# waits longer for an unreachable coordinator.
GOODBYE_TIMEOUT: Final = 3.0
# the device firewall (agent/_devfilter.py) is retried this often while nft fails
FILTER_RETRY: Final = 30.0

BackendFactory = Callable[[Enrollment], AbstractAsyncContextManager[AsyncWireGuardBackend]]


@dataclass(frozen=True, slots=True)
class Intervals:
    """The agent's pace (tests shorten it)."""

    reconcile: float = RECONCILE_INTERVAL
    report: float = REPORT_INTERVAL
    poll_wait: int = POLL_WAIT
    lazy_after: float = LAZY_AFTER  # agent/_paths.py; 0: every direct path keeps its keepalive
    tune_keepalive: bool = True  # agent/_keepalive.py; False: the hub keepalive stays 25 s


def stderr_log(message: str) -> None:
    print(f"fleetmesh-agent: {message}", file=sys.stderr, flush=True)


class Agent:
    """One enrolled device: keeps its WireGuard interface converged on the peer map, reports,
    and (with `gossip`) spreads and applies its releases."""

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
        intervals: Intervals = Intervals(),
        nudge: Nudger | None = None,
        gossip: GossipSettings | None = None,
        wan_budget: tuple[int, str] | None = None,
        timezone: Callable[[], str | None] = device_timezone,
        candidate: Callable[[], bool] | None = None,
    ) -> None:
        """`wan_budget`: (bytes, "day" or "month"): past it, log shipping is deferred (all
        but the tail of an app that fails) and the reports say so. `timezone`: the device's
        time zone name for the reports (agent/_timezone.py), looked up with each report.
        `candidate`: this agent is the new agent of a hand-over (agent/_selfupdate.py): once
        it has joined (a hub handshake and a report delivered) `candidate()` commits, in a
        worker thread; False means the old agent took the device back, and `run` ends."""
        self.data = data_dir if isinstance(data_dir, DataDir) else DataDir(data_dir)
        # Both raise DataDirError (one line) when the directory is not usable.
        self.identity: Identity = self.data.read_identity()
        private_key = self.data.read_key()
        self.public_key = public_key_from_private(private_key)
        self.backend_factory = backend_factory
        # Only a real interface (WireGuardGoDevice names it) gets nudges and the device's
        # firewall (agent/_devfilter.py, installed when the map carries a policy's ports);
        # fakes get neither.
        ifname = getattr(backend_factory, "ifname", None)
        if nudge is None:
            nudge = udp_nudger(ifname) if isinstance(ifname, str) else None
        self.filter = DeviceFilter(ifname, gossip.port if gossip is not None else None) \
            if isinstance(ifname, str) else None
        self._filter_wanted = trio.Event()
        self.wg_port = wg_port if wg_port is not None else self.identity.wg_port
        if lan_endpoints is None:
            lan_endpoints = self.identity.lan_endpoints or ()
        self._lan = lan_endpoints
        self.agent_version = agent_version if agent_version is not None else package_version()
        self.log = log
        self.clock = clock
        self.timezone = timezone
        rng = rng or random.Random()
        enrollment = self.identity.enrollment
        self.account = self._load_account()
        self.wan_budget = wan_budget
        self._over_budget = False
        self.wg = WireGuardSync(
            self.data, PathSelector(private_key, enrollment.hub, self.wg_port,
                                    lazy_after=intervals.lazy_after), enrollment,
            clock=clock, log=log, nudge=nudge, reconcile_interval=intervals.reconcile,
            poll_wait=intervals.poll_wait, on_peermap=self._on_peermap,
            on_paths=self._report_now, tune_keepalive=intervals.tune_keepalive,
            account=self.account)
        self.link = CoordinatorLink(self.identity, client_factory, hub_up=self.wg.hub_up,
                                    log=log, rng=rng, account=self.account, clock=clock)
        self.link.reachability.append(self.wg.coordinator_reachable)
        self.reporter = Reporter(self.link, self.report, log, intervals.report)
        self.releases: ReleaseSync | None = None
        # LAN discovery's neighbours reach the node only once joined with the peer map: a
        # name counts with the fingerprint of its peer-map key (docs/security.md)
        self.lan_join = LanPeerJoin(self.peer_keys, log)
        # the fleet's root metadata: a rotated release key restarts `releases` with the new
        # key (agent/_rotation.py)
        self.roots = RootWatch(self.data, log)
        self._rng = rng
        self._gossip = gossip
        self._rotation: tuple[SignedRoot, RootMetadata] | None = None
        self._releases_scope: trio.CancelScope | None = None
        # the reserved app asked to hand over to (release, timeout): `run` ends, its caller
        # starts that agent (agent/_handover.py)
        self.handover: tuple[int, float] | None = None
        self.candidate = candidate
        self._run_scope: trio.CancelScope | None = None
        if gossip is not None and gossip.apply is not None:
            gossip = replace(gossip, apply=replace(gossip.apply, on_handover=self._hand_over))
        if gossip is not None:
            self._gossip = replace(gossip, lan_discovery=self.lan_join.wrap(
                gossip.lan_discovery or run_lan_discovery))
            self.releases = self._new_releases(self._gossip)

    def _new_releases(self, gossip: GossipSettings) -> ReleaseSync:
        return ReleaseSync(
            self.data.path, self.enrollment, self.public_key, self.wg_port, self.link,
            gossip, peers=self.gossip_peers, log=self.log, rng=self._rng,
            on_apps_changed=self._report_now, on_misbehaviour=self._report_now,
            roots=self.roots, on_rotation=self._on_rotation, logs_wanted=self.logs_wanted)

    def _on_rotation(self, signed: SignedRoot, meta: RootMetadata) -> None:
        """A verified root names another release key: stop the release subsystem (mesh node,
        applier, freshness watch, all built around the pinned key); `_releases_loop` rotates
        and starts it again."""
        self._rotation = (signed, meta)
        if self._releases_scope is not None:
            self._releases_scope.cancel()

    async def _releases_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """Run `releases`; after a rotation, again with the new key. Ends when it does."""
        started = False
        while self.releases is not None and self._gossip is not None:
            with trio.CancelScope() as scope:
                self._releases_scope = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.releases.run)
                    if not started:
                        task_status.started()
                        started = True
            rotation, self._rotation = self._rotation, None
            if rotation is None:
                return
            self.identity = self.roots.rotate(self.identity, *rotation)
            self.releases = self._new_releases(self._gossip)
            self._report_now()

    @property
    def enrollment(self) -> Enrollment:
        return self.identity.enrollment

    @property
    def gossip(self) -> GossipNode | None:
        """The running mesh node, if any."""
        return self.releases.node if self.releases is not None else None

    def lan_endpoints(self) -> tuple[str, ...]:
        if callable(self._lan):
            try:
                return tuple(self._lan())
            except OSError as exc:
                self.log(f"cannot list LAN addresses: {one_line(exc)}")
                return ()
        return tuple(self._lan)

    def gossip_peers(self) -> dict[str, str]:
        """name -> mesh IPv4 of every peer in the peer map."""
        peermap = self.wg.peermap
        return {} if peermap is None else {p.name: p.mesh_ipv4 for p in peermap.peers}

    def peer_keys(self) -> dict[str, str]:
        """name -> WireGuard public key of every peer in the peer map."""
        peermap = self.wg.peermap
        return {} if peermap is None else {p.name: p.public_key for p in peermap.peers}

    def report(self) -> DeviceReport:
        apps = self.releases.app_statuses() if self.releases is not None else ()
        paths: tuple[PeerPath, ...] = self.wg.paths
        gossip = self.gossip
        counted = gossip.misbehaving_peers() if gossip is not None else {}
        misbehaving = tuple(PeerMisbehaviour(name, counts)
                            for name, counts in list(counted.items())[:MAX_PEERS])
        return DeviceReport(self.lan_endpoints(), self.agent_version, paths, apps, misbehaving,
                            self.wg.link_state(), self.account.days(self.clock(), REPORTED_DAYS),
                            self.budget(), self.timezone(),
                            self.releases.platform if self.releases is not None
                            else host_platform())

    def budget(self) -> WanBudget | None:
        """The WAN budget and what this period used so far; crossing it (or a new period
        freeing it) is logged once and tells the log uploader (`logs_wanted`)."""
        if self.wan_budget is None:
            return None
        limit, period = self.wan_budget
        state = WanBudget(limit, period, min(self.account.used(self.clock(), period),
                                             MAX_WAN_BYTES - 1))
        if state.over != self._over_budget:
            self._over_budget = state.over
            self.log(f"WAN budget of {limit} bytes a {period} used up: log shipping deferred "
                     "(the tail of an app that fails still goes up)" if state.over else
                     f"WAN budget: a new {period}, log shipping resumes")
            if self.releases is not None:
                self.releases.logs_wanted_changed()
        return state

    # -- the WAN byte account ------------------------------------------------------------------

    def _load_account(self) -> WanAccount:
        """The saved account; a damaged file is ignored with one line (the count starts
        again from zero)."""
        try:
            saved = self.data.read_wan_account()
            return WanAccount() if saved is None else WanAccount.from_json(saved)
        except DataDirError as exc:
            self.log(f"ignoring the WAN byte account: {exc}")
        except AccountError as exc:
            self.log(f"ignoring the WAN byte account: {self.data.wan_account_path}: {exc}")
        return WanAccount()

    def save_account(self) -> None:
        """Write the account if it changed since the last write; a failure is one line."""
        if not self.account.changed:
            return
        try:
            self.data.write_wan_account(self.account.to_json())
        except DataDirError as exc:
            self.log(str(exc))
            return
        self.account.saved()

    async def _account_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        task_status.started()
        while True:
            await trio.sleep(ACCOUNT_SAVE_INTERVAL)
            self.save_account()

    async def _network_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        """Watch the LAN addresses: a change means another network (and NAT) in front of us.
        The report with the new LAN candidates goes up at once and the hub gets a datagram, so
        peers learn both within seconds, not at the next keepalive or report check."""
        last = self.lan_endpoints()
        task_status.started()
        while True:
            await trio.sleep(NETWORK_CHECK_INTERVAL)
            now = self.lan_endpoints()
            if now == last:
                continue
            self.log(f"network changed: LAN addresses {', '.join(last) or 'none'} -> "
                     f"{', '.join(now) or 'none'}; telling the hub and the coordinator")
            last = now
            self.reporter.wake()
            self.wg.network_changed()

    def logs_wanted(self) -> bool:
        """Someone reads this device's app logs: the peer map says so, until when (a map
        without the field comes from a coordinator that never asks: always), and the WAN
        budget is not used up."""
        peermap = self.wg.peermap
        if peermap is None:
            return False
        budget = self.budget()
        if budget is not None and budget.over:
            return False
        until = peermap.logs_wanted_until
        return until is None or until > self.clock()

    def _report_now(self) -> None:
        self.reporter.wake()

    def _hand_over(self, version: int, timeout_s: float) -> None:
        """The reserved app's release is loaded: stop every component (the interface, the
        ports, the data directory go to the new agent)."""
        if self.handover is None:
            self.handover = (version, timeout_s)
            if self._run_scope is not None:
                self._run_scope.cancel()

    async def _candidate_loop(self) -> None:
        """The new agent of a hand-over: commit once joined, in a worker thread (Docker)."""
        assert self.candidate is not None
        while True:
            await trio.sleep(0.5)
            if not (self.reporter.sent > 0 and self.wg.hub_up()):
                continue
            try:
                ok = await trio.to_thread.run_sync(self.candidate)
            except Exception as exc:  # noqa: BLE001 - EngineError, a disk error: try again
                self.log(f"hand-over: cannot commit yet: {one_line(exc)}")
                await trio.sleep(2)
                continue
            if not ok:
                self.log("hand-over: the old agent took the device back; stopping")
                if self._run_scope is not None:
                    self._run_scope.cancel()
            elif self.releases is not None and self.releases.applier is not None:
                self.releases.applier.wake()  # its status: from starting to running
            return

    def _on_peermap(self, old: PeerMap | None, new: PeerMap) -> None:
        self._filter_wanted.set()
        self.lan_join.peers_changed()
        if self.releases is not None:
            if old is not None and old.targets != new.targets:  # the first read is at start
                self.releases.targets_changed()
            if old is None or old.logs_wanted_until != new.logs_wanted_until:
                self.releases.logs_wanted_changed()
            self.releases.update_peers()

    async def _filter_loop(self, filter_: DeviceFilter, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        """Keep the device's firewall on the current peer map: applied (atomically) on each new
        map, retried every FILTER_RETRY while it fails; removed by `run` on the way out."""
        errors = ErrorOnce(self.log, FILTER_RETRY)
        failing = False
        task_status.started()
        while True:
            peermap = self.wg.peermap
            if peermap is not None:
                try:
                    await trio.to_thread.run_sync(filter_.apply, peermap)
                except (DeviceFilterError, ValueError) as exc:
                    failing = True
                    errors.failed(f"cannot apply the device firewall: {exc}")
                else:
                    failing = False
                    errors.ok("the device firewall is applied again")
            with trio.move_on_after(FILTER_RETRY if failing else float("inf")):
                await self._filter_wanted.wait()
            self._filter_wanted = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Bring the interface up and run the components until cancelled."""
        async with self.backend_factory(self.enrollment) as backend:
            try:
                async with trio.open_nursery() as nursery:
                    self._run_scope = nursery.cancel_scope
                    if self.handover is not None:  # asked before run: nothing to start
                        nursery.cancel_scope.cancel()
                    await nursery.start(self.wg.run, backend, self.link)
                    if self.filter is not None:
                        await nursery.start(self._filter_loop, self.filter)
                    await nursery.start(self.reporter.run)
                    await nursery.start(self._account_loop)
                    if callable(self._lan):
                        await nursery.start(self._network_loop)
                    if self.releases is not None:
                        await nursery.start(self._releases_loop)
                    if self.candidate is not None:
                        nursery.start_soon(self._candidate_loop)
                    task_status.started(self)
            finally:
                # Still inside the backend: the tunnel to the coordinator is up for the last
                # report, which says the device goes offline now (its bytes are counted in the
                # account saved just after).
                with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_TIMEOUT):
                    await self.reporter.goodbye()
                self.save_account()
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self.link.aclose()
                if self.filter is not None:
                    with trio.CancelScope(shield=True):
                        try:
                            await trio.to_thread.run_sync(self.filter.stop)
                        except DeviceFilterError as exc:
                            self.log(f"cannot remove the device firewall: {exc}")


__all__ = ["Agent", "BackendFactory", "Intervals", "stderr_log"]
