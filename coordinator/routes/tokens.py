"""Enrollment tokens: the operator makes them, devices spend them at /enroll."""

from __future__ import annotations

from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.control import check_name
from mesh.rollout import check_tags

from .._http import int_field, json_field, operator, optional_field, read_json
from .._service import FleetService

MAX_EXPIRES_IN: Final = 366 * 86400
MIN_EXPIRES_IN: Final = 60
DEFAULT_EXPIRES_IN: Final = 3600  # s: tokens and provisioned devices' join tokens


@operator()
async def create_token(request: Request, service: FleetService) -> Response:
    body = await read_json(request)
    fleet = check_name(json_field(body, "fleet", str), "fleet")
    # a token can enroll at most a fleet's worth of devices (FleetService's quota)
    uses = int_field(body, "uses", 1, 1, service.settings.max_fleet_devices)
    expires_in = int_field(body, "expires_in", DEFAULT_EXPIRES_IN, MIN_EXPIRES_IN,
                           MAX_EXPIRES_IN)
    name = optional_field(body, "name", str)
    if name is not None:
        check_name(name, "name")
    return JSONResponse(service.create_token(fleet, uses, expires_in, name, body_tags(body)),
                        status_code=201)


def body_tags(body: dict[str, Any]) -> dict[str, str] | None:
    """The optional `tags` of a token or a provisioned device (absent or null: none)."""
    raw = body.get("tags")
    return None if raw is None else check_tags(raw)


ROUTES: Final = [Route("/api/v1/tokens", create_token, methods=["POST"])]
