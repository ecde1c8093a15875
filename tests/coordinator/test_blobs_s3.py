"""Blobs in an S3-compatible bucket (coordinator._blobs_s3, docs/scale.md): AWS Signature V4
against AWS's published examples, the --blobs URL and credentials, and the backend against a
real server (SeaweedFS, tests/s3server.py): verify before naming, range reads, delete,
missing, refusals."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import secrets
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import blake3
import httpx
import pytest

from coordinator._blobs import (
    BadBlob,
    BlobBackend,
    BlobReader,
    BlobStoreUnavailable,
    OpenBlob,
)
from coordinator._blobs_s3 import (
    LIST_ABOVE,
    S3Blobs,
    S3ConfigError,
    S3Location,
    read_credentials,
)
from coordinator._http import BLOB_PIECE
from coordinator._sigv4 import EMPTY_SHA256, Credentials, sign
from mesh.blobs import BlobKind
from mesh.release import chunk_layer
from tests.coordinator_process import free_port
from tests.s3server import S3Server

from .conftest import Harness

# ---- Signature V4: the examples of AWS's S3 documentation ("Signature Calculations for the
# Authorization Header: Transferring Payload in a Single Chunk"), same keys, same date -------

AWS_EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
AWS_EXAMPLE_DATE = dt.datetime(2013, 5, 24, tzinfo=dt.UTC)
AWS_HOST = "examplebucket.s3.amazonaws.com"


def _signature(method: str, path: str, headers: dict[str, str], payload: str) -> str:
    out = sign(method, f"https://{AWS_HOST}{path}", {"host": AWS_HOST, **headers}, payload,
               AWS_EXAMPLE, "us-east-1", AWS_EXAMPLE_DATE)
    assert out["x-amz-date"] == "20130524T000000Z" and out["x-amz-content-sha256"] == payload
    auth = out["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/"
                           "us-east-1/s3/aws4_request, SignedHeaders=")
    return auth.rpartition("Signature=")[2]


def test_sigv4_get_object_with_range_matches_the_aws_example() -> None:
    assert _signature("GET", "/test.txt", {"range": "bytes=0-9"}, EMPTY_SHA256) == (
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


def test_sigv4_put_object_matches_the_aws_example() -> None:
    payload = hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()
    headers = {"date": "Fri, 24 May 2013 00:00:00 GMT",
               "x-amz-storage-class": "REDUCED_REDUNDANCY"}
    assert _signature("PUT", "/test$file.text", headers, payload) == (
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")


def test_sigv4_query_strings_match_the_aws_examples() -> None:
    assert _signature("GET", "/?lifecycle", {}, EMPTY_SHA256) == (
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543")
    assert _signature("GET", "/?max-keys=2&prefix=J", {}, EMPTY_SHA256) == (
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")


def test_the_secret_key_is_never_shown() -> None:
    assert "EXAMPLEKEY" not in repr(AWS_EXAMPLE)
    out = sign("GET", f"https://{AWS_HOST}/x", {"host": AWS_HOST}, EMPTY_SHA256, AWS_EXAMPLE,
               "us-east-1", AWS_EXAMPLE_DATE)
    assert not any("EXAMPLEKEY" in v for v in out.values())


# ---- the --blobs URL and the credentials ---------------------------------------------------

def test_blobs_url_parses_bucket_prefix_endpoint_and_region() -> None:
    loc = S3Location.parse("s3://fleet-blobs/prod/v1?endpoint=http://127.0.0.1:8333&region=eu-1")
    assert (loc.endpoint, loc.bucket, loc.prefix, loc.region) == (
        "http://127.0.0.1:8333", "fleet-blobs", "prod/v1/", "eu-1")
    loc = S3Location.parse("s3://fleet-blobs")
    assert (loc.endpoint, loc.prefix, loc.region) == (
        "https://s3.us-east-1.amazonaws.com", "", "us-east-1")


@pytest.mark.parametrize("url", [
    "http://bucket", "s3://", "s3://Bad_Bucket", "s3://ab", "s3://a..b",
    "s3://bucket?endpoint=ftp://h", "s3://bucket?endpoint=http://h/path",
    "s3://bucket?endpoint=http://h:99999", "s3://bucket?endpoint=http://user@h",
    "s3://bucket?colour=red", "s3://bucket?region=x&region=y", "s3://bucket?region=EU WEST",
    "s3://bucket/a//b", "s3://bucket/white space"])
def test_bad_blobs_urls_are_one_line(url: str) -> None:
    with pytest.raises(S3ConfigError) as exc:
        S3Location.parse(url)
    assert str(exc.value).startswith("--blobs") and "\n" not in str(exc.value)


def test_credentials_from_a_file_or_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "creds"
    f.write_text("# ours\n[default]\naws_access_key_id = AKID1\naws_secret_access_key = s/e+c\n")
    assert read_credentials(f, {}) == Credentials("AKID1", "s/e+c")
    env = {"AWS_ACCESS_KEY_ID": "AKID2", "AWS_SECRET_ACCESS_KEY": "sec2"}
    assert read_credentials(None, env) == Credentials("AKID2", "sec2")
    with pytest.raises(S3ConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        read_credentials(None, {"AWS_ACCESS_KEY_ID": "AKID2"})
    with pytest.raises(S3ConfigError, match="No such file"):
        read_credentials(tmp_path / "absent", {})
    f.write_text("aws_access_key_id = AKID1\n")
    with pytest.raises(S3ConfigError, match="needs aws_access_key_id and aws_secret_access_key"):
        read_credentials(f, {})
    f.write_text("aws_access_key_id = AKID1\npassword = topsecret\n")
    with pytest.raises(S3ConfigError, match="line 2") as exc:
        read_credentials(f, {})
    assert "topsecret" not in str(exc.value)
    f.write_text("aws_access_key_id = AK ID\naws_secret_access_key = topsecret\n")
    with pytest.raises(S3ConfigError, match="access key is 1-128") as exc:
        read_credentials(f, {})
    assert "topsecret" not in str(exc.value)


# ---- the backend against a real S3-compatible server --------------------------------------

@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    name = f"t-{secrets.token_hex(4)}"
    s3_server.make_bucket(name)
    return name


@pytest.fixture
def blobs(s3_server: S3Server, bucket: str, tmp_path: Path) -> Iterator[S3Blobs]:
    backend = S3Blobs(S3Location.parse(s3_server.url(bucket, "fleet/one")),
                      Credentials(s3_server.access_key, s3_server.secret_key),
                      tmp_path / "staging")
    backend.prepare()
    try:
        yield backend
    finally:
        backend.close()


def _put(blobs: S3Blobs, blob_id: str, kind: BlobKind, data: bytes) -> bool:
    f, tmp = blobs.new_temp(blob_id)
    f.write(data)
    return blobs.commit(blob_id, kind, f, tmp)


def _chunk(data: bytes) -> tuple[str, bytes]:
    (c,) = chunk_layer(data)
    return c.ref.id.hex(), c.data


def test_put_verifies_then_names_and_reads_ranges(blobs: S3Blobs) -> None:
    delta = os.urandom(700_000)
    did = blake3.blake3(delta).hexdigest()
    cid, frame = _chunk(b"layer bytes " * 5000)
    assert blobs.missing([did, cid, did]) == [did, cid]
    assert _put(blobs, did, BlobKind.DELTA, delta) is True
    assert _put(blobs, did, BlobKind.DELTA, delta) is False  # already there
    assert _put(blobs, cid, BlobKind.CHUNK, frame) is True
    assert blobs.missing([did, cid]) == []
    assert blobs.sizes([cid, did, "0" * 64]) == [len(frame), len(delta), None]
    assert list(blobs.staging.iterdir()) == []  # temp files gone

    opened = blobs.open(did)
    assert opened is not None and opened.size == len(delta)
    pieces = list(opened.reader.pieces(1000, 300_001, 65536))
    assert b"".join(pieces) == delta[1000:301_001]
    assert max(len(p) for p in pieces) <= 65536  # streamed in bounded pieces
    assert b"".join(opened.reader.pieces(len(delta) - 5, 5, 65536)) == delta[-5:]
    # a reader left early closes its GET
    partial = opened.reader.pieces(0, len(delta), 4096)
    assert next(partial) == delta[:4096]
    partial.close()
    opened.reader.close()

    assert blobs.delete([did, did, "0" * 64]) == 1
    assert blobs.open(did) is None and blobs.missing([did, cid]) == [did]


def test_many_ids_are_answered_by_listing_the_bucket(blobs: S3Blobs,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Above LIST_ABOVE IDs, sizes come from ListObjectsV2 per shard (pages followed), and
    agree with HEADs."""
    stored = {}
    for n in range(7):
        data = f"delta {n}".encode() * (n + 1)
        stored[blake3.blake3(data).hexdigest()] = data
        assert _put(blobs, blake3.blake3(data).hexdigest(), BlobKind.DELTA, data)
    # three in one shard, so that pages of two are followed
    same = (f"same shard {n}".encode() for n in range(100_000))
    for data in [d for d in same if blake3.blake3(d).hexdigest()[:2] == "ab"][:3]:
        stored[blake3.blake3(data).hexdigest()] = data
        assert _put(blobs, blake3.blake3(data).hexdigest(), BlobKind.DELTA, data)
    assert sum(i[:2] == "ab" for i in stored) >= 3
    absent = [secrets.token_hex(32) for _ in range(LIST_ABOVE)]
    ids = [*absent[:100], *stored, *absent[100:], *stored]
    blobs.list_page = 2
    assert blobs.missing(ids) == absent
    assert blobs.sizes(ids) == [None] * 100 + [len(d) for d in stored.values()] + [
        None] * (LIST_ABOVE - 100) + [len(d) for d in stored.values()]
    assert blobs.sizes(list(stored)) == [len(d) for d in stored.values()]  # by HEAD
    lists = []
    send = blobs._send

    def counted(method: str, key: str | None, **kw: Any) -> httpx.Response:
        lists.append(kw.get("query"))
        return send(method, key, **kw)

    monkeypatch.setattr(blobs, "_send", counted)
    in_ab = {i: len(d) for i, d in stored.items() if i[:2] == "ab"}
    assert blobs._listed("ab") == in_ab
    # pages of two followed to the end (an exactly full last page may say "truncated")
    assert 2 <= len(lists) <= -(-len(in_ab) // 2) + 1


def test_a_blob_deleted_after_open_is_unavailable_not_garbage(blobs: S3Blobs) -> None:
    data = b"short-lived" * 100
    blob_id = blake3.blake3(data).hexdigest()
    assert _put(blobs, blob_id, BlobKind.DELTA, data)
    opened = blobs.open(blob_id)
    assert opened is not None
    assert blobs.delete([blob_id]) == 1
    with pytest.raises(BlobStoreUnavailable, match="HTTP 404 NoSuchKey") as exc:
        b"".join(opened.reader.pieces(0, opened.size, 4096))
    assert "\n" not in str(exc.value)
    opened.reader.close()


def test_bad_bytes_never_get_the_blobs_name(blobs: S3Blobs) -> None:
    delta = os.urandom(50_000)
    did = blake3.blake3(delta).hexdigest()
    with pytest.raises(BadBlob, match="does not hash"):
        _put(blobs, did, BlobKind.DELTA, delta[:-1] + b"!")
    cid, frame = _chunk(b"abc" * 9000)
    with pytest.raises(BadBlob, match="truncated"):
        _put(blobs, cid, BlobKind.CHUNK, frame[:-3])
    assert blobs.missing([did, cid]) == [did, cid]
    assert list(blobs.staging.iterdir()) == []


def test_the_prefix_keeps_two_coordinators_apart(s3_server: S3Server, bucket: str,
                                                  blobs: S3Blobs, tmp_path: Path) -> None:
    delta = b"only under fleet/one"
    did = blake3.blake3(delta).hexdigest()
    assert _put(blobs, did, BlobKind.DELTA, delta)
    other = S3Blobs(S3Location.parse(s3_server.url(bucket, "fleet/two")),
                    Credentials(s3_server.access_key, s3_server.secret_key), tmp_path / "o")
    try:
        assert other.missing([did]) == [did]
    finally:
        other.close()


def test_wrong_credentials_or_bucket_stop_the_start(s3_server: S3Server, bucket: str,
                                                    tmp_path: Path) -> None:
    wrong = S3Blobs(S3Location.parse(s3_server.url(bucket)),
                    Credentials(s3_server.access_key, "not-the-secret"), tmp_path / "w")
    with pytest.raises(S3ConfigError, match="refuses these credentials") as exc:
        wrong.prepare()
    assert "not-the-secret" not in str(exc.value)
    wrong.close()
    absent = S3Blobs(S3Location.parse(s3_server.url("no-such-bucket-here")),
                     Credentials(s3_server.access_key, s3_server.secret_key), tmp_path / "n")
    with pytest.raises(S3ConfigError, match="no such bucket"):
        absent.prepare()
    absent.close()


def test_a_store_that_does_not_answer_is_unavailable(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    down = S3Blobs(S3Location.parse(f"s3://blobs?endpoint=http://127.0.0.1:{port}"),
                   Credentials("AKID", "secret"), tmp_path / "d")
    try:
        for call in (down.prepare, lambda: down.missing(["a" * 64, "b" * 64]),
                     lambda: down.open("a" * 64), lambda: down.delete(["a" * 64])):
            with pytest.raises(BlobStoreUnavailable) as exc:
                call()
            assert "\n" not in str(exc.value) and str(port) in str(exc.value)
        data = b"delta"
        f, tmp = down.new_temp(blake3.blake3(data).hexdigest())
        f.write(data)
        with pytest.raises(BlobStoreUnavailable):
            down.commit(blake3.blake3(data).hexdigest(), BlobKind.DELTA, f, tmp)
        assert not tmp.exists()
    finally:
        down.close()


# ---- the API when the store fails under a download ----------------------------------------

class _FailingReader:
    """A reader whose store goes away after `good` pieces."""

    def __init__(self, inner: BlobReader, good: int) -> None:
        self.inner, self.good = inner, good

    def pieces(self, start: int, length: int, piece: int) -> Generator[bytes]:
        for i, data in enumerate(self.inner.pieces(start, length, piece)):
            if i == self.good:
                raise BlobStoreUnavailable("blob store http://192.0.2.1: GET cut short: test")
            yield data

    def close(self) -> None:
        self.inner.close()


class _FailingStore:
    """The data directory's blobs, read through readers that fail after `good` pieces."""

    def __init__(self, inner: BlobBackend, good: int) -> None:
        self.inner, self.good = inner, good

    def open(self, blob_id: str) -> OpenBlob | None:
        opened = self.inner.open(blob_id)
        assert opened is not None
        return OpenBlob(_FailingReader(opened.reader, self.good), opened.size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("good", [0, 1])
async def test_a_store_failing_under_a_download_is_one_log_line(
        h: Harness, good: int, caplog: pytest.LogCaptureFixture) -> None:
    """Before the first piece: a 503. After it (headers sent): the body ends short. Either way
    one warning line and no traceback."""
    delta = os.urandom(3 * BLOB_PIECE)
    did = blake3.blake3(delta).hexdigest()
    r = await h.op.put(f"/api/v1/blobs/{did}", params={"kind": "delta"}, content=delta)
    assert r.status_code == 201, r.text
    releases = h.coord.service.releases
    releases.blobs = cast(BlobBackend, _FailingStore(releases.blobs, good))
    caplog.set_level(logging.WARNING)
    if good == 0:
        r = await h.op.get(f"/api/v1/blobs/{did}")
        assert r.status_code == 503 and "GET cut short" in r.json()["error"]
    else:
        with pytest.raises(httpx.RemoteProtocolError):
            await h.op.get(f"/api/v1/blobs/{did}")
    releases.blobs = cast(_FailingStore, releases.blobs).inner
    r = await h.op.get(f"/api/v1/blobs/{did}", headers={"range": "bytes=5-9"})
    assert r.status_code == 206 and r.content == delta[5:10]
    # (after a request of its own: the server is done with the failed one, logs included)
    records = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert [rec.getMessage() for rec in records] == [
        "blob store http://192.0.2.1: GET cut short: test"]
    assert not any(rec.exc_info for rec in caplog.records)
