"""Root metadata at the coordinator: PUT /fleets/{fleet}/root keeps only the next root that
verifies against the stored one (version 1: against its own keys) and makes its release key the
fleet's; GET serves devices (of that fleet) and operators the roots newer than `since`."""

from __future__ import annotations

import json
from typing import Any

import trio
from nacl.signing import SigningKey

from mesh.release import decode_signed_root, encode_signed_root, key_id, root_fingerprint
from tests.rootkit import ROOT_KEYS, root

from .conftest import Harness

A, B, C = ROOT_KEYS
RELEASE_1 = SigningKey(b"\x21" * 32)
RELEASE_2 = SigningKey(b"\x22" * 32)
JSON = {"content-type": "application/json"}


async def test_roots_are_kept_in_order_and_set_the_release_key(h: Harness) -> None:
    v1 = root("fleet", 1, RELEASE_1, A, B)
    r = await h.op.put("/api/v1/fleets/fleet/root", content=encode_signed_root(v1), headers=JSON)
    assert r.status_code == 200, r.text
    assert r.json() == {"fleet": "fleet", "version": 1,
                        "release_key": bytes(RELEASE_1.verify_key).hex(),
                        "key_id": key_id(RELEASE_1.verify_key),
                        "fingerprint": root_fingerprint(v1)}
    # A device enrolled now is handed the root's release key.
    dev = await h.enroll("d1")
    assert dev.enrollment["release_key"] == bytes(RELEASE_1.verify_key).hex()
    # Publishing the same root again (a retried command) changes nothing.
    again = await h.op.put("/api/v1/fleets/fleet/root", content=encode_signed_root(v1),
                           headers=JSON)
    assert again.status_code == 200 and again.json() == r.json()

    v2 = root("fleet", 2, RELEASE_2, B, C)
    r = await h.op.put("/api/v1/fleets/fleet/root", content=encode_signed_root(v2), headers=JSON)
    assert r.status_code == 200 and r.json()["version"] == 2
    r = await h.op.put("/api/v1/fleets/fleet/release-key",
                       json={"public_key": bytes(RELEASE_1.verify_key).hex()})
    assert r.status_code == 409 and "root" in r.json()["error"]
    other = await h.enroll("d2")
    assert other.enrollment["release_key"] == bytes(RELEASE_2.verify_key).hex()

    r = await dev.client.get("/api/v1/fleets/fleet/root", params={"since": 0})
    assert r.status_code == 200
    assert [decode_signed_root(json.dumps(x).encode()) for x in r.json()["roots"]] == [v1, v2]
    r = await dev.client.get("/api/v1/fleets/fleet/root", params={"since": 1})
    assert [decode_signed_root(json.dumps(x).encode()) for x in r.json()["roots"]] == [v2]
    r = await h.op.get("/api/v1/fleets/fleet/root", params={"since": 2})
    assert r.status_code == 200 and r.json() == {"fleet": "fleet", "roots": []}


async def test_roots_that_do_not_verify_are_refused_with_one_line(h: Harness) -> None:
    async def put(signed_or_bytes: object, fleet: str = "fleet") -> tuple[int, str]:
        body = (signed_or_bytes if isinstance(signed_or_bytes, bytes)
                else encode_signed_root(signed_or_bytes))  # type: ignore[arg-type]
        r = await h.op.put(f"/api/v1/fleets/{fleet}/root", content=body, headers=JSON)
        error = r.json().get("error", "") if r.status_code != 200 else ""
        assert "\n" not in error
        return r.status_code, error

    assert await put(root("fleet", 1, RELEASE_1, A)) == (
        403, "root version 1 has 1 valid signatures of its own root keys, needs 2")
    assert (await put(root("fleet", 2, RELEASE_1, A, B)))[0] == 409  # no root yet: 1 first
    assert (await put(root("other", 1, RELEASE_1, A, B)))[1] == (
        "root is for fleet 'other', not 'fleet'")
    assert (await put(b"{not json"))[0] == 400
    assert (await put(b"x" * 40_000))[0] == 413
    assert await put(root("fleet", 1, RELEASE_1, A, B)) == (200, "")
    # The coordinator's (or anyone's) own key is no root key.
    intruder = SigningKey(b"\x66" * 32)
    status, error = await put(root("fleet", 2, RELEASE_2, A, intruder))
    assert status == 403 and "1 valid signatures of root version 1's keys, needs 2" in error
    assert (await put(root("fleet", 3, RELEASE_2, A, B)))[0] == 409  # skips version 2
    r = await h.op.get("/api/v1/fleets/fleet/root")
    assert len(r.json()["roots"]) == 1
    assert (await h.op.get("/api/v1/fleets/fleet/root", params={"since": "-1"})).status_code \
        == 400


async def test_a_device_reads_only_its_own_fleets_roots(h: Harness) -> None:
    r = await h.op.put("/api/v1/fleets/other/root",
                       content=encode_signed_root(root("other", 1, RELEASE_1, A, B)),
                       headers=JSON)
    assert r.status_code == 200, r.text
    dev = await h.enroll("d1")  # in "fleet"
    r = await dev.client.get("/api/v1/fleets/other/root")
    assert r.status_code == 404
    r = await dev.client.put("/api/v1/fleets/fleet/root",
                             content=encode_signed_root(root("fleet", 1, RELEASE_1, A, B)),
                             headers=JSON)
    assert r.status_code == 403


async def test_a_new_root_wakes_the_fleets_devices_at_once(h: Harness) -> None:
    """Devices read targets, timestamp and roots together, at once when their peer map's
    `targets` revision moves and otherwise every 6 hours (issue 14): a published root must
    move it, through the long poll that is parked, for that fleet only."""
    dev, stranger = await h.enroll("d1"), await h.enroll("d2", fleet="other")
    await trio.sleep(0.3)  # past the enrollment batch
    maps = [(await d.client.get("/api/v1/device/peermap", params={"version": 0})).json()
            for d in (dev, stranger)]
    got: dict[str, int] = {}

    async def poll(name: str, client: Any, version: int, wait: float) -> None:
        r = await client.get("/api/v1/device/peermap", params={"version": version, "wait": wait})
        got[name] = r.status_code if r.status_code != 200 else r.json()["targets"]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll, "d1", dev.client, maps[0]["version"], 1800)
            nursery.start_soon(poll, "d2", stranger.client, maps[1]["version"], 2)
            await trio.sleep(0.2)  # both parked
            r = await h.op.put("/api/v1/fleets/fleet/root",
                               content=encode_signed_root(root("fleet", 1, RELEASE_1, A, B)),
                               headers=JSON)
            assert r.status_code == 200, r.text
    assert got["d1"] > maps[0]["targets"]
    assert got["d2"] == 304  # another fleet's root is no news to it
