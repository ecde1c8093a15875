"""The agent's hand-over to its successor on the device's engine (agent/_selfupdate.py has the
rules): finding our own container, the record file, starting and watching the candidate (the
old agent's side), committing and taking over (the new agent's side), and what an agent does at
start when it finds a record. Synchronous: it runs between two runs of the agent's components,
or in a worker thread.

    DATA/handover.json   the record (agent/_selfupdate.py Handover), written whole (rename)
    DATA/handover.lock   flock()ed by either agent around each read-modify-write of the record
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal

from mesh.blobs import write_atomically

from ._apply_core import LABEL_APP, LABEL_DEVICE, LABEL_RELEASE, Journal, image_tag, one_line
from ._engine import DockerEngine, EngineError, NotFoundError
from ._journal import AppJournal, JournalError
from ._selfupdate import (
    AGENT_APP,
    HANDOVER_ENV,
    HANDOVER_FILE,
    Candidate,
    Handover,
    RecordError,
    SelfView,
    handed_over_failed,
    watch_verdict,
)

LOCK_FILE: Final = "handover.lock"
WATCH_INTERVAL: Final = 0.5
OLD_STOP_TIMEOUT: Final = 10  # the old agent waits in its watch loop: SIGTERM ends it at once
# Docker bind-mounts the container's hostname, hosts and resolv.conf from
# <data-root>/containers/<id>/ whatever the network mode: the ID of the container we run in.
_MOUNT: Final = re.compile(r"/containers/([0-9a-f]{64})/(?:hostname|hosts|resolv\.conf)\s")

Log = Callable[[str], None]


def own_container_id(mountinfo: str | None = None) -> str | None:
    """The ID of the Docker container this process runs in (from /proc/self/mountinfo), None
    outside one (or when it cannot be told)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    m = _MOUNT.search(mountinfo)
    return m.group(1) if m else None


def self_view(engine: DockerEngine, container: str | None = None) -> SelfView:
    """This agent's container in `engine` (found there, not just named by our mounts: the
    engine that runs the apps must be the one that runs us) and the agent release it runs."""
    cid = container if container is not None else own_container_id()
    if cid is None:
        return SelfView(None)
    try:
        info = engine.inspect(cid)
    except EngineError:
        return SelfView(None)
    labels = (info.get("Config") or {}).get("Labels") or {}
    release = labels.get(LABEL_RELEASE) if labels.get(LABEL_APP) == AGENT_APP else None
    ok = isinstance(release, str) and release.isascii() and release.isdigit() \
        and 0 < int(release) < 2**63
    return SelfView(str(info["Id"]), int(release) if ok and release is not None else None)


class Records:
    """The record file and its lock."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir)
        self.path = self.dir / HANDOVER_FILE

    def read(self) -> Handover | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RecordError(f"{self.path}: {one_line(str(exc))}") from None
        try:
            return Handover.loads(data)
        except RecordError as exc:
            raise RecordError(f"{self.path}: {exc}") from None

    def write(self, record: Handover) -> None:
        write_atomically(self.path, record.dumps())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def settle(self, state: Literal["committed", "failed"], who: str,
               error: str | None = None) -> Handover | None:
        """Move the record from `starting` to `state` if `who` may (the candidate commits,
        the old agent fails); the record as it is afterwards (None: there is none)."""
        with self.locked():
            record = self.read()
            if record is None or record.state != "starting":
                return record
            if (record.new if state == "committed" else record.old) != who:
                return record
            record = Handover(**{**_fields(record), "state": state, "error": error})
            self.write(record)
            return record


def _fields(record: Handover) -> dict[str, Any]:
    return {k: getattr(record, k) for k in record.__slots__}


# --------------------------------------------------------------------------- the old agent


def _user_settings(engine: DockerEngine, info: dict[str, Any]) -> tuple[list[str],
                                                                         dict[str, str]]:
    """The environment and labels given to our container, without those its image set."""
    config = info.get("Config") or {}
    try:
        image = engine.image_config(str(info.get("Image", "")))
    except EngineError:
        image = {}
    image_env, image_labels = set(image.get("Env") or ()), image.get("Labels") or {}
    env = [e for e in config.get("Env") or () if e not in image_env
           and not e.startswith(HANDOVER_ENV + "=")]
    labels = {k: v for k, v in (config.get("Labels") or {}).items()
              if image_labels.get(k) != v}
    return env, labels


def start_candidate(engine: DockerEngine, records: Records, me: str, device: str,
                    version: int, timeout_s: float, log: Log,
                    clock: Callable[[], float] = time.time) -> Handover:
    """Create and start the agent of release `version` with our own settings (restart policy
    `no` until it commits); the record says so first, so a crash at any point is resolved by
    `resolve_at_start`. EngineError if the engine refuses (the record is failed then)."""
    info = engine.inspect(me)
    name = str(info.get("Name", "")).lstrip("/") or "fleetmesh-agent"
    host_config = dict(info.get("HostConfig") or {})
    policy = str((host_config.get("RestartPolicy") or {}).get("Name") or "no")
    record = Handover(version, secrets.token_hex(16), me, name, policy,
                      clock() + timeout_s, timeout_s=timeout_s)
    with records.locked():
        records.write(record)
    env, labels = _user_settings(engine, info)
    labels.update({LABEL_DEVICE: device, LABEL_APP: AGENT_APP, LABEL_RELEASE: str(version)})
    host_config["RestartPolicy"] = {"Name": "no", "MaximumRetryCount": 0}
    command = (info.get("Config") or {}).get("Cmd") or None
    try:
        _remove_named(engine, f"{name}-next")  # a leftover of an interrupted hand-over
        new = engine.create_like(f"{name}-next", image_tag(AGENT_APP, version), command,
                                 [*env, f"{HANDOVER_ENV}={record.nonce}"], labels, host_config)
        with records.locked():
            record = Handover(**{**_fields(record), "new": new})
            records.write(record)
        engine.start(new)
    except EngineError as exc:
        records.settle("failed", me, f"cannot start the new agent: {exc}")
        raise
    log(f"release {version}: started the new agent ({new[:12]}); it has {timeout_s:g} s to "
        "join the mesh and report")
    return record


def _remove_named(engine: DockerEngine, name: str) -> None:
    try:
        engine.remove(str(engine.inspect(name)["Id"]))
    except NotFoundError:
        pass


def _candidate(engine: DockerEngine, record: Handover) -> Candidate | None:
    if record.new is None:
        return None
    try:
        state = engine.inspect(record.new).get("State") or {}
    except NotFoundError:
        return None
    except EngineError:
        return Candidate("unknown")  # the engine does not answer now: the deadline decides
    return Candidate(str(state.get("Status", "unknown")), int(state.get("ExitCode") or 0))


def watch(engine: DockerEngine, records: Records, me: str, log: Log,
          clock: Callable[[], float] = time.time,
          sleep: Callable[[float], None] = time.sleep) -> tuple[bool, str]:
    """Wait for the candidate: (True, "") once it committed (it stops us soon after), or
    (False, why) once it failed, after removing it."""
    while True:
        record = records.read()
        if record is None:
            return False, "the hand-over record disappeared"
        verdict, why = watch_verdict(record, _candidate(engine, record), clock())
        if verdict == "committed":
            return True, ""
        if verdict == "fail":
            if record.state == "starting" and record.new is not None:
                last = engine.last_log_line(record.new)
                why = f"{why}: {last}" if last else why
            settled = records.settle("failed", me, why)
            if settled is not None and settled.state == "committed":
                return True, ""  # it committed in the meantime: it won
            if record.new is not None:
                try:
                    engine.remove(record.new)
                except EngineError as exc:  # it finds no record when it commits: it stops
                    log(f"cannot remove the new agent: {exc}")
            return False, (settled.error if settled is not None and settled.error else why)
        sleep(WATCH_INTERVAL)


def record_failure(data_dir: str | os.PathLike[str], version: int, why: str) -> None:
    """The reserved app's journal says release `version` failed here, and why (the agent's
    applier reports it: `release status`)."""
    journal = AppJournal(Path(data_dir) / "apply", AGENT_APP)
    try:
        state = journal.load() or Journal()
    except JournalError:
        state = Journal()
    journal.save(handed_over_failed(state, version, why))


def hand_over(engine: DockerEngine, data_dir: str | os.PathLike[str], me: str, device: str,
              version: int, timeout_s: float, log: Log,
              clock: Callable[[], float] = time.time,
              sleep: Callable[[float], None] = time.sleep) -> bool:
    """The old agent's whole side, its components stopped: True when the new agent took over
    (this process should end), False when it failed (recorded; run the agent again)."""
    records = Records(data_dir)
    try:
        start_candidate(engine, records, me, device, version, timeout_s, log, clock)
    except EngineError as exc:
        why = f"cannot start the new agent: {exc}"
    else:
        committed, why = watch(engine, records, me, log, clock, sleep)
        if committed:
            log(f"release {version}: the new agent took over; this one stops")
            try:
                engine.set_restart_policy(me, "no")
            except EngineError as exc:  # then it comes back, finds the record and stops
                log(f"cannot clear this agent's restart policy: {exc}")
            return True
    log(f"release {version}: {why}; this agent goes on")
    record_failure(data_dir, version, why)
    records.remove()
    return False


# --------------------------------------------------------------------------- the new agent


def commit(engine: DockerEngine, records: Records, me: str, log: Log) -> bool:
    """The candidate joined: take the old agent's restart policy, commit the record, then stop
    and remove the old agent and take its name. False if the old agent failed us first (we
    should exit: it removes us)."""
    record = records.read()
    if record is None or record.new != me or record.state == "failed":
        return False
    engine.set_restart_policy(me, record.restart_policy)
    settled = records.settle("committed", me)
    if settled is None or settled.state != "committed":
        engine.set_restart_policy(me, "no")
        return False
    log(f"release {settled.version}: joined the mesh and reported; taking over from "
        f"{settled.old[:12]}")
    finish_takeover(engine, records, settled, log)
    return True


def finish_takeover(engine: DockerEngine, records: Records, record: Handover, log: Log) -> None:
    """Stop and remove the old agent, take its name, forget the record (each step idempotent:
    a restart does the rest)."""
    assert record.new is not None
    try:
        engine.stop(record.old, timeout=OLD_STOP_TIMEOUT)
    except NotFoundError:
        pass
    engine.remove(record.old)
    if str(engine.inspect(record.new).get("Name", "")).lstrip("/") != record.old_name:
        engine.rename(record.new, record.old_name)
    records.remove()
    log(f"release {record.version}: took over as {record.old_name}")


# --------------------------------------------------------------------------- at start


Start = Literal["run", "candidate", "exit"]


def resolve_at_start(engine: DockerEngine, data_dir: str | os.PathLike[str], log: Log) -> Start:
    """What an agent in a container does at start with the record it finds: `run` (none, or
    resolved now), `candidate` (we are the new agent, not committed yet: run and commit once
    joined) or `exit` (we were replaced, or failed as a candidate)."""
    records = Records(data_dir)
    try:
        record = records.read()
    except RecordError as exc:
        log(f"ignoring the hand-over record: {exc}")
        records.remove()
        return "run"
    if record is None:
        return "run"
    me = self_view(engine).container
    if me is not None and me == record.new:
        if record.state == "committed":
            finish_takeover(engine, records, record, log)
            return "run"
        if record.state == "starting":
            return "candidate"
        return "exit"
    if me is not None and me == record.old:
        if record.state == "committed":
            engine.set_restart_policy(me, "no")
            log(f"release {record.version}: replaced by {str(record.new)[:12]}; stopping")
            return "exit"
        if record.state == "starting":
            log(f"release {record.version}: restarted during the hand-over; watching the new "
                "agent")
            committed, why = watch(engine, records, me, log)
            if committed:
                engine.set_restart_policy(me, "no")
                return "exit"
        else:
            why = record.error or "the hand-over failed"
            if record.new is not None:
                engine.remove(record.new)
        record_failure(data_dir, record.version, why)
        records.remove()
        return "run"
    log(f"ignoring a hand-over record of other containers ({record.old[:12]} -> "
        f"{str(record.new)[:12]})")
    records.remove()
    return "run"


__all__ = ["Records", "commit", "finish_takeover", "hand_over", "own_container_id",
           "record_failure", "resolve_at_start", "self_view", "start_candidate", "watch"]
