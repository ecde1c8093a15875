"""Rollouts over the real HTTP API on a coordinator with an injected clock: held publishing,
phases advancing on the devices' reports, halt with the rollback pin, pause, resume,
promote, abort, the refusals (400, 403, 404, 409) and a restart of the coordinator."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from nacl.signing import SigningKey

from coordinator._server import CoordinatorConfig

from .conftest import Clock, Enrolled, Harness, running_harness
from .releasekit import build, pin
from .test_app_status import app_status, report, targets
from .test_releases import OCTETS, upload

ROLLOUT = "/api/v1/releases/fleet/app/{}/rollout"


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str | None:
    """The store the `coord` fixture would use (conftest.py): SQLite, or a PostgreSQL
    database of the session's server when FLEETMESH_TEST_STORE=postgresql."""
    if os.environ.get("FLEETMESH_TEST_STORE") == "postgresql":
        return str(request.getfixturevalue("pg_server").new_database())
    return None


@asynccontextmanager
async def clocked(tmp_path: Path, clock: Callable[[], float], store: str | None
                  ) -> AsyncIterator[Harness]:
    config = CoordinatorConfig(data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False,
                               batch_window=0.05, clock=clock, store=store)
    async with running_harness(config) as h:
        yield h


async def release(h: Harness, key: SigningKey, version: int, held: bool = False) -> None:
    built = build(key, version=version)
    await upload(h, built)
    r = await h.op.post("/api/v1/releases", content=built.signed, headers=OCTETS,
                        params={"rollout": "held"} if held else None)
    assert r.status_code == 201, r.text


async def set_key(h: Harness, key: SigningKey) -> None:
    r = await h.op.put("/api/v1/fleets/fleet/release-key",
                       json={"public_key": bytes(key.verify_key).hex()})
    assert r.status_code == 200, r.text


async def start(h: Harness, version: int, expect: int = 201, **body: Any) -> Any:
    r = await h.op.post(ROLLOUT.format(version), json=body)
    assert r.status_code == expect, r.text
    return r.json()


async def rollout(h: Harness, version: int) -> Any:
    r = await h.op.get(ROLLOUT.format(version))
    assert r.status_code == 200, r.text
    return r.json()


async def act(h: Harness, version: int, action: str, expect: int = 200) -> Any:
    r = await h.op.post(ROLLOUT.format(version) + "/" + action)
    assert r.status_code == expect, r.text
    return r.json()


async def running(dev: Enrolled, version: int) -> None:
    await report(dev, app_status(state="running", running=version, target=version))


async def plan(devs: dict[str, Enrolled]) -> dict[str, tuple[int, bool, str | None]]:
    """Each device's target for the app: (version, hold, pin)."""
    out = {}
    for name, dev in devs.items():
        t = (await targets(dev))["app"]
        out[name] = (t["version"], t["hold"], t["pin"])
    return out


async def test_held_publish_targets_nobody_then_phases_advance_to_done(
        tmp_path: Path, store: str | None) -> None:
    clock = Clock()
    async with clocked(tmp_path, clock, store) as h:
        key = SigningKey.generate()
        devs = {n: await h.enroll(n) for n in ("a", "b", "c")}
        await release(h, key, 1, held=True)
        for dev in devs.values():  # held, and nothing below it: no target at all
            assert await targets(dev) == {}
        await release(h, key, 2)  # published as today: everyone's target at once
        await release(h, key, 3, held=True)
        assert await plan(devs) == {n: (2, False, None) for n in devs}
        held = await rollout(h, 3)
        assert (held["state"], held["previous"], held["phases"]) == ("held", 2, [])

        body = await start(h, 3, phases="1,100%", soak=20)
        assert body["state"] == "running" and body["phase"] == 0 and body["previous"] == 2
        assert [p["devices"] for p in body["phases"]] == [["a"], ["b", "c"]]
        assert body["spec"]["phases"] == "1,100%" and body["spec"]["soak"] == 20.0
        # the canary applies; the others download ahead and hold
        assert await plan(devs) == {"a": (3, False, None), "b": (3, True, None),
                                    "c": (3, True, None)}

        await running(devs["a"], 3)
        clock.now += 19
        await running(devs["a"], 3)
        assert (await rollout(h, 3))["phase"] == 0  # its soak is not over
        clock.now += 1
        await running(devs["a"], 3)
        body = await rollout(h, 3)
        assert body["phase"] == 1 and body["phases"][0]["ended_at"] == clock.now
        assert body["phases"][0]["healthy"] == ["a"]
        assert await plan(devs) == {n: (3, False, None) for n in devs}

        status = (await h.op.get("/api/v1/releases/fleet/app/3/status")).json()
        assert status["rollout"] == {"state": "running", "phase": 1, "phases": 2,
                                     "reason": None}
        assert {r["device"]: r["phase"] for r in status["devices"]} == \
            {"a": 0, "b": 1, "c": 1}

        await running(devs["b"], 3)
        await running(devs["c"], 3)
        clock.now += 20
        await running(devs["c"], 3)
        body = await rollout(h, 3)
        assert body["state"] == "done"
        texts = [e["text"] for e in body["events"]]
        assert "phase 1 (1) started: a" in texts and "phase 2 (100%) started: b, c" in texts
        assert any(t.startswith("phase 2 (100%) ended") for t in texts)
        # done: the release is the default target, and a resume is not applicable
        await act(h, 3, "resume", expect=409)
        listed = (await h.op.get("/api/v1/rollouts", params={"fleet": "fleet"})).json()
        assert [(r["version"], r["state"]) for r in listed["rollouts"]] == \
            [(3, "done"), (1, "held")]


async def test_halt_sends_everyone_back_with_the_pin_and_skips_the_bad_release(
        tmp_path: Path, store: str | None) -> None:
    clock = Clock()
    async with clocked(tmp_path, clock, store) as h:
        key = SigningKey.generate()
        await set_key(h, key)
        devs = {n: await h.enroll(n) for n in ("a", "b", "c", "d")}
        await release(h, key, 1)
        await release(h, key, 2)
        await release(h, key, 3, held=True)
        back = pin(key, "fleet", "app", 2, now=clock.now).hex()
        await start(h, 3, phases="1,50%,100%", max_failures="0", rollback_pin=back)
        assert await plan(devs) == {"a": (3, False, None), "b": (3, True, None),
                                    "c": (3, True, None), "d": (3, True, None)}
        await report(devs["a"], app_status(state="failed", running=2, target=3, failed=[3],
                                           error="health check failed"))
        body = await rollout(h, 3)
        assert body["state"] == "halted"
        assert body["reason"] == ("phase 1: 1 failed of 1 (max-failures 0): a failed: "
                                  "health check failed")
        assert body["devices"]["a"]["state"] == "failed"
        # every device goes back to 2 with the pin; 3 is never the default again
        assert await plan(devs) == {n: (2, False, back) for n in devs}
        status = (await h.op.get("/api/v1/releases/fleet/app/3/status")).json()
        assert status["rollout"]["state"] == "halted"
        assert status["rollout"]["reason"] == body["reason"]
        await act(h, 3, "resume", expect=409)
        await act(h, 3, "abort", expect=409)

        # a new release above the bad one goes out as today; its previous skips the bad one
        await release(h, key, 4, held=True)
        assert (await rollout(h, 4))["previous"] == 2
        # starting the bad one again replaces its rollout and retries the device that failed
        again = await start(h, 3, phases="1,100%", rollback_pin=back)
        assert again["state"] == "running" and again["events"][0]["at"] == clock.now
        assert (await targets(devs["a"]))["app"]["retry"] == 1
        assert (await targets(devs["b"]))["app"]["retry"] == 0
        # its reports still name 3 failed until its agent acts on the retry: not a new failure
        await report(devs["a"], app_status(state="failed", running=2, target=3, failed=[3],
                                           error="health check failed"))
        body = await rollout(h, 3)
        assert body["state"] == "running" and body["devices"]["a"]["retrying"] is True


async def test_pause_resume_promote_abort(tmp_path: Path, store: str | None) -> None:
    clock = Clock()
    async with clocked(tmp_path, clock, store) as h:
        key = SigningKey.generate()
        devs = {n: await h.enroll(n) for n in ("a", "b", "c")}
        await release(h, key, 1)
        await release(h, key, 2, held=True)
        await start(h, 2, phases="1,2,100%", soak=10)
        assert (await act(h, 2, "pause"))["state"] == "paused"
        await act(h, 2, "pause", expect=409)
        await running(devs["a"], 2)
        clock.now += 10
        await running(devs["a"], 2)
        body = await rollout(h, 2)
        assert body["state"] == "paused" and body["phase"] == 0  # no advance while paused
        body = await act(h, 2, "resume")
        assert body["state"] == "running" and body["phase"] == 1  # soak over: advances
        assert body["phases"][1]["devices"] == ["b"]
        body = await act(h, 2, "promote")  # b has no outcome: skipped by the operator
        assert body["phase"] == 2 and body["phases"][1]["ended_at"] == clock.now
        assert (await plan(devs))["c"] == (2, False, None)
        body = await act(h, 2, "abort")
        assert (body["state"], body["reason"]) == ("aborted", "aborted by operator")
        assert await plan(devs) == {n: (1, False, None) for n in devs}  # no pin: none given
        await act(h, 2, "abort", expect=409)
        await act(h, 2, "promote", expect=409)


async def test_refusals(tmp_path: Path, store: str | None) -> None:
    clock = Clock()
    async with clocked(tmp_path, clock, store) as h:
        key, other = SigningKey.generate(), SigningKey.generate()
        await set_key(h, key)
        await h.enroll("a")
        await release(h, key, 1)
        await release(h, key, 2, held=True)
        await start(h, 9, expect=404, phases="1")
        r = await h.op.get(ROLLOUT.format(9))
        assert r.status_code == 404
        r = await h.op.get(ROLLOUT.format(1))
        assert r.status_code == 404 and "no rollout" in r.json()["error"]
        for body in ({}, {"phases": "0"}, {"phases": "1", "soak": "soon"},
                     {"phases": "1", "window": "25:00-26:00"}, {"phases": "1", "extra": 1},
                     {"phases": "1", "max_failures": "x"}, {"phases": "a"},
                     {"phases": "1", "rollback_pin": "zz"}, {"phases": "1", "rollback_pin": 5}):
            r = await h.op.post(ROLLOUT.format(2), json=body)
            assert r.status_code == 400, (body, r.text)
            assert "\n" not in r.json()["error"]
        r = await h.op.post(ROLLOUT.format(2), content=b"[1]")
        assert r.status_code == 400
        wrong_key = pin(other, "fleet", "app", 1, now=clock.now).hex()
        await start(h, 2, expect=403, phases="1", rollback_pin=wrong_key)
        wrong_version = pin(key, "fleet", "app", 2, now=clock.now).hex()
        r = await h.op.post(ROLLOUT.format(2), json={"phases": "1",
                                                     "rollback_pin": wrong_version})
        assert r.status_code == 400 and "previous" in r.json()["error"]
        expired = pin(key, "fleet", "app", 1, now=clock.now - 8 * 86400).hex()
        r = await h.op.post(ROLLOUT.format(2), json={"phases": "1", "rollback_pin": expired})
        assert r.status_code == 400 and "expired" in r.json()["error"]
        assert (await rollout(h, 2))["state"] == "held"  # nothing of that changed it

        await start(h, 2, phases="1,100%", rollback_pin=pin(key, "fleet", "app", 1,
                                                            now=clock.now).hex())
        await start(h, 2, expect=409, phases="1")  # running already
        await release(h, key, 3, held=True)
        r = await h.op.post(ROLLOUT.format(3), json={"phases": "1"})
        assert r.status_code == 409 and "version 2" in r.json()["error"]
        await act(h, 2, "restart", expect=404)
        r = await h.op.post("/api/v1/releases", content=b"x", headers=OCTETS,
                            params={"rollout": "later"})
        assert r.status_code == 400
        dev = await h.enroll("b")
        r = await dev.client.post(ROLLOUT.format(3), json={"phases": "1"})
        assert r.status_code in (401, 403)


async def test_windows_in_targets_and_a_rollout_survives_a_restart(
        tmp_path: Path, store: str | None) -> None:
    clock = Clock()
    key = SigningKey.generate()
    async with clocked(tmp_path, clock, store) as h:
        devs = {n: await h.enroll(n) for n in ("a", "b")}
        r = await h.op.patch("/api/v1/devices/b/tags", json={"set": {"window": "02:00-04:00"}})
        assert r.status_code == 200
        await release(h, key, 1)
        # a window tag holds the default target too; a tag that is no window holds nothing
        assert (await targets(devs["b"]))["app"]["window"] == "02:00-04:00"
        assert (await targets(devs["a"]))["app"]["window"] is None
        await h.op.patch("/api/v1/devices/a/tags", json={"set": {"window": "later"}})
        assert (await targets(devs["a"]))["app"]["window"] is None
        await release(h, key, 2, held=True)
        await start(h, 2, phases="1,100%", soak=5)
        await start(h, 2, expect=409, phases="1")
        await report(devs["b"], app_status(state="running", running=1, target=1),
                     app_status(app="other", state="idle"))
        body = await rollout(h, 2)
        assert body["phases"][0]["devices"] == ["a"]
        await running(devs["a"], 2)
        started_at = clock.now
        r = await devs["a"].client.post("/api/v1/device/state",
                                        json={"agent_version": "t", "timezone": "Europe/Oslo"})
        assert r.status_code == 204
    clock.now += 5
    async with clocked(tmp_path, clock, store) as h:  # the same data directory
        a = await h.enroll("a2")
        assert (await h.op.get("/api/v1/devices/a")).json()["timezone"] == "Europe/Oslo"
        body = await rollout(h, 2)
        assert body["state"] == "running"
        assert body["devices"]["a"]["running_since"] == started_at
        await running(a, 1)  # any report of the fleet steps it: a's soak is over
        body = await rollout(h, 2)
        assert body["phase"] == 1 and body["phases"][0]["healthy"] == ["a"]
        t = (await targets(a))["app"]
        assert (t["version"], t["hold"]) == (2, False)  # enrolled later: joins the last phase
        r = await h.op.get("/api/v1/releases/fleet/app/2/status")
        assert r.json()["rollout"]["phase"] == 1


def revision(h: Harness, name: str) -> int:
    """The `targets` revision the device's next peer map carries."""
    return h.coord.service.core.build(name).targets


async def test_deadline_fails_a_silent_canary_and_targets_move_with_the_rollout(
        tmp_path: Path, store: str | None) -> None:
    """What the driver runs at a rollout's next deadline (`step_fleet`), with no report at
    all; and every change of a device's target bumps its peer map's targets revision."""
    clock = Clock()
    async with clocked(tmp_path, clock, store) as h:
        key = SigningKey.generate()
        await set_key(h, key)
        devs = {n: await h.enroll(n) for n in ("a", "b")}
        await release(h, key, 1)
        await release(h, key, 2, held=True)
        before = {n: revision(h, n) for n in devs}
        await start(h, 2, phases="1,100%", deadline=60, soak=5,
                    rollback_pin=pin(key, "fleet", "app", 1, now=clock.now).hex())
        assert all(revision(h, n) > before[n] for n in devs)
        rollouts = h.coord.service.rollouts
        assert rollouts.step_fleet(None) == clock.now + 60  # a's deadline
        clock.now += 59
        assert rollouts.step_fleet(None) == clock.now + 1
        assert (await rollout(h, 2))["state"] == "running"
        before = {n: revision(h, n) for n in devs}
        clock.now += 1
        assert rollouts.step_fleet(None) is None  # halted: nothing more is due
        body = await rollout(h, 2)
        assert body["state"] == "halted"
        assert "a failed: did not report v2 running healthily within 60 s" in body["reason"]
        assert all(revision(h, n) > before[n] for n in devs)
        assert {n: (await targets(d))["app"]["version"] for n, d in devs.items()} == \
            {"a": 1, "b": 1}
        before = {n: revision(h, n) for n in devs}
        assert rollouts.step_fleet(None) is None
        assert {n: revision(h, n) for n in devs} == before  # nothing changed: no bump


async def test_the_driver_task_steps_a_rollout_at_its_deadline(tmp_path: Path,
                                                              store: str | None) -> None:
    """The coordinator's own task, on the wall clock: a canary that never reports fails at
    its deadline (one second here) and the rollout halts with nobody reporting anything."""
    async with clocked(tmp_path, time.time, store) as h:
        key = SigningKey.generate()
        await h.enroll("a")
        await release(h, key, 1)
        await release(h, key, 2, held=True)
        await start(h, 2, phases="1", deadline=1)
        with trio.fail_after(20):
            while (body := await rollout(h, 2))["state"] == "running":
                await trio.sleep(0.1)
        assert body["state"] == "halted"
        assert "a failed: did not report v2 running healthily within 1 s" in body["reason"]
