"""Whatever arrives, the answer is a 4xx with a one-line error (or a success), never a 5xx.

Hypothesis generates the bodies (JSON of every shape, the right keys with wrong-typed values,
raw bytes); they are collected first and then thrown at every endpoint with every kind of
credential through one running server.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mesh.control import MAX_BODY_BYTES

from .conftest import Harness

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=20)
KEYS = ["token", "public_key", "name", "lan_endpoints", "agent_version", "peers", "path",
        "endpoint", "last_handshake", "fleet", "uses", "expires_in", "apps", "lines",
        "dropped", "app", "force", "credential", "key_proof", "challenge", "mac"]
APP_KEYS = ["app", "state", "running", "target", "bytes_done", "bytes_total", "by_source",
            "lock_since", "error", "failed", "retry_seen", "updated_at"]
app_shaped = st.fixed_dictionaries({"apps": st.lists(st.dictionaries(
    st.sampled_from(APP_KEYS), json_values, max_size=6), max_size=3)})
log_shaped = st.fixed_dictionaries({"lines": st.lists(st.dictionaries(
    st.sampled_from(["ts", "app", "stream", "line"]), json_values, max_size=4), max_size=3)})
shaped = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)
peer_shaped = st.fixed_dictionaries({"peers": st.lists(st.dictionaries(
    st.sampled_from(["public_key", "path", "endpoint", "last_handshake"]), json_values,
    max_size=4), max_size=3)})


def collect(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    out: list[Any] = []

    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value: Any) -> None:
        out.append(value)

    run()
    return out


POSTS = ["/api/v1/enroll", "/api/v1/device/state", "/api/v1/tokens", "/api/v1/devices",
         "/api/v1/operators", "/api/v1/devices/a/revoke", "/api/v1/device/logs",
         "/api/v1/devices/a/update", "/api/v1/devices/a/retry"]
GETS = ["/api/v1/device/peermap", "/api/v1/devices", "/api/v1/devices/a",
        "/api/v1/devices/a/peers", "/openapi.json", "/api/v1/devices/a/logs"]


def check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:200])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err, str) and err and "\n" not in err, (what, r.text[:200])


async def test_random_bodies_never_5xx(h: Harness) -> None:
    a = await h.enroll("a")
    bodies: list[bytes] = [json.dumps(v).encode() for v in collect(json_values, 60)]
    bodies += [json.dumps(v).encode() for v in collect(shaped, 120)]
    bodies += [json.dumps(v).encode() for v in collect(peer_shaped, 40)]
    bodies += [json.dumps(v).encode() for v in collect(app_shaped, 40)]
    bodies += [json.dumps(v).encode() for v in collect(log_shaped, 30)]
    bodies += collect(st.binary(max_size=200), 30)
    bodies += [b"", b"{", b"[" * 100_000, b'"\xff\xfe"', b"\x00", b"null", b"1e999",
               b'{"fleet": "' + b"a" * 10_000 + b'"}', json.dumps({"peers": [{}] * 20_000}
                                                                 ).encode()[:MAX_BODY_BYTES]]
    clients = {"operator": h.op, "device": a.client, "none": h.anon}
    for path in POSTS:
        for who, client in clients.items():
            for body in bodies:
                try:
                    r = await client.post(path, content=body,
                                          headers={"content-type": "application/json"})
                except httpx.TransportError as exc:
                    raise AssertionError(f"{who} POST {path} {body[:60]!r}: {exc!r}") from exc
                check(r, f"{who} POST {path} {body[:60]!r}")


async def test_oversized_bodies_are_413(h: Harness) -> None:
    a = await h.enroll("a")
    big = b'{"x": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'

    async def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    for path in POSTS:
        if path == "/api/v1/device/logs":
            continue  # its own, larger bound (test_app_status.py)
        for client in (h.op, a.client, h.anon):
            r = await client.post(path, content=big)
            assert r.status_code in (401, 403, 413), (path, r.status_code)
            if client is not h.anon or path == "/api/v1/enroll":
                assert r.status_code in (403, 413)
            # chunked: no Content-Length, the limit still holds while streaming
            if path.endswith("/revoke"):
                continue  # takes no body: a chunked one is read and dropped, not judged
            r = await client.post(path, content=chunks())
            assert r.status_code in (401, 403, 413), (path, r.status_code)
    r = await h.anon.post("/api/v1/enroll", content=big)
    assert r.status_code == 413 and "larger" in r.json()["error"]


async def test_bad_queries_paths_and_methods(h: Harness) -> None:
    a = await h.enroll("a")
    for params in ({"version": "abc"}, {"wait": "-1"}, {"wait": "nan"}, {"wait": "1e309"},
                   {"wait": "1801"}, {"version": "9" * 5000}, {"wait": "inf"}):
        r = await a.client.get("/api/v1/device/peermap", params=params)
        check(r, str(params))
        assert r.status_code == 400, (params, r.status_code)
    for fleet in ("UPPER", "", "-x", "a" * 100, "a b"):
        r = await h.op.get("/api/v1/devices", params={"fleet": fleet})
        assert r.status_code == 400, fleet
    for name in ("UPPER", "x" * 64, "%00", "a..b", "..", "-"):
        for suffix in ("", "/peers"):
            r = await h.op.get(f"/api/v1/devices/{name}{suffix}")
            check(r, name)
            assert r.status_code in (400, 404)
    for path in GETS:
        r = await h.op.delete(path)
        check(r, f"DELETE {path}")
        assert r.status_code in (404, 405)
    r = await h.op.get("/nope")
    assert r.status_code == 404 and "error" in r.json()
    for header in ("Bearer", "Bearer ", "Basic Zm9vOmJhcg==", "Bearer fmo_" + "x" * 5000,
                   "Bearer fmd_\u00e9"):
        try:
            r = await h.anon.get("/api/v1/devices", headers={"Authorization": header})
        except (UnicodeEncodeError, httpx.LocalProtocolError):
            continue  # the client refused to send it
        check(r, header)
        assert r.status_code == 401
