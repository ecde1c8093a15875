"""mesh.membership: SWIM transitions with exact timers (explicit `now`)."""

from __future__ import annotations

import math
import random

import pytest

from mesh.control import HubInfo, PeerEntry, PeerMap
from mesh.membership import (
    LAN,
    MAX_INCARNATION,
    MAX_INCARNATION_STEP,
    METERED,
    Membership,
    push_pull_interval,
    retransmit_limit,
    seeds_from_peer_map,
    suspicion_timeout,
)
from mesh.wire import (
    Ack,
    Gossip,
    MemberState,
    Message,
    Ping,
    PingReq,
    PushPull,
    Status,
    encode,
)


def make(n: int, seed: int = 1) -> Membership:
    m = Membership("a", "10.0.0.1", random.Random(seed))
    m.seed((chr(ord("b") + i), f"10.0.0.{i + 2}") for i in range(n - 1))
    return m


def step(m: Membership, until: float, answer: set[str]) -> list[tuple[float, str, Message]]:
    """Tick at every deadline up to `until`; members in `answer` ack pings at once."""
    sent: list[tuple[float, str, Message]] = []
    while True:
        t = m.next_deadline()
        if t is None:
            t = 0.0  # not started yet
        if t > until:
            return sent
        for dest, msg in m.tick(t):
            sent.append((t, dest, msg))
            if isinstance(msg, Ping) and dest in answer:
                m.receive(Ack(msg.seq, dest), dest, t)


def first_probe(m: Membership) -> tuple[float, str, int]:
    m.tick(0.0)
    while True:
        t = m.next_deadline()
        assert t is not None
        for dest, msg in m.tick(t):
            if isinstance(msg, Ping):
                return t, dest, msg.seq


def test_lan_defaults_are_memberlists() -> None:
    assert (LAN.probe_interval, LAN.probe_timeout, LAN.indirect_checks, LAN.suspicion_mult,
            LAN.retransmit_mult, LAN.push_pull_interval, LAN.gossip_nodes,
            LAN.gossip_interval) == (1.0, 0.5, 3, 4, 4, 30.0, 3, 0.2)
    assert METERED.probe_interval == 5.0 and METERED.push_pull_interval == 120.0
    assert suspicion_timeout(LAN, 3) == 4.0  # log10 floored at 1
    assert suspicion_timeout(LAN, 100) == pytest.approx(8.0)
    assert retransmit_limit(LAN, 100) == 12
    assert push_pull_interval(LAN, 32) == 30.0 and push_pull_interval(LAN, 100) == 90.0


def test_probe_then_ack_keeps_member_alive() -> None:
    m = make(3)
    t0, target, seq = first_probe(m)
    assert m.receive(Ack(seq, target), target, t0 + 0.1) == []
    out = m.tick(t0 + 0.5)  # no indirect probes: the ack came
    assert not any(isinstance(msg, PingReq) for _, msg in out)
    out = m.tick(t0 + 1.0)
    assert [type(msg) for _, msg in out] == [Ping]  # next probe, exactly one interval later
    assert m.member(target) is not None and m.member(target).status == Status.ALIVE  # type: ignore[union-attr]
    assert not [e for e in m.drain_events() if e.kind != "joined"]


def test_timeout_indirect_suspect_dead_exact_timers() -> None:
    m = make(3)
    t0, target, seq = first_probe(m)
    other = ({"b", "c"} - {target}).pop()
    assert m.tick(t0 + 0.499) == []
    out = m.tick(t0 + 0.5)  # ProbeTimeout: ping-req through the one other member
    assert out and all(isinstance(msg, PingReq) and msg.target_id == target and msg.seq == seq
                       and dest == other for dest, msg in out)
    m.drain_events()
    m.tick(t0 + 1.0)  # end of the protocol period without any ack: suspect
    ev = m.drain_events()
    assert [(e.kind, e.node_id, e.at) for e in ev] == [("suspect", target, t0 + 1.0)]
    # 3 nodes: too few for Lifeguard confirmations (k = 0), timeout = 4 x 1 x 1 s exactly
    step(m, t0 + 5.0 - 1e-6, answer={other})
    assert not [e for e in m.drain_events() if e.kind == "dead"]
    step(m, t0 + 5.0, answer={other})
    dead = [e for e in m.drain_events() if e.kind == "dead"]
    assert [(e.node_id, e.at) for e in dead] == [(target, t0 + 5.0)]
    assert target not in m.live_members()


def test_indirect_ack_saves_the_member() -> None:
    m = make(3)
    t0, target, seq = first_probe(m)
    out = m.tick(t0 + 0.5)
    helper = out[0][0]
    m.receive(Ack(seq, target), helper, t0 + 0.7)  # relayed by the helper
    m.tick(t0 + 1.0)
    assert not [e for e in m.drain_events() if e.kind == "suspect"]


def test_helper_relays_ping_req() -> None:
    h = make(3)
    out = h.receive(PingReq(41, "b", "c"), "b", 5.0)
    [(dest, ping)] = out
    assert dest == "c" and isinstance(ping, Ping)
    [(dest, ack)] = h.receive(Ack(ping.seq, "c"), "c", 5.1)
    assert dest == "b" and isinstance(ack, Ack) and (ack.seq, ack.from_id) == (41, "c")


def test_lifeguard_confirmations_shorten_the_timeout() -> None:
    m = make(6)  # n = 6: k = SuspicionMult - 2 = 2 confirmations expected
    m.tick(0.0)
    sus = MemberState("b", 0, Status.SUSPECT, "10.0.0.2")
    m.receive(Gossip("c", (sus,)), "c", 10.0)
    low = suspicion_timeout(LAN, 6)
    assert low == 4.0
    deadlines = {m.next_deadline()}
    step(m, 10.0 + 6 * low - 1e-6, answer={"c", "d", "e", "f"})
    assert not [e for e in m.drain_events() if e.kind == "dead"]  # max = 6 x min = 24 s
    del deadlines
    m2 = make(6)
    m2.tick(0.0)
    m2.receive(Gossip("c", (sus,)), "c", 10.0)
    m2.receive(Gossip("d", (sus,)), "d", 10.5)  # first confirmation
    step(m2, 10.0 + 24 - (24 - 4) * math.log(2) / math.log(3) - 1e-6, answer={"c", "d", "e", "f"})
    assert not [e for e in m2.drain_events() if e.kind == "dead"]
    m2.receive(Gossip("e", (sus,)), "e", 12.0)  # second: timeout is now the minimum, overdue
    step(m2, 14.0, answer={"c", "d", "e", "f"})
    dead = [e for e in m2.drain_events() if e.kind == "dead"]
    assert [(e.node_id, e.at) for e in dead] == [("b", 14.0)]


def test_refutation_with_higher_incarnation() -> None:
    a = make(3)
    a.tick(0.0)
    a.receive(Gossip("b", (MemberState("a", 0, Status.SUSPECT, "10.0.0.1"),)), "b", 1.0)
    assert a.incarnation == 1
    [(_, ping)] = a.receive(Ping(5, "c"), "c", 1.1)
    assert isinstance(ping, Ack) and MemberState("a", 1, Status.ALIVE, "10.0.0.1") in ping.updates
    # b suspected a at incarnation 0; the refutation (incarnation 1) clears it
    b = Membership("b", "10.0.0.2", random.Random(2))
    b.seed([("a", "10.0.0.1"), ("c", "10.0.0.3")])
    b.tick(0.0)
    b.receive(Gossip("c", (MemberState("a", 0, Status.SUSPECT, "10.0.0.1"),)), "c", 1.0)
    assert b.member("a").status == Status.SUSPECT  # type: ignore[union-attr]
    b.receive(Gossip("a", (MemberState("a", 1, Status.ALIVE, "10.0.0.1"),)), "a", 1.2)
    assert b.member("a") == MemberState("a", 1, Status.ALIVE, "10.0.0.1")
    assert [e.kind for e in b.drain_events() if e.node_id == "a"][-2:] == ["suspect", "alive"]
    # a stale alive (same incarnation) does not revive a dead member
    b.receive(Gossip("c", (MemberState("a", 1, Status.DEAD, "10.0.0.1"),)), "c", 2.0)
    b.receive(Gossip("c", (MemberState("a", 1, Status.ALIVE, "10.0.0.1"),)), "c", 2.1)
    assert b.member("a").status == Status.DEAD  # type: ignore[union-attr]


def test_push_pull_merge() -> None:
    a = make(3)
    a.tick(0.0)
    a.drain_events()
    members = (MemberState("b", 2, Status.ALIVE, "10.0.0.2"),
               MemberState("c", 0, Status.DEAD, "10.0.0.3"),
               MemberState("d", 0, Status.ALIVE, "10.0.0.4"),
               MemberState("a", 0, Status.DEAD, "10.0.0.1"))
    out = a.receive(PushPull("b", members, False), "b", 3.0)
    [(dest, reply)] = out
    assert dest == "b" and isinstance(reply, PushPull) and reply.is_reply
    got = {s.node_id: s for s in reply.members}
    assert got["a"] == MemberState("a", 1, Status.ALIVE, "10.0.0.1")  # refuted
    assert got["b"].incarnation == 2
    assert got["c"].status == Status.SUSPECT  # a remote "dead" merges as "suspect"
    # d is not in the peer map: it never becomes a member (tests/adversarial/test_gossip_ghosts)
    assert "d" not in got and a.member("d") is None and a.counters["unknown_members"] == 1
    kinds = {(e.kind, e.node_id) for e in a.drain_events()}
    assert ("suspect", "c") in kinds and not any(n == "d" for _, n in kinds)
    # a reply is not answered with a push-pull; one that holds us at an incarnation we left
    # behind gets our state
    assert a.receive(PushPull("b", members, True), "b", 3.1) == [
        ("b", Gossip("a", (MemberState("a", 1, Status.ALIVE, "10.0.0.1"),)))]
    assert a.receive(PushPull("b", members[:3], True), "b", 3.2) == []


def test_a_member_we_hold_dead_that_connects_learns_it_and_refutes_at_once() -> None:
    """A device back from a stop starts at incarnation 0 and does not know it was declared
    dead; its own alive claims are stale to us. Its connection is our cue to tell it."""
    b = Membership("b", "10.0.0.2", random.Random(2))
    b.seed([("a", "10.0.0.1"), ("c", "10.0.0.3")])
    b.tick(0.0)
    assert b.connected("a") == []  # alive: nothing to tell it
    b.receive(Gossip("c", (MemberState("a", 0, Status.DEAD, "10.0.0.1"),)), "c", 1.0)
    assert b.connected("zz") == []  # not a member
    [(dest, pp)] = b.connected("a")
    assert dest == "a" and isinstance(pp, PushPull) and not pp.is_reply
    a = make(3)  # a's new life
    a.tick(5.0)
    [(_, reply)] = a.receive(pp, "b", 5.1)
    assert a.incarnation == 1
    b.receive(reply, "a", 5.2)
    assert b.member("a") == MemberState("a", 1, Status.ALIVE, "10.0.0.1")
    assert ("alive", "a") in {(e.kind, e.node_id) for e in b.drain_events()}


def test_a_member_leaves_with_the_peer_map() -> None:
    a = make(4)
    a.tick(0.0)
    a.receive(Gossip("c", (MemberState("b", 0, Status.SUSPECT, "10.0.0.2"),)), "c", 1.0)
    a.drain_events()
    a.seed([("c", "10.0.0.3"), ("d", "10.0.0.9")])  # b is gone, d moved
    assert sorted(a.live_members()) == ["c", "d"] and a.member("b") is None
    assert a.address_of("d") == "10.0.0.9"
    assert [(e.kind, e.node_id) for e in a.drain_events()] == [("left", "b")]
    assert all(dest in ("c", "d") for _, dest, _ in step(a, 60.0, answer={"c", "d"}))


def test_incarnations_stay_in_range_and_plausible() -> None:
    a = make(3)
    a.tick(0.0)
    step_ = MAX_INCARNATION_STEP
    # a third party's claim far ahead of what we know is dropped; the member's own is taken
    a.receive(Gossip("c", (MemberState("b", step_ + 1, Status.DEAD, "10.0.0.2"),)), "c", 1.0)
    assert a.member("b").status == Status.ALIVE  # type: ignore[union-attr]
    assert a.counters["implausible_incarnation"] == 1
    a.receive(Gossip("b", (MemberState("b", MAX_INCARNATION, Status.ALIVE, "10.0.0.2"),)),
              "b", 1.1)
    assert a.member("b").incarnation == MAX_INCARNATION  # type: ignore[union-attr]
    # a claim about us far ahead moves us up by one step at most
    a.receive(Gossip("c", (MemberState("a", MAX_INCARNATION, Status.DEAD, "10.0.0.1"),)),
              "c", 1.2)
    assert a.incarnation == step_ and a.counters["implausible_incarnation"] == 2
    # at the top we stay at the top, counted
    a.incarnation = MAX_INCARNATION - 1
    for t in (1.3, 1.4):
        a.receive(Gossip("c", (MemberState("a", MAX_INCARNATION, Status.DEAD, "10.0.0.1"),)),
                  "c", t)
        assert a.incarnation == MAX_INCARNATION
    assert a.counters["incarnation_exhausted"] == 2
    [(_, ack)] = a.receive(Ping(5, "c"), "c", 1.5)
    assert isinstance(ack, Ack) and MemberState("a", MAX_INCARNATION, Status.ALIVE,
                                                "10.0.0.1") in ack.updates
    encode(ack)


def test_periodic_push_pull_without_coordinator() -> None:
    m = make(3)
    sent = step(m, 200.0, answer={"b", "c"})
    pp = [t for t, _, msg in sent if isinstance(msg, PushPull)]
    assert len(pp) >= 6
    assert all(b - a == pytest.approx(30.0) for a, b in zip(pp, pp[1:], strict=False))


def test_seeds_from_peer_map() -> None:
    key = "A" * 43 + "="
    pm = PeerMap(1, HubInfo(key, "198.51.100.1:51820", "100.64.0.1", "fd00::1", "http://x"),
                 (PeerEntry("dev-1", key, "100.64.0.2", "fd00::2"),
                  PeerEntry("dev-2", key, "100.64.0.3", "fd00::3")))
    assert seeds_from_peer_map(pm) == [("dev-1", "100.64.0.2"), ("dev-2", "100.64.0.3")]


def _deliver(nodes: dict[str, Membership], out: list[tuple[str, str, Message]],
             now: float) -> None:
    """Deliver (sender, dest, message) at once, and what the answers send, until quiet."""
    while out:
        sender, dest, msg = out.pop(0)
        if dest in nodes:
            out.extend((dest, d, m) for d, m in nodes[dest].receive(msg, sender, now))


def test_a_victim_of_incarnation_lies_is_not_declared_dead_by_members_that_missed_a_step() -> None:
    """A hostile member accuses `v` at the top incarnation, again and again: each time `v`
    refutes a step up. A member that hears a refutation only from a relay after missing the one
    before drops it as implausible and so holds `v` steps behind; when it then suspects `v` (a
    probe lost on a saturated uplink), the suspicion is stale to `v`, which did not refute it,
    and `v` was declared dead (the hostile-device lab test: two LAN neighbours held each other
    dead and both crossed the WAN). Now a member that finds itself out of step asks `v`
    itself, and `v` answers a stale accusation with its current state."""
    names = ["v", "t1", "t2", "h"]
    nodes = {n: Membership(n, f"10.0.0.{i + 1}", random.Random(i))
             for i, n in enumerate(names) if n != "h"}
    for n, m in nodes.items():
        m.seed((o, f"10.0.0.{i + 1}") for i, o in enumerate(names) if o != n)
        m.tick(0.0)
    lie = Gossip("h", (MemberState("v", MAX_INCARNATION, Status.DEAD, "10.0.0.1"),))
    nodes["v"].receive(lie, "h", 1.0)
    nodes["v"].receive(lie, "h", 1.1)
    assert nodes["v"].incarnation == 2 * MAX_INCARNATION_STEP
    fresh = MemberState("v", 2 * MAX_INCARNATION_STEP, Status.ALIVE, "10.0.0.1")
    _deliver(nodes, [("v", "t2", Gossip("v", (fresh,)))], 1.2)  # t2 hears it from v
    assert nodes["t2"].member("v") == fresh
    # t1 missed both refutations. It suspects v at what it knows: v answers with what it is,
    # and that answer clears the suspicion.
    stale = MemberState("v", 0, Status.SUSPECT, "10.0.0.1")
    out = nodes["v"].receive(Gossip("t1", (stale,)), "t1", 1.3)
    assert out == [("t1", Gossip("v", (fresh,)))]
    nodes["t1"].receive(Gossip("t2", (stale,)), "t2", 1.3)
    assert nodes["t1"].member("v").status == Status.SUSPECT  # type: ignore[union-attr]
    _deliver(nodes, [("v", "t1", out[0][1])], 1.4)
    assert nodes["t1"].member("v") == fresh
    # a member that hears a relayed refutation it cannot take tells the member what it holds
    # of it (one state; once per RESYNC_INTERVAL per member, whatever a relay sends), and the
    # member answers with its own
    nodes["v"].receive(lie, "h", 2.0)
    nodes["v"].receive(lie, "h", 2.0)
    newer = MemberState("v", 4 * MAX_INCARNATION_STEP, Status.ALIVE, "10.0.0.1")
    out = nodes["t2"].receive(Gossip("t1", (newer, newer)), "t1", 2.1)
    assert out == [("v", Gossip("t2", (fresh,)))]
    assert nodes["t2"].receive(Gossip("t1", (newer,)), "t1", 2.2) == []
    assert nodes["v"].receive(out[0][1], "t2", 2.3) == [("t2", Gossip("v", (newer,)))]
    _deliver(nodes, [("t2", "v", out[0][1])], 2.3)
    assert nodes["t2"].member("v") == newer
    assert nodes["t2"].counters["implausible_incarnation"] == 3
    assert nodes["t2"].receive(Gossip("t1", (
        MemberState("v", 6 * MAX_INCARNATION_STEP, Status.ALIVE, "10.0.0.1"),)), "t1", 12.2) \
        == [("v", Gossip("t2", (newer,)))]  # the next period
    # a member in step that is told what it already is says nothing
    assert nodes["v"].receive(Gossip("t2", (newer,)), "t2", 12.3) == []


# ---- scope (issue 14: gossip is LAN-local while the coordinator answers) ----------------------

def scoped(n: int, scope: set[str] | None, seed: int = 1) -> Membership:
    """METERED members b, c, ... (n with us) that probe and gossip only within `scope`."""
    m = Membership("a", "10.0.0.1", random.Random(seed), METERED)
    m.seed((chr(ord("b") + i), f"10.0.0.{i + 2}") for i in range(n - 1))
    m.set_scope(scope, 0.0)
    return m


def updates_of(msg: Message) -> tuple[MemberState, ...]:
    if isinstance(msg, PushPull):
        return msg.members
    return msg.updates if isinstance(msg, Ping | PingReq | Ack | Gossip) else ()


def test_a_scope_keeps_every_probe_push_pull_and_gossip_inside_it_for_an_idle_hour() -> None:
    m = scoped(7, {"b", "c"})
    sent = step(m, 3600.0, answer={"b", "c"})
    assert {dest for _, dest, _ in sent} == {"b", "c"}
    pings = [t for t, _, msg in sent if isinstance(msg, Ping)]
    assert len(pings) in (720, 721)  # one probe per 5 s interval
    push_pulls = [msg for _, _, msg in sent if isinstance(msg, PushPull)]
    assert push_pulls  # with the states of the scope only: nobody in it judges the others
    assert all(sorted(u.node_id for u in p.members) == ["a", "b", "c"] for p in push_pulls)
    # the members outside stay in the table, alive, and are never judged
    assert sorted(m.live_members()) == ["b", "c", "d", "e", "f", "g"]
    assert m.cluster_size() == 3 and m.gossip_peers() == ["b", "c"]
    assert [e.kind for e in m.drain_events()] == ["joined"] * 6


def test_an_empty_scope_sends_nothing() -> None:
    m = scoped(7, set())
    assert step(m, 3600.0, answer=set()) == []
    assert len(m.live_members()) == 6


def test_a_lone_neighbour_in_scope_is_the_only_one_probed_and_its_death_is_found() -> None:
    m = scoped(7, {"b"})
    t0, target, _ = first_probe(m)
    assert target == "b"
    m.drain_events()
    low = suspicion_timeout(METERED, 2)  # 2 members in scope: no confirmations expected
    assert low == 30.0
    sent = step(m, t0 + METERED.probe_interval + low, answer=set())  # b stopped at t0
    assert {dest for _, dest, _ in sent} == {"b"}
    assert not any(isinstance(msg, PingReq) for _, _, msg in sent)  # nobody to ask
    events = [(e.kind, e.node_id, e.at) for e in m.drain_events()]
    assert events == [("suspect", "b", t0 + METERED.probe_interval),
                      ("dead", "b", t0 + METERED.probe_interval + low)]


def test_members_outside_the_scope_are_neither_suspected_nor_declared_dead_by_us() -> None:
    m = scoped(7, {"b", "c"})
    m.tick(0.0)
    m.drain_events()
    # c has a wider scope (a coordinator outage of its own): it accuses g and f
    m.receive(Gossip("c", (MemberState("g", 3, Status.SUSPECT, ""),
                           MemberState("f", 2, Status.DEAD, ""))), "c", 10.0)
    for node_id, inc in (("g", 3), ("f", 2)):
        state = m.member(node_id)
        assert state is not None and (state.status, state.incarnation) == (Status.ALIVE, inc)
    assert m.drain_events() == []
    sent = step(m, 600.0, answer={"b", "c"})
    assert {dest for _, dest, _ in sent} <= {"b", "c"}
    # nor relayed: we do not vouch for what we do not judge
    assert not [u for _, _, msg in sent for u in updates_of(msg)
                if u.node_id in ("f", "g") and u.status != Status.ALIVE]
    # a refutation is taken
    m.receive(Gossip("c", (MemberState("g", 4, Status.ALIVE, ""),)), "c", 601.0)
    state = m.member("g")
    assert state is not None and state.incarnation == 4


def test_narrowing_the_scope_holds_the_members_outside_it_alive_again() -> None:
    m = scoped(4, None)  # b, c, d: the whole fleet (a coordinator outage)
    m.tick(0.0)
    m.receive(Gossip("b", (MemberState("c", 1, Status.SUSPECT, ""),
                           MemberState("d", 2, Status.DEAD, ""))), "b", 10.0)
    assert sorted(m.live_members()) == ["b", "c"]
    m.drain_events()
    m.set_scope({"b"}, 20.0)  # the coordinator answers again: b is our LAN
    assert [(e.kind, e.node_id, e.incarnation, e.at) for e in m.drain_events()] == [
        ("alive", "c", 1, 20.0), ("alive", "d", 2, 20.0)]
    assert sorted(m.live_members()) == ["b", "c", "d"]
    sent = step(m, 3600.0, answer={"b"})
    assert {dest for _, dest, _ in sent} == {"b"}
    assert m.drain_events() == []  # c's suspicion ran out with nobody declaring it dead
    # the scope opens again (another outage): our own probes judge c and d afresh
    m.set_scope(None, 3600.0)
    sent = step(m, 3700.0, answer={"b"})
    assert {"c", "d"} <= {dest for _, dest, _ in sent}
    assert sorted(e.node_id for e in m.drain_events() if e.kind == "dead") == ["c", "d"]


def test_members_outside_the_scope_are_answered_and_their_frames_checked() -> None:
    m = scoped(7, {"b", "c"})
    reported: list[tuple[str, str]] = []
    m.misbehaved = lambda sender, reason: reported.append((sender, reason))
    m.tick(0.0)
    # g, on another LAN and in an outage of its own, probes us: it gets its ack
    [(dest, ack)] = m.receive(Ping(5, "g"), "g", 1.0)
    assert dest == "g" and isinstance(ack, Ack) and ack.seq == 5
    [(dest, reply)] = m.receive(PushPull("g", (), False), "g", 1.5)
    assert dest == "g" and isinstance(reply, PushPull) and reply.is_reply
    # but we do not probe f for it: that would cross the WAN for a member we do not judge
    assert m.receive(PingReq(6, "g", "f"), "g", 2.0) == []
    assert m.counters["relays_out_of_scope"] == 1
    # what it claims is checked and reported as ever
    m.receive(Gossip("g", (MemberState("zz", 0, Status.ALIVE, ""),)), "g", 3.0)
    m.receive(PingReq(7, "g", "zz"), "g", 3.5)
    assert reported == [("g", "ghost_member"), ("g", "ghost_member")]
    # an implausible relay about a member in scope is resynced with it; about one outside the
    # scope it is only counted (being out of step with it costs us nothing)
    jump = MAX_INCARNATION_STEP + 1
    out = m.receive(Gossip("b", (MemberState("c", jump, Status.ALIVE, ""),
                                 MemberState("f", jump, Status.ALIVE, ""))), "b", 4.0)
    assert [dest for dest, _ in out] == ["c"]
    assert m.counters["implausible_incarnation"] == 2
