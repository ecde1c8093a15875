"""WireGuard reconcile: the peer map (long-polled from the coordinator, cached in the data
directory) goes through the path selector (agent/_paths.py) into a desired device state, which
`vpn.diff` compares with the interface (UAPI `get`) and the backend applies: only what differs.

    wg = WireGuardSync(data, private_key, enrollment, wg_port, ...)
    async with trio.open_nursery() as nursery:
        await nursery.start(wg.run, backend, link)   # returns after the first reconcile

Without the coordinator the reconcile goes on, on the last peer map (docs/architecture.md,
principle 4); the interface's errors are logged once each and retried every tick.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from mesh.control import Enrollment, LinkState, PeerMap, PeerPath
from vpn import (
    AsyncWireGuardBackend,
    Change,
    DeviceStatus,
    RemovePeer,
    UapiError,
    UapiProtocolError,
    UpdatePeer,
    changes_to_config,
    diff,
)

from ._account import WanAccount
from ._datadir import DataDir, DataDirError
from ._keepalive import ARRIVAL_SLACK, FLOOR, KeepaliveTuner, Trial
from ._link import CoordinatorLink, ErrorOnce, Log, one_line
from ._paths import KEEPALIVE, REJECT_AFTER_TIME, REKEY_TIMEOUT, PathPlan, PathSelector

RECONCILE_INTERVAL: Final = 1.0  # read the device and converge once a second
# Through the hub tunnel the long poll is the coordinator's push channel: it answers at once on
# any change, so the wait only sets what an idle device pays, one TLS request per POLL_WAIT
# (issue 14: an idle device costs <= 20 KB of WAN per hour, keepalives included). Nothing on
# the way cuts it: the NAT sees only the tunnel's UDP, which our 25 s WireGuard keepalive to
# the hub holds, and the coordinator's listener has no read deadline on a request in flight
# (coordinator/_listen.py). The server's ceiling (coordinator/routes/devices.py MAX_WAIT).
POLL_WAIT: Final = 1800
# Outside the tunnel (the join URL: the hub is down, or its API does not answer) the poll's TCP
# connection crosses the NAT itself with nothing sent while it waits, and a router that forgets
# idle TCP mappings sooner than RFC 5382's two hours would leave us deaf until the wait ends.
# There the wait stays what it was before the push channel.
DIRECT_POLL_WAIT: Final = 110
# The hub answered no handshake for this long although our 25 s keepalive to it keeps asking for
# one: its session died at REJECT_AFTER_TIME, and a live hub answers the next keepalive-driven
# initiation within KEEPALIVE + REKEY_TIMEOUT. The coordinator behind it may be gone without
# closing our long poll (a host or a link down): that poll is abandoned and a new one made
# (on the join URL, since the tunnel is down) instead of waiting out POLL_WAIT deaf. Free: the
# reconcile reads the hub's last handshake every second anyway. With a longer hub keepalive
# (agent/_keepalive.py) the keepalive takes KEEPALIVE's place.
HUB_SILENT_AFTER: Final = REJECT_AFTER_TIME + KEEPALIVE + REKEY_TIMEOUT
BACKEND_TIMEOUT: Final = 5.0  # the UAPI client's own default deadline
# A coordinator that answers 304 at once (a bug, or a proxy) must not make us spin.
MIN_POLL_INTERVAL: Final = 1.0
PUNCH_QUEUE: Final = 64  # punch requests waiting for the coordinator; more are dropped
# A nudge (agent/_paths.py) is one datagram into the tunnel; the discard port (RFC 863). What the
# peer's WireGuard answers does not depend on anything listening there.
NUDGE_PORT: Final = 9

Nudger = Callable[[Sequence[str]], Awaitable[None]]  # send one datagram to each mesh address


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


def _rebind(changes: list[Change], status: DeviceStatus) -> list[Change]:
    """`changes` plus, for every peer with an endpoint that they leave alone, that same
    endpoint set again (WireGuard then forgets the source address it kept for the peer)."""
    touched = {c.public_key for c in changes
               if isinstance(c, UpdatePeer) and c.endpoint is not None}
    touched |= {c.public_key for c in changes if isinstance(c, RemovePeer)}
    again = [UpdatePeer(p.public_key, endpoint=p.endpoint) for p in status.peers
             if p.endpoint is not None and p.public_key not in touched]
    return [*changes, *again]


class WireGuardSync:
    """Keeps the interface converged on the peer map; owns the peer-map poll and the reconcile
    loops. `on_peermap(old, new)` hears of every new map, `on_paths()` of changed paths."""

    def __init__(self, data: DataDir, selector: PathSelector, enrollment: Enrollment, *,
                 clock: Callable[[], float] = time.time, log: Log,
                 nudge: Nudger | None = None,
                 reconcile_interval: float = RECONCILE_INTERVAL, poll_wait: int = POLL_WAIT,
                 on_peermap: Callable[[PeerMap | None, PeerMap], None] = lambda old, new: None,
                 on_paths: Callable[[], None] = lambda: None,
                 tune_keepalive: bool = False, account: WanAccount | None = None) -> None:
        self.data = data
        # the WAN byte account's `tunnel`: fed with every reading of the device
        self.account = account
        self.selector = selector
        self.enrollment = enrollment
        self.clock = clock
        self.log = log
        self.nudge = nudge
        self.reconcile_interval = reconcile_interval
        self.poll_wait = poll_wait
        self.on_peermap = on_peermap
        self.on_paths = on_paths
        self.status: DeviceStatus | None = None
        self.plan: PathPlan | None = None
        self.sets_sent = 0  # UAPI `set` requests sent: a steady state sends none
        self.reconciles = 0
        self.nudges_sent = 0
        self._rebind = False  # the network changed: re-set endpoints, nudge the hub
        self._wake = trio.Event()
        self._backend_errors = ErrorOnce(log, reconcile_interval)
        self._nudge_errors = ErrorOnce(log)
        self._punch_errors = ErrorOnce(log)
        # peers to ask through the coordinator to punch to us (a lazy path woke): one request
        # each, the newest PUNCH_QUEUE kept if the coordinator is slow
        self._punch_send, self._punch_recv = trio.open_memory_channel[str](PUNCH_QUEUE)
        self.punches_sent = 0
        # the long poll in flight: its cancel scope, and whether the hub was up when it began
        self._poll: tuple[trio.CancelScope, bool] | None = None
        self.polls_abandoned = 0  # long polls given up because the hub went silent
        # The hub keepalive at the NAT's binding lifetime (agent/_keepalive.py), measured with
        # the long polls (made in `run`, on trio's clock); None: the customary KEEPALIVE.
        self._tune = tune_keepalive
        self.tuner: KeepaliveTuner | None = None
        self._trial: Trial | None = None
        self._hub_tx: int | None = None
        self._hub_tx_at: collections.deque[float] = collections.deque(maxlen=8)
        self.peermap: PeerMap | None = None
        try:
            self.peermap = data.read_peermap()
        except DataDirError as exc:
            log(f"ignoring the peer map cache: {exc}")
        if self.peermap is not None:
            log(f"peer map v{self.peermap.version} from the cache: "
                f"{len(self.peermap.peers)} peers")

    @property
    def paths(self) -> tuple[PeerPath, ...]:
        return self.plan.paths if self.plan is not None else ()

    def hub_handshake_age(self) -> float | None:
        """Seconds since the last handshake with the hub; None before any (or no status)."""
        if self.status is None:
            return None
        hub = self.peermap.hub if self.peermap is not None else self.enrollment.hub
        peer = self.status.peer(hub.public_key)
        hs = peer.last_handshake if peer is not None else None
        return None if hs is None else self.clock() - hs

    def hub_up(self) -> bool:
        """A live hub session: the API through the tunnel is worth trying first."""
        age = self.hub_handshake_age()
        return age is not None and age < REJECT_AFTER_TIME

    def hub_keepalive(self) -> int:
        return self.tuner.hub_keepalive() if self.tuner is not None else KEEPALIVE

    def link_state(self) -> LinkState:
        """How we hold our NAT binding to the hub, for the report."""
        t = self.tuner
        if t is None:
            return LinkState(KEEPALIVE)
        return LinkState(t.keepalive, round(t.proven, 1),
                         None if t.failed is None else round(t.failed, 1))

    def _hub_silent_after(self) -> float:
        return REJECT_AFTER_TIME + max(KEEPALIVE, self.hub_keepalive()) + REKEY_TIMEOUT

    def _silent_since(self, before: float) -> float:
        """When our hub entry last sent anything before `before` (a reconcile's resolution)."""
        sent = [t for t in self._hub_tx_at if t < before]
        return max(sent) if sent else float("-inf")

    async def run(self, backend: AsyncWireGuardBackend, link: CoordinatorLink, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The reconcile loop (started once the first reconcile ran) and the peer-map poll."""
        if self._tune:
            self.tuner = KeepaliveTuner(trio.current_time())
        async with trio.open_nursery() as nursery:
            await nursery.start(self._reconcile_loop, backend)
            nursery.start_soon(self._peermap_loop, link)
            nursery.start_soon(self._punch_loop, link)
            task_status.started()

    def network_changed(self) -> None:
        """Our underlay moved (other LAN addresses: carried to another site, a new DHCP lease):
        the NAT in front of us is another one. Tell the hub at once with one datagram through
        the tunnel (the hub learns our new public endpoint from it, and peers hear it in their
        next map, instead of at our next keepalive), tune the hub keepalive from the start (the
        new NAT's binding lifetime is unknown; a keepalive trial in flight measured the old
        one), and re-converge. The next reconcile sets every peer's endpoint again, to what it
        is: that drops the source address WireGuard keeps per peer ("sticky sockets"), which
        names an address (and interface) we no longer have."""
        if self.tuner is not None:
            self.tuner = KeepaliveTuner(trio.current_time())
            self._trial = None
        self._rebind = True
        self._wake.set()

    def coordinator_reachable(self, ok: bool) -> None:
        """The link's view (CoordinatorLink.reachability): without the coordinator no path goes
        lazy and lazy ones wake (agent/_paths.py)."""
        self.selector.coordinator_ok = ok
        self._wake.set()

    async def _punch_loop(self, link: CoordinatorLink) -> None:
        async for peer in self._punch_recv:
            try:
                await link.punch(peer)
            except Exception as exc:  # noqa: BLE001 - the punch on our side goes on anyway
                if link.revoked_by(exc):
                    return
                self._punch_errors.failed(f"cannot ask {peer} to punch: {one_line(exc)}")
            else:
                self.punches_sent += 1
                self._punch_errors.ok()

    # -- the peer map --------------------------------------------------------------------------

    def accept_peermap(self, peermap: PeerMap) -> None:
        old = self.peermap
        self.peermap = peermap
        was = f" (was v{old.version})" if old is not None else ""
        self.log(f"peer map v{peermap.version}: {len(peermap.peers)} peers{was}")
        try:
            self.data.write_peermap(peermap)
        except DataDirError as exc:
            self.log(f"cannot cache the peer map: {exc}")
        self.on_peermap(old, peermap)
        self._wake.set()

    def _poll_wait(self, now: float) -> tuple[int, Trial | None]:
        """This poll's wait, and the keepalive trial it is (agent/_keepalive.py), if one is due
        and the hub answers; an ordinary poll ends when the next trial is due."""
        tuner = self.tuner
        if tuner is None or not self.hub_up():
            return self.poll_wait, None
        trial = tuner.start_trial(now)
        if trial is not None:
            self._wake.set()  # the keepalive goes off at once
            return trial.wait, trial
        due = tuner.next_trial_at() - now
        return max(FLOOR, min(self.poll_wait, int(due) + 1)), None

    def _trial_over(self, trial: Trial, answered_at: float | None,
                    link: CoordinatorLink | None, changed: bool) -> None:
        """The trial's poll ended (answered at `answered_at`, None: not in time or not at all):
        tell the tuner, put the keepalive back, log what it learned."""
        assert self.tuner is not None
        tuner, before = self.tuner, self.tuner.keepalive
        now = trio.current_time()
        if changed or (answered_at is not None and link is not None
                       and not link.answered_via_tunnel):
            tuner.trial_done(None, float("inf"), now)  # a push or the join URL: no measure
        else:
            tuner.trial_done(answered_at, self._silent_since(answered_at or now), now)
        self._wake.set()
        if tuner.keepalive != before:
            self.log(f"hub keepalive {tuner.keepalive} s: the NAT kept our binding through "
                     f"{tuner.proven:.0f} s of silence")
            self.on_paths()  # reported (the coordinator's online window follows it)
        elif answered_at is None:
            self.log(f"hub keepalive stays {tuner.keepalive} s: the NAT did not keep our "
                     f"binding through {tuner.failed or 0:.0f} s of silence")

    async def _peermap_loop(self, link: CoordinatorLink) -> None:
        version = self.peermap.version if self.peermap is not None else 0
        failing = False
        while not link.revoked:
            started = trio.current_time()
            wait, trial = self._poll_wait(started)
            self._trial = trial
            try:
                with trio.CancelScope() as scope:
                    # a trial's poll is never abandoned: the reconcile ends the trial at its
                    # deadline, and a held answer still comes on the same connection
                    self._poll = (scope, self.hub_up() and trial is None)
                    try:
                        # the map we hold: only the changes since it come (a delta)
                        peermap = await link.peermap(version, wait, min(wait, DIRECT_POLL_WAIT),
                                                     hold=self.hub_keepalive(),
                                                     quiet=trial is not None,
                                                     held=self.peermap)
                    finally:
                        self._poll = None
                answered_at = trio.current_time()
                if trial is not None and self._trial is trial:  # answered within its deadline
                    self._trial = None
                    self._trial_over(trial, answered_at, link,
                                     peermap is not None and peermap.version != version)
                if scope.cancelled_caught:  # the hub went silent
                    link.lost()
                    continue
            except Exception as exc:  # noqa: BLE001 - never exit on coordinator errors
                if trial is not None and self._trial is trial:
                    self._trial = None
                    self._trial_over(trial, None, link, True)  # no answer to measure
                if link.revoked_by(exc):
                    return
                delay = link.backoff.next()
                self.log(f"peer map: {one_line(exc)}; retrying in {delay:.1f} s")
                failing = True
                link.lost()
                await trio.sleep(delay)
                continue
            link.backoff.reset()
            if failing:
                failing = False
                self.log("peer map: coordinator answers again")
            if trial is None and peermap is None and self.tuner is not None \
                    and link.answered_via_tunnel and self.tuner.poll_answered(
                        started, wait, answered_at, True, answered_at):
                self.log(f"hub keepalive back to {self.tuner.keepalive} s: an answer due after "
                         f"{wait} s came {answered_at - started - wait:.0f} s late, held at the "
                         "NAT until our next packet")
                self._wake.set()
                self.on_paths()
            if peermap is None or peermap.version == version:
                spent = trio.current_time() - started
                if spent < MIN_POLL_INTERVAL:
                    await trio.sleep(MIN_POLL_INTERVAL - spent)
                continue
            version = peermap.version
            self.accept_peermap(peermap)

    def _end_overdue_trial(self) -> None:
        """After each reconcile: a trial whose answer did not come by its deadline failed (the
        NAT dropped it); the keepalive comes back at once, and the held answer with it."""
        trial = self._trial
        if trial is not None and trio.current_time() > trial.started + trial.wait + ARRIVAL_SLACK:
            self._trial = None
            self._trial_over(trial, None, None, False)

    def _abandon_if_hub_silent(self) -> None:
        """After each reconcile: a long poll begun through a live hub session is given up once
        the hub has answered no handshake for HUB_SILENT_AFTER (the constant says why)."""
        if self._poll is None:
            return
        scope, via_hub = self._poll
        if not via_hub or scope.cancel_called:
            return
        age = self.hub_handshake_age()
        if age is not None and age <= self._hub_silent_after():
            return
        self.polls_abandoned += 1
        silent = "no longer" if age is None else f"not for {age:.0f} s"
        self.log(f"peer map: the hub answers handshakes {silent}; abandoning the long poll "
                 "through it and asking again")
        scope.cancel()

    # -- reconcile -----------------------------------------------------------------------------

    async def reconcile_once(self, backend: AsyncWireGuardBackend) -> PathPlan | None:
        """Read the device, choose paths, send only what differs. Never raises for the daemon's
        failures: they are logged once each and retried on the next tick."""
        try:
            with trio.fail_after(BACKEND_TIMEOUT):
                status = await backend.aget()
                self._watch_hub_tx(status)
                self._count_tunnel(status)
                self.selector.hub_keepalive = self.hub_keepalive()
                plan = self.selector.update(self.peermap, status, self.clock())
                changes = diff(plan.desired, status)
                rebind = self._rebind
                if rebind:
                    changes = _rebind(changes, status)
                if changes:
                    await backend.aset(changes_to_config(changes))
                    self.sets_sent += 1
        except (OSError, trio.TooSlowError, UapiError, UapiProtocolError) as exc:
            self._backend_errors.failed(f"WireGuard: {one_line(exc)}")
            return None
        self._backend_errors.ok("WireGuard answers again")
        self.reconciles += 1
        nudges = list(plan.nudges)
        if rebind:
            self._rebind = False
            hub = self.peermap.hub if self.peermap is not None else self.enrollment.hub
            nudges.append(hub.mesh_ipv4)  # the hub sees our new public endpoint from it
        if nudges and self.nudge is not None:
            await self._send_nudges(self.nudge, nudges)
        for peer in plan.punch:
            try:
                self._punch_send.send_nowait(peer)
            except trio.WouldBlock:
                self._punch_errors.failed("punch requests queue up: the coordinator is slow")
        old = self.plan
        self.status, self.plan = status, plan
        self._end_overdue_trial()
        self._abandon_if_hub_silent()
        for change in plan.changes:
            self.log(str(change))
        if old is None or [(p.public_key, p.path, p.endpoint) for p in old.paths] != \
                [(p.public_key, p.path, p.endpoint) for p in plan.paths]:
            self.on_paths()
        return plan

    def _count_tunnel(self, status: DeviceStatus) -> None:
        """The WAN byte account's tunnel: the hub entry and every peer off our LAN."""
        if self.account is None:
            return
        peermap = self.peermap
        hub = peermap.hub if peermap is not None else self.enrollment.hub
        lan = [p.public_key for p in peermap.peers if p.lan] if peermap is not None else []
        self.account.observe_tunnel(status, hub.public_key, lan, self.clock())

    def _watch_hub_tx(self, status: DeviceStatus) -> None:
        """When our hub entry last sent something (the keepalive trials' silence)."""
        hub = self.peermap.hub if self.peermap is not None else self.enrollment.hub
        peer = status.peer(hub.public_key)
        tx = peer.tx_bytes if peer is not None else 0
        if self._hub_tx is None or tx != self._hub_tx:
            self._hub_tx_at.append(trio.current_time())
        self._hub_tx = tx

    async def _send_nudges(self, nudge: Nudger, addresses: Sequence[str]) -> None:
        """After the apply, so that each datagram goes through the peer's own entry. A failure
        only costs the path core a slower answer: log it once, never raise."""
        try:
            with trio.fail_after(BACKEND_TIMEOUT):
                await nudge(addresses)
        except (OSError, trio.TooSlowError) as exc:
            self._nudge_errors.failed(f"cannot nudge peers: {one_line(exc)}")
            return
        self.nudges_sent += len(addresses)
        self._nudge_errors.ok()

    async def _reconcile_loop(self, backend: AsyncWireGuardBackend, *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
        await self.reconcile_once(backend)
        task_status.started()
        while True:
            with trio.move_on_after(self.reconcile_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.reconcile_once(backend)


__all__ = ["DIRECT_POLL_WAIT", "HUB_SILENT_AFTER", "POLL_WAIT", "RECONCILE_INTERVAL", "Nudger",
           "WireGuardSync", "udp_nudger"]
