"""Misbehaving peers a device reports (mesh.control.PeerMisbehaviour), through the real app:
stored per (reporter, offender), replaced by each report, shown in DeviceInfo from both sides,
malformed lists refused with one line (docs/api.md, docs/security.md "Misbehaving peers")."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh.control import MAX_COUNT, MAX_PEERS
from tests.coordinator.conftest import Harness

STATE = "/api/v1/device/state"


def accusing(*entries: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"agent_version": "test",
            "misbehaving_peers": [{"name": n, "counts": c} for n, c in entries]}


async def test_reports_name_the_offender_on_both_sides(h: Harness) -> None:
    one, two = await h.enroll("lana-1"), await h.enroll("lana-2")
    await h.enroll("lana-3")
    r = await one.client.post(STATE, json=accusing(
        ("lana-3", {"corrupt_blob": 4, "ghost_member": 12})))
    assert r.status_code == 204, r.text
    r = await two.client.post(STATE, json=accusing(("lana-3", {"forged_manifest": 1})))
    assert r.status_code == 204, r.text
    accused = (await h.op.get("/api/v1/devices/lana-3")).json()
    assert accused["reported_by"] == [
        {"reporter": "lana-1", "counts": {"corrupt_blob": 4, "ghost_member": 12}},
        {"reporter": "lana-2", "counts": {"forged_manifest": 1}}]
    assert accused["reports_about"] == [] and accused["reported_misbehaving"] == 2
    accuser = (await h.op.get("/api/v1/devices/lana-1")).json()
    assert accuser["reports_about"] == [
        {"name": "lana-3", "counts": {"corrupt_blob": 4, "ghost_member": 12}}]
    assert accuser["reported_by"] == [] and accuser["reported_misbehaving"] == 0
    listed = {d["name"]: d for d in (await h.op.get("/api/v1/devices")).json()["devices"]}
    assert {n: d["reported_misbehaving"] for n, d in listed.items()} == {
        "lana-1": 0, "lana-2": 0, "lana-3": 2}

    # the next report replaces what lana-1 said (its totals, or nothing any more)
    r = await one.client.post(STATE, json=accusing(("lana-3", {"corrupt_blob": 5})))
    assert r.status_code == 204, r.text
    accused = (await h.op.get("/api/v1/devices/lana-3")).json()
    assert accused["reported_by"][0] == {"reporter": "lana-1", "counts": {"corrupt_blob": 5}}
    r = await two.client.post(STATE, json={"agent_version": "old"})  # an old agent's report
    assert r.status_code == 204, r.text
    accused = (await h.op.get("/api/v1/devices/lana-3")).json()
    assert [e["reporter"] for e in accused["reported_by"]] == ["lana-1"]
    assert accused["reported_misbehaving"] == 1
    # names that are no live device of its fleet (another fleet's, unknown, its own) are not
    # kept: the rows stay bounded by the fleet
    await h.enroll("lana-9", fleet="other")
    r = await one.client.post(STATE, json=accusing(
        ("lana-9", {"bad_frame": 1}), ("nobody", {"bad_frame": 1}), ("lana-1", {"bad_frame": 1}),
        ("lana-3", {"corrupt_blob": 6})))
    assert r.status_code == 204, r.text
    assert (await h.op.get("/api/v1/devices/lana-1")).json()["reports_about"] == [
        {"name": "lana-3", "counts": {"corrupt_blob": 6}}]
    assert (await h.op.get("/api/v1/devices/lana-9")).json()["reported_by"] == []
    # all-zero counts accuse nobody
    r = await one.client.post(STATE, json=accusing(("lana-3", {"corrupt_blob": 0})))
    assert r.status_code == 204, r.text
    assert (await h.op.get("/api/v1/devices/lana-3")).json()["reported_by"] == []


BAD: list[tuple[str, Any, str]] = [
    ("unknown reason", [{"name": "lana-3", "counts": {"rude": 1}}], "unknown reason 'rude'"),
    ("bool count", [{"name": "lana-3", "counts": {"bad_frame": True}}], "must be an integer"),
    ("negative count", [{"name": "lana-3", "counts": {"bad_frame": -1}}], "must be 0.."),
    ("too large count", [{"name": "lana-3", "counts": {"bad_frame": MAX_COUNT + 1}}],
     "must be 0.."),
    # one name over and over: the count is checked first, and the body stays within its limit
    ("too many", [{"name": "a", "counts": {}}] * (MAX_PEERS + 1), f"more than {MAX_PEERS}"),
    ("bad name", [{"name": "Lana 3", "counts": {"bad_frame": 1}}], "misbehaving_peers[0].name"),
    ("duplicate", [{"name": "lana-3", "counts": {"bad_frame": 1}},
                   {"name": "lana-3", "counts": {"ghost_member": 1}}], "named twice"),
    ("not a list", {"lana-3": 1}, "misbehaving_peers: must be list"),
    ("counts not an object", [{"name": "lana-3", "counts": [1]}], "counts: must be dict"),
    ("no counts", [{"name": "lana-3"}], "counts: missing"),
]


@pytest.mark.parametrize(("what", "value", "message"), BAD, ids=[b[0] for b in BAD])
async def test_a_malformed_list_is_a_400_with_one_line(h: Harness, what: str, value: Any,
                                                       message: str) -> None:
    dev = await h.enroll("lana-1")
    body = json.dumps({"agent_version": "test", "misbehaving_peers": value},
                      separators=(",", ":"))
    r = await dev.client.post(STATE, content=body,
                              headers={"Content-Type": "application/json"})
    assert r.status_code == 400, (what, r.text)
    error = r.json()["error"]
    assert message in error and "\n" not in error, (what, error)
    assert (await h.op.get("/api/v1/devices/lana-1")).json()["reports_about"] == []
