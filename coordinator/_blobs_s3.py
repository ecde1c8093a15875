"""Blobs in an S3-compatible bucket (docs/scale.md, "Shared blob storage"): what lets several
coordinators serve the same blobs. `--blobs s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME`;
credentials from `--blobs-credentials-file` or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.

A blob is the object PREFIX/ID (path-style: ENDPOINT/BUCKET/PREFIX/ID). As with local files,
an upload is streamed to a local temp file, verified (digest, frame), and only then PUT under
its key (with its SHA-256 signed, so the store refuses a body that arrives altered): the key
never names partial or unverified bytes. Devices' range reads become GETs with a Range header,
streamed through in bounded pieces. Requests are signed with coordinator._sigv4.

Every method blocks (network, disk, hashing): call them through trio.to_thread. A store that
does not answer as it should raises BlobStoreUnavailable (one line: 503 to the client).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Generator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final
from urllib.parse import parse_qsl, quote, urlsplit

import httpx

from mesh.blobs import TEMP_PREFIX, BlobKind, is_blob_hex, remove_temp_files

from ._blobs import (
    BlobStoreUnavailable,
    OpenBlob,
    check_blob_id,
    first_occurrences,
    verify,
)
from ._sigv4 import EMPTY_SHA256, Credentials, sign

DEFAULT_REGION: Final = "us-east-1"
CONNECT_TIMEOUT: Final = 5.0
# a read of a stalled store: a device's download waits at most this long for the next piece
READ_TIMEOUT: Final = 30.0
# concurrent HEADs for a publish's or an upload session's existence checks (10,000 IDs at most,
# docs/api.md); the connection pool is sized for them plus the downloads in flight
PARALLEL_HEADS: Final = 8
# More IDs than this in one question: list the bucket instead, one ListObjectsV2 per shard (the
# first two hex digits: at most 256, each 1,000 keys a page), not one HEAD per ID — 10,000 HEADs
# took 12 s on loopback SeaweedFS.
LIST_ABOVE: Final = 256
LIST_PAGE: Final = 1000  # keys per ListObjectsV2 answer (S3's maximum)
MAX_CONNECTIONS: Final = 32
HASH_PIECE: Final = 1024 * 1024
_BUCKET_RE: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")  # S3's bucket names
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9!_.*'()/-]{1,512}\Z")  # S3's "safe" characters
_S3_CODE_RE: Final = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
ACCESS_KEY_ENV: Final = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV: Final = "AWS_SECRET_ACCESS_KEY"


class S3ConfigError(ValueError):
    """A bad --blobs URL, credentials or bucket; str() is one line without any secret."""


@dataclass(frozen=True, slots=True)
class S3Location:
    endpoint: str  # scheme://host[:port], no path
    bucket: str
    prefix: str  # "" or ending in "/"
    region: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME` (both optional: AWS's endpoint for
        the region, us-east-1)."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise S3ConfigError(f"--blobs: must be s3://BUCKET[/PREFIX][?endpoint=URL&"
                                f"region=NAME], got {url!r}")
        bucket = parts.netloc
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise S3ConfigError(f"--blobs: {bucket!r} is not an S3 bucket name (3-63 of a-z "
                                "0-9 . -)")
        prefix = parts.path.strip("/")
        if prefix and (not _PREFIX_RE.match(prefix) or "//" in prefix):
            raise S3ConfigError(f"--blobs: prefix {prefix!r}: at most 512 of A-Z a-z 0-9 "
                                "! _ . * ' ( ) - and single /")
        options: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name not in ("endpoint", "region") or name in options:
                raise S3ConfigError(f"--blobs: unknown or repeated option {name!r} (endpoint, "
                                    "region)")
            options[name] = value
        region = options.get("region", DEFAULT_REGION)
        if not re.fullmatch(r"[a-z0-9-]{1,32}", region):
            raise S3ConfigError(f"--blobs: region {region!r}: 1-32 of a-z 0-9 -")
        endpoint = options.get("endpoint", f"https://s3.{region}.amazonaws.com")
        ep = urlsplit(endpoint)
        try:
            port_ok = ep.port is None or 0 < ep.port < 65536
        except ValueError:
            port_ok = False
        if (ep.scheme not in ("http", "https") or not ep.hostname or ep.path.strip("/")
                or ep.query or ep.fragment or ep.username or not port_ok):
            raise S3ConfigError(f"--blobs: endpoint must be http(s)://HOST[:PORT], got "
                                f"{endpoint!r}")
        return cls(f"{ep.scheme}://{ep.netloc}", bucket, f"{prefix}/" if prefix else "",
                   region)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"


def read_credentials(path: Path | None, environ: Mapping[str, str] = os.environ
                     ) -> Credentials:
    """From `path` (lines `aws_access_key_id = …` and `aws_secret_access_key = …`, as in an
    AWS credentials file with one profile; `#` comments and `[section]` lines ignored), else
    from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. S3ConfigError names what is missing,
    never a value."""
    if path is None:
        key, secret = environ.get(ACCESS_KEY_ENV, ""), environ.get(SECRET_KEY_ENV, "")
        if not key or not secret:
            raise S3ConfigError(f"--blobs s3://…: credentials needed: --blobs-credentials-file "
                                f"FILE or {ACCESS_KEY_ENV} and {SECRET_KEY_ENV}")
        return _checked(Credentials(key, secret), f"{ACCESS_KEY_ENV}/{SECRET_KEY_ENV}")
    where = f"--blobs-credentials-file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
        raise S3ConfigError(f"{where}: {reason}") from None
    found: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        name, eq, value = line.partition("=")
        name = name.strip().lower()
        if not eq or name not in ("aws_access_key_id", "aws_secret_access_key"):
            raise S3ConfigError(f"{where}: line {number}: expected aws_access_key_id = … or "
                                "aws_secret_access_key = …")
        found[name] = value.strip()
    if not found.get("aws_access_key_id") or not found.get("aws_secret_access_key"):
        raise S3ConfigError(f"{where}: needs aws_access_key_id and aws_secret_access_key")
    return _checked(Credentials(found["aws_access_key_id"], found["aws_secret_access_key"]),
                    where)


def _checked(creds: Credentials, where: str) -> Credentials:
    if not re.fullmatch(r"[A-Za-z0-9._+/=-]{1,128}", creds.access_key) or not re.fullmatch(
            r"[\x21-\x7e]{1,256}", creds.secret_key):
        raise S3ConfigError(f"{where}: the access key is 1-128 of A-Z a-z 0-9 . _ + / = -, the "
                            "secret 1-256 printable ASCII characters")
    return creds


def _local(tag: str) -> str:
    """An XML element's name without its namespace (S3's answers carry one)."""
    return tag.rpartition("}")[2]


def _code(body: bytes) -> str:
    found = _S3_CODE_RE.search(body[:4096])
    return f" {found.group(1).decode()}" if found else ""


class S3Blobs:
    """A BlobBackend on one bucket (and prefix); `staging` is a local directory for uploads
    being verified."""

    def __init__(self, location: S3Location, creds: Credentials, staging: Path) -> None:
        self.location = location
        self.staging = Path(staging)
        self._creds = creds
        self._host = urlsplit(location.endpoint).netloc
        self._http = httpx.Client(
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS), follow_redirects=False)
        self._pool = ThreadPoolExecutor(PARALLEL_HEADS, thread_name_prefix="s3-head")
        self.list_page = LIST_PAGE

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    # -- requests ------------------------------------------------------------------------------

    def key(self, blob_id: str) -> str:
        return self.location.prefix + check_blob_id(blob_id)

    def _url(self, key: str | None) -> str:
        path = f"/{self.location.bucket}" + (f"/{quote(key, safe='/')}" if key is not None
                                             else "")
        return self.location.endpoint + path

    def _send(self, method: str, key: str | None, *, headers: Mapping[str, str] | None = None,
              content: BinaryIO | None = None, payload_sha256: str = EMPTY_SHA256,
              stream: bool = False, query: Mapping[str, str] | None = None) -> httpx.Response:
        """The store's answer to one signed request; BlobStoreUnavailable if there is none."""
        url = self._url(key)
        if query:
            url += "?" + "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                                  for k, v in sorted(query.items()))
        signed = sign(method, url, {"host": self._host, **(headers or {})}, payload_sha256,
                      self._creds, self.location.region, dt.datetime.now(dt.UTC))
        extra = {"accept-encoding": "identity"}
        if content is not None:
            extra["content-length"] = str(os.fstat(content.fileno()).st_size)
        request = self._http.build_request(method, url, headers={**signed, **extra},
                                           content=content)
        try:
            return self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BlobStoreUnavailable(f"blob store {self.location.endpoint}: {method} failed: "
                                       f"{reason}") from None

    def _refused(self, response: httpx.Response, what: str) -> BlobStoreUnavailable:
        if response.request.method == "HEAD":
            body = b""
        elif response.is_stream_consumed:  # read by send()
            body = response.content
        else:  # a streamed GET: its start is enough for the error code
            try:
                body = next(response.iter_raw(4096), b"")
            except httpx.HTTPError:
                body = b""
        response.close()
        return BlobStoreUnavailable(f"blob store {self.location.endpoint}: {what}: HTTP "
                                    f"{response.status_code}{_code(body)}")

    # -- BlobBackend ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """The staging directory ready (crashed uploads' temp files gone); the bucket checked:
        S3ConfigError if the store refuses the credentials or has no such bucket,
        BlobStoreUnavailable if it does not answer (the coordinator starts anyway)."""
        self.staging.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_temp_files(self.staging)
        response = self._send("HEAD", None)
        response.close()
        if response.status_code in (401, 403):
            raise S3ConfigError(f"--blobs {self.location}: the store refuses these credentials "
                                f"(HTTP {response.status_code})")
        if response.status_code == 404:
            raise S3ConfigError(f"--blobs {self.location}: no such bucket")
        if response.status_code != 200:
            raise self._refused(response, f"HEAD bucket {self.location.bucket}")

    def _size(self, blob_id: str) -> int | None:
        response = self._send("HEAD", self.key(blob_id))
        response.close()
        if response.status_code == 404:
            return None
        length = response.headers.get("content-length", "")
        if response.status_code != 200 or not (length.isascii() and length.isdigit()):
            raise self._refused(response, f"HEAD {blob_id}")
        return int(length)

    def size(self, blob_id: str) -> int | None:
        return self._size(blob_id)

    def exists(self, blob_id: str) -> bool:
        return self._size(blob_id) is not None

    def sizes(self, ids: list[str]) -> list[int | None]:
        for blob_id in ids:
            check_blob_id(blob_id)
        if len(ids) <= 1:
            return [self._size(i) for i in ids]
        if len(set(ids)) <= LIST_ABOVE:
            return list(self._pool.map(self._size, ids))
        found: dict[str, int] = {}
        for listed in self._pool.map(self._listed, sorted({i[:2] for i in ids})):
            found.update(listed)
        return [found.get(i) for i in ids]

    def _listed(self, shard: str) -> dict[str, int]:
        """ID → size of every blob whose ID starts with `shard` (ListObjectsV2, all pages)."""
        prefix = self.location.prefix + shard
        found: dict[str, int] = {}
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": str(self.list_page)}
            if token:
                query["continuation-token"] = token
            response = self._send("GET", None, query=query)
            if response.status_code != 200:
                raise self._refused(response, f"list {prefix}")
            try:
                page = ET.fromstring(response.content)
            except ET.ParseError:
                raise BlobStoreUnavailable(f"blob store {self.location.endpoint}: list "
                                           f"{prefix}: not a ListObjectsV2 answer") from None
            fields = {_local(e.tag): (e.text or "").strip() for e in page}
            for item in page:
                if _local(item.tag) != "Contents":
                    continue
                entry = {_local(e.tag): (e.text or "").strip() for e in item}
                blob_id = entry.get("Key", "").removeprefix(self.location.prefix)
                size = entry.get("Size", "")
                if is_blob_hex(blob_id) and size.isascii() and size.isdigit():
                    found[blob_id] = int(size)
            token = fields.get("NextContinuationToken", "")
            if fields.get("IsTruncated") != "true":
                return found
            if not token:
                raise BlobStoreUnavailable(f"blob store {self.location.endpoint}: list "
                                           f"{prefix}: truncated without a continuation token")

    def missing(self, ids: Iterable[str]) -> list[str]:
        unique = first_occurrences(ids)
        return [i for i, size in zip(unique, self.sizes(unique), strict=True) if size is None]

    def open(self, blob_id: str) -> OpenBlob | None:
        size = self._size(blob_id)
        if size is None:
            return None
        return OpenBlob(S3Reader(self, blob_id), size)

    def get(self, blob_id: str, start: int, length: int) -> httpx.Response:
        """The streamed answer to a GET of `length` bytes from `start` (length > 0)."""
        end = start + length - 1
        response = self._send("GET", self.key(blob_id), headers={"range": f"bytes={start}-{end}"},
                              stream=True)
        if response.status_code == 206 or (response.status_code == 200 and start == 0):
            return response
        raise self._refused(response, f"GET {blob_id} bytes {start}-{end}")

    def new_temp(self, blob_id: str) -> tuple[BinaryIO, Path]:
        check_blob_id(blob_id)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.staging)
        return os.fdopen(fd, "w+b"), Path(name)

    def commit(self, blob_id: str, kind: BlobKind, f: BinaryIO, tmp: Path) -> bool:
        """Verify the temp file against `blob_id`; then, unless the bucket has it already, PUT
        it under the blob's key (its SHA-256 signed). The temp file is gone afterwards."""
        try:
            f.flush()
            f.seek(0)
            verify(blob_id, kind, f)
            if self.exists(blob_id):
                return False
            f.seek(0)
            digest = hashlib.sha256()
            while piece := f.read(HASH_PIECE):
                digest.update(piece)
            f.seek(0)
            response = self._send("PUT", self.key(blob_id), content=f,
                                  payload_sha256=digest.hexdigest())
            response.close()
            if response.status_code != 200:
                raise self._refused(response, f"PUT {blob_id}")
            return True
        finally:
            self.discard(f, tmp)

    def discard(self, f: BinaryIO, tmp: Path) -> None:
        f.close()
        tmp.unlink(missing_ok=True)

    def delete(self, blob_ids: Iterable[str]) -> int:
        """Delete the blobs stored → how many there were (a DELETE of a missing key succeeds
        in S3, so the count comes from HEADs first)."""
        unique = first_occurrences(blob_ids)
        present = [i for i, size in zip(unique, self.sizes(unique), strict=True)
                   if size is not None]
        for blob_id in present:
            response = self._send("DELETE", self.key(blob_id))
            response.close()
            if response.status_code not in (200, 204, 404):
                raise self._refused(response, f"DELETE {blob_id}")
        return len(present)


class S3Reader:
    """One blob in the bucket, read by ranged GETs."""

    def __init__(self, blobs: S3Blobs, blob_id: str) -> None:
        self.blobs = blobs
        self.blob_id = blob_id
        self._response: httpx.Response | None = None

    def pieces(self, start: int, length: int, piece: int) -> Generator[bytes]:
        if length <= 0:
            return
        self._response = response = self.blobs.get(self.blob_id, start, length)
        left = length
        try:
            for data in response.iter_raw(piece):
                wanted = data[:left]
                left -= len(wanted)
                yield wanted
                if left == 0:
                    return
        except httpx.HTTPError as exc:
            raise BlobStoreUnavailable(f"blob store {self.blobs.location.endpoint}: GET "
                                       f"{self.blob_id} cut short: {exc}") from None
        finally:
            response.close()
            self._response = None
        if left:
            raise BlobStoreUnavailable(f"blob store {self.blobs.location.endpoint}: GET "
                                       f"{self.blob_id} ended {left} bytes short")

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
