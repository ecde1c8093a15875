"""The apply engine (driver + pure core) against the fake engine, on an explicit clock: every
strategy, the update lock, health pass/fail/timeout and rollback, failed releases not retried,
idempotence, and a restart from every crash point."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from agent._apply_core import LOCK_FILE, Journal
from agent._apply_driver import Applier
from agent._crashpoints import ALL_CRASH_POINTS
from mesh.release import (
    ContainerSettings,
    HealthCheck,
    HealthKind,
    ReleaseError,
    RestartPolicy,
    UpdateStrategy,
    VerifiedRelease,
    encode_signed_pin,
    new_pin,
    sign_pin,
    verify_release,
)

from ._fake import Behaviour, Clock, FakeEngine, Releases

DEVICE = "cam-1"
APP = "web"
CONTRACT_KEYS = {"app", "running", "target", "state", "bytes_done", "bytes_total", "by_source",
                 "lock_since", "error", "failed", "retry_seen", "updated_at"}


class SimulatedCrash(BaseException):
    """Stands in for SIGKILL: nothing after the crash point runs."""


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.clock = Clock()
        self.engine = FakeEngine(self.clock)
        self.releases = Releases(tmp_path)
        self.data = tmp_path / "data"
        self.messages: list[str] = []
        self.crash_at: str | None = None
        self.passed: list[str] = []

    def crash(self, name: str) -> None:
        assert name in ALL_CRASH_POINTS
        self.passed.append(name)
        if name == self.crash_at:
            self.crash_at = None
            raise SimulatedCrash(name)

    def applier(self) -> Applier:
        return Applier(device=DEVICE, fleet="cams", data_dir=self.data, engine=self.engine,
                       store=self.releases.store, release_key_hex=self.releases.key_hex,
                       log=self.messages.append, crash=self.crash, clock=self.clock,
                       follow_logs=False)

    def release(self, signed: bytes) -> VerifiedRelease:
        return self.releases.verified(signed)

    def running(self) -> list[int]:
        return sorted(c.version for c in self.engine.running(DEVICE, APP))

    def journal(self) -> Journal:
        return Journal.from_json(json.loads(
            (self.data / "apply" / APP / "journal.json").read_text()))

    def lock(self) -> Path:
        return self.data / "locks" / APP / LOCK_FILE


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def run_until(w: World, a: Applier, pred: Callable[[], bool], limit_s: float = 600.0) -> None:
    """Rounds of the applier, the clock jumping to each round's wake-up time."""
    end = w.clock.t + limit_s
    while True:
        wake = a.reconcile_all()
        if pred():
            return
        assert w.clock.t < end, (a.statuses(), w.messages[-5:])
        w.clock.t = max(w.clock.t + 0.001, min(wake, end))


def state(a: Applier) -> str:
    s = a.status(APP)
    assert s is not None
    return s.state


def status_of(a: Applier) -> dict[str, Any]:
    """The app's status in its contract form (what the report carries)."""
    s = a.status(APP)
    assert s is not None
    return s.to_json()


def install(w: World, a: Applier, version: int, settings: ContainerSettings | None = None,
            **kw: bool) -> None:
    assert a.set_target(w.release(w.releases.make(version, settings)), ready=True, **kw)
    run_until(w, a, lambda: state(a) in ("running", "failed"))


# --------------------------------------------------------------------------- basics


def test_first_install_labels_name_lock_mount_and_status(world: World) -> None:
    a = world.applier()
    install(world, a, 1, ContainerSettings(environment=(("MODE", "x"),),
                                           restart_policy=RestartPolicy.ALWAYS))
    (c,) = world.engine.running(DEVICE, APP)
    assert c.spec.name == "fleetmesh-web" and c.spec.image == "fleetmesh/web:1"
    assert c.spec.labels == {"io.fleetmesh.device": DEVICE, "io.fleetmesh.app": APP,
                             "io.fleetmesh.release": "1"}
    assert (str(world.data / "locks" / APP), "/run/fleetmesh/lock", False) in c.spec.binds
    assert c.restart_policy == "always" and c.spec.environment == (("MODE", "x"),)
    assert c.spec.network == "host"
    status = status_of(a)
    assert set(status) == CONTRACT_KEYS
    assert status["running"] == 1 and status["target"] == 1 and status["state"] == "running"
    assert status["failed"] == [] and status["error"] is None
    assert world.journal() == Journal(current=1)


def test_applying_twice_changes_nothing(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    calls = list(world.engine.calls)
    for _ in range(3):
        a.reconcile_all()
        world.clock.advance(30)
    assert world.engine.calls == calls
    # A new process on the same data directory changes nothing either.
    b = world.applier()
    b.set_target(world.release(world.releases.make(1)), ready=True)
    b.reconcile_all()
    assert world.engine.calls == calls and state(b) == "running"


def test_bad_manifests_are_refused(world: World) -> None:
    a = world.applier()
    other = Releases(world.tmp / "other")
    assert not a.set_target(other.verified(other.make(1)), ready=True)  # another key
    dogs = Releases(world.tmp / "dogs", fleet="dogs")
    dogs.key = world.releases.key
    assert not a.set_target(dogs.verified(dogs.make(1)), ready=True)  # another fleet
    with pytest.raises(ReleaseError):  # garbage never becomes a release to pass on
        world.release(b"garbage")
    assert a.statuses() == [] and any("refused" in m for m in world.messages)


def test_engine_down_is_reported_and_retried(world: World) -> None:
    a = world.applier()
    a.set_target(world.release(world.releases.make(1)), ready=True)
    world.engine.down = True
    a.reconcile_all()
    status = status_of(a)
    assert "Cannot connect" in str(status["error"])
    world.engine.down = False
    run_until(world, a, lambda: state(a) == "running")
    assert world.running() == [1]


# --------------------------------------------------------------------------- strategies


def test_download_then_kill_waits_for_blobs_and_swaps(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    a.set_target(world.release(world.releases.make(2)), ready=False)
    a.reconcile_all()
    assert state(a) == "downloading" and world.running() == [1]
    a.set_target(world.release(world.releases.make(2)), ready=True)
    run_until(world, a, lambda: state(a) == "running" and world.running() == [2])
    (c,) = world.engine.containers_.values()
    assert c.spec.name == "fleetmesh-web" and c.version == 2
    assert world.engine.images.keys() == {"fleetmesh/web:1", "fleetmesh/web:2"}  # previous kept
    # The old one was stopped only after the new image was loaded.
    i_load = world.engine.calls.index(("load", "fleetmesh/web:2"))
    assert world.engine.calls.index(("stop", "1")) > i_load
    assert world.journal() == Journal(current=2, previous=1)


def test_missing_blob_means_downloading(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    # the lead was wrong: a blob is missing
    a.set_target(world.release(world.releases.make(2, store=False)), ready=True)
    a.reconcile_all()
    assert state(a) == "downloading" and world.running() == [1]
    assert any("not in the store" in m for m in world.messages)


def test_kill_then_download_stops_the_app_before_the_download(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    kill = ContainerSettings(update_strategy=UpdateStrategy.KILL_THEN_DOWNLOAD)
    a.set_target(world.release(world.releases.make(2, kill)), ready=False)
    a.reconcile_all()
    assert world.running() == [] and state(a) == "downloading"
    assert world.journal().phase == "starting"
    a.set_target(world.release(world.releases.make(2, kill)), ready=True)
    run_until(world, a, lambda: state(a) == "running")
    assert world.running() == [2]


def test_hand_over_runs_both_until_the_new_one_is_healthy(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    hand = ContainerSettings(update_strategy=UpdateStrategy.HAND_OVER,
                             health_check=HealthCheck(HealthKind.RUNNING, seconds=10.0))
    a.set_target(world.release(world.releases.make(2, hand)), ready=True)
    run_until(world, a, lambda: state(a) == "checking-health")
    assert world.running() == [1, 2]
    names = {c.spec.name for c in world.engine.containers_.values()}
    assert names == {"fleetmesh-web", "fleetmesh-web-next"}
    t0 = world.clock.t
    run_until(world, a, lambda: state(a) == "running")
    assert world.clock.t - t0 == pytest.approx(10.0, abs=0.01)
    assert world.running() == [2]
    assert [c.spec.name for c in world.engine.containers_.values()] == ["fleetmesh-web"]


def test_hand_over_timeout_stops_the_old_one_then_rolls_back(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    world.engine.behaviour[2] = Behaviour(health_cmd_code=1)
    hand = ContainerSettings(update_strategy=UpdateStrategy.HAND_OVER, hand_over_timeout_s=5.0,
                             health_timeout_s=20.0,
                             health_check=HealthCheck(HealthKind.CMD, ("check",)))
    a.set_target(world.release(world.releases.make(2, hand)), ready=True)
    run_until(world, a, lambda: state(a) == "checking-health")
    t0 = world.clock.t
    run_until(world, a, lambda: world.running() == [2])
    assert world.clock.t - t0 == pytest.approx(5.0, abs=0.01)  # old stopped at the hand-over end
    run_until(world, a, lambda: state(a) == "failed")
    assert world.clock.t - t0 == pytest.approx(20.0, abs=0.01)
    assert world.running() == [1]


# --------------------------------------------------------------------------- the update lock


def test_lock_holds_the_update_and_release_lets_it_through(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    world.lock().write_text("held by the app")
    a.set_target(world.release(world.releases.make(2)), ready=True)
    t_lock = world.clock.t
    run_until(world, a, lambda: state(a) == "waiting-lock")
    assert "fleetmesh/web:2" in world.engine.images  # downloaded and loaded meanwhile
    assert world.running() == [1]
    wake = a.reconcile_all()
    assert wake - world.clock.t == pytest.approx(1.0)  # the lock is polled every second
    world.clock.advance(3600)
    a.reconcile_all()
    status = status_of(a)
    assert status["lock_since"] == pytest.approx(t_lock, abs=1)
    assert state(a) == "waiting-lock" and world.running() == [1]
    world.lock().unlink()
    run_until(world, a, lambda: state(a) == "running", limit_s=30)
    assert world.running() == [2]
    status = status_of(a)
    assert status["lock_since"] is None


def test_force_goes_past_the_lock_and_never_removes_it(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    world.lock().write_text("")
    a.set_target(world.release(world.releases.make(2)), ready=True)
    run_until(world, a, lambda: state(a) == "waiting-lock")
    a.set_target(world.release(world.releases.make(2)), ready=True, force=True)
    run_until(world, a, lambda: state(a) == "running")
    assert world.running() == [2] and world.lock().exists()


def test_kill_then_download_respects_the_lock(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    world.lock().write_text("")
    kill = ContainerSettings(update_strategy=UpdateStrategy.KILL_THEN_DOWNLOAD)
    a.set_target(world.release(world.releases.make(2, kill)), ready=False)
    a.reconcile_all()
    assert state(a) == "waiting-lock" and world.running() == [1]


# --------------------------------------------------------------------------- health, rollback


def test_failing_health_command_rolls_back_and_is_not_retried(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    world.engine.behaviour[2] = Behaviour(health_cmd_code=1)
    bad = ContainerSettings(health_check=HealthCheck(HealthKind.CMD, ("check",), interval_s=1.0),
                            health_timeout_s=8.0)
    signed2 = world.releases.make(2, bad)
    a.set_target(world.release(signed2), ready=True)
    run_until(world, a, lambda: state(a) == "checking-health")
    t0 = world.clock.t
    run_until(world, a, lambda: state(a) == "failed")
    assert world.clock.t - t0 == pytest.approx(8.0, abs=0.01)  # exactly the health timeout
    assert world.running() == [1]
    status = status_of(a)
    assert status["failed"] == [2] and status["running"] == 1
    assert "release 2: not healthy within 8 s" in str(status["error"])
    assert "\n" not in str(status["error"])
    (c,) = world.engine.containers_.values()
    assert c.spec.name == "fleetmesh-web" and c.restart_policy == "unless-stopped"
    # Not retried: same target, even in a new process.
    calls = list(world.engine.calls)
    b = world.applier()
    b.set_target(world.release(signed2), ready=True)
    for _ in range(3):
        b.reconcile_all()
        world.clock.advance(60)
    assert world.engine.calls == calls and state(b) == "failed"
    # An operator retry: tried again (and fails again).
    b.set_target(world.release(signed2), ready=True, retry=1)
    run_until(world, b, lambda: state(b) == "checking-health")
    run_until(world, b, lambda: state(b) == "failed")
    status = status_of(b)
    assert status["retry_seen"] == 1 and status["failed"] == [2]
    # A newer release is applied.
    b.set_target(world.release(world.releases.make(3)), ready=True, retry=1)
    run_until(world, b, lambda: state(b) == "running")
    assert world.running() == [3]
    status = status_of(b)
    assert status["failed"] == [2] and status["error"] is None


def test_container_that_exits_fails_at_once(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    world.engine.behaviour[2] = Behaviour(exits=3)
    t0 = world.clock.t
    no_restart = ContainerSettings(restart_policy=RestartPolicy.NO)
    a.set_target(world.release(world.releases.make(2, no_restart)), ready=True)
    run_until(world, a, lambda: state(a) == "failed")
    assert world.clock.t == t0  # no waiting for the health timeout
    assert ("start", "2") in world.engine.calls
    status = status_of(a)
    assert "exited with code 3" in str(status["error"])
    assert world.running() == [1]


def test_crash_loop_times_out(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    world.engine.behaviour[2] = Behaviour(restarting=True)
    a.set_target(world.release(world.releases.make(2, ContainerSettings(
                     health_timeout_s=30.0))),
                 ready=True)
    run_until(world, a, lambda: state(a) == "checking-health")
    t0 = world.clock.t
    run_until(world, a, lambda: state(a) == "failed")
    assert world.clock.t - t0 == pytest.approx(30.0, abs=0.01)
    assert "running for 5 s" in str(status_of(a)["error"])


def test_image_healthcheck_is_used_without_a_manifest_check(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    world.engine.behaviour[2] = Behaviour(docker_health="unhealthy")
    a.set_target(world.release(world.releases.make(2, image_healthcheck=True)), ready=True)
    run_until(world, a, lambda: state(a) == "failed")
    assert "HEALTHCHECK reports unhealthy" in str(status_of(a)["error"])
    world.engine.behaviour[3] = Behaviour(docker_health="healthy")
    a.set_target(world.release(world.releases.make(3, image_healthcheck=True)), ready=True)
    run_until(world, a, lambda: state(a) == "running")
    assert world.running() == [3]


def test_release_that_does_not_verify_fails_without_stopping_the_app(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    a.set_target(world.release(world.releases.make(2, bad_config=True)), ready=True)
    run_until(world, a, lambda: state(a) == "failed")
    assert world.running() == [1] and ("stop", "1") not in world.engine.calls
    assert "do not match" in str(status_of(a)["error"])


def test_first_release_failing_leaves_nothing_running(world: World) -> None:
    a = world.applier()
    world.engine.behaviour[1] = Behaviour(exits=1)
    install(world, a, 1, ContainerSettings(restart_policy=RestartPolicy.NO))
    assert state(a) == "failed" and world.engine.containers_ == {}
    assert status_of(a)["running"] is None


def test_target_back_to_the_running_release_before_the_swap(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    kill = ContainerSettings(update_strategy=UpdateStrategy.KILL_THEN_DOWNLOAD)
    a.set_target(world.release(world.releases.make(2, kill)), ready=False)
    a.reconcile_all()
    assert world.running() == []
    a.set_target(world.release(world.releases.make(1)), ready=True)
    run_until(world, a, lambda: state(a) == "running")
    assert world.running() == [1] and status_of(a)["failed"] == []


# --------------------------------------------------------------------------- crash safety


SCENARIOS = {
    "download-then-kill": (ContainerSettings(health_check=HealthCheck(HealthKind.CMD, ("ok",))),
                           True),
    "kill-then-download": (ContainerSettings(update_strategy=UpdateStrategy.KILL_THEN_DOWNLOAD),
                           True),
    "hand-over": (ContainerSettings(update_strategy=UpdateStrategy.HAND_OVER,
                                    health_check=HealthCheck(HealthKind.CMD, ("ok",))), True),
    "rollback": (ContainerSettings(health_check=HealthCheck(HealthKind.CMD, ("ok",)),
                                   health_timeout_s=10.0), False),
}


_LOAD = ("before-load", "after-materialize", "after-load")
_SWAP = ("before-stop-old", "after-stop-old", "after-create-new", "after-start-new")
_COMMIT = ("before-commit", "after-commit-journal", "after-remove-old")
_ROLLBACK = ("before-rollback", "during-rollback", "after-rollback")
# The points each scenario passes (test_every_crash_point_is_passed_somewhere checks the union).
POINTS = {
    "download-then-kill": _LOAD + _SWAP + ("during-health",) + _COMMIT,
    "kill-then-download": ("before-stop-old", "after-stop-old") + _LOAD
    + ("after-create-new", "after-start-new") + _COMMIT,
    "hand-over": _LOAD + ("after-create-new", "after-start-new", "during-health") + _COMMIT,
    "rollback": _LOAD + _SWAP + ("during-health",) + _ROLLBACK,
}


def _points(name: str) -> tuple[str, ...]:
    return POINTS[name]


@pytest.mark.parametrize(("scenario", "point"), [
    (s, p) for s in SCENARIOS for p in _points(s)])
def test_killed_at_any_point_converges(world: World, scenario: str, point: str) -> None:
    settings, healthy = SCENARIOS[scenario]
    a = world.applier()
    install(world, a, 1)
    world.engine.behaviour[2] = Behaviour(health_cmd_code=0 if healthy else 1)
    signed = world.releases.make(2, settings)
    world.passed.clear()
    world.crash_at = point
    a.set_target(world.release(signed), ready=True)
    with pytest.raises(SimulatedCrash):
        run_until(world, a, lambda: state(a) in ("running", "failed")
                  and world.journal().phase == "idle")
    # A new process: same data directory, same engine; the target arrives again.
    b = world.applier()
    b.set_target(world.release(signed), ready=True)
    run_until(world, b, lambda: state(b) in ("running", "failed")
              and world.journal().phase == "idle")
    want = 2 if healthy else 1
    assert world.running() == [want], (scenario, point, world.engine.calls)
    assert [c.spec.name for c in world.engine.containers_.values()] == ["fleetmesh-web"]
    assert world.journal().current == want
    assert state(b) == ("running" if healthy else "failed")
    calls = list(world.engine.calls)
    b.reconcile_all()
    assert world.engine.calls == calls  # and now stable


def test_restart_without_a_target_still_converges(world: World) -> None:
    """The coordinator is down when the agent comes back: the journal and the stored manifest
    are enough to finish (or undo) the update."""
    a = world.applier()
    install(world, a, 1)
    world.engine.behaviour[2] = Behaviour()
    world.crash_at = "after-stop-old"
    a.set_target(world.release(world.releases.make(2)), ready=True)
    with pytest.raises(SimulatedCrash):
        run_until(world, a, lambda: False)
    b = world.applier()  # no set_target
    run_until(world, b, lambda: world.journal().phase == "idle" and world.running() == [2])


def test_every_crash_point_is_passed_somewhere(world: World) -> None:
    """The list the lab test walks names only points the code really passes."""
    seen: set[str] = set()
    for name, (settings, healthy) in SCENARIOS.items():
        w = World(world.tmp / f"w{len(seen)}-{healthy}-{settings.update_strategy.value}")
        a = w.applier()
        install(w, a, 1)
        w.passed.clear()
        w.engine.behaviour[2] = Behaviour(health_cmd_code=0 if healthy else 1)
        a.set_target(w.release(w.releases.make(2, settings)), ready=True)
        run_until(w, a, lambda a=a, w=w: state(a) in ("running", "failed")  # type: ignore[misc]
                  and w.journal().phase == "idle")
        assert set(w.passed) == set(POINTS[name]), name
        seen.update(w.passed)
    assert seen | {"after-blob-stored"} == set(ALL_CRASH_POINTS)


def test_restart_mid_download_waits_without_spinning(world: World) -> None:
    """kill-then-download stopped the app, then the agent restarted before the blobs were in:
    it reports downloading, tries the rebuild once per retry period, and finishes once the
    blobs are there."""
    a = world.applier()
    install(world, a, 1)
    kill = ContainerSettings(update_strategy=UpdateStrategy.KILL_THEN_DOWNLOAD)
    a.set_target(world.release(world.releases.make(2, kill, store=False)), ready=False)
    a.reconcile_all()
    assert world.running() == [] and world.journal().phase == "starting"
    b = world.applier()  # no target from the coordinator yet
    b.reconcile_all()
    b.reconcile_all()
    assert state(b) == "downloading"
    assert sum("not in the store" in m for m in world.messages) == 1
    world.releases.make(2, kill)  # the same release, its chunks now stored
    world.clock.advance(31)
    run_until(world, b, lambda: world.journal() == Journal(current=2, previous=1)
              and world.running() == [2])
    assert state(b) == "idle"  # committed; the coordinator has not named a target yet


def test_lost_journal_adopts_the_engine_state(world: World) -> None:
    no_restart = ContainerSettings(restart_policy=RestartPolicy.NO)
    a = world.applier()
    install(world, a, 1, no_restart)
    calls = list(world.engine.calls)
    (world.data / "apply" / APP / "journal.json").write_text("{broken")
    b = world.applier()
    b.set_target(world.release(world.releases.make(1, no_restart)), ready=True)
    b.reconcile_all()
    assert world.engine.calls == calls and state(b) == "running"
    # Stopped (the app exited under restart policy "no"), then the journal lost: kept.
    (c,) = world.engine.containers_.values()
    c.status = "exited"
    (world.data / "apply" / APP / "journal.json").unlink()
    b = world.applier()
    b.set_target(world.release(world.releases.make(1, no_restart)), ready=True)
    b.reconcile_all()
    assert list(world.engine.containers_) == [c.id] and world.engine.calls == calls
    assert status_of(b)["running"] is None
    assert any("corrupt" in m for m in world.messages)


def test_an_app_killed_by_hand_is_started_again_by_the_agent(world: World) -> None:
    """Under `unless-stopped` (the default) Docker leaves a `docker kill`ed container down;
    the agent starts that same container again and says so."""
    a = world.applier()
    install(world, a, 1)
    (c,) = world.engine.containers_.values()
    c.status = "exited"
    said = world.messages.count(f"{APP}: started release 1")
    a.reconcile_all()
    assert list(world.engine.containers_) == [c.id] and c.status == "running"
    assert state(a) == "running" and status_of(a)["running"] == 1
    assert world.messages.count(f"{APP}: started release 1") == said + 1, world.messages


def test_pinning_back_to_the_running_release_clears_the_error(world: World) -> None:
    a = world.applier()
    install(world, a, 1)
    world.engine.behaviour[2] = Behaviour(exits=1)
    signed1 = world.releases.make(1)
    no_restart = ContainerSettings(restart_policy=RestartPolicy.NO)
    a.set_target(world.release(world.releases.make(2, no_restart)), ready=True)
    run_until(world, a, lambda: state(a) == "failed")
    a.reconcile_all()
    assert state(a) == "failed"
    a.set_target(world.release(signed1), ready=True)
    a.reconcile_all()
    status = status_of(a)
    assert status["state"] == "running" and status["error"] is None
    assert status["failed"] == [2]


def test_goes_back_only_with_a_signed_pin(world: World) -> None:
    """An older target replaces the running release only with a pin the operator signed for
    this fleet, app, version and device (or every device): never on the coordinator's word."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    other = SigningKey(os.urandom(32))
    signed1 = world.releases.make(1)

    def pin(k: SigningKey, version: int = 1, device: str | None = None) -> bytes:
        return encode_signed_pin(sign_pin(new_pin("cams", APP, version, device,
                                                  now=time.time()), k))

    for bad in (None, b"zz", pin(other), pin(world.releases.key, version=3),
                pin(world.releases.key, device="cam-9")):
        assert not a.set_target(world.release(signed1), ready=True, pin=bad), bad
        assert status_of(a)["target"] == 2  # the running v2 stays the target
    assert sum("no valid signed pin" in m for m in world.messages) == 1  # logged once
    for good in (pin(world.releases.key), pin(world.releases.key, device=DEVICE)):
        assert a.set_target(world.release(signed1), ready=True, pin=good)
    run_until(world, a, lambda: world.running() == [1] and state(a) == "running")


def test_the_files_on_disk_keep_the_format_an_upgraded_agent_reads(world: World) -> None:
    """journal.json and releases/<version> (the signed manifest as received) are what earlier
    agents wrote and read: an agent upgraded in place picks its apps up from them."""
    a = world.applier()
    signed = world.releases.make(1)
    a.set_target(world.release(signed), ready=True)
    run_until(world, a, lambda: state(a) == "running")
    app_dir = world.data / "apply" / APP
    assert json.loads((app_dir / "journal.json").read_text()) == {
        "format": 1, "phase": "idle", "current": 1, "previous": None, "to": None,
        "health_since": None, "failed": [], "retry_seen": 0, "error": None}
    assert (app_dir / "releases" / "1").read_bytes() == signed
    calls = list(world.engine.calls)
    b = world.applier()  # restarted, no word from the coordinator yet
    b.reconcile_all()
    assert world.engine.calls == calls and status_of(b)["running"] == 1


# --------------------------------------------------------------------------- platforms


def test_release_without_the_device_platform_keeps_the_running_one(world: World) -> None:
    a = Applier(device=DEVICE, fleet="cams", data_dir=world.data, engine=world.engine,
                store=world.releases.store, release_key_hex=world.releases.key_hex,
                log=world.messages.append, crash=world.crash, clock=world.clock,
                follow_logs=False, platform="linux/amd64")
    install(world, a, 1)
    arm_only = verify_release(world.releases.make(2, arch="arm64"),
                              world.releases.key.verify_key, platform="linux/amd64")
    assert arm_only.manifest.layers == ()
    calls = len(world.engine.calls)
    assert a.set_target(arm_only, ready=True)
    run_until(world, a, lambda: state(a) == "no-platform")
    status = status_of(a)
    assert status["running"] == 1 and status["target"] == 2
    assert status["error"] == "release 2 has no image for linux/amd64 (has linux/arm64)"
    assert status["failed"] == []  # nothing failed: there is nothing to try
    for _ in range(3):
        a.reconcile_all()
        world.clock.advance(30)
    assert world.engine.calls[calls:] == [] and world.running() == [1]
    # the next release that has the platform goes through
    assert a.set_target(verify_release(world.releases.make(3), world.releases.key.verify_key,
                                       platform="linux/amd64"), ready=True)
    run_until(world, a, lambda: state(a) == "running" and world.running() == [3])
    assert status_of(a)["error"] is None
