"""The apply engine's pure core: one step of the per-app state machine, without I/O.

`decide(app, journal, target, observed, now)` looks at the journal (what the agent was doing,
persisted), the target (what the coordinator wants), and what the Docker engine shows right now
(containers by label, loaded images, the update lock, the last health probe), and returns one
`Step`: a new journal to persist before anything else, or one action for the driver
(agent/_apply_driver.py) to execute, plus the state to report and when to look again. The driver
runs `decide` again after every journal write and action, so the machine converges from any
journal phase and any engine state (docs/architecture.md, principle 2): run twice, it does nothing
the second time, and a process killed anywhere resumes from the journal and `docker ps -a`.

Phases of the journal (`Journal.phase`):

    idle         `current` is committed; leftovers are removed, names fixed, old images pruned;
                 a new target starts an update from here
    stopping     the old container is being stopped (download-then-kill, kill-then-download)
    starting     the new release's image is loaded (downloaded first for kill-then-download),
                 its container created under the second name and started
    checking     the new container runs; commit when its health check passes, roll back when
                 it fails or `health_timeout_s` passes (hand-over: the old one is stopped once
                 the new one is healthy, or after `hand_over_timeout_s`)
    rolling-back the new container is removed and the previous release started again

The old container is only stopped (never removed) until the commit, so a rollback starts it
again as it was; after the commit it is removed and the new container takes the app's name.

Two gates hold an update in `idle` before anything acts on it (`apply_gate`): the target's
`hold` (its rollout phase has not started: `waiting-phase`) and its `window` (outside the
maintenance window in the device's local time: `waiting-window`, with a wake-up at the
opening; `force` overrides the window, never the hold). Both apply only once the release is
downloaded (`downloading` before) and only before an update starts: an apply under way is
never interrupted by a window closing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from mesh.control import APP_STATES, MAX_ERROR_LEN, MAX_FAILED
from mesh.release import (
    HealthCheck,
    HealthKind,
    ReleaseManifest,
    RestartPolicy,
    UpdateStrategy,
)
from mesh.rollout import Window

# A step's `state` is one of the contract's states (docs/api.md, "App status"), defined once in
# mesh.control.APP_STATES; "failed" keeps at most MAX_FAILED versions, an error is one line of at
# most MAX_ERROR_LEN characters (mesh/control.py).
PHASES: Final = ("idle", "stopping", "starting", "checking", "rolling-back")
# A rebuild that lacked a blob (the gossip node said the release was complete, yet the store
# misses one) is not tried again for this long: the target counts as still downloading.
MISSING_BLOB_RETRY_S: Final = 30.0
# No health check in the manifest and no HEALTHCHECK in the image: the container must run this
# long without exiting or restarting (balena's supervisor waits for "running" the same way).
DEFAULT_RUNNING_S: Final = 5.0
DEFAULT_PROBE_INTERVAL_S: Final = 2.0

LABEL_DEVICE: Final = "io.fleetmesh.device"
LABEL_APP: Final = "io.fleetmesh.app"
LABEL_RELEASE: Final = "io.fleetmesh.release"
# Inside every app container: the app creates updates.lock here with O_EXCL to hold updates
# (balena's /tmp/balena/updates.lock). The agent never removes it.
LOCK_MOUNT: Final = "/run/fleetmesh/lock"
LOCK_FILE: Final = "updates.lock"


def container_name(app: str) -> str:
    """The committed release's container."""
    return f"fleetmesh-{app}"


def next_container_name(app: str) -> str:
    """The new release's container until its commit (beside the old one during a hand-over)."""
    return f"fleetmesh-{app}-next"


def image_tag(app: str, version: int) -> str:
    return f"fleetmesh/{app}:{version}"


def image_id(manifest: ReleaseManifest) -> str:
    """Docker's image ID of a release: the sha256 of its image config, exactly as signed."""
    return "sha256:" + hashlib.sha256(manifest.image_config).hexdigest()


def one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_ERROR_LEN else line[:MAX_ERROR_LEN - 3] + "..."


# --------------------------------------------------------------------------- the journal


@dataclass(frozen=True, slots=True)
class Journal:
    """What one app's apply is doing; persisted (agent/_journal.py) before each action."""

    phase: str = "idle"
    current: int | None = None  # the committed release
    previous: int | None = None  # committed before `current`: its image is kept
    to: int | None = None  # the release being applied (phases other than idle)
    health_since: float | None = None  # checking: when the new container was seen started
    failed: tuple[int, ...] = ()  # releases that failed here, oldest first
    retry_seen: int = 0  # highest operator retry counter acted on
    error: str | None = None  # why the last release failed (one line)

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "phase": self.phase, "current": self.current,
                "previous": self.previous, "to": self.to, "health_since": self.health_since,
                "failed": list(self.failed), "retry_seen": self.retry_seen, "error": self.error}

    @classmethod
    def from_json(cls, obj: Any) -> Journal:
        """ValueError for anything that is not a journal this code wrote."""
        if not isinstance(obj, dict) or obj.get("format") != 1:
            raise ValueError("not a format-1 apply journal")

        def version(key: str) -> int | None:
            v = obj.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key}: not a version")
            return v

        phase = obj.get("phase")
        if phase not in PHASES:
            raise ValueError(f"phase: {phase!r} is not one of {', '.join(PHASES)}")
        since = obj.get("health_since")
        if since is not None and (isinstance(since, bool)
                                  or not isinstance(since, (int, float))):
            raise ValueError("health_since: not a time")
        failed = obj.get("failed")
        if not isinstance(failed, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in failed):
            raise ValueError("failed: not a list of versions")
        retry = obj.get("retry_seen")
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise ValueError("retry_seen: not a counter")
        error = obj.get("error")
        if error is not None and not isinstance(error, str):
            raise ValueError("error: not a string")
        j = cls(phase, version("current"), version("previous"), version("to"),
                None if since is None else float(since), tuple(failed[-MAX_FAILED:]), retry,
                None if error is None else one_line(error))
        if j.phase != "idle" and j.to is None:
            raise ValueError(f"phase {j.phase} without a release to apply")
        return j

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()


def _add_failed(failed: tuple[int, ...], version: int) -> tuple[int, ...]:
    return (tuple(v for v in failed if v != version) + (version,))[-MAX_FAILED:]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Target:
    version: int
    manifest: ReleaseManifest  # verified against the pinned release key
    ready: bool = True  # every blob the device needs is in the store
    force: bool = False  # operator: go past the app's update lock and the window
    retry: int = 0  # operator retry counter for this device and app
    hold: bool = False  # rollout: downloaded, not applied until the device's phase starts
    window: Window | None = None  # apply only inside it, in the device's local time
    # The release has no image for this device's platform (VerifiedRelease.platform_error):
    # nothing to fetch or run; the app keeps what runs and reports "no-platform" with this.
    platform_error: str = ""


@dataclass(frozen=True, slots=True)
class ContainerView:
    """One labelled container as `docker ps -a` / `docker inspect` show it."""

    id: str
    name: str
    version: int
    status: str  # Docker's State.Status: created, running, restarting, exited, dead, paused
    started_at: float | None = None  # State.StartedAt (Unix time), None if never started
    health: str | None = None  # State.Health.Status with an image HEALTHCHECK
    exit_code: int = 0
    restart_count: int = 0

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True, slots=True)
class Probe:
    """The last health probe the driver ran (cmd, tcp, http checks)."""

    container: str
    at: float
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class MissingBlob:
    """The driver's last rebuild of `version`, at `at`, found a blob missing from the store."""

    version: int
    at: float


@dataclass(frozen=True, slots=True)
class Observed:
    containers: tuple[ContainerView, ...] = ()  # this app's, by label
    images: frozenset[int] = frozenset()  # versions whose verified image is loaded
    lock_held: bool = False
    probe: Probe | None = None
    missing_blob: MissingBlob | None = None
    # The device's offset from UTC at `now`, seconds east (time.localtime().tm_gmtoff): the
    # target's window is read in local time.
    utc_offset: int = 0


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Load:
    """Rebuild the image from verified blobs, `docker load` it, check its ID, tag it."""

    version: int


@dataclass(frozen=True, slots=True)
class Stop:
    container: str
    version: int


@dataclass(frozen=True, slots=True)
class Remove:
    container: str
    version: int


@dataclass(frozen=True, slots=True)
class Create:
    version: int
    name: str


@dataclass(frozen=True, slots=True)
class Start:
    container: str
    version: int


@dataclass(frozen=True, slots=True)
class Rename:
    container: str
    name: str


@dataclass(frozen=True, slots=True)
class RemoveImage:
    version: int


@dataclass(frozen=True, slots=True)
class RunProbe:
    container: str
    check: HealthCheck


@dataclass(frozen=True, slots=True)
class HandOver:
    """The reserved app `fleetmesh-agent` only (agent/_selfupdate.py): stop this agent and
    start the agent of release `version`, whose image is loaded."""

    version: int


Action = Load | Stop | Remove | Create | Start | Rename | RemoveImage | RunProbe | HandOver


@dataclass(frozen=True, slots=True)
class Step:
    journal: Journal  # persist first when it differs from the input
    action: Action | None
    state: str
    wake_at: float | None = None  # decide again at this time even if nothing else changes
    lock_wait: bool = False  # the update waits for the app's lock: poll it

    def __post_init__(self) -> None:
        assert self.state in APP_STATES, self.state


# --------------------------------------------------------------------------- health


@dataclass(frozen=True, slots=True)
class EffectiveCheck:
    kind: Literal["cmd", "tcp", "http", "running", "docker"]
    check: HealthCheck | None  # the probe to run for cmd/tcp/http
    seconds: float = 0.0  # running
    interval_s: float = DEFAULT_PROBE_INTERVAL_S

    def describe(self) -> str:
        if self.kind == "running":
            return f"running for {self.seconds:g} s"
        if self.kind == "docker":
            return "the image's HEALTHCHECK"
        assert self.check is not None
        if self.kind == "cmd":
            return "command " + " ".join(self.check.command)[:100]
        if self.kind == "tcp":
            return f"tcp port {self.check.port}"
        return f"http port {self.check.port}{self.check.path}"


def image_has_healthcheck(image_config: bytes) -> bool:
    """True if the image config carries a Docker HEALTHCHECK (not `HEALTHCHECK NONE`)."""
    try:
        config = json.loads(image_config)
        test = (config.get("config") or {}).get("Healthcheck", {}).get("Test")
    except (ValueError, AttributeError, TypeError):
        return False
    return isinstance(test, list) and bool(test) and test[0] != "NONE"


def effective_check(manifest: ReleaseManifest) -> EffectiveCheck:
    hc = manifest.container.health_check
    if hc is None:
        if image_has_healthcheck(manifest.image_config):
            return EffectiveCheck("docker", None)
        return EffectiveCheck("running", None, DEFAULT_RUNNING_S, 1.0)
    if hc.kind is HealthKind.RUNNING:
        return EffectiveCheck("running", None, hc.seconds, hc.interval_s)
    return EffectiveCheck(hc.kind.value, hc, 0.0, hc.interval_s)


def _exited_for_good(c: ContainerView, policy: RestartPolicy) -> bool:
    if c.status == "dead":
        return True
    if c.status != "exited":
        return False
    return policy is RestartPolicy.NO or (policy is RestartPolicy.ON_FAILURE
                                          and c.exit_code == 0)


Verdict = tuple[Literal["pass", "fail", "pending"], str]


def health_verdict(check: EffectiveCheck, manifest: ReleaseManifest, c: ContainerView,
                   probe: Probe | None, since: float, now: float) -> Verdict:
    """Whether container `c` of `manifest`'s release has passed its check (seen since `since`)."""
    if _exited_for_good(c, manifest.container.restart_policy):
        return "fail", f"container exited with code {c.exit_code}"
    if not c.running:
        return "pending", ""
    if check.kind == "running":
        if c.started_at is not None and now - max(c.started_at, since) >= check.seconds:
            return "pass", ""
        return "pending", ""
    if check.kind == "docker":
        if c.health == "healthy":
            return "pass", ""
        if c.health == "unhealthy":
            return "fail", "the image's HEALTHCHECK reports unhealthy"
        return "pending", ""
    if probe is not None and probe.container == c.id and probe.at >= since and probe.ok:
        return "pass", ""
    return "pending", ""


# --------------------------------------------------------------------------- the step


def _pick(containers: tuple[ContainerView, ...], version: int | None,
          prefer: str) -> ContainerView | None:
    """The container standing for `version`: a running one, then the one named `prefer`."""
    if version is None:
        return None
    mine = [c for c in containers if c.version == version]
    if not mine:
        return None
    return sorted(mine, key=lambda c: (not c.running, c.name != prefer, c.id))[0]


@dataclass(slots=True)
class _Ctx:
    app: str
    j: Journal
    target: Target | None
    obs: Observed
    now: float
    manifests: Mapping[int, ReleaseManifest] = field(default_factory=dict)

    def step(self, state: str, action: Action | None = None, *, journal: Journal | None = None,
             wake_at: float | None = None, lock_wait: bool = False) -> Step:
        return Step(self.j if journal is None else journal, action, state, wake_at, lock_wait)


def decide(app: str, journal: Journal, target: Target | None, observed: Observed, now: float,
           manifests: Mapping[int, ReleaseManifest] | None = None) -> Step:
    """The next step for `app`. `manifests` holds the verified manifests of the journal's
    releases (current, to) as kept on disk; the target's own manifest is added to them."""
    known = dict(manifests or {})
    target = effective_target(journal, target, observed, now, known)
    if target is not None:
        known[target.version] = target.manifest
    ctx = _Ctx(app, journal, target, observed, now, known)
    if journal.phase == "idle":
        return _idle(ctx)
    if journal.phase in ("stopping", "starting"):
        return _switching(ctx)
    if journal.phase == "checking":
        return _checking(ctx)
    return _rolling_back(ctx)


def effective_target(journal: Journal, target: Target | None, observed: Observed, now: float,
                     manifests: Mapping[int, ReleaseManifest]) -> Target | None:
    """The target the step works towards: the coordinator's, or, restarted mid-update with no
    word from it yet, the journal's release (its manifest was stored before the journal named
    it); not ready while a rebuild that lacked a blob waits MISSING_BLOB_RETRY_S."""
    if target is None and journal.to is not None and journal.to in manifests:
        target = Target(journal.to, manifests[journal.to])
    missing = observed.missing_blob
    if target is not None and missing is not None and missing.version == target.version \
            and now < missing.at + MISSING_BLOB_RETRY_S:
        target = replace(target, ready=False)
    return target


DAY: Final = 86400


def apply_gate(target: Target, utc_offset: int, now: float) -> tuple[str, float | None] | None:
    """Why `target` may not be applied now: ("waiting-phase", None) while held,
    ("waiting-window", the epoch time the window next opens) outside its window, where the
    device's local time is `now + utc_offset`; None when nothing holds it."""
    if target.hold:
        return "waiting-phase", None
    window = target.window
    if window is None or target.force:
        return None
    local = math.floor(now + utc_offset)  # whole local seconds: the window's resolution
    until = window.seconds_until_open(local % DAY)
    if until == 0:
        return None
    return "waiting-window", float(local + until - utc_offset)


def fail_load(journal: Journal, version: int, error: str) -> Journal:
    """The journal after release `version` could not be rebuilt or loaded (verification)."""
    j = replace(journal, failed=_add_failed(journal.failed, version),
                error=one_line(f"release {version}: {error}"))
    if j.phase in ("stopping", "starting") and j.to == version:
        return replace(j, phase="rolling-back")
    return j


def _idle(ctx: _Ctx) -> Step:
    j, t, obs = ctx.j, ctx.target, ctx.obs
    cur = j.current
    if t is not None and t.version == cur and j.error is not None:
        # The target is the release that runs (an operator pinned it back): nothing failed.
        return ctx.step("running", journal=replace(j, error=None))
    if t is not None and t.retry > j.retry_seen:
        return ctx.step("idle", journal=retried(j, t))
    # Leftovers: any container that is not the committed release's (the old one after a commit,
    # the new one after a rollback, strays of an interrupted run).
    keep = _pick(obs.containers, cur, container_name(ctx.app))
    for c in obs.containers:
        if keep is None or c.id != keep.id:
            return ctx.step(_idle_state(ctx), Remove(c.id, c.version))
    updating = t is not None and t.version != cur and t.version not in j.failed
    if keep is not None and keep.name != container_name(ctx.app):
        return ctx.step(_idle_state(ctx), Rename(keep.id, container_name(ctx.app)))
    if not updating and cur is not None:
        if keep is None and cur in obs.images and cur in ctx.manifests:
            return ctx.step(_idle_state(ctx), Create(cur, container_name(ctx.app)))
        if keep is not None and keep.status == "created":
            return ctx.step(_idle_state(ctx), Start(keep.id, cur))
        if keep is not None and _stopped_by_hand(keep, ctx.manifests.get(cur)):
            return ctx.step(_idle_state(ctx), Start(keep.id, cur))
    wanted = {v for v in (cur, j.previous, j.to, None if t is None else t.version)
              if v is not None}
    for v in sorted(obs.images - wanted):
        return ctx.step(_idle_state(ctx), RemoveImage(v))
    if not updating:
        return ctx.step(_idle_state(ctx))
    assert t is not None
    if t.platform_error:  # nothing this device can run: it stays on what it runs
        return ctx.step("no-platform")
    gate = apply_gate(t, obs.utc_offset, ctx.now)
    if gate is not None:  # not even kill-then-download's stop, nor the image's rebuild
        if not t.ready:
            return ctx.step("downloading")
        return ctx.step(gate[0], wake_at=gate[1])
    strategy = t.manifest.container.update_strategy
    locked = obs.lock_held and not t.force and keep is not None and keep.running
    if strategy is not UpdateStrategy.KILL_THEN_DOWNLOAD and t.version not in obs.images:
        if not t.ready:
            return ctx.step("downloading")
        return ctx.step("loading", Load(t.version))
    if locked:
        return ctx.step("waiting-lock", lock_wait=True)
    phase = "starting" if strategy is UpdateStrategy.HAND_OVER or keep is None else "stopping"
    return ctx.step("stopping" if phase == "stopping" else "starting", journal=replace(
        j, phase=phase, to=t.version, health_since=None))


def retried(j: Journal, t: Target) -> Journal:
    """The journal once the operator's retry counter for `t` was acted on: its release may be
    tried again."""
    return replace(j, retry_seen=t.retry, failed=tuple(v for v in j.failed if v != t.version),
                   error=None if t.version in j.failed else j.error)


def _stopped_by_hand(c: ContainerView, m: ReleaseManifest | None) -> bool:
    """The committed release's container is down although its restart policy keeps it up:
    Docker restarts such a container after a crash, but not after `docker stop` or `docker
    kill` on the device (it counts those as the owner's), nor across a daemon restart that
    found it so. The release is the device's target, so the agent starts it again."""
    if m is None or c.status not in ("exited", "dead"):
        return False
    return m.container.restart_policy in (RestartPolicy.UNLESS_STOPPED, RestartPolicy.ALWAYS)


def _idle_state(ctx: _Ctx) -> str:
    t, j = ctx.target, ctx.j
    if t is None:  # no word from the coordinator (yet): what the journal says
        return "failed" if j.error is not None else "idle"
    if t.version in j.failed:
        return "failed"
    if t.version == j.current:
        return "running"
    if t.platform_error:
        return "no-platform"
    if not t.ready:
        return "downloading"
    gate = apply_gate(t, ctx.obs.utc_offset, ctx.now)
    return "loading" if gate is None else gate[0]


def _retarget(ctx: _Ctx) -> Step | None:
    """Stopping/starting: follow a target that changed before the new release was started;
    back to the committed release if the new target may not be applied now (held, or outside
    its window: the gates of `idle` take it from there)."""
    j, t = ctx.j, ctx.target
    if t is None or t.version == j.to:
        return None
    if t.version == j.current or t.version in j.failed or t.platform_error \
            or apply_gate(t, ctx.obs.utc_offset, ctx.now) is not None:
        return ctx.step("rolling-back", journal=replace(j, phase="rolling-back"))
    return ctx.step("stopping" if j.phase == "stopping" else "starting",
                    journal=replace(j, to=t.version))


def _switching(ctx: _Ctx) -> Step:
    j, obs = ctx.j, ctx.obs
    assert j.to is not None
    changed = _retarget(ctx)
    if changed is not None:
        return changed
    manifest = ctx.manifests.get(j.to)
    if manifest is None:  # its manifest is gone (data dir damaged): give up on it, restore
        return ctx.step("rolling-back", journal=replace(
            j, phase="rolling-back", failed=_add_failed(j.failed, j.to),
            error=one_line(f"release {j.to}: its manifest is missing")))
    old = _pick(obs.containers, j.current, container_name(ctx.app))
    if j.phase == "stopping":
        if old is not None and old.running:
            return ctx.step("stopping", Stop(old.id, old.version))
        return ctx.step("starting", journal=replace(j, phase="starting"))
    for c in obs.containers:  # strays: neither the committed release nor the new one
        if c.version not in (j.current, j.to):
            return ctx.step("starting", Remove(c.id, c.version))
    if j.to not in obs.images:
        ready = ctx.target is None or ctx.target.ready
        return ctx.step("loading", Load(j.to)) if ready else ctx.step("downloading")
    new = _pick(obs.containers, j.to, next_container_name(ctx.app))
    if new is None:
        return ctx.step("starting", Create(j.to, next_container_name(ctx.app)))
    if new.status == "created":
        return ctx.step("starting", Start(new.id, new.version))
    return ctx.step("checking-health", journal=replace(j, phase="checking",
                                                       health_since=ctx.now))


def _checking(ctx: _Ctx) -> Step:
    j, obs, now = ctx.j, ctx.obs, ctx.now
    assert j.to is not None
    manifest = ctx.manifests.get(j.to)
    since = ctx.now if j.health_since is None else j.health_since
    new = _pick(obs.containers, j.to, next_container_name(ctx.app))
    if manifest is None or new is None:
        why = "its manifest is missing" if manifest is None else "its container disappeared"
        return _fail(ctx, why)
    check = effective_check(manifest)
    verdict, why = health_verdict(check, manifest, new, obs.probe, since, now)
    if verdict == "pass":
        return ctx.step("running", journal=replace(
            j, phase="idle", current=j.to, previous=j.current if j.current != j.to
            else j.previous, to=None, health_since=None, error=None))
    if verdict == "fail":
        return _fail(ctx, why)
    deadline = since + manifest.container.health_timeout_s
    if now >= deadline:
        p = obs.probe
        if check.kind in ("cmd", "tcp", "http") and new.running and check.check is not None \
                and (p is None or p.container != new.id or p.at < deadline):
            # The verdict comes from a probe taken now, never from time alone: an agent that
            # was down (killed, restarting with backoff) past the deadline must not roll back
            # a release that is healthy.
            return ctx.step("checking-health", RunProbe(new.id, check.check))
        return _fail(ctx, f"not healthy within {manifest.container.health_timeout_s:g} s "
                          f"({check.describe()})")
    wake = deadline
    if manifest.container.update_strategy is UpdateStrategy.HAND_OVER:
        old = _pick(obs.containers, j.current, container_name(ctx.app))
        handover_end = since + manifest.container.hand_over_timeout_s
        if old is not None and old.running:
            if now >= handover_end:
                return ctx.step("checking-health", Stop(old.id, old.version))
            wake = min(wake, handover_end)
    if check.kind in ("cmd", "tcp", "http") and new.running:
        assert check.check is not None
        p = obs.probe
        if p is None or p.container != new.id or p.at < since or now >= p.at + check.interval_s:
            return ctx.step("checking-health", RunProbe(new.id, check.check))
        wake = min(wake, p.at + check.interval_s)
    elif check.kind == "running" and new.running and new.started_at is not None:
        wake = min(wake, max(new.started_at, since) + check.seconds)
    else:  # docker's own HEALTHCHECK, or a container (re)starting: look again soon
        wake = min(wake, now + check.interval_s)
    return ctx.step("checking-health", wake_at=wake)


def _fail(ctx: _Ctx, why: str) -> Step:
    j = ctx.j
    assert j.to is not None
    return ctx.step("rolling-back", journal=replace(
        j, phase="rolling-back", failed=_add_failed(j.failed, j.to),
        error=one_line(f"release {j.to}: {why}")))


def _rolling_back(ctx: _Ctx) -> Step:
    j, obs = ctx.j, ctx.obs
    for c in obs.containers:
        if c.version != j.current:
            return ctx.step("rolling-back", Remove(c.id, c.version))
    idle = replace(j, phase="idle", to=None, health_since=None)
    state = "failed" if j.error is not None and j.to in j.failed else "running"
    if j.current is None:
        return ctx.step("failed" if j.error else "idle", journal=idle)
    old = _pick(obs.containers, j.current, container_name(ctx.app))
    if old is None:
        if j.current in obs.images and j.current in ctx.manifests:
            return ctx.step("rolling-back", Create(j.current, container_name(ctx.app)))
        return ctx.step("failed", journal=replace(idle, error=one_line(
            f"{j.error or 'rollback'}; cannot restore release {j.current}: its image or "
            "manifest is gone")))
    if not old.running and old.status != "restarting":
        return ctx.step("rolling-back", Start(old.id, old.version))
    return ctx.step(state, journal=idle)


def running_version(journal: Journal, observed: Observed) -> int | None:
    """The version running now: the committed one if its container runs, else any running."""
    running = [c for c in observed.containers if c.running]
    if any(c.version == journal.current for c in running):
        return journal.current
    return max((c.version for c in running), default=None)


__all__ = [
    "DAY", "DEFAULT_RUNNING_S", "LABEL_APP", "LABEL_DEVICE", "LABEL_RELEASE", "LOCK_FILE",
    "LOCK_MOUNT", "MISSING_BLOB_RETRY_S", "Action", "ContainerView", "Create", "EffectiveCheck",
    "HandOver", "Journal", "Load", "MissingBlob", "Observed", "Probe", "Remove", "RemoveImage",
    "Rename", "RunProbe", "Start", "Step", "Stop", "Target", "apply_gate", "container_name",
    "decide", "effective_check", "effective_target", "fail_load", "health_verdict",
    "image_has_healthcheck", "image_id", "image_tag", "next_container_name", "one_line", "retried",
    "running_version",
]
