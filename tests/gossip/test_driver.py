"""agent._gossip.GossipNode, the trio driver of mesh.node.MeshNode, on `trio.testing` memory
streams and the autojump clock: the timers it runs from `next_deadline()` fire at exact times."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from agent._blobstore import BlobStore
from agent._gossip import GossipNode, TransportConfig
from mesh.blobsched import SchedConfig, stall_timeout
from mesh.membership import METERED
from mesh.node import STARTUP_SETTLE
from mesh.rumor import METERED_RUMOR, make_verifier
from mesh.wire import Ping, encode

from .helpers import APP, FLEET, KEY, Seed, inline, make_blobs, make_manifest
from .memnet import MemoryNetwork

PEERS = {"a": "10.0.0.1", "b": "10.0.0.2"}


def make(net: MemoryNetwork, tmp: Path, name: str, peers: dict[str, str] | None = None,
         client: object = None, log: Callable[[str], None] | None = None) -> GossipNode:
    peers = PEERS if peers is None else peers
    return GossipNode(name, peers[name], peers=peers,
                      verify=make_verifier(bytes(KEY.verify_key), fleet=FLEET),
                      store=BlobStore(tmp / name / "blobs"), client=client,  # type: ignore[arg-type]
                      fleet=FLEET, rng=random.Random(name), network=net, run_blocking=inline,
                      log=log)


async def test_a_lan_neighbour_fetches_when_the_settle_gate_opens(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    blobs = make_blobs(4, large=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a, b = make(net, tmp_path, "a"), make(net, tmp_path, "b")
            for blob in blobs:
                a.store.put(blob.ref.id, blob.frame, "chunk", ref=blob.ref)
            t0 = trio.current_time()
            await nursery.start(a.run)
            await nursery.start(b.run)
            a.set_lan({"b"})
            b.set_lan({"a"})
            assert a.offer_manifest(make_manifest(blobs))
            while b.newest(FLEET, APP) is None:
                await b.changed().wait()
            assert trio.current_time() - t0 < 2 * 1.0  # within two rumor rounds
            # nothing moves before the gate opens
            await trio.sleep_until(t0 + STARTUP_SETTLE - 0.001)
            assert b.progress(FLEET, APP) == (1, 0, sum(blob.ref.stored_size for blob in blobs),
                                              {"lan": 0, "wan_peer": 0, "coordinator": 0})
            while not b.complete(FLEET, APP):
                await b.changed().wait()
            # the LAN transfer itself takes no virtual time
            assert trio.current_time() - t0 == pytest.approx(STARTUP_SETTLE, abs=0.05)
            total = sum(blob.ref.stored_size for blob in blobs)
            assert b.progress(FLEET, APP) == (1, total, total, {"lan": total, "wan_peer": 0,
                                                                "coordinator": 0})
            assert all(b.store.has(blob.ref.id) for blob in blobs)
            assert b.stats.bytes_lan == total and a.stats.counters["pieces_served"] >= 4
            nursery.cancel_scope.cancel()


async def test_changed_fires_at_a_change_and_is_fresh_after(tmp_path: Path) -> None:
    a = make(MemoryNetwork(), tmp_path, "a")
    event = a.changed()
    assert a.changed() is event and not event.is_set()
    blobs = make_blobs(1, large=0)
    assert a.offer_manifest(make_manifest(blobs))
    assert event.is_set()
    fresh = a.changed()
    assert fresh is not event and not fresh.is_set()
    newest = a.newest(FLEET, APP)
    assert newest is not None and newest.manifest.version == 1
    assert not a.offer_manifest(make_manifest(blobs))  # nothing new: nothing changed
    assert not fresh.is_set()


class HangingSeed:
    """A coordinator blob seed that never answers: records when each request starts and ends."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        self.starts.append(trio.current_time())
        try:
            await trio.sleep_forever()
        finally:
            self.ends.append(trio.current_time())


async def test_a_seed_download_is_cancelled_at_the_schedulers_timeout(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    (blob,) = make_blobs(1, large=0)
    seed = HangingSeed()
    alone = {"a": "10.0.0.1"}
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            a = make(MemoryNetwork(), tmp_path, "a", alone, client=seed)
            t0 = trio.current_time()
            await nursery.start(a.run)
            a.offer_manifest(make_manifest([blob]))
            while len(seed.ends) < 1:
                await trio.sleep(0.5)
            # no byte arrives: a stall, at the configured WAN rate (nothing is measured yet)
            timeout = stall_timeout(SchedConfig().wan_rate)
            assert seed.starts[0] - t0 == pytest.approx(STARTUP_SETTLE, abs=1e-6)
            assert seed.ends[0] - seed.starts[0] == pytest.approx(timeout, abs=1e-6)
            nursery.cancel_scope.cancel()


async def test_strangers_refused_and_garbage_closes_only_its_connection(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    peers = PEERS | {"ghost": "10.0.0.9"}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, b = make(net, tmp_path, "a", peers), make(net, tmp_path, "b", peers)
            told: list[str] = []
            a.on_misbehaviour = lambda: told.append("report now")
            await nursery.start(a.run)
            await nursery.start(b.run)
            stranger = await net.connect(PEERS["a"], a.port, "10.0.0.99")
            assert await stranger.receive_some(10) == b""
            assert a.stats.counters["refused_connections"] == 1
            junk = await net.connect(PEERS["a"], a.port, "10.0.0.9")
            await junk.send_all(b"\xff\xff\xff\xff" + b"x" * 100)
            while await junk.receive_some(10):
                pass
            assert a.stats.counters["wire_errors"] == 1
            # counted against the peer whose connection it was, for the operator to see
            assert a.misbehaving_peers() == {"ghost": {"bad_frame": 1}}
            assert told == ["report now"]  # the agent reports a newly named peer at once
            # a peer's well-formed frames on a connection of its own are taken
            ok = await net.connect(PEERS["a"], a.port, "10.0.0.9")
            await ok.send_all(encode(Ping(1, "ghost")))
            await trio.sleep(1.0)
            assert a.stats.counters["accepted_connections"] >= 2
            assert "b" in a.membership.live_members()
            nursery.cancel_scope.cancel()


async def test_a_peer_sending_garbage_again_and_again_is_one_log_line_a_minute(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """A hostile peer opening connection after connection of garbage (the lab's hostile
    device did, once a second) must not flood the log: the count is what the operator sees."""
    net = MemoryNetwork()
    peers = PEERS | {"ghost": "10.0.0.9"}
    lines: list[str] = []
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            a = make(net, tmp_path, "a", peers, log=lines.append)
            await nursery.start(a.run)
            for _ in range(90):  # one a second for 90 s
                junk = await net.connect(peers["a"], a.port, peers["ghost"])
                await junk.send_all(b"\xff\xff\xff\xff" + b"x" * 100)
                while await junk.receive_some(10):
                    pass
                await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    closing = [x for x in lines if x.startswith("closing the connection from ghost")]
    assert a.misbehaving_peers() == {"ghost": {"bad_frame": 90}}
    assert len(closing) == 2, closing
    assert "more since the last such line" in closing[1]


async def test_reconnects_back_off(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    cfg = TransportConfig()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            a = make(net, tmp_path, "a")  # b never listens
            await nursery.start(a.run)
            await trio.sleep(60.0)
            nursery.cancel_scope.cancel()
    times = [t for t, _, to in net.connects if to == PEERS["b"]]
    assert len(times) >= 5 and a.stats.counters["connect_failures"] == len(times)
    backoff = cfg.backoff_initial
    for earlier, later in zip(times, times[1:], strict=False):
        assert later - earlier >= 0.5 * backoff - 1e-9  # jittered: half to all of the backoff
        backoff = min(cfg.backoff_max, 2 * backoff)
    assert times[-1] - times[-2] >= 0.5 * cfg.backoff_max - 1e-9


async def test_a_stalled_send_fails_at_the_send_timeout(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    net.lockstep.add(PEERS["b"])  # b accepts, never reads: a's first send_all cannot finish
    cfg = TransportConfig()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            (b_listener,) = await net.listen(PEERS["b"], 7946)
            accepted: list[trio.abc.Stream] = []

            async def accept_and_hold() -> None:
                accepted.append(await b_listener.accept())
            nursery.start_soon(accept_and_hold)
            a = make(net, tmp_path, "a")
            await nursery.start(a.run)
            while not net.connects:
                await trio.sleep(0.01)
            t_connect = net.connects[0][0]
            await trio.sleep_until(t_connect + cfg.send_timeout - 1e-6)
            assert a.stats.counters["send_failures"] == 0
            await trio.sleep_until(t_connect + cfg.send_timeout + 1e-6)
            assert a.stats.counters["send_failures"] == 1
            nursery.cancel_scope.cancel()


async def test_a_silent_inbound_connection_closes_after_twice_the_idle_timeout(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    cfg = TransportConfig()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            a = make(net, tmp_path, "a")
            await nursery.start(a.run)
            silent = await net.connect(PEERS["a"], a.port, PEERS["b"])
            t_open = trio.current_time()
            assert await silent.receive_some(10) == b""  # nothing is sent to us on it
            assert trio.current_time() - t_open == pytest.approx(2 * cfg.idle_timeout, abs=1e-6)
            nursery.cancel_scope.cancel()


class CuttingSeed:
    """A seed whose transfer breaks after `cut_after` ranges; records every range asked."""

    def __init__(self, frame: bytes, cut_after: int) -> None:
        self.frame = frame
        self.cut_after = cut_after
        self.ranges: list[tuple[int | None, int | None]] = []

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        await trio.sleep(0.01)
        self.ranges.append((start, end))
        if len(self.ranges) == self.cut_after + 1:
            raise OSError("connection reset by peer")
        return self.frame[start:end]


async def test_a_cut_seed_download_resumes_where_it_stopped(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    (blob,) = make_blobs(1, large=1)  # > 1 MiB: several ranges
    size = blob.ref.stored_size
    seed = CuttingSeed(blob.frame, cut_after=1)
    alone = {"a": "10.0.0.1"}
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            a = make(MemoryNetwork(), tmp_path, "a", alone, client=seed)
            await nursery.start(a.run)
            a.offer_manifest(make_manifest([blob]))
            while not a.complete(FLEET, APP):
                await a.changed().wait()
            nursery.cancel_scope.cancel()
    piece = 1 << 20
    # the first range came, the second broke; the retry asked from the first range's end on
    assert seed.ranges[:3] == [(0, piece), (piece, min(size, 2 * piece)),
                               (piece, min(size, 2 * piece))]
    served = sum(e - s for s, e in seed.ranges if s is not None and e is not None) - (
        seed.ranges[1][1] - seed.ranges[1][0])  # the cut range sent nothing
    assert served == size, seed.ranges  # no byte twice
    assert a.stats.counters["resumed_downloads"] == 1
    assert a.stats.counters["resumed_bytes"] == piece
    assert a.store.has(blob.ref.id)


async def test_a_neighbour_back_from_an_outage_hears_what_we_hold_at_once(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """b vanishes with its tunnel: a's connection to it is not closed, it goes silent, and what
    a sends sits in it (a real socket's buffer, until TCP's retransmission timer — tens of
    seconds after an outage — reaches the returned b and is reset). When b is back and
    connects, a reopens its connection so that b hears at once what its LAN neighbour holds,
    and takes the release from it rather than across the WAN (the lab's returning device
    crossed the WAN after 24 s of hearing nothing)."""
    net = MemoryNetwork()
    v1, v2 = make_blobs(2, seed=1, large=0), make_blobs(3, seed=2, large=1)
    seed = Seed(v1 + v2)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            a = make(net, tmp_path, "a")
            for blob in v1 + v2:
                a.store.put(blob.ref.id, blob.frame, "chunk", ref=blob.ref)
            await nursery.start(a.run)
            first = make(net, tmp_path, "b", client=seed.client("b"))
            b_scope = trio.CancelScope()

            async def run_first(task_status: trio.TaskStatus[None]) -> None:
                with b_scope:
                    await first.run(task_status=task_status)
            await nursery.start(run_first)
            a.set_lan({"b"})
            first.set_lan({"a"})
            a.offer_manifest(make_manifest(v1))
            while not first.complete(FLEET, APP):
                await first.changed().wait()
            # b vanishes mid-life: nothing it had open is closed in a's eyes
            net.cut(PEERS["b"])
            b_scope.cancel()
            while (PEERS["b"], a.port) in net.listeners:
                await trio.sleep(0.01)
            a.offer_manifest(make_manifest(v2, version=2))
            await trio.sleep(60.0)  # a holds b suspect, then dead; its frames to b go nowhere
            assert "b" not in a.membership.live_members()
            t_back = trio.current_time()
            back = make(net, tmp_path / "again", "b", client=seed.client("b"))
            await nursery.start(back.run)
            back.set_lan({"a"})  # LAN discovery; a's own cache still lists b
            back.offer_manifest(make_manifest(v2, version=2))  # from the coordinator
            while not back.complete(FLEET, APP):
                await back.changed().wait()
            assert seed.bytes["b"] == 0  # nothing across the WAN
            total = sum(blob.ref.stored_size for blob in v2)
            assert back.progress(FLEET, APP) == (2, total, total, {
                "lan": total, "wan_peer": 0, "coordinator": 0})
            assert trio.current_time() - t_back == pytest.approx(STARTUP_SETTLE, abs=0.5)
            assert a.stats.counters["reopened_connections"] == 1
            nursery.cancel_scope.cancel()


async def test_idle_metered_gossip_crosses_no_wan_until_the_coordinator_is_unreachable(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """Issue 14: 2 LANs x 2 devices on the agent's default profile (METERED), nothing to
    fetch. While the coordinator answers, not one byte of gossip goes to the other LAN in an
    hour; an outage opens gossip to the whole fleet, and the coordinator's answer closes it."""
    peers = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.1.1", "d": "10.0.1.2"}
    lans = ({"a", "b"}, {"c", "d"})
    lan_of = {peers[name]: i for i, lan in enumerate(lans) for name in lan}
    net = MemoryNetwork()

    def wan_bytes() -> int:
        return sum(n for (src, dst), n in net.sent.items() if lan_of[src] != lan_of[dst])

    with trio.fail_after(3 * 3600):
        async with trio.open_nursery() as nursery:
            nodes = [GossipNode(name, peers[name], peers=peers,
                                verify=make_verifier(bytes(KEY.verify_key), fleet=FLEET),
                                store=BlobStore(tmp_path / name / "blobs"), client=None,  # type: ignore[arg-type]
                                fleet=FLEET, rng=random.Random(name), network=net,
                                run_blocking=inline, membership_config=METERED,
                                rumor_config=METERED_RUMOR) for name in peers]
            for node in nodes:
                await nursery.start(node.run)
                node.set_lan(next(lan for lan in lans if node.name in lan) - {node.name})
            await trio.sleep(3600.0)
            assert wan_bytes() == 0
            assert sum(net.sent.values()) > 4 * 3600 / METERED.probe_interval * 10  # probes
            assert all(sorted(n.membership.live_members()) == sorted(set(peers) - {n.name})
                       for n in nodes)
            for node in nodes:
                node.coordinator_reachable(False)
            await trio.sleep(600.0)
            assert wan_bytes() > 0
            for node in nodes:
                node.coordinator_reachable(True)
            await trio.sleep(METERED.probe_timeout)  # answers to what was on its way
            settled = wan_bytes()
            await trio.sleep(3600.0)
            assert wan_bytes() == settled
            nursery.cancel_scope.cancel()


async def test_frame_bytes_to_peers_off_our_lan_are_counted_for_the_wan_account(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """`wan_bytes` hears of every frame byte to and from a peer that is not a LAN neighbour
    (what `a` sends `b` receives: both count the same), and of none to or from one."""
    net = MemoryNetwork()
    counted: dict[str, list[int]] = {"a": [], "b": [], "c": [], "d": []}
    peers = {"a": "10.0.0.1", "b": "10.0.0.2"}
    lan_peers = {"c": "10.0.0.3", "d": "10.0.0.4"}

    def node(name: str, group: dict[str, str]) -> GossipNode:
        return GossipNode(name, group[name], peers=group,
                          verify=make_verifier(bytes(KEY.verify_key), fleet=FLEET),
                          store=BlobStore(tmp_path / name / "blobs"), client=None,
                          fleet=FLEET, rng=random.Random(name), network=net,
                          run_blocking=inline, wan_bytes=counted[name].append)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            a, b = node("a", peers), node("b", peers)
            c, d = node("c", lan_peers), node("d", lan_peers)
            c.set_lan({"d"})
            d.set_lan({"c"})
            for n in (a, b, c, d):
                await nursery.start(n.run)
            assert a.offer_manifest(make_manifest(make_blobs(1, large=0)))
            assert c.offer_manifest(make_manifest(make_blobs(1, large=0)))
            while b.newest(FLEET, APP) is None or d.newest(FLEET, APP) is None:
                await trio.sleep(0.1)
            await trio.sleep(30)  # membership rounds
            while sum(counted["a"]) != sum(counted["b"]):  # a frame still on its way
                await trio.sleep(0.01)
            assert sum(counted["a"]) > 0
            assert counted["c"] == counted["d"] == []
            nursery.cancel_scope.cancel()
