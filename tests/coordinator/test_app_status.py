"""Device app status, logs and the operator's actions over HTTP on a real coordinator: fake
devices report apps and upload logs; release status, targets with force and retry, log reads
with long polls, bounds, and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from nacl.signing import SigningKey

from coordinator._server import Coordinator, CoordinatorConfig
from coordinator._service import LOG_RATE, LOGS_WANTED_FOR
from mesh.control import (
    APP_STATES,
    MAX_APPS,
    MAX_ERROR_LEN,
    MAX_FAILED,
    MAX_LOG_BODY,
    MAX_LOG_LINE,
    MAX_LOG_LINES,
)

from .conftest import Enrolled, Harness, client_for, running_harness
from .releasekit import build
from .test_releases import publish, upload

STATUS_KEYS = {"device", "state", "bytes_done", "bytes_total", "running", "target", "online",
               "error", "lock_since", "lock_stale", "by_source", "updated_at", "phase"}


def app_status(app: str = "app", state: str = "idle", **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"app": app, "state": state, "running": None, "target": None,
                           "bytes_done": 0, "bytes_total": 0,
                           "by_source": {"lan": 0, "wan_peer": 0, "coordinator": 0},
                           "lock_since": None, "error": None, "failed": [], "retry_seen": 0,
                           "updated_at": time.time()}
    out.update(kw)
    return out


async def report(dev: Enrolled, *apps: dict[str, Any], expect: int = 204) -> httpx.Response:
    r = await dev.client.post("/api/v1/device/state",
                              json={"agent_version": "test", "apps": list(apps)})
    assert r.status_code == expect, r.text
    return r


async def releases(h: Harness, *versions: int, app: str = "app") -> None:
    key = SigningKey.generate()
    for v in versions:
        built = build(key, app=app, version=v)
        await upload(h, built)
        await publish(h, built)


async def set_target(h: Harness, version: int, device: str | None = None) -> None:
    r = await h.op.put("/api/v1/fleets/fleet/target",
                       json={"app": "app", "version": version, "device": device})
    assert r.status_code == 200, r.text


async def targets(dev: Enrolled) -> dict[str, dict[str, Any]]:
    r = await dev.client.get("/api/v1/device/target")
    assert r.status_code == 200, r.text
    return {t["app"]: t for t in r.json()["targets"]}


async def test_reports_feed_devices_list_and_show(h: Harness) -> None:
    a = await h.enroll("a")
    b = await h.enroll("b")
    await report(a, app_status("web", "running", running=3, target=3),
                 app_status("db", "idle", running=7, target=7))
    await report(b)  # an old agent: no apps
    r = await h.op.get("/api/v1/devices")
    devices = {d["name"]: d for d in r.json()["devices"]}
    assert devices["a"]["release"] == 7  # the first app by name: db
    assert [x["app"] for x in devices["a"]["apps"]] == ["db", "web"]
    assert devices["b"]["release"] is None and devices["b"]["apps"] == []
    # The newest status per app replaces the last; apps not in a report stay.
    await report(a, app_status("web", "downloading", running=3, target=4, bytes_done=5,
                               bytes_total=10, lock_since=time.time() - 7200))
    shown = (await h.op.get("/api/v1/devices/a")).json()
    web = next(x for x in shown["apps"] if x["app"] == "web")
    assert (web["state"], web["target"], web["bytes_done"], web["lock_stale"]) == (
        "downloading", 4, 5, True)
    assert next(x for x in shown["apps"] if x["app"] == "db")["running"] == 7


async def test_release_status_derives_each_state(h: Harness) -> None:
    names = ["run", "dl", "fail", "pinned", "newer", "quiet", "lock", "other"]
    devs = {n: await h.enroll(n) for n in names}
    await releases(h, 1)
    await set_target(h, 1, "pinned")
    await set_target(h, 1, "other")
    await releases(h, 2)
    await set_target(h, 2)
    await releases(h, 3)
    await set_target(h, 3, "newer")
    await report(devs["run"], app_status(state="running", running=2, target=2, bytes_done=9,
                                         bytes_total=9, by_source={"lan": 9}))
    await report(devs["dl"], app_status(state="downloading", running=1, target=2,
                                        bytes_done=3, bytes_total=9,
                                        by_source={"lan": 1, "wan_peer": 0,
                                                   "coordinator": 2}))
    await report(devs["fail"], app_status(state="failed", running=1, target=2, failed=[2],
                                          error="health check failed"))
    # pinned back to 1 after failing 2: still failed for 2
    await report(devs["pinned"], app_status(state="idle", running=1, target=1, failed=[2]))
    await report(devs["newer"], app_status(state="idle", running=3, target=3))
    await report(devs["lock"], app_status(state="waiting-lock", running=1, target=2,
                                          lock_since=time.time() - 10))
    await report(devs["other"], app_status(state="idle", running=1, target=1))
    # "quiet" never reported: targeted, pending
    r = await h.op.get("/api/v1/releases/fleet/app/2/status")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["fleet"], body["app"], body["version"]) == ("fleet", "app", 2)
    assert body["rollout"] is None  # published as today: no rollout, no phases
    rows = {d["device"]: d for d in body["devices"]}
    assert {n: d["state"] for n, d in rows.items()} == {
        "run": "running", "dl": "downloading", "fail": "failed", "pinned": "failed",
        "newer": "superseded", "quiet": "pending", "lock": "waiting-lock"}
    assert all(set(d) == STATUS_KEYS and d["phase"] is None for d in rows.values())
    assert (rows["dl"]["bytes_done"], rows["dl"]["bytes_total"]) == (3, 9)
    assert rows["dl"]["by_source"] == {"lan": 1, "wan_peer": 0, "coordinator": 2}
    assert rows["fail"]["error"] == "health check failed"
    assert rows["pinned"]["target"] == 1 and rows["pinned"]["running"] == 1
    assert rows["quiet"]["online"] is False and rows["run"]["online"] is True
    assert rows["lock"]["lock_since"] is not None and rows["lock"]["lock_stale"] is False
    assert body["summary"] == {"total": 7, "running": 1, "failed": 2, "downloading": 1,
                               "waiting": 1, "pending": 1, "superseded": 1,
                               "no_platform": 0}
    r = await h.op.get("/api/v1/releases/fleet/app/9/status")
    assert r.status_code == 404


async def test_force_and_retry_reach_the_targets_and_force_clears(h: Harness) -> None:
    await releases(h, 1, 2)
    a, b, c = await h.enroll("a"), await h.enroll("b"), await h.enroll("c")
    r = await h.op.post("/api/v1/devices/a/update", json={"app": "ghost", "force": True})
    assert r.status_code == 409 and "no target" in r.json()["error"]
    # with no target set, the fleet's newest release is every device's target
    assert (await targets(a))["app"]["version"] == 2
    await set_target(h, 2)
    assert (await targets(a))["app"] == {"app": "app", "version": 2, "pin": None,
                                         "force": False, "retry": 0, "hold": False,
                                         "window": None}
    r = await h.op.post("/api/v1/devices/a/update", json={"app": "app", "force": True})
    assert r.json() == {"device": "a", "app": "app", "version": 2, "force": True}
    assert (await targets(a))["app"]["force"] is True
    assert (await targets(b))["app"]["force"] is False
    # Still on 1: the force stays; running 2: it goes by itself.
    await report(a, app_status(state="waiting-lock", running=1, target=2))
    assert (await targets(a))["app"]["force"] is True
    await report(a, app_status(state="running", running=2, target=2))
    assert (await targets(a))["app"]["force"] is False
    # The operator can also take a force back.
    await h.op.post("/api/v1/devices/b/update", json={"app": "app", "force": True})
    r = await h.op.post("/api/v1/devices/b/update", json={"app": "app", "force": False})
    assert r.json()["force"] is False and (await targets(b))["app"]["force"] is False

    r = await h.op.post("/api/v1/devices/c/retry", json={"app": "app"})
    assert r.json() == {"device": "c", "app": "app", "retry": 1}
    assert (await targets(c))["app"]["retry"] == 1
    # Release retry: only the devices that failed it.
    await report(b, app_status(state="failed", running=1, target=2, failed=[2]))
    await report(c, app_status(state="idle", running=1, target=1, failed=[2]))
    r = await h.op.post("/api/v1/releases/fleet/app/2/retry")
    assert r.status_code == 200, r.text
    assert r.json() == {"fleet": "fleet", "app": "app", "version": 2,
                        "devices": [{"device": "b", "retry": 1}, {"device": "c", "retry": 2}]}
    assert [(await targets(d))["app"]["retry"] for d in (a, b, c)] == [0, 1, 2]
    r = await h.op.post("/api/v1/releases/fleet/app/1/retry")
    assert r.json()["devices"] == []


async def test_targets_changed_hook_fires_for_force_and_retry(h: Harness) -> None:
    await releases(h, 1)
    await h.enroll("a")
    await set_target(h, 1)
    seen: list[tuple[str, str | None]] = []
    registry = h.coord.service.releases
    original = registry.targets_changed
    registry.targets_changed = lambda fleet, device: seen.append((fleet, device))
    try:
        await h.op.post("/api/v1/devices/a/update", json={"app": "app", "force": True})
        await h.op.post("/api/v1/devices/a/retry", json={"app": "app"})
    finally:
        registry.targets_changed = original
    assert seen == [("fleet", "a"), ("fleet", "a")]


def log_line(i: int, app: str = "app", stream: str = "stdout") -> dict[str, Any]:
    return {"ts": 1_700_000_000.0 + i, "app": app, "stream": stream, "line": f"line {i}"}


async def upload_logs(dev: Enrolled, lines: list[dict[str, Any]], dropped: int = 0,
                      expect: int = 204) -> httpx.Response:
    r = await dev.client.post("/api/v1/device/logs", json={"lines": lines, "dropped": dropped})
    assert r.status_code == expect, r.text
    return r


async def test_logs_seq_after_limit_tail_and_dropped(h: Harness) -> None:
    a = await h.enroll("a")
    empty = (await h.op.get("/api/v1/devices/a/logs")).json()
    assert empty == {"lines": [], "next": 0, "dropped": 0}
    await upload_logs(a, [log_line(i) for i in range(1, 4)], dropped=2)
    await upload_logs(a, [log_line(4, stream="stderr")], dropped=5)
    body = (await h.op.get("/api/v1/devices/a/logs", params={"limit": 3})).json()
    assert [x["seq"] for x in body["lines"]] == [1, 2, 3]
    assert body["lines"][0] == {"seq": 1, "ts": 1_700_000_001.0, "app": "app",
                                "stream": "stdout", "line": "line 1"}
    assert body["next"] == 3 and body["dropped"] == 7
    body = (await h.op.get("/api/v1/devices/a/logs", params={"after": 3})).json()
    assert [(x["seq"], x["stream"]) for x in body["lines"]] == [(4, "stderr")]
    assert body["next"] == 4
    body = (await h.op.get("/api/v1/devices/a/logs", params={"after": 4})).json()
    assert body["lines"] == [] and body["next"] == 4
    body = (await h.op.get("/api/v1/devices/a/logs", params={"tail": 2})).json()
    assert [x["seq"] for x in body["lines"]] == [3, 4] and body["next"] == 4
    # another device sees none of it
    await h.enroll("b")
    assert (await h.op.get("/api/v1/devices/b/logs")).json()["lines"] == []


async def test_logs_keep_the_newest_5000(tmp_path: Path) -> None:
    # The uploads are spaced (by the coordinator's clock) so that the per-device log rate
    # limit (docs/security.md) takes none of them: this test is about pruning.
    now = [1_800_000_000.0]
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05,
            clock=lambda: now[0])) as h:
        a = await h.enroll("a")
        for batch in range(6):
            now[0] += MAX_LOG_LINES / LOG_RATE
            await upload_logs(a, [log_line(batch * 1000 + i) for i in range(1, 1001)])
        body = (await h.op.get("/api/v1/devices/a/logs", params={"limit": 5000})).json()
        seqs = [x["seq"] for x in body["lines"]]
        assert len(seqs) == 5000 and seqs[0] == 1001 and seqs[-1] == 6000
        assert body["dropped"] == 0
        # a follower that fell behind the pruning resumes at the oldest line kept
        body = (await h.op.get("/api/v1/devices/a/logs", params={"after": 10, "limit": 1})
                ).json()
        assert body["lines"][0]["seq"] == 1001


async def test_logs_long_poll_answers_when_lines_arrive(h: Harness) -> None:
    a = await h.enroll("a")
    got: dict[str, Any] = {}

    async def follow() -> None:
        r = await h.op.get("/api/v1/devices/a/logs", params={"after": 0, "wait": 20})
        got.update(r.json())

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await trio.sleep(0.3)
            assert not got  # still waiting
            await upload_logs(a, [log_line(1)])
    assert [x["line"] for x in got["lines"]] == ["line 1"] and got["next"] == 1
    # nothing new: an empty answer after the wait
    r = await h.op.get("/api/v1/devices/a/logs", params={"after": 1, "wait": 0.2})
    assert r.json()["lines"] == []


async def test_stale_lock_follows_the_configured_limit(tmp_path: Path) -> None:
    config = CoordinatorConfig(data_dir=tmp_path / "c", listen="127.0.0.1:0", hub=False,
                               batch_window=0.05, lock_stale_after=5)
    async with Coordinator(config) as coord, \
            client_for(coord, coord.operator_key) as op, client_for(coord) as anon:
        h = Harness(coord, op, anon)
        try:
            await releases(h, 1)
            a = await h.enroll("a")
            await set_target(h, 1)
            await report(a, app_status(state="waiting-lock", running=None, target=1,
                                       lock_since=time.time() - 60))
            row = (await op.get("/api/v1/releases/fleet/app/1/status")).json()["devices"][0]
            assert row["lock_stale"] is True and row["state"] == "waiting-lock"
            shown = (await op.get("/api/v1/devices/a")).json()
            assert shown["apps"][0]["lock_stale"] is True
        finally:
            await h.aclose()


async def test_bad_reports_and_uploads_are_refused(h: Harness) -> None:
    a = await h.enroll("a")
    bad_apps: list[Any] = [
        [app_status(state="sleeping")],
        [app_status(app="bad name")],
        [app_status(app="")],
        [app_status(f"app{i}") for i in range(MAX_APPS + 1)],
        [app_status(), app_status()],
        [app_status(error="x" * (MAX_ERROR_LEN + 1))],
        [app_status(failed=list(range(1, MAX_FAILED + 2)))],
        [app_status(failed=[0])],
        [app_status(bytes_done=-1)],
        [app_status(running=0)],
        [app_status(running=True)],
        [app_status(lock_since="yesterday")],
        [app_status(updated_at=1e300)],
        [app_status(by_source={"lan": -5})],
        [app_status(by_source=[1, 2, 3])],
        ["idle"],
        {"app": "x"},
    ]
    for apps in bad_apps:
        r = await a.client.post("/api/v1/device/state", json={"apps": apps})
        assert r.status_code == 400, (apps, r.text)
        assert "\n" not in r.json()["error"]
    assert {s for s in APP_STATES} >= {"waiting-lock", "checking-health", "rolling-back"}
    await report(a, *(app_status(f"app{i}") for i in range(MAX_APPS)))  # the limit is fine
    r = await report(a, app_status(error="two\nlines   here"))
    shown = (await h.op.get("/api/v1/devices/a")).json()
    assert next(x for x in shown["apps"] if x["app"] == "app")["error"] == "two lines here"

    bad_logs: list[Any] = [
        {"lines": [log_line(1) | {"line": "x" * (MAX_LOG_LINE + 1)}]},
        {"lines": [log_line(i) for i in range(MAX_LOG_LINES + 1)]},
        {"lines": [log_line(1) | {"stream": "stdin"}]},
        {"lines": [log_line(1) | {"app": "../x"}]},
        {"lines": [log_line(1) | {"ts": -1}]},
        {"lines": [{"line": "x"}]},
        {"lines": "x"},
        {"dropped": 1},
        {"lines": [], "dropped": -1},
        [],
    ]
    for body in bad_logs:
        r = await a.client.post("/api/v1/device/logs", json=body)
        assert r.status_code == 400, (str(body)[:100], r.text)
    # valid lines, just too many bytes together (escapes count)
    big = json.dumps({"lines": [log_line(1) | {"line": "\t" * MAX_LOG_LINE}] * 130})
    assert MAX_LOG_BODY < len(big.encode()) < 2 * MAX_LOG_BODY
    r = await a.client.post("/api/v1/device/logs", content=big,
                            headers={"content-type": "application/json"})
    assert r.status_code == 413
    # the operator key is not a device credential, nor the device's an operator key
    r = await h.op.post("/api/v1/device/logs", json={"lines": []})
    assert r.status_code == 403
    for path in ("/api/v1/devices/a/logs", "/api/v1/releases/fleet/app/1/status"):
        assert (await a.client.get(path)).status_code == 403
    # a lone surrogate is stored as '?', not a 500
    r = await a.client.post("/api/v1/device/logs", content=json.dumps(
        {"lines": [log_line(1) | {"line": "bad \ud800 text"}]}),
        headers={"content-type": "application/json"})
    assert r.status_code == 204, r.text
    assert (await h.op.get("/api/v1/devices/a/logs")).json()["lines"][0]["line"] == "bad ? text"


async def test_bad_operator_requests_are_refused(h: Harness) -> None:
    await releases(h, 1)
    await h.enroll("a")
    for params in ({"after": "-1"}, {"after": "x"}, {"limit": "0"}, {"limit": "5001"},
                   {"wait": "31"}, {"wait": "nan"}, {"wait": "-1"}, {"tail": "0"},
                   {"tail": "2", "after": "1"}, {"after": "9" * 30}):
        r = await h.op.get("/api/v1/devices/a/logs", params=params)
        assert r.status_code == 400, (params, r.text)
    assert (await h.op.get("/api/v1/devices/nobody/logs")).status_code == 404
    for body in ({}, {"app": "app"}, {"app": "app", "force": "yes"}, {"app": "a b",
                                                                      "force": True}, []):
        r = await h.op.post("/api/v1/devices/a/update", json=body)
        assert r.status_code == 400, (body, r.text)
    r = await h.op.post("/api/v1/devices/nobody/update", json={"app": "app", "force": True})
    assert r.status_code == 404
    for body in ({}, {"app": 3}, "app"):
        r = await h.op.post("/api/v1/devices/a/retry", json=body)
        assert r.status_code == 400, (body, r.text)
    assert (await h.op.post("/api/v1/devices/nobody/retry",
                            json={"app": "app"})).status_code == 404
    for path in ("/api/v1/releases/fleet/app/-1/status", "/api/v1/releases/fleet/app/x/status",
                 "/api/v1/releases/FLEET/app/1/status"):
        assert (await h.op.get(path)).status_code == 400, path
    assert (await h.op.post("/api/v1/releases/fleet/app/x/retry")).status_code == 400
    assert (await h.op.post("/api/v1/releases/fleet/app/7/retry")).status_code == 404


async def test_reading_a_devices_logs_asks_it_for_them_through_its_peer_map(
        h: Harness) -> None:
    """Issue 14: devices upload app logs only while someone reads them. A read (tail, follow,
    the dashboard's view) sets `logs_wanted_until` in that device's peer map, LOGS_WANTED_FOR
    ahead, answering its parked long poll; reads while more than half of that is left push
    nothing more; one past that renews it. Other devices hear nothing."""
    a, b = await h.enroll("a"), await h.enroll("b")
    await trio.sleep(0.3)  # past the enrollment batch
    ma, mb = [(await d.client.get("/api/v1/device/peermap", params={"version": 0})).json()
              for d in (a, b)]
    assert ma["logs_wanted_until"] == 0 and mb["logs_wanted_until"] == 0
    got: dict[str, Any] = {}

    async def poll(name: str, dev: Enrolled, version: int, wait: float) -> None:
        r = await dev.client.get("/api/v1/device/peermap",
                                 params={"version": version, "wait": wait})
        got[name] = r.json() if r.status_code == 200 else r.status_code

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll, "a", a, ma["version"], 1800)
            nursery.start_soon(poll, "b", b, mb["version"], 1)
            await trio.sleep(0.2)  # both parked
            before = time.time()
            assert (await h.op.get("/api/v1/devices/a/logs", params={"tail": 10})
                    ).status_code == 200
    until = got["a"]["logs_wanted_until"]
    assert before + LOGS_WANTED_FOR <= until <= time.time() + LOGS_WANTED_FOR
    assert got["b"] == 304
    # a follower's next reads: no push for each
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll, "a", a, got["a"]["version"], 1)
            await trio.sleep(0.2)
            await h.op.get("/api/v1/devices/a/logs", params={"after": 0, "wait": 0})
    assert got["a"] == 304
    # past half of it, a read renews it
    version = (await a.client.get("/api/v1/device/peermap", params={"version": 0})).json()
    settings = h.coord.service.settings
    real = settings.clock
    object.__setattr__(settings, "clock", lambda: real() + LOGS_WANTED_FOR / 2 + 1)
    try:
        await h.op.get("/api/v1/devices/a/logs", params={"tail": 1})
    finally:
        object.__setattr__(settings, "clock", real)
    with trio.fail_after(10):
        r = await a.client.get("/api/v1/device/peermap",
                               params={"version": version["version"], "wait": 5})
    assert r.status_code == 200
    assert r.json()["logs_wanted_until"] >= until + LOGS_WANTED_FOR / 2
