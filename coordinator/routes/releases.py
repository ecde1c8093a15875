"""Releases and blobs (docs/api.md "Releases and blobs"; "Rollouts, logs, actions"): blob
upload and download, fleet release keys, publishing, listing, deleting, manifests, targets,
rollout status and retries."""

from __future__ import annotations

from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.blobs import BlobKind
from mesh.control import ControlError, check_app, check_name
from mesh.release import (
    MAX_ENVELOPE_BYTES,  # the largest encoded SignedManifest
    MAX_ROOT_DOCUMENT,
)

from .._blobs import MAX_BLOB_BYTES
from .._http import (
    blob_response,
    body_pieces,
    by_method,
    device,
    json_field,
    operator,
    operator_or_device,
    optional_field,
    parse_uint,
    path_fleet,
    path_release,
    read_body,
    read_json,
)
from .._model import Device
from .._releases import MAX_GRANT_HEX, MAX_MISSING_QUERY
from .._service import FleetService

MAX_RELEASE_BYTES: Final = MAX_ENVELOPE_BYTES
# 10,000 IDs of 64 hex digits as a JSON list: ~670 KB, above MAX_BODY_BYTES
MISSING_QUERY_BYTES: Final = 1024 * 1024
MAX_PIN_HEX: Final = 2 * 8192  # an encoded SignedPin, hex
MAX_VERSION: Final = (1 << 63) - 1


# --------------------------------------------------------------------------- blobs


@operator(MISSING_QUERY_BYTES)
async def blobs_missing(request: Request, service: FleetService) -> Response:
    ids = json_field(await read_json(request, MISSING_QUERY_BYTES), "ids", list)
    if not isinstance(ids, list) or len(ids) > MAX_MISSING_QUERY:
        raise ControlError(f"ids: must be a list of at most {MAX_MISSING_QUERY} blob IDs")
    return JSONResponse({"missing": await service.releases.missing(ids)})


def _blob_id(request: Request) -> str:
    return str(request.path_params["blob_id"])


@operator(MAX_BLOB_BYTES)
async def put_blob(request: Request, service: FleetService) -> Response:
    kind_text = request.query_params.get("kind")
    try:
        kind = BlobKind(kind_text or "")
    except ValueError:
        raise ControlError("kind: must be chunk or delta") from None
    new = await service.releases.put_blob(_blob_id(request), kind, body_pieces(request))
    return JSONResponse({"id": _blob_id(request), "kind": str(kind), "new": new},
                        status_code=201 if new else 200)


@operator_or_device
async def get_blob(request: Request, service: FleetService, dev: Device | None) -> Response:
    blob_id = _blob_id(request)
    blob = await service.releases.open_blob(blob_id, dev)
    return await blob_response(request, blob_id, blob)


# --------------------------------------------------------------------------- releases


@operator()
async def set_release_key(request: Request, service: FleetService) -> Response:
    fleet = path_fleet(request)
    public_key = json_field(await read_json(request), "public_key", str)
    return JSONResponse(service.releases.set_release_key(fleet, public_key))


@operator(MAX_ROOT_DOCUMENT)
async def put_root(request: Request, service: FleetService) -> Response:
    fleet = path_fleet(request)
    return JSONResponse(service.releases.put_root(
        fleet, await read_body(request, MAX_ROOT_DOCUMENT)))


@operator_or_device
async def get_roots(request: Request, service: FleetService, dev: Device | None) -> Response:
    fleet = path_fleet(request)
    since = parse_uint(request.query_params.get("since", "0"), "since", 0, MAX_VERSION)
    return JSONResponse(service.releases.roots(fleet, since, dev))


@operator(MAX_RELEASE_BYTES)
async def publish(request: Request, service: FleetService) -> Response:
    mode = request.query_params.get("rollout")
    if mode not in (None, "held"):
        raise ControlError("rollout: the only publishing mode is held (published for no "
                           "device until a rollout starts)")
    info, created = await service.releases.publish(await read_body(request, MAX_RELEASE_BYTES),
                                                   held=mode == "held")
    return JSONResponse(info, status_code=201 if created else 200)


@operator()
async def list_releases(request: Request, service: FleetService) -> Response:
    fleet = check_name(request.query_params.get("fleet", ""), "fleet")
    app = request.query_params.get("app")
    if app is not None:
        check_app(app)
    return JSONResponse({"releases": service.releases.list_releases(fleet, app)})


@operator()
async def release_detail(request: Request, service: FleetService) -> Response:
    return JSONResponse(service.releases.release_detail(*path_release(request)))


@operator()
async def delete_release(request: Request, service: FleetService) -> Response:
    await service.releases.delete(*path_release(request))
    return Response(status_code=204)


@operator_or_device
async def manifest(request: Request, service: FleetService, dev: Device | None) -> Response:
    fleet, app, version = path_release(request)
    return Response(service.releases.manifest(fleet, app, version, dev),
                    media_type="application/octet-stream")


# --------------------------------------------------------------------------- targets, rollouts


@operator()
async def fleet_target(request: Request, service: FleetService) -> Response:
    fleet = path_fleet(request)
    body = await read_json(request)
    app = check_app(json_field(body, "app", str))
    version = json_field(body, "version", int)
    if not 1 <= version <= MAX_VERSION:
        raise ControlError("version: must be a positive integer")
    device_name = optional_field(body, "device", str)
    if device_name is not None:
        check_name(device_name, "device")
    pin = optional_field(body, "pin", str)
    if pin is not None and len(pin) > MAX_PIN_HEX:
        raise ControlError("pin: too long")
    return JSONResponse(service.releases.set_target(fleet, app, version, device_name, pin))


@device()
async def device_target(request: Request, service: FleetService, dev: Device) -> Response:
    return JSONResponse({"targets": service.releases.device_targets(dev)})


@device()
async def device_timestamp(request: Request, service: FleetService, dev: Device) -> Response:
    stamp = service.releases.device_timestamp(dev)
    return JSONResponse({"timestamp": None if stamp is None else stamp.hex()})


@operator()
async def timestamp_key(request: Request, service: FleetService) -> Response:
    return JSONResponse({"fleet": path_fleet(request),
                         "public_key": service.releases.timestamp_public_key()})


@operator()
async def set_timestamp_grant(request: Request, service: FleetService) -> Response:
    fleet = path_fleet(request)
    grant = json_field(await read_json(request), "grant", str)
    if len(grant) > MAX_GRANT_HEX:
        raise ControlError(f"grant: longer than {MAX_GRANT_HEX} hex digits")
    return JSONResponse(service.releases.set_timestamp_grant(fleet, grant))


@operator()
async def release_status(request: Request, service: FleetService) -> Response:
    return JSONResponse(service.release_status(*path_release(request)))


@operator()
async def release_retry(request: Request, service: FleetService) -> Response:
    return JSONResponse(service.releases.retry_release(*path_release(request)))


@operator()
async def start_rollout(request: Request, service: FleetService) -> Response:
    release, body = path_release(request), await read_json(request)
    return JSONResponse(service.rollouts.start(*release, body), status_code=201)


@operator()
async def get_rollout(request: Request, service: FleetService) -> Response:
    return JSONResponse(service.rollouts.get(*path_release(request)))


@operator()
async def rollout_action(request: Request, service: FleetService) -> Response:
    action = str(request.path_params["action"])  # pause, resume, abort or promote
    return JSONResponse(service.rollouts.action(*path_release(request), action))


@operator()
async def list_rollouts(request: Request, service: FleetService) -> Response:
    fleet = request.query_params.get("fleet")
    if fleet is not None:
        check_name(fleet, "fleet")
    return JSONResponse({"rollouts": service.rollouts.all(fleet)})


ROUTES: Final = [
    Route("/api/v1/blobs/missing", blobs_missing, methods=["POST"]),
    Route("/api/v1/blobs/{blob_id}", by_method({"GET": get_blob, "PUT": put_blob}),
          methods=["GET", "HEAD", "PUT"]),
    Route("/api/v1/fleets/{fleet}/release-key", set_release_key, methods=["PUT"]),
    Route("/api/v1/fleets/{fleet}/root", by_method({"GET": get_roots, "PUT": put_root}),
          methods=["GET", "PUT"]),
    Route("/api/v1/fleets/{fleet}/target", fleet_target, methods=["PUT"]),
    Route("/api/v1/device/target", device_target, methods=["GET"]),
    Route("/api/v1/device/timestamp", device_timestamp, methods=["GET"]),
    Route("/api/v1/fleets/{fleet}/timestamp-key", timestamp_key, methods=["GET"]),
    Route("/api/v1/fleets/{fleet}/timestamp-grant", set_timestamp_grant, methods=["PUT"]),
    Route("/api/v1/releases", by_method({"GET": list_releases, "POST": publish}),
          methods=["GET", "POST"]),
    Route("/api/v1/releases/{fleet}/{app}/{version}",
          by_method({"GET": release_detail, "DELETE": delete_release}),
          methods=["GET", "DELETE"]),
    Route("/api/v1/releases/{fleet}/{app}/{version}/manifest", manifest, methods=["GET"]),
    Route("/api/v1/releases/{fleet}/{app}/{version}/status", release_status, methods=["GET"]),
    Route("/api/v1/releases/{fleet}/{app}/{version}/retry", release_retry, methods=["POST"]),
    Route("/api/v1/releases/{fleet}/{app}/{version}/rollout",
          by_method({"GET": get_rollout, "POST": start_rollout}), methods=["GET", "POST"]),
    Route("/api/v1/releases/{fleet}/{app}/{version}/rollout/{action}", rollout_action,
          methods=["POST"]),
    Route("/api/v1/rollouts", list_rollouts, methods=["GET"]),
]
