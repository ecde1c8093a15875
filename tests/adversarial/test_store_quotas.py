"""Attacks on the coordinator's database by an enrolled device (issue 13 item 15), and the
durability of what hands out credentials; all against a real running coordinator over HTTPS
with its real SQLite file.

- A device names new apps in every report (16 per report, the codec's bound, but different
  ones each time): every app kept its status row, so 100,000 app names meant 100,000 rows.
  Expected: at most mesh.control.MAX_APPS statuses per device; past it, the apps the latest
  report leaves out lose theirs (the latest report's apps are all shown).
- A device uploads log lines as fast as the coordinator takes them: every line was a database
  write. Expected: at most LOG_BURST lines at once and LOG_RATE per second on average are
  stored; the rest are dropped, added to the `dropped` total the operator reads and told by a
  marker line in the log itself ("dropped N log lines"), at most one per LOG_MARKER_SPACING.
- Enrollment and revocation committed under `synchronous=NORMAL` (WAL), which a power loss
  can take back after the device got its credential (or the operator was told a device is
  revoked). Expected: those transactions commit under `synchronous=FULL`; reports do not.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coordinator._server import CoordinatorConfig
from coordinator._service import LOG_BURST, LOG_MARKER_SPACING, LOG_RATE
from coordinator._store_sqlite import SqliteStore
from mesh.control import MAX_APPS, MAX_LOG_LINES
from tests.coordinator.conftest import Clock, Enrolled, Harness, running_harness


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def h(tmp_path: Path, clock: Clock) -> AsyncIterator[Harness]:
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05,
            clock=clock)) as harness:
        yield harness


def _app(name: str) -> dict[str, Any]:
    return {"app": name, "state": "idle", "running": 1, "target": 1, "bytes_done": 0,
            "bytes_total": 0, "by_source": {"lan": 0, "wan_peer": 0, "coordinator": 0},
            "lock_since": None, "error": None, "failed": [], "retry_seen": 0,
            "updated_at": time.time()}


def _store(h: Harness) -> SqliteStore:
    store = h.coord.store
    assert isinstance(store, SqliteStore)
    return store


def _app_rows(h: Harness, device_id: str) -> int:
    rows = _store(h)._query("SELECT COUNT(*) FROM device_apps WHERE device_id = ?",
                            (device_id,))
    return int(rows[0][0])


async def test_app_rows_per_device_are_bounded(h: Harness) -> None:
    """200 reports of 16 new app names each (3,200 names): the device keeps at most MAX_APPS
    app rows, and the operator sees exactly the last report's apps."""
    cam = await h.enroll("cam-1")
    device_id = cam.enrollment["device_id"]
    for batch in range(200):
        names = [f"app-{batch}-{i}" for i in range(MAX_APPS)]
        r = await cam.client.post("/api/v1/device/state", json={
            "agent_version": "test", "apps": [_app(n) for n in names]})
        assert r.status_code == 204, r.text
        assert _app_rows(h, device_id) <= MAX_APPS
    shown = (await h.op.get("/api/v1/devices/cam-1")).json()
    assert sorted(a["app"] for a in shown["apps"]) == sorted(names)
    # One report naming more than MAX_APPS is refused whole (400, one line), nothing stored.
    r = await cam.client.post("/api/v1/device/state", json={
        "agent_version": "test", "apps": [_app(f"many-{i}") for i in range(MAX_APPS + 1)]})
    assert r.status_code == 400 and "more than" in r.json()["error"], r.text
    assert _app_rows(h, device_id) <= MAX_APPS
    # Below the bound nothing changes: an app left out of a report keeps its status.
    dog = await h.enroll("dog-1")
    for name in ("web", "db"):
        r = await dog.client.post("/api/v1/device/state", json={
            "agent_version": "test", "apps": [_app(name)]})
        assert r.status_code == 204, r.text
    shown = (await h.op.get("/api/v1/devices/dog-1")).json()
    assert sorted(a["app"] for a in shown["apps"]) == ["db", "web"]


def _lines(count: int, tag: str) -> list[dict[str, Any]]:
    return [{"ts": 1_800_000_000.0, "app": "web", "stream": "stdout", "line": f"{tag} {i}"}
            for i in range(count)]


async def _upload(dev: Enrolled, lines: list[dict[str, Any]]) -> None:
    r = await dev.client.post("/api/v1/device/logs", json={"lines": lines, "dropped": 0})
    assert r.status_code == 204, r.text


async def test_log_uploads_are_rate_limited_with_a_visible_marker(
        h: Harness, clock: Clock) -> None:
    """Four full uploads at one instant: LOG_BURST lines are stored, the rest dropped; the
    operator's page says how many (`dropped`) and a marker line in the log says it too. Later
    the budget refills at LOG_RATE; drops between markers are counted by the next marker."""
    cam = await h.enroll("cam-1")
    for n in range(4):
        await _upload(cam, _lines(MAX_LOG_LINES, f"burst{n}"))
    over = 4 * MAX_LOG_LINES - LOG_BURST
    page = (await h.op.get("/api/v1/devices/cam-1/logs", params={"limit": 5000})).json()
    app_lines = [x for x in page["lines"] if not x["line"].startswith("[fleetmesh")]
    markers = [x for x in page["lines"] if x["line"].startswith("[fleetmesh")]
    assert len(app_lines) == LOG_BURST
    assert page["dropped"] == over
    assert len(markers) == 1 and f"dropped {MAX_LOG_LINES} log lines" in markers[0]["line"]
    assert markers[0]["app"] == "web" and markers[0]["stream"] == "stderr"
    # the two later drops came within LOG_MARKER_SPACING: counted by the next marker
    clock.now += LOG_MARKER_SPACING
    await _upload(cam, _lines(MAX_LOG_LINES, "later"))
    refill = int(LOG_MARKER_SPACING * LOG_RATE)
    page = (await h.op.get("/api/v1/devices/cam-1/logs", params={"tail": 5})).json()
    last = page["lines"][-1]["line"]
    pending = MAX_LOG_LINES + (MAX_LOG_LINES - refill)  # the 4th upload's, and these
    assert f"dropped {pending} log lines" in last, last
    assert page["dropped"] == over + MAX_LOG_LINES - refill
    # Another device has its own budget.
    dog = await h.enroll("dog-1")
    await _upload(dog, _lines(MAX_LOG_LINES, "dog"))
    page = (await h.op.get("/api/v1/devices/dog-1/logs", params={"limit": 5000})).json()
    assert len(page["lines"]) == MAX_LOG_LINES and page["dropped"] == 0


async def test_enrollment_and_revocation_commit_under_synchronous_full(h: Harness) -> None:
    """The SQL the coordinator runs, traced: the enrollment's and the revocation's
    transactions commit with synchronous=FULL in effect; a state report's with NORMAL."""
    statements: list[str] = []
    _store(h)._db.set_trace_callback(statements.append)
    try:
        cam = await h.enroll("cam-1")
        r = await cam.client.post("/api/v1/device/state", json={"agent_version": "test"})
        assert r.status_code == 204, r.text
        r = await h.op.post("/api/v1/devices/cam-1/revoke")
        assert r.status_code == 200, r.text
    finally:
        _store(h)._db.set_trace_callback(None)
    level = "NORMAL"
    tx: list[str] = []
    commits: list[tuple[str, list[str]]] = []  # (synchronous at commit, the statements)
    for sql in statements:
        text = " ".join(sql.split())
        if text.upper().startswith("PRAGMA SYNCHRONOUS="):
            level = text.split("=", 1)[1].upper()
        elif text == "BEGIN IMMEDIATE":
            tx = []
        elif text == "COMMIT":
            commits.append((level, tx))
        else:
            tx.append(text)

    def level_of(marker: str) -> str:
        found = [lv for lv, body in commits if any(marker in s for s in body)]
        assert found, (marker, commits)
        return found[0]

    assert level_of("UPDATE tokens SET uses_left = uses_left - 1") == "FULL"  # enrollment
    assert level_of("SET state = 'revoked'") == "FULL"
    assert level_of("INSERT INTO tokens") == "FULL"
    assert level_of("UPDATE devices SET lan_endpoints") == "NORMAL"  # a report
