"""What a node counts against the peers that misbehave (mesh.node.MeshNode.misbehaving_peers):
per sender and reason, peer-map members only, honest traffic never (docs/security.md,
"Misbehaving peers")."""

from __future__ import annotations

import random

import pytest
from nacl.signing import SigningKey

import mesh.node as node_module
from mesh.control import MISBEHAVIOURS
from mesh.membership import MAX_INCARNATION_STEP
from mesh.node import MeshNode, StoreBlob
from mesh.wire import BlobData, BlobRequest, Gossip, MemberState, Ping, PingReq, Rumor, Status
from tests.gossip.helpers import APP, FLEET, make_blobs, make_manifest
from tests.mesh.test_node import MemStore, node, of, sent, settled

PEERS = {"p": "10.0.0.2", "x": "10.0.0.3", "h": "10.0.0.4"}
FORGER = SigningKey(b"\x07" * 32)  # not the fleet's release key


def hostile_frames(n: MeshNode, sender: str, now: float) -> None:
    """A ghost member, an implausible incarnation about a third party and a forged manifest,
    each once, from `sender`."""
    n.receive(Gossip(sender, (MemberState("zz", 1, Status.ALIVE, "10.9.9.9"),)), sender, now)
    n.receive(Gossip(sender, (MemberState("h", MAX_INCARNATION_STEP + 5, Status.DEAD,
                                          PEERS["h"]),)), sender, now)
    n.receive(Rumor((make_manifest(make_blobs(1, large=0), key=FORGER),)), sender, now)


def corrupt_piece_from_p() -> MeshNode:
    """A node that asked p for a blob's pieces and got a short one back."""
    (blob,) = make_blobs(1, large=1)
    n, acts = settled(PEERS, ["p"], [blob], {"p": [blob]})
    first = [m for dest, m in sent(acts, BlobRequest) if dest == "p"][0]
    n.receive(BlobData(first.req_id, blob.ref.id, 0, blob.frame[:first.length - 1], False),
              "p", 7.0)
    return n


def test_each_misbehaviour_is_counted_against_its_sender() -> None:
    n = corrupt_piece_from_p()
    hostile_frames(n, "x", 8.0)
    assert n.misbehaving_peers() == {
        "p": {"corrupt_blob": 1},
        "x": {"ghost_member": 1, "implausible_incarnation": 1, "forged_manifest": 1}}
    # the defences acted as before: p is banned, x's claims were dropped
    assert n.banned(FLEET, APP) == {"p"}
    assert n.stats.counters["unknown_members"] == 1
    assert n.rumor.stats.invalid == 1
    # counts add up, and a ghost named as a ping-req target counts too
    n.receive(PingReq(9, "x", "zz"), "x", 9.0)
    hostile_frames(n, "x", 9.0)
    assert n.misbehaving_peers()["x"] == {"ghost_member": 3, "implausible_incarnation": 2,
                                          "forged_manifest": 2}


def test_a_whole_blob_that_fails_verification_counts_against_its_source() -> None:
    (blob,) = make_blobs(1, large=0)
    n, acts = settled(PEERS, ["p"], [blob], {"p": [blob]})
    (req,) = [m for dest, m in sent(acts, BlobRequest) if dest == "p"]
    n.receive(BlobData(req.req_id, blob.ref.id, 0, blob.frame, True), "p", 7.0)
    (st,) = of(n.drain(), StoreBlob)
    assert n.misbehaving_peers() == {}  # the pieces were what we asked for
    n.blob_stored(st.download, False, 7.5)  # the driver's hash check failed
    assert n.misbehaving_peers() == {"p": {"corrupt_blob": 1}}


def test_a_relayed_refutation_too_far_ahead_is_dropped_but_accuses_nobody() -> None:
    """h refuted two lies in a row (a step each); p relays its newest "alive" to us, who missed
    the first: dropped as implausible, as before, but p did nothing wrong."""
    n = node(PEERS)
    n.start(0.0)
    n.receive(Gossip("p", (MemberState("h", 2 * MAX_INCARNATION_STEP - 2, Status.ALIVE,
                                       PEERS["h"]),)), "p", 1.0)
    assert n.stats.counters["implausible_incarnation"] == 1
    assert n.misbehaving_peers() == {}


def test_a_claim_about_us_too_far_ahead_counts_against_its_sender() -> None:
    n = node(PEERS)
    n.start(0.0)
    n.receive(Ping(1, "x", (MemberState("me", MAX_INCARNATION_STEP + 1, Status.SUSPECT,
                                        "10.0.0.1"),)), "x", 1.0)
    assert n.misbehaving_peers() == {"x": {"implausible_incarnation": 1}}


def test_senders_outside_the_peer_map_are_not_counted() -> None:
    n = node(PEERS)
    n.start(0.0)
    hostile_frames(n, "stranger", 1.0)
    n.misbehaved("stranger", "bad_frame")
    assert n.stats.counters["unknown_members"] == 1  # dropped all the same
    assert n.misbehaving_peers() == {}


def test_honest_traffic_counts_nothing() -> None:
    (blob,) = make_blobs(1, large=1)
    n, acts = settled(PEERS, ["p"], [blob], {"p": [blob]})
    size = blob.ref.stored_size
    for r in [m for dest, m in sent(acts, BlobRequest) if dest == "p"]:
        n.receive(BlobData(r.req_id, blob.ref.id, r.offset,
                           blob.frame[r.offset:r.offset + r.length],
                           r.offset + r.length == size), "p", 7.0)
    (st,) = of(n.drain(), StoreBlob)
    n.blob_stored(st.download, True, 7.5)
    # its own incarnation far ahead is the member's own word; a step ahead about a third party
    n.receive(Gossip("x", (MemberState("x", 10 * MAX_INCARNATION_STEP, Status.ALIVE,
                                       PEERS["x"]),
                           MemberState("h", 3, Status.SUSPECT, PEERS["h"]))), "x", 8.0)
    n.receive(Rumor((make_manifest([blob]),)), "h", 8.0)  # valid (a duplicate)
    n.receive(PingReq(1, "h", "x"), "h", 8.0)
    assert n.complete(FLEET, APP) and n.stats.counters["implausible_incarnation"] == 0
    assert n.misbehaving_peers() == {}


def test_driver_reports_bad_frames_and_unknown_reasons_are_refused() -> None:
    n = node(PEERS)
    n.misbehaved("h", "bad_frame")
    n.misbehaved("h", "bad_frame")
    assert n.misbehaving_peers() == {"h": {"bad_frame": 2}}
    # a peer first counted for a reason is worth a report at once; more of the same is not
    assert n.misbehaviour_generation == 1
    n.misbehaved("h", "ghost_member")
    assert n.misbehaviour_generation == 2
    with pytest.raises(ValueError, match="not a misbehaviour"):
        n.misbehaved("h", "rude")
    assert set(MISBEHAVIOURS) == {"corrupt_blob", "bad_frame", "ghost_member",
                                  "implausible_incarnation", "forged_manifest"}


def test_counts_are_bounded_by_the_peer_map_and_saturate(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(node_module, "MAX_COUNT", 2)
    n = node(PEERS)
    for _ in range(5):
        n.misbehaved("h", "bad_frame")
    assert n.misbehaving_peers() == {"h": {"bad_frame": 2}}
    n.set_peers({"p": PEERS["p"]}, 1.0)  # h left the peer map: what it did goes with it
    assert n.misbehaving_peers() == {}


def test_no_pinned_release_key_accuses_nobody_of_forging() -> None:
    n = MeshNode("me", "10.0.0.1", peers=PEERS, verify=None, store=MemStore(),
                 rng=random.Random(1))
    n.receive(Rumor((make_manifest(make_blobs(1, large=0)),)), "h", 1.0)
    assert n.rumor.stats.invalid == 1 and n.misbehaving_peers() == {}
