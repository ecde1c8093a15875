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

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.control import (
    MAX_BODY_BYTES,
    ControlError,
    DeviceReport,
    EnrollRequest,
    check_key,
    check_name,
)

from ._model import CoordinatorError, Device, Forbidden, Unauthorized
from ._openapi import openapi_document

if TYPE_CHECKING:
    from ._server import Coordinator

log = logging.getLogger("fleetmesh.coordinator.api")

MAX_WAIT: Final = 30.0  # long-poll ceiling (docs/api.md)
DEFAULT_WAIT: Final = 25.0
MAX_TOKEN_USES: Final = 100_000
MAX_EXPIRES_IN: Final = 366 * 86400
MIN_EXPIRES_IN: Final = 60
LINGER_BYTES: Final = 4 * MAX_BODY_BYTES  # read and drop this much of an oversized body

Handler = Callable[[Request], Awaitable[Response]]


class TooLarge(CoordinatorError):
    status = 413


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()) or "error"}, status_code=status)


async def read_json(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise TooLarge(f"body larger than {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise TooLarge(f"body larger than {MAX_BODY_BYTES} bytes")
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
    def guarded(fn: Handler) -> Handler:
        async def wrapper(request: Request) -> Response:
            try:
                length = request.headers.get("content-length")
                if length is not None and (not length.isdigit()
                                           or int(length) > MAX_BODY_BYTES):
                    raise TooLarge(f"body larger than {MAX_BODY_BYTES} bytes")
                response = await fn(request)
                await drain(request)  # e.g. a body sent to revoke, which reads none
                return response
            except TooLarge as exc:
                # Read on (bounded) so a client still sending sees the 413, not a reset.
                await drain(request, LINGER_BYTES)
                return error(exc.status, str(exc))
            except CoordinatorError as exc:
                await drain(request)
                return error(exc.status, str(exc))
            except ControlError as exc:
                await drain(request)
                return error(400, str(exc))
        wrapper.__name__ = fn.__name__
        return wrapper

    def operator(fn: Handler) -> Handler:
        async def wrapper(request: Request) -> Response:
            secret = _bearer(request)
            if secret is None:
                raise Unauthorized("operator API key required (Authorization: Bearer fmo_...)")
            if not coord.is_operator_key(secret):
                if coord.device_for(secret) is not None:
                    raise Forbidden("a device credential cannot use operator endpoints")
                raise Unauthorized("unknown or revoked API key")
            return await fn(request)
        wrapper.__name__ = fn.__name__
        return guarded(wrapper)

    def device(fn: Callable[[Request, Device], Awaitable[Response]]) -> Handler:
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
        return guarded(wrapper)

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
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                        Exception: server_error})
