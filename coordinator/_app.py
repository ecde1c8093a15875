"""The coordinator's Starlette app: every resource's routes (coordinator.routes), the OpenAPI
document, the API's error shape for Starlette's own refusals, the request timing behind
`/metrics`, and the service and dashboard sessions in the app's state for the routes to read."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ._http import Deps, disconnected, http_error, server_error
from ._listen import HttpLimits, SourceGate
from ._metrics import ApiMetrics, MetricsMiddleware
from ._openapi import openapi_document
from ._service import FleetService
from ._sessions import SessionTable
from .routes import dashboard, devices, logs, metrics, operators, policy, releases, tokens


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


def app_routes() -> list[BaseRoute]:
    """Every route the app serves (the OpenAPI document must name each one: tests/fuzz)."""
    return [*devices.ROUTES, *tokens.ROUTES, *operators.ROUTES, *releases.ROUTES, *logs.ROUTES,
            *policy.ROUTES,
            Route("/openapi.json", openapi, methods=["GET"]), *metrics.ROUTES, *dashboard.ROUTES]


def build_app(service: FleetService, limits: HttpLimits | None = None,
              gate: SourceGate | None = None) -> Starlette:
    """The app over `service`, with a fresh (empty) table of dashboard sessions; `limits` are
    its body deadlines and `gate` learns which connections authenticated (a fresh one with
    the default limits if None: the app alone, without coordinator._listen's listener)."""
    limits = limits or HttpLimits()
    counted = ApiMetrics()
    service.fanout_observer = counted.fanout.observe
    app = Starlette(routes=app_routes(), exception_handlers={HTTPException: http_error,
                                                       ClientDisconnect: disconnected,
                                                       Exception: server_error},
                    middleware=[Middleware(MetricsMiddleware, metrics=counted)])
    app.state.deps = Deps(service, SessionTable(service.settings.clock), limits,
                          gate or SourceGate(limits.max_unauthenticated_per_source), counted)
    return app
