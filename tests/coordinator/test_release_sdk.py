"""The SDK's release and blob methods (ops.client) against a real coordinator."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import trio
from nacl.signing import SigningKey

from coordinator._server import Coordinator
from mesh.release import key_id
from ops.client import ApiError, DeviceClient, OperatorClient

from .conftest import Harness
from .releasekit import build, pin


def _der(coord: Coordinator) -> bytes:
    return ssl.PEM_cert_to_DER_cert(coord.cert_path.read_text())


async def _sync(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    # OperatorClient is synchronous: keep it off the loop that serves it.
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def test_operator_sdk_publish_flow(h: Harness) -> None:
    key = SigningKey.generate()
    v1 = build(key, layers=[os.urandom(40_000)], delta=b"delta!")
    v2 = build(key, version=2)
    with OperatorClient(h.coord.url, h.coord.operator_key, cert_der=_der(h.coord)) as op:
        info = await _sync(op.set_release_key, "fleet", bytes(key.verify_key).hex())
        assert info["key_id"] == key_id(key.verify_key)
        assert sorted(await _sync(op.missing_blobs, list(v1.blobs))) == sorted(v1.blobs)
        with pytest.raises(ApiError) as err:
            await _sync(op.publish_release, v1.signed)
        assert err.value.status == 409 and sorted(err.value.missing) == sorted(v1.blobs)
        for blob_id, (data, kind) in v1.blobs.items():
            assert await _sync(op.put_blob, blob_id, data, kind) is True
        assert await _sync(op.put_blob, *next(iter((i, d, k) for i, (d, k) in
                                                   v1.blobs.items()))) is False
        with pytest.raises(ApiError) as err:
            await _sync(op.put_blob, "0" * 64, b"x", "delta")
        assert err.value.status == 400 and err.value.missing == []
        assert await _sync(op.missing_blobs, list(v1.blobs)) == []
        released, created = await _sync(op.publish_release, v1.signed)
        assert created and released["version"] == 1
        assert await _sync(op.publish_release, v1.signed) == (released, False)
        assert await _sync(op.list_releases, "fleet") == [released]
        assert await _sync(op.list_releases, "fleet", "nothing") == []
        detail = await _sync(op.release, "fleet", "app", 1)
        assert detail["layers"][0]["chunks"] == 3
        assert await _sync(op.release_manifest, "fleet", "app", 1) == v1.signed
        cid = v1.chunk_ids[0]
        frame = v1.blobs[cid][0]
        assert await _sync(op.get_blob, cid) == frame
        assert await _sync(op.get_blob, cid, 5, 25) == frame[5:25]
        assert await _sync(op.get_blob, cid, 7) == frame[7:]
        assert await _sync(op.get_blob, cid, -4) == frame[-4:]
        with pytest.raises(ApiError) as err:
            await _sync(op.get_blob, cid, len(frame))
        assert err.value.status == 416
        for blob_id, (data, kind) in v2.blobs.items():
            await _sync(op.put_blob, blob_id, data, kind)
        await _sync(op.publish_release, v2.signed)
        target = await _sync(op.set_target, "fleet", "app", 2)
        assert target["version"] == 2 and target["pin"] is None
        with pytest.raises(ApiError) as err:
            await _sync(op.set_target, "fleet", "app", 1)
        assert err.value.status == 409
        good = pin(key, "fleet", "app", 1)
        target = await _sync(op.set_target, "fleet", "app", 1, pin=good)
        assert target["pin"] == good.hex()
        await _sync(op.set_target, "fleet", "app", 2)
        await _sync(op.delete_release, "fleet", "app", 1)
        with pytest.raises(ApiError) as err:
            await _sync(op.release, "fleet", "app", 1)
        assert err.value.status == 404
        assert sorted(await _sync(op.missing_blobs, list(v1.blobs))) == sorted(
            set(v1.blobs) - set(v2.blobs))


async def test_device_sdk_reads_manifest_blobs_targets(h: Harness) -> None:
    key = SigningKey.generate()
    rel = build(key)
    for blob_id, (data, kind) in rel.blobs.items():
        r = await h.op.put(f"/api/v1/blobs/{blob_id}", params={"kind": kind}, content=data)
        assert r.status_code == 201
    assert (await h.op.post("/api/v1/releases", content=rel.signed)).status_code == 201
    assert (await h.op.put("/api/v1/fleets/fleet/target",
                           json={"app": "app", "version": 1})).status_code == 200
    cam = await h.enroll("cam")
    async with DeviceClient(h.coord.url, cam.credential, _der(h.coord)) as dev:
        assert await dev.manifest("fleet", "app", 1) == rel.signed
        cid = rel.chunk_ids[0]
        assert await dev.blob(cid) == rel.blobs[cid][0]
        assert await dev.blob(cid, 1, 3) == rel.blobs[cid][0][1:3]
        assert await dev.targets() == [{"app": "app", "version": 1, "pin": None,
                                         "force": False, "retry": 0, "hold": False,
                                         "window": None}]
        with pytest.raises(ApiError) as err:
            await dev.manifest("other", "app", 1)
        assert err.value.status == 404
