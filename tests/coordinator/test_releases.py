"""The release registry over HTTP: publish, idempotence, versions, signatures, device access,
deletion with blob garbage collection, targets and pins, enrollment's release key."""

from __future__ import annotations

import os
import time
from typing import Any

import trio
from nacl.signing import SigningKey

from mesh.control import Enrollment
from mesh.release import decode_signed_manifest, key_id

from .conftest import Harness
from .releasekit import Built, build, pin

OCTETS = {"content-type": "application/octet-stream"}


async def upload(h: Harness, built: Built, only: list[str] | None = None) -> None:
    for blob_id, (data, kind) in built.blobs.items():
        if only is None or blob_id in only:
            r = await h.op.put(f"/api/v1/blobs/{blob_id}", params={"kind": kind}, content=data)
            assert r.status_code in (200, 201), r.text


async def publish(h: Harness, built: Built, expect: int = 201) -> dict:  # type: ignore[type-arg]
    r = await h.op.post("/api/v1/releases", content=built.signed, headers=OCTETS)
    assert r.status_code == expect, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_the_app_named_agent_is_refused_its_container_would_be_the_agents(
        h: Harness) -> None:
    rel = build(SigningKey.generate(), app="agent")
    await upload(h, rel)
    r = await h.op.post("/api/v1/releases", content=rel.signed, headers=OCTETS)
    assert r.status_code == 400 and "fleetmesh-agent" in r.json()["error"], r.text
    r = await h.op.get("/api/v1/releases", params={"fleet": "fleet"})
    assert r.json() == {"releases": []}
    # the agent's own reserved app is published like any app
    await upload(h, agent := build(SigningKey.generate(), app="fleetmesh-agent"))
    assert (await publish(h, agent))["app"] == "fleetmesh-agent"


async def test_publish_needs_blobs_then_is_idempotent(h: Harness) -> None:
    key = SigningKey.generate()
    rel = build(key, layers=[os.urandom(40_000), os.urandom(20_000)], delta=b"patch bytes")
    r = await h.op.post("/api/v1/releases", content=rel.signed, headers=OCTETS)
    assert r.status_code == 409
    assert sorted(r.json()["missing"]) == sorted(rel.blobs)
    await upload(h, rel, only=rel.chunk_ids[:2])
    r = await h.op.post("/api/v1/releases", content=rel.signed, headers=OCTETS)
    assert r.status_code == 409 and sorted(r.json()["missing"]) == sorted(
        set(rel.blobs) - set(rel.chunk_ids[:2]))
    await upload(h, rel)
    info = await publish(h, rel)
    m = rel.manifest
    assert info["fleet"] == "fleet" and info["app"] == "app" and info["version"] == 1
    assert info["key_id"] == key_id(key.verify_key) and info["layers"] == 2
    assert info["size"] == 60_000 and info["created_at"] == m.created_at
    assert info["stored_size"] == sum(c.stored_size for la in m.layers for c in la.chunks)
    assert info["delta_size"] == len(b"patch bytes")
    assert set(info) == {"fleet", "app", "version", "created_at", "key_id", "layers", "size",
                         "stored_size", "delta_size", "published_at"}
    again = await publish(h, rel, expect=200)
    assert again == info
    r = await h.op.get("/api/v1/releases", params={"fleet": "fleet"})
    assert r.json() == {"releases": [info]}
    r = await h.op.get("/api/v1/releases/fleet/app/1")
    detail = r.json()
    assert [la["chunks"] for la in detail["layers"]] == [3, 2]
    assert detail["layers"][0]["deltas"] == [{"source_diff_id": "sha256:" + "0" * 64,
                                              "size": 11, "method": "HDIFF"}]
    assert detail["layers"][1]["diff_id"] == m.layers[1].diff_id
    r = await h.op.get("/api/v1/releases/fleet/app/1/manifest")
    assert r.status_code == 200 and r.content == rel.signed
    assert (await h.op.get("/api/v1/releases/fleet/app/2")).status_code == 404
    assert (await h.op.get("/api/v1/releases/fleet/app/x")).status_code == 400


async def test_versions_only_grow(h: Harness) -> None:
    key = SigningKey.generate()
    v2 = build(key, version=2)
    await upload(h, v2)
    await publish(h, v2)
    for version in (1, 2):  # older, and the same number with other content
        other = build(key, version=version)
        await upload(h, other)
        r = await h.op.post("/api/v1/releases", content=other.signed, headers=OCTETS)
        assert r.status_code == 409
        assert "not newer" in r.json()["error"] or "other content" in r.json()["error"]
    v3 = build(key, version=3)
    await upload(h, v3)
    await publish(h, v3)
    other_app = build(key, app="other", version=1)  # versions are per app
    await upload(h, other_app)
    await publish(h, other_app)
    r = await h.op.get("/api/v1/releases", params={"fleet": "fleet", "app": "app"})
    assert [x["version"] for x in r.json()["releases"]] == [3, 2]
    # a deleted release's number is never reused for other content
    assert (await h.op.delete("/api/v1/releases/fleet/app/3")).status_code == 204
    again = build(key, version=3)
    await upload(h, again)
    r = await h.op.post("/api/v1/releases", content=again.signed, headers=OCTETS)
    assert r.status_code == 409


async def test_malformed_release_is_400_one_line(h: Harness) -> None:
    for body in (b"", b"garbage", bytes(100)):
        r = await h.op.post("/api/v1/releases", content=body, headers=OCTETS)
        assert r.status_code == 400 and "\n" not in r.json()["error"]
    key = SigningKey.generate()
    bad_fleet = build(key, fleet="Not_A_Fleet")  # the coordinator's fleets are DNS labels
    await upload(h, bad_fleet)
    r = await h.op.post("/api/v1/releases", content=bad_fleet.signed, headers=OCTETS)
    assert r.status_code == 400


async def test_signature_checked_against_the_fleet_key(h: Harness) -> None:
    fleet_key, other = SigningKey.generate(), SigningKey.generate()
    r = await h.op.put("/api/v1/fleets/fleet/release-key", json={"public_key": "zz"})
    assert r.status_code == 400
    r = await h.op.put("/api/v1/fleets/fleet/release-key",
                       json={"public_key": bytes(fleet_key.verify_key).hex()})
    assert r.status_code == 200 and r.json()["key_id"] == key_id(fleet_key.verify_key)
    wrong = build(other)
    await upload(h, wrong)
    r = await h.op.post("/api/v1/releases", content=wrong.signed, headers=OCTETS)
    assert r.status_code == 403 and "release key" in r.json()["error"]
    right = build(fleet_key)
    await upload(h, right)
    await publish(h, right)
    # another fleet without a key accepts any signer (the devices check)
    lab = build(other, fleet="lab")
    await upload(h, lab)
    await publish(h, lab)


async def test_device_reads_its_fleets_releases_only(h: Harness) -> None:
    key = SigningKey.generate()
    mine, theirs = build(key), build(key, fleet="other")
    for rel in (mine, theirs):
        await upload(h, rel)
        await publish(h, rel)
    dev = await h.enroll("cam", fleet="fleet")
    r = await dev.client.get("/api/v1/releases/fleet/app/1/manifest")
    assert r.status_code == 200 and r.content == mine.signed
    cid = mine.chunk_ids[0]
    r = await dev.client.get(f"/api/v1/blobs/{cid}")
    assert r.status_code == 200 and r.content == mine.blobs[cid][0]
    r = await dev.client.get(f"/api/v1/blobs/{cid}", headers={"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == mine.blobs[cid][0][:10]
    assert (await dev.client.get("/api/v1/releases/other/app/1/manifest")).status_code == 404
    assert (await dev.client.get(f"/api/v1/blobs/{theirs.chunk_ids[0]}")).status_code == 404
    for method, path in (("GET", "/api/v1/releases?fleet=fleet"),
                         ("GET", "/api/v1/releases/fleet/app/1"),
                         ("DELETE", "/api/v1/releases/fleet/app/1"),
                         ("POST", "/api/v1/releases"),
                         ("PUT", "/api/v1/fleets/fleet/target"),
                         ("PUT", "/api/v1/fleets/fleet/release-key")):
        r = await dev.client.request(method, path)
        assert r.status_code == 403, (method, path)
    assert (await h.op.get("/api/v1/device/target")).status_code == 403
    assert (await h.anon.get("/api/v1/releases/fleet/app/1/manifest")).status_code == 401


async def test_delete_removes_only_unreferenced_blobs(h: Harness) -> None:
    key = SigningKey.generate()
    shared = os.urandom(20_000)
    v1 = build(key, version=1, layers=[shared, os.urandom(20_000)])
    v2 = build(key, version=2, layers=[shared, os.urandom(20_000)], delta=b"d")
    for rel in (v1, v2):
        await upload(h, rel)
        await publish(h, rel)
    only_v1 = set(v1.blobs) - set(v2.blobs)
    both = set(v1.blobs) & set(v2.blobs)
    assert only_v1 and both
    assert (await h.op.delete("/api/v1/releases/fleet/app/1")).status_code == 204
    assert (await h.op.delete("/api/v1/releases/fleet/app/1")).status_code == 404
    r = await h.op.post("/api/v1/blobs/missing", json={"ids": sorted(v1.blobs | v2.blobs)})
    assert sorted(r.json()["missing"]) == sorted(only_v1)
    r = await h.op.put("/api/v1/fleets/fleet/target", json={"app": "app", "version": 2})
    assert r.status_code == 200
    r = await h.op.delete("/api/v1/releases/fleet/app/2")
    assert r.status_code == 409 and "target" in r.json()["error"]


async def test_targets_and_rollback_pins(h: Harness) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    for v in (1, 2):
        rel = build(key, version=v)
        await upload(h, rel)
        await publish(h, rel)
    cam = await h.enroll("cam")
    cam2 = await h.enroll("cam2")
    target = "/api/v1/fleets/fleet/target"
    r = await h.op.put(target, json={"app": "app", "version": 2})
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["device"] is None
    assert (await h.op.put(target, json={"app": "app", "version": 3})).status_code == 404
    assert (await h.op.put(target, json={"app": "app", "version": 2,
                                         "device": "ghost"})).status_code == 404
    r = await h.op.put(target, json={"app": "app", "version": 1})
    assert r.status_code == 409 and "set the fleet's release key first" in r.json()["error"]
    await h.op.put("/api/v1/fleets/fleet/release-key",
                   json={"public_key": bytes(key.verify_key).hex()})
    r = await h.op.put(target, json={"app": "app", "version": 1})
    assert r.status_code == 409 and "pin" in r.json()["error"]
    r = await h.op.put(target, json={"app": "app", "version": 1,
                                     "pin": pin(other, "fleet", "app", 1).hex()})
    assert r.status_code == 403
    r = await h.op.put(target, json={"app": "app", "version": 1,
                                     "pin": pin(key, "fleet", "app", 2).hex()})
    assert r.status_code == 400 and "pin names" in r.json()["error"]
    r = await h.op.put(target, json={"app": "app", "version": 1, "pin": "zz"})
    assert r.status_code == 400
    # a pin for another device does not cover this one
    r = await h.op.put(target, json={"app": "app", "version": 1, "device": "cam",
                                     "pin": pin(key, "fleet", "app", 1, "cam2").hex()})
    assert r.status_code == 400
    good = pin(key, "fleet", "app", 1, "cam")
    r = await h.op.put(target, json={"app": "app", "version": 1, "device": "cam",
                                     "pin": good.hex()})
    assert r.status_code == 200 and r.json()["pin"] == good.hex()
    r = await cam.client.get("/api/v1/device/target")
    assert r.json() == {"targets": [{"app": "app", "version": 1, "pin": good.hex(),
                                     "force": False, "retry": 0, "hold": False,
                                     "window": None}]}
    r = await cam2.client.get("/api/v1/device/target")
    assert r.json() == {"targets": [{"app": "app", "version": 2, "pin": None, "force": False,
                                     "retry": 0, "hold": False, "window": None}]}


async def test_an_expired_pin_is_refused_when_set(h: Harness) -> None:
    """Devices refuse an expired pin (docs/security.md); the coordinator says so at once
    instead of handing it out."""
    key = SigningKey.generate()
    for v in (1, 2):
        rel = build(key, version=v)
        await upload(h, rel)
        await publish(h, rel)
    await h.op.put("/api/v1/fleets/fleet/release-key",
                   json={"public_key": bytes(key.verify_key).hex()})
    expired = pin(key, "fleet", "app", 1, now=time.time() - 86400, lifetime=3600)
    r = await h.op.put("/api/v1/fleets/fleet/target",
                       json={"app": "app", "version": 1, "pin": expired.hex()})
    assert r.status_code == 400 and "expired" in r.json()["error"], r.text
    r = await h.op.put("/api/v1/fleets/fleet/target",
                       json={"app": "app", "version": 1, "pin": pin(key, "fleet", "app", 1).hex()})
    assert r.status_code == 200, r.text


async def test_enrollment_carries_the_release_key(h: Harness) -> None:
    before = await h.enroll("early")
    assert "release_key" not in before.enrollment
    assert Enrollment.from_json(before.enrollment).release_key is None
    key = SigningKey.generate()
    public = bytes(key.verify_key).hex()
    r = await h.op.put("/api/v1/fleets/fleet/release-key", json={"public_key": public})
    assert r.status_code == 200
    after = await h.enroll("late")
    assert after.enrollment["release_key"] == public
    assert Enrollment.from_json(after.enrollment).release_key == public
    other = await h.enroll("elsewhere", fleet="other")
    assert "release_key" not in other.enrollment


async def test_registry_survives_a_restart(h: Harness) -> None:
    key = SigningKey.generate()
    rel = build(key)
    await upload(h, rel)
    await publish(h, rel)
    store = h.coord.service.releases.store
    got = store.get_release("fleet", "app", 1)
    assert got is not None and got.signed == rel.signed
    assert decode_signed_manifest(got.signed).key_id == key_id(key.verify_key)


async def test_a_target_change_wakes_the_devices_peer_map_long_poll(h: Harness) -> None:
    """Agents read /device/target when their map's `targets` revision changes, so a target
    change must reach a parked long poll (docs/gossip.md "Idle cost")."""
    key = SigningKey.generate()
    for v in (1, 2):
        rel = build(key, version=v)
        await upload(h, rel)
        await publish(h, rel)
    cam, cam2 = await h.enroll("cam"), await h.enroll("cam2")

    async def current(dev: Any) -> dict[str, Any]:
        r = await dev.client.get("/api/v1/device/peermap", params={"version": 0})
        assert r.status_code == 200
        return dict(r.json())

    async def next_map(dev: Any, version: int) -> dict[str, Any] | None:
        r = await dev.client.get("/api/v1/device/peermap",
                                 params={"version": version, "wait": 3})
        return None if r.status_code == 304 else dict(r.json())

    await trio.sleep(0.3)  # past the enrollment batch (batch_window 50 ms)
    m1, m2 = await current(cam), await current(cam2)
    async with trio.open_nursery() as nursery:
        got: dict[str, Any] = {}

        async def wait(name: str, dev: Any, version: int) -> None:
            got[name] = await next_map(dev, version)

        nursery.start_soon(wait, "cam", cam, m1["version"])
        nursery.start_soon(wait, "cam2", cam2, m2["version"])
        await trio.sleep(0.2)
        r = await h.op.put("/api/v1/fleets/fleet/target", json={"app": "app", "version": 2})
        assert r.status_code == 200
    assert got["cam"] is not None and got["cam"]["targets"] > m1["targets"]
    assert got["cam2"] is not None and got["cam2"]["targets"] > m2["targets"]
    # a device's own target touches only its map
    m1, m2 = got["cam"], got["cam2"]
    await h.op.put("/api/v1/fleets/fleet/target",
                   json={"app": "app", "version": 2, "device": "cam"})
    after1, after2 = await next_map(cam, m1["version"]), await next_map(cam2, m2["version"])
    assert after1 is not None and after1["targets"] > m1["targets"]
    assert after2 is None


async def test_the_newest_release_is_the_default_target_and_publishing_wakes_devices(
        h: Harness) -> None:
    key = SigningKey.generate()
    cam = await h.enroll("cam")
    r = await cam.client.get("/api/v1/device/target")
    assert r.json() == {"targets": []}
    await trio.sleep(0.3)  # past the enrollment batch
    m = (await cam.client.get("/api/v1/device/peermap", params={"version": 0})).json()
    rel = build(key, version=1)
    await upload(h, rel)
    got: dict[str, Any] = {}

    async def poll() -> None:
        r = await cam.client.get("/api/v1/device/peermap",
                                 params={"version": m["version"], "wait": 3})
        got["map"] = r.json() if r.status_code == 200 else None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.2)
        await publish(h, rel)
    assert got["map"] is not None and got["map"]["targets"] > m["targets"]
    targets = (await cam.client.get("/api/v1/device/target")).json()["targets"]
    assert [(t["app"], t["version"]) for t in targets] == [("app", 1)]
    rel2 = build(key, version=2)
    await upload(h, rel2)
    await publish(h, rel2)
    targets = (await cam.client.get("/api/v1/device/target")).json()["targets"]
    assert [(t["app"], t["version"]) for t in targets] == [("app", 2)]
    # the operator holds the fleet on 2; a newer release does not move it
    await h.op.put("/api/v1/fleets/fleet/target", json={"app": "app", "version": 2})
    rel3 = build(key, version=3)
    await upload(h, rel3)
    await publish(h, rel3)
    targets = (await cam.client.get("/api/v1/device/target")).json()["targets"]
    assert [(t["app"], t["version"]) for t in targets] == [("app", 2)]
