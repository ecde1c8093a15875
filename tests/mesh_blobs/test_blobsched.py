"""BlobScheduler with explicit `now`: source choice, HRW responsibility, exact timers, bounds."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from mesh.blobsched import (
    BACKOFF_INITIAL_S,
    COORDINATOR,
    LAN_WAIT_FACTOR,
    LAN_WAIT_FLOOR_S,
    MAX_IN_FLIGHT_PER_PEER,
    MAX_IN_FLIGHT_TOTAL,
    MAX_WAN_IN_FLIGHT,
    PROGRESS_UNIT,
    STALL_FLOOR_S,
    Action,
    Announce,
    BlobScheduler,
    Cancel,
    Fetch,
    LinkRates,
    SchedConfig,
    fetch_timeout,
    lan_wait,
    rendezvous_owner,
    stall_timeout,
    wan_bound,
)

SIZE = 1_000_000
CFG = SchedConfig(lan_rate=10e6, wan_rate=100e3)
LAN = ["d1", "d2", "d3"]


def bid(i: int) -> bytes:
    return hashlib.sha256(b"blob-%d" % i).digest()


def fetches(actions: list[Action]) -> list[Fetch]:
    return [a for a in actions if isinstance(a, Fetch)]


def owned_by(owner: str, members: list[str], n: int = 1, start: int = 0) -> list[bytes]:
    """The first `n` blob ids (from index `start`) that `owner` is responsible for."""
    out = []
    i = start
    while len(out) < n:
        if rendezvous_owner(members, bid(i)) == owner:
            out.append(bid(i))
        i += 1
    return out


def node(lan: list[str] = LAN, wan: tuple[str, ...] = (), now: float = 0.0,
         config: SchedConfig = CFG, have: tuple[bytes, ...] = ()) -> BlobScheduler:
    s = BlobScheduler("d0", config=config, have=have)
    assert s.set_peers(lan, wan, now) == []
    return s


# ---------------------------------------------------------------- constants and HRW


def test_lan_wait_is_twice_the_expected_transfer_with_a_floor() -> None:
    assert lan_wait(SIZE, CFG) == pytest.approx(LAN_WAIT_FACTOR * (SIZE / 100e3 + SIZE / 10e6))
    assert lan_wait(10, CFG) == LAN_WAIT_FLOOR_S
    assert fetch_timeout(SIZE, True, CFG) == pytest.approx(40.0)


def test_hrw_spreads_1000_blobs_over_4_members() -> None:
    members = ["d0", "d1", "d2", "d3"]
    counts = Counter(rendezvous_owner(members, bid(i)) for i in range(1000))
    assert set(counts) == set(members)
    for m in members:  # binomial(1000, 1/4): sd 13.7, so +-50 is more than 3.6 sd
        assert 200 <= counts[m] <= 300, counts


def test_hrw_only_the_leavers_blobs_move() -> None:
    members = ["d0", "d1", "d2", "d3"]
    before = {bid(i): rendezvous_owner(members, bid(i)) for i in range(1000)}
    after = {b: rendezvous_owner(["d0", "d1", "d3"], b) for b in before}
    moved = {b for b in before if before[b] != after[b]}
    assert moved == {b for b in before if before[b] == "d2"}
    assert Counter(after[b] for b in moved).keys() <= {"d0", "d1", "d3"}
    # the leaver's blobs spread over the rest, not onto one member
    assert min(Counter(after[b] for b in moved).values()) > len(moved) // 6


def test_scheduler_responsibility_matches_hrw_and_moves_when_member_leaves() -> None:
    s = node()
    members = ["d0", *LAN]
    assert all(s.responsible(bid(i)) == rendezvous_owner(members, bid(i)) for i in range(100))
    s.set_peers(["d1", "d3"], ["d2"], 1.0)  # d2 left the LAN (it is still a mesh peer)
    assert all(s.responsible(bid(i)) == rendezvous_owner(["d0", "d1", "d3"], bid(i))
               for i in range(100))


# ---------------------------------------------------------------- source choice


def test_lan_neighbour_preferred_over_wan_peer_and_coordinator() -> None:
    s = node(wan=("w1",))
    (mine,) = owned_by("d0", ["d0", *LAN])  # even a blob we are responsible for
    s.on_have("w1", [mine], False, 0.0)
    s.on_have("d2", [mine], False, 0.0)
    assert fetches(s.want({mine: SIZE}, 1.0)) == [Fetch(mine, "d2", SIZE)]


def test_responsible_member_fetches_from_wan_peer_else_coordinator_at_once() -> None:
    s = node(wan=("w1",))
    a, b = owned_by("d0", ["d0", *LAN], n=2)
    s.on_have("w1", [a], False, 0.0)
    got = fetches(s.want({a: SIZE, b: SIZE}, 5.0))
    assert sorted(got, key=lambda f: f.source) == [Fetch(b, COORDINATOR, SIZE),
                                                   Fetch(a, "w1", SIZE)]


def test_least_loaded_lan_neighbour() -> None:
    s = node()
    blobs = [bid(i) for i in range(6)]
    s.on_have("d1", blobs, False, 0.0)
    s.on_have("d2", blobs, False, 0.0)
    got = fetches(s.want(dict.fromkeys(blobs, SIZE), 1.0))
    assert Counter(f.source for f in got) == {"d1": 3, "d2": 3}


# ---------------------------------------------------------------- waiting for the LAN


def test_non_responsible_waits_exactly_lan_wait_then_fetches_from_coordinator() -> None:
    s = node(wan=("w1",))
    (b,) = owned_by("d1", ["d0", *LAN])
    assert fetches(s.want({b: SIZE}, 100.0)) == []
    deadline = 100.0 + lan_wait(SIZE, CFG)
    assert s.next_deadline() == deadline
    assert fetches(s.tick(deadline - 1e-6)) == []
    assert fetches(s.tick(deadline)) == [Fetch(b, COORDINATOR, SIZE)]


def test_the_reason_for_a_wan_fetch_names_the_owner_and_the_wait() -> None:
    s = node(wan=("w1",))
    (mine,) = owned_by("d0", ["d0", *LAN])
    (theirs,) = owned_by("d1", ["d0", *LAN])
    assert fetches(s.want({mine: SIZE, theirs: SIZE}, 100.0)) == [Fetch(mine, COORDINATOR, SIZE)]
    assert s.wan_reason(mine, 100.0) == "ours to fetch among 4 LAN members"
    deadline = 100.0 + lan_wait(SIZE, CFG)
    assert fetches(s.tick(deadline)) == [Fetch(theirs, COORDINATOR, SIZE)]
    assert s.wan_reason(theirs, deadline) == (
        f"d1's to fetch, waited {deadline - 100.0:.1f} s for it (limit "
        f"{deadline - 100.0:.1f} s)")
    assert node(lan=[]).wan_reason(theirs, 0.0) == "no LAN neighbour"


def test_non_responsible_after_lan_wait_prefers_wan_peer() -> None:
    s = node(wan=("w1",))
    (b,) = owned_by("d1", ["d0", *LAN])
    s.want({b: SIZE}, 0.0)
    s.on_have("w1", [b], False, 3.0)  # a WAN peer has it: still wait for the LAN
    assert fetches(s.tick(3.0)) == []
    assert fetches(s.tick(lan_wait(SIZE, CFG))) == [Fetch(b, "w1", SIZE)]


def test_blob_appearing_on_lan_during_wait_comes_from_lan() -> None:
    s = node()
    (b,) = owned_by("d1", ["d0", *LAN])
    s.want({b: SIZE}, 0.0)
    assert fetches(s.on_have("d1", [b], False, 12.0)) == [Fetch(b, "d1", SIZE)]


def test_owner_progress_extends_the_wait() -> None:
    s = node()
    b, c = owned_by("d1", ["d0", *LAN], n=2)
    s.want({b: SIZE, c: SIZE}, 0.0)
    # d1 brings c at t=15: it is alive and working through its queue, so b may follow
    assert fetches(s.on_have("d1", [c], False, 15.0)) == [Fetch(c, "d1", SIZE)]
    s.on_received("d1", c, True, 16.0)
    assert s.next_deadline() == 15.0 + lan_wait(SIZE, CFG)
    assert fetches(s.tick(lan_wait(SIZE, CFG))) == []
    assert fetches(s.tick(15.0 + lan_wait(SIZE, CFG))) == [Fetch(b, COORDINATOR, SIZE)]


def test_responsibility_moves_to_us_when_owner_leaves() -> None:
    members = ["d0", *LAN]
    b = next(x for x in owned_by("d2", members, n=50)
             if rendezvous_owner(["d0", "d1", "d3"], x) == "d0")
    s = node()
    assert fetches(s.want({b: SIZE}, 0.0)) == []
    assert fetches(s.set_peers(["d1", "d3"], [], 4.0)) == [Fetch(b, COORDINATOR, SIZE)]


def test_responsibility_moves_to_other_member_restarts_the_wait() -> None:
    members = ["d0", *LAN]
    b = next(x for x in owned_by("d2", members, n=50)
             if rendezvous_owner(["d0", "d1", "d3"], x) == "d1")
    s = node()
    s.want({b: SIZE}, 0.0)
    s.set_peers(["d1", "d3"], [], 4.0)
    assert s.next_deadline() == 4.0 + lan_wait(SIZE, CFG)
    assert fetches(s.tick(lan_wait(SIZE, CFG))) == []
    assert fetches(s.tick(4.0 + lan_wait(SIZE, CFG))) == [Fetch(b, COORDINATOR, SIZE)]


# ---------------------------------------------------------------- rarest first


def test_rarest_first() -> None:
    s = node(lan=["d1", "d2", "d3"], config=SchedConfig(10e6, 100e3, max_total=1))
    x, y, z = bid(1), bid(2), bid(3)
    s.on_have("d1", [x, y, z], False, 0.0)
    s.on_have("d2", [x, z], False, 0.0)
    s.on_have("d3", [x], False, 0.0)
    order = []
    (f,) = fetches(s.want({x: SIZE, y: SIZE, z: SIZE}, 1.0))
    while True:
        order.append(f.blob_id)
        got = fetches(s.on_received(f.source, f.blob_id, True, 2.0))
        if not got:
            break
        (f,) = got
    assert order == [y, z, x]  # 1, 2, then 3 holders
    assert s.complete


def test_ties_are_broken_deterministically_per_device() -> None:
    blobs = {bid(i): SIZE for i in range(20)}
    cfg = SchedConfig(10e6, 100e3, max_total=1)
    runs = []
    for _ in range(2):
        s = BlobScheduler("d0", config=cfg)
        s.set_peers(["d1"], [], 0.0)
        s.on_have("d1", list(blobs), False, 0.0)
        runs.append(fetches(s.want(blobs, 0.0)))
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- bounds and timeouts


def test_per_peer_bound() -> None:
    s = node()
    blobs = [bid(i) for i in range(10)]
    s.on_have("d1", blobs, False, 0.0)
    got = fetches(s.want(dict.fromkeys(blobs, SIZE), 0.0))
    assert len(got) == MAX_IN_FLIGHT_PER_PEER and {f.source for f in got} == {"d1"}
    more = fetches(s.on_received("d1", got[0].blob_id, True, 0.5))
    assert len(more) == 1 and len(s.in_flight()) == MAX_IN_FLIGHT_PER_PEER


def test_total_bound() -> None:
    peers = [f"d{i}" for i in range(1, 9)]
    s = node(lan=peers)
    blobs = [bid(i) for i in range(40)]
    for p in peers:
        s.on_have(p, blobs, False, 0.0)
    got = fetches(s.want(dict.fromkeys(blobs, SIZE), 0.0))
    assert len(got) == MAX_IN_FLIGHT_TOTAL
    assert max(Counter(f.source for f in got).values()) <= MAX_IN_FLIGHT_PER_PEER


def test_wan_bound() -> None:
    s = node(lan=[], wan=("w1", "w2"))
    blobs = [bid(i) for i in range(10)]
    s.on_have("w1", blobs[:5], False, 0.0)
    got = fetches(s.want(dict.fromkeys(blobs, SIZE), 0.0))
    assert len(got) == MAX_WAN_IN_FLIGHT


def test_timeout_cancels_rests_the_source_and_refetches_elsewhere() -> None:
    s = node()
    b = bid(1)
    s.on_have("d1", [b], False, 0.0)
    s.on_have("d2", [b], False, 0.0)
    (f,) = fetches(s.want({b: SIZE}, 0.0))
    timeout = fetch_timeout(SIZE, False, CFG)
    assert s.next_deadline() == timeout
    assert s.tick(timeout - 1e-6) == []
    out = s.tick(timeout)
    other = "d2" if f.source == "d1" else "d1"
    assert out == [Cancel(b, f.source), Fetch(b, other, SIZE)]


def test_failure_backoff_then_retry_same_source() -> None:
    s = node(lan=[])
    b = bid(1)
    assert fetches(s.want({b: SIZE}, 0.0)) == [Fetch(b, COORDINATOR, SIZE)]
    assert s.on_failed(COORDINATOR, b, 1.0) == []
    assert s.next_deadline() == 1.0 + BACKOFF_INITIAL_S
    assert fetches(s.tick(1.0 + BACKOFF_INITIAL_S)) == [Fetch(b, COORDINATOR, SIZE)]


# ---------------------------------------------------------------- bad peers


def test_bad_peer_banned_and_blob_refetched_elsewhere() -> None:
    s = node()
    b, c = bid(1), bid(2)
    s.on_have("d1", [b, c], False, 0.0)
    got = fetches(s.want({b: SIZE, c: SIZE}, 0.0))
    assert {f.source for f in got} == {"d1"}
    out = s.on_received("d1", b, False, 1.0)
    assert "d1" in s.banned
    # the other request to d1 is abandoned; nobody else has the blobs: WAN (we or others own them)
    assert Cancel(c, "d1") in out
    assert all(f.source != "d1" for f in fetches(out))
    assert fetches(s.on_have("d1", [b, c], True, 2.0)) == []  # its Haves are ignored
    waiting = {b, c} - set(s.in_flight())
    assert waiting  # b at least: it was d1's, or is ours and was rescheduled
    got = fetches(s.on_have("d2", [b, c], False, 3.0))
    assert {(f.blob_id, f.source) for f in got} == {(x, "d2") for x in waiting}
    for x, source in s.in_flight().items():
        s.on_received(source, x, True, 4.0)
    assert s.complete and all(f.source != "d1" for f in got)


def test_banned_lan_member_loses_responsibility() -> None:
    members = ["d0", *LAN]
    (b,) = owned_by("d1", members)
    s = node()
    s.want({b: SIZE, bid(10_000): SIZE}, 0.0)
    s.on_have("d1", [bid(10_000)], False, 0.0)
    s.on_received("d1", bid(10_000), False, 1.0)
    assert s.responsible(b) == rendezvous_owner(["d0", "d2", "d3"], b)
    (mine,) = owned_by("d0", ["d0", "d2", "d3"])
    assert s.wan_reason(mine, 1.0) == "ours to fetch among 3 LAN members"


def test_coordinator_bad_data_is_retried_not_banned() -> None:
    s = node(lan=[])
    b = bid(1)
    s.want({b: SIZE}, 0.0)
    assert s.on_received(COORDINATOR, b, False, 1.0) == []
    assert COORDINATOR not in s.banned
    assert fetches(s.tick(1.0 + BACKOFF_INITIAL_S)) == [Fetch(b, COORDINATOR, SIZE)]


# ---------------------------------------------------------------- modes and completion


def test_peer_sharing_off_everything_from_coordinator() -> None:
    cfg = SchedConfig(10e6, 100e3, peer_sharing=False)
    s = node(wan=("w1",), config=cfg)
    blobs = [bid(i) for i in range(10)]
    s.on_have("d1", blobs, True, 0.0)
    s.on_have("w1", blobs, True, 0.0)
    got = fetches(s.want(dict.fromkeys(blobs, SIZE), 0.0))
    # this device's share of its LAN's WAN flows (a LAN of 4 members here)
    assert len(got) == wan_bound(len(LAN) + 1, cfg) == 2
    seen = list(got)
    while got:
        f = got.pop()
        new = fetches(s.on_received(f.source, f.blob_id, True, 1.0))
        seen.extend(new)
        got.extend(new)
    assert {f.source for f in seen} == {COORDINATOR} and len(seen) == 10
    assert s.complete


def test_completion_announces_each_blob_and_goes_quiet() -> None:
    s = node()
    blobs = [bid(i) for i in range(3)]
    s.on_have("d1", blobs, False, 0.0)
    got = fetches(s.want(dict.fromkeys(blobs, SIZE), 0.0))
    for f in got:
        out = s.on_received(f.source, f.blob_id, True, 1.0)
        assert Announce((f.blob_id,)) in out
    assert s.complete and s.missing == frozenset()
    assert s.next_deadline() is None and s.tick(100.0) == []
    assert s.have == frozenset(blobs)


def test_held_blobs_are_never_fetched_and_are_announced() -> None:
    b, c = bid(1), bid(2)
    s = node(have=(b,))
    s.on_have("d1", [b, c], False, 0.0)
    out = s.want({b: SIZE, c: SIZE}, 0.0)
    assert out[0] == Announce((b,), complete=True)
    assert fetches(out) == [Fetch(c, "d1", SIZE)]


def test_have_complete_replaces_and_late_duplicate_is_cancelled() -> None:
    s = node()
    b = bid(1)
    s.on_have("d1", [b], False, 0.0)
    s.on_have("d1", [], True, 0.0)  # d1's full holding is now empty
    s.on_have("d2", [b], False, 0.0)
    assert fetches(s.want({b: SIZE}, 0.0)) == [Fetch(b, "d2", SIZE)]
    # a late answer from an earlier source lands first: the live request is cancelled
    assert s.on_received("d3", b, True, 0.1) == [Cancel(b, "d2"), Announce((b,))]


def test_time_must_not_go_backwards() -> None:
    s = node(now=5.0)
    with pytest.raises(ValueError):
        s.tick(4.0)


def test_bad_api_input_rejected() -> None:
    s = node()
    with pytest.raises(ValueError):
        s.want({b"short": 1}, 0.0)
    with pytest.raises(ValueError):
        s.want({bid(1): -1}, 0.0)
    with pytest.raises(ValueError):
        SchedConfig(lan_rate=0)


# ---------------------------------------------------------------- timers follow measured rates


def test_a_fetch_fails_on_a_stall_not_on_its_size() -> None:
    s = node(lan=[])
    big = 40 * SIZE  # 400 s at the configured 100 kB/s: no fixed limit applies
    (f,) = fetches(s.want({bid(1): big}, 0.0))
    first = stall_timeout(CFG.wan_rate)
    assert s.next_deadline() == first
    t = 0.0
    for _ in range(50):  # 50 MB in 1 MB steps at 50 kB/s: slower than configured, alive
        t += 20.0
        assert s.on_progress(COORDINATOR, bid(1), SIZE, t) == []
    assert s.in_flight() == {bid(1): COORDINATOR}
    # the deadline is the last progress plus a stall at the measured rate (~50 kB/s)
    assert s.rates.measured(True)
    assert s.rates.get(True) == pytest.approx(SIZE / 20.0)
    assert s.next_deadline() == pytest.approx(t + stall_timeout(SIZE / 20.0))
    out = s.tick(t + stall_timeout(SIZE / 20.0))
    assert Cancel(bid(1), COORDINATOR) in out  # then nothing came: stalled


def test_static_timers_keep_the_whole_transfer_timeout() -> None:
    cfg = SchedConfig(lan_rate=10e6, wan_rate=100e3, follow_rates=False)
    s = node(lan=[], config=cfg)
    s.want({bid(1): 40 * SIZE}, 0.0)
    limit = fetch_timeout(40 * SIZE, True, cfg)
    s.on_progress(COORDINATOR, bid(1), SIZE, 10.0)  # progress does not move it
    assert s.next_deadline() == limit
    assert not s.rates.measured(True)


def test_lan_wait_follows_the_measured_wan_rate() -> None:
    s = node(wan=("w1",))
    (mine,) = owned_by("d0", ["d0", *LAN])
    (theirs,) = owned_by("d1", ["d0", *LAN])
    s.want({mine: SIZE, theirs: SIZE}, 0.0)
    assert s.lan_wait(SIZE) == lan_wait(SIZE, CFG)  # configured until measured
    s.on_progress(COORDINATOR, mine, SIZE // 4, 10.0)  # our own WAN fetch: 25 kB/s
    measured = LinkRates(CFG)
    measured.sample(True, SIZE // 4, 10.0)
    assert s.lan_wait(SIZE) == lan_wait(SIZE, CFG, measured) > lan_wait(SIZE, CFG)
    # the non-owner waits longer on the slower link before crossing the WAN itself
    assert s.next_deadline() == pytest.approx(min(10.0 + stall_timeout(measured.get(True)),
                                                  s.lan_wait(SIZE)))
    assert fetches(s.tick(lan_wait(SIZE, CFG))) == []


def test_a_stall_before_any_measurement_halves_the_assumed_rate() -> None:
    s = node(lan=[])
    s.want({bid(1): SIZE}, 0.0)
    s.tick(stall_timeout(CFG.wan_rate))
    assert s.rates.get(True) == CFG.wan_rate / 2 and not s.rates.measured(True)
    assert stall_timeout(CFG.wan_rate / 2) == 2 * stall_timeout(CFG.wan_rate)
    assert stall_timeout(1e9) == STALL_FLOOR_S
    assert stall_timeout(PROGRESS_UNIT / 10) == pytest.approx(40.0)


def test_the_wan_bound_is_a_share_of_the_lans_flows() -> None:
    # a LAN's members keep about LAN_WAN_FLOWS bulk WAN fetches in flight together
    assert [wan_bound(n, CFG) for n in (1, 2, 3, 4, 6, 10)] == [4, 3, 2, 2, 1, 1]
    assert wan_bound(3, SchedConfig(max_wan=1)) == 1
    assert wan_bound(3, SchedConfig(lan_wan_flows=None)) == MAX_WAN_IN_FLIGHT  # the old rule
    s = node(lan=["d1", "d2"])  # a LAN of 3: 2 each
    blobs = owned_by("d0", ["d0", "d1", "d2"], n=5)
    assert len(fetches(s.want(dict.fromkeys(blobs, SIZE), 0.0))) == 2
