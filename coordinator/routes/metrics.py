"""`GET /metrics`: the coordinator's Prometheus metrics (coordinator._metrics,
docs/metrics.md), for the scrape token of `serve --metrics-token-file` or the operator API key
as Bearer (what a Prometheus scrape job sends with `authorization: {credentials_file: ...}`),
or a dashboard session. Never open without one."""

from __future__ import annotations

from typing import Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._http import deps, operator
from .._metrics import CONTENT_TYPE, render
from .._service import FleetService


@operator(scraper=True)
async def metrics(request: Request, service: FleetService) -> Response:
    # read on the event loop like every other route: the store and ApiMetrics are not
    # shared with threads
    text = render(service, deps(request).metrics)
    return Response(text, media_type=None, headers={"content-type": CONTENT_TYPE})


ROUTES: Final = [Route("/metrics", metrics, methods=["GET"])]
