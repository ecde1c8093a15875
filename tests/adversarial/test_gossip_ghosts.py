"""Attack: a fleet device invents members. One push-pull frame of ~175 KB listing 8,000 made-up
node ids used to add them all to the receiver's membership; probes and rumors then went mostly
to ghosts, and push-pull spread them fleet-wide.

Expected: only the members of the peer map (`set_peers`) are ever members; updates about
unknown node ids are dropped and counted, and every probe goes to a real peer.
"""

from __future__ import annotations

import random

from mesh.node import MeshNode, Send
from mesh.rumor import make_verifier
from mesh.wire import (
    MAX_UPDATES,
    Gossip,
    MemberState,
    Ping,
    PingReq,
    PushPull,
    Status,
    decode,
    encode_body,
)
from tests.gossip.helpers import FLEET, KEY
from tests.mesh.test_node import MemStore

PEERS = {"b": "10.0.0.2", "c": "10.0.0.3", "d": "10.0.0.4"}
GHOSTS = 8000


def ghost(i: int, status: Status = Status.ALIVE) -> MemberState:
    return MemberState(f"ghost-{i:05d}-padding-to-make-the-name-long", 0, status,
                       f"fd00::{i:x}")


def test_a_push_pull_of_ghosts_adds_no_member_and_probes_go_to_real_peers() -> None:
    """b sends a push-pull listing 8,000 ghosts (and a gossip frame of 64 more, and a ping-req
    for a ghost): the member list stays the peer map, the ghosts are counted, nothing is sent
    to a ghost, and the reply push-pull lists no ghost."""
    me = MeshNode("a", "10.0.0.1", peers=PEERS,
                  verify=make_verifier(bytes(KEY.verify_key), fleet=FLEET), store=MemStore(),
                  rng=random.Random(1), fleet=FLEET)
    me.start(0.0)
    body = encode_body(PushPull("b", tuple(ghost(i) for i in range(GHOSTS)), False))
    assert len(body) > 170_000
    me.receive(decode(body), "b", 1.0)
    me.receive(decode(encode_body(Gossip("c", tuple(ghost(GHOSTS + i, Status.SUSPECT)
                                                     for i in range(MAX_UPDATES))))), "c", 1.1)
    me.receive(decode(encode_body(PingReq(7, "d", ghost(1).node_id))), "d", 1.2)
    assert sorted(me.membership.live_members()) == sorted(PEERS)
    assert all(me.membership.member(g.node_id) is None for g in (ghost(0), ghost(GHOSTS)))
    assert me.stats.counters["unknown_members"] == GHOSTS + MAX_UPDATES + 1
    sends: list[Send] = []
    t = 1.0
    while t < 120.0:
        me.tick(t)
        sends.extend(a for a in me.drain() if isinstance(a, Send))
        t += 0.1
    assert sends and all(s.dest in PEERS for s in sends)
    assert {s.dest for s in sends if isinstance(s.msg, Ping)} == set(PEERS)
    for s in sends:
        if isinstance(s.msg, PushPull):
            assert {m.node_id for m in s.msg.members} <= set(PEERS) | {"a"}
