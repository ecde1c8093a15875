"""AWS Signature Version 4 for S3 requests: the documented algorithm, no I/O (docs/scale.md,
"Shared blob storage"). It is small enough to own, and owning it keeps the coordinator free of
an AWS SDK: canonical request → string to sign → HMAC-SHA256 key chain (date, region,
service, "aws4_request") → `Authorization` header. Tested against the example requests
published in AWS's S3 documentation ("Signature Calculations for the Authorization Header").

The secret key never appears in what this returns or raises.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote, urlsplit

ALGORITHM: Final = "AWS4-HMAC-SHA256"
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
# S3's canonical URI encodes each path segment once, keeping '/' (other services encode twice)
_UNRESERVED: Final = "-_.~"


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"Credentials(access_key={self.access_key!r})"


def amz_date(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _uri_encode(text: str, keep_slash: bool) -> str:
    return quote(text, safe=_UNRESERVED + ("/" if keep_slash else ""))


def canonical_query(query: str) -> str:
    """The query's parameters URI-encoded and sorted by name, then value."""
    pairs = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        pairs.append((_uri_encode(unquote(name), False), _uri_encode(unquote(value), False)))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def canonical_request(method: str, url: str, headers: Mapping[str, str],
                      payload_sha256: str) -> tuple[str, str]:
    """(canonical request, signed header names) for a request whose headers are `headers`
    (every header given is signed; `host` must be among them)."""
    parts = urlsplit(url)
    path = _uri_encode(unquote(parts.path or "/"), True)
    canon = {" ".join(k.lower().split()): " ".join(str(v).split()) for k, v in headers.items()}
    names = sorted(canon)
    signed = ";".join(names)
    lines = [method.upper(), path, canonical_query(parts.query),
             *(f"{n}:{canon[n]}" for n in names), "", signed, payload_sha256]
    return "\n".join(lines), signed


def signing_key(secret_key: str, day: str, region: str, service: str) -> bytes:
    key = hmac.new(f"AWS4{secret_key}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(method: str, url: str, headers: Mapping[str, str], payload_sha256: str,
         creds: Credentials, region: str, now: dt.datetime, service: str = "s3"
         ) -> dict[str, str]:
    """`headers` plus `x-amz-date`, `x-amz-content-sha256` and `Authorization` for this
    request. `headers` must hold `host` (as the request will send it); every header in it is
    signed, so pass only those the request sends unchanged."""
    stamp = amz_date(now)
    day = stamp[:8]
    out = {k.lower(): v for k, v in headers.items()}
    out["x-amz-date"] = stamp
    out["x-amz-content-sha256"] = payload_sha256
    request, signed = canonical_request(method, url, out, payload_sha256)
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, stamp, scope,
                         hashlib.sha256(request.encode()).hexdigest()])
    signature = hmac.new(signing_key(creds.secret_key, day, region, service),
                         to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (f"{ALGORITHM} Credential={creds.access_key}/{scope}, "
                            f"SignedHeaders={signed}, Signature={signature}")
    return out
