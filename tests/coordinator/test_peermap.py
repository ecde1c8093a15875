"""The peer-map core with explicit inputs: endpoint choice, versions, batching, O(N) work."""

from __future__ import annotations

import json

import pytest

from coordinator._peermap import Member, PeerMapCore
from mesh.control import ControlError, HubInfo, PeerMap
from vpn import generate_keypair

HUB = HubInfo(generate_keypair().public, "198.51.100.1:51820", "10.250.0.1", "fd7a:f1ee:7000::1",
              "https://10.250.0.1:8443")
KEYS = [generate_keypair().public for _ in range(8)]


def member(i: int, fleet: str = "f", **kw: object) -> Member:
    return Member(f"d{i}", fleet, KEYS[i % len(KEYS)] if i < len(KEYS) else
                  generate_keypair().public, f"10.250.0.{i + 2}", f"fd7a:f1ee:7000::{i + 2:x}",
                  **kw)  # type: ignore[arg-type]


def entry(core: PeerMapCore, viewer: str, peer: str):
    return {p.name: p for p in core.build(viewer).peers}[peer]


def test_same_public_ip_gets_lan_endpoints_else_mapped_endpoint() -> None:
    core = PeerMapCore(HUB)
    core.add(member(0, lan_endpoints=("192.168.1.10:51820",)))
    core.add(member(1, lan_endpoints=("192.168.1.11:51820",)))
    core.add(member(2, lan_endpoints=("10.0.0.5:51820",)))
    core.set_public("d0", "203.0.113.7:40001")
    core.set_public("d1", "203.0.113.7:40002")  # same NAT as d0
    core.set_public("d2", "198.51.100.9:1234")
    e = entry(core, "d0", "d1")
    assert e.endpoints == ("192.168.1.11:51820",) and e.lan
    e = entry(core, "d0", "d2")
    assert e.endpoints == ("198.51.100.9:1234",) and not e.lan
    e = entry(core, "d2", "d0")
    assert e.endpoints == ("203.0.113.7:40001",) and not e.lan


def test_unknown_endpoint_means_relay_only_and_no_self_entry() -> None:
    core = PeerMapCore(HUB)
    core.add(member(0))
    core.add(member(1))
    m = core.build("d0")
    assert [p.name for p in m.peers] == ["d1"]
    assert m.peers[0].endpoints == () and not m.peers[0].lan


def test_same_nat_without_lan_candidates_falls_back_to_mapped() -> None:
    core = PeerMapCore(HUB)
    core.add(member(0))
    core.add(member(1))
    core.set_public("d0", "203.0.113.7:1")
    core.set_public("d1", "203.0.113.7:2")
    assert entry(core, "d0", "d1").endpoints == ("203.0.113.7:2",)


def test_fleets_do_not_see_each_other() -> None:
    core = PeerMapCore(HUB)
    core.add(member(0, fleet="a"))
    core.add(member(1, fleet="b"))
    core.add(member(2, fleet="a"))
    assert [p.name for p in core.build("d0").peers] == ["d2"]
    assert core.build("d1").peers == ()


def test_versions_change_only_when_published_and_together() -> None:
    core = PeerMapCore(HUB, first_version=100)
    core.add(member(0))
    core.add(member(1))
    core.publish()
    v0, v1 = core.version("d0"), core.version("d1")
    assert v0 == v1 > 100
    core.set_public("d0", "203.0.113.7:1")
    core.set_public("d1", "198.51.100.2:2")
    # pending: nobody sees a new version before the batch is published
    assert (core.version("d0"), core.version("d1")) == (v0, v1)
    assert core.publish() == {"d0", "d1"}
    assert core.version("d0") == core.version("d1") > v0  # both sides at the same moment
    assert core.publish() == set()


def test_unchanged_input_bumps_nothing() -> None:
    core = PeerMapCore(HUB)
    core.add(member(0))
    core.add(member(1))
    core.set_public("d0", "203.0.113.7:1")
    core.publish()
    assert not core.set_public("d0", "203.0.113.7:1")
    assert not core.set_lan("d0", ())
    assert core.publish() == set()


def test_port_change_does_not_bump_own_map_but_ip_change_does() -> None:
    core = PeerMapCore(HUB)
    for i in range(3):
        core.add(member(i))
    core.set_public("d0", "203.0.113.7:1")
    core.publish()
    core.set_public("d0", "203.0.113.7:2")
    assert core.publish() == {"d1", "d2"}
    core.set_public("d0", "198.51.100.3:2")
    assert core.publish() == {"d0", "d1", "d2"}


def test_lan_change_marks_only_same_nat_neighbours() -> None:
    core = PeerMapCore(HUB)
    for i in range(5):
        core.add(member(i))
    core.set_public("d0", "203.0.113.7:1")
    core.set_public("d1", "203.0.113.7:2")
    core.set_public("d2", "198.51.100.3:3")
    core.publish()
    core.set_lan("d0", ("192.168.1.10:51820",))
    assert core.publish() == {"d1"}


def test_one_change_is_linear_work_not_quadratic() -> None:
    def marks_for_one_change(n: int) -> int:
        core = PeerMapCore(HUB)
        for i in range(n):
            core.add(member(i))
        core.publish()
        before = core.marks
        core.set_public("d0", "203.0.113.7:1")
        changed = core.publish()
        assert len(changed) == n  # everybody's entry for d0 changed, d0's own IP changed
        return core.marks - before

    small, large = marks_for_one_change(100), marks_for_one_change(1000)
    assert small <= 100 and large <= 1000  # one mark per affected device, no rebuilds
    assert large / small <= 10.5


def test_remove_drops_peer_from_everyone_and_bumps_them() -> None:
    core = PeerMapCore(HUB)
    for i in range(3):
        core.add(member(i))
    core.publish()
    core.remove("d1")
    assert core.publish() == {"d0", "d2"}
    assert [p.name for p in core.build("d0").peers] == ["d2"]
    assert "d1" not in core and core.version("d1") == 0


def test_relay_ips_reach_every_map() -> None:
    core = PeerMapCore(HUB)
    core.add(member(0, fleet="a"))
    core.add(member(1, fleet="b"))
    core.publish()
    assert core.set_relay_ips(["10.250.0.9/32", "fd7a:f1ee:7000::9/128"])
    assert core.publish() == {"d0", "d1"}
    assert core.build("d0").relay_ips == ("10.250.0.9/32", "fd7a:f1ee:7000::9/128")


def test_render_is_the_json_of_build_and_parses() -> None:
    core = PeerMapCore(HUB)
    core.add(member(0, lan_endpoints=("192.168.1.10:51820",)))
    core.add(member(1, lan_endpoints=("192.168.1.11:51820",)))
    core.add(member(2))
    core.set_public("d0", "203.0.113.7:1")
    core.set_public("d1", "203.0.113.7:2")
    core.set_public("d2", "[2001:db8::1]:3")
    core.set_relay_ips(["10.250.0.9/32"])
    core.publish()
    for name in ("d0", "d1", "d2"):
        rendered = json.loads(core.render(name))
        assert rendered == core.build(name).to_json()
        assert PeerMap.from_json(rendered) == core.build(name)
    # a fragment cached for one viewer must not leak into another's choice
    core.set_lan("d1", ("192.168.1.99:51820",))
    assert json.loads(core.render("d0"))["peers"][0]["endpoints"] == ["192.168.1.99:51820"]
    assert json.loads(core.render("d2"))["peers"][1]["endpoints"] == ["203.0.113.7:2"]


def test_target_changes_reach_devices_through_their_maps() -> None:
    core = PeerMapCore(HUB)
    for i in range(3):
        core.add(member(i, fleet="a" if i < 2 else "b"))
    core.publish()
    before = {n: core.version(n) for n in ("d0", "d1", "d2")}
    assert core.build("d0").targets == 0
    # one device's own target (a pin): only its map changes
    assert core.targets_changed("a", "d1") == 1
    assert core.publish() == {"d1"}
    assert core.build("d1").targets > 0 and core.build("d0").targets == 0
    rev = core.build("d1").targets
    # the fleet's target: every device of that fleet, none of another fleet
    assert core.targets_changed("a") == 2
    assert core.publish() == {"d0", "d1"}
    assert core.build("d0").targets == core.build("d1").targets > rev
    assert core.version("d2") == before["d2"] and core.build("d2").targets == 0
    # unknown device or fleet: nothing marked
    assert core.targets_changed("a", "d2") == 0 and core.targets_changed("zz") == 0
    assert core.publish() == set()
    # what devices fetch carries it
    assert PeerMap.from_json(json.loads(core.render("d0"))).targets == core.build("d0").targets


def test_a_punch_request_reaches_only_the_peer_with_a_growing_stamp() -> None:
    core = PeerMapCore(HUB)
    for i in range(3):
        core.add(member(i))
    core.add(member(3, fleet="other"))
    core.publish()
    before = {n: core.version(n) for n in ("d0", "d1", "d2", "d3")}
    assert core.build("d1").punch == ()
    assert core.punch("d0", "d1")
    assert core.publish() == {"d1"}  # only the asked peer's map changes
    assert core.version("d0") == before["d0"] and core.version("d2") == before["d2"]
    first = dict(core.build("d1").punch)["d0"]
    assert core.punch("d0", "d1") and core.punch("d2", "d1")
    core.publish()
    again = dict(core.build("d1").punch)
    assert again["d0"] > first and set(again) == {"d0", "d2"}
    assert PeerMap.from_json(json.loads(core.render("d1"))).punch == core.build("d1").punch
    # never across fleets, never to itself, never for a stranger
    assert not core.punch("d0", "d3") and not core.punch("d0", "d0")
    assert not core.punch("zz", "d1") and not core.punch("d0", "zz")
    # a requester that leaves is forgotten, and so is the map of one that leaves
    core.remove("d0")
    assert dict(core.build("d1").punch) == {"d2": again["d2"]}
    core.remove("d1")
    assert core.punch("d2", "d1") is False


def test_logs_wanted_reaches_only_that_devices_map() -> None:
    core = PeerMapCore(HUB)
    for i in range(3):
        core.add(member(i))
    core.publish()
    assert core.want_logs("d1", 1_800_000_300.0)
    assert not core.want_logs("nope", 1.0)
    assert core.publish() == {"d1"}
    assert core.build("d1").logs_wanted_until == core.logs_wanted_until("d1") == 1_800_000_300.0
    assert core.build("d0").logs_wanted_until == 0.0
    for name in ("d0", "d1"):
        assert PeerMap.from_json(json.loads(core.render(name))) == core.build(name)
    core.remove("d1")
    assert core.logs_wanted_until("d1") == 0.0


def test_logs_wanted_until_is_validated_where_maps_arrive() -> None:
    core = PeerMapCore(HUB)
    core.add(member(0))
    core.publish()
    good = core.build("d0").to_json()
    assert good["logs_wanted_until"] == 0.0  # not wanted, said explicitly
    del good["logs_wanted_until"]  # a coordinator from before the field: it never asks
    assert PeerMap.from_json(good).logs_wanted_until is None
    for bad in (-1, "soon", float("nan"), float("inf"), 1e12, True):
        with pytest.raises(ControlError, match="logs_wanted_until"):
            PeerMap.from_json({**good, "logs_wanted_until": bad})
