"""Dashboard sign-in sessions and their CSRF tokens (docs/dashboard.md).

A browser signs in once with the operator API key and gets a session cookie instead of keeping
the key; the API's operator guard (coordinator._http) accepts that cookie through
`session_allows` alongside the Bearer key, and asks every state-changing request made with the
cookie for the session's CSRF token as well.

Sessions live in memory only: a restarted coordinator signs every browser out, which is the
safe direction. The table stores SHA-256 of each session id, so no lookup compares a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from starlette.requests import Request

from ._model import Forbidden

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
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

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


def session_allows(sessions: SessionTable, request: Request) -> bool:
    """True if the request carries a live session cookie (and, for a state-changing method,
    that session's CSRF token); False if it carries no live session; Forbidden (403) for a
    live session without the right CSRF token."""
    session = sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return False
    if request.method not in SAFE_METHODS:
        token = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"),
                                   session.csrf.encode()):
            raise Forbidden(f"a dashboard session needs its CSRF token ({CSRF_HEADER} "
                            "header) for this request")
    return True
