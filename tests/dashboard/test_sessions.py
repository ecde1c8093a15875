"""Dashboard sign-in, session cookies and CSRF over real HTTPS (no browser): the rules the
browser tests rely on, each checked directly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from coordinator._server import Coordinator, CoordinatorConfig
from coordinator._sessions import (
    MAX_SESSIONS,
    SESSION_COOKIE,
    SESSION_IDLE,
    SESSION_LIFETIME,
    SessionTable,
)
from tests.coordinator.conftest import Clock, client_for


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def coord(tmp_path: Path, clock: Clock) -> AsyncIterator[Coordinator]:
    config = CoordinatorConfig(data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False,
                               clock=clock)
    async with Coordinator(config) as c:
        yield c


@pytest.fixture
async def anon(coord: Coordinator) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(coord) as client:
        yield client


async def sign_in(anon: httpx.AsyncClient, key: str) -> httpx.Response:
    return await anon.post("/dashboard/login", data={"key": key})


async def csrf_of(anon: httpx.AsyncClient) -> str:
    r = await anon.get("/dashboard/session")
    assert r.status_code == 200, r.text
    return str(r.json()["csrf"])


async def test_page_and_assets_are_served_with_a_strict_policy(anon: httpx.AsyncClient
                                                                ) -> None:
    for path, media in (("/", "text/html"), ("/dashboard/app.js", "text/javascript"),
                        ("/dashboard/app.css", "text/css")):
        r = await anon.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    page = (await anon.get("/")).text
    assert "/dashboard/app.js" in page and "http://" not in page and "https://" not in page


async def test_wrong_key_is_401_with_no_cookie_and_no_data(coord: Coordinator,
                                                           anon: httpx.AsyncClient) -> None:
    for key in ("", "fmo_" + "x" * 43, coord.operator_key + "x", "fmd_nope"):
        r = await sign_in(anon, key)
        assert r.status_code == 401, key
        assert "set-cookie" not in r.headers
        assert "operator API key" in r.text
    assert (await anon.get("/api/v1/devices")).status_code == 401
    assert (await anon.get("/dashboard/session")).status_code == 401


async def test_right_key_sets_a_strict_session_cookie(coord: Coordinator,
                                                      anon: httpx.AsyncClient) -> None:
    r = await sign_in(anon, coord.operator_key)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "secure", "samesite", "path", "max-age"} <= flags
    assert "samesite=strict" in cookie.lower()
    value = cookie.split(";")[0].split("=", 1)[1]
    assert len(value) >= 43 and coord.operator_key not in cookie  # 32 random bytes, not the key
    r = await anon.get("/api/v1/devices")
    assert r.status_code == 200 and r.json() == {"devices": []}


async def test_state_change_with_the_cookie_needs_the_csrf_token(coord: Coordinator,
                                                                 anon: httpx.AsyncClient
                                                                 ) -> None:
    await sign_in(anon, coord.operator_key)
    body = {"fleet": "cams"}
    r = await anon.post("/api/v1/tokens", json=body)
    assert r.status_code == 403 and "CSRF" in r.json()["error"]
    r = await anon.post("/api/v1/tokens", json=body, headers={"X-CSRF-Token": "0" * 43})
    assert r.status_code == 403
    token = await csrf_of(anon)
    r = await anon.put("/api/v1/fleets/cams/target", json={"app": "a", "version": 1})
    assert r.status_code == 403  # PUT too, before the body is even looked at
    r = await anon.post("/api/v1/tokens", json=body, headers={"X-CSRF-Token": token})
    assert r.status_code == 201, r.text


async def test_bearer_clients_are_unaffected(coord: Coordinator) -> None:
    async with client_for(coord, coord.operator_key) as op:
        r = await op.post("/api/v1/tokens", json={"fleet": "cams"})  # no cookie, no CSRF
        assert r.status_code == 201
        op.cookies.set(SESSION_COOKIE, "forged")
        assert (await op.get("/api/v1/devices")).status_code == 200
    async with client_for(coord, "fmo_" + "y" * 43) as wrong:
        assert (await wrong.get("/api/v1/devices")).status_code == 401


async def test_a_session_does_not_open_device_endpoints(coord: Coordinator,
                                                        anon: httpx.AsyncClient) -> None:
    await sign_in(anon, coord.operator_key)
    r = await anon.get("/api/v1/device/target")
    assert r.status_code == 401


async def test_logout_ends_the_session(coord: Coordinator, anon: httpx.AsyncClient) -> None:
    await sign_in(anon, coord.operator_key)
    cookie = anon.cookies[SESSION_COOKIE]
    assert (await anon.post("/dashboard/logout")).status_code == 403  # no CSRF token
    token = await csrf_of(anon)
    r = await anon.post("/dashboard/logout", headers={"X-CSRF-Token": token})
    assert r.status_code == 204 and "max-age=0" in r.headers["set-cookie"].lower()
    anon.cookies.set(SESSION_COOKIE, cookie)  # the old cookie, replayed
    assert (await anon.get("/api/v1/devices")).status_code == 401


async def test_sessions_expire_idle_and_absolute(coord: Coordinator, anon: httpx.AsyncClient,
                                                 clock: Clock) -> None:
    await sign_in(anon, coord.operator_key)
    clock.now += SESSION_IDLE - 1
    assert (await anon.get("/api/v1/devices")).status_code == 200
    clock.now += SESSION_IDLE - 1  # used a moment ago: the idle clock restarted
    assert (await anon.get("/api/v1/devices")).status_code == 200
    clock.now += SESSION_IDLE
    assert (await anon.get("/api/v1/devices")).status_code == 401
    await sign_in(anon, coord.operator_key)
    start = clock.now
    while clock.now < start + SESSION_LIFETIME - SESSION_IDLE / 2:
        clock.now += SESSION_IDLE / 2
        assert (await anon.get("/api/v1/devices")).status_code == 200
    clock.now = start + SESSION_LIFETIME
    assert (await anon.get("/api/v1/devices")).status_code == 401


async def test_sign_in_from_another_site_is_refused(coord: Coordinator,
                                                    anon: httpx.AsyncClient) -> None:
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null"}, {"Origin": coord.url, "Sec-Fetch-Site": "same-site"}):
        r = await anon.post("/dashboard/login", data={"key": coord.operator_key},
                            headers=headers)
        assert r.status_code == 403 and "set-cookie" not in r.headers, headers
    same = coord.url  # https://127.0.0.1:PORT, which is also the Host header httpx sends
    r = await anon.post("/dashboard/login", data={"key": coord.operator_key},
                        headers={"Origin": same, "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 303


async def test_oversized_or_malformed_sign_in_is_a_4xx(anon: httpx.AsyncClient) -> None:
    r = await anon.post("/dashboard/login", content=b"key=" + b"a" * 10_000,
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and "error" in r.json()
    for body in (b"\xff\xfe", b"key=%ff", b"&".join([b"a=1"] * 20), b"key"):
        r = await anon.post("/dashboard/login", content=body,
                            headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 401, body


def test_session_table_is_bounded_and_drops_the_least_recently_used() -> None:
    clock = Clock()
    table = SessionTable(clock)
    ids = []
    for _ in range(MAX_SESSIONS):
        clock.now += 1
        ids.append(table.create()[0])
    clock.now += 1
    assert table.get(ids[0]) is not None  # used now: the least recently used is ids[1]
    newest, _ = table.create()
    assert len(table) == MAX_SESSIONS
    assert table.get(ids[1]) is None and table.get(ids[0]) is not None
    assert table.get(newest) is not None
    assert table.get(None) is None and table.get("") is None and table.get("x" * 1000) is None
