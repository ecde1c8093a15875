"""App logs: devices upload them, the operator reads (and long-polls) them (docs/api.md
"Rollouts, logs, actions")."""

from __future__ import annotations

from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.control import MAX_LOG_BODY, ControlError, LogUpload

from .._http import (
    MAX_INT,
    device,
    operator,
    path_name,
    query_int,
    query_seconds,
    read_json,
    unless_gone,
)
from .._model import Device
from .._service import FleetService

MAX_LOG_WAIT: Final = 30.0  # log long-poll ceiling (docs/api.md)
MAX_LOG_PAGE: Final = 5000  # lines per log read: everything a device keeps
DEFAULT_LOG_PAGE: Final = 1000


@device(MAX_LOG_BODY)
async def upload_logs(request: Request, service: FleetService, dev: Device) -> Response:
    upload = LogUpload.from_json(await read_json(request, MAX_LOG_BODY))
    service.upload_logs(dev, upload)
    return Response(status_code=204)


@operator()
async def device_logs(request: Request, service: FleetService) -> Response:
    name = path_name(request)
    wait = query_seconds(request, "wait", 0.0, MAX_LOG_WAIT)
    after = query_int(request, "after", 0, 0, MAX_INT)
    limit = query_int(request, "limit", DEFAULT_LOG_PAGE, 1, MAX_LOG_PAGE)
    tail = query_int(request, "tail", None, 1, MAX_LOG_PAGE)
    if tail is not None and "after" in request.query_params:
        raise ControlError("tail and after exclude each other")
    assert after is not None and limit is not None
    return JSONResponse(await unless_gone(request, lambda: service.device_logs(
        name, after=after, limit=limit, wait=wait, tail=tail)))


ROUTES: Final = [
    Route("/api/v1/device/logs", upload_logs, methods=["POST"]),
    Route("/api/v1/devices/{name}/logs", device_logs, methods=["GET"]),
]
