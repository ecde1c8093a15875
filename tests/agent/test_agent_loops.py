"""The agent's loops against a fake coordinator and a fake WireGuard, on trio's autojump clock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from agent import DIRECT_TIMEOUT, Agent, Backoff, DataDir, Intervals
from agent._devfilter import DeviceFilter, DeviceFilterError
from agent._paths import DIRECT_IDLE, NUDGE_AFTER
from agent._wg_sync import DIRECT_POLL_WAIT, HUB_SILENT_AFTER, POLL_WAIT
from mesh.control import PeerMap

from .conftest import URL
from .fakes import HUB, KEYS, FakeCoordinator, FakeWireGuard, host, peer, peermap

A, B = "203.0.113.7:51820", "192.168.1.7:51820"
LAN = ("192.168.1.2:51820",)


@dataclass
class Rig:
    agent: Agent
    wg: FakeWireGuard
    coord: FakeCoordinator
    logs: list[str] = field(default_factory=list)

    def path(self, i: int) -> str:
        return next(p.path for p in self.agent.wg.paths if p.public_key == KEYS[i].public)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.logs)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Until `condition()` holds, looking every 10 ms (virtual time; the caller's deadline)."""
    while not condition():
        await trio.sleep(0.01)


@asynccontextmanager
async def running(data: DataDir, coord: FakeCoordinator, *, hub_reachable: bool = False,
                  reachable: tuple[str, ...] = (), lazy_after: float = 0
                  ) -> AsyncIterator[Rig]:
    """Laziness off unless a test is about it (the fake's peers exchange no keepalives)."""
    wg = FakeWireGuard(clock=trio.current_time)
    wg.reachable |= set(reachable)
    if hub_reachable:
        wg.reachable.add(HUB.endpoint)
    logs: list[str] = []
    agent = Agent(data, wg.factory(), coord.factory, lan_endpoints=LAN, agent_version="9.9",
                  clock=trio.current_time, rng=random.Random(7), log=logs.append,
                  nudge=wg.nudge, intervals=Intervals(lazy_after=lazy_after,
                                                      tune_keepalive=False))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        yield Rig(agent, wg, coord, logs)
        nursery.cancel_scope.cancel()


async def test_map_arrives_punch_succeeds_and_report_says_direct(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(60):
        async with running(enrolled, coord, reachable=(A,)) as rig:
            await trio.sleep(3)
            assert rig.path(1) == "direct"
            assert rig.logged(f"peer home-1: direct via {A} (punched)")
            assert rig.logged("peer map v1: 1 peers")
            assert rig.logged(f"peer home-1: trying {A} (new peer; candidate 1/1)")
            entry = rig.wg.peers[KEYS[1].public]
            assert set(entry.allowed) == {host(peer(1).mesh_ipv4), host(peer(1).mesh_ipv6)}
            assert entry.keepalive == 25
            assert rig.wg.started_with.name == "home-0"
            # the path change was reported at once, not after REPORT_INTERVAL
            last = coord.reports[-1][1]
            assert [(p.public_key, p.path, p.endpoint) for p in last.peers] == [
                (KEYS[1].public, "direct", A)]
            assert last.lan_endpoints == LAN and last.agent_version == "9.9"
            # the cache now holds the map
            assert enrolled.read_peermap() == coord.peermap


async def test_no_handshake_falls_back_to_relay(enrolled: DataDir,
                                                autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A, B)))
    with trio.fail_after(60):
        async with running(enrolled, coord) as rig:
            await trio.sleep(1.5)
            assert rig.path(1) == "none"
            await trio.sleep(2 * DIRECT_TIMEOUT + 1)
            assert rig.path(1) == "relay"
            assert rig.logged("peer home-1: relay via hub (nothing received from 2 candidates")
            assert rig.wg.peers[KEYS[1].public].allowed == []
            hub = rig.wg.peers[HUB.public_key]
            assert host(peer(1).mesh_ipv4) in hub.allowed
            # the direct path starts working: the probe finds it and the addresses move back
            rig.wg.reachable.add(A)
            await trio.sleep(31)
            assert rig.path(1) == "direct"
            assert host(peer(1).mesh_ipv4) not in rig.wg.peers[HUB.public_key].allowed


async def test_steady_state_sends_nothing_and_304s_keep_polling(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    """An idle device for an hour (issue 14: <= 20 KB of WAN per hour): two long polls, both
    304 after POLL_WAIT through the hub tunnel, no report, no UAPI set."""
    coord = FakeCoordinator(peermap(1, peer(1, A), peer(2)))
    with trio.fail_after(4000):
        async with running(enrolled, coord, reachable=(A,), hub_reachable=True) as rig:
            await trio.sleep(5)
            sets, polls = rig.agent.wg.sets_sent, len(coord.polls)
            reconciles, reports = rig.agent.wg.reconciles, len(coord.reports)
            await trio.sleep(3600)
            assert rig.agent.wg.sets_sent == sets  # converged: no UAPI set at all
            assert rig.agent.wg.reconciles >= reconciles + 3590
            # one long poll per POLL_WAIT (30 min) through the tunnel, all 304: the first, on
            # the join URL before the hub session was up, waited DIRECT_POLL_WAIT
            assert len(coord.polls) - polls == 2
            assert all(v == 1 for _, v in coord.polls[polls:])
            assert coord.poll_waits[polls:] == [(HUB.api_url, POLL_WAIT)] * 2
            assert coord.poll_waits[polls - 1] == (URL, DIRECT_POLL_WAIT)
            assert rig.agent.wg.polls_abandoned == 0  # the hub answers its handshakes
            # hub session up: the API goes through the tunnel
            assert coord.polls[-1][0] == HUB.api_url
            assert rig.logged(f"coordinator reached at {HUB.api_url} (the hub tunnel)")
            # reports by exception: nothing changed, nothing reported (REPORT_INTERVAL: 6 h)
            assert len(coord.reports) == reports


async def test_a_change_ends_the_long_poll_at_once(enrolled: DataDir,
                                                   autojump_clock: trio.abc.Clock) -> None:
    """The 30-minute poll is a push channel: a map published 20 minutes into it is in at once."""
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(3000):
        async with running(enrolled, coord, reachable=(A, B), hub_reachable=True) as rig:
            await trio.sleep(200)  # the poll through the tunnel is parked
            assert coord.poll_waits[-1] == (HUB.api_url, POLL_WAIT)
            await trio.sleep(1200)
            coord.publish(peermap(2, peer(1, A), peer(2, B)))
            published = trio.current_time()
            await wait_until(lambda: rig.agent.wg.peermap is not None
                             and rig.agent.wg.peermap.version == 2)
            assert trio.current_time() - published < 1.0


async def test_a_silent_hub_ends_the_long_poll_through_it(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    """The coordinator behind the hub vanishes without closing the long poll (its host or
    link gone): once the hub has answered no handshake for HUB_SILENT_AFTER, the poll is
    abandoned and a new one made on the join URL, which hears the next map: the agent is not
    deaf for the rest of POLL_WAIT."""
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(3000):
        async with running(enrolled, coord, reachable=(A,), hub_reachable=True) as rig:
            await trio.sleep(300)
            assert coord.poll_waits[-1] == (HUB.api_url, POLL_WAIT)
            polls = len(coord.polls)
            coord.silent_urls.add(HUB.api_url)  # the poll in flight hangs on, unanswered
            rig.wg.reachable.discard(HUB.endpoint)  # and the hub answers no handshake
            hub = rig.wg.peers[HUB.public_key]
            assert hub.last_handshake is not None
            lost_at = hub.last_handshake
            await wait_until(lambda: rig.agent.wg.polls_abandoned == 1)
            # abandoned within a reconcile of the hub going silent for HUB_SILENT_AFTER
            assert HUB_SILENT_AFTER < trio.current_time() - lost_at <= HUB_SILENT_AFTER + 2
            assert rig.logged("peer map: the hub answers handshakes not for")
            await trio.sleep(1)
            assert coord.poll_waits[polls:] == [(URL, DIRECT_POLL_WAIT)]
            coord.publish(peermap(2, peer(1, A), peer(2)))
            await wait_until(lambda: rig.agent.wg.peermap is not None
                             and rig.agent.wg.peermap.version == 2)
            assert rig.agent.wg.polls_abandoned == 1


async def test_a_poll_on_the_join_url_is_not_abandoned(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    """Without a hub session the poll goes to the join URL with DIRECT_POLL_WAIT; the hub's
    silence says nothing about that connection."""
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(3000):
        async with running(enrolled, coord, reachable=(A,)) as rig:
            await trio.sleep(1000)
            assert rig.agent.wg.polls_abandoned == 0
            assert {w for _, w in coord.poll_waits[1:]} == {DIRECT_POLL_WAIT}
            assert all(u == URL for u, _ in coord.poll_waits)
            # the map at once, then a poll every DIRECT_POLL_WAIT from t = 0
            assert len(coord.polls) == 2 + 1000 // DIRECT_POLL_WAIT


async def test_new_map_version_is_applied_at_once(enrolled: DataDir,
                                                  autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(60):
        async with running(enrolled, coord, reachable=(A, B)) as rig:
            await trio.sleep(3)
            coord.publish(peermap(2, peer(2, B)))
            await trio.sleep(2)
            assert set(rig.wg.peers) == {HUB.public_key, KEYS[2].public}
            assert rig.path(2) == "direct"
            assert rig.logged("peer map v2: 1 peers (was v1)")
            assert rig.logged("peer home-1: removed from the peer map")


async def test_each_poll_names_the_map_held_so_only_changes_come(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    """The agent's long poll carries the map it holds (the SDK then asks for a delta on it,
    docs/api.md "Incremental peer maps"): none at first contact, then always the newest, also
    the one cached across a restart."""
    first, second = peermap(1, peer(1, A)), peermap(2, peer(2, B))
    coord = FakeCoordinator(first)
    with trio.fail_after(60):
        async with running(enrolled, coord, reachable=(A, B)):
            await trio.sleep(3)
            coord.publish(second)
            await trio.sleep(2)
    assert coord.held[0] is None
    assert [v for _, v in coord.polls] == [m.version if m else 0 for m in coord.held]
    assert coord.held[1] == first and coord.held[-1] == second
    coord = FakeCoordinator(second)
    with trio.fail_after(60):
        async with running(enrolled, coord, reachable=(A, B)):
            await trio.sleep(1)
    assert coord.held[0] == second  # from the data directory's cache


async def test_coordinator_down_keeps_the_cached_mesh(enrolled: DataDir,
                                                      autojump_clock: trio.abc.Clock) -> None:
    enrolled.write_peermap(peermap(4, peer(1, A), relay_ips=("10.250.9.0/24",)))
    coord = FakeCoordinator(peermap(5, peer(1, A), peer(2, B)))
    coord.down = True
    with trio.fail_after(900):
        async with running(enrolled, coord, reachable=(A,)) as rig:
            assert rig.logged("peer map v4 from the cache: 1 peers")
            await trio.sleep(300)
            assert rig.path(1) == "direct"
            assert set(rig.wg.peers) == {HUB.public_key, KEYS[1].public}
            # polls go on, backing off up to 30 s (and no faster than 1 s at first)
            assert 10 <= len(coord.polls) <= 25
            gaps = [line for line in rig.logs if line.startswith("peer map: cannot reach")]
            assert len(gaps) == len(coord.polls)
            delays = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in gaps]
            assert all(0.5 <= d <= 30 for d in delays) and max(delays) > 15
            sets = rig.agent.wg.sets_sent
            await trio.sleep(60)
            assert rig.agent.wg.sets_sent == sets
            # the coordinator comes back: within one backoff step the new map is in
            coord.down = False
            await trio.sleep(31)
            assert rig.logged("peer map: coordinator answers again")
            assert rig.logged("peer map v5: 2 peers (was v4)")
            assert KEYS[2].public in rig.wg.peers
            assert coord.reports


async def test_tunnel_without_answer_falls_back_to_the_join_url(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    coord.down_urls.add(HUB.api_url)
    with trio.fail_after(400):
        async with running(enrolled, coord, hub_reachable=True) as rig:
            await trio.sleep(250)  # past the first long poll (POLL_WAIT) on the join URL
            assert rig.agent.wg.hub_up()
            urls = [u for u, _ in coord.polls]
            assert urls[-2:] == [HUB.api_url, URL]  # tunnel first, then the join URL
            assert coord.reports and all(u == URL for u, _ in coord.reports)
            assert not rig.logged("peer map: cannot reach")  # the fallback answered


async def test_revoked_credential_stops_polling_and_keeps_the_mesh(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(300):
        async with running(enrolled, coord, reachable=(A,)) as rig:
            await trio.sleep(3)
            coord.revoked = True
            coord.publish(peermap(2, peer(1, A)))  # wakes the long poll, which now gets 401
            await trio.sleep(60)
            polls = len(coord.polls)
            await trio.sleep(60)
            assert len(coord.polls) == polls
            revoked = [line for line in rig.logs if "revoked" in line]
            assert len(revoked) == 1 and "HTTP 401" in revoked[0]
            assert rig.agent.link.revoked and rig.path(1) == "direct"
            assert KEYS[1].public in rig.wg.peers


async def test_wireguard_errors_are_logged_once_and_retried(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(60):
        async with running(enrolled, coord, reachable=(A,)) as rig:
            await trio.sleep(2)
            rig.wg.broken = ConnectionRefusedError(111, "Connection refused")
            await trio.sleep(10)
            assert len([ln for ln in rig.logs if ln.startswith("WireGuard:")]) == 1
            rig.wg.broken = None
            await trio.sleep(2)
            assert rig.logged("WireGuard answers again")
            assert rig.path(1) == "direct"


async def test_cancel_leaves_the_backend_and_closes_clients(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(60):
        async with running(enrolled, coord) as rig:
            await trio.sleep(2)
            assert rig.wg.running
        assert not rig.wg.running
        assert coord.clients and all(c.closed for c in coord.clients)


async def test_corrupt_cache_is_ignored_with_one_line(enrolled: DataDir,
                                                     autojump_clock: trio.abc.Clock) -> None:
    enrolled.peermap_path.write_text("{")
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(60):
        async with running(enrolled, coord, reachable=(A,)) as rig:
            await trio.sleep(3)
            assert len([ln for ln in rig.logs if "ignoring the peer map cache" in ln]) == 1
            assert rig.path(1) == "direct"
            assert isinstance(enrolled.read_peermap(), PeerMap)


def test_backoff_is_bounded_and_jittered() -> None:
    b = Backoff(rng=random.Random(3))
    delays = [b.next() for _ in range(12)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(15 <= d <= 30 for d in delays[5:])
    b.reset()
    assert b.next() <= 1.0


@pytest.mark.parametrize("missing", ["key", "enrollment"])
def test_agent_refuses_an_incomplete_data_dir(enrolled: DataDir, missing: str) -> None:
    from agent import DataDirError

    (enrolled.key_path if missing == "key" else enrolled.enrollment_path).unlink()
    with pytest.raises(DataDirError, match="missing"):
        Agent(enrolled, FakeWireGuard().factory(), FakeCoordinator().factory)


async def test_silent_direct_peer_is_nudged_and_a_dead_one_tried_again(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(600):
        async with running(enrolled, coord, reachable=(A,)) as rig:
            await trio.sleep(3)
            assert rig.path(1) == "direct"
            # the fake peer sends nothing of its own (our keepalives suppress its) and renews no
            # handshake: only the answers to the nudges, due after NUDGE_AFTER of silence each,
            # keep it direct, well past DIRECT_IDLE
            await trio.sleep(3 * NUDGE_AFTER + 20)
            assert rig.path(1) == "direct"
            assert 1 <= rig.wg.nudged.count(peer(1).mesh_ipv4) <= 4
            rig.wg.reachable.discard(A)  # the peer moved away
            await trio.sleep(DIRECT_IDLE + 1)
            assert rig.logged("peer home-1: trying 203.0.113.7:51820 (nothing received for "
                              f"{DIRECT_IDLE:.0f} s")


async def test_nudge_failures_are_logged_once(enrolled: DataDir,
                                              autojump_clock: trio.abc.Clock) -> None:
    async def broken(addresses: object) -> None:
        raise OSError("No such device")

    wg = FakeWireGuard(clock=trio.current_time)
    logs: list[str] = []
    agent = Agent(enrolled, wg.factory(), FakeCoordinator(peermap(1, peer(1, A, B))).factory,
                  clock=trio.current_time, log=logs.append, nudge=broken)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await trio.sleep(15)
            nursery.cancel_scope.cancel()
    assert logs.count("cannot nudge peers: No such device") == 1
    assert agent.wg.nudges_sent == 0


def test_only_a_real_interface_gets_the_udp_nudger(enrolled: DataDir) -> None:
    from agent import WireGuardGoDevice

    assert Agent(enrolled, FakeWireGuard().factory(), FakeCoordinator().factory).wg.nudge is None
    real = Agent(enrolled, WireGuardGoDevice("fm9"), FakeCoordinator().factory)
    assert real.wg.nudge is not None  # built, never called here: no datagram leaves this test


async def test_a_lazy_path_woken_by_our_traffic_asks_the_peer_to_punch(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(600):
        async with running(enrolled, coord, reachable=(A,), hub_reachable=True,
                           lazy_after=60) as rig:
            await trio.sleep(3)
            assert rig.path(1) == "direct"
            # the fake's pair exchanges nothing but its handshakes: quiet
            await trio.sleep(70)
            assert rig.logged("peer home-1: lazy, no keepalive (nothing but keepalives for")
            assert rig.wg.peers[KEYS[1].public].keepalive == 0
            assert coord.punches == []
            rig.wg.send(KEYS[1].public, 148)  # a packet for the peer: a handshake starts
            await trio.sleep(2)
            assert rig.logged(f"peer home-1: trying {A} (traffic to it; candidate 1/1)")
            assert coord.punches == ["home-1"]
            assert rig.agent.wg.punches_sent == 1
            await trio.sleep(3)
            assert rig.path(1) == "direct"
            assert rig.wg.peers[KEYS[1].public].keepalive == 25


async def test_a_coordinator_gone_wakes_lazy_paths(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(600):
        async with running(enrolled, coord, reachable=(A,), hub_reachable=True,
                           lazy_after=60) as rig:
            await trio.sleep(80)
            assert rig.wg.peers[KEYS[1].public].keepalive == 0
            coord.down = True
            coord.publish(peermap(2, peer(1, A)))  # ends the parked long poll: it fails now
            await trio.sleep(60)
            assert rig.logged(f"peer home-1: trying {A} (the coordinator does not answer")
            assert rig.wg.peers[KEYS[1].public].keepalive == 25
            assert coord.punches == []


async def test_a_moved_device_tells_the_hub_and_the_coordinator_at_once(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    """The device is carried to another network: within NETWORK_CHECK_INTERVAL of its LAN
    addresses changing, a report with the new candidates goes up and the hub gets one datagram
    through the tunnel (its new public endpoint shows there), long before the next keepalive or
    report check; a network that stays put costs nothing."""
    from agent._agent import NETWORK_CHECK_INTERVAL
    from agent._uploads import REPORT_CHECK_INTERVAL

    coord = FakeCoordinator(peermap(1, peer(1, A)))
    wg = FakeWireGuard(clock=trio.current_time)
    wg.reachable |= {A, HUB.endpoint}
    lan = ["192.168.1.2:51820"]
    logs: list[str] = []
    agent = Agent(enrolled, wg.factory(), coord.factory, lan_endpoints=lambda: list(lan),
                  agent_version="9.9", clock=trio.current_time, rng=random.Random(7),
                  log=logs.append, nudge=wg.nudge,
                  intervals=Intervals(lazy_after=0, tune_keepalive=False))
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await trio.sleep(30)
            reports, nudged, sets = len(coord.reports), list(wg.nudged), len(wg.sets)
            await trio.sleep(10 * NETWORK_CHECK_INTERVAL)  # the same network: nothing
            assert (len(coord.reports), wg.nudged, len(wg.sets)) == (reports, nudged, sets)
            lan[:] = ["10.201.1.100:51820"]
            moved = trio.current_time()
            await wait_until(lambda: len(coord.reports) > reports
                             and coord.reports[-1][1].lan_endpoints == tuple(lan))
            told = trio.current_time() - moved
            assert told <= NETWORK_CHECK_INTERVAL + 2 < REPORT_CHECK_INTERVAL
            await wait_until(lambda: HUB.mesh_ipv4 in wg.nudged[len(nudged):])
            # every peer's endpoint set again, as it was: WireGuard forgets the source address
            # it kept for each (an address this device no longer has)
            again = {p.public_key: str(p.endpoint) for c in wg.sets[sets:] for p in c.peers
                     if p.endpoint is not None}
            assert again == {HUB.public_key: HUB.endpoint, KEYS[1].public: A}, again
            assert any("network changed: LAN addresses 192.168.1.2:51820 -> "
                       "10.201.1.100:51820" in line for line in logs), logs
            nursery.cancel_scope.cancel()


class RecordingFilter(DeviceFilter):
    """The device firewall without nft: records what it was asked; fails while `failing`."""

    def __init__(self) -> None:
        super().__init__("fm0")
        self.applied: list[int] = []
        self.stopped = 0
        self.failing = False

    def apply(self, peermap: PeerMap) -> None:
        if self.failing:
            raise DeviceFilterError("nft: Operation not permitted")
        self.applied.append(peermap.version)

    def stop(self) -> None:
        self.stopped += 1


@pytest.fixture
def thread_clock() -> trio.testing.MockClock:
    """Virtual time that waits for worker threads: it jumps only after 20 ms of real idleness
    (the device firewall runs nft in a thread; an instant jump would pass every deadline while
    the thread works)."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_the_device_firewall_follows_each_map_retries_and_is_removed_on_stop(
        enrolled: DataDir, thread_clock: trio.abc.Clock) -> None:
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    wg = FakeWireGuard(clock=trio.current_time)
    logs: list[str] = []
    agent = Agent(enrolled, wg.factory(), coord.factory, lan_endpoints=LAN, agent_version="9.9",
                  clock=trio.current_time, rng=random.Random(7), log=logs.append,
                  nudge=wg.nudge, intervals=Intervals(tune_keepalive=False))
    assert agent.filter is None  # a fake interface gets no firewall
    fw = agent.filter = RecordingFilter()

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            await trio.sleep(1)

    failed = "cannot apply the device firewall: nft: Operation not permitted; retrying every 30 s"
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        # no deadline around the stop below: the clock may jump while its thread runs
        with trio.fail_after(600):
            await until(lambda: fw.applied[-1:] == [1])
            fw.failing = True
            coord.publish(peermap(2, peer(1, A), peer(2, A)))
            await until(lambda: failed in logs)
            fw.failing = False  # nft works again: the next retry applies the current map
            await until(lambda: fw.applied[-1:] == [2])
        assert "the device firewall is applied again" in logs
        assert logs.count(failed) == 1  # one line however often it retried
        nursery.cancel_scope.cancel()
    assert fw.stopped == 1
