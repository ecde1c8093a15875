"""Devices: enrollment, the peer-map long poll and state reports (device side); list,
provision, show, revoke, peers, forced update and retry (operator side)."""

from __future__ import annotations

from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.control import ControlError, DeviceReport, EnrollRequest, check_app, check_name
from mesh.rollout import MAX_TAGS, TAG_KEY_RE, Selector, check_tags

from .._http import (
    MAX_INT,
    anyone,
    by_method,
    client_ip,
    device,
    error,
    int_field,
    json_field,
    operator,
    path_name,
    query_int,
    query_seconds,
    read_json,
    unless_gone,
)
from .._model import Device, ProofRequired
from .._service import FleetService
from .tokens import DEFAULT_EXPIRES_IN, MAX_EXPIRES_IN, MIN_EXPIRES_IN, body_tags

# Long-poll ceiling (docs/api.md): the agents' wait through the hub tunnel (agent/_wg_sync.py
# POLL_WAIT), which makes the poll a push channel that costs an idle device one request per
# half hour. Nothing cuts a request in flight that long (coordinator/_listen.py).
MAX_WAIT: Final = 1800.0
DEFAULT_WAIT: Final = 25.0


# --------------------------------------------------------------------------- device side


@anyone()
async def enroll(request: Request, service: FleetService) -> Response:
    req = EnrollRequest.from_json(await read_json(request))
    try:
        enrollment = service.enroll(req, client_ip(request))
    except ProofRequired as exc:  # the challenge a device answers with its private key
        extra = {} if exc.challenge is None else {
            "challenge": exc.challenge, "hub_public_key": service.identity.hub.public_key}
        return error(exc.status, str(exc), **extra)
    await service.hub_changed()
    return JSONResponse(enrollment.to_json(), status_code=201)


@device()
async def peermap(request: Request, service: FleetService, dev: Device) -> Response:
    version = query_int(request, "version", 0, 0, MAX_INT)
    wait = query_seconds(request, "wait", DEFAULT_WAIT, MAX_WAIT)
    # quiet=1: the device keeps silent toward the hub for this wait (a keepalive trial,
    # agent/_keepalive.py): it counts as online meanwhile
    quiet = query_int(request, "quiet", 0, 0, 1) == 1
    # delta=1: the device holds the map at `version` and takes only the changes since
    # (docs/api.md, "Incremental peer maps"); without it, always the full map
    delta = query_int(request, "delta", 0, 0, 1) == 1
    assert version is not None
    body = await unless_gone(request,
                             lambda: service.wait_peermap(dev, version, wait, quiet, delta))
    if body is None:
        return Response(status_code=304)
    return Response(body, media_type="application/json")


@device()
async def state(request: Request, service: FleetService, dev: Device) -> Response:
    report = DeviceReport.from_json(await read_json(request))
    service.report(dev, report, client_ip(request))
    return Response(status_code=204)


@device()
async def punch(request: Request, service: FleetService, dev: Device) -> Response:
    peer = check_name(json_field(await read_json(request), "peer", str), "peer")
    service.punch(dev, peer)
    return Response(status_code=204)


# --------------------------------------------------------------------------- operator side


@operator()
async def provision(request: Request, service: FleetService) -> Response:
    body = await read_json(request)
    name = check_name(json_field(body, "name", str), "name")
    fleet = check_name(json_field(body, "fleet", str), "fleet")
    expires_in = int_field(body, "expires_in", DEFAULT_EXPIRES_IN, MIN_EXPIRES_IN,
                           MAX_EXPIRES_IN)
    return JSONResponse(service.provision(name, fleet, expires_in, body_tags(body)),
                        status_code=201)


@operator()
async def list_devices(request: Request, service: FleetService) -> Response:
    wanted = request.query_params.get("fleet")
    if wanted is not None:
        check_name(wanted, "fleet")
    selector = request.query_params.get("selector")
    return JSONResponse({"devices": service.list_devices(
        wanted, None if selector is None else Selector.parse(selector))})


@operator()
async def tag_device(request: Request, service: FleetService) -> Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ControlError("body: must be a JSON object")
    unknown = sorted(str(k) for k in body if k not in ("set", "remove"))
    if unknown:
        raise ControlError(f"body: unknown field {unknown[0]!r} (set, remove)")
    set_tags = check_tags({} if body.get("set") is None else body["set"], "set")
    remove = [] if body.get("remove") is None else body["remove"]
    if not isinstance(remove, list) or len(remove) > MAX_TAGS or not all(
            isinstance(k, str) and TAG_KEY_RE.match(k) for k in remove):
        raise ControlError(f"remove: must be a list of at most {MAX_TAGS} tag keys")
    return JSONResponse(service.tag_device(path_name(request), set_tags, remove))


@operator()
async def device_info(request: Request, service: FleetService) -> Response:
    return JSONResponse(service.device_info(path_name(request)))


@operator()
async def revoke(request: Request, service: FleetService) -> Response:
    return JSONResponse(await service.revoke(path_name(request)))


@operator()
async def device_peers(request: Request, service: FleetService) -> Response:
    return JSONResponse({"peers": service.device_peers(path_name(request))})


def _body_app(body: object) -> str:
    return check_app(json_field(body, "app", str))


@operator()
async def device_update(request: Request, service: FleetService) -> Response:
    body = await read_json(request)
    app = _body_app(body)
    force = body.get("force")
    if not isinstance(force, bool):
        raise ControlError("force: must be true or false")
    return JSONResponse(service.releases.force(path_name(request), app, force))


@operator()
async def device_retry(request: Request, service: FleetService) -> Response:
    app = _body_app(await read_json(request))
    return JSONResponse(service.releases.retry_device(path_name(request), app))


ROUTES: Final = [
    Route("/api/v1/enroll", enroll, methods=["POST"]),
    Route("/api/v1/device/peermap", peermap, methods=["GET"]),
    Route("/api/v1/device/state", state, methods=["POST"]),
    Route("/api/v1/device/punch", punch, methods=["POST"]),
    Route("/api/v1/devices", by_method({"GET": list_devices, "POST": provision}),
          methods=["GET", "POST"]),
    Route("/api/v1/devices/{name}", device_info, methods=["GET"]),
    Route("/api/v1/devices/{name}/revoke", revoke, methods=["POST"]),
    Route("/api/v1/devices/{name}/peers", device_peers, methods=["GET"]),
    Route("/api/v1/devices/{name}/tags", tag_device, methods=["PATCH"]),
    Route("/api/v1/devices/{name}/update", device_update, methods=["POST"]),
    Route("/api/v1/devices/{name}/retry", device_retry, methods=["POST"]),
]
