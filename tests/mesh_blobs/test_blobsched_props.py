"""Random event orders (hypothesis): the scheduler never fetches a blob it holds, never exceeds
its in-flight bounds, never asks a banned peer, and its in-flight view matches its actions."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.blobsched import (
    COORDINATOR,
    Action,
    Announce,
    BlobScheduler,
    Cancel,
    Fetch,
    SchedConfig,
)

BLOBS = [hashlib.sha256(b"p%d" % i).digest() for i in range(8)]
PEERS = ["p0", "p1", "p2", "p3", "p4", "p5"]
SIZES = st.sampled_from([1, 50_000, 400_000, 2_000_000])
SOURCES = st.sampled_from([*PEERS, COORDINATOR])

blob_subset = st.lists(st.sampled_from(BLOBS), max_size=8, unique=True)
peer_subset = st.lists(st.sampled_from(PEERS), max_size=6, unique=True)

events = st.one_of(
    st.tuples(st.just("want"), st.dictionaries(st.sampled_from(BLOBS), SIZES, max_size=8)),
    st.tuples(st.just("peers"), peer_subset, peer_subset),
    st.tuples(st.just("have"), st.sampled_from(PEERS), blob_subset, st.booleans()),
    # an answer to one of our requests (k-th in flight), or a stray one
    st.tuples(st.just("recv"), st.integers(0, 20), st.booleans()),
    st.tuples(st.just("stray"), SOURCES, st.sampled_from(BLOBS), st.booleans()),
    st.tuples(st.just("fail"), st.integers(0, 20)),
    st.tuples(st.just("tick"), st.floats(0.0, 200.0)),
)

configs = st.sampled_from([
    SchedConfig(lan_rate=1e6, wan_rate=50e3),
    SchedConfig(lan_rate=1e6, wan_rate=50e3, max_per_peer=1, max_total=2, max_wan=1),
    SchedConfig(lan_rate=1e6, wan_rate=50e3, max_per_peer=2, max_total=3, max_wan=2),
    SchedConfig(lan_rate=1e6, wan_rate=50e3, max_per_peer=1, max_total=4, max_wan=3),
    SchedConfig(lan_rate=1e6, wan_rate=50e3, peer_sharing=False, max_wan=2),
])


@settings(max_examples=400, deadline=None)
@given(config=configs, script=st.lists(events, max_size=60))
def test_random_event_orders_keep_the_invariants(config: SchedConfig,
                                                 script: list[tuple[Any, ...]]) -> None:
    s = BlobScheduler("me", config=config)
    now = 0.0
    lan: set[str] = set()
    wan: set[str] = set()
    banned: set[str] = set()  # peers we reported bad data from
    told: dict[str, set[bytes]] = {}  # what each peer announced (complete=True replaces)
    model: dict[bytes, str] = {}  # in flight, as the actions say
    crosses_wan: dict[bytes, bool] = {}  # per request: was the source off our LAN when asked?

    def check(actions: list[Action], answered: tuple[str, bytes] | None = None) -> None:
        if answered is not None and model.get(answered[1]) == answered[0]:
            del model[answered[1]]
        for a in actions:
            if isinstance(a, Fetch):
                assert a.blob_id not in s.have, "fetched a blob we hold"
                assert a.blob_id in s.wanted, "fetched a blob we do not want"
                assert a.blob_id not in model, "two requests for one blob"
                assert a.source not in banned, "asked a banned peer"
                if not config.peer_sharing:
                    assert a.source == COORDINATOR
                if a.source != COORDINATOR:
                    assert a.source in lan or a.source in wan, "asked a non-member"
                    assert a.blob_id in told.get(a.source, set()), "asked a peer without it"
                model[a.blob_id] = a.source
                crosses_wan[a.blob_id] = a.source not in lan
            elif isinstance(a, Cancel):
                assert model.pop(a.blob_id) == a.source
            elif isinstance(a, Announce):
                assert set(a.blob_ids) <= s.have
        flights = s.in_flight()
        assert flights == model
        load = Counter(flights.values())
        assert not load or max(load.values()) <= config.max_per_peer
        assert len(flights) <= config.max_total
        assert sum(crosses_wan[b] for b in flights) <= config.max_wan
        deadline = s.next_deadline()
        assert deadline is None or deadline > now

    for ev in script:
        kind = ev[0]
        if kind == "want":
            check(s.want(ev[1], now))
        elif kind == "peers":
            lan = set(ev[1])
            wan = set(ev[2]) - lan
            check(s.set_peers(lan, wan, now))
        elif kind == "have":
            _, peer, ids, complete = ev
            if peer not in banned:
                if complete:
                    told[peer] = set(ids)
                else:
                    told.setdefault(peer, set()).update(ids)
            check(s.on_have(peer, ids, complete, now))
        elif kind in ("recv", "fail"):
            if not model:
                continue
            blob, source = sorted(model.items())[ev[1] % len(model)]
            if kind == "recv":
                ok = ev[2]
                if not ok and source != COORDINATOR:
                    banned.add(source)
                check(s.on_received(source, blob, ok, now), (source, blob))
            else:
                check(s.on_failed(source, blob, now), (source, blob))
        elif kind == "stray":
            _, source, blob, ok = ev
            if not ok and source != COORDINATOR:
                banned.add(source)
            check(s.on_received(source, blob, ok, now), (source, blob))
        else:
            now += ev[1]
            check(s.tick(now))
    assert banned <= s.banned


@settings(max_examples=100, deadline=None)
@given(script=st.lists(st.tuples(st.sampled_from(PEERS), blob_subset), max_size=20),
       seed_have=blob_subset)
def test_everything_eventually_arrives_when_sources_answer(
        script: list[tuple[str, list[bytes]]], seed_have: list[bytes]) -> None:
    """With a working coordinator and answering peers, repeated ticks complete the want."""
    s = BlobScheduler("me", have=seed_have, config=SchedConfig(lan_rate=1e6, wan_rate=50e3))
    now = 0.0
    s.set_peers(PEERS[:3], PEERS[3:], now)
    for peer, ids in script:
        s.on_have(peer, ids, False, now)
    actions = s.want(dict.fromkeys(BLOBS, 100_000), now)
    for _ in range(200):
        for a in actions:
            assert not (isinstance(a, Fetch) and a.blob_id in s.have)
        fetched = [a for a in actions if isinstance(a, Fetch)]
        actions = []
        for f in fetched:
            actions += s.on_received(f.source, f.blob_id, True, now)
        if s.complete:
            break
        if not fetched:
            deadline = s.next_deadline()
            assert deadline is not None, "stuck with nothing to wait for"
            now = max(now, deadline)
            actions += s.tick(now)
    assert s.complete
