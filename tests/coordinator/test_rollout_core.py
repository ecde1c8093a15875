"""The rollout decision core (coordinator._rollout), at exact times: phases advance after their
soak, halt on failures, pause/resume/abort/promote, late devices, spreading, each device's
target. Reports are given as DeviceViews; time is a number the test chooses."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator._rollout import (
    DeviceView,
    Member,
    Rollout,
    RolloutConflict,
    Target,
    abort,
    admit,
    assign_phases,
    held,
    next_deadline,
    pause,
    promote,
    resume,
    start,
    step,
    target_for,
)
from mesh.control import AppStatus
from mesh.rollout import RolloutSpec, RolloutSpecError, cumulative_total

V = 2  # the release rolled out
P = 1  # the previous release


def spec(phases: str, **kw: object) -> RolloutSpec:
    return RolloutSpec.from_json({"phases": phases, **kw})


def fleet(sites: int = 3, per_site: int = 3, nat: str | None = "cone") -> list[Member]:
    """Devices lan{s}-{i}, site s, all enrolled at time 0."""
    return [Member(f"lan{s}-{i}", {}, f"203.0.113.{s}", nat, 0.0)
            for s in range(1, sites + 1) for i in range(1, per_site + 1)]


def runs(name: str, version: int = V) -> DeviceView:
    return DeviceView(name, "running", version, version, (), None, 0.0)


def rolled_back(name: str, error: str = "health check failed: exit 1") -> DeviceView:
    """The agent applied V, its health check failed, it went back to P."""
    return DeviceView(name, "running", P, V, (V,), error, 0.0)


class Fleet:
    """The newest report of every device, as the coordinator would keep them."""

    def __init__(self) -> None:
        self.views: dict[str, DeviceView] = {}

    def report(self, *views: DeviceView) -> None:
        for v in views:
            self.views[v.name] = v


def targets(rollout: Rollout, names: Iterable[str]) -> dict[str, Target]:
    return {n: target_for(rollout, n, None) for n in names}


# --------------------------------------------------------------------------- advancing


def test_advances_through_1_50_100_with_soak() -> None:
    members = fleet()
    s = spec("1,50%,100%", soak=20)
    r = start("f", "web", V, P, s, members, now=0.0)
    assert r.state == "running" and r.phase == 0
    p1, p2, p3 = (ph.devices for ph in r.phases)
    assert (len(p1), len(p2), len(p3)) == (1, 4, 4)  # 1, then ceil(50 % of 9) = 5, then 9
    assert next_deadline(r, s, 0.0) == 3600.0  # nobody reported: the deadline

    devices = Fleet()
    r = step(r, s, devices.views, 0.0)
    assert r.state == "running" and r.phase == 0
    devices.report(runs(p1[0]))
    r = step(r, s, devices.views, 5.0)
    assert r.devices[p1[0]].state == "running" and r.devices[p1[0]].running_since == 5.0
    assert next_deadline(r, s, 5.0) == 25.0
    r = step(r, s, devices.views, 24.9)
    assert r.phase == 0

    # Called late (40 s), the next phase still starts when the soak ended (25 s).
    r = step(r, s, devices.views, 40.0)
    assert r.phase == 1
    assert r.phases[0].ended_at == 25.0 and r.phases[1].started_at == 25.0
    assert r.phases[0].healthy == p1 and r.phases[0].failed == ()
    assert all(r.devices[n].state == "updating" for n in p2)
    assert all(r.devices[n].state == "pending" for n in p3)

    for at, name in zip((41.0, 42.0, 43.0, 50.0), p2, strict=True):
        devices.report(runs(name))
        r = step(r, s, devices.views, at)
    assert r.phase == 1 and next_deadline(r, s, 50.0) == 61.0
    r = step(r, s, devices.views, 70.0)
    assert r.phase == 2 and r.phases[1].ended_at == 70.0 and r.phases[2].started_at == 70.0

    devices.report(*(runs(n) for n in p3))
    r = step(r, s, devices.views, 71.0)
    r = step(r, s, devices.views, 91.0)
    assert r.state == "done" and r.phase == 2
    assert r.phases[2].ended_at == 91.0
    assert next_deadline(r, s, 91.0) is None
    assert step(r, s, {}, 5000.0) == r  # done is final: no deadline failures afterwards
    assert [(at, text) for at, text in r.events if "phase" in text or "done" in text] == [
        (0.0, "rollout of v2 started: phases 1,50%,100%, 9 devices"),
        (0.0, f"phase 1 (1) started: {p1[0]}"),
        (25.0, "phase 1 (1) ended: 1 healthy, 0 failed"),
        (25.0, f"phase 2 (50%) started: {', '.join(p2)}"),
        (70.0, "phase 2 (50%) ended: 4 healthy, 0 failed"),
        (70.0, f"phase 3 (100%) started: {', '.join(p3)}"),
        (91.0, "phase 3 (100%) ended: 4 healthy, 0 failed"),
        (91.0, "done: v2 on 9 devices"),
    ]


def test_rollout_json_is_the_api_shape_and_reads_back() -> None:
    s = spec("1,100%", soak=20)
    r = start("f", "web", V, P, s, fleet(1, 2), now=1.0)
    r = step(r, s, {"lan1-1": rolled_back("lan1-1", "health check …")}, 2.0)
    out = r.to_json()
    assert out == {
        "fleet": "f", "app": "web", "version": 2, "previous": 1, "state": "halted",
        "reason": "phase 1: 1 failed of 1 (max-failures 0): lan1-1 failed: health check …",
        "phase": 0, "spec": s.to_json(),
        "phases": [{"index": 0, "spec": "1", "devices": ["lan1-1"], "started_at": 1.0,
                    "ended_at": 2.0, "failed": ["lan1-1"], "healthy": []},
                   {"index": 1, "spec": "100%", "devices": ["lan1-2"], "started_at": None,
                    "ended_at": None, "failed": [], "healthy": []}],
        "devices": {"lan1-1": {"phase": 0, "state": "failed", "running_since": None,
                               "error": "health check …", "retrying": False,
                               "deadline_from": None},
                    "lan1-2": {"phase": 1, "state": "pending", "running_since": None,
                               "error": None, "retrying": False,
                               "deadline_from": None}},
        "created_at": 1.0, "updated_at": 2.0,
        "events": [{"at": 1.0, "text": "rollout of v2 started: phases 1,100%, 2 devices"},
                   {"at": 1.0, "text": "phase 1 (1) started: lan1-1"},
                   {"at": 2.0, "text": "lan1-1 failed: health check …"},
                   {"at": 2.0, "text": "phase 1 (1) halted: 0 healthy, 1 failed"},
                   {"at": 2.0, "text": "halted: phase 1: 1 failed of 1 (max-failures 0): "
                                       "lan1-1 failed: health check …"}],
    }
    assert Rollout.from_json(out) == r
    h = held("f", "web", V, P, 1.0)
    assert Rollout.from_json(h.to_json()) == h and h.to_json()["spec"] is None
    with pytest.raises(ValueError, match="not a stored rollout"):
        Rollout.from_json({"fleet": "f"})
    broken = r.to_json()
    broken["devices"]["lan1-1"]["state"] = "bored"
    with pytest.raises(ValueError, match="bad state"):
        Rollout.from_json(broken)


def test_a_device_running_a_newer_version_counts_healthy() -> None:
    s = spec("1", soak=10)
    r = start("f", "web", V, P, s, fleet(1, 1), now=0.0)
    r = step(r, s, {"lan1-1": runs("lan1-1", V + 1)}, 1.0)
    r = step(r, s, {"lan1-1": runs("lan1-1", V + 1)}, 11.0)
    assert r.state == "done"


def test_a_device_that_stops_running_starts_its_soak_again() -> None:
    s = spec("1", soak=10)
    r = start("f", "web", V, P, s, fleet(1, 1), now=0.0)
    r = step(r, s, {"lan1-1": runs("lan1-1")}, 1.0)
    restarting = DeviceView("lan1-1", "starting", P, V, (), None, 5.0)
    r = step(r, s, {"lan1-1": restarting}, 5.0)
    assert r.devices["lan1-1"].state == "updating" and r.devices["lan1-1"].running_since is None
    r = step(r, s, {"lan1-1": runs("lan1-1")}, 6.0)
    r = step(r, s, {"lan1-1": runs("lan1-1")}, 15.9)
    assert r.state == "running"
    r = step(r, s, {"lan1-1": runs("lan1-1")}, 16.0)
    assert r.state == "done"


def test_device_view_from_an_app_status() -> None:
    status = AppStatus("web", "failed", running=1, target=2, error="boom", failed=(2,),
                       updated_at=7.0)
    assert DeviceView.of("a", status) == DeviceView("a", "failed", 1, 2, (2,), "boom", 7.0)
    assert DeviceView.of("a", None) == DeviceView("a")


# --------------------------------------------------------------------------- halting


def test_halts_in_phase_1_with_max_failures_0_and_sends_everyone_back() -> None:
    members = fleet()
    s = spec("1,50%,100%", max_failures="0", soak=20)
    r = start("f", "web", 3, V, s, members, now=0.0)
    canary = r.phases[0].devices[0]
    others = [m.name for m in members if m.name != canary]
    assert all(t == Target(3, hold=True) for t in targets(r, others).values())
    assert target_for(r, canary, None) == Target(3)

    r = step(r, s, {canary: DeviceView(canary, "failed", V, 3, (3,), "health check: exit 1")},
             12.0)
    assert r.state == "halted" and r.phase == 0
    assert r.reason == f"phase 1: 1 failed of 1 (max-failures 0): {canary} failed: " \
                       "health check: exit 1"
    assert r.phases[0].ended_at == 12.0 and r.phases[1].started_at is None
    assert all(t == (V, False, None, True) for t in targets(r, [canary, *others]).values())
    assert next_deadline(r, s, 12.0) is None
    assert step(r, s, {n: runs(n, 3) for n in others}, 100.0) == r  # halted is final


def test_a_device_whose_platform_the_release_lacks_fails_at_once() -> None:
    members = fleet()
    s = spec("1,100%", max_failures="0", soak=20)
    r = start("f", "web", 3, V, s, members, now=0.0)
    canary = r.phases[0].devices[0]
    why = "release 3 has no image for linux/arm/v7 (has linux/amd64)"
    r = step(r, s, {canary: DeviceView(canary, "no-platform", V, 3, (), why, 1.0)}, 2.0)
    assert r.state == "halted"
    assert r.reason == f"phase 1: 1 failed of 1 (max-failures 0): {canary} failed: {why}"


def test_percentage_threshold_waits_for_min_devices() -> None:
    s = spec("100%", max_failures="20%", min_devices=5, soak=10)
    members = fleet(1, 10)
    names = [m.name for m in members]
    r = start("f", "web", V, P, s, members, now=0.0)
    devices = Fleet()
    devices.report(rolled_back(names[0]), rolled_back(names[1]))
    r = step(r, s, devices.views, 1.0)
    assert r.state == "running"  # 2 of 2 failed, but fewer than 5 devices have an outcome
    devices.report(*(runs(n) for n in names[2:5]))
    r = step(r, s, devices.views, 2.0)
    assert r.state == "running"  # running, not yet healthy: still 2 outcomes
    r = step(r, s, devices.views, 12.0)
    assert r.state == "halted"
    assert r.reason == f"phase 1: 2 failed of 5 (max-failures 20%): {names[0]} failed: " \
                       "health check failed: exit 1"


def test_failures_within_the_percentage_do_not_halt_and_the_phase_ends() -> None:
    s = spec("5,100%", max_failures="20%", min_devices=5, soak=10)
    members = fleet(1, 10)
    r = start("f", "web", V, P, s, members, now=0.0)
    first = r.phases[0].devices
    devices = Fleet()
    devices.report(rolled_back(first[0]), *(runs(n) for n in first[1:]))
    r = step(r, s, devices.views, 3.0)
    assert r.state == "running" and r.phase == 0
    r = step(r, s, devices.views, 13.0)  # 1 failed of 5 = 20 %: not above the limit
    assert r.state == "running" and r.phase == 1
    assert r.phases[0].ended_at == 13.0 and r.phases[0].failed == (first[0],)
    second = r.phases[1].devices
    devices.report(rolled_back(second[0]))
    r = step(r, s, devices.views, 14.0)  # 2 failed of 6: above 20 %
    assert r.state == "halted" and r.phase == 1
    assert r.reason == f"phase 2: 2 failed of 6 (max-failures 20%): {second[0]} failed: " \
                       "health check failed: exit 1"


def test_a_phase_with_a_tolerated_failure_ends_when_the_last_soak_ends() -> None:
    s = spec("2,100%", max_failures="1", soak=10)
    r = start("f", "web", V, P, s, fleet(1, 3), now=0.0)
    bad, good = r.phases[0].devices
    devices = Fleet()
    devices.report(rolled_back(bad))
    r = step(r, s, devices.views, 1.0)
    devices.report(runs(good))
    r = step(r, s, devices.views, 2.0)
    r = step(r, s, devices.views, 30.0)  # late: the phase still ended at 12
    assert r.state == "running" and r.phase == 1
    assert r.phases[0].ended_at == 12.0 and r.phases[1].started_at == 12.0
    assert r.phases[0].failed == (bad,) and r.phases[0].healthy == (good,)


def test_a_device_that_does_not_run_the_release_by_the_deadline_fails() -> None:
    s = spec("2,100%", deadline=100, soak=10)
    r = start("f", "web", V, P, s, fleet(1, 3), now=0.0)
    quick, silent = r.phases[0].devices
    devices = Fleet()
    devices.report(runs(quick), DeviceView(silent, "downloading", P, V, (), None, 1.0))
    r = step(r, s, devices.views, 1.0)
    assert next_deadline(r, s, 1.0) == 11.0
    r = step(r, s, devices.views, 11.0)
    assert r.devices[quick].state == "healthy" and next_deadline(r, s, 11.0) == 100.0
    r = step(r, s, devices.views, 99.9)
    assert r.state == "running"
    r = step(r, s, devices.views, 100.0)
    assert r.state == "halted"
    assert r.reason == f"phase 1: 1 failed of 2 (max-failures 0): {silent} failed: did not " \
                       "report v2 running healthily within 100 s of its phase start"


def test_a_failure_left_from_an_earlier_try_waits_for_the_retry() -> None:
    s = spec("2,100%", soak=10, deadline=100)
    members = fleet(1, 3)
    before = {"lan1-1": rolled_back("lan1-1"), "lan1-2": rolled_back("lan1-2"),
              "lan1-3": rolled_back("lan1-3")}
    r = start("f", "web", V, P, s, members, now=0.0, views=before)
    assert Rollout.from_json(r.to_json()) == r
    r = step(r, s, before, 1.0)
    assert r.state == "running" and r.devices["lan1-1"].retrying
    # lan1-1's agent acts on the retry: V is no longer failed there; then it fails V again.
    retried = DeviceView("lan1-1", "downloading", P, V, (), None, 2.0)
    r = step(r, s, {**before, "lan1-1": retried}, 2.0)
    assert not r.devices["lan1-1"].retrying and r.state == "running"
    r = step(r, s, before, 3.0)
    assert r.state == "halted" and r.reason is not None
    assert r.reason.startswith("phase 1: 1 failed of 1 (max-failures 0): lan1-1 failed")


def test_a_retrying_device_that_never_retries_fails_at_the_deadline() -> None:
    s = spec("1,100%", deadline=100)
    stale = {"lan1-1": rolled_back("lan1-1")}
    r = start("f", "web", V, P, s, fleet(1, 2), now=0.0, views=stale)
    r = step(r, s, stale, 99.0)
    assert r.state == "running"
    r = step(r, s, stale, 100.0)
    assert r.state == "halted" and r.reason is not None and "within 100 s" in r.reason


def test_waiting_for_the_maintenance_window_is_not_late() -> None:
    s = spec("1,100%", deadline=100, soak=10)
    r = start("f", "web", V, P, s, fleet(1, 2), now=0.0)
    waiting = {"lan1-1": DeviceView("lan1-1", "waiting-window", P, V, (), None, 50.0)}
    r = step(r, s, waiting, 50.0)
    r = step(r, s, waiting, 120.0)  # past the phase's deadline, but it reports, waiting
    assert r.state == "running" and next_deadline(r, s, 120.0) == 220.0
    r = step(r, s, {"lan1-1": DeviceView("lan1-1", "loading", P, V, (), None, 121.0)}, 219.0)
    assert r.state == "running"
    r = step(r, s, {"lan1-1": DeviceView("lan1-1", "loading", P, V, (), None, 121.0)}, 220.0)
    assert r.state == "halted"  # the window opened and it still did not run it in time


def test_a_late_device_in_a_started_phase_has_its_own_deadline() -> None:
    s = spec("1,100%", deadline=100, soak=10)
    r = start("f", "web", V, P, s, fleet(1, 2), now=0.0)
    r = promote(r, 1.0)
    r = admit(r, s, [Member("late-1", {}, None, None, 500.0)], 500.0)
    assert r.devices["late-1"].state == "updating"
    devices = {n: runs(n) for n in ("lan1-1", "lan1-2")}
    r = step(r, s, devices, 501.0)
    assert r.state == "running" and next_deadline(r, s, 501.0) == 511.0
    r = step(r, s, devices, 511.0)
    assert r.state == "running" and next_deadline(r, s, 511.0) == 600.0
    r = step(r, s, {**devices, "late-1": runs("late-1")}, 520.0)
    r = step(r, s, {**devices, "late-1": runs("late-1")}, 530.0)
    assert r.state == "done"


def test_a_rollout_smaller_than_min_devices_is_judged_when_all_have_an_outcome() -> None:
    s = spec("1,100%", max_failures="10%", min_devices=5, soak=10)
    r = start("f", "web", V, P, s, fleet(1, 3), now=0.0)
    canary = r.phases[0].devices[0]
    rest = [n for n in ("lan1-1", "lan1-2", "lan1-3") if n != canary]
    r = step(r, s, {canary: rolled_back(canary)}, 1.0)
    assert r.state == "running" and r.phase == 1  # 1 outcome of the 3 (min-devices 5)
    devices = {canary: rolled_back(canary), **{n: runs(n) for n in rest}}
    r = step(r, s, devices, 2.0)
    assert r.state == "running"
    r = step(r, s, devices, 12.0)
    assert r.state == "halted"  # all 3 have an outcome: 1 of 3 is above 10 %
    assert r.reason == f"phase 2: 1 failed of 3 (max-failures 10%): {canary} failed: " \
                       "health check failed: exit 1"


# --------------------------------------------------------------------------- operator actions


def test_pause_blocks_advance_and_resume_starts_the_next_phase_then() -> None:
    s = spec("1,100%", soak=20)
    r = start("f", "web", V, P, s, fleet(1, 3), now=0.0)
    canary = r.phases[0].devices[0]
    devices = Fleet()
    devices.report(runs(canary))
    r = step(r, s, devices.views, 5.0)
    r = pause(r, 10.0)
    assert r.state == "paused"
    r = step(r, s, devices.views, 30.0)
    assert r.state == "paused" and r.phase == 0
    assert r.devices[canary].state == "healthy"  # what devices do is still noted
    r = resume(r, 50.0)
    r = step(r, s, devices.views, 50.0)
    assert r.state == "running" and r.phase == 1
    assert r.phases[0].ended_at == 50.0 and r.phases[1].started_at == 50.0
    assert [text for _, text in r.events if "operator" in text] == [
        "paused by operator", "resumed by operator"]


def test_a_paused_rollout_does_not_halt_until_resumed() -> None:
    s = spec("1,100%", soak=20)
    r = start("f", "web", V, P, s, fleet(1, 3), now=0.0)
    canary = r.phases[0].devices[0]
    r = pause(r, 1.0)
    r = step(r, s, {canary: rolled_back(canary)}, 2.0)
    assert r.state == "paused" and r.devices[canary].state == "failed"
    r = step(r, s, {canary: rolled_back(canary)}, 3.0)
    assert r.state == "paused"
    r = step(resume(r, 4.0), s, {canary: rolled_back(canary)}, 4.0)
    assert r.state == "halted" and r.phases[0].ended_at == 4.0


def test_promote_skips_the_soak() -> None:
    s = spec("1,50%,100%", soak=600)
    r = start("f", "web", V, P, s, fleet(), now=0.0)
    canary = r.phases[0].devices[0]
    r = step(r, s, {canary: runs(canary)}, 5.0)
    r = promote(r, 6.0)
    assert r.phase == 1 and r.phases[0].ended_at == 6.0 and r.phases[1].started_at == 6.0
    assert all(target_for(r, n, None) == Target(V) for n in r.phases[1].devices)
    r = promote(promote(r, 7.0), 8.0)
    assert r.state == "done" and r.phase == 2
    assert [text for _, text in r.events][-2:] == [
        "phase 3 (100%) promoted by operator: 0 healthy, 0 failed",
        "done: v2 promoted to every phase"]
    with pytest.raises(RolloutConflict, match="cannot promote the rollout of web v2: it is "
                                              "done"):
        promote(r, 9.0)


def test_abort_sends_every_device_back() -> None:
    s = spec("1,100%")
    r = start("f", "web", V, P, s, fleet(1, 3), now=0.0)
    r = abort(pause(r, 1.0), 2.0)
    assert r.state == "aborted" and r.reason == "aborted by operator"
    assert r.phases[0].ended_at == 2.0
    assert all(t == Target(P, pin_needed=True)
               for t in targets(r, ["lan1-1", "lan1-2", "lan1-3"]).values())
    for action in (abort, pause, resume, promote):
        with pytest.raises(RolloutConflict, match="^[^\n]*it is aborted"):
            action(r, 3.0)


def test_actions_that_do_not_apply_conflict() -> None:
    s = spec("1")
    r = start("f", "web", V, P, s, fleet(1, 1), now=0.0)
    with pytest.raises(RolloutConflict, match="cannot resume .* it is running"):
        resume(r, 1.0)
    with pytest.raises(RolloutConflict, match="cannot pause .* it is paused"):
        pause(pause(r, 1.0), 2.0)
    h = held("f", "web", V, P, 0.0)
    for action in (abort, pause, resume, promote):
        with pytest.raises(RolloutConflict, match="it is held"):
            action(h, 1.0)


# --------------------------------------------------------------------------- membership


def test_a_device_enrolled_later_joins_the_last_phase() -> None:
    s = spec("1,100%", soak=10)
    r = start("f", "web", V, P, s, fleet(1, 2), now=10.0)
    late = Member("late-1", {}, "203.0.113.9", None, 20.0)
    before = Member("lan1-9", {"role": "x"}, "203.0.113.1", None, 5.0)  # there at the start
    r = admit(r, s, [*fleet(1, 2), late, before], 21.0)
    assert r.devices["late-1"].phase == 1 and r.devices["late-1"].state == "pending"
    assert "lan1-9" not in r.devices and target_for(r, "lan1-9", None) == Target(P)
    assert target_for(r, "late-1", None) == Target(V, hold=True)
    assert admit(r, s, [late], 22.0) == r  # once
    r = promote(r, 30.0)
    assert target_for(r, "late-1", None) == Target(V)
    assert "late-1" in r.phases[1].devices


def test_a_late_device_stays_out_when_the_last_phase_does_not_take_everyone() -> None:
    s = spec("1,50%")
    r = start("f", "web", V, P, s, fleet(1, 4), now=10.0)
    late = Member("late-1", {}, None, None, 20.0)
    assert admit(r, s, [late], 21.0) == r
    canaries = spec("1,role=cam")
    r = start("f", "web", V, P, canaries, fleet(1, 4), now=10.0)
    r = admit(r, canaries, [late, Member("late-2", {"role": "cam"}, None, None, 20.0)], 21.0)
    assert "late-1" not in r.devices and r.devices["late-2"].phase == 1


def test_phases_spread_across_sites() -> None:
    members = fleet(3, 3)
    s = spec("3,100%")
    phases = assign_phases(s, members)
    assert sorted(n.split("-")[0] for n in phases[0]) == ["lan1", "lan2", "lan3"]
    shuffled = list(members)
    random.Random(7).shuffle(shuffled)
    assert assign_phases(s, shuffled) == phases  # deterministic


def test_spread_covers_sites_before_nat_kinds_within_one() -> None:
    members = [Member("a1", {}, "1.1.1.1", "cone", 0), Member("a2", {}, "1.1.1.1", "sym", 0),
               Member("b1", {}, "2.2.2.2", "cone", 0), Member("u1", {}, None, None, 0)]
    assert assign_phases(spec("1,2,3,4"), members) == (("u1",), ("a1",), ("b1",), ("a2",))


def test_cumulative_phases_always_take_one_more_device() -> None:
    phases = assign_phases(spec("1,10%,100%"), fleet(1, 5))
    assert [len(p) for p in phases] == [1, 1, 3]  # 10 % of 5 rounds up to 1: one more


def test_selector_phases_and_the_rollout_selector() -> None:
    members = [Member("cam-1", {"role": "cam", "site": "berlin"}, None, None, 0),
               Member("cam-2", {"role": "cam", "site": "paris"}, None, None, 0),
               Member("canary", {"role": "canary"}, None, None, 0),
               Member("gw-1", {"role": "gw", "site": "berlin"}, None, None, 0)]
    assert assign_phases(spec("role=canary,site=berlin,100%"), members) == (
        ("canary",), ("cam-1", "gw-1"), ("cam-2",))
    only_cams = spec("site=berlin,100%", selector="role=cam")
    assert assign_phases(only_cams, members) == (("cam-1",), ("cam-2",))
    # cam-1 comes first by name; the selector phase takes what is left of its devices
    assert assign_phases(spec("1,role=canary"), members) == (("cam-1",), ("canary",))
    assert assign_phases(spec("2,role=canary+site="), members) == (("cam-1", "cam-2"),
                                                                   ("canary",))


def test_devices_no_phase_takes_stay_out() -> None:
    s = spec("1,50%")
    r = start("f", "web", V, P, s, fleet(1, 4), now=0.0)
    inside = {n for p in r.phases for n in p.devices}
    outside = {"lan1-1", "lan1-2", "lan1-3", "lan1-4"} - inside
    assert len(inside) == 2 and len(outside) == 2
    assert all(target_for(r, n, None) == Target(P) for n in outside)


def test_an_empty_phase_ends_as_it_starts() -> None:
    s = spec("role=none,100%", soak=10)
    r = start("f", "web", V, P, s, fleet(1, 1), now=0.0)
    r = step(r, s, {}, 1.0)
    assert r.phase == 1 and r.phases[1].started_at == 0.0
    assert r.events[1] == (0.0, "phase 1 (role=none) started: no devices")


# --------------------------------------------------------------------------- targets


def test_target_in_each_state() -> None:
    assert target_for(held("f", "web", V, P, 0.0), "lan1-1", None) == Target(P)
    assert target_for(held("f", "web", V, None, 0.0), "lan1-1", None) == Target(None)

    s = spec("1,100%", soak=10)
    r = start("f", "web", V, P, s, fleet(1, 2), now=0.0)
    assert target_for(r, "lan1-1", "02:00-04:00") == Target(V, False, "02:00-04:00", False)
    assert target_for(r, "lan1-2", "02:00-04:00") == Target(V, True, "02:00-04:00", False)
    assert target_for(r, "lan1-2", "not a window") == Target(V, hold=True)
    assert target_for(r, "elsewhere", None) == Target(P)
    version, hold, window, pin = target_for(pause(r, 1.0), "lan1-2", None)
    assert (version, hold, window, pin) == (V, True, None, False)

    windowed = spec("1,100%", window="22:00-02:00")
    w = start("f", "web", V, P, windowed, fleet(1, 2), now=0.0)
    assert target_for(w, "lan1-1", "02:00-04:00").window == "22:00-02:00"

    done = promote(promote(r, 1.0), 2.0)
    assert done.state == "done" and target_for(done, "lan1-2", None) == Target(V)
    assert target_for(done, "elsewhere", None) == Target(P)

    bad = abort(r, 1.0)
    assert target_for(bad, "lan1-1", None) == Target(P, pin_needed=True)
    no_previous = abort(start("f", "web", V, None, s, fleet(1, 1), now=0.0), 1.0)
    assert target_for(no_previous, "lan1-1", None) == Target(None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", None]),
                          st.sampled_from(["cone", "sym", None]),
                          st.sampled_from(["cam", "gw", ""])), max_size=30),
       st.lists(st.sampled_from(["1", "2", "5", "2.5%", "10%", "50%", "role=cam", "role=gw"]),
                min_size=1, max_size=5),
       st.booleans(), st.randoms(use_true_random=False))
def test_phase_membership_rules(devices: list[tuple[str | None, str | None, str]],
                                items: list[str], all_last: bool, rnd: random.Random) -> None:
    members = [Member(f"d{i}", {"role": role} if role else {}, site, nat, 0.0)
               for i, (site, nat, role) in enumerate(devices)]
    text = ",".join(dict.fromkeys(items))  # no item twice
    try:
        s = spec(text + (",100%" if all_last else ""))
    except RolloutSpecError:
        return  # counts or percentages out of order: refused, tested in tests/mesh
    phases = assign_phases(s, members)
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert assign_phases(s, shuffled) == phases
    taken = [n for p in phases for n in p]
    assert len(taken) == len(set(taken))  # no device in two phases
    if all_last:
        assert set(taken) == {m.name for m in members}
    site = {m.name: m.site for m in members}
    if s.phases[0].kind != "selector" and len(phases[0]) <= len(set(site.values())):
        assert len({site[n] for n in phases[0]}) == len(phases[0])  # one per site first
    total = 0
    for phase_spec, names in zip(s.phases, phases, strict=True):
        before, total = total, total + len(names)
        if phase_spec.kind != "selector":
            want = cumulative_total(phase_spec, len(members))
            assert total == min(len(members), max(want, before + 1))
