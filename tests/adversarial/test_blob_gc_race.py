"""Defect (issue 13 item 10): blob garbage collection raced a concurrent publish. Deleting a
release found its orphan blobs under the registry's lock but unlinked them after releasing it;
a publish that ran in between (its upload of a blob the store already had answered "already
there", its existence check passed) was accepted, and then GC deleted a blob its release names.
Devices would fetch that blob from the coordinator forever (404).

Expected, against a real running coordinator with a pause injected at the race point (between
"find orphans" and "unlink"): the publish never interleaves there. It either waits for GC and
then re-uploads what GC removed, or fails with 409 `missing` and succeeds after re-uploading;
afterwards every blob of every published release is stored."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

import pytest
import trio
from nacl.signing import SigningKey

from tests.coordinator.conftest import Harness
from tests.coordinator.releasekit import Built, build

OCTETS = {"content-type": "application/octet-stream"}
SLACK = 20.0  # s: a deadline on real conditions, never a wait


async def _upload(h: Harness, built: Built) -> None:
    for blob_id, (data, kind) in built.blobs.items():
        r = await h.op.put(f"/api/v1/blobs/{blob_id}", params={"kind": kind}, content=data)
        assert r.status_code in (200, 201), r.text


async def _publish_until_accepted(h: Harness, built: Built) -> list[int]:
    """Upload everything, publish; on 409 `missing` upload again and retry (what
    `fleetmesh release create` does). The statuses of the publish calls."""
    statuses = []
    for _ in range(3):
        await _upload(h, built)
        r = await h.op.post("/api/v1/releases", content=built.signed, headers=OCTETS)
        statuses.append(r.status_code)
        if r.status_code == 201:
            return statuses
        assert r.status_code == 409 and r.json().get("missing"), r.text
    raise AssertionError(f"publish never accepted: {statuses}")


async def test_gc_cannot_delete_a_blob_a_concurrent_publish_names(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """v1 (layer A) is deleted while v2 (layers A and B) is uploaded and published; the
    delete is paused right before it unlinks its orphans (A). Whatever the order, v2 ends up
    published with every blob it names stored."""
    key = SigningKey.generate()
    shared = os.urandom(40_000)
    v1 = build(key, version=1, layers=[shared])
    v2 = build(key, version=2, layers=[shared, os.urandom(40_000)])
    await _upload(h, v1)
    r = await h.op.post("/api/v1/releases", content=v1.signed, headers=OCTETS)
    assert r.status_code == 201, r.text

    registry = h.coord.service.releases
    seed = registry.blobs
    at_race_point, go_on = threading.Event(), threading.Event()
    real_delete = seed.delete

    def paused_delete(blob_ids: Iterable[str]) -> int:
        ids = list(blob_ids)
        at_race_point.set()
        assert go_on.wait(SLACK), "test never let GC go on"
        return real_delete(ids)

    monkeypatch.setattr(seed, "delete", paused_delete)
    deleted: list[int] = []
    published: list[list[int]] = []

    async def delete_v1() -> None:
        r = await h.op.delete("/api/v1/releases/fleet/app/1")
        deleted.append(r.status_code)

    async def publish_v2() -> None:
        published.append(await _publish_until_accepted(h, v2))

    with trio.fail_after(SLACK):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(delete_v1)
            while not at_race_point.is_set():  # GC found its orphans and is about to unlink
                await trio.sleep(0.01)
            nursery.start_soon(publish_v2)
            # Let the publish run as far as it can: done, or waiting for GC's lock.
            while not published and registry._lock.statistics().tasks_waiting == 0:
                await trio.sleep(0.01)
            go_on.set()

    assert deleted == [204]
    assert published and published[0][-1] == 201
    r = await h.op.post("/api/v1/blobs/missing", json={"ids": sorted(v2.blobs)})
    assert r.status_code == 200, r.text
    assert r.json()["missing"] == [], "a published release lost a blob to GC"
    # ... and a device of the fleet can fetch every blob of v2
    cam = await h.enroll("cam-1")
    for blob_id in v2.blobs:
        r = await cam.client.get(f"/api/v1/blobs/{blob_id}")
        assert r.status_code == 200, (blob_id, r.text)
