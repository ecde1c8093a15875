"""The agent updating itself, without I/O: the reserved app `fleetmesh-agent` and the hand-over
record its two agents share (docs/services.md, "The agent updates itself").

A release of the app `fleetmesh-agent` is an image of the agent. It travels like any release
(gossip, LAN first, deltas against the running agent's own layers, rollout phases and windows);
only its last step differs. An app's new container is started beside the old one and checked by
the agent; an agent cannot check its successor while it holds the WireGuard interface, the mesh
ports and the data directory the successor needs. So the running agent (A):

1. loads the release's image (`decide_agent` -> `Load`), then, gates passed, records the
   hand-over in its journal (phase `starting`) and asks its caller to hand over (`HandOver`);
2. its caller stops A's components (WireGuard down, ports closed), writes the hand-over record
   (`Handover`, DATA/handover.json) and starts the candidate (B): a container of the new image
   with A's own settings (binds, capabilities, devices, host network, command), restart
   policy `no`;
3. watches B (`watch_verdict`): B commits the record itself once it has joined the mesh (a
   handshake with the hub) and the coordinator accepted a report from it, then stops and
   removes A and takes A's name and restart policy. B that exits before, or is not committed
   by the deadline (the release's health timeout), fails the release: A removes B, writes the
   failure into the app's journal and runs again, so a broken agent release leaves the device on
   the old agent, online, with the reason in `release status`.

The record is the only thing both processes write, each under an exclusive lock on the file, and
its state moves once from `starting` to `committed` (by B) or `failed` (by A): whoever comes
first decides. An agent that is not in a container of its engine (a process under systemd)
cannot be replaced this way: its status for the reserved app says so.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from ._apply_core import (
    HandOver,
    Journal,
    Load,
    Observed,
    RemoveImage,
    Step,
    Target,
    _add_failed,
    apply_gate,
    one_line,
    retried,
)

AGENT_APP: Final = "fleetmesh-agent"
HANDOVER_FILE: Final = "handover.json"
# The candidate's environment names the record it belongs to (the record's nonce): a container
# started from another record, or by hand, is never taken for the candidate.
HANDOVER_ENV: Final = "FLEETMESH_HANDOVER"
STATES: Final = ("starting", "committed", "failed")
NOT_IN_CONTAINER: Final = ("this agent does not run in a container of its Docker engine: "
                           "agent releases replace only an agent container (docs/services.md)")
_ID: Final = re.compile(r"[0-9a-f]{64}")
_NONCE: Final = re.compile(r"[0-9a-f]{32}")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_POLICIES: Final = ("no", "always", "unless-stopped", "on-failure")


@dataclass(frozen=True, slots=True)
class SelfView:
    """What the running agent knows of itself: its container (None: not in one), and the
    release of the reserved app that container runs (None: started by hand from an image)."""

    container: str | None
    release: int | None = None
    # we are the new agent of a hand-over that has not committed yet (its record says so)
    handing_over: bool = False


def decide_agent(journal: Journal, target: Target | None, observed: Observed, me: SelfView,
                 now: float) -> Step:
    """The reserved app's next step: `Load` the target's image, then (journal first) `HandOver`;
    the state to report, as for an app (`running` is the agent running the target)."""
    j, t = journal, target
    cur = me.release
    if me.handing_over:  # the new agent, not committed yet: the release is still starting
        return Step(j, None, "starting")
    if j.phase != "idle" and j.to == cur:  # we are the agent the record handed over to
        return Step(replace(j, phase="idle", current=cur, to=None, health_since=None,
                            previous=j.current if j.current != cur else j.previous,
                            error=None), None, "running")
    if j.current != cur and j.phase == "idle":
        return Step(replace(j, current=cur), None, "idle")
    if t is not None and t.retry > j.retry_seen:
        return Step(retried(j, t), None, "idle")
    keep = {v for v in (cur, j.to, None if t is None else t.version) if v is not None}
    if t is None or t.version == cur:
        for v in sorted(observed.images - keep):
            return Step(j, RemoveImage(v), "running" if t is not None else "idle")
        return Step(j, None, "running" if cur is not None and t is not None else "idle")
    if t.version in j.failed:
        return Step(j, None, "failed")
    if t.platform_error:
        return Step(j, None, "no-platform")
    if me.container is None:
        return Step(replace(j, error=NOT_IN_CONTAINER), None, "failed")
    if j.phase != "idle":
        return Step(j, HandOver(t.version) if j.to == t.version else None, "starting")
    gate = apply_gate(t, observed.utc_offset, now)
    if gate is not None:
        if not t.ready:
            return Step(j, None, "downloading")
        return Step(j, None, gate[0], gate[1])
    if t.version not in observed.images:
        if not t.ready:
            return Step(j, None, "downloading")
        return Step(j, Load(t.version), "loading")
    return Step(replace(j, phase="starting", to=t.version, health_since=None), None,
                "starting")


def handed_over_failed(journal: Journal, version: int, why: str) -> Journal:
    """The reserved app's journal once release `version`'s agent failed to take over."""
    return replace(journal, phase="idle", to=None, health_since=None,
                   failed=_add_failed(journal.failed, version),
                   error=one_line(f"release {version}: {why}"))


# --------------------------------------------------------------------------- the record


class RecordError(ValueError):
    """A hand-over record this code did not write."""


@dataclass(frozen=True, slots=True)
class Handover:
    """DATA/handover.json: the old agent's container (`old`, its name and restart policy, to
    be taken over), the candidate's (`new`, None until created), the release, the nonce in the
    candidate's environment, the deadline (epoch seconds) and the state."""

    version: int
    nonce: str
    old: str
    old_name: str
    restart_policy: str
    deadline: float
    state: str = "starting"
    new: str | None = None
    error: str | None = None
    timeout_s: float = 0.0  # the deadline, from when the old agent stopped

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "version": self.version, "nonce": self.nonce, "old": self.old,
                "old_name": self.old_name, "restart_policy": self.restart_policy,
                "deadline": self.deadline, "state": self.state, "new": self.new,
                "error": self.error, "timeout_s": self.timeout_s}

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def loads(cls, data: bytes) -> Handover:
        try:
            obj = json.loads(data)
        except ValueError:
            raise RecordError("not JSON") from None
        if not isinstance(obj, dict) or obj.get("format") != 1:
            raise RecordError("not a format-1 hand-over record")
        version, deadline = obj.get("version"), obj.get("deadline")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RecordError("version: not a version")
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) \
                or not math.isfinite(deadline):
            raise RecordError("deadline: not a time")

        def text(key: str, pattern: re.Pattern[str], optional: bool = False) -> str | None:
            v = obj.get(key)
            if v is None and optional:
                return None
            if not isinstance(v, str) or not pattern.fullmatch(v):
                raise RecordError(f"{key}: malformed")
            return v

        state, policy, error = obj.get("state"), obj.get("restart_policy"), obj.get("error")
        if state not in STATES:
            raise RecordError(f"state: not one of {', '.join(STATES)}")
        if policy not in _POLICIES:
            raise RecordError("restart_policy: not a restart policy")
        if error is not None and not isinstance(error, str):
            raise RecordError("error: not a string")
        timeout = obj.get("timeout_s", 0.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not math.isfinite(timeout) or timeout < 0:
            raise RecordError("timeout_s: not a duration")
        return cls(version, str(text("nonce", _NONCE)), str(text("old", _ID)),
                   str(text("old_name", _NAME)), policy, float(deadline), state,
                   text("new", _ID, optional=True),
                   None if error is None else one_line(error), float(timeout))


@dataclass(frozen=True, slots=True)
class Candidate:
    """The candidate container as the engine shows it (None: gone)."""

    status: str  # created, running, restarting, exited, dead, ...
    exit_code: int = 0


Verdict = tuple[Literal["wait", "committed", "fail"], str]


def watch_verdict(record: Handover, candidate: Candidate | None, now: float) -> Verdict:
    """What the old agent does next while it waits for its successor."""
    if record.state == "committed":
        return "committed", ""
    if record.state == "failed":
        return "fail", record.error or "the hand-over failed"
    if candidate is None:
        return "fail", "the new agent's container disappeared"
    if candidate.status in ("exited", "dead"):
        return "fail", f"the new agent exited with code {candidate.exit_code} before it joined"
    if now >= record.deadline:
        return "fail", (f"the new agent did not join the mesh and report within "
                        f"{record.timeout_s:g} s")
    return "wait", ""


__all__ = ["AGENT_APP", "HANDOVER_ENV", "HANDOVER_FILE", "NOT_IN_CONTAINER", "Candidate",
           "HandOver", "Handover", "RecordError", "SelfView", "decide_agent",
           "handed_over_failed", "watch_verdict"]
