"""The agent updating itself (agent/_selfupdate.py, agent/_handover.py): the reserved app's
decisions with explicit time, the hand-over record, and both agents' sides of a hand-over
against an in-memory engine (the real engine: tests/lab/test_agent_container.py)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent._apply_core import HandOver, Journal, Load, Observed, RemoveImage, Target
from agent._engine import NotFoundError
from agent._handover import (
    Records,
    commit,
    hand_over,
    own_container_id,
    record_failure,
    resolve_at_start,
    self_view,
    start_candidate,
    watch,
)
from agent._journal import AppJournal
from agent._selfupdate import (
    AGENT_APP,
    HANDOVER_ENV,
    NOT_IN_CONTAINER,
    Candidate,
    Handover,
    RecordError,
    SelfView,
    decide_agent,
    watch_verdict,
)
from mesh.release import ContainerSettings, ReleaseManifest
from mesh.rollout import Window

A_ID = "a" * 64
B_ID = "b" * 64
ME = SelfView(A_ID, 1)


def manifest(version: int) -> ReleaseManifest:
    return ReleaseManifest("lab", AGENT_APP, version, 0, b"{}", (), ContainerSettings())


def target(version: int, **kw: Any) -> Target:
    return Target(version, manifest(version), **kw)


# --------------------------------------------------------------------------- the core


def test_a_new_agent_release_is_loaded_then_handed_over_journal_first() -> None:
    j = Journal(current=1)
    s = decide_agent(j, target(2, ready=False), Observed(), ME, 0.0)
    assert (s.state, s.action) == ("downloading", None)
    s = decide_agent(j, target(2), Observed(images=frozenset({1})), ME, 0.0)
    assert (s.state, s.action) == ("loading", Load(2))
    s = decide_agent(j, target(2), Observed(images=frozenset({1, 2})), ME, 0.0)
    assert s.action is None and (s.journal.phase, s.journal.to) == ("starting", 2)
    s = decide_agent(s.journal, target(2), Observed(images=frozenset({1, 2})), ME, 0.0)
    assert (s.state, s.action) == ("starting", HandOver(2))


def test_the_new_agent_commits_its_journal_only_once_the_record_committed() -> None:
    j = Journal(phase="starting", current=1, to=2)
    b = SelfView(B_ID, 2, handing_over=True)
    s = decide_agent(j, target(2), Observed(images=frozenset({1, 2})), b, 0.0)
    assert (s.state, s.journal, s.action) == ("starting", j, None)
    s = decide_agent(j, target(2), Observed(images=frozenset({1, 2})),
                     replace(b, handing_over=False), 0.0)
    assert s.state == "running" and s.journal == Journal(current=2, previous=1)
    # then the old agent's image goes
    s = decide_agent(s.journal, target(2), Observed(images=frozenset({1, 2})), SelfView(B_ID, 2),
                     0.0)
    assert (s.state, s.action) == ("running", RemoveImage(1))


def test_a_failed_agent_release_is_not_tried_again_until_the_operator_retries() -> None:
    j = Journal(current=1, failed=(2,), error="release 2: the new agent exited with code 3")
    s = decide_agent(j, target(2), Observed(images=frozenset({1, 2})), ME, 0.0)
    assert (s.state, s.action, s.journal) == ("failed", None, j)
    s = decide_agent(j, target(2, retry=1), Observed(images=frozenset({1, 2})), ME, 0.0)
    assert s.journal.failed == () and s.journal.retry_seen == 1 and s.journal.error is None


def test_an_agent_outside_a_container_says_why_it_cannot_update_itself() -> None:
    s = decide_agent(Journal(), target(1), Observed(), SelfView(None), 0.0)
    assert s.state == "failed" and s.journal.error == NOT_IN_CONTAINER and s.action is None


def test_rollout_gates_hold_an_agent_release_like_any_other() -> None:
    obs = Observed(images=frozenset({1, 2}))
    assert decide_agent(Journal(current=1), target(2, hold=True), obs, ME, 0.0).state \
        == "waiting-phase"
    window = Window.parse("02:00-03:00")
    s = decide_agent(Journal(current=1), target(2, window=window), obs, ME, 3600.0)
    assert s.state == "waiting-window" and s.wake_at == 7200.0 and s.action is None
    s = decide_agent(Journal(current=1), target(2, window=window), obs, ME, 7200.0)
    assert s.journal.phase == "starting"
    assert decide_agent(Journal(current=1), target(2, platform_error="no arm64"), obs, ME,
                        0.0).state == "no-platform"


def test_the_running_agents_release_is_adopted_from_its_container() -> None:
    s = decide_agent(Journal(), None, Observed(), ME, 0.0)
    assert s.journal.current == 1 and s.state == "idle"
    s = decide_agent(Journal(current=1), target(1), Observed(images=frozenset({1})), ME, 0.0)
    assert (s.state, s.action) == ("running", None)


def test_watch_verdicts() -> None:
    rec = Handover(2, "0" * 32, A_ID, "fleetmesh-agent", "unless-stopped", 100.0, new=B_ID,
                   timeout_s=60.0)
    assert watch_verdict(rec, Candidate("running"), 99.0) == ("wait", "")
    assert watch_verdict(rec, Candidate("exited", 3), 1.0) == (
        "fail", "the new agent exited with code 3 before it joined")
    assert watch_verdict(rec, None, 1.0)[0] == "fail"
    assert watch_verdict(rec, Candidate("running"), 100.0) == (
        "fail", "the new agent did not join the mesh and report within 60 s")
    assert watch_verdict(replace(rec, state="committed"), None, 200.0) == ("committed", "")


def test_the_record_round_trips_and_refuses_what_it_did_not_write() -> None:
    rec = Handover(2, "0" * 32, A_ID, "fleetmesh-agent", "unless-stopped", 100.5, new=B_ID,
                   timeout_s=60.0)
    assert Handover.loads(rec.dumps()) == rec
    good = rec.to_json()
    for key, bad in (("format", 2), ("version", 0), ("version", True), ("nonce", "x"),
                     ("old", "../etc"), ("old_name", "-x"), ("restart_policy", "sometimes"),
                     ("deadline", "soon"), ("state", "done"), ("new", 5), ("error", 1),
                     ("timeout_s", -1)):
        with pytest.raises(RecordError):
            Handover.loads(json_bytes({**good, key: bad}))
    with pytest.raises(RecordError):
        Handover.loads(b"\xff not json")


def json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def test_own_container_id_from_mountinfo() -> None:
    line = (f"1234 1200 0:31 /var/lib/docker/containers/{A_ID}/hostname /etc/hostname rw,"
            "relatime - ext4 /dev/sda1 rw\n")
    assert own_container_id("36 25 0:32 / / rw - overlay overlay rw\n" + line) == A_ID
    assert own_container_id("36 25 0:32 / / rw - ext4 /dev/sda1 rw\n") is None


# --------------------------------------------------------------------------- both agents


class Engine:
    """The calls the hand-over makes, on containers held in a dict."""

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.ids = (f"{n:064x}" for n in itertools.count(0xc0ffee))
        self.logs: dict[str, str] = {}
        self.stopped: list[str] = []

    def add(self, cid: str, name: str, image: str, labels: dict[str, str] | None = None,
            policy: str = "unless-stopped") -> None:
        self.containers[cid] = {
            "Id": cid, "Name": f"/{name}", "Image": f"sha256:{image}",
            "Config": {"Cmd": ["run", "--data", "/var/lib/fleetmesh-agent"],
                       "Env": ["PATH=/usr/bin", "SITE=berlin"],
                       "Labels": {"org.opencontainers.image.title": "fleetmesh-agent",
                                  **(labels or {})}},
            "HostConfig": {"NetworkMode": "host", "CapAdd": ["NET_ADMIN"],
                           "Binds": ["/var/run/docker.sock:/var/run/docker.sock"],
                           "RestartPolicy": {"Name": policy}},
            "State": {"Status": "running", "ExitCode": 0}}

    def inspect(self, cid: str) -> dict[str, Any]:
        for c in self.containers.values():
            if cid in (c["Id"], c["Name"].lstrip("/")):
                return c
        raise NotFoundError(f"no container {cid}")

    def image_config(self, image: str) -> dict[str, Any]:
        return {"Env": ["PATH=/usr/bin"],
                "Labels": {"org.opencontainers.image.title": "fleetmesh-agent"}}

    def create_like(self, name: str, image: str, command: Any, environment: list[str],
                    labels: dict[str, str], host_config: dict[str, Any]) -> str:
        cid = next(self.ids)
        self.containers[cid] = {"Id": cid, "Name": f"/{name}", "Image": image,
                                "Config": {"Cmd": command, "Env": environment,
                                           "Labels": labels},
                                "HostConfig": host_config,
                                "State": {"Status": "created", "ExitCode": 0}}
        return cid

    def start(self, cid: str, restart_policy: str | None = None) -> None:
        self.inspect(cid)["State"]["Status"] = "running"

    def stop(self, cid: str, timeout: int = 10) -> None:
        c = self.inspect(cid)
        c["HostConfig"]["RestartPolicy"] = {"Name": "no"}
        c["State"]["Status"] = "exited"
        self.stopped.append(cid)

    def remove(self, cid: str) -> None:
        self.containers.pop(cid, None)

    def rename(self, cid: str, name: str) -> None:
        self.inspect(cid)["Name"] = f"/{name}"

    def set_restart_policy(self, cid: str, policy: str) -> None:
        self.inspect(cid)["HostConfig"]["RestartPolicy"] = {"Name": policy}

    def last_log_line(self, cid: str) -> str:
        return self.logs.get(cid, "")


@pytest.fixture
def engine() -> Engine:
    e = Engine()
    e.add(A_ID, "fleetmesh-agent", "1" * 64)
    return e


def candidate(engine: Engine) -> dict[str, Any]:
    return engine.inspect("fleetmesh-agent-next")


def test_the_candidate_is_the_old_agent_with_the_new_image_and_no_restart(
        engine: Engine, tmp_path: Path) -> None:
    rec = start_candidate(engine, Records(tmp_path), A_ID, "cam-1", 2, 60.0,  # type: ignore[arg-type]
                          print, clock=lambda: 1000.0)
    b = candidate(engine)
    assert rec.new == b["Id"] and rec.deadline == 1060.0 and rec.restart_policy \
        == "unless-stopped" and Records(tmp_path).read() == rec
    assert b["Image"] == f"fleetmesh/{AGENT_APP}:2" and b["State"]["Status"] == "running"
    assert b["Config"]["Cmd"] == ["run", "--data", "/var/lib/fleetmesh-agent"]
    # the operator's settings pass on, the image's own do not, and the nonce is added
    assert b["Config"]["Env"] == ["SITE=berlin", f"{HANDOVER_ENV}={rec.nonce}"]
    assert b["Config"]["Labels"] == {"io.fleetmesh.device": "cam-1",
                                     "io.fleetmesh.app": AGENT_APP, "io.fleetmesh.release": "2"}
    assert b["HostConfig"]["RestartPolicy"] == {"Name": "no", "MaximumRetryCount": 0}
    assert b["HostConfig"]["CapAdd"] == ["NET_ADMIN"] and b["HostConfig"]["NetworkMode"] == "host"


def test_a_candidate_that_joins_takes_over_name_and_restart_policy(
        engine: Engine, tmp_path: Path) -> None:
    records = Records(tmp_path)
    rec = start_candidate(engine, records, A_ID, "cam-1", 2, 60.0, print)  # type: ignore[arg-type]
    assert rec.new is not None
    assert commit(engine, records, rec.new, print) is True  # type: ignore[arg-type]
    assert A_ID not in engine.containers and A_ID in engine.stopped
    b = engine.inspect(rec.new)
    assert b["Name"] == "/fleetmesh-agent"
    assert b["HostConfig"]["RestartPolicy"] == {"Name": "unless-stopped"}
    assert records.read() is None


def test_a_candidate_that_exits_is_removed_and_the_failure_recorded(
        engine: Engine, tmp_path: Path) -> None:
    records = Records(tmp_path)
    slept: list[float] = []

    def sleep(s: float) -> None:  # the candidate exits while the old agent watches
        slept.append(s)
        b = candidate(engine)
        b["State"] = {"Status": "exited", "ExitCode": 3}
        engine.logs[b["Id"]] = "broken agent: refusing to start"

    committed = hand_over(engine, tmp_path, A_ID, "cam-1", 2, 60.0,  # type: ignore[arg-type]
                          print, sleep=sleep)
    assert committed is False and len(slept) == 1
    assert set(engine.containers) == {A_ID}  # the candidate is gone, the old agent stays
    assert engine.inspect(A_ID)["HostConfig"]["RestartPolicy"] == {"Name": "unless-stopped"}
    j = AppJournal(tmp_path / "apply", AGENT_APP).load()
    assert j is not None and j.failed == (2,) and j.phase == "idle"
    assert j.error == ("release 2: the new agent exited with code 3 before it joined: broken "
                       "agent: refusing to start")
    assert records.read() is None


def test_a_candidate_that_never_joins_fails_at_the_deadline(engine: Engine,
                                                            tmp_path: Path) -> None:
    now = [1000.0]

    def sleep(s: float) -> None:
        now[0] += s

    records = Records(tmp_path)
    start_candidate(engine, records, A_ID, "cam-1", 2, 30.0, print,  # type: ignore[arg-type]
                    clock=lambda: now[0])
    committed, why = watch(engine, records, A_ID, print,  # type: ignore[arg-type]
                           clock=lambda: now[0], sleep=sleep)
    assert (committed, why) == (False, "the new agent did not join the mesh and report "
                                       "within 30 s")
    assert now[0] == 1030.0 and set(engine.containers) == {A_ID}
    rec = records.read()
    assert rec is not None and rec.state == "failed"
    # the candidate, had it survived, may not commit any more: it stops instead
    assert rec.new is not None and commit(engine, records, rec.new, print) is False  # type: ignore[arg-type]


def test_whoever_settles_the_record_first_wins(engine: Engine, tmp_path: Path) -> None:
    records = Records(tmp_path)
    rec = start_candidate(engine, records, A_ID, "cam-1", 2, 60.0, print)  # type: ignore[arg-type]
    assert rec.new is not None
    # the candidate commits just before the old agent's deadline verdict: the old one yields
    assert records.settle("committed", rec.new) is not None
    now = rec.deadline + 1
    committed, _ = watch(engine, records, A_ID, print, clock=lambda: now)  # type: ignore[arg-type]
    assert committed is True
    # the other way round: failed first, the commit is refused
    records.write(replace(rec, state="failed", error="late"))
    assert records.settle("committed", rec.new).state == "failed"  # type: ignore[union-attr]
    # only the candidate commits, only the old agent fails
    records.write(rec)
    assert records.settle("committed", A_ID).state == "starting"  # type: ignore[union-attr]
    assert records.settle("failed", rec.new).state == "starting"  # type: ignore[union-attr]


def test_restarts_in_the_middle_resolve_from_the_record(engine: Engine, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    records = Records(tmp_path)
    rec = start_candidate(engine, records, A_ID, "cam-1", 2, 60.0, print)  # type: ignore[arg-type]
    assert rec.new is not None
    me = {"id": rec.new}
    monkeypatch.setattr("agent._handover.own_container_id", lambda: me["id"])
    # the new agent restarted before it committed: still the candidate
    assert resolve_at_start(engine, tmp_path, print) == "candidate"  # type: ignore[arg-type]
    # the new agent restarted after the commit, before it removed the old one: it finishes
    records.write(replace(rec, state="committed"))
    assert resolve_at_start(engine, tmp_path, print) == "run"  # type: ignore[arg-type]
    assert A_ID not in engine.containers and records.read() is None
    assert engine.inspect(rec.new)["Name"] == "/fleetmesh-agent"


def test_the_old_agent_restarted_after_a_failure_records_it_and_runs(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = Records(tmp_path)
    rec = start_candidate(engine, records, A_ID, "cam-1", 2, 60.0, print)  # type: ignore[arg-type]
    records.write(replace(rec, state="failed", error="the new agent exited with code 3"))
    monkeypatch.setattr("agent._handover.own_container_id", lambda: A_ID)
    assert resolve_at_start(engine, tmp_path, print) == "run"  # type: ignore[arg-type]
    assert set(engine.containers) == {A_ID} and records.read() is None
    j = AppJournal(tmp_path / "apply", AGENT_APP).load()
    assert j is not None and j.failed == (2,) and "code 3" in (j.error or "")
    # replaced (committed) instead: the old agent clears its restart policy and stops
    engine.add(B_ID, "fleetmesh-agent-next", "2" * 64)
    records.write(replace(rec, new=B_ID, state="committed"))
    assert resolve_at_start(engine, tmp_path, print) == "exit"  # type: ignore[arg-type]
    assert engine.inspect(A_ID)["HostConfig"]["RestartPolicy"] == {"Name": "no"}


def test_a_damaged_or_foreign_record_is_dropped(engine: Engine, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent._handover.own_container_id", lambda: A_ID)
    (tmp_path / "handover.json").write_text("{")
    assert resolve_at_start(engine, tmp_path, print) == "run"  # type: ignore[arg-type]
    assert not (tmp_path / "handover.json").exists()
    Records(tmp_path).write(Handover(2, "0" * 32, "c" * 64, "other", "no", 1.0))
    assert resolve_at_start(engine, tmp_path, print) == "run"  # type: ignore[arg-type]
    assert not (tmp_path / "handover.json").exists()


def test_self_view_reads_the_release_label_of_our_container(engine: Engine) -> None:
    assert self_view(engine, A_ID) == SelfView(A_ID, None)  # type: ignore[arg-type]
    engine.add(B_ID, "x", "2" * 64, {"io.fleetmesh.app": AGENT_APP,
                                     "io.fleetmesh.release": "7"})
    assert self_view(engine, B_ID) == SelfView(B_ID, 7)  # type: ignore[arg-type]
    assert self_view(engine, "f" * 64) == SelfView(None)  # type: ignore[arg-type]


def test_record_failure_keeps_the_journal_s_history(tmp_path: Path) -> None:
    journal = AppJournal(tmp_path / "apply", AGENT_APP)
    journal.save(Journal(current=1, failed=(5,), retry_seen=2))
    record_failure(tmp_path, 2, "x")
    j = journal.load()
    assert j == Journal(current=1, failed=(5, 2), retry_seen=2, error="release 2: x")
