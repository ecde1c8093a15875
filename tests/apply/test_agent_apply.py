"""The agent with its applier (fake engine): the coordinator's target reaches the engine, the
report carries the app's state, a target change through the peer map moves the app on."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from agent import (
    Agent,
    ApplySettings,
    CoordinatorLink,
    DataDir,
    GossipSettings,
    GossipStats,
    Identity,
    ReleaseSync,
)
from agent._applogs import LogBuffer
from agent._appsync import AppSync
from agent._uploads import LogUploader
from mesh.control import (
    MAX_SIGNED_PIN_BYTES,
    AppStatus,
    ControlError,
    DeviceReport,
    DeviceTarget,
    Enrollment,
    LogLine,
    PeerMap,
)
from mesh.release import (
    ContainerSettings,
    HealthCheck,
    HealthKind,
    ReleaseManifest,
    VerifiedRelease,
)
from mesh.rollout import Window
from tests.agent.fakes import HUB, KEYS, FakeClient, FakeCoordinator, FakeWireGuard
from tests.gossip.helpers import free_port, wait_for

from ._fake import Clock, FakeEngine, Releases

URL = "https://198.51.100.1:8443"
QUICK = ContainerSettings(health_check=HealthCheck(HealthKind.RUNNING, seconds=0.2,
                                                   interval_s=0.1))


class RealClock(Clock):
    def __call__(self) -> float:
        return time.time()


class AppCoordinator(FakeCoordinator):
    def __init__(self) -> None:
        super().__init__(PeerMap(1, HUB))
        self.targets: list[dict[str, Any]] = []
        self.manifests: dict[tuple[str, str, int], bytes] = {}
        self.logs: list[LogLine] = []
        self.timestamp: bytes | None = None  # GET /device/timestamp

    def factory(self, url: str, credential: str, cert_der: bytes) -> FakeClient:
        client = AppClient(self, url, credential, cert_der)
        self.clients.append(client)
        return client

    def apps(self) -> dict[str, AppStatus]:
        return {a.app: a for a in self.reports[-1][1].apps} if self.reports else {}


class AppClient(FakeClient):
    coord: AppCoordinator

    async def targets(self) -> list[dict[str, Any]]:
        await self._gate()
        return self.coord.targets

    async def manifest(self, fleet: str, app: str, version: int) -> bytes:
        await self._gate()
        return self.coord.manifests[(fleet, app, version)]

    async def timestamp(self) -> bytes | None:
        await self._gate()
        return self.coord.timestamp

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        raise AssertionError("every blob is held already")

    async def upload_logs(self, lines: list[LogLine], dropped: int = 0) -> None:
        await self._gate()
        self.coord.logs.extend(lines)


def device(tmp: Path, release_key: str) -> DataDir:
    data = DataDir(tmp / "dev")
    data.write_key(KEYS[0].private)
    e = Enrollment("dev-0", "home-0", "cams", "cred-0", "127.0.0.60", "fd7a:f1ee::60",
                   "10.250.0.0/16", "fd7a:f1ee::/64", HUB, release_key)
    data.write_identity(Identity(URL, e, b"\x30\x82fake-der", 51820, None))
    return data


def applying_agent(tmp_path: Path, versions: Iterable[int], log: Callable[[str], None]
                   ) -> tuple[Agent, AppCoordinator, FakeEngine]:
    """An agent applying on a fake engine, its coordinator offering `versions` of "web" and
    targeting version 1."""
    releases = Releases(tmp_path / "dev", app="web")  # its blob store is the agent's
    data = device(tmp_path, releases.key_hex)
    coord = AppCoordinator()
    for v in versions:
        coord.manifests[("cams", "web", v)] = releases.make(v, QUICK)
    coord.targets = [{"app": "web", "version": 1, "pin": None, "force": False, "retry": 0}]
    engine = FakeEngine(RealClock())
    agent = Agent(data, FakeWireGuard().factory(), coord.factory, log=log,
                  gossip=GossipSettings(port=free_port(),
                                        apply=ApplySettings(engine_factory=lambda: engine)))
    return agent, coord, engine


def web_running(coord: AppCoordinator) -> bool:
    web = coord.apps().get("web")
    return web is not None and web.state == "running"


async def test_targets_are_applied_and_reported(tmp_path: Path) -> None:
    logs: list[str] = []
    agent, coord, engine = applying_agent(tmp_path, (1, 2), logs.append)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await wait_for(lambda: web_running(coord), 0.05)
            web = coord.apps()["web"]
            assert (web.running, web.target) == (1, 1)
            assert [c.version for c in engine.running("home-0", "web")] == [1]
            # v2 becomes the target: the peer map's targets revision tells the agent
            coord.targets = [{"app": "web", "version": 2, "pin": None, "force": False,
                              "retry": 0}]
            coord.publish(PeerMap(2, HUB, targets=1))
            await wait_for(lambda: coord.apps()["web"].running == 2
                           and coord.apps()["web"].state == "running", 0.05)
            assert [c.version for c in engine.running("home-0", "web")] == [2]
            assert not any("refused" in m for m in logs)
            nursery.cancel_scope.cancel()


def local_clock_text(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


async def test_a_held_target_waits_for_its_phase_then_a_window_for_its_opening(
        tmp_path: Path) -> None:
    """Issue 16 through the whole agent (fake engine, real clock and local time zone): a held
    v2 is downloaded but no container of it is created; lifting the hold applies it; v3 with
    a window a few seconds ahead (HH:MM:SS, the device's local time) waits for the window,
    and its container starts only once the window has opened."""
    logs: list[str] = []
    agent, coord, engine = applying_agent(tmp_path, (1, 2, 3), logs.append)

    def web() -> AppStatus | None:
        return coord.apps().get("web")

    def retarget(revision: int, version: int, **extra: Any) -> None:
        coord.targets = [{"app": "web", "version": version, "pin": None, "force": False,
                          "retry": 0, **extra}]
        coord.publish(PeerMap(revision, HUB, targets=revision))

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await wait_for(lambda: web_running(coord), 0.05)
            retarget(2, 2, hold=True)
            await wait_for(lambda: (w := web()) is not None and w.target == 2
                           and w.state == "waiting-phase", 0.05)
            w = web()
            assert w is not None and w.running == 1 and w.bytes_done == w.bytes_total
            assert not any(c[0] == "create" and c[2] == "2" for c in engine.calls)
            assert not any(c[0] == "load" for c in engine.calls[1:])  # no rebuild while held
            # the phase starts: the hold is lifted, the release applied at once
            retarget(3, 2, hold=False)
            await wait_for(lambda: (w := web()) is not None and w.running == 2
                           and w.state == "running", 0.05)
            # v3 with a window a few seconds ahead, in the device's local time
            opens = math.floor(time.time()) + 5
            window = f"{local_clock_text(opens)}-{local_clock_text(opens + 3600)}"
            retarget(4, 3, window=window)
            await wait_for(lambda: (w := web()) is not None and w.running == 3
                           and w.state == "running", 0.05)
            states = [a.state for _, r in coord.reports for a in r.apps if a.target == 3]
            assert "waiting-window" in states
            assert states.index("waiting-window") < states.index("running")
            started = [c for c in engine.containers_.values() if c.version == 3]
            assert len(started) == 1 and started[0].started_at is not None
            assert started[0].started_at >= opens  # not a moment before the window opened
            assert sum("held until its rollout phase starts" in m for m in logs) == 1
            assert sum(f"waits for its window {Window.parse(window)} (device-local time), "
                       "which opens at "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(opens))}" in m
                       for m in logs) == 1
            nursery.cancel_scope.cancel()


async def test_app_logs_go_up_while_the_peer_map_asks_for_them(tmp_path: Path) -> None:
    """Issue 14: the app's log lines stay on the device until its peer map says someone reads
    them (`logs_wanted_until`, set by the coordinator when its logs are read); then they go up
    at once, through the agent's own peer-map poll, release sync and uploader."""
    agent, coord, _ = applying_agent(tmp_path, (1,), lambda m: None)
    coord.peermap = PeerMap(1, HUB, logs_wanted_until=0.0)  # nobody reads them yet
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await wait_for(lambda: web_running(coord), 0.05)
            sync = agent.releases
            assert sync is not None and sync.applier is not None and sync.uploader is not None
            sync.applier.logs.append(LogLine(time.time(), "web", "stdout", "hello"))
            assert not agent.logs_wanted()
            coord.publish(PeerMap(2, HUB, targets=0, logs_wanted_until=time.time() + 300))
            await wait_for(lambda: [x.line for x in coord.logs] == ["hello"], 0.05)
            assert agent.logs_wanted()
            assert sync.uploader.uploads == 1  # none before the map asked
            nursery.cancel_scope.cancel()


async def test_an_app_newly_failed_ships_its_last_lines_once(tmp_path: Path) -> None:
    """Release sync tells the uploader of each app that newly failed, once per failure."""
    releases = Releases(tmp_path / "dev", app="web")
    sync, _ = release_sync(tmp_path, AppCoordinator(), [], FakeEngine(RealClock()), releases)
    shipped: list[str] = []
    states = {"web": "running", "db": "failed"}
    uploader: Any = SimpleNamespace(ship_tail=shipped.append)
    appsync: Any = SimpleNamespace(app_statuses=lambda: [AppStatus(a, st)
                                                         for a, st in states.items()])
    sync._ship_failures(uploader, appsync)
    assert shipped == ["db"]
    states["web"] = "failed"
    sync._ship_failures(uploader, appsync)
    sync._ship_failures(uploader, appsync)  # still failed: not again
    assert shipped == ["db", "web"]
    states["web"] = "running"
    sync._ship_failures(uploader, appsync)
    states["web"] = "failed"  # fails anew
    sync._ship_failures(uploader, appsync)
    assert shipped == ["db", "web", "web"]


def release(version: int) -> VerifiedRelease:
    """A release as the node or the link passes it on (verified where it arrived)."""
    m = ReleaseManifest("cams", "web", version, 0, b"{}", (), ContainerSettings())
    return VerifiedRelease(m, f"m{version}".encode(), "kid")


class _Applier:
    def __init__(self) -> None:
        self.targets: dict[str, tuple[bytes, bool, bool, int, bytes | None]] = {}
        self.gates: dict[str, tuple[bool, Window | None]] = {}  # app -> (hold, window)
        self.progress: dict[str, tuple[int, int]] = {}
        self.cleared: list[str] = []
        self.state = "downloading"
        self.running: int | None = None

    def set_target(self, release: VerifiedRelease, *, ready: bool, force: bool = False,
                   retry: int = 0, pin: bytes | None = None, hold: bool = False,
                   window: Window | None = None) -> bool:
        self.targets[release.manifest.app] = (release.encoded, ready, force, retry, pin)
        self.gates[release.manifest.app] = (hold, window)
        return True

    def clear_target(self, app: str) -> None:
        self.cleared.append(app)
        self.targets.pop(app, None)

    def set_progress(self, app: str, bytes_done: int, bytes_total: int,
                     by_source: Mapping[str, int] | None = None) -> None:
        self.progress[app] = (bytes_done, bytes_total)

    def statuses(self) -> list[AppStatus]:
        done, total = self.progress.get("web", (0, 0))
        return [AppStatus("web", self.state, self.running, 2, done, total, updated_at=1.0)]


class _Node:
    def __init__(self) -> None:
        self.done = 0
        self.fetching = 2  # the version whose blobs the node fetches (its target, or newest)
        self.held: dict[str, VerifiedRelease] = {"web": release(2)}

    def newest(self, fleet: str, app: str) -> VerifiedRelease | None:
        return self.held.get(app)

    def progress(self, fleet: str, app: str) -> tuple[int, int, int, dict[str, int]] | None:
        return (self.fetching, self.done, 100, {"lan": self.done}) if app == "web" else None

    def complete(self, fleet: str, app: str) -> bool:
        return self.done == 100


def test_device_targets_are_validated_once() -> None:
    t = DeviceTarget.from_json({"app": "web", "version": 2, "pin": "0a0b", "force": True,
                                "retry": 3})
    assert t == DeviceTarget("web", 2, b"\x0a\x0b", True, 3)
    assert DeviceTarget.from_json(t.to_json()) == t
    assert DeviceTarget.from_json({"app": "web", "version": 1, "pin": None}) == \
        DeviceTarget("web", 1)  # force and retry absent: an older coordinator
    for bad in ({"app": "x", "version": "2"}, {"version": 1}, {"app": "web", "version": 0},
                {"app": "web", "version": 1, "force": "yes"}, {"app": "web", "version": 1,
                                                               "pin": "zz"},
                {"app": "web", "version": 1, "retry": -1}, {"app": "../x", "version": 1},
                {"app": "web", "version": 1, "pin": "00" * (MAX_SIGNED_PIN_BYTES + 1)}, []):
        with pytest.raises(ControlError):
            DeviceTarget.from_json(bad)


def test_device_targets_carry_hold_and_window() -> None:
    t = DeviceTarget("web", 3, None, True, 0, hold=True, window="02:00-04:00")
    assert t.to_json()["hold"] is True and t.to_json()["window"] == "02:00-04:00"
    assert DeviceTarget.from_json(t.to_json()) == t
    seconds = DeviceTarget.from_json({"app": "web", "version": 3,
                                      "window": "23:59:30-00:00:10"})
    assert (seconds.hold, seconds.window) == (False, "23:59:30-00:00:10")
    # mesh.rollout.Window's canonical text: seconds only where they are not zero
    assert DeviceTarget.from_json({"app": "web", "version": 3,
                                   "window": "02:00:00-04:00:00"}).window == "02:00-04:00"
    # absent or null: no hold, no window (a coordinator from before rollouts)
    assert DeviceTarget.from_json({"app": "web", "version": 3, "hold": None,
                                   "window": None}) == DeviceTarget("web", 3)
    for bad in ({"hold": "true"}, {"hold": 1}, {"window": "2:00-4:00"},
                {"window": "24:00-01:00"}, {"window": "02:60-03:00"}, {"window": "02:00"},
                {"window": 7}, {"window": "02:00-04:00-05:00"}, {"window": "02:00:60-04:00:00"}):
        with pytest.raises(ControlError) as err:
            DeviceTarget.from_json({"app": "web", "version": 3, **bad})
        assert str(err.value).startswith(f"target.{next(iter(bad))}:")


def test_report_timezone_and_the_new_app_states() -> None:
    report = DeviceReport(apps=(AppStatus("web", "waiting-window", 1, 2),
                                AppStatus("cam", "waiting-phase", 1, 2)),
                          timezone="Europe/Berlin")
    assert report.to_json()["timezone"] == "Europe/Berlin"
    assert DeviceReport.from_json(report.to_json()) == report
    assert "timezone" not in DeviceReport().to_json()  # absent when unknown
    assert DeviceReport.from_json({"timezone": "UTC+05:30"}).timezone == "UTC+05:30"
    assert DeviceReport.from_json({"timezone": None}).timezone is None
    for bad in ("", "Europe/Berlin ", "x" * 65, 5, "Europe/Berlin;rm"):
        with pytest.raises(ControlError, match=r"^report\.timezone:"):
            DeviceReport.from_json({"timezone": bad})


def test_appsync_readiness_progress_and_report_pace() -> None:
    applier, node = _Applier(), _Node()
    sync = AppSync(applier, "cams")
    sync.set_targets([DeviceTarget("web", 2, None, True, 3)])
    assert list(sync.targets) == ["web"]
    assert sync.sync(node, 0.0)  # first status: report now
    assert applier.targets["web"] == (b"m2", False, True, 3, None)
    node.done = 10
    assert not sync.sync(node, 1.0)  # bytes moved, but within PROGRESS_REPORT_SPACING
    node.done = 20
    assert sync.sync(node, 2.5)  # bytes moved, 2 s since the last report
    assert applier.progress["web"] == (20, 100)
    node.done = 100
    applier.state = "loading"
    assert sync.sync(node, 2.6)  # a state change is reported at once
    assert applier.targets["web"][1] is True  # ready: every wanted blob held
    # a pin back to v1: the node holds only v2's release, so the agent fetches v1's
    sync.set_targets([DeviceTarget("web", 1, b"pin")])
    assert sync.release("web", 1) is None
    sync.add_release(release(1))
    assert sync.release("web", 1) is not None
    sync.sync(node, 3.0)
    # the node still fetches v2: v1 is not ready until the node works on it (ReleaseSync
    # hands it the target) and holds all of it
    assert applier.targets["web"] == (b"m1", False, False, 0, b"pin")  # the pin goes along
    node.fetching = 1
    sync.sync(node, 3.5)
    assert applier.targets["web"] == (b"m1", True, False, 0, b"pin")
    sync.sync(None, 6.0)  # the mesh node restarting: not ready, whatever the version
    assert applier.targets["web"][:2] == (b"m1", False)
    # a newer target: the pinned-back release is forgotten
    sync.set_targets([DeviceTarget("web", 3)])
    assert sync.release("web", 1) is None
    sync.set_targets([])
    assert applier.cleared == ["web"]
    assert [a.app for a in sync.app_statuses()] == ["web"]


def test_appsync_passes_hold_and_window_on() -> None:
    applier, node = _Applier(), _Node()
    node.done = 100
    sync = AppSync(applier, "cams")
    sync.set_targets([DeviceTarget("web", 2, hold=True)])
    sync.sync(node, 0.0)
    assert applier.targets["web"][:2] == (b"m2", True)  # downloaded ahead: ready
    assert applier.gates["web"] == (True, None)
    # the phase starts with a window: the same release, the hold lifted, the window parsed
    sync.set_targets([DeviceTarget.from_json({"app": "web", "version": 2, "hold": False,
                                              "window": "22:00:30-23:00:00"})])
    sync.sync(node, 1.0)
    assert applier.gates["web"] == (False, Window(22 * 3600 + 30, 23 * 3600))
    applier.state = "waiting-window"
    assert sync.sync(node, 1.1)  # the waiting state is news at once
    sync.set_targets([DeviceTarget("web", 2, force=True, window="22:00-23:00")])
    sync.sync(node, 2.0)
    assert applier.targets["web"][2] is True  # force goes along; the applier weighs it
    assert applier.gates["web"] == (False, Window(22 * 3600, 23 * 3600))


async def test_app_logs_are_kept_while_the_coordinator_is_down_and_bad_lines_dropped(
        tmp_path: Path) -> None:
    releases = Releases(tmp_path / "dev", app="web")
    data = device(tmp_path, releases.key_hex)
    coord = AppCoordinator()
    agent = Agent(data, FakeWireGuard().factory(), coord.factory, log=lambda m: None)
    buffer = LogBuffer(max_lines=100)
    buffer.append(LogLine(1.0, "web", "stdout", "one"))
    buffer.append(LogLine(2.0, "web", "bogus-stream", "refused by the coordinator"))
    buffer.append(LogLine(3.0, "web", "stderr", "two"))
    coord.down = True
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(LogUploader(agent.link, buffer, lambda m: None).run)
            await trio.sleep(3)
            assert coord.logs == [] and len(buffer) == 2  # kept, the bad one counted dropped
            coord.down = False
            await wait_for(lambda: len(coord.logs) == 2, 0.05)
            assert [x.line for x in coord.logs] == ["one", "two"]
            assert len(buffer) == 0
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- release sync


class FakeNode:
    """The gossip node's surface release sync uses (agent/_gossip.py GossipNode), with
    `newest` and `changed` as wip/node adds them: `fire()` stands for a change."""

    def __init__(self, releases: Releases) -> None:
        self.releases = releases
        self.held: dict[str, VerifiedRelease] = {}
        self.offered: list[int] = []
        self.targets: dict[str, int | None] = {}  # app -> what set_target said last
        self.done, self.total = 0, 100
        self.stats = GossipStats()
        self._changed = trio.Event()

    def newest(self, fleet: str, app: str) -> VerifiedRelease | None:
        return self.held.get(app)

    def changed(self) -> trio.Event:
        return self._changed

    def fire(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def progress(self, fleet: str, app: str) -> tuple[int, int, int, dict[str, int]] | None:
        r = self.held.get(app)
        return None if r is None else (r.manifest.version, self.done, self.total,
                                       {"lan": self.done, "wan_peer": 0, "coordinator": 0})

    def complete(self, fleet: str, app: str) -> bool:
        return app in self.held and self.done == self.total

    def offer_manifest(self, signed: bytes) -> bool:
        r = self.releases.verified(signed)
        self.offered.append(r.manifest.version)
        self.held[r.manifest.app] = r
        self.fire()
        return True

    def set_target(self, fleet: str, app: str, target: VerifiedRelease | None) -> None:
        self.targets[app] = None if target is None else target.manifest.version

    def update_peers(self, peers: Mapping[str, str]) -> None:
        pass

    def set_lan(self, names: Iterable[str]) -> None:
        pass


def release_sync(tmp: Path, coord: AppCoordinator, logs: list[str], engine: FakeEngine,
                 releases: Releases, on_apps_changed: Callable[[], None] = lambda: None
                 ) -> tuple[ReleaseSync, FakeNode]:
    data = device(tmp, releases.key_hex)
    identity = data.read_identity()
    link = CoordinatorLink(identity, coord.factory, hub_up=lambda: False, log=logs.append)
    settings = GossipSettings(apply=ApplySettings(engine_factory=lambda: engine))
    sync = ReleaseSync(data.path, identity.enrollment, KEYS[0].public, 51820, link, settings,
                       peers=dict, log=logs.append, rng=random.Random(1),
                       on_apps_changed=on_apps_changed)
    node = FakeNode(releases)
    sync.node = node  # type: ignore[assignment]  # the fake stands in for GossipNode
    return sync, node


async def test_targets_reach_the_node_and_a_pin_back_is_verified_once(tmp_path: Path) -> None:
    releases = Releases(tmp_path / "dev", app="web")
    coord = AppCoordinator()
    for v in (1, 2):
        coord.manifests[("cams", "web", v)] = releases.make(v, QUICK)
    logs: list[str] = []
    sync, node = release_sync(tmp_path, coord, logs, FakeEngine(RealClock()), releases)
    applier = _Applier()
    sync.appsync = AppSync(applier, "cams")
    coord.targets = [{"app": "web", "version": 2, "pin": None, "force": False, "retry": 0},
                     {"app": "bad app", "version": 1}]  # does not validate: left out, logged
    await sync._read_targets(node)  # type: ignore[arg-type]
    await sync._read_targets(node)  # type: ignore[arg-type]
    assert node.offered == [2]  # offered once: then the node holds it
    assert sum("release cams/web v2 from the coordinator" in m for m in logs) == 1
    assert sum("does not validate" in m for m in logs) == 1
    # a pin back to v1: the node keeps only v2, so v1's manifest is fetched and verified here
    coord.targets = [{"app": "web", "version": 1, "pin": "00", "force": False, "retry": 0}]
    coord.manifests[("cams", "web", 1)] = coord.manifests[("cams", "web", 2)]  # wrong one
    await sync._read_targets(node)  # type: ignore[arg-type]
    await sync._read_targets(node)  # type: ignore[arg-type]
    assert sum("web v1: manifest refused" in m for m in logs) == 1
    assert sync.appsync.release("web", 1) is None
    assert node.targets == {"web": 2}  # the node keeps fetching v2 until v1 is verified
    coord.manifests[("cams", "web", 1)] = releases.make(1, QUICK)
    await sync._read_targets(node)  # type: ignore[arg-type]
    assert sync.appsync.release("web", 1) is not None
    assert node.targets == {"web": 1}  # ... and then v1, whatever newer it holds
    sync.appsync.sync(node, 0.0)
    assert applier.targets["web"][0] == coord.manifests[("cams", "web", 1)]
    assert applier.targets["web"][4] == b"\0"  # the pin goes to the applier's admit_release


async def test_release_sync_runs_on_events_not_a_poll(tmp_path: Path) -> None:
    releases = Releases(tmp_path / "dev", app="web")
    coord = AppCoordinator()
    coord.manifests[("cams", "web", 1)] = releases.make(1, QUICK)
    coord.targets = [{"app": "web", "version": 1, "pin": None, "force": False, "retry": 0}]
    engine = FakeEngine(RealClock())
    reports: list[float] = []
    sync, node = release_sync(tmp_path, coord, [], engine, releases,
                              lambda: reports.append(trio.current_time()))
    syncs = 0
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync._apply_loop, ApplySettings(engine_factory=lambda: engine))
            await wait_for(lambda: sync.appsync is not None, 0.01)
            appsync = sync.appsync
            assert appsync is not None
            real_sync = appsync.sync

            def counted(n: Any, now: float) -> bool:
                nonlocal syncs
                syncs += 1
                return real_sync(n, now)

            appsync.sync = counted  # type: ignore[method-assign]
            await sync._read_targets(node)  # type: ignore[arg-type]
            node.done = 100  # every blob held
            node.fire()
            await wait_for(lambda: [c.version for c in engine.running("home-0", "web")] == [1]
                           and appsync.app_statuses()[0].state == "running", 0.05)
            await wait_for(lambda: bool(reports), 0.05)  # the state change was reported
            await trio.sleep(0.5)
            before = syncs
            await trio.sleep(3)  # nothing changes: no sync at all (was: one a second)
            assert syncs == before
            node.done, node.total = 100, 200  # progress from the node: synced at once
            node.fire()
            await wait_for(lambda: appsync.app_statuses()[0].bytes_total == 200, 0.01)
            assert syncs == before + 1
            nursery.cancel_scope.cancel()
