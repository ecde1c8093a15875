"""mesh.node.MeshNode, the gossip protocol without I/O: exact times, no sockets, no clock.

Release lifecycle and the settle gate, early Haves, LAN-first, delta vs chunks, piece
validation (a bad piece is refused, counted and never stored), download timeouts, serving.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import pytest
from nacl.signing import SigningKey

import mesh.node as node_module
from mesh.blobsched import COORDINATOR, SchedConfig, fetch_timeout, stall_timeout
from mesh.membership import METERED
from mesh.node import (
    MAX_SERVING_PER_PEER,
    OUTAGE_SEED_FAILURES,
    REFUSED_WAN,
    STARTUP_SETTLE,
    Action,
    CancelDownload,
    MeshNode,
    Send,
    ServePolicy,
    ServeRange,
    StartDownload,
    StoreBlob,
    wanted_blobs,
)
from mesh.release import (
    Layer,
    LayerDelta,
    PlatformImage,
    ReleaseManifest,
    VerifiedRelease,
    decode_manifest,
    decode_signed_manifest,
    diff_id,
    encode_signed_manifest,
    sign_manifest,
)
from mesh.rumor import METERED_RUMOR, make_verifier
from mesh.wire import (
    MAX_PIECE,
    Ack,
    BlobData,
    BlobError,
    BlobRequest,
    Gossip,
    Have,
    MemberState,
    Ping,
    ReleaseKey,
    Rumor,
    Status,
)
from tests.gossip.helpers import APP, FLEET, KEY, Blob, make_blobs, make_manifest

VERIFY = make_verifier(bytes(KEY.verify_key), fleet=FLEET)
A = TypeVar("A")


class MemStore:
    """The blob index MeshNode reads (agent/_blobstore.py BlobStore's), in memory."""

    def __init__(self, complete: Iterable[str] = ()) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.complete = frozenset(complete)
        self.layers: dict[str, tuple[bytes, ...]] = {}

    def has(self, blob_id: bytes) -> bool:
        return blob_id in self.blobs

    def size(self, blob_id: bytes) -> int | None:
        data = self.blobs.get(blob_id)
        return None if data is None else len(data)

    def complete_layers(self) -> frozenset[str]:
        return self.complete

    def record_layers(self, layers: Mapping[str, Iterable[bytes]]) -> None:
        self.layers.update({k: tuple(v) for k, v in layers.items()})


def node(peers: Mapping[str, str] | None = None, *, store: MemStore | None = None,
         lan: Iterable[str] = (), config: SchedConfig | None = None,
         local_layers: frozenset[str] = frozenset(),
         serve: ServePolicy | None = None) -> MeshNode:
    n = MeshNode("me", "10.0.0.1", peers=peers or {}, verify=VERIFY,
                 store=store if store is not None else MemStore(), rng=random.Random(1),
                 fleet=FLEET, sched_config=config, local_layers=lambda: local_layers,
                 serve=serve)
    n.set_lan(lan, 0.0)
    return n


def of(actions: Sequence[Action], cls: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, cls)]


def sent(actions: Sequence[Action], cls: type[A]) -> list[tuple[str, A]]:
    return [(a.dest, a.msg) for a in of(actions, Send) if isinstance(a.msg, cls)]


KEY1 = ReleaseKey(FLEET, APP, 1)
WAN3 = SchedConfig(max_wan=3)


def test_release_lifecycle_settle_gate_and_replacement() -> None:
    blobs = make_blobs(3, large=0)
    store = MemStore()
    # room for all three seed downloads at once, whatever the default WAN bound (this test is
    # about the lifecycle)
    n = node(store=store, config=WAN3)
    n.start(100.0)
    n.drain()
    gen = n.generation
    assert n.offer_manifest(make_manifest(blobs), 100.0)
    assert not of(n.drain(), StartDownload)
    assert n.generation > gen
    total = sum(b.ref.stored_size for b in blobs)
    assert n.progress(FLEET, APP) == (1, 0, total, {"lan": 0, "wan_peer": 0, "coordinator": 0})
    assert n.releases() == {(FLEET, APP): KEY1} and not n.complete(FLEET, APP)
    assert store.layers  # the layer index is recorded for later delta bases
    # nothing is fetched before the settle gate opens, STARTUP_SETTLE after start
    n.tick(100.0 + STARTUP_SETTLE - 0.001)
    assert not of(n.drain(), StartDownload)
    n.tick(100.0 + STARTUP_SETTLE)
    starts = of(n.drain(), StartDownload)
    assert sorted(s.blob_id for s in starts) == sorted(b.ref.id for b in blobs)
    by_id = {b.ref.id: b for b in blobs}
    for s in starts:
        n.blob_received(s.download, by_id[s.blob_id].frame, 107.0)
    stores = of(n.drain(), StoreBlob)
    assert [(s.blob_id, s.kind, s.ref, s.size, s.source) for s in stores] == [
        (s.blob_id, "chunk", by_id[s.blob_id].ref, by_id[s.blob_id].ref.stored_size,
         COORDINATOR) for s in starts]
    assert n.progress(FLEET, APP) == (1, 0, total, {"lan": 0, "wan_peer": 0,
                                                     "coordinator": total})
    for s in stores:
        store.blobs[s.blob_id] = s.data
        n.blob_stored(s.download, True, 107.5)
    assert n.complete(FLEET, APP) and n.stats.blobs_done == n.stats.blobs_total == 3

    # v2 replaces v1; its in-flight downloads of v1's blobs are cancelled, late results ignored
    more = make_blobs(2, seed=7, large=0)
    assert n.offer_manifest(make_manifest(more, version=2), 110.0)
    starts2 = of(n.drain(), StartDownload)  # settled: fetched at once
    assert len(starts2) == 2 and n.releases() == {(FLEET, APP): ReleaseKey(FLEET, APP, 2)}
    assert not n.offer_manifest(make_manifest(blobs), 111.0)  # older: refused
    assert n.releases()[(FLEET, APP)].version == 2
    assert n.offer_manifest(make_manifest(more[:1], version=3), 112.0)
    acts = n.drain()
    assert {c.download for c in of(acts, CancelDownload)} == {s.download for s in starts2}
    n.blob_received(starts2[1].download, more[1].frame, 113.0)
    assert not of(n.drain(), StoreBlob)


def test_a_target_holds_what_is_fetched_whatever_newer_manifest_circulates() -> None:
    """docs/gossip.md "Targets": a pin back, or a newer release the operator withdrew that a
    peer still gossips, must not displace the device's target (issue 13, item 5)."""
    v7_blobs, v8_blobs = make_blobs(2, seed=7, large=0), make_blobs(2, seed=8, large=0)
    v7, v8 = make_manifest(v7_blobs, version=7), make_manifest(v8_blobs, version=8)
    n = node(config=WAN3)
    n.start(0.0)
    assert n.offer_manifest(v8, 0.0)
    n.tick(STARTUP_SETTLE)
    first = of(n.drain(), StartDownload)
    assert {s.blob_id for s in first} == {b.ref.id for b in v8_blobs}  # no target: newest
    # the target is v7: v8's downloads stop, v7's start
    n.set_target(FLEET, APP, VERIFY(v7), 10.0)
    acts = n.drain()
    assert {c.download for c in of(acts, CancelDownload)} == {s.download for s in first}
    assert {s.blob_id for s in of(acts, StartDownload)} == {b.ref.id for b in v7_blobs}
    assert n.releases() == {(FLEET, APP): ReleaseKey(FLEET, APP, 7)}
    # a newer manifest arriving now is kept and gossiped, not fetched
    v9 = make_manifest(make_blobs(1, seed=9, large=0), version=9)
    assert n.offer_manifest(v9, 11.0)
    assert not of(n.drain(), StartDownload)
    assert n.releases()[(FLEET, APP)].version == 7
    newest = n.newest(FLEET, APP)
    assert newest is not None and newest.manifest.version == 9
    # no target any more: the newest seen is fetched again
    n.set_target(FLEET, APP, None, 12.0)
    assert n.releases()[(FLEET, APP)].version == 9
    assert of(n.drain(), StartDownload)
    with pytest.raises(ValueError):
        n.set_target(FLEET, "other-app", VERIFY(v7), 13.0)


def test_verified_once_and_handed_on() -> None:
    calls: list[bytes] = []

    def verify(data: bytes) -> VerifiedRelease:
        calls.append(data)
        return VERIFY(data)

    encoded = make_manifest(make_blobs(2, large=0))
    n = MeshNode("me", "10.0.0.1", peers={"p": "10.0.0.2"}, verify=verify, store=MemStore(),
                 rng=random.Random(1), fleet=FLEET)
    n.start(0.0)
    n.receive(Rumor((encoded,)), "p", 1.0)
    assert len(calls) == 1  # decoded and checked once; the release is built from that object
    release = n.newest(FLEET, APP)
    assert release is not None and release.encoded == encoded and release.manifest.version == 1
    assert n.releases() == {(FLEET, APP): KEY1}
    forged = make_manifest(make_blobs(2, large=0), version=2, key=SigningKey(b"\x33" * 32))
    assert not n.offer_manifest(forged, 2.0)
    assert n.rumor.stats.invalid == 1 and n.newest(FLEET, APP) == release


def test_no_release_key_accepts_nothing_and_says_so_once() -> None:
    logs: list[str] = []
    n = MeshNode("me", "10.0.0.1", peers={}, verify=None, store=MemStore(),
                 rng=random.Random(1), log=logs.append)
    blobs = make_blobs(1, large=0)
    assert not n.offer_manifest(make_manifest(blobs), 0.0)
    assert not n.offer_manifest(make_manifest(blobs, version=2), 0.0)
    assert [m for m in logs if "no release key" in m] == [
        "no release key pinned for this fleet: manifests are not accepted"]


def settled(peers: Mapping[str, str], lan: Iterable[str], blobs: Sequence[Blob],
            haves: Mapping[str, Sequence[Blob]], *, early: bool = False,
            store: MemStore | None = None) -> tuple[MeshNode, list[Action]]:
    """A node told the manifest at 1.0 and the peers' Haves at 2.0 (before it with `early`);
    the actions of the settle tick at STARTUP_SETTLE."""
    n = node(peers, lan=lan, store=store)
    n.start(0.0)
    if early:
        for p, held in haves.items():
            n.receive(Have(KEY1, tuple(b.ref.id for b in held)), p, 0.5)
    n.offer_manifest(make_manifest(blobs), 1.0)
    if not early:
        for p, held in haves.items():
            n.receive(Have(KEY1, tuple(b.ref.id for b in held)), p, 2.0)
    n.drain()
    n.tick(STARTUP_SETTLE)
    return n, n.drain()


def test_lan_first() -> None:
    blobs = make_blobs(1, large=0)
    peers = {"lan1": "10.0.0.2", "wan1": "10.0.1.2"}
    _, acts = settled(peers, ["lan1"], blobs, {"lan1": blobs, "wan1": blobs})
    assert [(d, m.blob_id) for d, m in sent(acts, BlobRequest)] == [("lan1", blobs[0].ref.id)]
    assert not of(acts, StartDownload)


def test_early_haves_are_buffered_and_used() -> None:
    blobs = make_blobs(4, large=0)
    peers = {"lan1": "10.0.0.2"}
    n, acts = settled(peers, ["lan1"], blobs, {"lan1": blobs}, early=True)
    # the Have came before the manifest: every blob comes from the LAN, none from the seed
    assert sorted(m.blob_id for _, m in sent(acts, BlobRequest)) == sorted(
        b.ref.id for b in blobs)
    assert not of(acts, StartDownload)
    # Haves of an older version, or another fleet, are not buffered
    n.receive(Have(ReleaseKey(FLEET, APP, 0), (blobs[0].ref.id,)), "lan1", 7.0)
    n.receive(Have(ReleaseKey("other", APP, 9), (blobs[0].ref.id,)), "lan1", 7.0)
    assert n.drain() == []


def test_early_haves_are_bounded() -> None:
    n = node({"p": "10.0.0.2"})
    n.start(0.0)
    for v in range(1, 18):  # MAX_PENDING_RELEASES = 16 releases buffered
        n.receive(Have(ReleaseKey(FLEET, APP, v), (b"\x01" * 32,)), "p", 1.0)
    assert n.stats.counters["pending_haves_dropped"] == 1


def delta_manifest(base: str, blobs: Sequence[Blob], delta_id: bytes, delta_size: int) -> bytes:
    layer = Layer("sha256:" + "ab" * 32, sum(b.ref.size for b in blobs),
                  tuple(b.ref for b in blobs), (LayerDelta(base, delta_id, delta_size, "HDIFF"),))
    m = ReleaseManifest(FLEET, APP, 1, 1_700_000_000, b'{"rootfs":{}}', (layer,))
    return encode_signed_manifest(sign_manifest(m, KEY))


def test_delta_when_its_base_is_complete_chunks_otherwise() -> None:
    blobs = make_blobs(3, large=0)
    base, delta_id = "sha256:" + "cd" * 32, b"\x42" * 32
    for complete, local in ((frozenset({base}), frozenset()), (frozenset(), frozenset({base}))):
        n = node(store=MemStore(complete), local_layers=local)
        n.start(0.0)
        n.offer_manifest(delta_manifest(base, blobs, delta_id, 5000), 0.0)
        n.tick(STARTUP_SETTLE)
        starts = of(n.drain(), StartDownload)
        assert [(s.blob_id, s.size) for s in starts] == [(delta_id, 5000)]
        n.blob_received(starts[0].download, b"d" * 5000, 7.0)
        (st,) = of(n.drain(), StoreBlob)
        assert (st.kind, st.ref, st.size) == ("delta", None, 5000)
    n = node(config=WAN3)  # no base: the chunks (all three at once)
    n.start(0.0)
    n.offer_manifest(delta_manifest(base, blobs, delta_id, 5000), 0.0)
    n.tick(STARTUP_SETTLE)
    assert sorted(s.blob_id for s in of(n.drain(), StartDownload)) == sorted(
        b.ref.id for b in blobs)


def test_a_layer_the_engine_has_is_not_fetched_at_all() -> None:
    """An agent release built on the running agent's image: its layers are in the engine (the
    agent exports them from there), so only the new layers travel, and the release is complete
    without them."""
    blobs = make_blobs(3, large=0)
    m = decode_signed_manifest(delta_manifest("sha256:" + "cd" * 32, blobs, b"\x42" * 32, 5000))
    manifest = decode_manifest(m.manifest)
    own = manifest.layers[0].diff_id
    assert wanted_blobs(manifest, frozenset({own}), lambda _: False) == {}
    n = node(local_layers=frozenset({own}))
    n.start(0.0)
    n.offer_manifest(delta_manifest("sha256:" + "cd" * 32, blobs, b"\x42" * 32, 5000), 0.0)
    n.tick(STARTUP_SETTLE)
    assert of(n.drain(), StartDownload) == [] and n.complete(FLEET, APP)


def test_pieces_assembled_from_a_peer_and_counted() -> None:
    (blob,) = make_blobs(1, large=1)
    size = blob.ref.stored_size
    n, acts = settled({"lan1": "10.0.0.2"}, ["lan1"], [blob], {"lan1": [blob]})
    reqs = [m for _, m in sent(acts, BlobRequest)]
    assert [(r.offset, r.length) for r in reqs] == [
        (o, min(MAX_PIECE, size - o)) for o in range(0, size, MAX_PIECE)]
    for r in reversed(reqs):  # any order
        n.receive(BlobData(r.req_id, blob.ref.id, r.offset,
                           blob.frame[r.offset:r.offset + r.length],
                           r.offset + r.length == size), "lan1", 7.0)
    (st,) = of(n.drain(), StoreBlob)
    assert st.data == blob.frame and st.source == "lan1"
    progress = n.progress(FLEET, APP)
    assert n.stats.bytes_lan == size and progress is not None and progress[3]["lan"] == size


def test_a_bad_piece_is_refused_counted_and_never_stored() -> None:
    (blob,) = make_blobs(1, large=1)
    n, acts = settled({"lan1": "10.0.0.2", "lan2": "10.0.0.3"}, ["lan1", "lan2"], [blob],
                      {"lan1": [blob]})
    first, second = [m for _, m in sent(acts, BlobRequest)][:2]
    # an answer from a peer we did not ask is not used
    n.receive(BlobData(first.req_id, blob.ref.id, 0, blob.frame[:first.length], False),
              "lan2", 7.0)
    assert n.stats.counters["unsolicited_blob_answers"] == 1
    # the asked peer answers with a shorter piece than requested
    n.receive(BlobData(first.req_id, blob.ref.id, 0, blob.frame[:first.length - 1], False),
              "lan1", 7.0)
    acts = n.drain()
    assert not of(acts, StoreBlob)
    assert n.stats.counters["bad_pieces"] == 1 and n.stats.counters["bad_blobs"] == 1
    assert n.banned(FLEET, APP) == {"lan1"} and n.stats.bytes_lan == 0
    # its other pieces, still in flight, are not used either
    n.receive(BlobData(second.req_id, blob.ref.id, second.offset,
                       blob.frame[second.offset:second.offset + second.length], False),
              "lan1", 7.1)
    assert not of(n.drain(), StoreBlob)
    assert n.stats.counters["unsolicited_blob_answers"] == 2


def test_wrong_blob_offset_or_last_flag_is_a_bad_piece() -> None:
    (blob,) = make_blobs(1, large=1)
    for bad in ("blob", "offset", "last"):
        n, acts = settled({"lan1": "10.0.0.2"}, ["lan1"], [blob], {"lan1": [blob]})
        r = [m for _, m in sent(acts, BlobRequest)][0]
        n.receive(BlobData(r.req_id, b"\x00" * 32 if bad == "blob" else blob.ref.id,
                           r.offset + (1 if bad == "offset" else 0),
                           blob.frame[:r.length], bad == "last"), "lan1", 7.0)
        assert not of(n.drain(), StoreBlob)
        assert n.stats.counters["bad_pieces"] == 1, bad
        assert n.banned(FLEET, APP) == {"lan1"}


def test_a_blob_error_or_an_unsent_request_fails_the_download_without_a_ban() -> None:
    (blob,) = make_blobs(1, large=1)
    for how in ("error", "unsent", "down"):
        n, acts = settled({"lan1": "10.0.0.2"}, ["lan1"], [blob], {"lan1": [blob]})
        dest, r = sent(acts, BlobRequest)[0]
        if how == "error":
            n.receive(BlobError(r.req_id, "busy"), "lan1", 7.0)
            assert n.stats.counters["blob_errors_received"] == 1
        elif how == "unsent":
            n.send_failed(dest, r, 7.0)
        else:
            n.peer_down("lan1", 7.0)
        n.drain()
        assert n.banned(FLEET, APP) == frozenset()
        # the download is gone: a late answer is not used
        n.receive(BlobData(r.req_id, blob.ref.id, 0, blob.frame[:r.length], False), "lan1",
                  7.5)
        assert n.stats.counters["unsolicited_blob_answers"] == 1, how


@pytest.mark.parametrize("follow_rates", [True, False])
def test_download_timeout_exact(follow_rates: bool) -> None:
    (blob,) = make_blobs(1, large=0)
    cfg = SchedConfig(follow_rates=follow_rates)
    n = node(config=cfg)
    n.start(0.0)
    n.offer_manifest(make_manifest([blob]), 0.0)
    n.tick(STARTUP_SETTLE)
    (start,) = of(n.drain(), StartDownload)
    # a stall (no byte) at the configured WAN rate, or the static whole-transfer timeout
    limit = STARTUP_SETTLE + (stall_timeout(cfg.wan_rate) if follow_rates
                              else fetch_timeout(blob.ref.stored_size, True, cfg))
    deadline = n.next_deadline()
    assert deadline is not None and deadline <= limit
    n.tick(limit - 0.001)
    assert not of(n.drain(), CancelDownload)
    n.tick(limit)
    assert of(n.drain(), CancelDownload) == [CancelDownload(start.download)]
    n.blob_received(start.download, blob.frame, limit + 1)  # too late: ignored
    assert not of(n.drain(), StoreBlob)


def test_serving_ranges_of_held_blobs() -> None:
    store = MemStore()
    store.blobs[b"\x07" * 32] = b"x" * 1000
    # p is a LAN neighbour: a peer on another LAN is not served by default (metered uplink;
    # test_serve_policy_* below)
    n = node({"p": "10.0.0.2"}, store=store, lan=["p"])
    n.receive(BlobRequest(1, b"\x07" * 32, 100, 50), "p", 0.0)
    n.receive(BlobRequest(2, b"\x08" * 32, 0, 50), "p", 0.0)
    n.receive(BlobRequest(3, b"\x07" * 32, 1001, 50), "p", 0.0)
    n.receive(BlobRequest(4, b"\x07" * 32, 0, 50), "stranger", 0.0)
    acts = n.drain()
    assert of(acts, ServeRange) == [ServeRange("p", 1, b"\x07" * 32, 100, 50, 1000)]
    assert [(d, m) for d, m in sent(acts, BlobError)] == [
        ("p", BlobError(2, "not held")), ("p", BlobError(3, "range"))]
    for i in range(MAX_SERVING_PER_PEER - 1):
        n.receive(BlobRequest(10 + i, b"\x07" * 32, 0, 10), "p", 1.0)
    n.receive(BlobRequest(99, b"\x07" * 32, 0, 10), "p", 1.0)
    assert sent(n.drain(), BlobError)[-1] == ("p", BlobError(99, "busy"))
    assert n.stats.counters["serve_busy"] == 1
    n.served("p")
    n.receive(BlobRequest(100, b"\x07" * 32, 0, 10), "p", 1.0)
    assert of(n.drain(), ServeRange)


def test_a_connecting_peer_gets_our_haves() -> None:
    blobs = make_blobs(2, large=0)
    store = MemStore()
    store.blobs[blobs[0].ref.id] = blobs[0].frame
    n = node({"p": "10.0.0.2", "wan": "10.0.1.2"}, store=store, lan=["p"])
    n.start(0.0)
    n.offer_manifest(make_manifest(blobs), 0.0)
    n.drain()
    assert n.have_messages("p") == [Have(KEY1, (blobs[0].ref.id,))]
    n.connected("p")
    assert sent(n.drain(), Have) == [("p", Have(KEY1, (blobs[0].ref.id,)))]
    # a peer on another LAN is offered nothing by a metered node (the default)
    assert n.have_messages("wan") == []
    n.connected("wan")
    assert sent(n.drain(), Have) == []


def test_a_blob_being_stored_survives_its_sources_connection() -> None:
    (blob,) = make_blobs(1, large=0)
    n, acts = settled({"lan1": "10.0.0.2"}, ["lan1"], [blob], {"lan1": [blob]})
    ((_, r),) = sent(acts, BlobRequest)
    n.receive(BlobData(r.req_id, blob.ref.id, 0, blob.frame, True), "lan1", 7.0)
    (st,) = of(n.drain(), StoreBlob)
    n.peer_down("lan1", 7.1)  # the bytes are all here: the store step goes on
    n.tick(7.5)
    n.blob_stored(st.download, True, 7.6)
    assert n.complete(FLEET, APP) and n.banned(FLEET, APP) == frozenset()


# ---------------------------------------------------------------- cross-LAN serving policy

def holder(serve: ServePolicy | None = None) -> tuple[MeshNode, list[Blob]]:
    """A node that holds 2 of a release's 3 blobs, a LAN neighbour "lan1" and a peer "wan1"
    on another LAN, both live members."""
    blobs = make_blobs(3, large=0)
    store = MemStore()
    for b in blobs[:2]:
        store.blobs[b.ref.id] = b.frame
    n = node({"lan1": "10.0.0.2", "wan1": "10.0.1.2"}, store=store, lan=["lan1"],
             serve=serve)
    n.start(0.0)
    for p in ("lan1", "wan1"):  # both answer a probe: live members
        n.membership.seed([(p, "")])
    n.offer_manifest(make_manifest(blobs), 0.0)
    n.drain()
    return n, blobs


def test_serve_policy_metered_default_serves_and_announces_only_to_the_lan() -> None:
    n, blobs = holder()
    b0 = blobs[0].ref.id
    n.receive(BlobRequest(1, b0, 0, 100), "lan1", 1.0)
    n.receive(BlobRequest(2, b0, 0, 100), "wan1", 1.0)
    acts = n.drain()
    assert [a.peer for a in of(acts, ServeRange)] == ["lan1"]
    assert sent(acts, BlobError) == [("wan1", BlobError(2, REFUSED_WAN))]
    assert n.stats.counters["serve_refused_wan"] == 1 and n.stats.bytes_served_wan == 0
    assert n.have_messages("wan1") == [] and n.have_messages("lan1")
    assert not n.serves_wan()


def test_serve_policy_seed_ratio_bounds_the_bytes_served_per_release() -> None:
    n, blobs = holder(ServePolicy(seed_ratio=0.5))
    held = sum(b.ref.stored_size for b in blobs[:2])
    allowance = 0.5 * held
    b0 = blobs[0].ref.id
    assert n.have_messages("wan1")  # offered while the allowance lasts
    served, i = [], 0
    while True:  # 1000-byte ranges until refused
        i += 1
        n.receive(BlobRequest(i, b0, 0, 1000), "wan1", 1.0)
        n.served("wan1")
        acts = n.drain()
        if not of(acts, ServeRange):
            break
        served.append(i)
    assert len(served) == int(allowance // 1000)  # every byte within R x held, no more
    assert sent(acts, BlobError) == [("wan1", BlobError(i, REFUSED_WAN))]
    assert n.stats.bytes_served_wan == 1000 * len(served)
    assert n.have_messages("wan1")  # what is left is still offered...
    # ...and a request past the blob's end counts only what it gets: the rest of the allowance
    rest = int(allowance) - 1000 * len(served)
    size0 = blobs[0].ref.stored_size
    n.receive(BlobRequest(500, b0, size0 - rest, 5000), "wan1", 1.0)
    assert [a.req_id for a in of(n.drain(), ServeRange)] == [500]
    assert n.stats.bytes_served_wan == int(allowance)
    assert n.have_messages("wan1") == [] and not n.serves_wan()  # spent: no more offers
    n.receive(BlobRequest(999, b0, 0, 100), "lan1", 1.0)  # the LAN is never counted
    assert [a.req_id for a in of(n.drain(), ServeRange)] == [999]


def test_serve_policy_unmetered_serves_other_lans_without_bound() -> None:
    n, blobs = holder(ServePolicy(unmetered=True))
    for i in range(20):
        n.receive(BlobRequest(i, blobs[0].ref.id, 0, 100), "wan1", 1.0)
        n.served("wan1")
    assert len(of(n.drain(), ServeRange)) == 20 and n.have_messages("wan1")


def test_a_coordinator_outage_opens_a_metered_uplink_until_the_seed_answers() -> None:
    n, blobs = holder()
    n.tick(STARTUP_SETTLE)
    starts = of(n.drain(), StartDownload)
    assert [s.blob_id for s in starts] == [blobs[2].ref.id]
    t = STARTUP_SETTLE
    for _ in range(OUTAGE_SEED_FAILURES):
        assert not n.outage
        n.download_failed(starts[-1].download, t)
        n.drain()
        while not (starts := of(n.drain(), StartDownload)):  # after the seed's rest
            t += 1.0
            n.tick(t)
    assert n.outage and n.stats.counters["coordinator_outages"] == 1
    # what we hold reaches the other LANs, and their requests are served
    n2, _ = holder()
    assert n.have_messages("wan1") and not n2.have_messages("wan1")
    n.receive(BlobRequest(7, blobs[0].ref.id, 0, 100), "wan1", t)
    assert [a.req_id for a in of(n.drain(), ServeRange)] == [7]
    # the seed answers again: back to the metered policy
    n.blob_received(starts[-1].download, blobs[2].frame, t + 1)
    assert not n.outage and n.have_messages("wan1") == []
    # the driver's own view (control calls failing) opens it too
    n.coordinator_reachable(False, t + 2)
    assert n.outage and n.have_messages("wan1")
    n.coordinator_reachable(True, t + 3)
    assert not n.outage


def test_a_wan_peer_that_refuses_loses_its_offer() -> None:
    (blob,) = make_blobs(1, large=0)
    n, acts = settled({"wan1": "10.0.1.2"}, [], [blob], {"wan1": [blob]})
    # offered by a peer on another LAN: fetched from it (it is the HRW owner's WAN source)
    ((dest, r),) = sent(acts, BlobRequest)
    assert dest == "wan1" and not of(acts, StartDownload)
    n.receive(BlobError(r.req_id, REFUSED_WAN), "wan1", 7.0)
    assert n.stats.counters["refused_by_wan_peer"] == 1
    n.drain()
    t = 7.0
    while not (starts := of(n.drain(), StartDownload)):
        assert not sent(n.drain(), BlobRequest)  # never asked again
        t += 1.0
        n.tick(t)
    assert starts[0].blob_id == blob.ref.id


# ---------------------------------------------------------------- resume: no byte twice

def until(n: MeshNode, t: float, cls: type[A], step: float = 0.5) -> tuple[float, list[A]]:
    """Tick until the node asks for a `cls` action (after a source's rest)."""
    while not (got := of(n.drain(), cls)):
        t += step
        n.tick(t)
        assert t < 1000.0
    return t, got


def until_requests(n: MeshNode, t: float) -> tuple[float, list[tuple[str, BlobRequest]]]:
    while not (got := sent(n.drain(), BlobRequest)):
        t += 0.5
        n.tick(t)
        assert t < 1000.0
    return t, got


def test_a_cut_seed_download_resumes_at_its_offset() -> None:
    (blob,) = make_blobs(1, large=1)
    n = node()
    n.start(0.0)
    n.offer_manifest(make_manifest([blob]), 0.0)
    n.tick(STARTUP_SETTLE)
    (first,) = of(n.drain(), StartDownload)
    assert first.offset == 0
    n.blob_part(first.download, blob.frame[:MAX_PIECE], 7.0)  # streamed: 1 MiB arrives
    assert not of(n.drain(), StoreBlob)
    n.download_failed(first.download, 8.0)  # then the connection breaks
    t, (again,) = until(n, 8.0, StartDownload)
    assert (again.blob_id, again.offset) == (blob.ref.id, MAX_PIECE)
    n.blob_received(again.download, blob.frame[MAX_PIECE:], t + 1)
    (st,) = of(n.drain(), StoreBlob)
    assert st.data == blob.frame
    assert n.stats.counters["resumed_bytes"] == MAX_PIECE
    assert n.stats.bytes_coordinator == len(blob.frame)  # every byte once


def test_a_cut_peer_download_resumes_from_any_source() -> None:
    (blob,) = make_blobs(1, large=1)
    n, acts = settled({"lan1": "10.0.0.2"}, ["lan1"], [blob], {"lan1": [blob]})
    reqs = sent(acts, BlobRequest)
    assert [r.offset for _, r in reqs][0] == 0
    r0 = reqs[0][1]
    n.receive(BlobData(r0.req_id, blob.ref.id, 0, blob.frame[:r0.length], False), "lan1", 7.0)
    n.peer_down("lan1", 7.5)
    t, again = until_requests(n, 7.5)
    assert min(m.offset for _, m in again) == MAX_PIECE  # the received MiB is not asked again
    for dest, m in again:
        end = m.offset + m.length
        n.receive(BlobData(m.req_id, m.blob_id, m.offset, blob.frame[m.offset:end],
                           end == len(blob.frame)), dest, t + 1)
    (st,) = of(n.drain(), StoreBlob)
    assert st.data == blob.frame
    assert n.stats.bytes_lan == len(blob.frame)


def test_a_blob_joined_from_two_sources_that_fails_bans_nobody() -> None:
    (blob,) = make_blobs(1, large=1)
    n = node({"w": "10.0.1.2"})  # w: another LAN's peer, which may offer what it holds
    n.start(0.0)
    n.offer_manifest(make_manifest([blob]), 0.0)
    n.tick(STARTUP_SETTLE)
    (first,) = of(n.drain(), StartDownload)
    n.blob_part(first.download, blob.frame[:MAX_PIECE], 7.0)  # a prefix from the seed...
    n.download_failed(first.download, 7.1)
    n.receive(Have(KEY1, (blob.ref.id,)), "w", 7.2)  # ...the rest from w (seed resting)
    reqs = sent(n.drain(), BlobRequest)
    assert reqs and all(d == "w" and r.offset >= MAX_PIECE for d, r in reqs)
    for _, m in reqs:
        end = m.offset + m.length
        n.receive(BlobData(m.req_id, m.blob_id, m.offset, blob.frame[m.offset:end],
                           end == len(blob.frame)), "w", 8.0)
    (st,) = of(n.drain(), StoreBlob)
    n.blob_stored(st.download, False, 8.5)  # the joined bytes fail verification
    assert n.banned(FLEET, APP) == frozenset()  # which source lied cannot be told
    assert n.stats.counters["bad_joined_blobs"] == 1
    # nothing of it is kept: the next download is whole, from one source, which a second
    # failure would name
    t, nxt = 8.5, []
    while not nxt:
        t += 0.5
        n.tick(t)
        acts = n.drain()
        nxt = [a.offset for a in of(acts, StartDownload)] + [
            m.offset for _, m in sent(acts, BlobRequest)]
    assert nxt == [0]


def test_kept_prefixes_are_bounded_oldest_dropped_first(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(node_module, "MAX_PARTIAL_BYTES", MAX_PIECE + MAX_PIECE // 2)
    blobs = make_blobs(2, large=2)
    by_id = {b.ref.id: b for b in blobs}
    n = node()
    n.start(0.0)
    n.offer_manifest(make_manifest(blobs), 0.0)
    n.tick(STARTUP_SETTLE)
    first, second = of(n.drain(), StartDownload)
    for s in (first, second):
        n.blob_part(s.download, by_id[s.blob_id].frame[:MAX_PIECE], 7.0)
    n.download_failed(first.download, 8.0)  # kept first...
    n.download_failed(second.download, 8.0)  # ...so this one pushes it out
    assert n.stats.counters["partials_dropped"] == 1
    t, starts = until(n, 8.0, StartDownload)
    if len(starts) < 2:
        _, more = until(n, t, StartDownload)
        starts += more
    offsets = {s.blob_id: s.offset for s in starts}
    assert offsets == {first.blob_id: 0, second.blob_id: MAX_PIECE}


def test_a_neighbour_found_late_gets_what_we_hold() -> None:
    n, blobs = holder()  # lan1 is a LAN neighbour, wan1 is not (yet)
    assert n.have_messages("wan1") == []
    n.set_lan(["lan1", "wan1"], 1.0)  # LAN discovery finds wan1 on our LAN after all
    held = tuple(sorted(b.ref.id for b in blobs[:2]))
    assert sent(n.drain(), Have) == [("wan1", Have(KEY1, held))]


def test_a_neighbour_back_from_the_dead_gets_what_we_hold_when_lan_discovery_finds_it() -> None:
    """The race behind a returning device fetching a release across the WAN (CI, issue 12):
    lan1's agent stopped, we declared it dead and LAN discovery dropped it. It comes back and
    connects before discovery finds it again, so that connection's snapshot offered it what
    another LAN's peer gets (nothing, metered); discovery then finds it while membership still
    holds it dead (it refutes only once it hears of its death). Being found on the LAN is proof
    enough that it is up: it learns what we hold then, not after the refutation."""
    n, blobs = holder()
    n.set_lan([], 1.0)  # discovery: lan1 said goodbye
    n.receive(Gossip("wan1", (MemberState("lan1", 0, Status.DEAD, ""),)), "wan1", 2.0)
    assert "lan1" not in n.membership.live_members()
    n.connected("lan1")  # back: its connection opens before discovery has found it
    assert sent(n.drain(), Have) == []
    n.set_lan(["lan1"], 3.0)
    held = tuple(sorted(b.ref.id for b in blobs[:2]))
    assert sent(n.drain(), Have) == [("lan1", Have(KEY1, held))]


# ---------------------------------------------------------------- LAN-local gossip (issue 14)

def metered(lan: Iterable[str]) -> MeshNode:
    """A METERED node (the agent's default) with LAN neighbours lan1, lan2 and wan1, wan2 on
    other LANs in its peer map."""
    peers = {"lan1": "10.0.0.2", "lan2": "10.0.0.3", "wan1": "10.0.1.2", "wan2": "10.0.2.2"}
    n = MeshNode("me", "10.0.0.1", peers=peers, verify=VERIFY, store=MemStore(),
                 rng=random.Random(1), fleet=FLEET, membership_config=METERED,
                 rumor_config=METERED_RUMOR)
    n.set_lan(lan, 0.0)
    return n


def run_idle(n: MeshNode, start: float, until: float, silent: Iterable[str] = ()
             ) -> list[tuple[float, str, object]]:
    """Tick `n` at its deadlines in [start, until]; every peer but the `silent` ones acks
    its pings at once."""
    out: list[tuple[float, str, object]] = []
    t = start
    while t <= until:
        n.tick(t)
        for dest, msg in sent(n.drain(), object):
            out.append((t, dest, msg))
            if isinstance(msg, Ping) and dest not in silent:
                n.receive(Ack(msg.seq, dest), dest, t)
        d = n.next_deadline()
        assert d is not None
        t = max(d, t + 1e-9)
    return out


def test_a_metered_node_gossips_only_with_its_lan_while_the_coordinator_answers() -> None:
    n = metered(["lan1", "lan2"])
    n.start(0.0)
    n.offer_manifest(make_manifest(make_blobs(1, large=0)), 0.0)  # from the coordinator
    hour = run_idle(n, 0.0, 3600.0)
    assert {dest for _, dest, _ in hour} == {"lan1", "lan2"}
    assert any(isinstance(m, Rumor) for _, _, m in hour)  # the manifest went to the LAN only
    assert sum(isinstance(m, Ping) for _, _, m in hour) >= 3600 / METERED.probe_interval - 1
    # the members on other LANs are alive while in the peer map, for the scheduler too
    assert n.held_alive("wan1") and n.held_alive("wan2") and n.lan == {"lan1", "lan2"}
    # one of them may still send us frames: answered, checked and reported as ever
    n.receive(Ping(9, "wan1", (MemberState("ghost", 0, Status.ALIVE, ""),)), "wan1", 3600.0)
    assert sent(n.drain(), Ack) == [("wan1", Ack(9, "me", ()))]
    assert n.misbehaving_peers() == {"wan1": {"ghost_member": 1}}
    # an outage opens gossip to the whole fleet...
    n.coordinator_reachable(False, 3600.0)
    outage = run_idle(n, 3600.0, 4200.0)
    assert {"wan1", "wan2"} <= {dest for _, dest, m in outage if isinstance(m, Ping)}
    # ...and the coordinator's answer closes it again
    n.coordinator_reachable(True, 4200.0)
    after = run_idle(n, 4200.0, 7800.0)
    assert {dest for _, dest, _ in after} == {"lan1", "lan2"}


def test_the_lan_scope_follows_lan_discovery() -> None:
    n = metered([])
    n.start(0.0)
    assert run_idle(n, 0.0, 600.0) == []  # no LAN neighbour: no gossip at all
    n.set_lan(["lan1"], 600.0)  # found: the only member we probe
    probed = run_idle(n, 600.0, 1200.0)
    assert {dest for _, dest, _ in probed} == {"lan1"}
    # it stops answering: dead within a probe period and the suspicion time of a scope of 2
    run_idle(n, 1200.0, 1200.0 + 2 * METERED.probe_interval + 30.0, silent={"lan1"})
    assert not n.held_alive("lan1") and n.lan == frozenset()
    # discovery loses it: alive again for us (the peer map's word), and no longer probed
    n.set_lan(["lan2"], 1300.0)
    assert n.held_alive("lan1") and n.lan == {"lan2"}
    assert {dest for _, dest, _ in run_idle(n, 1300.0, 1900.0)} == {"lan2"}
    assert n.held_alive("lan1")


# --------------------------------------------------------------------------- platforms


def _two_platform_manifest(amd: Sequence[Blob], arm: Sequence[Blob]) -> bytes:
    def layer(blobs: Sequence[Blob]) -> Layer:
        tar = b"".join(b.piece for b in blobs)
        return Layer(diff_id(tar), len(tar), tuple(b.ref for b in blobs))

    config = b'{"architecture":"%s","os":"linux","rootfs":{}}'
    m = ReleaseManifest(FLEET, APP, 1, 1_700_000_000, config % b"amd64", (layer(amd),),
                        platform="linux/amd64", more_images=(
                            PlatformImage("linux/arm64", config % b"arm64", (layer(arm),)),))
    return encode_signed_manifest(sign_manifest(m, KEY))


def test_a_node_fetches_and_offers_only_its_platform_s_blobs() -> None:
    """An arm64 node given a release of amd64 and arm64 images asks for the arm64 blobs only
    (even of a neighbour that holds both) and offers only what it holds: its own platform's."""
    amd, arm = make_blobs(3, seed=1, large=0), make_blobs(2, seed=2, large=0)
    store = MemStore()
    store.blobs[arm[0].ref.id] = arm[0].frame
    n = MeshNode("me", "10.0.0.1", peers={"lan1": "10.0.0.2"},
                 verify=make_verifier(bytes(KEY.verify_key), fleet=FLEET,
                                      platform="linux/arm64"),
                 store=store, rng=random.Random(1), fleet=FLEET, local_layers=frozenset)
    n.set_lan(["lan1"], 0.0)
    n.start(0.0)
    n.offer_manifest(_two_platform_manifest(amd, arm), 1.0)
    n.receive(Have(KEY1, tuple(b.ref.id for b in [*amd, *arm])), "lan1", 2.0)
    n.drain()
    n.tick(STARTUP_SETTLE)
    asked = {m.blob_id for _, m in sent(n.drain(), BlobRequest)}
    assert asked == {arm[1].ref.id}
    assert n.have_messages("lan1") == [Have(KEY1, (arm[0].ref.id,))]
