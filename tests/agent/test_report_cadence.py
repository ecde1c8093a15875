"""Reports during a rollout (issue 12 item 4): while a release is in flight every device's
report reaches the coordinator at least every 30 s, even when nothing moves; at rest the
heartbeat stays rare; a report whose call hangs is cut at the link's deadline and the next
one still comes within 30 s. On trio's autojump clock against the fake coordinator."""

from __future__ import annotations

import httpx
import pytest
import trio

from agent import CoordinatorLink, DataDir
from agent._link import CALL_TIMEOUT
from agent._uploads import (
    REPORT_CHECK_INTERVAL,
    REPORT_INTERVAL,
    ROLLOUT_REPORT_INTERVAL,
    Reporter,
)
from mesh.control import AppStatus, DeviceReport, PeerPath, SourceBytes
from vpn import generate_keypair

from .fakes import FakeClient, FakeCoordinator

ROLLOUT_BOUND = 30.0  # s: what the operator's rollout view needs (issue 12 item 4)
PEER = generate_keypair().public


class TimedCoordinator(FakeCoordinator):
    """Records when each report arrived; `hang` makes that many report calls never answer."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[float] = []
        self.hang = 0


class TimedClient(FakeClient):
    coord: TimedCoordinator

    async def report(self, report: DeviceReport) -> None:
        if self.coord.hang:
            self.coord.hang -= 1
            await trio.sleep_forever()
        await super().report(report)
        self.coord.arrived.append(trio.current_time())


def _reporter(enrolled: DataDir, coord: TimedCoordinator, state: list[str]) -> Reporter:
    def factory(url: str, credential: str, cert: bytes) -> TimedClient:
        return TimedClient(coord, url, credential, cert)

    link = CoordinatorLink(enrolled.read_identity(), factory, hub_up=lambda: False,
                           log=lambda m: None)

    def make_report() -> DeviceReport:
        return DeviceReport((), "test", (), (AppStatus("web", state[0], running=1, target=2),))

    return Reporter(link, make_report, lambda m: None)


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


@pytest.mark.parametrize("waiting", ["waiting-lock", "waiting-phase", "waiting-window"])
async def test_reports_every_few_seconds_while_a_release_is_in_flight(
        enrolled: DataDir, autojump_clock: trio.abc.Clock, waiting: str) -> None:
    """Five minutes with an app downloading and no progress at all: a report at least every
    30 s (every ROLLOUT_REPORT_INTERVAL); once it waits for its update lock (which may last an
    hour), its rollout phase or its maintenance window, the heartbeat is REPORT_INTERVAL
    again."""
    coord = TimedCoordinator()
    state = ["downloading"]
    async with trio.open_nursery() as nursery:
        await nursery.start(_reporter(enrolled, coord, state).run)
        # (the test wakes half an interval off the reporter's beat: no tie in virtual time)
        await trio.sleep(300 + ROLLOUT_REPORT_INTERVAL / 2)
        during = list(coord.arrived)
        state[0] = waiting  # no work in flight: the release waits for the app, or the rollout
        await trio.sleep(ROLLOUT_REPORT_INTERVAL)  # the report that says so
        settled = len(coord.arrived)
        await trio.sleep(2 * REPORT_INTERVAL)
        nursery.cancel_scope.cancel()
    assert len(during) >= 300 / ROLLOUT_BOUND
    assert max(_gaps(during)) <= ROLLOUT_BOUND
    assert all(abs(g - ROLLOUT_REPORT_INTERVAL) < 1 for g in _gaps(during))
    assert all(abs(g - REPORT_INTERVAL) < 1 for g in _gaps(coord.arrived[settled - 1:]))
    assert len(coord.arrived) - settled == 2


async def test_a_hung_report_is_cut_and_the_next_comes_within_30_s(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    """One report call never answers (a saturated link, a stuck connection): the link cuts
    it at CALL_TIMEOUT and the following report still arrives within 30 s of the last."""
    coord = TimedCoordinator()
    state = ["downloading"]
    async with trio.open_nursery() as nursery:
        await nursery.start(_reporter(enrolled, coord, state).run)
        with trio.fail_after(ROLLOUT_BOUND):
            while not coord.arrived:
                await trio.sleep(0.5)
        coord.hang = 1
        await trio.sleep(120)
        nursery.cancel_scope.cancel()
    assert CALL_TIMEOUT < ROLLOUT_BOUND
    assert max(_gaps(coord.arrived)) <= ROLLOUT_BOUND
    assert max(_gaps(coord.arrived)) > ROLLOUT_REPORT_INTERVAL  # the hang did happen


def rollout_report(peers: int = 9) -> DeviceReport:
    """What a device sends mid-rollout: `peers` direct paths, one app downloading, two LAN
    candidates."""
    now = 1_800_000_000.0
    paths = tuple(PeerPath(generate_keypair().public, "direct", f"203.0.113.{10 + i}:51820",
                           now - 30) for i in range(peers))
    app = AppStatus("web", "downloading", running=41, target=42, bytes_done=31_457_280,
                    bytes_total=94_371_840, by_source=SourceBytes(20_971_520, 6_291_456,
                                                                  4_194_304),
                    failed=(40,), updated_at=now)
    return DeviceReport(("192.168.1.23:51820", "[fd00::23]:51820"), "0.4.0", paths, (app,))


def test_a_rollout_report_stays_small() -> None:
    """The body the SDK sends (httpx's JSON) for a device with a 9-device peer map and one app
    downloading: under 2 KiB (about 15 ms of a 1 Mbit/s link), so it never needs a bulk-sized
    share of the link."""
    body = httpx.Request("POST", "https://127.0.0.1/api/v1/device/state",
                         json=rollout_report().to_json()).content
    assert len(body) < 2048, len(body)


async def test_at_rest_reports_go_up_by_exception(enrolled: DataDir,
                                                  autojump_clock: trio.abc.Clock) -> None:
    """Issue 14: a settled device sends no report for REPORT_INTERVAL (6 h) while nothing
    changes, not even when its direct peers' handshake times and its apps' status times move;
    a change that wakes nobody (here a new LAN address, as a DHCP lease brings) goes up
    within REPORT_CHECK_INTERVAL; a report that could not be delivered is tried again as
    soon."""
    coord = TimedCoordinator()
    lan = ["192.168.1.2:51820"]
    tick = [0.0]

    def make_report() -> DeviceReport:  # the handshake and status times move every call
        tick[0] += 1
        return DeviceReport(tuple(lan), "test", (PeerPath(PEER, "direct", "203.0.113.9:51820",
                                                         tick[0]),),
                            (AppStatus("web", "running", running=2, target=2,
                                       updated_at=tick[0]),))

    def factory(url: str, credential: str, cert: bytes) -> TimedClient:
        return TimedClient(coord, url, credential, cert)  # `coord.down`: unreachable

    link = CoordinatorLink(enrolled.read_identity(), factory, hub_up=lambda: False,
                           log=lambda m: None)
    reporter = Reporter(link, make_report, lambda m: None)
    with trio.fail_after(2 * REPORT_INTERVAL):
        async with trio.open_nursery() as nursery:
            await nursery.start(reporter.run)
            await at_rest(coord, lan)
            nursery.cancel_scope.cancel()
    assert reporter.sent == 4


async def at_rest(coord: TimedCoordinator, lan: list[str]) -> None:
    """The steps of the test above, in order."""
    await trio.sleep(REPORT_INTERVAL - 60)
    assert len(coord.arrived) == 1  # the first report only
    await trio.sleep(120)
    assert len(coord.arrived) == 2  # the safety heartbeat
    assert abs(coord.arrived[1] - coord.arrived[0] - REPORT_INTERVAL) < 1
    lan[0] = "192.168.1.3:51820"  # a new DHCP lease: no event for it
    changed = trio.current_time()
    while len(coord.arrived) < 3:
        await trio.sleep(1)
    assert coord.arrived[2] - changed <= REPORT_CHECK_INTERVAL + 1
    assert coord.reports[-1][1].lan_endpoints == ("192.168.1.3:51820",)
    coord.down = True  # the next change cannot be delivered at first
    lan[0] = "192.168.1.4:51820"
    await trio.sleep(5 * REPORT_CHECK_INTERVAL)
    assert len(coord.arrived) == 3
    coord.down = False
    restored = trio.current_time()
    while len(coord.arrived) < 4:
        await trio.sleep(1)
    assert coord.arrived[3] - restored <= REPORT_CHECK_INTERVAL + 1
    assert coord.reports[-1][1].lan_endpoints == ("192.168.1.4:51820",)
    await trio.sleep(3600)
    assert len(coord.arrived) == 4  # delivered: nothing more to say


async def test_an_agent_that_stops_says_so_in_its_last_report(enrolled: DataDir) -> None:
    """SIGTERM cancels the agent: its last report says `stopping`, so the coordinator shows
    the device offline at once; every report before it did not say so."""
    from agent._agent import Agent, Intervals

    from .fakes import FakeWireGuard, peermap

    coord = FakeCoordinator(peermap(1))
    agent = Agent(enrolled, FakeWireGuard().factory(), coord.factory, lan_endpoints=(),
                  agent_version="1", log=lambda m: None,
                  intervals=Intervals(lazy_after=0, tune_keepalive=False, poll_wait=1))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            while not coord.reports:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    *before, (_, last) = coord.reports
    assert last.stopping and last.agent_version == "1"
    assert before and not any(r.stopping for _, r in before)


async def test_a_goodbye_the_coordinator_cannot_take_is_one_line(enrolled: DataDir) -> None:
    coord = TimedCoordinator()
    coord.down = True
    logs: list[str] = []

    def factory(url: str, credential: str, cert: bytes) -> TimedClient:
        return TimedClient(coord, url, credential, cert)

    link = CoordinatorLink(enrolled.read_identity(), factory, hub_up=lambda: False,
                           log=logs.append)
    reporter = Reporter(link, lambda: DeviceReport((), "test"), logs.append)
    with trio.fail_after(CALL_TIMEOUT * 4):
        assert await reporter.goodbye() is False
    assert not coord.reports
    assert len(logs) == 1, logs
    assert logs[0].startswith("report: could not say the agent stops: cannot reach"), logs
