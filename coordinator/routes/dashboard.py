"""The web dashboard (docs/dashboard.md): its static page and assets, sign-in, the session's
CSRF token and sign-out. The dashboard is one more client of the operator API; its sessions
are coordinator._sessions'."""

from __future__ import annotations

from importlib import resources
from typing import Final
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .._http import anyone, deps, guarded, read_body
from .._model import Forbidden
from .._service import FleetService
from .._sessions import SESSION_COOKIE, SESSION_LIFETIME, session_allows

LOGIN_BODY_BYTES: Final = 4096  # a form with one 47-character key

# Every asset is the coordinator's own (fleets often have no path to a CDN), no inline script
# or style, and the page may not be framed (clickjacking of the action buttons).
SECURITY_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # no-referrer would make browsers send Origin: null
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
ASSETS: Final = {  # URL path -> (file in coordinator/dashboard/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/app.css": ("app.css", "text/css; charset=utf-8"),
}

WRONG_KEY_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fleetmesh: sign-in failed</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><link rel="stylesheet" href="/dashboard/app.css"></head>
<body><main class="signin"><h1>fleetmesh</h1>
<p class="error" id="signin-error">That is not this coordinator's operator API key.</p>
<p><a href="/">Try again</a></p></main></body></html>
"""


def load_assets() -> dict[str, tuple[bytes, str]]:
    """URL path -> (body, media type), read once from the package when the app is built."""
    return {path: ((resources.files("coordinator") / "dashboard" / name).read_bytes(), media)
            for path, (name, media) in ASSETS.items()}


_ASSETS: Final = load_assets()


def _same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site (login CSRF: a page
    elsewhere posting a key of its choosing). Fetch metadata decides where a browser sends it
    (every current one does); else a real Origin must be this one. Clients that send neither
    (CLI tools) pass: they hold the key anyway."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin == f"{request.url.scheme}://{request.url.netloc}"


def _cookie(response: Response, value: str, max_age: int) -> None:
    response.set_cookie(SESSION_COOKIE, value, max_age=max_age, path="/", secure=True,
                        httponly=True, samesite="strict")


async def asset(request: Request) -> Response:
    body, media = _ASSETS[request.url.path]
    return Response(body, media_type=media, headers=SECURITY_HEADERS)


@anyone()
async def login(request: Request, service: FleetService) -> Response:
    if not _same_origin(request):
        raise Forbidden("sign-in from another site refused")
    body = await read_body(request, LOGIN_BODY_BYTES)
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=4)
    except (UnicodeDecodeError, ValueError):
        fields = {}
    key = (fields.get("key") or [""])[0].strip()
    if not service.is_operator_key(key):
        return Response(WRONG_KEY_PAGE, status_code=401, media_type="text/html",
                        headers=SECURITY_HEADERS)
    session_id, _ = deps(request).sessions.create()
    response = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
    _cookie(response, session_id, int(SESSION_LIFETIME))
    return response


async def session(request: Request) -> Response:
    sessions = deps(request).sessions
    found = sessions.get(request.cookies.get(SESSION_COOKIE))
    if found is None:
        return JSONResponse({"error": "not signed in"}, status_code=401,
                            headers=SECURITY_HEADERS)
    # Readable only by the dashboard's own origin (no CORS), which is what makes it a
    # CSRF token: a page elsewhere can send the cookie but never learn this.
    return JSONResponse({"csrf": found.csrf, "expires_at": sessions.expires_at(found)},
                        headers=SECURITY_HEADERS)


async def _logout(request: Request) -> Response:
    sessions = deps(request).sessions
    if session_allows(sessions, request):  # Forbidden without the CSRF token
        sessions.drop(request.cookies.get(SESSION_COOKIE))
    response = Response(status_code=204, headers=SECURITY_HEADERS)
    _cookie(response, "", 0)
    return response


logout = guarded(_logout)

ROUTES: Final = [
    *[Route(path, asset, methods=["GET"]) for path in ASSETS],
    Route("/dashboard/login", login, methods=["POST"]),
    Route("/dashboard/session", session, methods=["GET"]),
    Route("/dashboard/logout", logout, methods=["POST"]),
]
