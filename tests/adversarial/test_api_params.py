"""Attack: every path and query parameter of the coordinator's API, and the numeric request
headers it parses, fed values that a lax parser takes for numbers or names: Unicode digits
('²' is `isdigit`, '١' is an Arabic-Indic one that `int()` accepts), signs, whitespace,
underscores, huge numbers, over-long names. Expected: a 4xx with the API's one-line error for
every one of them, from a real running coordinator; never a 5xx, never an answer that took the
value as valid."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import blake3
import httpx
import pytest

from coordinator._server import CoordinatorConfig
from tests.coordinator.conftest import Harness, running_harness
from vpn import generate_keypair

BAD_NUMBERS = ["²", "1²", "١", "١٢", "𝟙", "１", " 1", "1 ", "\t1", "+1", "-1", "1_0", "0x1",
               "1e3", "1.0", "", "9" * 20, "9" * 400, "99999999999999999999999"]
BAD_WAITS = ["²", "١", "１", " 1", "1 ", "+1", "-1", "1_0", "1e1", "inf", "nan", "", "9" * 400,
             "1." + "0" * 400]
BAD_NAMES = ["²", "a²", "١", "ａ", " a", "a ", "a\t", "-a", "a-", "A", "a" * 64, "a" * 4000,
             "a.b", "a_b", "a%b", "a/b"]
BAD_APPS = ["²", "a²", "١", " a", "a ", "-a", "a" * 254, "a" * 4000, ".a"]
BAD_BLOB_IDS = ["²" * 64, "١" * 64, "A" * 64, "a" * 63, "a" * 65, "a" * 4000, " " + "a" * 63]
BAD_RANGES = [b"bytes=\xb2-", b"bytes=-\xb2", b"bytes=0-\xb2", b"bytes=\xd9\xa1-",
              b"bytes=99999999999999999999999999-"]


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05)
            ) as harness:
        yield harness


def seg(text: str) -> str:
    """`text` as one percent-encoded path segment (the server decodes it back)."""
    return quote(text, safe="")


def refused(r: httpx.Response, what: object) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:200])
    error = r.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error, (what, r.text[:200])


async def test_bad_query_numbers_are_refused(h: Harness) -> None:
    """peermap `version`/`wait`, logs `after`/`limit`/`tail`/`wait`: each bad value is a 4xx."""
    a = await h.enroll("a")
    for bad in BAD_NUMBERS:
        refused(await a.client.get("/api/v1/device/peermap",
                                   params={"version": bad, "wait": "0"}), ("version", bad))
        for key in ("after", "limit", "tail"):
            refused(await h.op.get("/api/v1/devices/a/logs", params={key: bad}), (key, bad))
    for bad in BAD_WAITS:
        refused(await a.client.get("/api/v1/device/peermap", params={"version": "0",
                                                                      "wait": bad}),
                ("peermap wait", bad))
        refused(await h.op.get("/api/v1/devices/a/logs", params={"wait": bad}),
                ("logs wait", bad))


async def test_bad_path_versions_are_refused(h: Harness) -> None:
    """/releases/{fleet}/{app}/{version}[/manifest|/status|/retry] with a bad version."""
    a = await h.enroll("a")
    for bad in BAD_NUMBERS + ["0"]:
        base = f"/api/v1/releases/fleet/app/{seg(bad)}"
        for method, path in [("GET", base), ("DELETE", base), ("GET", base + "/manifest"),
                             ("GET", base + "/status"), ("POST", base + "/retry")]:
            refused(await h.op.request(method, path), (method, path))
        refused(await a.client.get(base + "/manifest"), ("device manifest", bad))


async def test_bad_names_are_refused(h: Harness) -> None:
    """Device names, fleets and apps in every path and query position."""
    for bad_name in BAD_NAMES:
        bad = seg(bad_name)
        for method, path in [("GET", f"/api/v1/devices/{bad}"),
                             ("POST", f"/api/v1/devices/{bad}/revoke"),
                             ("GET", f"/api/v1/devices/{bad}/peers"),
                             ("GET", f"/api/v1/devices/{bad}/logs"),
                             ("PUT", f"/api/v1/fleets/{bad}/release-key"),
                             ("PUT", f"/api/v1/fleets/{bad}/target"),
                             ("GET", f"/api/v1/releases/{bad}/app/1"),
                             ("GET", f"/api/v1/releases/{bad}/app/1/status")]:
            refused(await h.op.request(method, path), (method, path))
        for method, path, body in [("POST", f"/api/v1/devices/{bad}/update",
                                    {"app": "web", "force": True}),
                                   ("POST", f"/api/v1/devices/{bad}/retry", {"app": "web"})]:
            refused(await h.op.request(method, path, json=body), (method, path))
        refused(await h.op.get("/api/v1/devices", params={"fleet": bad_name}),
                ("?fleet", bad_name))
        refused(await h.op.get("/api/v1/releases", params={"fleet": bad_name}),
                ("?fleet", bad_name))
    for bad in BAD_APPS:
        refused(await h.op.get(f"/api/v1/releases/fleet/{seg(bad)}/1"), ("app", bad))
        refused(await h.op.get("/api/v1/releases", params={"fleet": "fleet", "app": bad}),
                ("?app", bad))


async def test_bad_blob_ids_kinds_and_ranges_are_refused(h: Harness) -> None:
    """Blob ids in the path, `kind` in the query, and Range headers with Unicode digits."""
    for bad in BAD_BLOB_IDS:
        refused(await h.op.get(f"/api/v1/blobs/{seg(bad)}"), ("blob id", bad))
        refused(await h.op.put(f"/api/v1/blobs/{seg(bad)}", params={"kind": "delta"},
                               content=b"x"), ("put blob id", bad))
    data = b"delta bytes"
    blob_id = blake3.blake3(data).hexdigest()
    for bad_kind in ["²", "DELTA", " delta", "delta ", "d" * 4000]:
        refused(await h.op.put(f"/api/v1/blobs/{blob_id}", params={"kind": bad_kind},
                               content=data), ("kind", bad_kind))
    r = await h.op.put(f"/api/v1/blobs/{blob_id}", params={"kind": "delta"}, content=data)
    assert r.status_code == 201, r.text
    for bad_range in BAD_RANGES:
        r = await h.op.get(f"/api/v1/blobs/{blob_id}", headers={"range": bad_range})
        # RFC 9110 14.2: a malformed Range is ignored (the whole blob), or 416; never a 5xx
        assert r.status_code in (200, 416), (bad_range, r.status_code, r.text[:200])
        if r.status_code == 200:
            assert r.content == data


@pytest.mark.parametrize("port", ["١", "٥١٨٢٠", "²", "１", " 1", "+1", "0", "65536"])
async def test_endpoint_ports_in_bodies_are_ascii_numbers(h: Harness, port: str) -> None:
    """A LAN endpoint whose port a lax parser takes for a number (`int('١') == 1`) is refused
    at enrollment with a 4xx, and no device is made."""
    r = await h.anon.post("/api/v1/enroll", json={
        "token": await h.token("fleet"), "public_key": generate_keypair().public,
        "name": "cam-port", "lan_endpoints": [f"192.168.1.5:{port}"], "agent_version": "test"})
    assert 400 <= r.status_code < 500, r.text
    listed = (await h.op.get("/api/v1/devices", params={"fleet": "fleet"})).json()["devices"]
    assert [d["name"] for d in listed] == []
