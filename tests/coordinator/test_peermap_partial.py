"""Partial peer maps in the core (docs/policy.md): with a fleet policy a device's map holds its
LAN neighbours, the peers the policy lets it reach or be reached by (with the ports), a few
cross-LAN gossip partners and the peers it asked for; a change marks only the devices whose
view changed; a map kept by deltas is always the full map; a 10,000-device fleet's map is as
large as a device's allowed peers, not the fleet."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator._peermap import GOSSIP_PARTNERS, MAX_ASKED, RING_WALK, Member, PeerMapCore
from mesh.control import HubInfo, PeerMap
from mesh.policy import ANY, Ports, parse_policy, parse_ports
from vpn import generate_keypair

from .test_peermap_delta import _sync as sync_by_delta

HUB = HubInfo(generate_keypair().public, "198.51.100.1:51820", "10.250.0.1", "fd7a:f1ee:7000::1",
              "https://10.250.0.1:8443")
KEY = generate_keypair().public
POLICY = parse_policy("role=cam -> role=nvr tcp/554\nrole=nvr <-> role=nvr tcp/7000\n")


def member(i: int, role: str, ip: str | None = None, fleet: str = "f") -> Member:
    return Member(f"d{i}", fleet, KEY, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                  f"fd7a:f1ee:7000::{i + 1:x}", public_endpoint=f"{ip}:4000" if ip else None,
                  public_ip=ip, tags=(("role", role),))


def names(m: PeerMap) -> set[str]:
    return {p.name for p in m.peers}


# -- an independent reference: every pair checked by hand, the ring walked naively --------

def ring_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def ref_gossip(members: list[Member], name: str) -> set[str]:
    ring = sorted(members, key=lambda m: (ring_hash(m.name), m.name))
    pos = {m.name: i for i, m in enumerate(ring)}

    def picks(i: int) -> set[str]:
        out: list[str] = []
        for j in range(1, min(RING_WALK, len(ring) - 1) + 1):
            other = ring[(i + j) % len(ring)]
            if ring[i].public_ip is None or other.public_ip != ring[i].public_ip:
                out.append(other.name)
        return set(out[:GOSSIP_PARTNERS])

    return picks(pos[name]) | {m.name for m in ring if name in picks(pos[m.name])}


def ref_ports(members: dict[str, Member], a: str, b: str) -> Ports | None:
    """What `a` may send to `b` under POLICY-like rules, every rule checked for the pair."""
    ma, mb = members[a], members[b]
    if ma.public_ip is not None and ma.public_ip == mb.public_ip:
        return ANY
    ra, rb = dict(ma.tags).get("role"), dict(mb.tags).get("role")
    out = []
    if ra == "cam" and rb == "nvr":
        out.append(parse_ports("tcp/554"))
    if ra == "nvr" and rb == "nvr":
        out.append(parse_ports("tcp/7000"))
    return Ports.of(r for p in out for r in p.ranges) if out else None


def check_exact(core: PeerMapCore, asked: dict[str, set[str]] | None = None) -> None:
    members = {m.name: m for m in core.members()}
    fleet = [m for m in members.values() if m.fleet == "f"]
    for m in fleet:
        allowed = {n for n in members if n != m.name and members[n].fleet == "f" and (
            ref_ports(members, m.name, n) or ref_ports(members, n, m.name))}
        want = allowed | ref_gossip(fleet, m.name) | (asked or {}).get(m.name, set())
        got = core.build(m.name)
        assert names(got) == want, m.name
        for p in got.peers:
            assert p.send == (ref_ports(members, m.name, p.name) or Ports(()))
            assert p.accept == (ref_ports(members, p.name, m.name) or Ports(()))


def site_fleet(n: int, policy: bool = True) -> PeerMapCore:
    """n devices: every 10th an nvr, the rest cams; LANs of 4 (same public IP)."""
    core = PeerMapCore(HUB, first_version=1000)
    if policy:
        core.set_policy("f", POLICY)
    for i in range(n):
        core.add(member(i, "nvr" if i % 10 == 0 else "cam", f"203.0.{i // 4 >> 8}.{i // 4 & 255}"))
    core.publish()
    return core


def test_without_a_policy_the_map_is_the_whole_fleet() -> None:
    core = site_fleet(30, policy=False)
    m = core.build("d3")
    assert names(m) == {f"d{i}" for i in range(30)} - {"d3"}
    assert all(p.send is None and p.accept is None for p in m.peers)
    assert "send" not in json.loads(core.render("d3"))["peers"][0]


def test_with_a_policy_a_map_holds_exactly_the_allowed_peers_and_gossip_partners() -> None:
    core = site_fleet(60)
    check_exact(core)
    cam = core.build("d3")
    assert len(cam.peers) < 25  # 6 nvrs, 3 LAN neighbours, a few gossip partners
    # the wire form carries the ports, and the rendered bytes are the built map
    assert json.loads(core.render("d3")) == cam.to_json()
    assert PeerMap.from_json(json.loads(core.render("d3"))) == cam


def test_gossip_partners_are_bounded_and_across_lans() -> None:
    core = site_fleet(200)
    members = {m.name: m for m in core.members()}
    counts = []
    for m in core.members():
        partners = ref_gossip(list(members.values()), m.name)
        assert all(members[p].public_ip != m.public_ip for p in partners)
        assert names(core.build(m.name)) >= partners
        counts.append(len(partners))
    assert min(counts) >= GOSSIP_PARTNERS and max(counts) <= 2 * RING_WALK
    # the fleet's gossip graph is connected across LANs
    seen, todo = {"d0"}, ["d0"]
    while todo:
        for p in ref_gossip(list(members.values()), todo.pop()):
            if p not in seen:
                seen.add(p)
                todo.append(p)
    assert len(seen) == 200


def test_a_policy_change_marks_only_the_devices_whose_peers_or_ports_change() -> None:
    core = site_fleet(80)
    before = {m.name: core.build(m.name) for m in core.members()}
    # the nvrs' mutual ports change; cams keep theirs
    core.set_policy("f", parse_policy("role=cam -> role=nvr tcp/554\n"
                                      "role=nvr <-> role=nvr tcp/7000-7001\n"))
    marked = core.publish()
    assert marked == {f"d{i}" for i in range(0, 80, 10)}
    for m in core.members():
        if m.name not in marked:
            assert core.build(m.name).peers == before[m.name].peers
    nvr = {p.name: p for p in core.build("d0").peers}
    assert nvr["d10"].send == parse_ports("tcp/7000-7001")
    assert nvr["d1"].accept == ANY == nvr["d1"].send  # a LAN neighbour
    assert nvr["d11"].accept == parse_ports("tcp/554") and nvr["d11"].send == Ports(())


def test_a_tag_change_marks_the_devices_whose_view_of_it_changed_and_nobody_else() -> None:
    core = site_fleet(80)
    core.set_tags("d5", [("role", "spare")])  # a cam no rule names: no longer reaches the nvrs
    marked = core.publish()
    # the nvrs lose it (unless it is one of their gossip partners: then its ports change);
    # its LAN neighbours (any, both ways) and gossip partners see no change
    assert marked == {f"d{i}" for i in range(0, 80, 10)} | {"d5"}
    check_exact(core)


def test_a_join_marks_its_peers_and_ring_neighbours_not_the_fleet() -> None:
    core = site_fleet(400)
    core.add(member(400, "cam", "198.51.100.77"))
    marked = core.publish()
    members = list(core.members())
    nvrs = {f"d{i}" for i in range(0, 400, 10)}
    assert nvrs | {"d400"} <= marked
    # plus only the ring neighbours whose partners changed
    assert len(marked - nvrs - {"d400"}) <= 2 * RING_WALK
    assert ref_gossip(members, "d400") <= marked
    check_exact(core)


def test_asked_peers_join_both_maps_until_one_leaves() -> None:
    core = site_fleet(40)
    assert "d21" not in names(core.build("d3"))
    assert core.punch("d3", "d21")
    marked = core.publish()
    assert {"d3", "d21"} <= marked
    check_exact(core, {"d3": {"d21"}, "d21": {"d3"}})
    entry = {p.name: p for p in core.build("d3").peers}["d21"]
    assert entry.send == Ports(()) and entry.accept == Ports(())  # only fleetmesh's own
    core.remove("d21")
    core.publish()
    check_exact(core)


def test_a_device_asking_for_every_peer_holds_at_most_max_asked_of_them() -> None:
    """A hostile device that punches every device of its fleet does not turn its partial map
    back into the whole fleet, nor stay in every victim's map: each side holds at most
    MAX_ASKED peers on request, the oldest asks going first (both ways)."""
    core = site_fleet(200)
    hostile = "d3"
    held: dict[str, PeerMap] = {}
    counts = {"delta": 0, "full": 0}
    for m in core.members():
        sync_by_delta(core, held, m.name, counts)
    for batch in range(0, 200, 25):  # every map kept by deltas stays the full map
        for i in range(batch, batch + 25):
            core.punch(hostile, f"d{i}")
        core.publish()
        for m in core.members():
            sync_by_delta(core, held, m.name, counts)
    assert counts["delta"] > 0
    members = {m.name: m for m in core.members()}
    fleet = list(members.values())
    own = {n for n in members if n != hostile and (
        ref_ports(members, hostile, n) or ref_ports(members, n, hostile))} \
        | ref_gossip(fleet, hostile)
    asked = names(core.build(hostile)) - own
    assert len(asked) == MAX_ASKED, len(asked)
    # the latest asks are kept, of those that were not in its map anyway
    latest = [f"d{i}" for i in range(199, -1, -1) if f"d{i}" not in own | {hostile}][:MAX_ASKED]
    assert asked == set(latest)
    holders = {m.name for m in fleet if hostile in names(core.build(m.name))}
    assert holders - own == asked
    check_exact(core, {hostile: asked, **{n: {hostile} for n in asked}})


def test_map_size_at_10000_devices_follows_the_allowed_peers_not_the_fleet() -> None:
    """10,000 devices in 50 sites (LANs of 4); each site has one nvr its cams stream to."""
    core = PeerMapCore(HUB, first_version=1000)
    core.set_policy("f", parse_policy("role=cam,site=s0 -> role=nvr,site=s0 tcp/554\n"
                                      "role=nvr <-> role=nvr tcp/7000\n"))
    for i in range(10_000):
        site = f"s{i % 50}"
        role = "nvr" if i < 50 else "cam"
        m = member(i, role, f"198.18.{i // 4 >> 8}.{i // 4 & 255}")
        core.add(Member(m.name, "f", m.public_key, m.mesh_ipv4, m.mesh_ipv6,
                        public_endpoint=m.public_endpoint, public_ip=m.public_ip,
                        tags=(("role", role), ("site", site))))
    core.publish()
    cam = core.build("d1000")  # site s0, a cam: reaches nvr d0 only
    nvr = core.build("d0")  # reached by s0's 199 cams, peers with the other 49 nvrs
    other = core.build("d1001")  # a cam of site s1: no rule at all
    assert len(cam.peers) <= 1 + 3 + 2 * RING_WALK
    assert "d0" in names(cam)
    assert len(nvr.peers) <= 199 + 49 + 3 + 2 * RING_WALK
    assert len(other.peers) <= 3 + 2 * RING_WALK
    # one re-tag at 10,000 devices marks a handful, not the fleet
    marks = core.marks
    core.set_tags("d1001", [("role", "cam"), ("site", "s3")])
    assert len(core.publish()) <= 1 + 3 + 2 * RING_WALK
    assert core.marks - marks <= 1 + 3 + 2 * RING_WALK


# -- property: with a policy, a map kept by deltas is the full map, and an unmarked device's
# map never changed ------------------------------------------------------------------------

N = 10
IPS = ("203.0.113.1", "203.0.113.2", "198.51.100.3", "198.51.100.4")
ROLES = ("cam", "nvr", "gw")
POLICIES = (POLICY, parse_policy("role=gw -> * icmp\nrole=cam <-> role=cam udp/5000\n"),
            parse_policy(""), None)
name_st = st.integers(0, N - 1)
op_st = st.one_of(
    st.tuples(st.just("join"), name_st, st.sampled_from(ROLES), st.sampled_from(IPS)),
    st.tuples(st.just("leave"), name_st),
    st.tuples(st.just("endpoint"), name_st, st.sampled_from(IPS), st.integers(1, 3)),
    st.tuples(st.just("tag"), name_st, st.sampled_from(ROLES)),
    st.tuples(st.just("punch"), name_st, name_st),
    st.tuples(st.just("policy"), st.integers(0, len(POLICIES) - 1)),
)


def _sync(core: PeerMapCore, held: dict[str, PeerMap], name: str, counts: dict[str, int]
          ) -> None:
    """An agent's sync (a delta on the map it holds, else the full map); a device that was
    not marked must find its held map still right."""
    have = held.get(name)
    if have is not None and have.version == core.version(name):
        assert have == core.build(name), f"{name} was not marked but its map changed"
    sync_by_delta(core, held, name, counts)


def _run(steps: list[tuple[tuple[object, ...], bool]]) -> dict[str, int]:
    core = PeerMapCore(HUB, first_version=1000)
    core.set_policy("f", POLICY)
    for i in range(N - 2):
        core.add(member(i, ROLES[i % 3], IPS[i % 4]))
    core.publish()
    held: dict[str, PeerMap] = {}
    counts = {"delta": 0, "full": 0}
    for op, publish in steps:
        kind = op[0]
        name = f"d{op[1]}" if kind != "policy" else ""
        if kind == "join":
            core.add(member(op[1], op[2], op[3]))  # type: ignore[arg-type]
        elif kind == "leave":
            core.remove(name)
        elif kind == "endpoint":
            core.set_public(name, f"{op[2]}:{op[3]}")
        elif kind == "tag":
            core.set_tags(name, [("role", op[2])])  # type: ignore[list-item]
        elif kind == "punch":
            core.punch(name, f"d{op[2]}")
        else:
            core.set_policy("f", POLICIES[op[1]])  # type: ignore[index]
        if publish:
            core.publish()
            for m in list(core.members()):
                _sync(core, held, m.name, counts)
    core.publish()
    for m in list(core.members()):
        _sync(core, held, m.name, counts)
    return counts


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(op_st, st.booleans()), min_size=3, max_size=40))
def test_partial_maps_kept_by_deltas_equal_the_full_map_and_unmarked_maps_stay(
        steps: list[tuple[tuple[object, ...], bool]]) -> None:
    _run(steps)


def test_the_property_exercises_deltas() -> None:
    steps: list[tuple[tuple[object, ...], bool]] = [
        (("endpoint", 1, IPS[0], 2), True), (("tag", 2, "nvr"), True), (("leave", 4), True),
        (("join", 8, "cam", IPS[1]), True), (("punch", 0, 5), True), (("tag", 0, "gw"), True),
        (("policy", 1), True), (("join", 9, "gw", IPS[3]), True)]
    counts = _run(steps)
    assert counts["delta"] >= 15 and counts["full"] >= 8, counts


def test_ports_too_long_for_an_entry_are_widened_to_their_protocols_never_narrowed() -> None:
    many = ",".join(f"tcp/{1000 + 10 * i}" for i in range(40)) + ",udp/53"
    core = PeerMapCore(HUB, first_version=1000)
    core.set_policy("f", parse_policy(f"role=cam -> role=nvr {many}\n"))
    core.add(member(1, "cam", "203.0.113.1"))
    core.add(member(2, "nvr", "203.0.113.2"))
    core.publish()
    entry = core.build("d1").peers[0]
    assert entry.send == parse_ports("tcp,udp")
    assert all(entry.send.allows("tcp", 1000 + 10 * i) for i in range(40))
    assert PeerMap.from_json(json.loads(core.render("d1"))) == core.build("d1")


def test_the_hub_filter_rules_follow_the_published_policy_and_tags() -> None:
    core = site_fleet(20)
    rules, sides = core.filter_rules()
    # cam -> nvr, and nvr <-> nvr as one edge each way
    assert rules == {"f": [parse_ports("tcp/554"), parse_ports("tcp/7000"),
                           parse_ports("tcp/7000")]}
    assert sides["d1"] == {"0s"} and sides["d0"] == {"0d", "1s", "1d", "2s", "2d"}
    version = core.filter_version
    core.set_tags("d1", [("role", "nvr")])
    assert core.filter_rules()[1]["d1"] == {"0s"}  # what is published, until the next publish
    core.publish()
    assert core.filter_version > version
    assert core.filter_rules()[1]["d1"] == {"0d", "1s", "1d", "2s", "2d"}
    core.set_policy("f", None)  # no policy: the hub's any-to-any chain for the fleet
    core.publish()
    assert core.filter_rules() == ({}, {})
