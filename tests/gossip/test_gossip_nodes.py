"""GossipNodes in one trio process over loopback TCP: membership, manifests, blob exchange,
hostile input, late joiners. Real sockets and a real clock, so every test has a hard bound."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from agent._blobstore import verify_blob
from agent._gossip import GossipNode
from mesh.membership import suspicion_timeout
from mesh.wire import Rumor, Status, encode

from .helpers import (
    FAST_MEMBERSHIP,
    OTHER_KEY,
    Blob,
    Fleet,
    Seed,
    free_port,
    ip_of,
    make_blobs,
    make_manifest,
    wait_for,
)


def fleet(nursery: trio.Nursery, tmp: Path, names: list[str], blobs: list[Blob],
          **kw: object) -> Fleet:
    return Fleet(nursery, tmp, Seed(blobs), free_port(), names, **kw)  # type: ignore[arg-type]


def all_alive(nodes: list[GossipNode]) -> bool:
    names = {n.name for n in nodes}
    for n in nodes:
        for other in names - {n.name}:
            m = n.membership.member(other)
            if m is None or m.status != Status.ALIVE:
                return False
    return True


def check_store(node: GossipNode, blobs: list[Blob]) -> None:
    """Every blob present, byte-identical to the original, and nothing else stored."""
    by_id = {b.ref.id: b for b in blobs}
    assert node.store.ids() == set(by_id), node.name
    for bid in node.store.ids():
        data = node.store.get(bid)
        assert data == by_id[bid].frame
        verify_blob(bid, data, "chunk", by_id[bid].ref)


async def raw_connect(src: str, dst: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((src, 0))
    await sock.connect((dst, port))
    return trio.SocketStream(sock)


async def test_membership_converges_and_a_stopped_node_dies(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            f = fleet(nursery, tmp_path, names, [])
            nodes = [await f.start(f.make(n)) for n in names]
            await wait_for(lambda: all_alive(nodes))
            stopped_at = trio.current_time()
            f.stop("d")
            rest = nodes[:3]
            await wait_for(lambda: all(
                (m := n.membership.member("d")) is not None and m.status == Status.DEAD
                for n in rest))
            took = trio.current_time() - stopped_at
            # Detection (one probe round over 3 members, plus the probe timeout) and the
            # suspicion period at its maximum (no confirmations), with a second of slack.
            cfg = FAST_MEMBERSHIP
            bound = (3 * cfg.probe_interval + cfg.probe_timeout
                     + cfg.suspicion_max_timeout_mult * suspicion_timeout(cfg, 4) + 1.0)
            assert took < bound, (took, bound)
            assert all_alive(rest)
            nursery.cancel_scope.cancel()


async def test_manifest_reaches_all_and_a_forged_one_is_dropped_everywhere(
        tmp_path: Path) -> None:
    names = ["a", "b", "c", "d", "e"]
    blobs = make_blobs(4, large=0)
    good = make_manifest(blobs)
    forged = make_manifest(blobs, version=2, key=OTHER_KEY)
    ghost = ip_of(9)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            f = fleet(nursery, tmp_path, names, blobs, extra_peers={"ghost": ghost})
            nodes = [await f.start(f.make(n)) for n in names]
            assert nodes[0].offer_manifest(good)
            assert not nodes[0].offer_manifest(forged)
            await wait_for(lambda: all(n.rumor.newest("cams", "cam") is not None
                                       and n.rumor.newest("cams", "cam")[0] == 1
                                       for n in nodes))
            # The forged one pushed straight at every node by a peer address: counted, dropped.
            for i, n in enumerate(nodes):
                before = n.rumor.stats.invalid
                stream = await raw_connect(ghost, ip_of(i), f.port)
                await stream.send_all(encode(Rumor((forged,))))
                await wait_for(lambda n=n, b=before: n.rumor.stats.invalid > b)
                await stream.aclose()
            await trio.sleep(0.3)
            for n in nodes:
                assert n.rumor.newest("cams", "cam")[0] == 1
                assert n.rumor.stats.invalid >= 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("sharing", [True, False])
async def test_two_lans_fetch_every_blob_once_per_lan(tmp_path: Path, sharing: bool) -> None:
    lans = [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    names = lans[0] + lans[1]
    blobs = make_blobs(40, large=2)
    total = sum(b.ref.stored_size for b in blobs)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            f = fleet(nursery, tmp_path, names, blobs, peer_sharing=sharing)
            nodes = {n: await f.start(f.make(n)) for n in names}
            for lan in lans:
                for n in lan:
                    nodes[n].set_lan(set(lan) - {n})
            nodes["a0"].offer_manifest(make_manifest(blobs))
            await wait_for(lambda: all(n.complete("cams", "cam") for n in nodes.values()),
                           0.05)
            for n in nodes.values():
                check_store(n, blobs)
                assert n.stats.blobs_done == n.stats.blobs_total == 40
            per_lan = [sum(f.seed.bytes[n] for n in lan) / total for lan in lans]
            if sharing:
                assert all(r <= 1.15 for r in per_lan), per_lan
                assert sum(per_lan) >= 0.99  # every byte entered the mesh once at least
                lan_bytes = sum(n.stats.bytes_lan for n in nodes.values())
                assert lan_bytes >= 0.8 * 4 * total, lan_bytes / total
            else:
                assert all(2.95 <= r <= 3.15 for r in per_lan), per_lan
                assert all(n.stats.bytes_lan == n.stats.bytes_wan == 0 for n in nodes.values())
            nursery.cancel_scope.cancel()


class Rogue(GossipNode):
    def _serve_bytes(self, blob_id: bytes, offset: int, data: bytes) -> bytes:
        return bytes(b ^ 0x5A for b in data[:64]) + data[64:]


async def start_with_rogue(f: Fleet, names: list[str], blobs: list[Blob]
                           ) -> tuple[list[GossipNode], GossipNode]:
    """Start `rogue` (holding every blob, announcing it and the release) and the honest rest
    of `names`, all on one LAN → (honest nodes, rogue)."""
    rogue = f.make("rogue", Rogue)
    for b in blobs:  # the rogue holds everything and announces it
        rogue.store.put(b.ref.id, b.frame, "chunk", ref=b.ref)
    await f.start(rogue)
    honest = [await f.start(f.make(n)) for n in names if n != "rogue"]
    for n in [*honest, rogue]:
        n.set_lan(set(names) - {n.name})
    rogue.offer_manifest(make_manifest(blobs))
    return honest, rogue


async def test_a_rogue_peer_is_banned_and_its_bytes_never_stored(tmp_path: Path) -> None:
    names = ["a", "b", "c", "rogue"]
    blobs = make_blobs(16, large=1)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            f = fleet(nursery, tmp_path, names, blobs)
            honest, _ = await start_with_rogue(f, names, blobs)
            await wait_for(lambda: all(n.complete("cams", "cam") for n in honest), 0.05)
            banned = 0
            for n in honest:
                check_store(n, blobs)
                assert n.store.rejected == n.stats.counters["bad_blobs"]
                banned += "rogue" in n.core.banned("cams", "cam")
            assert banned == len(honest)
            assert sum(n.stats.counters["bad_blobs"] for n in honest) >= len(honest)
            nursery.cancel_scope.cancel()


async def test_strangers_are_refused_and_garbage_closes_only_its_connection(
        tmp_path: Path) -> None:
    names = ["a", "b"]
    ghost = ip_of(9)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            f = fleet(nursery, tmp_path, names, [], extra_peers={"ghost": ghost})
            a, b = [await f.start(f.make(n)) for n in names]
            await wait_for(lambda: all_alive([a, b]))
            # Not a peer's mesh address: closed at once, counted.
            stranger = await raw_connect("127.0.0.99", ip_of(0), f.port)
            with trio.fail_after(2):
                assert await stranger.receive_some(10) == b""
            await stranger.aclose()
            assert a.stats.counters["refused_connections"] == 1
            # A peer's address, garbage bytes: that connection closes, the node goes on.
            for junk in (b"\xff\xff\xff\xff" + b"x" * 100,  # over-limit length prefix
                         b"\x00\x00\x00\x03\xc1\xc1\xc1"):  # a malformed body
                before = a.stats.counters["wire_errors"]
                s = await raw_connect(ghost, ip_of(0), f.port)
                await s.send_all(junk)
                with trio.fail_after(2):
                    while await s.receive_some(10):
                        pass
                await s.aclose()
                assert a.stats.counters["wire_errors"] == before + 1
            # Still a working member: b sees a alive after more probe rounds.
            await trio.sleep(1.0)
            assert all_alive([a, b])
            assert b.membership.member("a").incarnation == a.membership.incarnation
            nursery.cancel_scope.cancel()


async def test_a_late_node_catches_up_from_its_neighbours(tmp_path: Path) -> None:
    names = ["a", "b", "c", "late"]
    blobs = make_blobs(20, large=1)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            f = fleet(nursery, tmp_path, names, blobs)
            early = [await f.start(f.make(n)) for n in names[:3]]
            for n in early:
                n.set_lan({"a", "b", "c"} - {n.name})
            early[0].offer_manifest(make_manifest(blobs))
            await wait_for(lambda: all(n.complete("cams", "cam") for n in early), 0.05)
            late = await f.start(f.make("late"))
            late.set_lan({"a", "b", "c"})
            for n in early:  # LAN discovery sees it now
                n.set_lan(set(names) - {n.name})
            await wait_for(lambda: late.complete("cams", "cam"), 0.05)
            check_store(late, blobs)
            assert f.seed.bytes["late"] == 0
            assert late.stats.bytes_lan == sum(b.ref.stored_size for b in blobs)
            nursery.cancel_scope.cancel()
