"""The API end to end on loopback: enrollment, long polls, provisioning, revocation, auth."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import trio

from coordinator._server import Coordinator, CoordinatorConfig
from mesh.control import Enrollment, PeerMap, TokenParts
from vpn import generate_keypair

from .conftest import Harness, client_for, running_harness


async def test_first_start_writes_key_0600_and_cert_fingerprint_in_tokens(h: Harness) -> None:
    coord = h.coord
    assert stat.S_IMODE(coord.operator_key_path.stat().st_mode) == 0o600
    assert coord.operator_key.startswith("fmo_")
    parts = TokenParts.parse(await h.token())
    assert parts.fingerprint == coord.fingerprint
    r = await h.anon.get("/openapi.json")
    paths = r.json()["paths"]
    for route in ("/api/v1/enroll", "/api/v1/device/peermap", "/api/v1/device/state",
                  "/api/v1/tokens", "/api/v1/devices", "/api/v1/devices/{name}",
                  "/api/v1/devices/{name}/revoke", "/api/v1/devices/{name}/peers",
                  "/api/v1/operators", "/openapi.json"):
        assert route in paths


async def test_openapi_lists_every_route(coord: Coordinator) -> None:
    from coordinator._app import build_app
    from coordinator._openapi import openapi_document
    doc = openapi_document()["paths"]
    for route in build_app(coord.service).routes:
        assert route.path in doc  # type: ignore[attr-defined]
        for method in route.methods - {"HEAD"}:  # type: ignore[attr-defined]
            assert method.lower() in doc[route.path], (route.path, method)  # type: ignore


async def test_enroll_returns_enrollment_and_peermap(h: Harness) -> None:
    a = await h.enroll("a", lan=["192.168.1.10:51820"])
    enrollment = Enrollment.from_json(a.enrollment)
    assert enrollment.credential.startswith("fmd_")
    assert enrollment.mesh_ipv4 == "10.250.0.2" and enrollment.mesh_prefix_v4 == "10.250.0.0/16"
    assert enrollment.hub.mesh_ipv4 == "10.250.0.1"
    b = await h.enroll("b", lan=["192.168.1.11:51820"])
    r = await b.client.get("/api/v1/device/peermap", params={"version": 0, "wait": 0})
    assert r.status_code == 200
    m = PeerMap.from_json(r.json())
    assert [p.name for p in m.peers] == ["a"] and m.peers[0].public_key == a.public_key


async def test_long_poll_304_after_wait_and_200_after_anothers_report(h: Harness) -> None:
    a = await h.enroll("a", lan=["192.168.1.10:51820"])
    b = await h.enroll("b", lan=["192.168.1.11:51820"])
    for dev in (a, b):  # both report from 127.0.0.1: one "public IP", so LAN endpoints apply
        r = await dev.client.post("/api/v1/device/state", json={
            "lan_endpoints": dev.enrollment and (["192.168.1.10:51820"] if dev is a
                                                 else ["192.168.1.11:51820"])})
        assert r.status_code == 204
    await trio.sleep(0.2)  # let the batch settle
    first = PeerMap.from_json((await a.client.get("/api/v1/device/peermap",
                                                  params={"version": 0, "wait": 0})).json())
    assert first.peers[0].endpoints == ("192.168.1.11:51820",) and first.peers[0].lan

    with trio.fail_after(10):
        r = await a.client.get("/api/v1/device/peermap",
                               params={"version": first.version, "wait": 0.3})
    assert r.status_code == 304 and r.content == b""

    answers: list[PeerMap] = []

    async def poll() -> None:
        r = await a.client.get("/api/v1/device/peermap",
                               params={"version": first.version, "wait": 20})
        assert r.status_code == 200
        answers.append(PeerMap.from_json(r.json()))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(poll)
            await trio.sleep(0.2)  # the poll is parked
            assert answers == []
            r = await b.client.post("/api/v1/device/state",
                                    json={"lan_endpoints": ["192.168.1.99:51820"]})
            assert r.status_code == 204
    assert answers[0].version != first.version
    assert answers[0].peers[0].endpoints == ("192.168.1.99:51820",)


async def test_the_long_poll_ceiling_is_half_an_hour(h: Harness) -> None:
    """Agents park their peer-map poll for 30 minutes (issue 14: an idle device costs one
    request per half hour); the server takes that wait, answers it at once on a change, and
    refuses a longer one with one line."""
    a = await h.enroll("a")
    await trio.sleep(0.2)
    v = (await a.client.get("/api/v1/device/peermap", params={"wait": 0})).json()["version"]
    r = await a.client.get("/api/v1/device/peermap", params={"version": v, "wait": 1801})
    assert r.status_code == 400
    assert r.json()["error"] == "wait: must be 0..1800 seconds"
    answers: list[int] = []

    async def poll() -> None:
        r = await a.client.get("/api/v1/device/peermap", params={"version": v, "wait": 1800})
        answers.append(r.status_code)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(poll)
            await trio.sleep(0.2)  # parked
            assert answers == []
            await h.enroll("b")  # a's map changes: the poll answers at once
    assert answers == [200]


async def test_both_sides_of_a_pair_hear_in_the_same_batch(h: Harness) -> None:
    a = await h.enroll("a")
    b = await h.enroll("b")
    await trio.sleep(0.2)
    va = (await a.client.get("/api/v1/device/peermap", params={"wait": 0})).json()["version"]
    vb = (await b.client.get("/api/v1/device/peermap", params={"wait": 0})).json()["version"]
    got: dict[str, int] = {}

    async def poll(dev, v: int) -> None:
        r = await dev.client.get("/api/v1/device/peermap", params={"version": v, "wait": 20})
        got[dev.name] = r.json()["version"]

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(poll, a, va)
            n.start_soon(poll, b, vb)
            await trio.sleep(0.1)
            c = await h.enroll("c")  # both a's and b's maps change in one batch
    assert got["a"] == got["b"]
    assert c.name == "c"


async def test_provisioning_and_join(h: Harness) -> None:
    r = await h.op.post("/api/v1/devices", json={"name": "kiosk-1", "fleet": "shops"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["device"]["state"] == "provisioned" and body["device"]["mesh_ipv4"] is None
    join = body["join"]
    assert set(join) == {"url", "token", "name", "fleet"}
    assert join["url"] == h.coord.public_url and join["name"] == "kiosk-1"
    assert TokenParts.parse(join["token"]).fingerprint == h.coord.fingerprint
    again = await h.op.post("/api/v1/devices", json={"name": "kiosk-1", "fleet": "shops"})
    assert again.status_code == 409
    dev = await h.enroll(None, token=join["token"])  # type: ignore[arg-type]
    assert dev.name == "kiosk-1" and dev.enrollment["fleet"] == "shops"
    info = (await h.op.get("/api/v1/devices/kiosk-1")).json()
    assert info["state"] == "active" and info["public_key"] == dev.public_key
    assert info["online"] is False  # enrolled, but no report and no handshake yet
    await dev.client.post("/api/v1/device/state", json={"agent_version": "9"})
    info = (await h.op.get("/api/v1/devices/kiosk-1")).json()
    assert info["online"] is True and info["agent_version"] == "9"
    listed = (await h.op.get("/api/v1/devices", params={"fleet": "shops"})).json()["devices"]
    assert [d["name"] for d in listed] == ["kiosk-1"]
    assert (await h.op.get("/api/v1/devices", params={"fleet": "other"})).json() == \
        {"devices": []}


async def test_revocation(h: Harness) -> None:
    a = await h.enroll("a")
    b = await h.enroll("b")
    await trio.sleep(0.2)
    m = (await a.client.get("/api/v1/device/peermap", params={"wait": 0})).json()
    assert [p["name"] for p in m["peers"]] == ["b"]
    status: list[int] = []

    async def parked_poll() -> None:
        vb = (await b.client.get("/api/v1/device/peermap", params={"wait": 0})).json()
        r = await b.client.get("/api/v1/device/peermap",
                               params={"version": vb["version"], "wait": 20})
        status.append(r.status_code)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(parked_poll)
            await trio.sleep(0.2)
            r = await h.op.post("/api/v1/devices/b/revoke")
            assert r.status_code == 200 and r.json()["state"] == "revoked"
    assert status == [401]  # the parked long poll ended at once
    assert (await b.client.get("/api/v1/device/peermap", params={"wait": 0})).status_code == 401
    assert (await b.client.post("/api/v1/device/state", json={})).status_code == 401
    with trio.fail_after(10):
        r = await a.client.get("/api/v1/device/peermap",
                               params={"version": m["version"], "wait": 5})
    assert r.status_code == 200 and r.json()["peers"] == []
    # the address is never reused
    c = await h.enroll("b")
    assert c.enrollment["mesh_ipv4"] not in (a.enrollment["mesh_ipv4"],
                                             b.enrollment["mesh_ipv4"])
    assert (await h.op.post("/api/v1/devices/nope/revoke")).status_code == 404


async def test_token_refusals_are_distinct(h: Harness) -> None:
    key = generate_keypair().public

    async def enroll_with(token: str) -> tuple[int, str]:
        r = await h.anon.post("/api/v1/enroll", json={"token": token, "public_key": key})
        return r.status_code, r.json().get("error", "")

    forged = str(TokenParts(h.coord.fingerprint, "A" * 43))
    other_coord = str(TokenParts("0" * 64, "A" * 43))
    used = await h.token()
    assert (await enroll_with(used))[0] == 201
    key = generate_keypair().public
    short = await h.token(expires_in=60)
    # expire it: move the coordinator's clock forward for the check
    settings = h.coord.service.settings
    real = settings.clock
    object.__setattr__(settings, "clock", lambda: real() + 120)
    try:
        expired = await enroll_with(short)
    finally:
        object.__setattr__(settings, "clock", real)
    results = {"forged": await enroll_with(forged), "used": await enroll_with(used),
               "expired": expired, "other": await enroll_with(other_coord),
               "garbage": await enroll_with("hello")}
    assert results["forged"][0] == results["used"][0] == results["expired"][0] == 401
    assert results["other"][0] == 401 and results["garbage"][0] == 400
    messages = [m for _, m in results.values()]
    assert len(set(messages)) == len(messages), messages
    assert "unknown" in results["forged"][1] and "used up" in results["used"][1]
    assert "expired" in results["expired"][1] and "another coordinator" in results["other"][1]
    for _, m in results.values():
        assert "\n" not in m


async def test_name_taken_is_409(h: Harness) -> None:
    await h.enroll("a")
    r = await h.anon.post("/api/v1/enroll", json={
        "token": await h.token(), "public_key": generate_keypair().public, "name": "a"})
    assert r.status_code == 409


async def test_device_credential_is_confined(h: Harness) -> None:
    a = await h.enroll("a")
    await h.enroll("b")
    for method, path, body in [
        ("GET", "/api/v1/devices", None), ("GET", "/api/v1/devices/b", None),
        ("GET", "/api/v1/devices/a", None), ("GET", "/api/v1/devices/b/peers", None),
        ("POST", "/api/v1/devices/b/revoke", None),
        ("POST", "/api/v1/tokens", {"fleet": "fleet"}),
        ("POST", "/api/v1/devices", {"name": "x", "fleet": "fleet"}),
        ("POST", "/api/v1/operators", {"name": "x", "public_key": generate_keypair().public}),
    ]:
        r = await a.client.request(method, path, json=body)
        assert r.status_code == 403, (path, r.status_code)
        r = await h.anon.request(method, path, json=body)
        assert r.status_code == 401, (path, r.status_code)
        r = await h.anon.request(method, path, json=body,
                                 headers={"Authorization": "Bearer fmd_garbage"})
        assert r.status_code == 401, (path, r.status_code)
    # the operator key is not a device credential either
    assert (await h.op.get("/api/v1/device/peermap", params={"wait": 0})).status_code == 403
    assert (await h.anon.get("/api/v1/device/peermap")).status_code == 401


async def test_peers_report_and_operator(h: Harness) -> None:
    a = await h.enroll("a")
    b = await h.enroll("b")
    r = await a.client.post("/api/v1/device/state", json={"peers": [
        {"public_key": b.public_key, "path": "direct", "endpoint": "203.0.113.5:4000",
         "last_handshake": time.time()},
        {"public_key": generate_keypair().public, "path": "none"}]})
    assert r.status_code == 204
    peers = (await h.op.get("/api/v1/devices/a/peers")).json()["peers"]
    assert peers[0]["peer"] == "b" and peers[0]["path"] == "direct"
    assert peers[0]["endpoint"] == "203.0.113.5:4000" and peers[1]["peer"] is None
    assert set(peers[0]) == {"peer", "public_key", "path", "endpoint", "last_handshake"}

    await trio.sleep(0.2)
    v = (await a.client.get("/api/v1/device/peermap", params={"wait": 0})).json()["version"]
    op_key = generate_keypair().public
    r = await h.op.post("/api/v1/operators", json={"name": "laptop", "public_key": op_key})
    assert r.status_code == 201, r.text
    op = r.json()
    assert op["hub"]["public_key"] == a.enrollment["hub"]["public_key"]
    assert op["mesh_prefix_v4"] == "10.250.0.0/16"
    with trio.fail_after(10):
        r = await a.client.get("/api/v1/device/peermap", params={"version": v, "wait": 10})
    assert f"{op['mesh_ipv4']}/32" in r.json()["relay_ips"]
    assert f"{op['mesh_ipv6']}/128" in r.json()["relay_ips"]
    r = await h.op.post("/api/v1/operators", json={"name": "laptop2", "public_key": op_key})
    assert r.status_code == 409


async def test_restart_keeps_state_and_versions_move_forward(tmp_path) -> None:
    from coordinator._server import CoordinatorConfig
    config = CoordinatorConfig(data_dir=tmp_path / "c", listen="127.0.0.1:0", hub=False,
                               batch_window=0.05)
    async with Coordinator(config) as c1:
        async with client_for(c1, c1.operator_key) as op, client_for(c1) as anon:
            t = (await op.post("/api/v1/tokens", json={"fleet": "f", "uses": 2})).json()
            creds = []
            for name in ("a", "b"):
                r = await anon.post("/api/v1/enroll", json={
                    "token": t["token"], "public_key": generate_keypair().public,
                    "name": name})
                creds.append(r.json()["credential"])
            async with client_for(c1, creds[0]) as a:
                v1 = (await a.get("/api/v1/device/peermap", params={"wait": 0})).json()
        fp, key = c1.fingerprint, c1.operator_key
    await trio.sleep(0.01)
    async with Coordinator(config) as c2:
        assert (c2.fingerprint, c2.operator_key, c2.operator_key_created) == (fp, key, False)
        async with client_for(c2, creds[0]) as a:
            r = await a.get("/api/v1/device/peermap",
                            params={"version": v1["version"], "wait": 0})
            assert r.status_code == 200 and r.json()["version"] > v1["version"]
            assert [p["name"] for p in r.json()["peers"]] == ["b"]


async def test_hub_observations_feed_maps_and_online_state(h: Harness) -> None:
    """What the hub watcher reports (here injected: no hub on loopback) reaches peer maps."""
    from coordinator._hub import Observation
    a = await h.enroll("a")
    b = await h.enroll("b")
    await trio.sleep(0.2)
    v = (await a.client.get("/api/v1/device/peermap", params={"wait": 0})).json()["version"]
    assert (await h.op.get("/api/v1/devices/b")).json()["online"] is False
    h.coord.service.observe([Observation(b.public_key, "203.0.113.9:4444", None, 148)])
    with trio.fail_after(10):
        r = await a.client.get("/api/v1/device/peermap", params={"version": v, "wait": 10})
    entry = r.json()["peers"][0]
    assert entry["endpoints"] == ["203.0.113.9:4444"] and entry["lan"] is False
    info = (await h.op.get("/api/v1/devices/b")).json()
    assert info["endpoint"] == "203.0.113.9:4444" and info["online"] is True


async def test_a_device_whose_agent_says_it_stops_is_offline_at_once(tmp_path: Path) -> None:
    """A report with `stopping` (the agent's last, on SIGTERM) makes the device offline now,
    not when the online window ends; the hub still counting that report's own packets does not
    bring it back; its next report or a new hub handshake does."""
    from coordinator._hub import Observation
    now = [1_800_000_000.0]
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05,
            clock=lambda: now[0])) as h:
        cam = await h.enroll("cam-1")

        async def online() -> bool:
            return bool((await h.op.get("/api/v1/devices/cam-1")).json()["online"])

        h.coord.service.observe([Observation(cam.public_key, None, now[0], 100)])
        assert (await cam.client.post("/api/v1/device/state", json={})).status_code == 204
        assert await online()
        now[0] += 5
        r = await cam.client.post("/api/v1/device/state", json={"stopping": True})
        assert r.status_code == 204, r.text
        assert not await online()
        listed = (await h.op.get("/api/v1/devices")).json()["devices"]
        assert [d["online"] for d in listed] == [False]
        now[0] += 1  # the hub counts the goodbye's own packets
        h.coord.service.observe([Observation(cam.public_key, None, now[0] - 6, 900)])
        assert not await online()
        now[0] += 30  # the agent starts again: a new handshake with the hub
        h.coord.service.observe([Observation(cam.public_key, None, now[0], 1000)])
        assert await online()
        r = await cam.client.post("/api/v1/device/state", json={"stopping": True})
        assert not await online()
        now[0] += 1
        assert (await cam.client.post("/api/v1/device/state", json={})).status_code == 204
        assert await online()
        for bad in ("yes", 1, {}):
            r = await cam.client.post("/api/v1/device/state", json={"stopping": bad})
            assert r.status_code == 400 and "stopping" in r.json()["error"], (bad, r.text)


async def test_device_list_shows_when_each_device_last_reported(tmp_path: Path) -> None:
    """`last_report` (docs/api.md DeviceInfo): null before the first report, then the
    coordinator's time of the newest one, in the list and in the device's own view."""
    now = [1_800_000_000.0]
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05,
            clock=lambda: now[0])) as h:
        cam = await h.enroll("cam-1")
        listed = (await h.op.get("/api/v1/devices")).json()["devices"]
        assert [d["last_report"] for d in listed] == [None]
        for step in (0.0, 12.5):
            now[0] += step
            r = await cam.client.post("/api/v1/device/state", json={"agent_version": "test"})
            assert r.status_code == 204, r.text
        listed = (await h.op.get("/api/v1/devices")).json()["devices"]
        assert [d["last_report"] for d in listed] == [now[0]]
        assert (await h.op.get("/api/v1/devices/cam-1")).json()["last_report"] == now[0]


async def test_a_punch_request_wakes_the_peers_long_poll_and_is_spaced(h: Harness) -> None:
    a = await h.enroll("a")
    b = await h.enroll("b")
    await trio.sleep(0.2)
    vb = (await b.client.get("/api/v1/device/peermap", params={"wait": 0})).json()["version"]
    answers: list[PeerMap] = []

    async def poll(version: int) -> None:
        r = await b.client.get("/api/v1/device/peermap", params={"version": version, "wait": 20})
        assert r.status_code == 200
        answers.append(PeerMap.from_json(r.json()))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(poll, vb)
            await trio.sleep(0.1)
            r = await a.client.post("/api/v1/device/punch", json={"peer": "b"})
            assert r.status_code == 204
    assert [name for name, _ in answers[0].punch] == ["a"]
    # within the spacing a second request is answered but changes nothing
    r = await a.client.post("/api/v1/device/punch", json={"peer": "b"})
    assert r.status_code == 204
    await trio.sleep(0.3)
    r = await b.client.get("/api/v1/device/peermap",
                           params={"version": answers[0].version, "wait": 0})
    assert r.status_code == 304
    # bad requests: one clear line each
    for body, status in (({"peer": "nobody"}, 404), ({"peer": "a"}, 400),
                         ({"peer": "B!"}, 400), ({}, 400), ([], 400)):
        r = await a.client.post("/api/v1/device/punch", json=body)
        assert r.status_code == status, (body, r.text)
        assert "error" in r.json()


async def test_a_tuned_hub_keepalive_widens_online_and_devices_show_tells_the_nat(
        tmp_path: Path) -> None:
    """A device whose NAT keeps its binding for minutes sends a keepalive every
    `hub_keepalive` s (agent/_keepalive.py): between two of them it is still online; its
    report's `link` is kept (a report without one keeps it) and shown."""
    now = [1_800_000_000.0]
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05,
            clock=lambda: now[0])) as h:
        cam = await h.enroll("cam-1")
        link = {"hub_keepalive": 100, "binding_survived": 130.5, "binding_lost": 170.0}
        r = await cam.client.post("/api/v1/device/state", json={"link": link})
        assert r.status_code == 204, r.text
        now[0] += 150  # past the default 60 s window, within 2 x 100 + 10
        r = await cam.client.post("/api/v1/device/state", json={"agent_version": "x"})
        assert r.status_code == 204
        now[0] += 200
        info = (await h.op.get("/api/v1/devices/cam-1")).json()
        assert info["link"] == link and info["online"] is True
        now[0] += 11
        assert (await h.op.get("/api/v1/devices/cam-1")).json()["online"] is False
        for bad in ({"hub_keepalive": -1}, {"hub_keepalive": 25, "binding_lost": "x"},
                    {"binding_survived": 3}, {"hub_keepalive": 25, "binding_survived": 1e99}):
            r = await cam.client.post("/api/v1/device/state", json={"link": bad})
            assert r.status_code == 400 and "report.link" in r.json()["error"], r.text


async def test_reported_wan_bytes_are_kept_by_day_and_shown(tmp_path: Path) -> None:
    """A report's byte account (today and yesterday) is merged with the days stored and
    shown in DeviceInfo, newest day first; a report without one keeps it; a bad one is a 400
    naming the field."""
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False,
            batch_window=0.05)) as h:
        cam = await h.enroll("cam-1")
        assert (await h.op.get("/api/v1/devices/cam-1")).json()["wan_bytes"] is None
        day1 = {"wireguard": 9000, "control": 4100, "gossip": 0, "blobs": 0, "logs": 0}
        day2 = {"wireguard": 1200, "control": 800, "gossip": 64, "blobs": 70_000, "logs": 5}
        r = await cam.client.post("/api/v1/device/state",
                                  json={"wan_bytes": {"2026-12-02": day1}})
        assert r.status_code == 204, r.text
        r = await cam.client.post("/api/v1/device/state",
                                  json={"wan_bytes": {"2026-12-03": day2,
                                                      "2026-12-02": day1}})
        assert r.status_code == 204, r.text
        r = await cam.client.post("/api/v1/device/state", json={"agent_version": "x"})
        assert r.status_code == 204
        info = (await h.op.get("/api/v1/devices/cam-1")).json()
        assert info["wan_bytes"] == {"2026-12-03": day2, "2026-12-02": day1}
        assert info["wan_budget"] is None
        budget = {"limit": 50_000_000, "period": "month", "used": 50_000_001}
        r = await cam.client.post("/api/v1/device/state", json={"wan_budget": budget})
        assert r.status_code == 204, r.text
        info = (await h.op.get("/api/v1/devices/cam-1")).json()
        assert info["wan_budget"] == {**budget, "over": True}
        for bad_budget in ({"limit": 0, "period": "month", "used": 0},
                           {"limit": 5, "period": "week", "used": 0},
                           {"limit": 5, "period": "day", "used": -1}, {"limit": 5},
                           # found by the API fuzzing: `over` must be a boolean when given
                           {"limit": 5, "period": "day", "used": 0, "over": {"x": 1}}):
            r = await cam.client.post("/api/v1/device/state", json={"wan_budget": bad_budget})
            assert r.status_code == 400 and "report.wan_budget" in r.json()["error"], r.text
        assert list(info["wan_bytes"]) == ["2026-12-03", "2026-12-02"]
        for bad in ({"2026-12-03": {"video": 1}}, {"2026-12-03": {"control": -1}},
                    {"yesterday": {}}, {"2026-12-03": {"control": 2**53}},
                    {f"2026-11-{d:02}": {} for d in range(1, 10)}, [1]):
            r = await cam.client.post("/api/v1/device/state", json={"wan_bytes": bad})
            assert r.status_code == 400 and "report.wan_bytes" in r.json()["error"], r.text


async def test_a_quiet_long_poll_keeps_the_device_online_through_its_wait(
        tmp_path: Path) -> None:
    """A keepalive trial (agent/_keepalive.py) is a long poll with quiet=1: the device sends
    nothing to the hub for its wait, and is online all the same -- until the wait is over."""
    from coordinator._hub import Observation
    now = [1_800_000_000.0]
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05,
            clock=lambda: now[0])) as h:
        cam = await h.enroll("cam-1")
        h.coord.service.observe([Observation(cam.public_key, "203.0.113.9:4444", None, 148)])
        await trio.sleep(0.2)  # its own map changed (its public IP): let the batch go out
        v = (await cam.client.get("/api/v1/device/peermap", params={"wait": 0})).json()["version"]
        r = await cam.client.get("/api/v1/device/peermap",
                                 params={"version": v, "wait": 0.2, "quiet": 1})
        assert r.status_code == 304
        # the clock says 200 s passed: the wait it announced was 0.2 s, so it is offline now
        now[0] += 200
        assert (await h.op.get("/api/v1/devices/cam-1")).json()["online"] is False
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                async def trial() -> None:
                    await cam.client.get("/api/v1/device/peermap",
                                         params={"version": v, "wait": 1, "quiet": 1})
                n.start_soon(trial)
                await trio.sleep(0.3)
                assert (await h.op.get("/api/v1/devices/cam-1")).json()["online"] is True
        for bad in ("2", "yes", "-1"):
            r = await cam.client.get("/api/v1/device/peermap",
                                     params={"version": v, "wait": 0, "quiet": bad})
            assert r.status_code == 400 and "quiet" in r.json()["error"], r.text
