"""The HTTP API (docs/api.md) as a Starlette app over a `Coordinator`.

Everything that arrives is bounded (`MAX_BODY_BYTES`, 413) and validated (mesh.control or the
small checks below, 400) before it reaches the coordinator; refusals are `{"error": one line}`
with a 4xx. An exception that escapes as a 500 is a bug.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mesh.control import (
    MAX_BODY_BYTES,
    MAX_LOG_BODY,
    ControlError,
    DeviceReport,
    EnrollRequest,
    LogUpload,
    check_app,
    check_key,
    check_name,
)
from mesh.release import MAX_ENVELOPE_BYTES  # the largest encoded SignedManifest

from ._blobs import MAX_BLOB_BYTES, BlobKind, OpenBlob
from ._model import CoordinatorError, Device, Forbidden, TooLarge, Unauthorized
from ._openapi import openapi_document
from ._releases import MAX_MISSING_QUERY, MissingBlobs

if TYPE_CHECKING:
    from ._server import Coordinator

log = logging.getLogger("fleetmesh.coordinator.api")

MAX_WAIT: Final = 120.0  # long-poll ceiling (docs/api.md); agents wait 110 s
DEFAULT_WAIT: Final = 25.0
MAX_TOKEN_USES: Final = 100_000
MAX_EXPIRES_IN: Final = 366 * 86400
MIN_EXPIRES_IN: Final = 60
LINGER_BYTES: Final = 4 * MAX_BODY_BYTES  # read and drop this much of an oversized body
MAX_RELEASE_BYTES: Final = MAX_ENVELOPE_BYTES
# 10,000 IDs of 64 hex digits as a JSON list: ~670 KB, above MAX_BODY_BYTES
MISSING_QUERY_BYTES: Final = 1024 * 1024
BLOB_PIECE: Final = 256 * 1024  # bytes per read when streaming a blob out
MAX_LOG_WAIT: Final = 30.0  # log long-poll ceiling (docs/api.md)
MAX_LOG_PAGE: Final = 5000  # lines per log read: everything a device keeps
DEFAULT_LOG_PAGE: Final = 1000

Handler = Callable[[Request], Awaitable[Response]]


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()) or "error", **extra},
                        status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most `limit` bytes (413 beyond)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise TooLarge(f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"body larger than {limit} bytes")
    return bytes(body)


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
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or \
            not (first or last):
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} selects nothing of {size} bytes")
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range {header!r} starts beyond the blob's {size} bytes")
    return start, min(end, size - 1)


def blob_response(request: Request, blob_id: str, blob: OpenBlob) -> Response:
    """The blob (or the range asked for) streamed from its open file; HEAD sends headers only."""
    headers = {"accept-ranges": "bytes", "etag": f'"{blob_id}"',
               "cache-control": "private, max-age=31536000, immutable"}
    try:
        wanted = parse_range(request.headers.get("range"), blob.size)
    except RangeNotSatisfiable as exc:
        blob.file.close()
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
        blob.file.close()
        return Response(b"", status_code=status, headers=headers,
                        media_type="application/octet-stream")

    async def pieces() -> Any:
        f = blob.file
        try:
            left = length
            await trio.to_thread.run_sync(f.seek, start)
            while left > 0:
                piece = await trio.to_thread.run_sync(f.read, min(BLOB_PIECE, left))
                if not piece:
                    break
                left -= len(piece)
                yield piece
        finally:
            f.close()

    return StreamingResponse(pieces(), status_code=status, headers=headers,
                             media_type="application/octet-stream")


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ControlError("body: not valid JSON") from None


async def drain(request: Request, limit: int = MAX_BODY_BYTES) -> None:
    """Read what is left of a refused request's body (bounded), so the connection stays usable:
    answering before the body is read makes the server close it under a client still sending."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                return
    except Exception:  # already consumed, or the client went away: nothing left to drain
        return


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _field(obj: Any, key: str, kind: type, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise ControlError("body: must be a JSON object")
    value = obj.get(key)
    if value is None:
        if optional:
            return None
        raise ControlError(f"{key}: missing")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ControlError(f"{key}: must be an integer")
    if kind is str and not isinstance(value, str):
        raise ControlError(f"{key}: must be a string")
    return value


def _int_range(obj: Any, key: str, default: int, low: int, high: int) -> int:
    value = _field(obj, key, int, optional=True)
    if value is None:
        return default
    if not low <= value <= high:
        raise ControlError(f"{key}: must be between {low} and {high}")
    return int(value)


def build_app(coord: Coordinator) -> Starlette:
    from ._dashboard import Dashboard  # here: it builds on this module's helpers

    dashboard = Dashboard(coord)

    def guarded(fn: Handler, limit: int = MAX_BODY_BYTES) -> Handler:
        async def wrapper(request: Request) -> Response:
            try:
                length = request.headers.get("content-length")
                if length is not None and (not length.isdigit() or int(length) > limit):
                    raise TooLarge(f"body larger than {limit} bytes")
                response = await fn(request)
                await drain(request)  # e.g. a body sent to revoke, which reads none
                return response
            except TooLarge as exc:
                # Read on (bounded) so a client still sending sees the 413, not a reset.
                await drain(request, LINGER_BYTES)
                return error(exc.status, str(exc))
            except MissingBlobs as exc:
                await drain(request)
                return error(exc.status, str(exc), missing=exc.missing)
            except CoordinatorError as exc:
                await drain(request)
                return error(exc.status, str(exc))
            except ControlError as exc:
                await drain(request)
                return error(400, str(exc))
        wrapper.__name__ = fn.__name__
        return wrapper

    def operator_or_device(fn: Callable[[Request, Device | None], Awaitable[Response]]
                           ) -> Handler:
        """Either credential; `fn` gets the device, or None for the operator."""
        async def wrapper(request: Request) -> Response:
            secret = _bearer(request)
            if secret is None:
                raise Unauthorized("operator API key or device credential required "
                                   "(Authorization: Bearer ...)")
            if coord.is_operator_key(secret):
                return await fn(request, None)
            dev = coord.device_for(secret)
            if dev is None:
                raise Unauthorized("unknown or revoked API key or device credential")
            return await fn(request, dev)
        wrapper.__name__ = fn.__name__
        return guarded(wrapper)

    def operator(fn: Handler, limit: int = MAX_BODY_BYTES) -> Handler:
        async def wrapper(request: Request) -> Response:
            secret = _bearer(request)
            if secret is None:
                if dashboard.session_allows(request):  # cookie (+ CSRF token unless GET)
                    return await fn(request)
                raise Unauthorized("operator API key required (Authorization: Bearer fmo_...)"
                                   " or a dashboard session")
            if not coord.is_operator_key(secret):
                if coord.device_for(secret) is not None:
                    raise Forbidden("a device credential cannot use operator endpoints")
                raise Unauthorized("unknown or revoked API key")
            return await fn(request)
        wrapper.__name__ = fn.__name__
        return guarded(wrapper, limit)

    def device(fn: Callable[[Request, Device], Awaitable[Response]],
               limit: int = MAX_BODY_BYTES) -> Handler:
        async def wrapper(request: Request) -> Response:
            secret = _bearer(request)
            if secret is None:
                raise Unauthorized("device credential required (Authorization: Bearer fmd_...)")
            dev = coord.device_for(secret)
            if dev is None:
                if coord.is_operator_key(secret):
                    raise Forbidden("device endpoints need a device credential, not the "
                                    "operator key")
                raise Unauthorized("unknown or revoked device credential")
            return await fn(request, dev)
        wrapper.__name__ = fn.__name__
        return guarded(wrapper, limit)

    def client_ip(request: Request) -> str | None:
        return request.client.host if request.client else None

    # -- device endpoints ------------------------------------------------------------------

    async def enroll(request: Request) -> Response:
        req = EnrollRequest.from_json(await read_json(request))
        enrollment = coord.enroll(req, client_ip(request))
        await coord.hub_changed()
        return JSONResponse(enrollment.to_json(), status_code=201)

    @device
    async def peermap(request: Request, dev: Device) -> Response:
        q = request.query_params
        try:
            version = int(q.get("version", "0"))
            wait = float(q.get("wait", DEFAULT_WAIT))
        except ValueError:
            raise ControlError("version must be an integer and wait a number") from None
        if not math.isfinite(wait) or not 0 <= wait <= MAX_WAIT:
            raise ControlError(f"wait: must be 0..{MAX_WAIT:g} seconds")
        body = await coord.wait_peermap(dev, version, wait)
        if body is None:
            return Response(status_code=304)
        return Response(body, media_type="application/json")

    @device
    async def state(request: Request, dev: Device) -> Response:
        report = DeviceReport.from_json(await read_json(request))
        coord.report(dev, report, client_ip(request))
        return Response(status_code=204)

    # -- operator endpoints ----------------------------------------------------------------

    @operator
    async def tokens(request: Request) -> Response:
        body = await read_json(request)
        fleet = check_name(_field(body, "fleet", str), "fleet")
        uses = _int_range(body, "uses", 1, 1, MAX_TOKEN_USES)
        expires_in = _int_range(body, "expires_in", 3600, MIN_EXPIRES_IN, MAX_EXPIRES_IN)
        name = _field(body, "name", str, optional=True)
        if name is not None:
            check_name(name, "name")
        return JSONResponse(coord.create_token(fleet, uses, expires_in, name), status_code=201)

    @operator
    async def devices(request: Request) -> Response:
        if request.method == "POST":
            body = await read_json(request)
            name = check_name(_field(body, "name", str), "name")
            fleet = check_name(_field(body, "fleet", str), "fleet")
            expires_in = _int_range(body, "expires_in", 3600, MIN_EXPIRES_IN, MAX_EXPIRES_IN)
            return JSONResponse(coord.provision(name, fleet, expires_in), status_code=201)
        wanted = request.query_params.get("fleet")
        if wanted is not None:
            check_name(wanted, "fleet")
        return JSONResponse({"devices": coord.list_devices(wanted)})

    def path_name(request: Request) -> str:
        return check_name(request.path_params["name"], "device name")

    @operator
    async def device_info(request: Request) -> Response:
        return JSONResponse(coord.device_info(path_name(request)))

    @operator
    async def revoke(request: Request) -> Response:
        info = await coord.revoke(path_name(request))
        return JSONResponse(info)

    @operator
    async def device_peers(request: Request) -> Response:
        return JSONResponse({"peers": coord.device_peers(path_name(request))})

    @operator
    async def operators(request: Request) -> Response:
        body = await read_json(request)
        name = check_name(_field(body, "name", str), "name")
        public_key = check_key(_field(body, "public_key", str), "public_key")
        out = coord.add_operator(name, public_key)
        await coord.hub_changed()
        return JSONResponse(out, status_code=201)

    # -- releases and blobs (docs/api.md "Releases and blobs") --------------------------------

    releases = coord.releases

    def path_blob_id(request: Request) -> str:
        return str(request.path_params["blob_id"])

    def path_release(request: Request) -> tuple[str, str, int]:
        p = request.path_params
        fleet = check_name(p["fleet"], "fleet")
        app = check_app(p["app"])
        version = str(p["version"])
        if not version.isdigit() or len(version) > 19:
            raise ControlError("version: must be a positive integer")
        return fleet, app, int(version)

    async def blobs_missing(request: Request) -> Response:
        ids = _field(await read_json(request, MISSING_QUERY_BYTES), "ids", list)
        if not isinstance(ids, list) or len(ids) > MAX_MISSING_QUERY:
            raise ControlError(f"ids: must be a list of at most {MAX_MISSING_QUERY} blob IDs")
        return JSONResponse({"missing": await releases.missing(ids)})

    blobs_missing_route = operator(blobs_missing, MISSING_QUERY_BYTES)

    async def put_blob(request: Request) -> Response:
        kind_text = request.query_params.get("kind")
        try:
            kind = BlobKind(kind_text or "")
        except ValueError:
            raise ControlError("kind: must be chunk or delta") from None
        new = await releases.put_blob(path_blob_id(request), kind, request.stream())
        return JSONResponse({"id": path_blob_id(request), "kind": str(kind), "new": new},
                            status_code=201 if new else 200)

    @operator_or_device
    async def get_blob(request: Request, dev: Device | None) -> Response:
        blob_id = path_blob_id(request)
        blob = releases.open_blob(blob_id, dev)
        return blob_response(request, blob_id, blob)

    async def blob(request: Request) -> Response:
        # One path, two doors: GET/HEAD for operator or device, PUT for the operator only with
        # the larger body limit.
        if request.method == "PUT":
            return await put_blob_route(request)
        return await get_blob(request)

    put_blob_route = operator(put_blob, MAX_BLOB_BYTES)

    @operator
    async def release_key(request: Request) -> Response:
        fleet = check_name(request.path_params["fleet"], "fleet")
        public_key = _field(await read_json(request), "public_key", str)
        return JSONResponse(releases.set_release_key(fleet, public_key))

    async def publish(request: Request) -> Response:
        info, created = await releases.publish(await read_body(request, MAX_RELEASE_BYTES))
        return JSONResponse(info, status_code=201 if created else 200)

    async def list_or_publish(request: Request) -> Response:
        if request.method == "POST":
            return await publish_route(request)
        return await list_releases_route(request)

    async def list_releases(request: Request) -> Response:
        fleet = check_name(request.query_params.get("fleet", ""), "fleet")
        app = request.query_params.get("app")
        if app is not None:
            check_app(app)
        return JSONResponse({"releases": releases.list_releases(fleet, app)})

    publish_route = operator(publish, MAX_RELEASE_BYTES)
    list_releases_route = operator(list_releases)

    @operator
    async def release(request: Request) -> Response:
        fleet, app, version = path_release(request)
        if request.method == "DELETE":
            await releases.delete(fleet, app, version)
            return Response(status_code=204)
        return JSONResponse(releases.release_detail(fleet, app, version))

    @operator_or_device
    async def manifest(request: Request, dev: Device | None) -> Response:
        fleet, app, version = path_release(request)
        return Response(releases.manifest(fleet, app, version, dev),
                        media_type="application/octet-stream")

    @operator
    async def fleet_target(request: Request) -> Response:
        fleet = check_name(request.path_params["fleet"], "fleet")
        body = await read_json(request)
        app = check_app(_field(body, "app", str))
        version = int(_field(body, "version", int))
        if not 1 <= version < 1 << 63:
            raise ControlError("version: must be a positive integer")
        device_name = _field(body, "device", str, optional=True)
        if device_name is not None:
            check_name(device_name, "device")
        pin = _field(body, "pin", str, optional=True)
        if pin is not None and len(pin) > 2 * 8192:
            raise ControlError("pin: too long")
        return JSONResponse(releases.set_target(fleet, app, version, device_name, pin))

    @device
    async def device_target(request: Request, dev: Device) -> Response:
        return JSONResponse({"targets": releases.device_targets(dev)})

    # -- app status, logs and operator actions (docs/api.md "Rollouts, logs, actions") ------

    async def device_logs_upload(request: Request, dev: Device) -> Response:
        upload = LogUpload.from_json(await read_json(request, MAX_LOG_BODY))
        coord.upload_logs(dev, upload)
        return Response(status_code=204)

    def query_int(request: Request, key: str, default: int | None, low: int, high: int
                  ) -> int | None:
        text = request.query_params.get(key)
        if text is None:
            return default
        if not text.isdigit() or len(text) > 19 or not low <= int(text) <= high:
            raise ControlError(f"{key}: must be an integer {low}..{high}")
        return int(text)

    @operator
    async def device_logs(request: Request) -> Response:
        name = path_name(request)
        try:
            wait = float(request.query_params.get("wait", "0"))
        except ValueError:
            raise ControlError(f"wait: must be 0..{MAX_LOG_WAIT:g} seconds") from None
        if not math.isfinite(wait) or not 0 <= wait <= MAX_LOG_WAIT:
            raise ControlError(f"wait: must be 0..{MAX_LOG_WAIT:g} seconds")
        after = query_int(request, "after", 0, 0, (1 << 63) - 1)
        limit = query_int(request, "limit", DEFAULT_LOG_PAGE, 1, MAX_LOG_PAGE)
        tail = query_int(request, "tail", None, 1, MAX_LOG_PAGE)
        if tail is not None and "after" in request.query_params:
            raise ControlError("tail and after exclude each other")
        assert after is not None and limit is not None
        return JSONResponse(await coord.device_logs(name, after=after, limit=limit, wait=wait,
                                                    tail=tail))

    def body_app(body: Any) -> str:
        return check_app(_field(body, "app", str))

    @operator
    async def device_update(request: Request) -> Response:
        body = await read_json(request)
        app = body_app(body)
        force = body.get("force")
        if not isinstance(force, bool):
            raise ControlError("force: must be true or false")
        return JSONResponse(releases.force(path_name(request), app, force))

    @operator
    async def device_retry(request: Request) -> Response:
        app = body_app(await read_json(request))
        return JSONResponse(releases.retry_device(path_name(request), app))

    @operator
    async def release_status(request: Request) -> Response:
        return JSONResponse(coord.release_status(*path_release(request)))

    @operator
    async def release_retry(request: Request) -> Response:
        return JSONResponse(releases.retry_release(*path_release(request)))

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, exc.detail or "error")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal error (a bug; see the coordinator's log)")

    routes = [
        Route("/api/v1/enroll", guarded(enroll), methods=["POST"]),
        Route("/api/v1/device/peermap", peermap, methods=["GET"]),
        Route("/api/v1/device/state", state, methods=["POST"]),
        Route("/api/v1/tokens", tokens, methods=["POST"]),
        Route("/api/v1/devices", devices, methods=["GET", "POST"]),
        Route("/api/v1/devices/{name}", device_info, methods=["GET"]),
        Route("/api/v1/devices/{name}/revoke", revoke, methods=["POST"]),
        Route("/api/v1/devices/{name}/peers", device_peers, methods=["GET"]),
        Route("/api/v1/operators", operators, methods=["POST"]),
        Route("/api/v1/blobs/missing", blobs_missing_route, methods=["POST"]),
        Route("/api/v1/blobs/{blob_id}", blob, methods=["GET", "HEAD", "PUT"]),
        Route("/api/v1/fleets/{fleet}/release-key", release_key, methods=["PUT"]),
        Route("/api/v1/fleets/{fleet}/target", fleet_target, methods=["PUT"]),
        Route("/api/v1/device/target", device_target, methods=["GET"]),
        Route("/api/v1/releases", list_or_publish, methods=["GET", "POST"]),
        Route("/api/v1/releases/{fleet}/{app}/{version}", release,
              methods=["GET", "DELETE"]),
        Route("/api/v1/releases/{fleet}/{app}/{version}/manifest", manifest,
              methods=["GET"]),
        Route("/api/v1/device/logs", device(device_logs_upload, MAX_LOG_BODY),
              methods=["POST"]),
        Route("/api/v1/devices/{name}/logs", device_logs, methods=["GET"]),
        Route("/api/v1/devices/{name}/update", device_update, methods=["POST"]),
        Route("/api/v1/devices/{name}/retry", device_retry, methods=["POST"]),
        Route("/api/v1/releases/{fleet}/{app}/{version}/status", release_status,
              methods=["GET"]),
        Route("/api/v1/releases/{fleet}/{app}/{version}/retry", release_retry,
              methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *dashboard.routes(guarded),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                        Exception: server_error})
