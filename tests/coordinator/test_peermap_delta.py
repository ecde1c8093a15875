"""Incremental peer maps in the core: which changes a delta names, when only the full map will
do, and (a property test) that a map kept up to date by deltas is always the full map."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator._peermap import DEVICE_VERSIONS, Member, PeerMapCore
from mesh.control import HubInfo, PeerMap, PeerMapDelta, peermap_answer
from vpn import generate_keypair

HUB = HubInfo(generate_keypair().public, "198.51.100.1:51820", "10.250.0.1", "fd7a:f1ee:7000::1",
              "https://10.250.0.1:8443")
KEYS = [generate_keypair().public for _ in range(24)]


def member(i: int, fleet: str = "f", key: int | None = None, **kw: object) -> Member:
    return Member(f"d{i}", fleet, KEYS[(i if key is None else key) % len(KEYS)],
                  f"10.250.0.{i + 2}", f"fd7a:f1ee:7000::{i + 2:x}",
                  **kw)  # type: ignore[arg-type]


def fleet(n: int, **kw: int) -> PeerMapCore:
    core = PeerMapCore(HUB, first_version=1000, **kw)
    for i in range(n):
        core.add(member(i))
        core.set_public(f"d{i}", f"203.0.113.{i + 1}:4000")
    core.publish()
    return core


def names(delta: PeerMapDelta) -> tuple[list[str], list[str]]:
    return [p.name for p in delta.upsert], list(delta.remove)


def test_a_delta_names_only_what_changed_and_applies_to_the_full_map() -> None:
    core = fleet(50)
    held = core.build("d0")
    core.set_public("d7", "203.0.113.99:5000")
    core.remove("d9")
    core.add(member(60))
    core.publish()
    delta = core.build_delta("d0", held.version)
    assert delta is not None
    assert names(delta) == (["d60", "d7"], ["d9"])
    assert delta.base == held.version and delta.version == core.version("d0")
    assert delta.apply(held) == core.build("d0")


def test_the_wire_form_is_the_delta_and_parses_back() -> None:
    core = fleet(5)
    held = core.build("d1")
    core.set_lan("d2", ("192.168.1.2:51820",))
    core.set_public("d3", "203.0.113.3:4001")
    core.set_relay_ips(["10.250.0.9/32"])
    core.targets_changed("f", "d1")
    core.punch("d4", "d1")
    core.publish()
    raw = core.render_delta("d1", held.version)
    assert raw is not None
    parsed = peermap_answer(json.loads(raw))
    assert parsed == core.build_delta("d1", held.version)
    assert isinstance(parsed, PeerMapDelta)
    after = parsed.apply(held)
    assert after == core.build("d1")
    assert after.relay_ips == ("10.250.0.9/32",) and after.punch[0][0] == "d4"
    # a full map has no base and parses as one
    assert isinstance(peermap_answer(json.loads(core.render("d1"))), PeerMap)


def test_head_only_changes_send_no_peer() -> None:
    core = fleet(20)
    held = core.build("d0")
    core.want_logs("d0", 1e9)
    core.set_relay_ips(["10.250.0.9/32"])
    core.publish()
    delta = core.build_delta("d0", held.version)
    assert delta is not None and names(delta) == ([], [])
    assert delta.apply(held) == core.build("d0")


def test_delta_size_does_not_grow_with_the_fleet() -> None:
    sizes = []
    for n in (100, 1000):
        core = fleet(n)
        held = core.build("d0")
        core.set_public("d5", "203.0.113.200:6000")
        core.publish()
        raw = core.render_delta("d0", held.version)
        assert raw is not None
        sizes.append(len(raw))
    assert sizes[0] == sizes[1]  # same change, same bytes: nothing of the fleet in it


def test_full_map_when_base_is_unknown_or_too_old() -> None:
    core = fleet(10, journal_publishes=3)
    held = core.build("d0")
    assert core.build_delta("d0", 0) is None  # first contact
    assert core.build_delta("d0", 17) is None  # another run's version (below this run's)
    assert core.build_delta("d0", core.version("d0") + 5) is None  # from the future
    for port in range(4):  # four publishes that change d1: the journal keeps three
        core.set_public("d1", f"203.0.113.2:{5000 + port}")
        core.publish()
    assert core.build_delta("d0", held.version) is None
    # a base the journal still covers gets a delta
    recent = core.version("d0")
    core.set_public("d1", "203.0.113.2:6000")
    core.publish()
    delta = core.build_delta("d0", recent)
    assert delta is not None and names(delta) == (["d1"], [])


def test_full_map_for_a_version_never_handed_to_that_device() -> None:
    """Another replica's or a made-up version inside this run's range, and another device's
    version, get the full map: a delta starts only from one of the device's own versions."""
    core = fleet(10)
    mine = core.version("d0")
    core.set_public("d0", "203.0.113.1:4100")  # d0's own port: the others move on, d0 not
    core.publish()
    theirs = core.version("d1")
    core.set_public("d1", "203.0.113.2:4200")  # now d0 moves on too
    core.publish()
    assert mine < theirs < core.version("d0")
    assert core.build_delta("d0", mine) is not None
    assert core.build_delta("d0", theirs) is None  # within d0's range, never d0's
    assert core.build_delta("d0", theirs - 1) is not None and theirs - 1 == mine


def test_full_map_after_more_versions_than_a_device_remembers() -> None:
    core = fleet(4)
    held = core.build("d0")
    for port in range(DEVICE_VERSIONS):  # d0 missed as many maps as it remembers versions
        core.set_public("d1", f"203.0.113.2:{5000 + port}")
        core.publish()
    assert core.build_delta("d0", held.version) is None
    assert core.build_delta("d0", core.version("d0") - 1) is not None


def test_full_map_when_the_journal_drops_names() -> None:
    core = fleet(30, journal_names=4)
    held = core.build("d0")
    for i in range(1, 6):  # five names in one publish: more than the journal keeps
        core.set_public(f"d{i}", f"203.0.113.{i + 1}:7000")
    core.publish()
    assert core.build_delta("d0", held.version) is None


def test_own_public_ip_change_means_a_full_map() -> None:
    core = PeerMapCore(HUB, first_version=1000)
    for i in range(4):
        core.add(member(i, lan_endpoints=(f"192.168.1.{i + 10}:51820",)))
    core.set_public("d0", "203.0.113.7:1")
    core.set_public("d1", "203.0.113.7:2")
    core.publish()
    held = core.build("d0")
    assert held.peers[0].lan  # d1 behind the same NAT: its LAN endpoints
    core.set_public("d0", "198.51.100.50:1")  # d0 moved: every LAN/WAN choice may flip
    assert core.build_delta("d0", held.version) is None  # also while it is pending
    core.publish()
    assert core.build_delta("d0", held.version) is None
    # from the version it then gets, deltas again
    now = core.build("d0")
    assert not now.peers[0].lan
    core.set_public("d2", "203.0.113.8:1")
    core.publish()
    delta = core.build_delta("d0", now.version)
    assert delta is not None and delta.apply(now) == core.build("d0")
    # a port change alone does not change its view: others get d0 as an upsert, d0 a delta
    others = core.build("d1")
    core.set_public("d0", "198.51.100.50:2")
    core.publish()
    delta = core.build_delta("d1", others.version)
    assert delta is not None and names(delta) == (["d0"], [])


def test_a_device_that_joined_again_gets_a_full_map() -> None:
    core = fleet(6)
    held, other = core.build("d3"), core.build("d0")
    core.remove("d3")
    core.add(member(3, key=20))  # enrolled again, a new key
    core.publish()
    assert core.build_delta("d3", held.version) is None
    delta = core.build_delta("d0", other.version)  # the others get its new entry
    assert delta is not None and delta.upsert[0].public_key == KEYS[20]


def test_fleets_are_apart_in_deltas_too() -> None:
    core = fleet(4)
    core.add(member(10, fleet="g"))
    core.publish()
    held = core.build("d0")
    core.set_public("d10", "203.0.113.50:1")  # another fleet's change: not in f's deltas
    core.set_public("d1", "203.0.113.51:1")
    core.remove("d2")
    core.add(member(2, fleet="g"))  # moved to g: gone from f
    core.publish()
    delta = core.build_delta("d0", held.version)
    assert delta is not None and names(delta) == (["d1"], ["d2"])
    assert delta.apply(held) == core.build("d0")


# -- property: a map kept by deltas is the full map, whatever happens ---------------------

N_NAMES = 8
IPS = ("203.0.113.1", "203.0.113.2", "198.51.100.3")
name_st = st.integers(0, N_NAMES - 1)
op_st = st.one_of(
    st.tuples(st.just("join"), name_st, st.sampled_from(("f", "g")), st.integers(0, 3)),
    st.tuples(st.just("leave"), name_st),
    st.tuples(st.just("endpoint"), name_st, st.sampled_from(IPS), st.integers(1, 3)),
    st.tuples(st.just("lan"), name_st, st.integers(0, 2)),
    st.tuples(st.just("targets"), name_st),
    st.tuples(st.just("punch"), name_st, name_st),
    st.tuples(st.just("logs"), name_st),
    st.tuples(st.just("relay"), st.integers(0, 2)),
    st.tuples(st.just("publish")),
    st.tuples(st.just("fetch"), name_st),  # a device asks while changes are pending
)


def _apply_op(core: PeerMapCore, op: tuple[object, ...]) -> None:
    kind, args = op[0], op[1:]
    name = f"d{args[0]}" if args and kind != "relay" else ""
    if kind == "join":
        i, fleet_name, key = args  # type: ignore[misc]
        old = core.member(name)
        core.add(member(i, fleet=fleet_name, key=key,  # type: ignore[arg-type]
                        public_endpoint=old.public_endpoint if old else None,
                        public_ip=old.public_ip if old else None,
                        lan_endpoints=old.lan_endpoints if old else ()))
    elif kind == "leave":
        core.remove(name)
    elif kind == "endpoint":
        core.set_public(name, f"{args[1]}:{args[2]}")
    elif kind == "lan":
        core.set_lan(name, tuple(f"192.168.1.{k + 10}:51820" for k in range(args[1])))  # type: ignore[call-overload]
    elif kind == "targets":
        member_ = core.member(name)
        if member_ is not None:
            core.targets_changed(member_.fleet, name)
    elif kind == "punch":
        core.punch(name, f"d{args[1]}")
    elif kind == "logs":
        core.want_logs(name, 1e9)
    elif kind == "relay":
        core.set_relay_ips([f"10.250.1.{k}/32" for k in range(args[0])])  # type: ignore[call-overload]
    elif kind == "publish":
        core.publish()


def _sync(core: PeerMapCore, held: dict[str, PeerMap], name: str, counts: dict[str, int]
          ) -> None:
    """What an agent does: a delta on the map it holds (only from its own base), else the full
    map; then it must hold exactly what the coordinator would send whole."""
    have = held.get(name)
    if have is not None and have.version == core.version(name):
        return
    delta = core.build_delta(name, have.version) if have is not None else None
    if delta is not None and have is not None:
        assert delta.base == have.version
        wire = PeerMapDelta.from_json(json.loads(json.dumps(delta.to_json())))
        held[name] = wire.apply(have)
        counts["delta"] += 1
    else:
        held[name] = core.build(name)
        counts["full"] += 1
    assert held[name] == core.build(name)
    assert json.loads(core.render(name)) == held[name].to_json()


def _start(core: PeerMapCore, held: dict[str, PeerMap], counts: dict[str, int]) -> None:
    """Six devices of fleet f, two behind one NAT with LAN candidates, each holding its map."""
    for i in range(6):
        core.add(member(i, key=i, lan_endpoints=(f"192.168.1.{i + 10}:51820",)))
        core.set_public(f"d{i}", f"{IPS[min(i, 2)]}:{i + 1}")
    core.publish()
    for m in list(core.members()):
        _sync(core, held, m.name, counts)


Step = tuple[tuple[object, ...], bool, frozenset[int]]


def _run(core: PeerMapCore, steps: list[Step]) -> dict[str, int]:
    """Each step: a change, whether a publish follows, and which devices then sync (the others
    lag behind, and ask later with `fetch`, maybe while other changes are pending)."""
    held: dict[str, PeerMap] = {}  # an agent's map survives its device leaving (its cache)
    counts = {"delta": 0, "full": 0}
    _start(core, held, counts)
    for op, publish, syncing in steps:
        _apply_op(core, op)
        if op[0] == "fetch" and f"d{op[1]}" in core:
            _sync(core, held, f"d{op[1]}", counts)
        if publish:
            core.publish()
            for i in sorted(syncing):
                if f"d{i}" in core:
                    _sync(core, held, f"d{i}", counts)
    core.publish()
    for m in list(core.members()):
        _sync(core, held, m.name, counts)
        assert held[m.name] == core.build(m.name)
    return counts


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(op_st, st.booleans(),
                                st.frozensets(name_st, min_size=N_NAMES - 2)),
                      min_size=5, max_size=60),
       journal=st.sampled_from((2, 5, 256)))
def test_maps_kept_by_deltas_equal_the_full_map_at_every_step(
        steps: list[Step], journal: int) -> None:
    _run(PeerMapCore(HUB, first_version=1000, journal_publishes=journal,
                     journal_names=3 * journal), steps)


def test_the_property_exercises_deltas() -> None:
    """The property above must not pass by always falling back to full maps."""
    everyone = frozenset(range(N_NAMES))
    steps: list[Step] = [
        (("endpoint", 1, IPS[0], 1), False, everyone), (("lan", 1, 2), True, everyone),
        (("leave", 3), False, everyone), (("fetch", 0), True, everyone),
        (("join", 3, "f", 9), False, everyone), (("punch", 2, 4), True, everyone),
        (("endpoint", 0, IPS[2], 1), True, everyone), (("join", 7, "f", 7), True, everyone)]
    counts = _run(PeerMapCore(HUB, first_version=1000), steps)
    assert counts["delta"] >= 25 and counts["full"] >= 8, counts


def test_two_replicas_on_one_clock_never_hand_out_the_same_version() -> None:
    """Replicas on one database (docs/scale.md) each run their own core; a device that fails
    over asks the other with the number it holds. Versions are milliseconds x stride + a
    per-process tag, so the other replica never answers 304 (or a delta) for a number it
    did not give: with version = clock ms + publishes (before), two replicas started 5 ms
    apart handed the same device the same numbers."""
    stride = 1024
    tags = (7, 300)
    cores = [PeerMapCore(HUB, first_version=1_000_000 * stride + tag, stride=stride)
             for tag in tags]
    handed: list[set[int]] = [set(), set()]
    for step in range(400):
        now_ms = 1_000_000 + step // 3  # several publishes within one millisecond too
        for core, tag, seen in zip(cores, tags, handed, strict=True):
            core.add(member(step % 20))  # a change: every device of the fleet is pending
            core.publish(now_ms * stride + tag)
            v = core.version("d0")
            assert v % stride == tag
            assert not seen or v > max(seen)  # still increasing within a run
            seen.add(v)
    assert not handed[0] & handed[1]
    # a floor far ahead (the clock moved on) is taken, low bits kept
    cores[0].add(member(21))
    cores[0].publish(2_000_000 * stride)
    assert cores[0].version("d0") == 2_000_000 * stride - stride + 7
