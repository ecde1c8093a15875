"""The WAN byte account: exact UTC days from an injected clock, the tunnel's counters (LAN
entries left out, resets), `wireguard` as what the purposes did not explain, persistence, the
link's counting by purpose (fake clients report their bytes like the SDK does: mesh.meter),
and the report's day shape."""

from __future__ import annotations

import calendar
import json
from collections.abc import Sequence
from dataclasses import replace

import pytest
import trio

from agent import CoordinatorLink, DataDir
from agent._account import KEEP_DAYS, AccountError, WanAccount, utc_day
from agent._agent import Agent, Intervals
from agent._uploads import report_shape
from mesh.control import DeviceReport, LogLine, PeerMap, WanBudget
from mesh.meter import count_bytes
from vpn import DeviceStatus, PeerStatus, generate_keypair

from .fakes import HUB, FakeClient, FakeCoordinator, FakeWireGuard, peer, peermap

DAY = 86400.0
# 2026-12-03 00:00:00 UTC
T0 = float(calendar.timegm((2026, 12, 3, 0, 0, 0)))
HUB_KEY = HUB.public_key
WAN_PEER = generate_keypair().public
LAN_PEER = generate_keypair().public


def status(**counts: tuple[int, int]) -> DeviceStatus:
    keys = {"hub": HUB_KEY, "wan": WAN_PEER, "lan": LAN_PEER}
    return DeviceStatus(peers=tuple(PeerStatus(keys[k], rx_bytes=rx, tx_bytes=tx)
                                    for k, (rx, tx) in counts.items()))


def test_utc_day_is_the_calendar_day_in_utc() -> None:
    assert utc_day(T0) == "2026-12-03"
    assert utc_day(T0 - 1) == "2026-12-02"
    assert utc_day(T0 + DAY - 1) == "2026-12-03"


def test_tunnel_counts_growth_of_hub_and_wan_peers_not_lan_nor_the_first_reading() -> None:
    account = WanAccount()
    # the first reading is a baseline: those bytes belong to whoever ran before
    account.observe_tunnel(status(hub=(1000, 2000), wan=(500, 500), lan=(9000, 9000)),
                           HUB_KEY, [LAN_PEER], T0 + 10)
    assert account.days(T0 + 10)["2026-12-03"]["wireguard"] == 0
    account.observe_tunnel(status(hub=(1100, 2050), wan=(600, 500), lan=(90000, 90000)),
                           HUB_KEY, [LAN_PEER], T0 + 11)
    # hub +150, wan peer +100, the LAN neighbour's 162,000 never crossed the WAN
    assert account.days(T0 + 11) == {"2026-12-03": {"wireguard": 250, "control": 0,
                                                    "gossip": 0, "blobs": 0, "logs": 0}}


def test_a_counter_that_goes_down_was_reset_and_counts_from_zero() -> None:
    account = WanAccount()
    account.observe_tunnel(status(hub=(5000, 5000)), HUB_KEY, [], T0)
    account.observe_tunnel(status(hub=(40, 60)), HUB_KEY, [], T0 + 1)  # the daemon restarted
    account.observe_tunnel(status(hub=(140, 60)), HUB_KEY, [], T0 + 2)
    assert account.days(T0 + 2)["2026-12-03"]["wireguard"] == 200


def test_a_peer_moving_off_the_lan_brings_no_history() -> None:
    account = WanAccount()
    account.observe_tunnel(status(lan=(10**9, 10**9)), HUB_KEY, [LAN_PEER], T0)
    account.observe_tunnel(status(lan=(10**9 + 10, 10**9)), HUB_KEY, [], T0 + 1)
    assert account.days(T0 + 1)["2026-12-03"]["wireguard"] == 10


def test_wireguard_is_the_tunnel_minus_in_tunnel_purposes_never_below_zero() -> None:
    account = WanAccount()
    account.observe_tunnel(status(hub=(0, 0)), HUB_KEY, [], T0)
    account.observe_tunnel(status(hub=(3000, 2000)), HUB_KEY, [], T0 + 5)
    account.add("control", 1200, in_tunnel=True, now=T0 + 5)
    account.add("gossip", 800, in_tunnel=True, now=T0 + 5)
    account.add("blobs", 70_000, in_tunnel=False, now=T0 + 5)  # seed on the join URL
    assert account.days(T0 + 5)["2026-12-03"] == {
        "wireguard": 3000, "control": 1200, "gossip": 800, "blobs": 70_000, "logs": 0}
    account.add("logs", 10_000, in_tunnel=True, now=T0 + 6)  # more than the tunnel saw yet
    assert account.days(T0 + 6)["2026-12-03"]["wireguard"] == 0


def test_bytes_go_to_the_utc_day_of_their_time_and_old_days_go() -> None:
    account = WanAccount()
    account.add("control", 5, in_tunnel=False, now=T0 - 1)  # 2026-12-02 23:59:59
    account.add("control", 7, in_tunnel=False, now=T0)
    days = account.days(T0, 2)
    assert list(days) == ["2026-12-03", "2026-12-02"]
    assert days["2026-12-02"]["control"] == 5 and days["2026-12-03"]["control"] == 7
    # a week later the 2nd is gone, the 3rd is the oldest of KEEP_DAYS days kept
    account.add("control", 1, in_tunnel=False, now=T0 + (KEEP_DAYS - 1) * DAY)
    kept = account.days(T0 + (KEEP_DAYS - 1) * DAY)
    assert "2026-12-02" not in kept and kept["2026-12-03"]["control"] == 7
    assert json.dumps(account.to_json()).count("2026-12-02") == 0


def test_today_is_always_named_other_days_only_with_bytes() -> None:
    account = WanAccount()
    assert account.days(T0, 2) == {"2026-12-03": dict.fromkeys(
        ("wireguard", "control", "gossip", "blobs", "logs"), 0)}


def test_saved_account_round_trips_and_bad_files_are_refused() -> None:
    account = WanAccount()
    account.add("logs", 42, in_tunnel=True, now=T0)
    assert account.changed
    again = WanAccount.from_json(json.loads(json.dumps(account.to_json())))
    assert again.days(T0) == account.days(T0)
    for bad in ({}, {"format": 1, "days": []}, {"format": 1, "days": {"2026-13-40": {}}},
                {"format": 1, "days": {"2026-12-03": {"control": -1}}},
                {"format": 1, "days": {"2026-12-03": {"what": 1}}},
                {"format": 1, "days": {f"2026-11-{d:02}": {} for d in range(1, 20)}}):
        with pytest.raises(AccountError):
            WanAccount.from_json(bad)


# --------------------------------------------------------------------------- the link


class MeteredClient(FakeClient):
    """Reports each call's bytes the way ops.client's DeviceClient does."""

    async def report(self, report: DeviceReport) -> None:
        await super().report(report)
        count_bytes(1000)

    async def peermap(self, version: int, wait: float, hold: float = 0.0,
                      quiet: bool = False, held: PeerMap | None = None) -> PeerMap | None:
        try:
            return await super().peermap(version, wait, hold, quiet, held)
        finally:
            count_bytes(700)

    async def upload_logs(self, lines: Sequence[LogLine], dropped: int = 0) -> None:
        await self._gate()
        count_bytes(300 * len(lines))

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        await self._gate()
        count_bytes(65_000)
        return b"x"


async def test_the_link_counts_calls_by_purpose_and_tunnel(enrolled: DataDir) -> None:
    coord = FakeCoordinator()
    hub_up = [True]
    account = WanAccount()

    def factory(url: str, credential: str, cert: bytes) -> MeteredClient:
        return MeteredClient(coord, url, credential, cert)

    link = CoordinatorLink(enrolled.read_identity(), factory, hub_up=lambda: hub_up[0],
                           log=lambda m: None, account=account, clock=lambda: T0 + 60)
    await link.report(DeviceReport())  # through the tunnel
    await link.upload_logs([LogLine(T0, "web", "stdout", "hi")] * 2, 0)
    await link.blob("b" * 64)  # the join URL first: outside the tunnel
    hub_up[0] = False
    await link.report(DeviceReport())  # the join URL
    day = account.days(T0 + 60)["2026-12-03"]
    assert (day["control"], day["logs"], day["blobs"]) == (2000, 600, 65_000)
    # only the first report and the logs went through the tunnel: the tunnel's 10,000 bytes
    # leave 10,000 - 1,000 - 600 for WireGuard itself
    account.observe_tunnel(status(hub=(0, 0)), HUB_KEY, [], T0 + 60)
    account.observe_tunnel(status(hub=(6000, 4000)), HUB_KEY, [], T0 + 61)
    assert account.days(T0 + 61)["2026-12-03"]["wireguard"] == 8400


async def test_a_meter_counts_only_its_own_task(enrolled: DataDir) -> None:
    """Two calls at once on one link: each counts into its own purpose."""
    coord = FakeCoordinator()
    account = WanAccount()

    def factory(url: str, credential: str, cert: bytes) -> MeteredClient:
        return MeteredClient(coord, url, credential, cert)

    link = CoordinatorLink(enrolled.read_identity(), factory, hub_up=lambda: False,
                           log=lambda m: None, account=account, clock=lambda: T0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.report, DeviceReport())
        nursery.start_soon(link.upload_logs, [LogLine(T0, "web", "stdout", "x")], 0)
    day = account.days(T0)["2026-12-03"]
    assert (day["control"], day["logs"]) == (1000, 300)
    count_bytes(5)  # no meter open: counted nowhere
    assert account.days(T0)["2026-12-03"]["control"] == 1000


# --------------------------------------------------------------------------- reports


def test_byte_counts_alone_do_not_make_a_report_a_new_day_does() -> None:
    a = DeviceReport(wan_bytes={"2026-12-03": {"control": 1}})
    b = DeviceReport(wan_bytes={"2026-12-03": {"control": 99}})
    c = DeviceReport(wan_bytes={"2026-12-04": {"control": 0}, "2026-12-03": {"control": 99}})
    assert report_shape(a) == report_shape(b)
    assert report_shape(b) != report_shape(c)


async def test_the_agent_keeps_its_account_across_a_restart(enrolled: DataDir) -> None:
    logs: list[str] = []
    wg = FakeWireGuard()
    coord = FakeCoordinator()
    agent = Agent(enrolled, wg.factory(), coord.factory, lan_endpoints=(), agent_version="1",
                  clock=lambda: T0 + 100, log=logs.append)
    agent.account.add("control", 1234, in_tunnel=False, now=T0 + 100)
    agent.save_account()
    assert not agent.account.changed
    again = Agent(enrolled, wg.factory(), coord.factory, lan_endpoints=(), agent_version="1",
                  clock=lambda: T0 + 200, log=logs.append)
    assert again.report().wan_bytes == {"2026-12-03": {
        "wireguard": 0, "control": 1234, "gossip": 0, "blobs": 0, "logs": 0}}
    # a damaged file: one line, and the count starts again
    enrolled.wan_account_path.write_text('{"format": 1, "days": {"x": 1}}')
    third = Agent(enrolled, wg.factory(), coord.factory, lan_endpoints=(), agent_version="1",
                  clock=lambda: T0 + 300, log=logs.append)
    assert third.report().wan_bytes == {"2026-12-03": dict.fromkeys(
        ("wireguard", "control", "gossip", "blobs", "logs"), 0)}
    assert [line for line in logs if "WAN byte account" in line] == [
        f"ignoring the WAN byte account: {enrolled.wan_account_path}: days: 'x' is not a day"]


async def test_a_new_utc_day_makes_one_report_and_counts_alone_make_none(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    """An idle device 5 minutes before midnight UTC: bytes keep coming (polls, the tunnel) but
    no report goes up for them; after midnight exactly one does, with yesterday's figure."""
    start = trio.current_time()

    def clock() -> float:
        return T0 - 300 + (trio.current_time() - start)

    coord = FakeCoordinator(peermap(1, peer(1)))
    wg = FakeWireGuard(clock=trio.current_time)

    def factory(url: str, credential: str, cert: bytes) -> MeteredClient:
        return MeteredClient(coord, url, credential, cert)

    agent = Agent(enrolled, wg.factory(), factory, lan_endpoints=("192.168.1.2:51820",),
                  agent_version="9.9", clock=clock, log=lambda m: None,
                  intervals=Intervals(lazy_after=0, tune_keepalive=False, poll_wait=60))
    with trio.fail_after(4000):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await trio.sleep(5)
            before = len(coord.reports)
            assert coord.reports[-1][1].wan_bytes is not None
            assert list(coord.reports[-1][1].wan_bytes) == ["2026-12-02"]
            await trio.sleep(290)  # 23:59:59 UTC: many polls counted, nothing reported
            assert len(coord.reports) == before
            assert agent.account.days(clock())["2026-12-02"]["control"] > 0
            await trio.sleep(3000)  # past midnight by ~50 min
            assert len(coord.reports) == before + 1
            sent = coord.reports[-1][1].wan_bytes
            assert sent is not None and list(sent) == ["2026-12-03", "2026-12-02"]
            assert sent["2026-12-02"]["control"] > 0
            nursery.cancel_scope.cancel()


def test_used_sums_the_utc_day_or_month_and_months_survive_a_save() -> None:
    account = WanAccount()
    account.add("control", 100, in_tunnel=False, now=T0 - 3 * DAY)  # 2026-11-30
    account.add("logs", 10, in_tunnel=False, now=T0)  # 2026-12-03
    account.add("blobs", 1, in_tunnel=False, now=T0 + DAY)
    assert account.used(T0 + DAY, "day") == 1
    assert account.used(T0 + DAY, "month") == 11
    assert account.used(T0 - 3 * DAY, "month") == 100
    again = WanAccount.from_json(json.loads(json.dumps(account.to_json())))
    assert again.used(T0 + DAY, "month") == 11
    with pytest.raises(AccountError):
        WanAccount.from_json({**account.to_json(), "months": {"2026-13": {}}})


async def test_past_its_budget_the_agent_defers_logs_and_reports_it(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    """A budget of 10 kB a day: once the account passes it, logs are no longer wanted (the
    failure tail does not ask), the report says `over`, and the next UTC day frees it."""
    now = [T0 + 3600]
    logs: list[str] = []
    coord = FakeCoordinator(peermap(1, peer(1)))
    agent = Agent(enrolled, FakeWireGuard().factory(), coord.factory, lan_endpoints=(),
                  agent_version="1", clock=lambda: now[0], log=logs.append,
                  wan_budget=(10_000, "day"))
    agent.wg.peermap = peermap(1, peer(1))  # no logs_wanted_until: a reader, always
    assert agent.logs_wanted()
    report = agent.report()
    assert report.wan_budget is not None and report.wan_budget.to_json() == {
        "limit": 10_000, "period": "day", "used": 0, "over": False}
    agent.account.add("control", 10_000, in_tunnel=False, now=now[0])
    assert not agent.logs_wanted()
    report = agent.report()
    assert report.wan_budget is not None and report.wan_budget.over
    assert report_shape(report) != report_shape(replace(
        report, wan_budget=WanBudget(10_000, "day", 0)))  # crossing it is news
    now[0] += DAY
    assert agent.logs_wanted()
    assert logs[-2:] == [
        "WAN budget of 10000 bytes a day used up: log shipping deferred (the tail of an app "
        "that fails still goes up)", "WAN budget: a new day, log shipping resumes"]
    assert DeviceReport.from_json(report.to_json()) == report


async def test_a_stopped_agent_has_saved_its_account(enrolled: DataDir,
                                                     autojump_clock: trio.abc.Clock) -> None:
    """The bytes counted since the last periodic save are written when the agent stops."""
    coord = FakeCoordinator(peermap(1, peer(1)))

    def factory(url: str, credential: str, cert: bytes) -> MeteredClient:
        return MeteredClient(coord, url, credential, cert)

    agent = Agent(enrolled, FakeWireGuard(clock=trio.current_time).factory(), factory,
                  lan_endpoints=(), agent_version="1", clock=lambda: T0 + 10,
                  log=lambda m: None, intervals=Intervals(tune_keepalive=False))
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await trio.sleep(30)  # before the first periodic save
            assert not enrolled.wan_account_path.exists()
            nursery.cancel_scope.cancel()
    saved = WanAccount.from_json(json.loads(enrolled.wan_account_path.read_text()))
    assert saved.days(T0 + 10) == agent.account.days(T0 + 10)
    assert saved.days(T0 + 10)["2026-12-03"]["control"] >= 1000  # at least the first report
