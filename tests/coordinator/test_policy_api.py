"""A fleet's reachability policy over the real HTTP API (docs/policy.md, docs/api.md "Policy"):
PUT and GET the file, the compiled view of one device, and the refusals (400 naming the line,
404, 401/403)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator._server import CoordinatorConfig
from mesh.policy import Ports, parse_ports

from .conftest import Enrolled, Harness, running_harness
from .test_peermap_incremental_api import _settled

POLICY = """\
# cameras stream to the recorders
role=cam -> role=nvr tcp/554
role=nvr <-> role=nvr tcp/7000
"""


async def _put(h: Harness, text: str, fleet: str = "fleet", status: int = 200) -> Any:
    r = await h.op.put(f"/api/v1/fleets/{fleet}/policy", content=text.encode(),
                       headers={"content-type": "text/plain"})
    assert r.status_code == status, r.text
    return r.json()


async def _compiled(h: Harness, device: str, status: int = 200) -> Any:
    r = await h.op.get("/api/v1/fleets/fleet/policy/compiled", params={"device": device})
    assert r.status_code == status, r.text
    return r.json()


async def test_put_get_and_versions(h: Harness) -> None:
    r = await h.op.get("/api/v1/fleets/fleet/policy")
    assert r.status_code == 200
    none = r.json()
    assert (none["version"], none["policy"], none["rules"], none["updated_at"]) == \
        (0, "", [], None)
    body = await _put(h, POLICY)
    assert body["version"] == 1 and body["policy"] == POLICY
    assert [rule["text"] for rule in body["rules"]] == [
        "role=cam -> role=nvr tcp/554", "role=nvr <-> role=nvr tcp/7000"]
    assert [rule["line"] for rule in body["rules"]] == [2, 3]
    assert (await h.op.get("/api/v1/fleets/fleet/policy")).json() == body
    again = await _put(h, "* -> * icmp\n")
    assert again["version"] == 2 and [r["text"] for r in again["rules"]] == ["* -> * icmp"]
    # another fleet has its own
    assert (await _put(h, "", fleet="other"))["version"] == 1


async def test_bad_policy_is_400_naming_the_line_and_keeps_the_old_one(h: Harness) -> None:
    await _put(h, POLICY)
    for text, error in (("\n\nrole=cam -> role=nvr", "policy: line 3: no ports after the "
                         "destination (write any, or e.g. tcp/554)"),
                        ("* -> * tcp/0", "policy: line 1: 'tcp/0' must be ports 1-65535, "
                         "first <= last")):
        assert (await _put(h, text, status=400)) == {"error": error}
    r = await h.op.put("/api/v1/fleets/fleet/policy", content=b"\xff\xfe -> * any")
    assert r.status_code == 400 and r.json()["error"] == "policy: not UTF-8 text"
    r = await h.op.put("/api/v1/fleets/fleet/policy", content=b"#" * (64 * 1024 + 1))
    assert r.status_code == 413
    r = await h.op.put("/api/v1/fleets/Bad_Fleet/policy", content=b"")
    assert r.status_code == 400
    assert (await h.op.get("/api/v1/fleets/fleet/policy")).json()["version"] == 1


def _apart(h: Harness, *names: str) -> None:
    """Each device behind its own public address (enrolled from loopback, all share one)."""
    for i, name in enumerate(names, start=1):
        h.coord.service.core.set_public(name, f"203.0.113.{i}:51820")


async def test_compiled_says_what_a_device_reaches_and_why(h: Harness) -> None:
    for name, tags in (("cam-1", {"role": "cam"}), ("nvr-1", {"role": "nvr"}),
                       ("nvr-2", {"role": "nvr"}), ("lamp", {})):
        await h.enroll(name)
        r = await h.op.patch(f"/api/v1/devices/{name}/tags", json={"set": tags})
        assert r.status_code == 200, r.text
    _apart(h, "cam-1", "nvr-1", "nvr-2", "lamp")
    # no policy: the default only, and no two devices share a public address
    assert (await _compiled(h, "cam-1"))["reach"] == []
    await _put(h, POLICY)
    cam = await _compiled(h, "cam-1")
    assert (cam["device"], cam["version"], cam["operators"], cam["hubs"]) == \
        ("cam-1", 1, "any", "any")
    assert cam["reach"] == [
        {"peer": "nvr-1", "ports": "tcp/554", "why": ["line 2: role=cam -> role=nvr tcp/554"]},
        {"peer": "nvr-2", "ports": "tcp/554", "why": ["line 2: role=cam -> role=nvr tcp/554"]}]
    assert cam["reached_by"] == []
    nvr = await _compiled(h, "nvr-1")
    assert [(g["peer"], g["ports"]) for g in nvr["reach"]] == [("nvr-2", "tcp/7000")]
    assert [(g["peer"], g["ports"]) for g in nvr["reached_by"]] == \
        [("cam-1", "tcp/554"), ("nvr-2", "tcp/7000")]
    assert (await _compiled(h, "lamp"))["reach"] == []
    # a retag moves the device between groups at once
    await h.op.patch("/api/v1/devices/lamp/tags", json={"set": {"role": "cam"}})
    assert [g["peer"] for g in (await _compiled(h, "lamp"))["reach"]] == ["nvr-1", "nvr-2"]


async def test_lan_neighbours_by_public_address(h: Harness) -> None:
    for name in ("a", "b", "c"):
        await h.enroll(name)
    core = h.coord.service.core
    core.set_public("a", "198.51.100.7:40000")
    core.set_public("b", "198.51.100.7:40001")
    core.set_public("c", "203.0.113.9:40000")  # enrolled from loopback as a and b were
    a = await _compiled(h, "a")
    assert a["reach"] == a["reached_by"] == [
        {"peer": "b", "ports": "any", "why": ["default: LAN neighbour (same public address)"]}]
    assert (await _compiled(h, "c"))["reach"] == []


async def test_compiled_refusals(h: Harness) -> None:
    await h.enroll("cam-1")
    assert "no active device 'ghost'" in (await _compiled(h, "ghost", 404))["error"]
    r = await h.op.get("/api/v1/fleets/fleet/policy/compiled")
    assert r.status_code == 400 and r.json()["error"] == "device: missing (?device=NAME)"
    assert (await _compiled(h, "Not A Name", 400))["error"].startswith("device: ")
    r = await h.op.get("/api/v1/fleets/other/policy/compiled", params={"device": "cam-1"})
    assert r.status_code == 404  # a device of another fleet
    dev = await h.enroll("cam-2")
    for method in ("GET", "PUT"):
        r = await dev.client.request(method, "/api/v1/fleets/fleet/policy", content=b"")
        assert r.status_code == 403, r.text
    r = await h.anon.get("/api/v1/fleets/fleet/policy")
    assert r.status_code == 401



async def test_a_stored_policy_gives_partial_maps_with_ports(h: Harness) -> None:
    devs: dict[str, Enrolled] = {}
    names = ["cam-1", "nvr-1", "nvr-2"] + [f"lamp-{i}" for i in range(9)]
    for name in names:
        devs[name] = await h.enroll(name)
        role = name.partition("-")[0]
        r = await h.op.patch(f"/api/v1/devices/{name}/tags", json={"set": {"role": role}})
        assert r.status_code == 200, r.text
    _apart(h, *names)
    # no stored policy: the full map, no ports (the transition rule)
    full = await _settled(devs["cam-1"])
    assert {p.name for p in full.peers} == set(names) - {"cam-1"}
    assert all(p.send is None for p in full.peers)
    await _put(h, POLICY)
    cam = {p.name: p for p in (await _settled(devs["cam-1"])).peers}
    assert cam["nvr-1"].send == parse_ports("tcp/554") and cam["nvr-1"].accept == Ports(())
    nvr = {p.name: p for p in (await _settled(devs["nvr-1"])).peers}
    assert nvr["nvr-2"].send == parse_ports("tcp/7000") == nvr["nvr-2"].accept
    assert nvr["cam-1"].accept == parse_ports("tcp/554")
    # a lamp reaches nobody by rule: only its few cross-LAN gossip partners
    lamps = [{p.name for p in (await _settled(devs[n])).peers} for n in names[3:]]
    assert min(len(peers) for peers in lamps) < len(names) - 1
    # re-tagging a lamp as a recorder puts it in the camera's map with the rule's ports
    r = await h.op.patch("/api/v1/devices/lamp-0/tags", json={"set": {"role": "nvr"}})
    assert r.status_code == 200, r.text
    cam = {p.name: p for p in (await _settled(devs["cam-1"])).peers}
    assert cam["lamp-0"].send == parse_ports("tcp/554")


async def test_a_restarted_coordinator_keeps_partial_maps(tmp_path: Path) -> None:
    """The stored policy is read again at start: the maps stay partial, with their ports."""
    config = CoordinatorConfig(data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False,
                               batch_window=0.05)
    async with running_harness(config) as h:
        for name in ("cam-1", "nvr-1"):
            await h.enroll(name)
            r = await h.op.patch(f"/api/v1/devices/{name}/tags",
                                 json={"set": {"role": name.partition("-")[0]}})
            assert r.status_code == 200, r.text
        await _put(h, POLICY)
    async with running_harness(config) as h:
        core = h.coord.service.core
        assert core.policy("fleet") is not None
        cam = {p.name: p for p in core.build("cam-1").peers}
        assert cam["nvr-1"].send == parse_ports("tcp/554")
