"""Attack: a compromised coordinator replays an old signed release (say one with a known hole)
as a device's target, without an operator-signed pin. The applier refused a version older than
the *running* one, but "running" was the container that runs right now: while none runs (the
app crash-loops, it was stopped, or a kill-then-download update has stopped the old release and
is still fetching the new one) there was nothing to compare with, and the old release went
through. After an agent restart the same held for any app whose container was gone.

Expected: each app has a high-water mark, the newest version the device ever accepted, kept in
the agent's data directory (atomic write, directory fsynced) and seeded from the journal; a
target older than it is refused without a pin the operator signed for it, whatever the engine
shows, also after a restart; the committed release itself stays acceptable, a signed pin still
goes back, and the mark never moves down.

Real code path: the Applier (driver + pure `decide`) on real files in a data directory, real
signed releases, real blobs in a BlobStore; the Docker engine is the fake of tests/apply
(Docker is not the point here).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent._apply_driver import Applier
from mesh.release import (
    ContainerSettings,
    RestartPolicy,
    UpdateStrategy,
    encode_signed_pin,
    new_pin,
    sign_pin,
)
from tests.apply._fake import Behaviour
from tests.apply.test_applier_fake import APP, DEVICE, World, install, run_until, state


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def replay(w: World, a: Applier, version: int, pin: bytes | None = None) -> bool:
    """The coordinator names an old release (re-signed by nobody: the operator's own manifest,
    replayed), then the applier runs its rounds."""
    accepted = a.set_target(w.release(w.releases.make(version)), ready=True, pin=pin)
    run_until(w, a, lambda: True)
    for _ in range(5):
        a.reconcile_all()
        w.clock.advance(10.0)
    return accepted


def touched(w: World, since: int, version: int) -> list[tuple[str, ...]]:
    """Engine calls after the first `since` that load, create or start `version`."""
    return [c for c in w.engine.calls[since:]
            if (c[0] == "load" and f"fleetmesh/{APP}:{version}" in c[1:])
            or (c[0] in ("create", "start") and c[-1] == str(version))]


def test_no_replay_while_the_committed_release_crash_loops(world: World) -> None:
    """v2 is committed, then crash-loops (restart policy always: Docker shows "restarting").
    The coordinator replays v1: refused, v1 is never loaded, v2 stays committed."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    (c,) = [c for c in world.engine.containers_.values() if c.version == 2]
    c.status = "restarting"
    a.reconcile_all()  # the applier sees the crash loop
    before = len(world.engine.calls)
    assert not replay(world, a, 1)
    assert touched(world, before, 1) == []
    assert world.journal().current == 2 and world.journal().phase == "idle"
    assert all(c.version == 2 for c in world.engine.containers_.values())
    assert any("v1 refused" in m and "no valid signed pin" in m for m in world.messages)


def test_no_replay_while_the_app_is_stopped(world: World) -> None:
    """v2 is committed and the app exited (restart policy "no", or someone ran docker stop):
    no container runs. A replayed v1 is refused and nothing of v1 is created."""
    a = world.applier()
    no_restart = ContainerSettings(restart_policy=RestartPolicy.NO)
    install(world, a, 1, no_restart)
    install(world, a, 2, no_restart)
    for c in world.engine.containers_.values():
        c.status, c.exit_code = "exited", 0
    a.reconcile_all()  # the applier sees the app stopped
    before = len(world.engine.calls)
    assert not replay(world, a, 1)
    assert touched(world, before, 1) == []
    assert [c.version for c in world.engine.containers_.values()] == [2]
    assert world.journal().current == 2


def test_no_replay_in_the_kill_then_download_window(world: World) -> None:
    """v3 (kill-then-download) is accepted: v2 is stopped before v3's blobs are in. The
    coordinator switches the target to v1 in that window: refused, the update to v3 goes on and
    commits once its blobs are there."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    kill = ContainerSettings(update_strategy=UpdateStrategy.KILL_THEN_DOWNLOAD)
    v3 = world.release(world.releases.make(3, kill))
    assert a.set_target(v3, ready=False)
    a.reconcile_all()
    assert world.running() == [] and state(a) == "downloading"
    before = len(world.engine.calls)
    assert not a.set_target(world.release(world.releases.make(1)), ready=True)
    a.reconcile_all()
    assert world.journal().to == 3 and touched(world, before, 1) == []
    assert a.set_target(v3, ready=True)
    run_until(world, a, lambda: state(a) == "running")
    assert world.running() == [3]


def test_the_high_water_mark_survives_a_restart_and_a_lost_journal(world: World) -> None:
    """v3 was accepted (and failed its health check: v2 stays committed). The agent restarts
    with its journal lost and no container left (say the engine was reset): the persisted mark
    alone still refuses a replayed v2 and v1, and the file is what was written atomically."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    world.engine.behaviour[3] = Behaviour(exits=1)
    a.set_target(world.release(world.releases.make(
        3, ContainerSettings(restart_policy=RestartPolicy.NO))), ready=True)
    run_until(world, a, lambda: state(a) == "failed")
    app_dir = world.data / "apply" / APP
    mark = json.loads((app_dir / "high_water.json").read_text())
    assert mark == {"format": 1, "app": APP, "version": 3}
    assert not [p for p in app_dir.iterdir() if p.name.startswith(".tmp")]
    (app_dir / "journal.json").unlink()
    world.engine.containers_.clear()
    b = world.applier()
    before = len(world.engine.calls)
    assert not replay(world, b, 2)
    assert not replay(world, b, 1)
    assert touched(world, before, 2) == touched(world, before, 1) == []
    assert world.engine.containers_ == {}
    # the newest accepted release itself is no replay
    assert b.set_target(world.release(world.releases.make(3)), ready=True)


def test_a_signed_pin_goes_back_and_the_mark_never_moves_down(world: World) -> None:
    """With nothing running, the operator's pin for v1 still goes back to v1. The mark stays
    at v3: v2 without a pin is then refused (it is older than the newest accepted), v3 and
    newer need none."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    install(world, a, 3)
    for c in world.engine.containers_.values():
        c.status = "restarting"
    a.reconcile_all()
    pin = encode_signed_pin(sign_pin(new_pin("cams", APP, 1, DEVICE, now=time.time()),
                                     world.releases.key))
    assert a.set_target(world.release(world.releases.make(1)), ready=True, pin=pin)
    run_until(world, a, lambda: world.running() == [1] and state(a) == "running")
    assert not replay(world, a, 2)
    assert world.journal().current == 1
    assert a.set_target(world.release(world.releases.make(3)), ready=True)
    assert a.set_target(world.release(world.releases.make(4)), ready=True)
    run_until(world, a, lambda: state(a) == "running")
    assert world.running() == [4]
    assert json.loads((world.data / "apply" / APP / "high_water.json").read_text())[
        "version"] == 4
