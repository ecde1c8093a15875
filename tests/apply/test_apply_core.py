"""The pure core's decisions with explicit time, the journal file, the log buffer, and the
real crash point (a child process that SIGKILLs itself)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from agent._applogs import LogBuffer, LogCollector, LogLine, parse_log_line
from agent._apply_core import (
    MISSING_BLOB_RETRY_S,
    ContainerView,
    Create,
    Journal,
    Load,
    MissingBlob,
    Observed,
    Probe,
    Remove,
    RemoveImage,
    RunProbe,
    Start,
    Stop,
    Target,
    apply_gate,
    decide,
    effective_check,
    fail_load,
    image_has_healthcheck,
)
from agent._crashpoints import ALL_CRASH_POINTS, crash_point
from agent._journal import AppJournal, JournalError
from mesh.control import APP_STATES, MAX_FAILED
from mesh.release import (
    ContainerSettings,
    HealthCheck,
    HealthKind,
    ReleaseManifest,
    RestartPolicy,
    UpdateStrategy,
)
from mesh.rollout import Window

APP = "web"


def manifest(version: int, settings: ContainerSettings | None = None,
             config: bytes = b"{}") -> ReleaseManifest:
    return ReleaseManifest("cams", APP, version, 0, config, (), settings or ContainerSettings())


def running(version: int, name: str = "fleetmesh-web", started: float = 0.0,
            cid: str = "") -> ContainerView:
    return ContainerView(cid or f"c{version}", name, version, "running", started)


def test_states_are_the_contract_set() -> None:
    assert APP_STATES == ("idle", "downloading", "waiting-lock", "loading", "stopping",
                            "starting", "checking-health", "running", "failed", "rolling-back",
                          "waiting-phase", "waiting-window", "no-platform")
    assert len(ALL_CRASH_POINTS) >= 12 and len(set(ALL_CRASH_POINTS)) == len(ALL_CRASH_POINTS)


def test_a_rebuild_that_lacked_a_blob_waits_exactly_the_retry_time() -> None:
    j = Journal(current=1)
    obs = Observed((running(1),), frozenset({1}), missing_blob=MissingBlob(2, 100.0))
    t = Target(2, manifest(2))  # the node says every blob is held
    assert decide(APP, j, t, obs, 100.0).state == "downloading"
    assert decide(APP, j, t, obs, 100.0 + MISSING_BLOB_RETRY_S - 0.001).state == "downloading"
    s = decide(APP, j, t, obs, 100.0 + MISSING_BLOB_RETRY_S)
    assert s.action == Load(2) and s.state == "loading"
    # another release than the one that lacked a blob is not held back
    assert decide(APP, j, Target(3, manifest(3)), obs, 100.0).action == Load(3)


def test_a_release_without_the_device_platform_is_never_applied() -> None:
    j = Journal(current=1)
    obs = Observed((running(1),), frozenset({1}))
    why = "release 2 has no image for linux/arm/v7 (has linux/amd64)"
    for t in (Target(2, manifest(2), platform_error=why),
              Target(2, manifest(2), force=True, platform_error=why),
              Target(2, manifest(2, ContainerSettings(
                  update_strategy=UpdateStrategy.KILL_THEN_DOWNLOAD)), platform_error=why)):
        s = decide(APP, j, t, obs, 10.0)
        assert s.state == "no-platform" and s.action is None and s.journal == j
    # stopping for it when the target changed to it mid-update: back to the committed one
    s = decide(APP, Journal(phase="stopping", current=1, to=3), Target(
        2, manifest(2), platform_error=why), Observed((running(1),), frozenset({1, 3})), 10.0)
    assert s.journal.phase == "rolling-back"


def test_restarted_mid_update_the_journal_release_is_the_target() -> None:
    j = Journal(phase="starting", current=1, to=2)
    obs = Observed((), frozenset({1}))
    # no word from the coordinator yet: the journal's release (manifest on disk) goes on
    s = decide(APP, j, None, obs, 10.0, {1: manifest(1), 2: manifest(2)})
    assert s.action == Load(2) and s.state == "loading"
    # ...unless its rebuild lacked a blob less than MISSING_BLOB_RETRY_S ago
    late = Observed((), frozenset({1}), missing_blob=MissingBlob(2, 5.0))
    s = decide(APP, j, None, late, 5.0 + MISSING_BLOB_RETRY_S - 1, {1: manifest(1),
                                                                   2: manifest(2)})
    assert s.action is None and s.state == "downloading"
    # without its manifest there is nothing to infer: the update is given up
    s = decide(APP, j, None, obs, 10.0, {1: manifest(1)})
    assert s.journal.phase == "rolling-back" and 2 in s.journal.failed


def test_idle_update_steps() -> None:
    j = Journal(current=1)
    t = Target(2, manifest(2), ready=False)
    obs = Observed((running(1),), frozenset({1}))
    assert decide(APP, j, t, obs, 10.0).state == "downloading"
    s = decide(APP, j, Target(2, manifest(2)), obs, 10.0)
    assert s.action == Load(2) and s.state == "loading"
    obs2 = Observed((running(1),), frozenset({1, 2}))
    s = decide(APP, j, Target(2, manifest(2)), obs2, 10.0)
    assert s.action is None and s.journal == Journal("stopping", 1, None, 2)
    s = decide(APP, s.journal, Target(2, manifest(2)), obs2, 10.0)
    assert s.action == Stop("c1", 1)


def test_lock_waits_and_force_overrides() -> None:
    j = Journal(current=1)
    obs = Observed((running(1),), frozenset({1, 2}), lock_held=True)
    s = decide(APP, j, Target(2, manifest(2)), obs, 10.0)
    assert s.state == "waiting-lock" and s.lock_wait and s.journal == j
    s = decide(APP, j, Target(2, manifest(2), force=True), obs, 10.0)
    assert s.journal.phase == "stopping"
    # A stopped app holds no lock that matters: nothing to interrupt.
    stopped = Observed((ContainerView("c1", "fleetmesh-web", 1, "exited"),),
                       frozenset({1, 2}), lock_held=True)
    assert decide(APP, j, Target(2, manifest(2)), stopped, 10.0).journal.phase == "stopping"


MIDNIGHT = 86400.0 * 20_000  # a UTC midnight (2024-10-04): local times below are exact
UTC_PLUS_1 = 3600


def test_a_held_target_downloads_but_never_applies() -> None:
    j = Journal(current=1)
    obs = Observed((running(1),), frozenset({1}))
    s = decide(APP, j, Target(2, manifest(2), ready=False, hold=True), obs, 10.0)
    assert (s.state, s.action, s.journal, s.wake_at) == ("downloading", None, j, None)
    held = Target(2, manifest(2), hold=True)
    s = decide(APP, j, held, obs, 10.0)
    # downloaded: held until the phase starts; no rebuild, no wake-up of its own (the hold is
    # lifted by a new target, which wakes the driver)
    assert (s.state, s.action, s.journal, s.wake_at) == ("waiting-phase", None, j, None)
    # force is for the lock and the window, never for a hold; an image already loaded
    # changes nothing either
    loaded = Observed((running(1),), frozenset({1, 2}))
    for t, o in ((replace(held, force=True), obs), (held, loaded)):
        s = decide(APP, j, t, o, 10.0)
        assert (s.state, s.action, s.journal) == ("waiting-phase", None, j)
    # kill-then-download stops the app as soon as a target arrives: not a held one
    ktd = manifest(2, ContainerSettings(update_strategy=UpdateStrategy.KILL_THEN_DOWNLOAD))
    for ready in (False, True):
        s = decide(APP, j, Target(2, ktd, ready=ready, hold=True), obs, 10.0)
        assert s.action is None and s.journal == j
    # a first install is held as well: no container created
    s = decide(APP, Journal(), held, Observed((), frozenset({2})), 10.0)
    assert (s.state, s.action, s.journal) == ("waiting-phase", None, Journal())
    # leftovers are still cleaned up meanwhile, and the state says why the update waits
    stray = ContainerView("c7", "fleetmesh-web-next", 7, "exited")
    s = decide(APP, j, held, Observed((running(1), stray), frozenset({1})), 10.0)
    assert s.action == Remove("c7", 7) and s.state == "waiting-phase"
    # the hold lifted: the update goes at once
    s = decide(APP, j, replace(held, hold=False), obs, 10.0)
    assert s.action == Load(2) and s.state == "loading"


def test_a_window_gates_the_apply_in_local_time_and_wakes_at_its_opening() -> None:
    j = Journal(current=1)
    t = Target(2, manifest(2), window=Window.parse("02:00-04:00"))
    local = Observed((running(1),), frozenset({1}), utc_offset=UTC_PLUS_1)
    # 00:30:00.25 UTC is 01:30 local: outside; the window opens at 02:00 local = 01:00 UTC
    s = decide(APP, j, t, local, MIDNIGHT + 1800.25)
    assert (s.state, s.action, s.journal) == ("waiting-window", None, j)
    assert s.wake_at == MIDNIGHT + 3600
    assert decide(APP, j, t, local, MIDNIGHT + 3599.999).wake_at == MIDNIGHT + 3600
    assert decide(APP, j, t, local, MIDNIGHT + 3600).action == Load(2)
    assert decide(APP, j, t, local, MIDNIGHT + 3 * 3600 - 0.001).action == Load(2)
    # 04:00 local, the end, is outside: the next opening is tomorrow's
    s = decide(APP, j, t, local, MIDNIGHT + 3 * 3600)
    assert s.state == "waiting-window" and s.wake_at == MIDNIGHT + 3600 + 86400
    # the same instant in a device on UTC is 00:30: its window opens an hour later
    utc = Observed((running(1),), frozenset({1}))
    assert decide(APP, j, t, utc, MIDNIGHT + 1800.25).wake_at == MIDNIGHT + 7200
    # still downloading outside the window: that is what it reports, with no wake-up
    s = decide(APP, j, replace(t, ready=False), local, MIDNIGHT + 1800)
    assert (s.state, s.wake_at) == ("downloading", None)
    # force overrides the window
    assert decide(APP, j, replace(t, force=True), local, MIDNIGHT + 1800).action == Load(2)
    # with the image loaded, the switch itself waits too
    loaded = Observed((running(1),), frozenset({1, 2}), utc_offset=UTC_PLUS_1)
    assert decide(APP, j, t, loaded, MIDNIGHT + 1800).journal == j
    assert decide(APP, j, t, loaded, MIDNIGHT + 3600).journal.phase == "stopping"


def test_window_gate_exact_times_across_midnight_and_seconds() -> None:
    late = Target(2, manifest(2), window=Window.parse("23:00-01:00"))
    west = -5 * 3600  # UTC-05:00
    # 04:30 UTC is 23:30 the day before in UTC-5: inside a window that wraps midnight
    assert apply_gate(late, west, MIDNIGHT + 4.5 * 3600) is None
    assert apply_gate(late, west, MIDNIGHT + 5.5 * 3600) is None  # 00:30 local
    # 01:00 local (06:00 UTC) closes it until 23:00 local (04:00 UTC the next day)
    assert apply_gate(late, west, MIDNIGHT + 6 * 3600) == ("waiting-window",
                                                           MIDNIGHT + 86400 + 4 * 3600)
    seconds = Target(2, manifest(2), window=Window.parse("00:00:05-00:00:09"))
    assert apply_gate(seconds, 0, MIDNIGHT + 4.9) == ("waiting-window", MIDNIGHT + 5)
    assert apply_gate(seconds, 0, MIDNIGHT + 5) is None
    assert apply_gate(seconds, 0, MIDNIGHT + 9) == ("waiting-window", MIDNIGHT + 86400 + 5)
    always = Target(2, manifest(2), window=Window.parse("03:00-03:00"))  # start == end
    assert apply_gate(always, 0, MIDNIGHT + 1) is None
    # a hold wins over an open window and over force
    assert apply_gate(replace(always, hold=True, force=True), 0, MIDNIGHT) == (
        "waiting-phase", None)


def test_an_apply_under_way_is_not_interrupted_by_a_gate() -> None:
    closed = Window.parse("02:00-04:00")
    t = Target(2, manifest(2), window=closed)
    at = MIDNIGHT + 12 * 3600  # noon, UTC device: outside the window
    assert apply_gate(t, 0, at) is not None
    stopping = Journal("stopping", 1, None, 2)
    s = decide(APP, stopping, t, Observed((running(1),), frozenset({1, 2})), at)
    assert s.action == Stop("c1", 1)
    starting = Journal("starting", 1, None, 2)
    s = decide(APP, starting, t, Observed((), frozenset({1, 2})), at, {1: manifest(1)})
    assert s.action == Create(2, "fleetmesh-web-next")
    checking = Journal("checking", 1, None, 2, health_since=at - 10)
    s = decide(APP, checking, replace(t, hold=True),
               Observed((running(2, "fleetmesh-web-next", at - 10),), frozenset({1, 2})), at)
    assert s.journal.phase == "idle" and s.journal.current == 2  # committed, held or not
    # a new target that may not be applied now, before the new release started: back to the
    # committed release, where the gate holds it
    s = decide(APP, stopping, Target(3, manifest(3), hold=True),
               Observed((running(1),), frozenset({1, 2})), at)
    assert s.journal.phase == "rolling-back" and s.journal.failed == ()
    s = decide(APP, starting, Target(3, manifest(3), window=closed),
               Observed((), frozenset({1, 2})), at, {1: manifest(1)})
    assert s.journal.phase == "rolling-back"


def test_probe_timing_is_exact() -> None:
    hc = HealthCheck(HealthKind.TCP, port=8080, interval_s=3.0)
    m = manifest(2, ContainerSettings(health_check=hc, health_timeout_s=20.0))
    j = Journal("checking", 1, None, 2, health_since=100.0)
    new = running(2, "fleetmesh-web-next", 100.0)
    t = Target(2, m)
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2})), 100.0)
    assert s.action == RunProbe(new.id, hc)
    failed = Probe(new.id, 100.0, False, "refused")
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2}), probe=failed), 100.0)
    assert s.action is None and s.wake_at == 103.0 and s.state == "checking-health"
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2}), probe=failed), 103.0)
    assert s.action == RunProbe(new.id, hc)
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2}),
                                   probe=Probe(new.id, 118.5, False)), 118.5)
    assert s.wake_at == 120.0
    # at the deadline, one more probe decides (not the clock alone)
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2}),
                                   probe=Probe(new.id, 118.5, False)), 120.0)
    assert s.action == RunProbe(new.id, hc)
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2}),
                                   probe=Probe(new.id, 120.0, False)), 120.0)
    assert s.journal.phase == "rolling-back" and s.journal.failed == (2,)
    assert s.journal.error == "release 2: not healthy within 20 s (tcp port 8080)"
    # A probe of an earlier container does not count.
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2}),
                                   probe=Probe("other", 101.0, True)), 101.0)
    assert s.action == RunProbe(new.id, hc)
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2}),
                                   probe=Probe(new.id, 101.0, True)), 101.0)
    assert s.journal == Journal(current=2, previous=1) and s.state == "running"


def test_running_check_and_hand_over_deadlines() -> None:
    m = manifest(2, ContainerSettings(update_strategy=UpdateStrategy.HAND_OVER,
                                      hand_over_timeout_s=4.0, health_timeout_s=30.0))
    j = Journal("checking", 1, None, 2, health_since=50.0)
    new = running(2, "fleetmesh-web-next", 51.0)
    obs = Observed((running(1), new), frozenset({1, 2}))
    s = decide(APP, j, Target(2, m), obs, 50.0)
    assert s.wake_at == 54.0  # the hand-over end comes before running-for-5-s (56.0)
    assert decide(APP, j, Target(2, m), obs, 54.0).action == Stop("c1", 1)
    obs = Observed((ContainerView("c1", "fleetmesh-web", 1, "exited"), new), frozenset({1, 2}))
    assert decide(APP, j, Target(2, m), obs, 54.0).wake_at == 56.0
    assert decide(APP, j, Target(2, m), obs, 56.0).journal.current == 2


def test_idle_cleanup_and_pruning() -> None:
    j = Journal(current=2, previous=1)
    leftovers = Observed((running(2, "fleetmesh-web-next"),
                          ContainerView("c1", "fleetmesh-web", 1, "exited")),
                         frozenset({1, 2, 3}))
    s = decide(APP, j, Target(2, manifest(2)), leftovers, 0.0)
    assert s.action is not None and type(s.action).__name__ == "Remove"
    clean = Observed((running(2, "fleetmesh-web-next"),), frozenset({1, 2, 3}))
    assert type(decide(APP, j, Target(2, manifest(2)), clean, 0.0).action).__name__ == "Rename"
    named = Observed((running(2),), frozenset({0, 1, 2, 3}))
    assert decide(APP, j, Target(2, manifest(2)), named, 0.0).action == RemoveImage(0)
    gone = Observed((), frozenset({1, 2}))
    assert decide(APP, j, None, gone, 0.0, {2: manifest(2)}).action == Create(2, "fleetmesh-web")


@pytest.mark.parametrize("policy", list(RestartPolicy))
@pytest.mark.parametrize("status", ["exited", "dead"])
def test_a_committed_app_stopped_by_hand_is_started_again(policy: RestartPolicy,
                                                         status: str) -> None:
    """`docker kill` or `docker stop` of the app on the device: Docker's restart policy
    leaves it down (the owner stopped it), but the release is the device's target, so the
    agent starts it again when its policy keeps it up; an app whose policy lets it end
    (no, on-failure) stays as it ended."""
    j = Journal(current=2, previous=1)
    m = manifest(2, ContainerSettings(restart_policy=policy))
    down = Observed((ContainerView("c2", "fleetmesh-web", 2, status, 0.0),), frozenset({2}))
    s = decide(APP, j, Target(2, m), down, 0.0, {2: m})
    keeps_up = policy in (RestartPolicy.UNLESS_STOPPED, RestartPolicy.ALWAYS)
    assert s.action == (Start("c2", 2) if keeps_up else None), (policy, s)
    # the same with no word from the coordinator (offline): the journal's release
    s = decide(APP, j, None, down, 0.0, {2: m})
    assert s.action == (Start("c2", 2) if keeps_up else None), (policy, s)
    up = Observed((running(2),), frozenset({2}))
    assert decide(APP, j, Target(2, m), up, 0.0, {2: m}).action is None


def test_failed_list_is_bounded_and_retry_clears() -> None:
    j = Journal(current=1)
    for v in range(2, 2 + MAX_FAILED + 5):
        j = fail_load(j, v, "bad")
    assert len(j.failed) == MAX_FAILED and j.failed[-1] == MAX_FAILED + 6
    s = decide(APP, j, Target(MAX_FAILED + 6, manifest(MAX_FAILED + 6), retry=1),
               Observed((running(1),), frozenset({1})), 0.0)
    assert MAX_FAILED + 6 not in s.journal.failed and s.journal.retry_seen == 1


def test_effective_checks() -> None:
    with_hc = json.dumps({"config": {"Healthcheck": {"Test": ["CMD", "true"]}}}).encode()
    none_hc = json.dumps({"config": {"Healthcheck": {"Test": ["NONE"]}}}).encode()
    assert image_has_healthcheck(with_hc) and not image_has_healthcheck(none_hc)
    assert not image_has_healthcheck(b"not json")
    assert effective_check(manifest(1, config=with_hc)).kind == "docker"
    c = effective_check(manifest(1, config=none_hc))
    assert (c.kind, c.seconds) == ("running", 5.0)
    assert effective_check(manifest(1, ContainerSettings(
        health_check=HealthCheck(HealthKind.HTTP, port=80, path="/x")))).describe() \
        == "http port 80/x"


def test_journal_round_trip_and_corruption(tmp_path: Path) -> None:
    aj = AppJournal(tmp_path, APP)
    assert aj.load() is None
    j = Journal("checking", 1, None, 2, 5.5, (3,), 2, "release 3: bad")
    aj.save(j)
    assert aj.load() == j
    assert not list(aj.dir.glob(".tmp-*"))
    aj.path.write_text('{"format": 1, "phase": "flying"}')
    with pytest.raises(JournalError, match="corrupt"):
        aj.load()
    aj.path.write_text("{")
    with pytest.raises(JournalError, match="corrupt"):
        aj.load()
    bad = Journal("stopping", 1, None, None).to_json()
    with pytest.raises(ValueError, match="without a release"):
        Journal.from_json(bad)


# --------------------------------------------------------------------------- logs


def test_log_buffer_bounds_and_put_back() -> None:
    buf = LogBuffer(max_lines=3)
    for i in range(5):
        buf.append(LogLine(float(i), APP, "stdout", f"l{i}"))
    lines, dropped = buf.take(2)
    assert [x["line"] for x in lines] == ["l2", "l3"] and dropped == 2
    assert set(lines[0]) == {"ts", "app", "stream", "line"}
    buf.append(LogLine(5.0, APP, "stderr", "l5"))
    buf.append(LogLine(6.0, APP, "stderr", "l6"))
    buf.put_back(lines, dropped)  # the upload failed, and the buffer is full again
    out, dropped2 = buf.take(10)
    assert [x["line"] for x in out] == ["l4", "l5", "l6"]
    assert dropped2 == 2 + 2  # dropped before, plus l2 and l3 that found no room
    buf.append(LogLine(7.0, APP, "stdout", "l7"))
    buf.put_back(out, 0)  # room for two of three: the newest two are kept
    assert [x["line"] for x in buf.take(10)[0]] == ["l5", "l6", "l7"]


def test_log_buffer_put_back_keeps_order_when_there_is_room() -> None:
    buf = LogBuffer(max_lines=10)
    for i in range(4):
        buf.append(LogLine(float(i), APP, "stdout", f"l{i}"))
    lines, dropped = buf.take(3)
    buf.append(LogLine(9.0, APP, "stdout", "l9"))
    buf.put_back(lines, dropped)
    out, d = buf.take(100)
    assert [x["line"] for x in out] == ["l0", "l1", "l2", "l3", "l9"] and d == 0


def test_parse_log_line() -> None:
    line = parse_log_line(b"2026-11-26T07:37:28.449599512Z hello world\n", APP, "stdout")
    assert line is not None and line.line == "hello world"
    assert line.ts == pytest.approx(1795678648.4496, abs=1e-3)
    long = parse_log_line(b"2026-11-26T07:37:28Z " + b"x" * 10000, APP, "stderr")
    assert long is not None and len(long.line) == 4096


def test_collector_splits_lines_and_skips_what_it_saw() -> None:
    class Source:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float | None]] = []

        def logs(self, cid: str, stream: str, since: float | None):  # type: ignore[no-untyped-def]
            self.calls.append((stream, since))
            if stream == "stderr":
                return iter(())
            return iter([b"2026-11-26T00:00:01Z one\n2026-11-26T00:00:02Z tw",
                         b"o\n2026-11-26T00:00:03Z three"])

    buf = LogBuffer()
    src = Source()
    col = LogCollector(src, buf)
    col.follow(APP, "c1", None)
    for t in list(col._threads.values()):
        t.join(10)
    lines, _ = buf.take(10)
    assert [x["line"] for x in lines] == ["one", "two", "three"]
    col.follow(APP, "c1", None)  # the container restarted: resume after the last line seen
    for t in list(col._threads.values()):
        t.join(10)
    assert buf.take(10) == ([], 0)
    stdout_since = [since for stream, since in src.calls if stream == "stdout"]
    assert stdout_since[0] is None and stdout_since[1] == pytest.approx(1795651203.0)


# --------------------------------------------------------------------------- crash points


def test_crash_point_sigkills_the_process(tmp_path: Path) -> None:
    (tmp_path / "crash-at").write_text("after-stop-old\n")
    code = ("import sys; from agent._crashpoints import arm, crash_point\n"
            f"arm({str(tmp_path)!r})\n"
            "crash_point('before-load')\nprint('passed before-load', flush=True)\n"
            "crash_point('after-stop-old')\nprint('not reached', flush=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=False, cwd=Path(__file__).parents[2])
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "passed before-load" in r.stdout and "not reached" not in r.stdout
    assert not (tmp_path / "crash-at").exists()


def test_unarmed_or_unknown(tmp_path: Path) -> None:
    crash_point("after-load")  # not armed: nothing happens
    with pytest.raises(ValueError):
        crash_point("no-such-point")
    assert os.getpid() > 0


def test_tcp_and_http_probes_on_loopback() -> None:
    import http.server
    import threading

    from agent._health import probe

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(204 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        engine = None  # tcp and http probes do not use the engine
        assert probe(engine, "c", HealthCheck(HealthKind.TCP, port=port)) == (True, "")  # type: ignore[arg-type]
        assert probe(engine, "c", HealthCheck(HealthKind.HTTP, port=port, path="/ok"))[0]  # type: ignore[arg-type]
        ok, why = probe(engine, "c", HealthCheck(HealthKind.HTTP, port=port, path="/bad"))  # type: ignore[arg-type]
        assert not ok and why == f"http {port}/bad: status 503"
    finally:
        server.shutdown()
        server.server_close()
    ok, why = probe(None, "c", HealthCheck(HealthKind.TCP, port=port), timeout=2.0)  # type: ignore[arg-type]
    assert not ok and why.startswith(f"tcp {port}:")


def test_an_agent_back_after_the_health_deadline_probes_before_judging() -> None:
    """Killed while checking and restarted after the deadline (its supervisor's backoff): the
    healthy release is committed on a fresh probe, not rolled back for the time it was down."""
    hc = HealthCheck(HealthKind.HTTP, port=8080, interval_s=2.0)
    m = manifest(2, ContainerSettings(health_check=hc, health_timeout_s=20.0))
    j = Journal("checking", 1, None, 2, health_since=100.0)
    new = running(2, "fleetmesh-web-next", 100.0)
    t = Target(2, m)
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2})), 150.0)  # no probe in memory
    assert s.action == RunProbe(new.id, hc) and s.journal == j
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2}),
                                   probe=Probe(new.id, 150.0, True)), 150.0)
    assert s.journal == Journal(current=2, previous=1) and s.state == "running"
    s = decide(APP, j, t, Observed((new,), frozenset({1, 2}),
                                   probe=Probe(new.id, 150.0, False)), 150.0)
    assert s.journal.phase == "rolling-back"
