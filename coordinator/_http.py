"""What every route of the coordinator's HTTP API (docs/api.md) and dashboard shares: bounded
request bodies, JSON parsing and field checks, JSON and byte-range responses, the credential
guards, and the mapping of refusals to 4xx answers.

Everything that arrives is bounded (`MAX_BODY_BYTES`, 413) and validated (mesh.control or the
small checks below, 400) before it reaches the service; refusals are `{"error": one line}` with
a 4xx. An exception that escapes as a 500 is a bug.

A route is a module-level function; the guards below give it the service (and the device a
credential names) from the app's state (`Deps`), so no route closes over a server object.

A client that goes away mid-request (a body cut short on a saturated link) or mid-response (a
download dropped) is no bug: it is one INFO line naming the route and the caller
(`client_gone`), never a traceback or an "internal error".
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import trio
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from mesh.control import MAX_BODY_BYTES, ControlError, check_app, check_name
from mesh.rollout import RolloutSpecError

from ._blobs import BlobStoreUnavailable, OpenBlob
from ._listen import HttpLimits, SourceGate, peer_of
from ._metrics import ApiMetrics
from ._model import (
    CoordinatorError,
    CredentialRevoked,
    Device,
    Forbidden,
    RequestTimeout,
    TooLarge,
    Unauthorized,
)
from ._releases import MissingBlobs
from ._service import FleetService
from ._sessions import SessionTable, session_allows

log = logging.getLogger("fleetmesh.coordinator.api")

LINGER_BYTES: Final = 4 * MAX_BODY_BYTES  # read and drop this much of an oversized body
BLOB_PIECE: Final = 256 * 1024  # bytes per read when streaming a blob out
MAX_VERSION_DIGITS: Final = 19  # a release version fits in 63 bits
MAX_INT: Final = (1 << 63) - 1  # versions, sequence numbers, byte offsets: SQLite INTEGERs
# Numbers in paths, queries and headers are ASCII digits only: `str.isdigit` takes '²' (which
# `int` then refuses: a 500) and `int` takes '١', ' 1', '+1' and '1_0' (values the API never
# documented). At most 19 digits, so the text is bounded before anything converts it.
_UINT_RE: Final = re.compile(rf"[0-9]{{1,{MAX_VERSION_DIGITS}}}\Z")
# Seconds to wait: plain decimal, no exponent, no sign, no inf/nan.
_SECONDS_RE: Final = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?\Z")

Handler = Callable[[Request], Awaitable[Response]]
AnyoneHandler = Callable[[Request, FleetService], Awaitable[Response]]
DeviceHandler = Callable[[Request, FleetService, Device], Awaitable[Response]]
EitherHandler = Callable[[Request, FleetService, Device | None], Awaitable[Response]]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Deps:
    """What routes read from `app.state.deps`: the service, the dashboard's sessions, and
    what `/metrics` counts as the process serves."""

    service: FleetService
    sessions: SessionTable
    limits: HttpLimits
    gate: SourceGate
    metrics: ApiMetrics


def deps(request: Request) -> Deps:
    found = request.app.state.deps
    assert isinstance(found, Deps)
    return found


# --------------------------------------------------------------------------- requests


def check_length(request: Request, limit: int) -> None:
    """TooLarge (413) if the Content-Length header says more than `limit` bytes; a malformed
    one is refused too (h11 refuses it before us, but no route relies on that)."""
    length = request.headers.get("content-length")
    if length is not None:
        value = ascii_uint(length)
        if value is None or value > limit:
            raise TooLarge(f"body larger than {limit} bytes")


async def _next_piece(pieces: AsyncIterator[bytes], limits: HttpLimits) -> bytes | None:
    """The body's next piece (None at its end) within `body_piece_timeout`, else
    RequestTimeout (408): a client that stops sending mid-body holds nothing for long."""
    with trio.move_on_after(limits.body_piece_timeout):
        try:
            return await anext(pieces)
        except StopAsyncIteration:
            return None
    raise RequestTimeout(f"request body stalled: nothing for {limits.body_piece_timeout:g} s")


async def body_pieces(request: Request) -> AsyncIterator[bytes]:
    """The body as it arrives, each piece within its deadline (for bodies streamed to disk,
    which may rightly take longer than `body_timeout` as a whole)."""
    limits = deps(request).limits
    pieces = aiter(request.stream())
    while (piece := await _next_piece(pieces, limits)) is not None:
        yield piece


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most `limit` bytes (413 beyond), whole within `body_timeout` (408)."""
    check_length(request, limit)
    limits = deps(request).limits
    body = bytearray()
    pieces = aiter(request.stream())
    with trio.move_on_after(limits.body_timeout):
        while (piece := await _next_piece(pieces, limits)) is not None:
            body += piece
            if len(body) > limit:
                raise TooLarge(f"body larger than {limit} bytes")
        return bytes(body)
    raise RequestTimeout(f"request body not received within {limits.body_timeout:g} s")


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ControlError("body: not valid JSON") from None


async def drain(request: Request, limit: int = MAX_BODY_BYTES) -> bool:
    """Read what is left of a refused request's body (at most `limit` bytes, within the body
    deadlines), so the connection stays usable: answering before the body is read makes the
    server close it under a client still sending. False if the body was left unread (the
    answer should then close the connection)."""
    limits = deps(request).limits
    seen = 0
    try:
        pieces = aiter(request.stream())
        with trio.move_on_after(limits.body_timeout):
            while (piece := await _next_piece(pieces, limits)) is not None:
                seen += len(piece)
                if seen > limit:
                    return False
            return True
        return False
    except RequestTimeout:
        return False
    except Exception:  # already consumed, or the client went away: nothing left to drain
        return True


class ClientGone(ClientDisconnect):
    """The client closed the connection `when` (e.g. "mid-long-poll")."""

    def __init__(self, when: str) -> None:
        super().__init__(when)
        self.when = when


async def unless_gone(request: Request, wait: Callable[[], Awaitable[_T]]) -> _T:
    """`await wait()` (a long poll), cut short if the client closes the connection meanwhile:
    ClientGone, which the guards log as one line. Without this a poll whose client left (an
    agent's poll cut by its own deadline on a saturated link) held its task until its deadline.
    The request's (empty) body is read first, within the body deadlines; then the next ASGI
    message can only be the disconnect."""
    await read_body(request, MAX_BODY_BYTES)
    outcome: list[_T] = []
    failure: list[Exception] = []  # raised outside the nursery: no ExceptionGroup around it
    async with trio.open_nursery() as nursery:
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            outcome.append(await wait())
        except Exception as exc:  # noqa: BLE001 - re-raised as is below
            failure.append(exc)
        nursery.cancel_scope.cancel()
    if failure:
        raise failure[0]
    if not outcome:
        raise ClientGone("mid-long-poll")
    return outcome[0]


def json_field(obj: Any, key: str, kind: type[_T]) -> _T:
    """`obj[key]`, which must be there and of `kind` (str, int or list)."""
    value = optional_field(obj, key, kind)
    if value is None:
        raise ControlError(f"{key}: missing")
    return value


def optional_field(obj: Any, key: str, kind: type[_T]) -> _T | None:
    """`obj[key]` of `kind`, or None when absent or null."""
    if not isinstance(obj, dict):
        raise ControlError("body: must be a JSON object")
    value = obj.get(key)
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ControlError(f"{key}: must be an integer")
    if kind is str and not isinstance(value, str):
        raise ControlError(f"{key}: must be a string")
    return value  # type: ignore[no-any-return]  # checked above for the kinds routes use


def int_field(obj: Any, key: str, default: int, low: int, high: int) -> int:
    value = optional_field(obj, key, int)
    if value is None:
        return default
    if not low <= value <= high:
        raise ControlError(f"{key}: must be between {low} and {high}")
    return int(value)


def ascii_uint(text: str) -> int | None:
    """`text` as a non-negative integer if it is 1-19 ASCII digits and nothing else; else None."""
    return int(text) if _UINT_RE.match(text) else None


def parse_uint(text: str, key: str, low: int, high: int) -> int:
    """`text` as an integer in low..high written in ASCII digits; ControlError (400) otherwise."""
    value = ascii_uint(text)
    if value is None or not low <= value <= high:
        raise ControlError(f"{key}: must be an integer {low}..{high}")
    return value


def query_int(request: Request, key: str, default: int | None, low: int, high: int
              ) -> int | None:
    text = request.query_params.get(key)
    return default if text is None else parse_uint(text, key, low, high)


def query_seconds(request: Request, key: str, default: float, high: float) -> float:
    """A wait in seconds, 0..high, as plain ASCII decimal (no sign, exponent, inf or nan)."""
    text = request.query_params.get(key)
    if text is None:
        return default
    if not _SECONDS_RE.match(text) or not 0 <= float(text) <= high:
        raise ControlError(f"{key}: must be 0..{high:g} seconds")
    return float(text)


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def path_name(request: Request) -> str:
    return check_name(request.path_params["name"], "device name")


def path_fleet(request: Request) -> str:
    return check_name(request.path_params["fleet"], "fleet")


def path_release(request: Request) -> tuple[str, str, int]:
    """(fleet, app, version) of /releases/{fleet}/{app}/{version}…"""
    p = request.path_params
    fleet = check_name(p["fleet"], "fleet")
    app = check_app(p["app"])
    version = ascii_uint(str(p["version"]))
    if version is None or not 1 <= version <= MAX_INT:
        raise ControlError("version: must be a positive integer")
    return fleet, app, version


def caller(request: Request) -> str:
    """Who sent the request, for the log: "device NAME", "operator", or the peer address
    until a guard has checked a credential."""
    who = getattr(request.state, "caller", None)
    if isinstance(who, str):
        return who
    peer = request.client
    return f"unauthenticated {peer.host}:{peer.port}" if peer else "unauthenticated client"


def client_gone(request: Request, when: str) -> None:
    """One line, no traceback: the client closed the connection `when` (mid-body,
    mid-response). Expected on flaky or saturated links, so INFO, not an error."""
    log.info("client went away %s: %s %s from %s", when, request.method, request.url.path,
             caller(request))


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


# --------------------------------------------------------------------------- responses


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()) or "error", **extra},
                        status_code=status)


class RangeNotSatisfiable(CoordinatorError):
    status = 416


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range `header` asks for, as (first, last) inclusive and clamped to `size`;
    None to send the whole blob (no header, another unit, several ranges, or a malformed
    header, which RFC 9110 14.2 says to ignore); RangeNotSatisfiable if it selects nothing."""
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    start, end = ascii_uint(first), ascii_uint(last)  # ASCII digits only: '²' is not a number
    if not dash or (first and start is None) or (last and end is None) or not (first or last):
        return None
    if start is None:  # suffix: the last N bytes
        assert end is not None
        if end == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} selects nothing of {size} bytes")
        return max(0, size - end), size - 1
    if end is None:
        end = size - 1
    elif end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range {header!r} starts beyond the blob's {size} bytes")
    return start, min(end, size - 1)


async def blob_response(request: Request, blob_id: str, blob: OpenBlob) -> Response:
    """The blob (or the range asked for) streamed from its reader; HEAD sends headers only.
    The first piece is read before the headers go out, so a store that cannot serve the blob
    is a 503, not a body cut short."""
    headers = {"accept-ranges": "bytes", "etag": f'"{blob_id}"',
               "cache-control": "private, max-age=31536000, immutable"}
    try:
        wanted = parse_range(request.headers.get("range"), blob.size)
    except RangeNotSatisfiable as exc:
        blob.reader.close()
        response = error(416, str(exc))
        response.headers["content-range"] = f"bytes */{blob.size}"
        return response
    status = 200
    start, end = 0, blob.size - 1
    if wanted is not None:
        status = 206
        start, end = wanted
        headers["content-range"] = f"bytes {start}-{end}/{blob.size}"
    length = end - start + 1
    headers["content-length"] = str(length)
    if request.method == "HEAD":
        blob.reader.close()
        return Response(b"", status_code=status, headers=headers,
                        media_type="application/octet-stream")

    metrics = deps(request).metrics
    reader = blob.reader.pieces(start, length, BLOB_PIECE)

    async def close() -> None:
        await trio.to_thread.run_sync(reader.close)
        blob.reader.close()

    try:
        first = await trio.to_thread.run_sync(next, reader, b"")
    except BlobStoreUnavailable as exc:
        log.warning("%s", exc)
        await close()
        return error(exc.status, str(exc))

    async def pieces() -> AsyncIterator[bytes]:
        try:
            piece = first
            while piece:
                yield piece
                metrics.blob_sent(len(piece))
                piece = await trio.to_thread.run_sync(next, reader, b"")
        finally:
            await close()

    return _Download(request, pieces(), status_code=status, headers=headers,
                     media_type="application/octet-stream")


class _Download(StreamingResponse):
    """A streamed blob that says so (`client_gone`) when its client leaves before the end:
    Starlette then cancels the stream quietly (ASGI `http.disconnect`)."""

    def __init__(self, request: Request, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.request = request
        self.finished = False

    async def stream_response(self, send: Send) -> None:
        await super().stream_response(send)
        self.finished = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BlobStoreUnavailable as exc:
            # the headers are out: the connection closes with the body short, which the
            # client sees (Content-Length) and retries; one line, no traceback
            log.warning("%s", exc)
            return
        if not self.finished:
            client_gone(self.request, "mid-response")


# --------------------------------------------------------------------------- errors


def guarded(fn: Handler, limit: int = MAX_BODY_BYTES) -> Handler:
    """`fn` with its body bounded by `limit` and refusals answered as `{"error": ...}`."""
    async def wrapper(request: Request) -> Response:
        linger = MAX_BODY_BYTES
        try:
            check_length(request, limit)
            response = await fn(request)  # then drain, e.g. a body sent to revoke
        except RequestTimeout as exc:
            return _closing(error(exc.status, str(exc)))  # no second wait for the same body
        except ClientDisconnect as exc:
            client_gone(request, exc.when if isinstance(exc, ClientGone) else "mid-body")
            return _closing(error(400, "client disconnected"))  # sent to no one
        except TooLarge as exc:
            # Read on (bounded) so a client still sending sees the 413, not a reset.
            linger = LINGER_BYTES
            response = error(exc.status, str(exc))
        except MissingBlobs as exc:
            response = error(exc.status, str(exc), missing=exc.missing)
        except CredentialRevoked as exc:  # explicit: only this stops an agent for good
            response = error(exc.status, str(exc), revoked=True)
        except CoordinatorError as exc:
            response = error(exc.status, str(exc))
        except (ControlError, RolloutSpecError) as exc:
            response = error(400, str(exc))
        if not await drain(request, linger):
            _closing(response)
        return response
    wrapper.__name__ = fn.__name__
    return wrapper


def _closing(response: Response) -> Response:
    """`response` with the connection closed after it (its request's body was left unread)."""
    response.headers["connection"] = "close"
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (404 no route, 405 method) in the API's error shape."""
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail or "error")


async def disconnected(request: Request, exc: Exception) -> Response:
    """A disconnect that no guard saw (a route outside them): the same one line."""
    client_gone(request, "mid-body")
    return _closing(error(400, "client disconnected"))


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error(500, "internal error (a bug; see the coordinator's log)")


# --------------------------------------------------------------------------- credentials


def _authenticated(request: Request, who: str) -> None:
    """The request's connection presented a valid credential (of `who`, for the log): it no
    longer counts against its source's unauthenticated connections
    (coordinator._listen.SourceGate)."""
    request.state.caller = who
    deps(request).gate.authenticated(peer_of(request.client))


def anyone(limit: int = MAX_BODY_BYTES) -> Callable[[AnyoneHandler], Handler]:
    """No credential (enrollment carries its token in the body; the dashboard's sign-in)."""
    def wrap(fn: AnyoneHandler) -> Handler:
        async def wrapper(request: Request) -> Response:
            return await fn(request, deps(request).service)
        wrapper.__name__ = fn.__name__
        return guarded(wrapper, limit)
    return wrap


def operator(limit: int = MAX_BODY_BYTES, scraper: bool = False
             ) -> Callable[[AnyoneHandler], Handler]:
    """The operator API key as Bearer, or a dashboard session (its CSRF token unless GET);
    `scraper`: the metrics token (`serve --metrics-token-file`) too, which opens nothing else."""
    def wrap(fn: AnyoneHandler) -> Handler:
        async def wrapper(request: Request) -> Response:
            found = deps(request)
            secret = _bearer(request)
            if secret is None:
                if session_allows(found.sessions, request):
                    _authenticated(request, "operator (dashboard)")
                    return await fn(request, found.service)
                raise Unauthorized("operator API key required (Authorization: Bearer fmo_...)"
                                   " or a dashboard session")
            if found.service.is_metrics_token(secret):
                if not scraper:
                    raise Forbidden("the metrics token reads /metrics only")
                _authenticated(request, "metrics scraper")
                return await fn(request, found.service)
            if not found.service.is_operator_key(secret):
                if found.service.device_for(secret) is not None:
                    raise Forbidden("a device credential cannot use operator endpoints")
                raise Unauthorized("unknown or revoked API key")
            _authenticated(request, "operator")
            return await fn(request, found.service)
        wrapper.__name__ = fn.__name__
        return guarded(wrapper, limit)
    return wrap


def device(limit: int = MAX_BODY_BYTES) -> Callable[[DeviceHandler], Handler]:
    """A device credential as Bearer; the route gets the device it names."""
    def wrap(fn: DeviceHandler) -> Handler:
        async def wrapper(request: Request) -> Response:
            service = deps(request).service
            secret = _bearer(request)
            if secret is None:
                raise Unauthorized("device credential required (Authorization: Bearer fmd_...)")
            dev = service.device_for(secret)
            if dev is None:
                if service.is_operator_key(secret):
                    raise Forbidden("device endpoints need a device credential, not the "
                                    "operator key")
                raise service.credential_refusal(secret)
            _authenticated(request, f"device {dev.name}")
            return await fn(request, service, dev)
        wrapper.__name__ = fn.__name__
        return guarded(wrapper, limit)
    return wrap


def operator_or_device(fn: EitherHandler) -> Handler:
    """Either credential; the route gets the device, or None for the operator."""
    async def wrapper(request: Request) -> Response:
        service = deps(request).service
        secret = _bearer(request)
        if secret is None:
            raise Unauthorized("operator API key or device credential required "
                               "(Authorization: Bearer ...)")
        if service.is_operator_key(secret):
            _authenticated(request, "operator")
            return await fn(request, service, None)
        dev = service.device_for(secret)
        if dev is None:
            refusal = service.credential_refusal(secret)
            if isinstance(refusal, CredentialRevoked):
                raise refusal
            raise Unauthorized("unknown or revoked API key or device credential")
        _authenticated(request, f"device {dev.name}")
        return await fn(request, service, dev)
    wrapper.__name__ = fn.__name__
    return guarded(wrapper)


def by_method(handlers: Mapping[str, Handler]) -> Handler:
    """One path, several doors: each method its own guard and body limit. HEAD goes where GET
    goes (Starlette allows HEAD wherever GET is)."""
    async def dispatch(request: Request) -> Response:
        return await handlers.get(request.method, handlers["GET"])(request)
    dispatch.__name__ = "_".join(h.__name__ for h in dict.fromkeys(handlers.values()))
    return dispatch
