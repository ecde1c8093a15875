"""The Python SDK for the coordinator API (docs/api.md).

Operators:

    client = OperatorClient("https://coord:8443", api_key, fingerprint="ab12…")
    token = client.create_token("cams", uses=5, expires_in=3600)["token"]
    for d in client.list_devices(fleet="cams"):
        print(d["name"], d["mesh_ipv4"], d["online"])

Devices (trio):

    enrollment, cert_der = await enroll(url, token, keypair.public, name="cam-1")
    async with DeviceClient(url, enrollment.credential, cert_der) as dev:
        peermap = await dev.peermap(version=0, wait=25)   # None means 304: nothing changed

Every call verifies the coordinator by its pinned certificate (mesh.tlspin). Failures raise:
`ApiError(status, message)` for an error answer (message is the server's `{"error": …}` line),
`CoordinatorUnreachable` when no answer arrived, `mesh.tlspin.PinError` when the certificate is
not the pinned one, `ProtocolError` when an answer does not have the documented shape.

Operator methods return plain dicts with exactly the JSON fields docs/api.md lists (DeviceInfo,
token, provision, peers), except `add_operator`, whose `hub` is parsed into `HubInfo`.
"""

from __future__ import annotations

import hmac
import os
import socket
import ssl
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import httpx

from mesh.control import (
    MAX_BODY_BYTES,
    MAX_PEERMAP_BYTES,
    ControlError,
    DeviceReport,
    Enrollment,
    EnrollRequest,
    HubInfo,
    KeyProof,
    LogLine,
    LogUpload,
    PeerMap,
    PeerMapDelta,
    TokenParts,
    check_key,
    key_proof_mac,
    peermap_answer,
    x25519_secret,
)
from mesh.meter import count_bytes
from mesh.release import (
    MAX_ROOT_CHAIN,
    MAX_ROOT_DOCUMENT,
    RootError,
    RootMetadata,
    SignedRoot,
    decode_root_body,
    encode_signed_root,
    key_fingerprint,
    root_fingerprint,
    signed_root_from_json,
    verify_root_chain,
)
from mesh.tlspin import (
    DEFAULT_TIMEOUT,
    CertificateFetchError,
    PinError,
    check_fingerprint,
    connect_pinned,
    fetch_certificate_async,
    normalize_fingerprint,
    pinned_ssl_context,
    split_url,
)

__all__ = [
    "ApiError",
    "ClientError",
    "OperatorConfigError",
    "CoordinatorUnreachable",
    "DeviceClient",
    "OperatorClient",
    "OperatorConfig",
    "PinError",
    "ProtocolError",
    "ReleaseKeyMismatch",
    "default_config_path",
    "enroll",
    "enroll_with_root",
    "exchange_size",
    "load_operator_config",
]

API: Final = "/api/v1"
MAX_WAIT: Final = 1800  # the server's long-poll limit (docs/api.md)
# TCP keepalive on the device's connections: a peer-map long poll waits up to MAX_WAIT with
# nothing sent either way, and a coordinator host that went away without closing it (a power
# cut, a reboot: its kernel answers nothing, or a reset only once asked) must not leave the
# agent deaf for that long. After KEEPALIVE_IDLE idle seconds the kernel probes; a reset ends
# the poll at once, KEEPALIVE_PROBES unanswered ones after KEEPALIVE_INTERVAL each. One probe
# and its answer are ~250 bytes on the WAN inside WireGuard (estimated: 52-byte TCP segments
# in WireGuard data messages), two per 30-minute poll at rest: ~1 KB/h of issue 14's 20 KB/h.
# A silent hub is caught sooner, for free, by the agent (agent/_wg_sync.py HUB_SILENT_AFTER).
KEEPALIVE_IDLE: Final = 600
KEEPALIVE_INTERVAL: Final = 30
KEEPALIVE_PROBES: Final = 3
DEVICE_SOCKET_OPTIONS: Final = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
)
# Extra read time on top of a long poll's wait: the server may batch a change for 500 ms and a
# slow link adds more; beyond this the coordinator is treated as unreachable.
LONG_POLL_SLACK: Final = 10.0
MAX_ERROR_CHARS: Final = 300
MAX_BLOB_ANSWER: Final = 64 * 1024 * 1024  # the largest blob (docs/api.md)
MAX_MANIFEST_ANSWER: Final = 8 * 1024 * 1024 + 1024  # the largest encoded SignedManifest
# A JSON answer: the largest is a device list or release status of a full fleet
MAX_JSON_ANSWER: Final = 16 * MAX_BODY_BYTES
# An enrollment answer: identity, addresses, the hub and a key, a few hundred bytes
MAX_ENROLL_ANSWER: Final = MAX_BODY_BYTES
MISSING_BATCH: Final = 10_000  # IDs per POST /blobs/missing (docs/api.md)
# GET /fleets/{fleet}/root: at most MAX_ROOT_CHAIN root documents and a little framing
MAX_ROOT_ANSWER: Final = MAX_ROOT_CHAIN * MAX_ROOT_DOCUMENT + 1024
ROLLOUT_ACTIONS: Final = ("pause", "resume", "abort", "promote")  # docs/rollouts.md
MAX_LOG_WAIT: Final = 30  # the server's log long-poll limit (docs/api.md)
# A log page: up to 5,000 lines of up to 4,096 characters, JSON-escaped (6 bytes a character)
MAX_LOG_ANSWER: Final = 5000 * (4096 * 6 + 200)
# Blob and release transfers: httpx's timeouts bound each read or write of the connection
# (not the whole transfer), so a slow link that keeps moving is fine; the read timeout also
# covers the server verifying and fsyncing a 64 MiB blob before it answers.
TRANSFER_TIMEOUT: Final = 120.0


class ClientError(Exception):
    """Base of the SDK's own errors; str() is one line."""


class ApiError(ClientError):
    """The coordinator answered with an error status."""

    def __init__(self, status: int, message: str, missing: Sequence[str] = (), *,
                 revoked: bool = False, challenge: tuple[str, str] | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message
        # publish_release's 409: the blob IDs the coordinator does not have (else empty)
        self.missing: list[str] = list(missing)
        # a 401 that says the device was revoked, explicitly; any other 401 is not proof
        self.revoked = revoked
        # enroll's 409 for an enrolled name: (nonce, hub public key) to answer with the key
        self.challenge = challenge


class CoordinatorUnreachable(ClientError):
    """No answer: connection refused, DNS, timeout, connection dropped."""


class ProtocolError(ClientError):
    """The answer does not have the shape docs/api.md promises."""


class ReleaseKeyMismatch(ClientError):
    """The coordinator enrolled the device with a release key other than the one whose
    fingerprint the token carries (or with none): nothing of the enrollment may be kept."""


class OperatorConfigError(ClientError):
    """The operator configuration is missing or malformed."""


# --------------------------------------------------------------------------- shared plumbing


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line[:MAX_ERROR_CHARS] + ("…" if len(line) > MAX_ERROR_CHARS else "")


def _error_from(response: httpx.Response) -> ApiError:
    message = ""
    missing: list[str] = []
    revoked = False
    challenge: tuple[str, str] | None = None
    try:
        body = response.json()
        if isinstance(body, Mapping) and isinstance(body.get("error"), str):
            message = body["error"]
        if isinstance(body, Mapping) and isinstance(body.get("missing"), list):
            missing = [m for m in body["missing"] if isinstance(m, str)]
        if isinstance(body, Mapping):
            revoked = response.status_code == 401 and body.get("revoked") is True
            nonce, hub_key = body.get("challenge"), body.get("hub_public_key")
            if isinstance(nonce, str) and isinstance(hub_key, str):
                challenge = (nonce, hub_key)
    except ValueError:
        pass
    if not message:
        message = response.reason_phrase or "error"
        if response.status_code >= 500:
            message = f"coordinator failed: {message}"
    return ApiError(response.status_code, _one_line(message), missing, revoked=revoked,
                    challenge=challenge)


def _check(response: httpx.Response, *ok: int) -> httpx.Response:
    """`response` (read whole, within its limit, by `_send_limited`) if its status is `ok`."""
    if response.status_code not in ok:
        raise _error_from(response)
    return response


def _declared_within(response: httpx.Response, limit: int) -> None:
    """Refuse an answer whose Content-Length already says it is over `limit`, before reading."""
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"{response.request.method} {response.request.url.path}: answer "
                            f"declares {int(declared)} bytes, larger than {limit}")


class _LimitedBody:
    """The decoded body of a streamed answer, gathered piece by piece up to `limit` bytes."""

    def __init__(self, response: httpx.Response, limit: int) -> None:
        _declared_within(response, limit)
        self._response, self._limit = response, limit
        self._body = bytearray()

    def add(self, piece: bytes) -> None:
        self._body += piece
        if len(self._body) > self._limit:
            request = self._response.request
            raise ProtocolError(f"{request.method} {request.url.path}: answer larger than "
                                f"{self._limit} bytes, stopped reading")

    def response(self) -> httpx.Response:
        """A read-whole copy of the streamed answer, holding the decoded body."""
        headers = [(k, v) for k, v in self._response.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length",
                                        "transfer-encoding")]
        return httpx.Response(self._response.status_code, headers=headers,
                              content=bytes(self._body), request=self._response.request,
                              extensions=self._response.extensions)


def _undecodable(request: httpx.Request) -> ProtocolError:
    return ProtocolError(f"{request.method} {request.url.path}: answer cannot be decoded")


def _send_limited(client: httpx.Client, request: httpx.Request, limit: int
                  ) -> httpx.Response:
    """Send `request` and read its answer (error answers too) while counting: past `limit`
    decoded bytes the connection is dropped (ProtocolError), so an endless or bomb body costs
    at most `limit` bytes of memory. Transport errors propagate as httpx raises them."""
    response = client.send(request, stream=True)
    try:
        body = _LimitedBody(response, limit)
        for piece in response.iter_bytes():
            body.add(piece)
    except httpx.DecodingError as exc:
        raise _undecodable(request) from exc
    finally:
        response.close()
    return body.response()


def _head_size(first_line: str, headers: httpx.Headers) -> int:
    """An HTTP/1.1 head as sent: its first line, each `name: value`, and the blank line."""
    return len(first_line) + 2 + sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


def exchange_size(request: httpx.Request, response: httpx.Response) -> int:
    """The bytes of one exchange as httpx sees them: the request's line, headers and body, the
    answer's status line, headers and body as received (compressed, if it was). TLS records
    and TCP/IP headers come on top and are not counted."""
    target = request.url.raw_path.decode("ascii", "replace")
    sent = _head_size(f"{request.method} {target} HTTP/1.1", request.headers)
    try:
        sent += len(request.content)
    except httpx.RequestNotRead:  # a streamed upload (the device API sends none)
        pass
    received = _head_size(f"HTTP/1.1 {response.status_code} {response.reason_phrase}",
                          response.headers) + response.num_bytes_downloaded
    return sent + received


async def _send_limited_async(client: httpx.AsyncClient, request: httpx.Request, limit: int
                              ) -> httpx.Response:
    """`_send_limited` for the async client. The exchange's size goes to the task's byte meter
    (mesh.meter: the agent's WAN byte account), error answers included."""
    response = await client.send(request, stream=True)
    try:
        body = _LimitedBody(response, limit)
        async for piece in response.aiter_bytes():
            body.add(piece)
    except httpx.DecodingError as exc:
        raise _undecodable(request) from exc
    finally:
        count_bytes(exchange_size(request, response))  # before a cancelled close could skip it
        await response.aclose()
    return body.response()


def _range_header(start: int | None, end: int | None) -> dict[str, str]:
    """`Range` for the slice [start:end) of a blob (end exclusive, like Python slices); a
    negative `start` without `end` asks for the last -start bytes."""
    if start is None and end is None:
        return {}
    if start is not None and start < 0:
        if end is not None:
            raise ValueError("a negative start (the last N bytes) takes no end")
        return {"Range": f"bytes={start}"}
    first = start or 0
    if end is None:
        return {"Range": f"bytes={first}-"}
    if end <= first:
        raise ValueError("end must be greater than start")
    return {"Range": f"bytes={first}-{end - 1}"}


def _release_path(fleet: str, app: str, version: int) -> str:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError("version must be a positive integer")
    return f"/releases/{_path_name(fleet)}/{_path_name(app)}/{version}"


def _blob_path(blob_id: str) -> str:
    if not isinstance(blob_id, str) or len(blob_id) != 64 or \
            any(c not in "0123456789abcdef" for c in blob_id):
        raise ValueError("blob_id must be 64 lowercase hex digits")
    return f"/blobs/{blob_id}"


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ProtocolError(f"{response.request.method} {response.request.url.path}: "
                            "answer is not JSON") from exc


def _has_cert_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _transport_error(exc: httpx.TransportError, base_url: str) -> ClientError | PinError:
    if _has_cert_failure(exc):
        return PinError(f"coordinator at {base_url} presented a certificate other than the "
                        "pinned one: refusing to talk to it")
    reason = _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        reason = f"timed out ({type(exc).__name__})"
    return CoordinatorUnreachable(f"cannot reach the coordinator at {base_url}: {reason}")


def _path_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    return quote(name, safe="")


def _pin_release_key(token: str, release_key: str | None, root_fp: str | None = None) -> str:
    """`token` carrying `r` + `root_fp` (a root version 1's fingerprint) if given, else the
    fingerprint of `release_key` (hex), else as it is. A token the coordinator minted with a
    fingerprint already must name the same one."""
    try:
        parts = TokenParts.parse(token)
    except ControlError as exc:
        raise ProtocolError(str(exc)) from exc
    lied = ProtocolError("token: the coordinator wrote another fingerprint into it")
    if root_fp is not None:
        if parts.root_fp not in (None, root_fp) or parts.release_key_fp is not None:
            raise lied
        return str(replace(parts, root_fp=root_fp))
    if release_key is None:
        return token
    if len(release_key) != 64 or any(c not in "0123456789abcdef" for c in release_key):
        raise ValueError("release_key must be an Ed25519 public key, 64 lowercase hex digits")
    fp = key_fingerprint(bytes.fromhex(release_key))
    if parts.release_key_fp not in (None, fp) or parts.root_fp is not None:
        raise lied
    return str(replace(parts, release_key_fp=fp))


def _roots_from(body: Any, fleet: str) -> list[SignedRoot]:
    """The signed roots of a GET /fleets/{fleet}/root answer, decoded (not verified: that is
    `mesh.release.verify_root_chain`'s job, against what the caller trusts)."""
    roots = body.get("roots") if isinstance(body, dict) else None
    if not isinstance(roots, list) or len(roots) > MAX_ROOT_CHAIN:
        raise ProtocolError(f"roots: answer has no list of at most {MAX_ROOT_CHAIN} roots")
    try:
        return [signed_root_from_json(r) for r in roots]
    except RootError as exc:
        raise ProtocolError(f"roots of fleet {fleet}: {exc}") from None


def _base(url: str) -> str:
    split_url(url)  # https only, with a host; raises PinError otherwise
    return url.rstrip("/")


def coordinator_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """Every replica's URL (docs/scale.md, "Replicas"): one URL, several separated by commas,
    or a sequence of them; each checked (PinError), duplicates dropped, order kept."""
    given = url.split(",") if isinstance(url, str) else list(url)
    urls = tuple(dict.fromkeys(_base(u.strip()) for u in given if u.strip()))
    if not urls:
        raise PinError("no coordinator URL given")
    return urls


def _rotation(urls: tuple[str, ...], current: str) -> list[str]:
    """The URLs, the one in use first."""
    i = urls.index(current)
    return [*urls[i:], *urls[:i]]


def _failover(exc: httpx.TransportError, url: str, last: bool) -> None:
    """Returns (the caller tries the next replica) if the request never reached a coordinator
    (nothing was sent) and another URL is left; raises the client's error otherwise. A
    failure after sending (a read timeout, a dropped answer) is not retried elsewhere: the
    first replica may have done it."""
    if not last and isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) and \
            not _has_cert_failure(exc):
        return
    raise _transport_error(exc, url) from exc


# --------------------------------------------------------------------------- operator (sync)


class OperatorClient:
    """The operator API, synchronous. Give the pinned certificate (`cert_der`) or its
    `fingerprint`; with only a fingerprint the certificate is fetched and checked on first use.
    `url`: one coordinator, or every replica's (`coordinator_urls`): a request that cannot
    connect goes to the next one (replicas share the pinned certificate); an answer, even an
    error, is final.
    """

    def __init__(self, url: str | Sequence[str], api_key: str, *,
                 cert_der: bytes | None = None, fingerprint: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if cert_der is None and fingerprint is None:
            raise ValueError("give cert_der or fingerprint: the coordinator is always pinned")
        self.urls = coordinator_urls(url)
        self.url = self.urls[0]  # the one in use
        self._api_key = api_key
        self._fingerprint = None if fingerprint is None else normalize_fingerprint(fingerprint)
        if cert_der is not None and self._fingerprint is not None:
            check_fingerprint(cert_der, self._fingerprint, self.url)
        self._cert_der = cert_der
        self._timeout = timeout
        self._http: httpx.Client | None = None

    def __repr__(self) -> str:
        return f"OperatorClient({self.url!r}, api_key=<hidden>)"

    @property
    def cert_der(self) -> bytes:
        """The pinned certificate (fetched and checked against the fingerprint if needed)."""
        if self._cert_der is None:
            assert self._fingerprint is not None
            for i, url in enumerate(_rotation(self.urls, self.url)):
                try:
                    self._cert_der = connect_pinned(url, self._fingerprint, self._timeout)
                    self.url = url
                    break
                except CertificateFetchError as exc:
                    if i == len(self.urls) - 1:
                        raise CoordinatorUnreachable(str(exc)) from exc
        assert self._cert_der is not None
        return self._cert_der

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(
                base_url=self.url, verify=pinned_ssl_context(self.cert_der),
                timeout=httpx.Timeout(self._timeout), trust_env=False,
                headers={"Authorization": f"Bearer {self._api_key}",
                         "Accept": "application/json"})
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _send(self, method: str, path: str, *ok: int, limit: int = MAX_JSON_ANSWER,
              **kwargs: Any) -> httpx.Response:
        rotation = _rotation(self.urls, self.url)
        for url in rotation:
            if url != self.url:  # the one before did not connect: the next replica
                self.close()
                self.url = url
            client = self._client()
            request = client.build_request(method, API + path, **kwargs)
            try:
                return _check(_send_limited(client, request, limit), *ok)
            except httpx.TransportError as exc:
                _failover(exc, url, url == rotation[-1])
        raise AssertionError("unreachable: the last URL's failure raised")

    def _request(self, method: str, path: str, *ok: int, **kwargs: Any) -> Any:
        return _json(self._send(method, path, *ok, **kwargs))

    def _transfer_timeout(self) -> httpx.Timeout:
        t = max(self._timeout, TRANSFER_TIMEOUT)
        return httpx.Timeout(self._timeout, read=t, write=t)

    def _obj(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ProtocolError(f"{what}: answer is not an object")
        return value

    def create_token(self, fleet: str, uses: int = 1, expires_in: int = 3600,
                     name: str | None = None, release_key: str | None = None,
                     root: SignedRoot | None = None, tags: Mapping[str, str] | None = None
                     ) -> dict[str, Any]:
        """→ `{"token", "fleet", "uses", "expires_at"}`. `name` binds the token to one device
        name. `release_key` (the fleet's Ed25519 release public key, hex, as the operator
        knows it) is written into the token as its fingerprint: a device enrolled with it
        refuses any other key (docs/security.md). A fleet with root metadata gets its root
        version 1's fingerprint instead (`token_root_fingerprint`): the device then follows
        the fleet's key rotations. `tags`: the tags every device enrolled with the token
        gets (docs/rollouts.md)."""
        root_fp = self.token_root_fingerprint(fleet, release_key, root)
        body: dict[str, Any] = {"fleet": fleet, "uses": uses, "expires_in": expires_in,
                                "name": name}
        if tags:
            body["tags"] = dict(tags)
        out = self._obj(self._request("POST", "/tokens", 201, json=body), "token")
        if not isinstance(out.get("token"), str):
            raise ProtocolError("token: answer has no token")
        out["token"] = _pin_release_key(out["token"], release_key, root_fp)
        return out

    def token_root_fingerprint(self, fleet: str, release_key: str | None,
                               root: SignedRoot | None = None) -> str | None:
        """The root fingerprint a new token of `fleet` carries: `root`'s (the operator's own
        copy of root version 1) if given; else, if the coordinator has roots for the fleet,
        its version 1's, once the chain verifies and (when `release_key` is known) its newest
        root names that very release key, so that a coordinator cannot slip in roots of its
        own. None for a fleet without roots."""
        if root is not None:
            meta = decode_root_body(root.body)
            if meta.version != 1 or meta.fleet != fleet:
                raise ValueError(f"root: a token pins version 1 of fleet {fleet}'s roots, not "
                                 f"version {meta.version} of fleet {meta.fleet}")
            return root_fingerprint(root)
        try:
            chain = self.roots(fleet)
        except ApiError as exc:
            if exc.status in (404, 405):  # a coordinator from before root metadata
                return None
            raise
        if not chain:
            return None
        try:
            newest = verify_root_chain(None, root_fingerprint(chain[0]), chain)
        except RootError as exc:
            raise ProtocolError(f"the coordinator's roots of fleet {fleet}: {exc}") from None
        if release_key is not None and newest.release_key.hex() != release_key:
            raise ProtocolError(
                f"the coordinator's roots of fleet {fleet} name release key "
                f"{newest.release_key.hex()[:16]}…, not yours ({release_key[:16]}…): pass "
                "the root file you signed (--root)")
        return root_fingerprint(chain[0])

    def list_devices(self, fleet: str | None = None, selector: str | None = None
                     ) -> list[dict[str, Any]]:
        """→ a list of DeviceInfo dicts (docs/api.md); `selector` (`site=berlin,role=cam`)
        keeps the devices whose tags match it."""
        params = {} if fleet is None else {"fleet": fleet}
        if selector is not None:
            params["selector"] = selector
        out = self._obj(self._request("GET", "/devices", 200, params=params), "devices")
        devices = out.get("devices")
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
            raise ProtocolError("devices: answer has no list of devices")
        return devices

    def device(self, name: str) -> dict[str, Any]:
        """→ DeviceInfo dict; ApiError 404 for an unknown name."""
        return self._obj(self._request("GET", f"/devices/{_path_name(name)}", 200), "device")

    def provision(self, name: str, fleet: str, expires_in: int | None = None,
                  release_key: str | None = None, root: SignedRoot | None = None,
                  tags: Mapping[str, str] | None = None) -> dict[str, Any]:
        """→ `{"device": DeviceInfo, "join": {"url", "token", "name", "fleet"}}`; the join
        token lives `expires_in` seconds (server default 1 h) and carries the fingerprint of
        the fleet's root version 1, or of `release_key` when given (as `create_token`);
        the device gets `tags` once it enrolls."""
        root_fp = self.token_root_fingerprint(fleet, release_key, root)
        body: dict[str, Any] = {"name": name, "fleet": fleet}
        if expires_in is not None:
            body["expires_in"] = expires_in
        if tags:
            body["tags"] = dict(tags)
        out = self._obj(self._request("POST", "/devices", 201, json=body), "provision")
        join = out.get("join")
        if not isinstance(join, dict) or not isinstance(join.get("token"), str):
            raise ProtocolError("provision: answer has no join object")
        join["token"] = _pin_release_key(join["token"], release_key, root_fp)
        return out

    def tag_device(self, name: str, set: Mapping[str, str] | None = None,
                   remove: Sequence[str] = ()) -> dict[str, Any]:
        """Set and remove tags of a device → `{"device", "tags"}` (all its tags after the
        change); ApiError 404 for an unknown device, 400 for a bad tag."""
        body = {"set": dict(set or {}), "remove": list(remove)}
        out = self._obj(self._request("PATCH", f"/devices/{_path_name(name)}/tags", 200,
                                      json=body), "tags")
        if not isinstance(out.get("tags"), dict):
            raise ProtocolError("tags: answer has no tags")
        return out

    def revoke(self, name: str) -> dict[str, Any]:
        """→ DeviceInfo dict with state `revoked`."""
        return self._obj(self._request("POST", f"/devices/{_path_name(name)}/revoke", 200),
                         "revoke")

    def peers(self, name: str) -> list[dict[str, Any]]:
        """→ list of `{"peer", "public_key", "path", "endpoint", "last_handshake"}` as the
        device last reported them."""
        out = self._obj(self._request("GET", f"/devices/{_path_name(name)}/peers", 200),
                        "peers")
        peers = out.get("peers")
        if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
            raise ProtocolError("peers: answer has no list of peers")
        return peers

    def add_operator(self, name: str, public_key: str) -> dict[str, Any]:
        """Register a workstation's WireGuard public key → `{"name", "mesh_ipv4", "mesh_ipv6",
        "hub": HubInfo, "mesh_prefix_v4", "mesh_prefix_v6"}` (hub parsed, the rest as sent)."""
        out = self._obj(self._request("POST", "/operators", 201,
                                      json={"name": name, "public_key": public_key}),
                        "operator")
        try:
            out["hub"] = HubInfo.from_json(out.get("hub"))
        except ControlError as exc:
            raise ProtocolError(f"operator: {exc}") from exc
        for key in ("mesh_ipv4", "mesh_ipv6", "mesh_prefix_v4", "mesh_prefix_v6"):
            if not isinstance(out.get(key), str):
                raise ProtocolError(f"operator.{key}: missing")
        return out


    # -- releases and blobs (docs/api.md "Releases and blobs") ------------------------------

    def missing_blobs(self, ids: Sequence[str]) -> list[str]:
        """The IDs among `ids` that the coordinator does not store (batched by 10,000)."""
        out: list[str] = []
        ids = list(ids)
        for start in range(0, len(ids), MISSING_BATCH):
            body = self._obj(self._request("POST", "/blobs/missing", 200,
                                           json={"ids": ids[start:start + MISSING_BATCH]}),
                             "missing")
            missing = body.get("missing")
            if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
                raise ProtocolError("missing: answer has no list of IDs")
            out.extend(missing)
        return out

    def put_blob(self, blob_id: str, data: bytes, kind: str) -> bool:
        """Upload one blob (`kind` "chunk" or "delta", at most 64 MiB) → True if it is new,
        False if the coordinator had it. ApiError 400 if `data` does not hash to `blob_id`."""
        if kind not in ("chunk", "delta"):
            raise ValueError("kind must be 'chunk' or 'delta'")
        response = self._send("PUT", _blob_path(blob_id), 201, 200, params={"kind": kind},
                              content=bytes(data), timeout=self._transfer_timeout(),
                              headers={"Content-Type": "application/octet-stream"})
        return response.status_code == 201

    def get_blob(self, blob_id: str, start: int | None = None, end: int | None = None
                 ) -> bytes:
        """A blob, or its slice [start:end) (end exclusive; negative start: the last -start
        bytes). ApiError 404 if unknown, 416 if the slice starts beyond the blob."""
        headers = _range_header(start, end)
        response = self._send("GET", _blob_path(blob_id), 200, 206, limit=MAX_BLOB_ANSWER,
                              headers=headers, timeout=self._transfer_timeout())
        return _ranged_content(response, start, end)

    def publish_release(self, signed_manifest: bytes, rollout: str | None = None
                        ) -> tuple[dict[str, Any], bool]:
        """Publish an encoded SignedManifest → (ReleaseInfo, created?); created is False when
        these exact bytes were already published. ApiError 409 with `.missing` listing the
        blobs still to upload (empty for other conflicts: version not newer), 403 if the fleet's
        release key did not sign it, 400 if malformed. `rollout="held"`: the release targets
        no device until its rollout starts (`start_rollout`)."""
        if rollout not in (None, "held"):
            raise ValueError("rollout must be None or 'held'")
        params = {} if rollout is None else {"rollout": rollout}
        response = self._send("POST", "/releases", 201, 200, content=bytes(signed_manifest),
                              params=params,
                              headers={"Content-Type": "application/octet-stream"},
                              timeout=self._transfer_timeout())
        return self._obj(_json(response), "release"), response.status_code == 201

    def list_releases(self, fleet: str, app: str | None = None) -> list[dict[str, Any]]:
        """ReleaseInfo dicts, newest first."""
        params = {"fleet": fleet} if app is None else {"fleet": fleet, "app": app}
        out = self._obj(self._request("GET", "/releases", 200, params=params), "releases")
        releases = out.get("releases")
        if not isinstance(releases, list) or not all(isinstance(r, dict) for r in releases):
            raise ProtocolError("releases: answer has no list of releases")
        return releases

    def release(self, fleet: str, app: str, version: int) -> dict[str, Any]:
        """ReleaseInfo with `layers` as a list of per-layer details; ApiError 404 if unknown."""
        return self._obj(self._request("GET", _release_path(fleet, app, version), 200),
                         "release")

    def release_manifest(self, fleet: str, app: str, version: int) -> bytes:
        """The encoded SignedManifest exactly as published."""
        return self._send("GET", _release_path(fleet, app, version) + "/manifest", 200,
                          limit=MAX_MANIFEST_ANSWER, timeout=self._transfer_timeout()).content

    def delete_release(self, fleet: str, app: str, version: int) -> None:
        """Delete a release and the blobs no other release names; 409 if it is a target."""
        self._send("DELETE", _release_path(fleet, app, version), 204, 200)

    def set_release_key(self, fleet: str, public_key_hex: str) -> dict[str, Any]:
        """Set the fleet's Ed25519 release key (hex) → `{"fleet", "public_key", "key_id"}`."""
        return self._obj(self._request("PUT", f"/fleets/{_path_name(fleet)}/release-key", 200,
                                       json={"public_key": public_key_hex}), "release key")

    def put_root(self, fleet: str, signed: SignedRoot) -> dict[str, Any]:
        """Publish the fleet's next signed root → `{"fleet", "version", "release_key",
        "key_id", "fingerprint"}`; its release key becomes the fleet's. 403 if it lacks the
        signatures (of the stored root's keys and its own), 409 if its version is not the
        next one."""
        return self._obj(self._request("PUT", f"/fleets/{_path_name(fleet)}/root", 200,
                                       content=encode_signed_root(signed),
                                       headers={"Content-Type": "application/json"}),
                         "root")

    def roots(self, fleet: str, since: int = 0) -> list[SignedRoot]:
        """The fleet's signed roots newer than version `since`, oldest first (at most
        MAX_ROOT_CHAIN per call)."""
        body = self._request("GET", f"/fleets/{_path_name(fleet)}/root", 200,
                             params={"since": since}, limit=MAX_ROOT_ANSWER)
        return _roots_from(body, fleet)

    def set_policy(self, fleet: str, policy: str) -> dict[str, Any]:
        """Set the fleet's reachability policy (the file's text, docs/policy.md) → the API's
        `Policy`; 400 names the line that does not parse."""
        return self._obj(self._request("PUT", f"/fleets/{_path_name(fleet)}/policy", 200,
                                       content=policy.encode(),
                                       headers={"Content-Type": "text/plain; charset=utf-8"}),
                         "policy")

    def policy(self, fleet: str) -> dict[str, Any]:
        """The fleet's reachability policy → `Policy` (`version` 0: none, the default)."""
        return self._obj(self._request("GET", f"/fleets/{_path_name(fleet)}/policy", 200),
                         "policy")

    def compiled_policy(self, fleet: str, device: str) -> dict[str, Any]:
        """What `device` may reach and what may reach it, with the rules that allow each peer
        (docs/api.md, "Reachability policy")."""
        return self._obj(self._request("GET", f"/fleets/{_path_name(fleet)}/policy/compiled",
                                       200, params={"device": device}), "compiled policy")

    def timestamp_key(self, fleet: str) -> str:
        """The coordinator's online timestamp public key (hex), for the operator to grant."""
        out = self._obj(self._request("GET", f"/fleets/{_path_name(fleet)}/timestamp-key", 200),
                        "timestamp key")
        key = out.get("public_key")
        if not isinstance(key, str):
            raise ProtocolError("timestamp key: answer has no public_key")
        return key

    def set_timestamp_grant(self, fleet: str, grant: bytes) -> dict[str, Any]:
        """Hand the coordinator the operator's signed grant of its timestamp key (encoded, as
        `mesh.release.sign_timestamp_grant` makes it) → `{"fleet", "public_key",
        "granted_at"}`. 403 if not signed with the fleet's release key, 409 if it names
        another key."""
        return self._obj(self._request("PUT", f"/fleets/{_path_name(fleet)}/timestamp-grant",
                                       200, json={"grant": bytes(grant).hex()}),
                         "timestamp grant")

    def set_target(self, fleet: str, app: str, version: int, device: str | None = None,
                   pin: bytes | None = None) -> dict[str, Any]:
        """The release the fleet's devices (or one device) should run → `{"fleet", "app",
        "version", "device", "pin", "set_at"}`. A version older than the app's latest needs
        `pin`: an encoded SignedPin signed with the fleet's release key."""
        body = {"app": app, "version": version, "device": device,
                "pin": None if pin is None else bytes(pin).hex()}
        return self._obj(self._request("PUT", f"/fleets/{_path_name(fleet)}/target", 200,
                                       json=body), "target")

    # -- rollouts, logs and actions (docs/api.md "Rollouts, logs and operator actions") ------

    def release_status(self, fleet: str, app: str, version: int) -> dict[str, Any]:
        """→ `{"fleet", "app", "version", "devices": [{"device", "state", "bytes_done",
        "bytes_total", "running", "target", "online", "error", "lock_since", "lock_stale",
        "by_source", "updated_at"}], "summary": {"total", "running", "failed", "downloading",
        "waiting", "pending", "superseded"}}`; ApiError 404 for an unknown release."""
        out = self._obj(self._request("GET", _release_path(fleet, app, version) + "/status",
                                      200), "status")
        devices, summary = out.get("devices"), out.get("summary")
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices) or \
                not isinstance(summary, dict):
            raise ProtocolError("status: answer has no devices and summary")
        return out

    def start_rollout(self, fleet: str, app: str, version: int, spec_json: Mapping[str, Any],
                      rollback_pin: bytes | None = None) -> dict[str, Any]:
        """Start (or restart) the phased rollout of a release → Rollout (docs/rollouts.md).
        `spec_json`: `mesh.rollout.RolloutSpec.to_json()`; `rollback_pin`: an encoded
        SignedPin of the previous release, which devices go back to on a halt. ApiError 404
        unknown release, 409 another rollout of the app runs, 403 pin not signed with the
        fleet's release key."""
        body = {**spec_json, "rollback_pin": None if rollback_pin is None
                else bytes(rollback_pin).hex()}
        return self._rollout_answer(self._request(
            "POST", _release_path(fleet, app, version) + "/rollout", 201, json=body))

    def rollout(self, fleet: str, app: str, version: int) -> dict[str, Any]:
        """→ the release's Rollout; ApiError 404 when it has none."""
        return self._rollout_answer(self._request(
            "GET", _release_path(fleet, app, version) + "/rollout", 200))

    def rollout_action(self, fleet: str, app: str, version: int, action: str
                       ) -> dict[str, Any]:
        """`pause`, `resume`, `abort` or `promote` the release's rollout → Rollout; ApiError
        409 when the action does not apply to its state."""
        if action not in ROLLOUT_ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ROLLOUT_ACTIONS)}")
        return self._rollout_answer(self._request(
            "POST", _release_path(fleet, app, version) + f"/rollout/{action}", 200))

    def rollouts(self, fleet: str) -> list[dict[str, Any]]:
        """The fleet's Rollouts, newest first."""
        out = self._obj(self._request("GET", "/rollouts", 200, params={"fleet": fleet}),
                        "rollouts")
        rollouts = out.get("rollouts")
        if not isinstance(rollouts, list):
            raise ProtocolError("rollouts: answer has no list of rollouts")
        return [self._rollout_answer(r) for r in rollouts]

    def _rollout_answer(self, value: Any) -> dict[str, Any]:
        out = self._obj(value, "rollout")
        if not isinstance(out.get("state"), str) or not isinstance(out.get("phases"), list) \
                or not isinstance(out.get("events"), list):
            raise ProtocolError("rollout: answer has no state, phases and events")
        return out

    def device_logs(self, name: str, after: int = 0, wait: float = 0, limit: int | None = None,
                    tail: int | None = None) -> dict[str, Any]:
        """→ `{"lines": [{"seq", "ts", "app", "stream", "line"}], "next", "dropped"}`: lines
        after sequence number `after` (or the newest `tail`), waiting up to `wait` seconds
        (≤ 30) for some to arrive. Follow by passing `next` as `after`."""
        wait = max(0.0, min(float(MAX_LOG_WAIT), float(wait)))
        params: dict[str, Any] = {"wait": wait} if tail is not None else {"after": after,
                                                                          "wait": wait}
        if limit is not None:
            params["limit"] = limit
        if tail is not None:
            params["tail"] = tail
        timeout = httpx.Timeout(self._timeout, read=self._timeout + wait + LONG_POLL_SLACK)
        out = self._obj(_json(self._send("GET", f"/devices/{_path_name(name)}/logs", 200,
                                         limit=MAX_LOG_ANSWER, params=params,
                                         timeout=timeout)), "logs")
        lines = out.get("lines")
        if not isinstance(lines, list) or not all(isinstance(x, dict) for x in lines) or \
                not isinstance(out.get("next"), int):
            raise ProtocolError("logs: answer has no lines and next")
        return out

    def update_device(self, name: str, app: str, force: bool = True) -> dict[str, Any]:
        """Force the device past its app's update lock for its current target (or take the
        force back) → `{"device", "app", "version", "force"}`; 409 if it has no target."""
        return self._obj(self._request("POST", f"/devices/{_path_name(name)}/update", 200,
                                       json={"app": app, "force": force}), "update")

    def retry(self, app: str, *, device: str | None = None, fleet: str | None = None,
              version: int | None = None) -> dict[str, Any]:
        """Let a device retry the version of `app` it marked failed (`device`) → `{"device",
        "app", "retry"}`; or every device that failed release `version` of `fleet` → `{"fleet",
        "app", "version", "devices": [{"device", "retry"}]}`."""
        if device is not None:
            return self._obj(self._request("POST", f"/devices/{_path_name(device)}/retry", 200,
                                           json={"app": app}), "retry")
        if fleet is None or version is None:
            raise ValueError("give device, or fleet and version")
        out = self._obj(self._request("POST", _release_path(fleet, app, version) + "/retry",
                                      200), "retry")
        if not isinstance(out.get("devices"), list):
            raise ProtocolError("retry: answer has no list of devices")
        return out


def _ranged_content(response: httpx.Response, start: int | None, end: int | None) -> bytes:
    """The requested slice, also when the server sent the whole blob (200)."""
    data = response.content
    if response.status_code == 200 and (start is not None or end is not None):
        return data[start:end]
    return data


# --------------------------------------------------------------------------- device (trio)


class DeviceClient:
    """The device API, async (trio via httpx.AsyncClient), pinned to `cert_der`. `url`: one
    coordinator or every replica's, tried in turn on a failure to connect (as OperatorClient).
    """

    def __init__(self, url: str | Sequence[str], credential: str, cert_der: bytes, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.urls = coordinator_urls(url)
        self.url = self.urls[0]  # the one in use
        self._timeout = timeout
        self._credential, self._cert_der = credential, cert_der
        self._http = self._new_http()

    def _new_http(self) -> httpx.AsyncClient:
        # (with a transport of its own, httpx takes TLS settings from the transport only)
        transport = httpx.AsyncHTTPTransport(verify=pinned_ssl_context(self._cert_der),
                                             socket_options=DEVICE_SOCKET_OPTIONS)
        return httpx.AsyncClient(
            base_url=self.url, transport=transport, timeout=httpx.Timeout(self._timeout),
            trust_env=False, headers={"Authorization": f"Bearer {self._credential}",
                                      "Accept": "application/json"})

    def __repr__(self) -> str:
        return f"DeviceClient({self.url!r}, credential=<hidden>)"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> DeviceClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, *ok: int,
                       limit: int = MAX_JSON_ANSWER, **kwargs: Any) -> httpx.Response:
        rotation = _rotation(self.urls, self.url)
        for url in rotation:
            if url != self.url:  # the one before did not connect: the next replica
                await self._http.aclose()
                self.url = url
                self._http = self._new_http()  # (for self.url)
            request = self._http.build_request(method, API + path, **kwargs)
            try:
                return _check(await _send_limited_async(self._http, request, limit), *ok)
            except httpx.TransportError as exc:
                _failover(exc, url, url == rotation[-1])
        raise AssertionError("unreachable: the last URL's failure raised")

    async def peermap(self, version: int = 0, wait: float = 25, hold: float = 0.0,
                      quiet: bool = False, held: PeerMap | None = None) -> PeerMap | None:
        """Long poll: the peer map if its version differs from `version`, None (304) if nothing
        changed within `wait` seconds (clamped to 0..MAX_WAIT, 1800). `hold`: how much longer
        the answer may take on its way (a NAT that lost our binding holds it until our next
        packet: agent/_keepalive.py measures that lateness instead of timing out); `quiet`:
        we send nothing to the hub meanwhile (a keepalive trial), online all the same.
        `held`: the map we hold at `version`: we then ask for only the changes since
        (docs/api.md, "Incremental peer maps") and return `held` with them applied; a delta
        from another base than `held` is never applied: the full map is asked for instead."""
        wait = max(0, min(MAX_WAIT, int(wait)))
        hold = max(0.0, min(float(MAX_WAIT), hold))
        incremental = held is not None and held.version == version and version != 0
        answer = await self._peermap(version, wait, hold, quiet, incremental)
        if not isinstance(answer, PeerMapDelta):
            return answer
        if held is not None and answer.base == held.version:
            try:
                return answer.apply(held)
            except ControlError as exc:
                raise ProtocolError(str(exc)) from exc
        full = await self._peermap(0, 0, hold, quiet, False)  # version 0 answers at once
        if not isinstance(full, PeerMap):
            raise ProtocolError("peermap: a delta where the full map was asked for")
        return full

    async def _peermap(self, version: int, wait: int, hold: float, quiet: bool, delta: bool
                       ) -> PeerMap | PeerMapDelta | None:
        timeout = httpx.Timeout(self._timeout, read=wait + LONG_POLL_SLACK + hold)
        params = {"version": version, "wait": wait, **({"quiet": 1} if quiet else {}),
                  **({"delta": 1} if delta else {})}
        response = await self._request("GET", "/device/peermap", 200, 304, params=params,
                                       timeout=timeout, limit=MAX_PEERMAP_BYTES)
        if response.status_code == 304:
            return None
        try:
            return peermap_answer(_json(response))
        except ControlError as exc:
            raise ProtocolError(str(exc)) from exc

    async def report(self, report: DeviceReport) -> None:
        await self._request("POST", "/device/state", 204, 200, json=report.to_json())

    async def punch(self, peer: str) -> None:
        """Ask `peer` (of this device's fleet) to punch a direct path to us now."""
        await self._request("POST", "/device/punch", 204, 200, json={"peer": peer})

    def _transfer_timeout(self) -> httpx.Timeout:
        t = max(self._timeout, TRANSFER_TIMEOUT)
        return httpx.Timeout(self._timeout, read=t, write=t)

    async def manifest(self, fleet: str, app: str, version: int) -> bytes:
        """The encoded SignedManifest of a release of this device's fleet (verify it!)."""
        response = await self._request("GET", _release_path(fleet, app, version) + "/manifest",
                                       200, limit=MAX_MANIFEST_ANSWER,
                                       timeout=self._transfer_timeout())
        return response.content

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        """A blob a release of this device's fleet names, or its slice [start:end)."""
        response = await self._request("GET", _blob_path(blob_id), 200, 206,
                                       limit=MAX_BLOB_ANSWER, headers=_range_header(start, end),
                                       timeout=self._transfer_timeout())
        return _ranged_content(response, start, end)

    async def upload_logs(self, lines: Sequence[LogLine], dropped: int = 0) -> None:
        """Upload app log lines (≤ 1,000 per call, body ≤ 1 MiB) and how many lines were
        dropped since the last successful upload."""
        await self._request("POST", "/device/logs", 204, 200,
                            json=LogUpload(tuple(lines), dropped).to_json())

    async def timestamp(self) -> bytes | None:
        """The fleet's signed timestamp (verify it with `mesh.release.verify_timestamp`), or
        None when the operator has granted no timestamp key for the fleet."""
        body = _json(await self._request("GET", "/device/timestamp", 200))
        stamp = body.get("timestamp") if isinstance(body, dict) else None
        if stamp is None:
            return None
        try:
            if not isinstance(stamp, str):
                raise ValueError
            return bytes.fromhex(stamp)
        except ValueError:
            raise ProtocolError("timestamp: answer is not hex or null") from None

    async def roots(self, fleet: str, since: int) -> list[SignedRoot]:
        """The signed roots of this device's fleet newer than `since`, oldest first (at most
        MAX_ROOT_CHAIN): verify them with `mesh.release.verify_root_chain`."""
        response = await self._request("GET", f"/fleets/{_path_name(fleet)}/root", 200,
                                       params={"since": since}, limit=MAX_ROOT_ANSWER)
        return _roots_from(_json(response), fleet)

    async def targets(self) -> list[dict[str, Any]]:
        """`[{"app", "version", "pin", "force", "retry"}]`: what this device should run (pin:
        hex or None; force: past the update lock; retry: the operator's retry counter)."""
        body = _json(await self._request("GET", "/device/target", 200))
        targets = body.get("targets") if isinstance(body, dict) else None
        if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
            raise ProtocolError("targets: answer has no list of targets")
        return targets


async def enroll(url: str, token: str, public_key: str, name: str | None = None,
                 lan_endpoints: tuple[str, ...] = (), agent_version: str = "", *,
                 timeout: float = DEFAULT_TIMEOUT, credential: str | None = None,
                 private_key: str | None = None, platform: str = "") -> tuple[Enrollment, bytes]:
    """`enroll_with_root` without the verified root (the enrollment's release key is the one
    it pins, checked the same way)."""
    enrollment, der, _root = await enroll_with_root(
        url, token, public_key, name, lan_endpoints, agent_version, timeout=timeout,
        credential=credential, private_key=private_key, platform=platform)
    return enrollment, der


async def enroll_with_root(url: str, token: str, public_key: str, name: str | None = None,
                           lan_endpoints: tuple[str, ...] = (), agent_version: str = "", *,
                           timeout: float = DEFAULT_TIMEOUT, credential: str | None = None,
                           private_key: str | None = None, platform: str = ""
                           ) -> tuple[Enrollment, bytes, SignedRoot | None]:
    """Verify the coordinator by the token's fingerprint, then enroll over the pinned channel.

    Enrolling again a device that is active needs a proof of being it (docs/security.md):
    its current `credential`, or its WireGuard `private_key` (which never leaves this
    process: it answers the coordinator's challenge with a MAC keyed by X25519(private key,
    hub key)). A first enrollment needs neither.

    A token that carries a release key fingerprint (docs/security.md) admits only an
    enrollment with that key: else ReleaseKeyMismatch, and the caller must keep nothing. A
    token that carries a root fingerprint makes this fetch the fleet's roots, verify them from
    version 1 (which must have that fingerprint) and pin the release key the newest names:
    else ReleaseKeyMismatch; the newest root is returned for the caller to keep.

    Returns the enrollment, the certificate to pin from now on (e.g. for DeviceClient) and
    the verified newest root (None unless the token names one). Raises ControlError for a
    malformed token or request, PinError for a coordinator whose certificate does not match,
    ApiError for a refused enrollment (401 token, 409 name, 403 a proof that does not hold),
    ReleaseKeyMismatch.
    """
    parts = TokenParts.parse(token)
    request = EnrollRequest.from_json(EnrollRequest(
        token, public_key, name, tuple(lan_endpoints), agent_version,
        credential=credential, platform=platform).to_json())
    base = _base(url)
    host, port = split_url(base)
    try:
        der = await fetch_certificate_async(host, port, timeout)
    except CertificateFetchError as exc:
        raise CoordinatorUnreachable(str(exc)) from exc
    check_fingerprint(der, parts.fingerprint, f"{host}:{port}")
    async with httpx.AsyncClient(base_url=base, verify=pinned_ssl_context(der),
                                 timeout=httpx.Timeout(timeout), trust_env=False) as http:
        try:
            response = await _send_limited_async(
                http, http.build_request("POST", API + "/enroll", json=request.to_json()),
                MAX_ENROLL_ANSWER)
            challenge = _error_from(response).challenge if response.status_code == 409 \
                else None
            if challenge is not None and private_key is not None:
                nonce, hub_key = challenge
                check_key(hub_key, "enroll challenge: hub_public_key")
                mac = key_proof_mac(x25519_secret(private_key, hub_key), nonce, public_key)
                proven = replace(request, key_proof=KeyProof(nonce, mac))
                response = await _send_limited_async(
                    http, http.build_request("POST", API + "/enroll", json=proven.to_json()),
                    MAX_ENROLL_ANSWER)
        except httpx.TransportError as exc:
            raise _transport_error(exc, base) from exc
        _check(response, 201, 200)
        try:
            enrollment = Enrollment.from_json(_json(response))
        except ControlError as exc:
            raise ProtocolError(str(exc)) from exc
        _check_release_key(enrollment, parts.release_key_fp)
        if parts.root_fp is None:
            return enrollment, der, None
        async with DeviceClient(url, enrollment.credential, der, timeout=timeout) as device:
            newest, root = await _verified_roots(device, enrollment.fleet, parts.root_fp)
    if enrollment.release_key != newest.release_key.hex():
        raise ReleaseKeyMismatch(
            f"the coordinator handed release key {enrollment.release_key or 'none'} for fleet "
            f"{enrollment.fleet}, its root version {newest.version} (verified from the token's "
            f"root) names {newest.release_key.hex()}: not enrolling")
    return enrollment, der, root


async def _verified_roots(device: DeviceClient, fleet: str, root_fp: str
                          ) -> tuple[RootMetadata, SignedRoot]:
    """The fleet's newest root, verified from version 1 pinned by `root_fp`, page by page
    (MAX_ROOT_CHAIN roots per answer); ReleaseKeyMismatch if it does not verify."""
    trusted: RootMetadata | None = None
    newest: SignedRoot | None = None
    while True:  # ends: each full page moves `trusted` on by MAX_ROOT_CHAIN versions
        chain = await device.roots(fleet, 0 if trusted is None else trusted.version)
        try:
            trusted = verify_root_chain(trusted, root_fp, chain)
        except RootError as exc:
            raise ReleaseKeyMismatch(f"the roots of fleet {fleet} do not verify from the "
                                     f"token's root {root_fp[:16]}…: {exc}: not "
                                     "enrolling") from None
        newest = chain[-1] if chain else newest
        if len(chain) < MAX_ROOT_CHAIN:
            break
    if newest is None:  # not reached: verify_root_chain refuses an empty first chain
        raise ReleaseKeyMismatch(f"fleet {fleet} has no roots: not enrolling")
    return trusted, newest


def _check_release_key(enrollment: Enrollment, expected_fp: str | None) -> None:
    if expected_fp is None:
        return
    if enrollment.release_key is None:
        raise ReleaseKeyMismatch(
            f"the coordinator has no release key for fleet {enrollment.fleet}, the token "
            f"names release key {expected_fp[:16]}…: not enrolling")
    got = key_fingerprint(bytes.fromhex(enrollment.release_key))
    if not hmac.compare_digest(got, expected_fp):
        raise ReleaseKeyMismatch(
            f"the coordinator handed release key {got[:16]}… for fleet {enrollment.fleet}, "
            f"the token names {expected_fp[:16]}…: not enrolling (a compromised coordinator, "
            "or the fleet's key changed after the token was made)")


# --------------------------------------------------------------------------- configuration


ENV_URL: Final = "FLEETMESH_URL"
ENV_API_KEY: Final = "FLEETMESH_API_KEY"
ENV_FINGERPRINT: Final = "FLEETMESH_FINGERPRINT"
MAX_CONFIG_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    url: str
    api_key: str
    fingerprint: str
    urls: tuple[str, ...] = ()  # every replica's URL, `url` first (empty: `url` alone)

    def __repr__(self) -> str:
        return (f"OperatorConfig(url={self.url!r}, api_key=<hidden>, "
                f"fingerprint={self.fingerprint!r})")

    def client(self, timeout: float = DEFAULT_TIMEOUT) -> OperatorClient:
        return OperatorClient(self.urls or self.url, self.api_key,
                              fingerprint=self.fingerprint, timeout=timeout)


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/fleetmesh/operator.toml`, i.e. `~/.config/fleetmesh/operator.toml`."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "fleetmesh" / "operator.toml"


def load_operator_config(path: str | os.PathLike[str] | None = None,
                         env: Mapping[str, str] | None = None) -> OperatorConfig:
    """URL, API key and certificate fingerprint: each from its environment variable if set,
    else from the TOML file (`path`, or the default path if it exists). An explicit `path`
    that cannot be read is an error; the default path may be absent. Replicas: `url` is a
    list of URLs in the file, or URLs separated by commas (also in FLEETMESH_URL)."""
    env = os.environ if env is None else env
    explicit = path is not None
    file = Path(path) if path is not None else default_config_path(env)
    values: dict[str, Any] = {}
    if explicit or file.is_file():
        try:
            with open(file, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise OperatorConfigError(f"cannot read {file}: {exc.strerror or exc}") from exc
        if len(raw) > MAX_CONFIG_BYTES:
            raise OperatorConfigError(f"{file}: larger than {MAX_CONFIG_BYTES} bytes")
        try:
            values = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise OperatorConfigError(f"{file}: not valid TOML: {_one_line(str(exc))}") from exc
    keys = (("url", ENV_URL), ("api_key", ENV_API_KEY), ("fingerprint", ENV_FINGERPRINT))
    got: dict[str, str] = {}
    for key, var in keys:
        value = env.get(var) or values.get(key)
        if value is None or value == "":
            continue
        if key == "url" and isinstance(value, list) and value and \
                all(isinstance(u, str) for u in value):
            value = ",".join(value)
        if not isinstance(value, str):
            raise OperatorConfigError(f"{file}: {key} must be a string"
                                  + (" or a list of them" if key == "url" else ""))
        got[key] = value.strip()
    missing = [(k, v) for k, v in keys if k not in got]
    if missing:
        raise OperatorConfigError(
            "no coordinator " + ", ".join(k for k, _ in missing) + ": set "
            + ", ".join(v for _, v in missing) + f" or {', '.join(k for k, _ in missing)} in "
            + str(file))
    try:
        urls = coordinator_urls(got["url"])
        fp = normalize_fingerprint(got["fingerprint"])
    except PinError as exc:
        raise OperatorConfigError(str(exc)) from exc
    return OperatorConfig(urls[0], got["api_key"], fp, urls if len(urls) > 1 else ())
