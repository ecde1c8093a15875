"""The web dashboard (docs/dashboard.md): its static page, sign-in sessions and CSRF tokens.

The dashboard is one more client of the operator API. A browser signs in once with the
operator API key and gets a session cookie instead of keeping the key; the `operator` guard in
_api.py accepts that cookie through `Dashboard.session_allows` alongside the Bearer key, and
asks every state-changing request made with the cookie for the session's CSRF token as well.

Sessions live in memory only: a restarted coordinator signs every browser out, which is the
safe direction. The table stores SHA-256 of each session id, so no lookup compares a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ._api import Handler, read_body
from ._model import Forbidden

if TYPE_CHECKING:
    from ._server import Coordinator

SESSION_COOKIE: Final = "fm_session"
CSRF_HEADER: Final = "x-csrf-token"
SESSION_BYTES: Final = 32  # 256 bits, like every other secret the coordinator hands out
# An operator's working day; past it the key is asked for again (OWASP session guidance:
# an absolute timeout besides the idle one).
SESSION_LIFETIME: Final = 12 * 3600.0
SESSION_IDLE: Final = 3600.0  # an hour without a request ends a session (a dashboard polls)
# Only the holder of the operator key makes sessions, so this bounds memory, not an attacker:
# past it the least recently used session goes.
MAX_SESSIONS: Final = 256
LOGIN_BODY_BYTES: Final = 4096  # a form with one 47-character key
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

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


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class Session:
    csrf: str
    created: float
    last_used: float


class SessionTable:
    """Signed-in browsers: sha256(session id) -> Session, with idle and absolute expiry."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self) -> tuple[str, Session]:
        now = self._clock()
        self._expire(now)
        while len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].last_used)
            del self._sessions[oldest]
        session_id = secrets.token_urlsafe(SESSION_BYTES)
        session = Session(secrets.token_urlsafe(SESSION_BYTES), now, now)
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session for this id (and mark it used), or None."""
        if not session_id or len(session_id) > 200:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if self._expired(session, now):
            del self._sessions[key]
            return None
        session.last_used = now
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def expires_at(self, session: Session) -> float:
        return min(session.created + SESSION_LIFETIME, session.last_used + SESSION_IDLE)

    @staticmethod
    def _expired(session: Session, now: float) -> bool:
        return now - session.created >= SESSION_LIFETIME or \
            now - session.last_used >= SESSION_IDLE

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[key]


def _asset(name: str) -> bytes:
    return (resources.files("coordinator") / "dashboard" / name).read_bytes()


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


class Dashboard:
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.sessions = SessionTable(coord.config.clock)
        self._assets = {path: (_asset(name), media) for path, (name, media) in ASSETS.items()}

    # -- what the API's operator guard asks ------------------------------------------------

    def session_allows(self, request: Request) -> bool:
        """True if the request carries a live session cookie (and, for a state-changing
        method, that session's CSRF token); False if it carries no live session; Forbidden
        (403) for a live session without the right CSRF token."""
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return False
        if request.method not in SAFE_METHODS:
            token = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"),
                                       session.csrf.encode()):
                raise Forbidden(f"a dashboard session needs its CSRF token ({CSRF_HEADER} "
                                "header) for this request")
        return True

    # -- routes ----------------------------------------------------------------------------

    def _cookie(self, response: Response, value: str, max_age: int) -> None:
        response.set_cookie(SESSION_COOKIE, value, max_age=max_age, path="/", secure=True,
                            httponly=True, samesite="strict")

    async def asset(self, request: Request) -> Response:
        body, media = self._assets[request.url.path]
        return Response(body, media_type=media, headers=SECURITY_HEADERS)

    async def login(self, request: Request) -> Response:
        if not _same_origin(request):
            raise Forbidden("sign-in from another site refused")
        body = await read_body(request, LOGIN_BODY_BYTES)
        try:
            fields = parse_qs(body.decode("utf-8"), max_num_fields=4)
        except (UnicodeDecodeError, ValueError):
            fields = {}
        key = (fields.get("key") or [""])[0].strip()
        if not self.coord.is_operator_key(key):
            return Response(WRONG_KEY_PAGE, status_code=401, media_type="text/html",
                            headers=SECURITY_HEADERS)
        session_id, _ = self.sessions.create()
        response = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
        self._cookie(response, session_id, int(SESSION_LIFETIME))
        return response

    async def session(self, request: Request) -> Response:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return JSONResponse({"error": "not signed in"}, status_code=401,
                                headers=SECURITY_HEADERS)
        # Readable only by the dashboard's own origin (no CORS), which is what makes it a
        # CSRF token: a page elsewhere can send the cookie but never learn this.
        return JSONResponse({"csrf": session.csrf,
                             "expires_at": self.sessions.expires_at(session)},
                            headers=SECURITY_HEADERS)

    async def logout(self, request: Request) -> Response:
        if self.session_allows(request):  # Forbidden without the CSRF token
            self.sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = Response(status_code=204, headers=SECURITY_HEADERS)
        self._cookie(response, "", 0)
        return response

    def routes(self, guarded: Callable[[Handler], Handler]) -> list[Route]:
        """The dashboard's routes; `guarded` is the API's error wrapper (4xx as JSON)."""
        out = [Route(path, self.asset, methods=["GET"]) for path in ASSETS]
        out += [Route("/dashboard/login", guarded(self.login), methods=["POST"]),
                Route("/dashboard/session", self.session, methods=["GET"]),
                Route("/dashboard/logout", guarded(self.logout), methods=["POST"])]
        return out
