"""Operator workstations: registered on the mesh through the hub (`fleetmesh operator-config`)."""

from __future__ import annotations

from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.control import check_key, check_name

from .._http import json_field, operator, read_json
from .._service import FleetService


@operator()
async def add_operator(request: Request, service: FleetService) -> Response:
    body = await read_json(request)
    name = check_name(json_field(body, "name", str), "name")
    public_key = check_key(json_field(body, "public_key", str), "public_key")
    out = service.add_operator(name, public_key)
    await service.hub_changed()
    return JSONResponse(out, status_code=201)


ROUTES: Final = [Route("/api/v1/operators", add_operator, methods=["POST"])]
