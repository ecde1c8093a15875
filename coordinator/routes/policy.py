"""Fleet reachability policies (docs/api.md "Policy", docs/policy.md): set and read a fleet's
policy file, and what it lets one device reach."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.control import ControlError, check_name
from mesh.policy import MAX_POLICY_BYTES

from .._http import by_method, operator, path_fleet, read_body
from .._service import FleetService


@operator(MAX_POLICY_BYTES)
async def put_policy(request: Request, service: FleetService) -> Response:
    fleet = path_fleet(request)
    body = await read_body(request, MAX_POLICY_BYTES)
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise ControlError("policy: not UTF-8 text") from None
    return JSONResponse(service.policy.set(fleet, text))


@operator()
async def get_policy(request: Request, service: FleetService) -> Response:
    return JSONResponse(service.policy.get(path_fleet(request)))


@operator()
async def compiled_policy(request: Request, service: FleetService) -> Response:
    fleet = path_fleet(request)
    wanted = request.query_params.get("device")
    if wanted is None:
        raise ControlError("device: missing (?device=NAME)")
    return JSONResponse(service.policy.compiled(fleet, check_name(wanted, "device")))


ROUTES = [
    Route("/api/v1/fleets/{fleet}/policy", by_method({"GET": get_policy, "PUT": put_policy}),
          methods=["GET", "PUT"]),
    Route("/api/v1/fleets/{fleet}/policy/compiled", compiled_policy, methods=["GET"]),
]
