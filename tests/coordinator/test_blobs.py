"""Blobs: verification on write (hashes, decompression bombs), atomic naming, Range reads."""

from __future__ import annotations

import io
import os
from pathlib import Path

import blake3
import pytest
from backports import zstd

from coordinator._blobs import BadBlob, BlobSeed, verify
from coordinator._http import RangeNotSatisfiable, parse_range
from mesh.blobs import BlobKind
from mesh.release import CHUNK_SIZE, chunk_layer

from .conftest import Harness


def _chunk(data: bytes) -> tuple[str, bytes]:
    (c,) = chunk_layer(data)
    return c.ref.id.hex(), c.data


def _delta(data: bytes) -> tuple[str, bytes]:
    return blake3.blake3(data).hexdigest(), data


# ---- verification without HTTP ------------------------------------------------------------

def test_verify_chunk_and_delta() -> None:
    cid, frame = _chunk(b"layer bytes " * 1000)
    verify(cid, BlobKind.CHUNK, io.BytesIO(frame))
    did, patch = _delta(b"patch")
    verify(did, BlobKind.DELTA, io.BytesIO(patch))
    with pytest.raises(BadBlob, match="does not hash"):
        verify(did, BlobKind.DELTA, io.BytesIO(patch + b"!"))
    with pytest.raises(BadBlob, match="does not hash"):
        verify("0" * 64, BlobKind.CHUNK, io.BytesIO(frame))
    with pytest.raises(BadBlob, match="zstd"):
        verify(cid, BlobKind.CHUNK, io.BytesIO(b"not zstd at all"))
    with pytest.raises(BadBlob, match="truncated"):
        verify(cid, BlobKind.CHUNK, io.BytesIO(frame[:-3]))
    with pytest.raises(BadBlob, match="after the end"):
        verify(cid, BlobKind.CHUNK, io.BytesIO(frame + frame))


def test_decompression_bomb_is_refused_with_bounded_output() -> None:
    big = bytes(CHUNK_SIZE * 4)
    frame = zstd.compress(big, level=3)
    assert len(frame) < 2048  # a tiny upload that would inflate to 16 MiB
    with pytest.raises(BadBlob, match="more than"):
        verify(blake3.blake3(big).hexdigest(), BlobKind.CHUNK, io.BytesIO(frame))
    exact = bytes(CHUNK_SIZE)  # exactly CHUNK_SIZE is fine
    verify(blake3.blake3(exact).hexdigest(), BlobKind.CHUNK,
           io.BytesIO(zstd.compress(exact, level=3)))


def test_commit_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = BlobSeed(tmp_path / "blobs")
    store.prepare()
    did, patch = _delta(os.urandom(1000))
    f, tmp = store.new_temp(did)
    f.write(patch[:-1] + b"x")
    with pytest.raises(BadBlob):
        store.commit(did, BlobKind.DELTA, f, tmp)
    assert not store.exists(did) and not tmp.exists()
    f, tmp = store.new_temp(did)
    f.write(patch)
    assert store.commit(did, BlobKind.DELTA, f, tmp) is True
    assert store.path(did) == tmp_path / "blobs" / did[:2] / did[2:]
    assert store.path(did).read_bytes() == patch
    f, tmp = store.new_temp(did)
    f.write(patch)
    assert store.commit(did, BlobKind.DELTA, f, tmp) is False
    assert sorted(p.name for p in store.path(did).parent.iterdir()) == [did[2:]]
    # a temp file left by a crash is swept at the next start
    (store.path(did).parent / ".tmp-crashed").write_bytes(b"partial")
    store.prepare()
    assert sorted(p.name for p in store.path(did).parent.iterdir()) == [did[2:]]


def test_parse_range() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-3", 10) == (0, 3)
    assert parse_range("bytes=4-", 10) == (4, 9)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("bytes=0-1,4-5", 10) is None  # several ranges: the whole blob
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=x-1", 10) is None
    assert parse_range("bytes=5-2", 10) is None  # invalid: ignored (RFC 9110 14.1.1)
    for bad in ("bytes=10-", "bytes=10-12", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 10)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-1", 0)


# ---- over HTTP ----------------------------------------------------------------------------

async def test_put_blob_verifies_and_is_idempotent(h: Harness) -> None:
    cid, frame = _chunk(os.urandom(50_000))
    r = await h.op.put(f"/api/v1/blobs/{cid}", params={"kind": "chunk"}, content=frame)
    assert r.status_code == 201, r.text
    r = await h.op.put(f"/api/v1/blobs/{cid}", params={"kind": "chunk"}, content=frame)
    assert r.status_code == 200
    r = await h.op.put(f"/api/v1/blobs/{'ab' * 32}", params={"kind": "chunk"}, content=frame)
    assert r.status_code == 400 and "does not hash" in r.json()["error"]
    did, patch = _delta(os.urandom(1000))
    r = await h.op.put(f"/api/v1/blobs/{did}", params={"kind": "delta"}, content=patch + b"x")
    assert r.status_code == 400 and "\n" not in r.json()["error"]
    r = await h.op.put(f"/api/v1/blobs/{did}", params={"kind": "nope"}, content=patch)
    assert r.status_code == 400 and "kind" in r.json()["error"]
    r = await h.op.put("/api/v1/blobs/XYZ", params={"kind": "delta"}, content=patch)
    assert r.status_code == 400
    big = bytes(CHUNK_SIZE * 2)
    bomb = zstd.compress(big)
    r = await h.op.put(f"/api/v1/blobs/{blake3.blake3(big).hexdigest()}",
                       params={"kind": "chunk"}, content=bomb)
    assert r.status_code == 400 and "more than" in r.json()["error"]
    r = await h.op.post("/api/v1/blobs/missing", json={"ids": [cid, did, cid]})
    assert r.status_code == 200 and r.json() == {"missing": [did]}
    r = await h.op.post("/api/v1/blobs/missing", json={"ids": ["nothex"]})
    assert r.status_code == 400
    r = await h.op.post("/api/v1/blobs/missing", json={"ids": [cid] * 10_000})
    assert r.status_code == 200 and r.json() == {"missing": []}
    r = await h.op.post("/api/v1/blobs/missing", json={"ids": [cid] * 10_001})
    assert r.status_code == 400
    assert not list((h.coord.data_dir / "blobs").glob("*/.tmp-*"))


async def test_upload_above_the_json_limit_but_bounded(h: Harness) -> None:
    did, patch = _delta(os.urandom(3 * 1024 * 1024))  # > MAX_BODY_BYTES (256 KiB)
    r = await h.op.put(f"/api/v1/blobs/{did}", params={"kind": "delta"}, content=patch)
    assert r.status_code == 201, r.text
    r = await h.op.get(f"/api/v1/blobs/{did}")
    assert r.status_code == 200 and r.content == patch
    # other routes keep the small limit
    r = await h.op.post("/api/v1/tokens", content=b"{" + b" " * 300_000 + b"}",
                        headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_upload_over_the_blob_limit_is_413(h: Harness) -> None:
    did, patch = _delta(os.urandom(100_000))
    h.coord.service.releases.max_blob_bytes = 50_000  # stands in for 64 MiB

    async def body():  # type: ignore[no-untyped-def]  # no Content-Length: chunked upload
        for start in range(0, len(patch), 20_000):
            yield patch[start:start + 20_000]
    r = await h.op.put(f"/api/v1/blobs/{did}", params={"kind": "delta"}, content=body())
    assert r.status_code == 413
    assert not list((h.coord.data_dir / "blobs").glob("*/.tmp-*"))
    assert not h.coord.blobs.exists(did)


async def test_range_requests(h: Harness) -> None:
    data = os.urandom(10_000)
    did, patch = _delta(data)
    assert (await h.op.put(f"/api/v1/blobs/{did}", params={"kind": "delta"},
                           content=patch)).status_code == 201
    url = f"/api/v1/blobs/{did}"
    r = await h.op.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["content-range"] == "bytes 100-199/10000"
    assert r.headers["content-length"] == "100"
    r = await h.op.get(url, headers={"Range": "bytes=9990-"})
    assert r.status_code == 206 and r.content == data[9990:]
    r = await h.op.get(url, headers={"Range": "bytes=-16"})
    assert r.status_code == 206 and r.content == data[-16:]
    assert r.headers["content-range"] == "bytes 9984-9999/10000"
    r = await h.op.get(url, headers={"Range": "bytes=9000-20000"})
    assert r.status_code == 206 and r.content == data[9000:]
    r = await h.op.get(url, headers={"Range": "bytes=10000-"})
    assert r.status_code == 416 and r.headers["content-range"] == "bytes */10000"
    r = await h.op.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["accept-ranges"] == "bytes"
    r = await h.op.head(url)
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "10000"
    r = await h.op.head(url, headers={"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.headers["content-length"] == "10"
    r = await h.op.get(f"/api/v1/blobs/{'0' * 64}")
    assert r.status_code == 404
    r = await h.anon.get(url)
    assert r.status_code == 401


async def test_devices_cannot_upload_or_read_unpublished_blobs(h: Harness) -> None:
    dev = await h.enroll("cam")
    did, patch = _delta(b"x" * 100)
    r = await dev.client.put(f"/api/v1/blobs/{did}", params={"kind": "delta"}, content=patch)
    assert r.status_code == 403
    assert (await h.op.put(f"/api/v1/blobs/{did}", params={"kind": "delta"},
                           content=patch)).status_code == 201
    r = await dev.client.get(f"/api/v1/blobs/{did}")
    assert r.status_code == 404  # no release of its fleet names it
    r = await dev.client.post("/api/v1/blobs/missing", json={"ids": [did]})
    assert r.status_code == 403
