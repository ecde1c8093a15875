"""Attack: one fleet device claims another is ALIVE/DEAD at incarnation 2^64 - 1 (the largest
the codec accepts). Before the fix the victim refuted with 2^64, its next frame failed in
`msgpack.packb` with OverflowError, which escaped the driver and took the agent down; the peers
kept the victim DEAD at the maximum, so it could never refute.

Expected: incarnations implausibly far ahead of what a node knows are dropped and counted, the
victim's own incarnation never leaves the codec's range, it stays ALIVE at its peers, and a
handler that fails on a frame drops that frame (counted) instead of taking the node down.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import trio

from agent._blobstore import BlobStore
from agent._gossip import GossipNode
from mesh.node import MeshNode, Send
from mesh.rumor import make_verifier
from mesh.wire import (
    MAX_UINT,
    Digest,
    Gossip,
    MemberState,
    Message,
    PushPull,
    Status,
    decode,
    encode,
    encode_body,
)
from tests.gossip.helpers import APP, FLEET, KEY, inline, make_blobs, make_manifest
from tests.gossip.memnet import MemoryNetwork
from tests.mesh.test_node import MemStore

ADDRS = {"v": "10.0.0.1", "p": "10.0.0.2", "x": "10.0.0.3"}
VERIFY = make_verifier(bytes(KEY.verify_key), fleet=FLEET)


def wire(msg: Message) -> Message:
    """Through the real codec, as a peer's frame arrives."""
    return decode(encode_body(msg))


def mesh_node(name: str) -> MeshNode:
    return MeshNode(name, ADDRS[name], peers=ADDRS, verify=VERIFY, store=MemStore(),
                    rng=random.Random(name), fleet=FLEET)


def exchange(nodes: Mapping[str, MeshNode], start: float, end: float, step: float = 0.05,
             attack: Callable[[float], list[tuple[str, Message]]] | None = None) -> None:
    """Tick the nodes every `step` seconds and carry every frame between them through the real
    codec (`encode` raises on a message that cannot be sent). `attack(now)` gives the frames
    the attacker x sends at that time."""
    t = start
    while t <= end:
        for n in nodes.values():
            n.tick(t)
        for dest, msg in attack(t) if attack is not None else []:
            nodes[dest].receive(wire(msg), "x", t)
        for _ in range(20):  # until nothing more is sent at this instant
            moved = False
            for name, n in nodes.items():
                for a in n.drain():
                    if isinstance(a, Send):
                        frame = encode(a.msg)  # the victim's refutation must stay encodable
                        if a.dest in nodes:
                            moved = True
                            nodes[a.dest].receive(decode(frame[4:]), name, t)
            if not moved:
                break
        t += step


def test_an_incarnation_at_the_top_cannot_break_the_victim_or_keep_it_dead() -> None:
    """x tells the victim v and its peer p "v is DEAD at 2^64 - 1", and "v ALIVE at 2^64 - 1"
    too, over and over. v refutes within the codec's range (every frame it sends encodes), the
    implausible claims are counted, and p keeps v ALIVE at an incarnation v can still beat."""
    v, p = mesh_node("v"), mesh_node("p")
    v.start(0.0)
    p.start(0.0)

    def attack(now: float) -> list[tuple[str, Message]]:
        dead = MemberState("v", MAX_UINT, Status.DEAD, ADDRS["v"])
        alive = MemberState("v", MAX_UINT, Status.ALIVE, ADDRS["v"])
        return [("v", Gossip("x", (dead,))), ("p", Gossip("x", (dead,))),
                ("v", Gossip("x", (alive,))), ("p", PushPull("x", (dead,), True))]

    exchange({"v": v, "p": p}, 0.0, 5.0, attack=attack)
    assert v.membership.incarnation < MAX_UINT
    assert v.stats.counters["implausible_incarnation"] > 0
    assert p.stats.counters["implausible_incarnation"] > 0
    exchange({"v": v, "p": p}, 5.05, 40.0)  # the attack stops: v is alive at p
    at_p = p.membership.member("v")
    assert at_p is not None and at_p.status == Status.ALIVE
    assert at_p.incarnation < MAX_UINT


def test_plausible_steps_toward_the_top_are_refuted_and_the_victim_recovers() -> None:
    """x accuses v at v's incarnation + 1 every 50 ms (plausible, so accepted): v refutes every
    time, p ends with v ALIVE."""
    v, p = mesh_node("v"), mesh_node("p")
    v.start(0.0)
    p.start(0.0)

    def attack(now: float) -> list[tuple[str, Message]]:
        accused = MemberState("v", v.membership.incarnation + 1, Status.DEAD, ADDRS["v"])
        return [("v", Gossip("x", (accused,))), ("p", Gossip("x", (accused,)))]

    exchange({"v": v, "p": p}, 0.0, 3.0, attack=attack)
    assert v.membership.incarnation >= 60
    exchange({"v": v, "p": p}, 3.05, 40.0)
    at_p = p.membership.member("v")
    assert at_p is not None and at_p.status == Status.ALIVE
    assert at_p.incarnation == v.membership.incarnation


def driver(net: MemoryNetwork, tmp: Path, name: str) -> GossipNode:
    return GossipNode(name, ADDRS[name], peers=ADDRS, verify=VERIFY,
                      store=BlobStore(tmp / name / "blobs"), client=None, fleet=FLEET,
                      rng=random.Random(name), network=net, run_blocking=inline)


async def test_through_the_driver_the_victim_survives_and_keeps_serving(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """The same frame on a real connection from x to the victim's driver: the victim keeps
    running, stays ALIVE at p, and still gossips a manifest to p."""
    net = MemoryNetwork()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            v, p = driver(net, tmp_path, "v"), driver(net, tmp_path, "p")
            await nursery.start(v.run)
            await nursery.start(p.run)
            x = await net.connect(ADDRS["v"], v.port, ADDRS["x"])
            top = MAX_UINT
            await x.send_all(encode(Gossip("x", (MemberState("v", top, Status.DEAD, ADDRS["v"]),
                                                 MemberState("v", top, Status.ALIVE, ADDRS["v"])))))
            await trio.sleep(10.0)
            assert v.membership.incarnation < MAX_UINT
            assert v.stats.counters["implausible_incarnation"] == 2
            assert v.offer_manifest(make_manifest(make_blobs(1, large=0)))
            while p.newest(FLEET, APP) is None:
                await p.changed().wait()
            at_p = p.membership.member("v")
            assert at_p is not None and at_p.status == Status.ALIVE
            nursery.cancel_scope.cancel()


async def test_a_handler_that_fails_on_a_frame_drops_only_that_frame(
        tmp_path: Path, autojump_clock: trio.abc.Clock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception a frame's handler raises (here: the rumor core fails on x's Digest) drops
    that frame and counts it; the node keeps running and serving p."""
    net = MemoryNetwork()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            v, p = driver(net, tmp_path, "v"), driver(net, tmp_path, "p")
            receive = v.core.rumor.receive

            def failing(msg: Message, sender: str, now: float) -> list[tuple[str, Message]]:
                if sender == "x":
                    raise RuntimeError("a handler bug")
                return receive(msg, sender, now)
            monkeypatch.setattr(v.core.rumor, "receive", failing)
            await nursery.start(v.run)
            await nursery.start(p.run)
            x = await net.connect(ADDRS["v"], v.port, ADDRS["x"])
            await x.send_all(encode(Digest(())))
            await trio.sleep(1.0)
            assert v.stats.counters["frame_errors"] == 1
            assert v.offer_manifest(make_manifest(make_blobs(1, large=0)))
            while p.newest(FLEET, APP) is None:
                await p.changed().wait()
            nursery.cancel_scope.cancel()
