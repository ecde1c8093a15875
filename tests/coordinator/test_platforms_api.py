"""Devices' platforms through the API: said at enrollment and in reports, stored, shown; a
device whose platform a release lacks shows as `no-platform` in the release's status
(docs/releases.md, "Several platforms")."""

from __future__ import annotations

from typing import Any

from mesh.control import ControlError, DeviceReport, EnrollRequest
from tests.agent.fakes import KEYS

from .conftest import Harness
from .test_app_status import app_status, releases, report


async def _device(h: Harness, name: str) -> dict[str, Any]:
    r = await h.op.get(f"/api/v1/devices/{name}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_enrollment_and_reports_set_the_platform(h: Harness) -> None:
    r = await h.anon.post("/api/v1/enroll", json={
        "token": await h.token(), "public_key": KEYS[0].public, "name": "pi",
        "platform": "linux/arm/v7"})
    assert r.status_code == 201, r.text
    assert (await _device(h, "pi"))["platform"] == "linux/arm/v7"
    old = await h.enroll("old")  # an old agent says nothing
    assert (await _device(h, "old"))["platform"] is None
    r = await old.client.post("/api/v1/device/state",
                              json={"agent_version": "t", "platform": "linux/arm64"})
    assert r.status_code == 204, r.text
    assert (await _device(h, "old"))["platform"] == "linux/arm64"
    await report(old)  # a report that does not say keeps it
    assert (await _device(h, "old"))["platform"] == "linux/arm64"
    listed = (await h.op.get("/api/v1/devices")).json()
    rows = listed["devices"] if isinstance(listed, dict) else listed
    assert {d["name"]: d["platform"] for d in rows} == {"pi": "linux/arm/v7",
                                                        "old": "linux/arm64"}
    for bad in ("linux/aarch64", "linux", "linux/arm64/v8", 7):
        r = await old.client.post("/api/v1/device/state",
                                  json={"agent_version": "t", "platform": bad})
        assert r.status_code == 400, (bad, r.text)
        assert "platform" in r.json()["error"]
    assert (await _device(h, "old"))["platform"] == "linux/arm64"


def test_the_wire_forms() -> None:
    assert "platform" not in DeviceReport().to_json()  # old coordinators see no change
    assert DeviceReport.from_json({"platform": "linux/amd64"}).platform == "linux/amd64"
    req = EnrollRequest("t", KEYS[0].public, platform="linux/arm64")
    assert EnrollRequest.from_json(req.to_json()).platform == "linux/arm64"
    assert "platform" not in EnrollRequest("t", KEYS[0].public).to_json()
    try:
        EnrollRequest.from_json({**req.to_json(), "platform": "x86_64"})
    except ControlError as exc:
        assert "enroll.platform" in str(exc)
    else:
        raise AssertionError("a malformed platform was accepted")


async def test_no_platform_shows_in_the_release_status(h: Harness) -> None:
    pi = await h.enroll("pi")
    await h.enroll("box")
    await releases(h, 1, 2)
    why = "release 2 has no image for linux/arm/v7 (has linux/amd64)"
    await report(pi, app_status(state="no-platform", running=1, target=2, error=why))
    body = (await h.op.get("/api/v1/releases/fleet/app/2/status")).json()
    rows = {d["device"]: d for d in body["devices"]}
    assert rows["pi"]["state"] == "no-platform" and rows["pi"]["error"] == why
    assert rows["pi"]["running"] == 1
    assert body["summary"]["no_platform"] == 1 and body["summary"]["pending"] == 1
