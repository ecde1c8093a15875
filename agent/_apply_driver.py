"""The apply engine's driver: targets in, containers on the device's Docker engine out.

    applier = Applier(device="cam-1", fleet="cams", data_dir=Path("/var/lib/fleetmesh"),
                      engine=DockerEngine(), store=BlobStore(data / "blobs"),
                      release_key_hex=enrollment.release_key, log=log)
    async with trio.open_nursery() as nursery:
        await nursery.start(applier.run)
        applier.set_target(release, ready=True, force=False, retry=0, pin=None)
        applier.statuses()        # [mesh.control.AppStatus] (docs/api.md, "App status")
        await applier.changed().wait()   # a status changed (state, running, target, error)
        applier.logs.take(1000)   # the app containers' log lines

Each round runs, per app and in a worker thread (`trio.to_thread.run_sync`): observe the
engine (`docker ps -a` by label, the `fleetmesh/<app>:<v>` images, the update lock, a rebuild
that lacked a blob), ask the pure core (agent/_apply_core.py `decide`, which makes every
decision) for one step, persist the journal it returns (agent/_journal.py: atomic, fsynced) or
execute the one action, and repeat until nothing is left to do; then sleep until the next
deadline (health probe, hand-over, timeout, a maintenance window's opening), a new target, the
lock poll (1 s while an update waits for it) or RECONCILE_PERIOD_S. Crash points
(agent/_crashpoints.py) sit between the journal writes and the engine calls.
docs/agent-apply.md tells the whole story.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import trio
from nacl.signing import VerifyKey

from mesh.control import MAX_APPS, AppStatus, SourceBytes
from mesh.image import MaterializeError, materialize_release
from mesh.release import (
    ChunkError,
    ReleaseError,
    ReleaseManifest,
    SignedPin,
    VerifiedRelease,
    admit_release,
    decode_signed_pin,
    diff_id,
    key_id,
    open_stored_chunk,
)
from mesh.rollout import Window

from ._applogs import LogBuffer, LogCollector
from ._apply_core import (
    LABEL_APP,
    LABEL_DEVICE,
    LABEL_RELEASE,
    LOCK_FILE,
    LOCK_MOUNT,
    Action,
    Create,
    Journal,
    Load,
    MissingBlob,
    Observed,
    Probe,
    Remove,
    RemoveImage,
    Rename,
    RunProbe,
    Start,
    Step,
    Stop,
    Target,
    decide,
    fail_load,
    image_id,
    image_tag,
    one_line,
    running_version,
)
from ._blobstore import BlobStore
from ._crashpoints import crash_point
from ._engine import ContainerSpec, DockerEngine, EngineError
from ._handover import Records, self_view
from ._health import probe
from ._journal import AppJournal, JournalError, atomic_write, journal_apps
from ._selfupdate import AGENT_APP, HandOver, RecordError, SelfView, decide_agent

RECONCILE_PERIOD_S: Final = 10.0  # look at the engine this often even when nothing happens
LOCK_POLL_S: Final = 1.0  # an update waiting for the app's lock proceeds within ~1 s of release
ENGINE_RETRY_S: Final = 5.0  # after a Docker error
MAX_STEPS_PER_ROUND: Final = 64  # a bug that loops is logged, not spun on forever


def local_utc_offset(now: float) -> int:
    """The device's offset from UTC at `now`, seconds east (TZ, else the system's zone)."""
    return time.localtime(now).tm_gmtoff


def stderr_log(message: str) -> None:
    print(f"fleetmesh-agent: apply: {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class _App:
    name: str
    journal: AppJournal
    state: Journal = Journal()
    loaded: bool = False  # journal read (or the state adopted from the engine)
    target: Target | None = None
    releases: dict[int, VerifiedRelease] | None = None  # the targets' releases, by version
    probe: Probe | None = None
    status_state: str = "idle"
    engine_error: str | None = None
    logged_error: str | None = None  # the last engine/disk error logged (logged once)
    missing_blob: MissingBlob | None = None  # the last rebuild lacked a blob
    lock_since: float | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    by_source: dict[str, int] | None = None
    running: int | None = None
    updated_at: float = 0.0
    wake_at: float | None = None
    unremovable: frozenset[int] = frozenset()
    container_ids: frozenset[str] = frozenset()  # as last observed (log bookkeeping)
    # The newest version ever accepted as a target (or named by the journal): an older target
    # needs a signed pin even while no container runs. Kept in high_water.json (_journal).
    high_water: int | None = None
    high_water_saved: int | None = None  # what the file says
    # The serial of the newest operator pin acted on, and whether a later target without it
    # was accepted since (the pin is spent): a pin below, or the spent one, is a replay.
    # Kept in pin.json (_journal), written like the mark.
    pin_state: tuple[int, bool] = (0, False)
    pin_state_saved: tuple[int, bool] = (0, False)

    def min_pin_serial(self) -> int:
        serial, spent = self.pin_state
        return serial + 1 if spent else serial

    def raise_high_water(self, *versions: int | None) -> None:
        self.high_water = max((v for v in (self.high_water, *versions) if v is not None),
                              default=None)



def _error_text(exc: BaseException) -> str:
    """One line for an app's error; a full disk says so first."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full: {one_line(str(exc))}"
    return one_line(str(exc))

class Applier:
    def __init__(self, *, device: str, fleet: str | None, data_dir: str | os.PathLike[str],
                 engine: DockerEngine | Any, store: BlobStore | None, release_key_hex: str,
                 log: Callable[[str], None] = stderr_log,
                 crash: Callable[[str], None] = crash_point,
                 clock: Callable[[], float] = time.time, follow_logs: bool = True,
                 log_buffer: LogBuffer | None = None,
                 utc_offset: Callable[[float], int] = local_utc_offset,
                 platform: str | None = None,
                 on_handover: Callable[[int, float], None] | None = None,
                 me: SelfView | None = None) -> None:
        """`on_handover(version, timeout_s)`: the reserved app `fleetmesh-agent` asks to hand
        the device over to the agent of that release (agent/_selfupdate.py), called in trio's
        thread; `me`: this agent's container (default: looked up in `engine` at the first
        step of the reserved app)."""
        self.device = device
        # the device's platform: releases read back from disk are narrowed to it, as the
        # node narrowed them when they arrived (VerifiedRelease)
        self.platform = platform
        self.fleet = fleet
        self.data_dir = Path(data_dir)
        self.engine = engine
        self.store = store
        self.key = VerifyKey(bytes.fromhex(release_key_hex))
        self.key_id = key_id(self.key)
        self.log = log
        self.crash = crash
        self.clock = clock
        self.utc_offset = utc_offset  # the local time a target's window is read in
        self.logs = log_buffer or LogBuffer()
        self.on_handover = on_handover
        self._me = me
        self._own_layers: frozenset[str] | None = None
        self._own_image = ""  # the image ID our container runs, once looked up
        self._collector = LogCollector(engine, self.logs, log) if follow_logs else None
        self._apps: dict[str, _App] = {}
        self._apps_lock = threading.Lock()  # set_target (trio thread) adds apps
        self._releases: dict[tuple[str, int], VerifiedRelease] = {}
        self._refused: set[tuple[str, int]] = set()  # logged once each
        self._diff_ids: frozenset[str] = frozenset()
        self._created_here: set[str] = set()
        self._started_at = clock()
        self._wakeup = trio.Event()
        self._changed = trio.Event()
        # set once `local_diff_ids()` holds the engine's layers (the mesh node waits for it)
        self.layers_known = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None  # run(): statuses change in threads
        self._reported: dict[str, AppStatus] = {}  # as last announced by changed()
        self.apply_dir = self.data_dir / "apply"
        self.work_dir = self.apply_dir / ".work"
        self.layer_dir = self.apply_dir / ".layers"
        for app in journal_apps(self.apply_dir):
            self._app(app)

    # ------------------------------------------------------------------ the lead's interface

    def set_target(self, release: VerifiedRelease, *, ready: bool, force: bool = False,
                   retry: int = 0, pin: bytes | None = None, hold: bool = False,
                   window: Window | None = None) -> bool:
        """The release its app should run (`hold`: download only, its rollout phase has not
        started; `window`: apply only inside it, in local time, unless `force`); False (logged
        once, nothing changes) if it is not signed with the pinned key for this fleet, or,
        without `pin` (an encoded SignedPin the operator signed for it), is not newer than the
        running or committed release or is older than the app's high-water mark, the newest
        version this device ever accepted (mesh.release `admit_release`: never back on the
        coordinator's word alone, also while no container runs: a crash loop, a stopped app,
        a kill-then-download update)."""
        manifest = release.manifest
        app, version = manifest.app, manifest.version
        if release.key_id != self.key_id or (self.fleet is not None
                                              and manifest.fleet != self.fleet):
            self._refuse(app, version, f"target for {app} refused: release {manifest.fleet}/"
                                       f"{app} v{version} signed by key {release.key_id}")
            return False
        a = self._app(app)
        if a is None:
            return False
        running, committed = a.running, a.state.current
        # the release that runs, or is committed, is no replay: only an older one needs a pin
        in_place = version in (running, committed)
        newest_in_place = max(self._floor(a, running, committed), default=None)
        try:
            used = admit_release(manifest, self.key, None if in_place else newest_in_place,
                                 pins=_pins(pin), device=self.device,
                                 newest_accepted=None if in_place else a.high_water,
                                 now=self.clock(), min_pin_serial=a.min_pin_serial())
        except ReleaseError as exc:
            self._refuse(app, version, f"release {manifest.fleet}/{app} v{version} refused: "
                                       f"{exc}: no valid signed pin; staying")
            return False
        # both persisted by the next step, before anything acts on the target
        a.raise_high_water(version)
        if used is not None:
            a.pin_state = (used.serial, False)
        elif not in_place and a.pin_state[0]:
            a.pin_state = (a.pin_state[0], True)
        self._releases[(app, version)] = release
        old = a.target
        keep = {v for v in (a.state.current, a.state.previous, a.state.to, version)
                if v is not None}
        a.releases = {v: r for v, r in (a.releases or {}).items() if v in keep}
        a.releases[version] = release  # before the target names it (worker thread)
        a.target = Target(version, manifest, ready, force, max(0, retry), hold, window,
                          release.platform_error)
        if ready and a.missing_blob is not None:
            a.missing_blob = None
        if old != a.target:
            self._wakeup.set()
        return True

    def clear_target(self, app: str) -> None:
        """No target for `app` any more: it keeps running what it runs."""
        a = self._apps.get(app)
        if a is not None and a.target is not None:
            a.target = None
            self._wakeup.set()

    def set_progress(self, app: str, bytes_done: int, bytes_total: int,
                     by_source: Mapping[str, int] | None = None) -> None:
        """Download progress of `app`'s target (from the gossip node)."""
        a = self._apps.get(app)
        if a is None:
            return
        a.bytes_done, a.bytes_total = max(0, bytes_done), max(0, bytes_total)
        if by_source is not None:
            a.by_source = {k: int(by_source.get(k, 0)) for k in ("lan", "wan_peer",
                                                                 "coordinator")}

    def local_diff_ids(self) -> frozenset[str]:
        """Diff IDs of the images the device's fleetmesh containers run (the delta bases the
        engine can export); refreshed after every round."""
        return self._diff_ids

    def status(self, app: str) -> AppStatus | None:
        a = self._apps.get(app)
        return None if a is None else self._status(a)

    def statuses(self) -> list[AppStatus]:
        return [self._status(self._apps[name]) for name in sorted(self._apps)]

    def changed(self) -> trio.Event:
        """Set at the next change of an app's status other than its byte counts and time
        (state, running, target, error…), also while a round runs (a long "loading" shows);
        each call after it fired returns a fresh event."""
        return self._changed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        await trio.to_thread.run_sync(self._refresh_diff_ids)
        self.layers_known.set()
        await trio.to_thread.run_sync(self.reconcile_all)
        task_status.started()
        while True:
            self._wakeup = trio.Event()
            wake = await trio.to_thread.run_sync(self.reconcile_all)
            delay = max(0.0, min(wake - self.clock(), RECONCILE_PERIOD_S))
            with trio.move_on_after(delay):
                await self._wakeup.wait()

    # ------------------------------------------------------------------ synchronous core loop

    def reconcile_all(self) -> float:
        """Bring every app as far as it goes now; the time to look again."""
        now = self.clock()
        wake = now + RECONCILE_PERIOD_S
        with self._apps_lock:
            apps = sorted(self._apps.items())
        for name, a in apps:
            self.reconcile(name)
            if a.wake_at is not None:
                wake = min(wake, a.wake_at)
        self._refresh_diff_ids()
        if self._collector is not None:
            self._collector.forget(frozenset().union(*(a.container_ids for _, a in apps)))
        return wake

    def reconcile(self, app: str) -> Step | None:
        """Steps for `app` until one has nothing to do (or waits); the last step."""
        a = self._apps[app]
        last: Step | None = None
        for _ in range(MAX_STEPS_PER_ROUND):
            try:
                last, progressed = self.step(app)
            except (EngineError, JournalError, OSError) as exc:
                # The engine, the journal or our own disk (a full one: ENOSPC while a release
                # is rebuilt): the app's error, retried; never the agent's end (issue 13).
                a.engine_error = _error_text(exc)
                if not isinstance(exc, (EngineError, JournalError)):
                    shutil.rmtree(self.work_dir, ignore_errors=True)  # nothing half-built
                a.wake_at = self.clock() + ENGINE_RETRY_S
                if a.engine_error != a.logged_error:  # once per distinct error, not per retry
                    self.log(f"{app}: {a.engine_error}")
                    a.logged_error = a.engine_error
                self._announce(a)
                return last
            if not progressed:
                a.logged_error = None
                return last
        self.log(f"{app}: still busy after {MAX_STEPS_PER_ROUND} steps; continuing next round")
        a.wake_at = self.clock()
        return last

    def step(self, app: str) -> tuple[Step, bool]:
        """One observe-decide-act step; (the step, whether anything changed)."""
        a = self._apps[app]
        now = self.clock()
        if not a.loaded:
            self._load_journal(a)
        # set_target raises the mark before it sets the target: with the target taken first,
        # the mark written here covers it, before any step acts on it
        target = a.target
        if a.high_water is not None and a.high_water != a.high_water_saved:
            a.journal.save_high_water(a.high_water)
            a.high_water_saved = a.high_water
        if a.pin_state != a.pin_state_saved:
            a.journal.save_pin_state(*a.pin_state)
            a.pin_state_saved = a.pin_state
        manifests = self._journal_manifests(a)
        observed = self._observe(a, manifests, now)
        if app == AGENT_APP:
            s = decide_agent(a.state, target, observed, self._me_now(), now)
        else:
            s = decide(app, a.state, target, observed, now, manifests)
        if s.state != a.status_state and target is not None:
            self._log_gate(app, s, target)
        a.status_state = s.state
        a.engine_error = None
        a.wake_at = now + LOCK_POLL_S if s.lock_wait else s.wake_at
        a.running = self.me().release if app == AGENT_APP else running_version(a.state,
                                                                                observed)
        a.updated_at = now
        self._announce(a)
        if s.journal != a.state:
            assert s.action is None
            self._write_journal(a, s.journal)
            return s, True
        if s.action is None:
            if app != AGENT_APP:  # the agent's own output is not an app's log
                self._follow_logs(a, observed)
            return s, False
        if isinstance(s.action, HandOver):
            self._hand_over(a, s.action.version)
            return s, False  # the agent stops its components now
        self._execute(a, s.action, manifests, now)
        return s, True

    def me(self) -> SelfView:
        """This agent's container and the agent release it runs (looked up once)."""
        if self._me is None:
            self._me = self_view(self.engine) if isinstance(self.engine, DockerEngine) \
                else SelfView(None)
        return self._me

    def _me_now(self) -> SelfView:
        """`me()`, and whether we are a hand-over's new agent not committed yet."""
        me = self.me()
        if me.container is None:
            return me
        try:
            record = Records(self.data_dir).read()
        except RecordError as exc:
            raise JournalError(str(exc)) from None
        pending = record is not None and record.new == me.container \
            and record.state == "starting"
        return replace(me, handing_over=pending)

    def wake(self) -> None:
        """Reconcile now (called in trio's thread): the hand-over committed."""
        self._wakeup.set()

    def _hand_over(self, a: _App, version: int) -> None:
        release = (a.releases or {}).get(version) or self._release(a.name, version)
        if release is None:
            raise JournalError(f"{a.name}: no manifest for release {version}")
        if self.on_handover is None:
            raise EngineError(f"{a.name}: this applier cannot hand the agent over")
        timeout = release.manifest.container.health_timeout_s
        self.log(f"{a.name}: release {version} loaded; handing over to its agent")
        trio.from_thread.run_sync(self.on_handover, version, timeout)

    def _log_gate(self, app: str, s: Step, target: Target) -> None:
        """Say once, when an app starts waiting for a rollout gate, what it waits for."""
        if s.state == "waiting-phase":
            self.log(f"{app}: release {target.version} downloaded; held until its rollout "
                     "phase starts")
        elif s.state == "waiting-window" and s.wake_at is not None:
            opens = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.wake_at))
            self.log(f"{app}: release {target.version} downloaded; waits for its window "
                     f"{target.window} (device-local time), which opens at {opens}")

    # ------------------------------------------------------------------ observing

    def _app(self, app: str) -> _App | None:
        a = self._apps.get(app)
        if a is not None:
            return a
        if len(self._apps) >= MAX_APPS:
            self.log(f"{app}: more than {MAX_APPS} apps; ignored")
            return None
        a = _App(app, AppJournal(self.apply_dir, app))
        self._seed_high_water(a)  # before the worker thread can see the app
        with self._apps_lock:  # only set_target and the constructor add apps, one at a time
            return self._apps.setdefault(app, a)

    def _floor(self, a: _App, *versions: int | None) -> list[int]:
        """The versions among `versions` that hold a rollback floor: all but those whose
        stored manifest is signed by another key than ours, i.e. accepted under a release key
        the fleet's root metadata has since replaced (fast-forward recovery, docs/security.md
        "Release key rotation": a thief's v1000 must not block the new key's v4)."""
        return [v for v in versions
                if v is not None and not a.journal.signed_by_other_key(v, self.key_id)]

    def _seed_high_water(self, a: _App) -> None:
        """The persisted mark, raised to what the journal names: an agent upgraded from one
        that kept no mark starts from the releases it committed, applied or saw fail."""
        try:
            a.high_water = a.high_water_saved = a.journal.high_water()
        except JournalError as exc:
            self.log(f"{exc}; taking the newest release the journal names")
        try:
            a.pin_state = a.pin_state_saved = a.journal.pin_state()
        except JournalError as exc:
            # unreadable: no pin below the present time can be trusted to be new
            a.pin_state = (int(self.clock() * 1_000_000), True)
            self.log(f"{exc}; taking only pins signed from now on")
        try:
            j = a.journal.load()
        except JournalError:
            j = None  # reported when the step loads it
        if j is not None:
            a.raise_high_water(*self._floor(a, j.current, j.to, *j.failed))

    def _load_journal(self, a: _App) -> None:
        """Read the journal; without one (or a corrupt one) the running labelled container,
        if any, is taken as the committed release."""
        try:
            state = a.journal.load()
        except JournalError as exc:
            self.log(f"{exc}; starting from what the engine shows")
            state = None
        if state is None:  # the running container, else the newest one, is the committed one
            found = self.engine.containers(self.device, a.name)
            running = [c.version for c in found if c.running]
            versions = running or [c.version for c in found]
            state = Journal(current=max(versions)) if versions else Journal()
        a.state = state
        a.loaded = True
        a.raise_high_water(*self._floor(a, state.current, state.to, *state.failed))

    def _release(self, app: str, version: int) -> VerifiedRelease | None:
        """A release this process verified, else the journal's copy, verified on reading."""
        r = self._releases.get((app, version))
        if r is None:
            r = self._apps[app].journal.release(version, self.key, self.fleet, self.platform)
            if r is not None:
                self._releases[(app, version)] = r
        return r

    def _manifest(self, app: str, version: int) -> ReleaseManifest | None:
        r = self._release(app, version)
        return None if r is None else r.manifest

    def _journal_manifests(self, a: _App) -> dict[int, ReleaseManifest]:
        out = {}
        for v in (a.state.current, a.state.previous, a.state.to):
            if v is not None and (m := self._manifest(a.name, v)) is not None:
                out[v] = m
        return out

    def lock_dir(self, app: str) -> Path:
        """The host side of the app's lock directory (mounted at /run/fleetmesh/lock)."""
        return self.data_dir / "locks" / app

    def _observe(self, a: _App, manifests: Mapping[int, ReleaseManifest],
                 now: float) -> Observed:
        containers = tuple(self.engine.containers(self.device, a.name))
        present = self.engine.app_images(a.name)
        images = set()
        for version, iid in present.items():
            m = manifests.get(version) or (a.target.manifest if a.target is not None
                                           and a.target.version == version else None)
            if m is None and version in a.unremovable:
                continue
            if m is None or image_id(m) == iid:
                images.add(version)
        held = (self.lock_dir(a.name) / LOCK_FILE).exists()
        if held and a.lock_since is None:
            a.lock_since = now
        elif not held:
            a.lock_since = None
        return Observed(containers, frozenset(images), held, a.probe, a.missing_blob,
                        self.utc_offset(now))

    def _own_image_layers(self) -> frozenset[str]:
        """The layers of the image this agent's container runs: delta bases and layers the
        device need not fetch for an agent release built on it."""
        if self._own_layers is None:
            me, layers = self.me(), frozenset[str]()
            if me.container is not None:
                try:
                    self._own_image = str(self.engine.inspect(me.container).get("Image", ""))
                    layers = frozenset(self.engine.image_layers(self._own_image))
                except EngineError:
                    return frozenset()  # asked again next round
            self._own_layers = layers
        return self._own_layers

    def _refresh_diff_ids(self) -> None:
        ids: set[str] = set(self._own_image_layers())
        for a in self._apps.values():
            try:
                for c in self.engine.containers(self.device, a.name):
                    if c.running:
                        ids.update(self.engine.image_layers(image_tag(a.name, c.version)))
            except EngineError:
                continue
        self._diff_ids = frozenset(ids)

    def _follow_logs(self, a: _App, observed: Observed) -> None:
        a.container_ids = frozenset(c.id for c in observed.containers)
        if self._collector is None:
            return
        for c in observed.containers:
            if c.running:
                since = None if c.id in self._created_here else self._started_at
                self._collector.follow(a.name, c.id, since)

    # ------------------------------------------------------------------ acting

    def _write_journal(self, a: _App, new: Journal) -> None:
        old = a.state
        release = (a.releases or {}).get(new.to) if new.to is not None else None
        if release is not None:
            a.journal.save_release(release)  # before the journal names it
        committing = old.phase == "checking" and new.phase == "idle"
        if committing:
            self.crash("before-commit")
        a.journal.save(new)
        a.state = new
        if committing:
            self.log(f"{a.name}: release {new.current} committed")
            self.crash("after-commit-journal")
        if new.phase == "rolling-back" and old.phase != "rolling-back":
            self.log(f"{a.name}: rolling back to {new.current}: {new.error or 'target changed'}")
            self.crash("before-rollback")
        if new.phase == "idle":
            keep = {v for v in (new.current, new.previous) if v is not None}
            if a.target is not None:
                keep.add(a.target.version)
            a.journal.prune_releases(keep)
        if old.phase == "idle" and new.phase != "idle":
            self.log(f"{a.name}: applying release {new.to} ({new.phase})")

    def _spec(self, app: str, version: int, name: str, m: ReleaseManifest) -> ContainerSpec:
        lock_dir = self.lock_dir(app)
        lock_dir.mkdir(parents=True, exist_ok=True)
        c = m.container
        binds = ((str(lock_dir), LOCK_MOUNT, False),) + tuple(
            (v.source, v.target, v.read_only) for v in c.volumes)
        return ContainerSpec(
            name=name, image=image_tag(app, version), command=c.command,
            environment=c.environment,
            labels={LABEL_DEVICE: self.device, LABEL_APP: app, LABEL_RELEASE: str(version)},
            restart_policy=c.restart_policy.value, binds=binds, network=c.network.value)

    def _execute(self, a: _App, action: Action, manifests: Mapping[int, ReleaseManifest],
                 now: float) -> None:
        phase = a.state.phase
        engine = self.engine
        if isinstance(action, Load):
            self._load(a, action.version)
        elif isinstance(action, Stop):
            if phase == "stopping":
                self.crash("before-stop-old")
            self.log(f"{a.name}: stopping release {action.version}")
            engine.stop(action.container)
            if phase == "stopping":
                self.crash("after-stop-old")
        elif isinstance(action, Remove):
            engine.remove(action.container)
            if phase == "idle":
                self.crash("after-remove-old")
            elif phase == "rolling-back":
                self.crash("during-rollback")
        elif isinstance(action, Create):
            m = manifests.get(action.version) or self._manifest(a.name, action.version)
            if m is None:
                raise JournalError(f"{a.name}: no manifest for release {action.version}")
            cid = engine.create(self._spec(a.name, action.version, action.name, m))
            self._created_here.add(cid)
            if phase == "starting":
                self.crash("after-create-new")
        elif isinstance(action, Start):
            m = manifests.get(action.version) or self._manifest(a.name, action.version)
            engine.start(action.container,
                         None if m is None else m.container.restart_policy.value)
            self.log(f"{a.name}: started release {action.version}")
            if phase == "starting":
                self.crash("after-start-new")
            elif phase == "rolling-back":
                self.crash("after-rollback")
        elif isinstance(action, Rename):
            engine.rename(action.container, action.name)
        elif isinstance(action, RemoveImage):
            try:
                engine.remove_image(image_tag(a.name, action.version))
            except EngineError as exc:
                self.log(f"{a.name}: cannot remove image of release {action.version}: {exc}")
                a.unremovable = a.unremovable | {action.version}
        elif isinstance(action, RunProbe):
            ok, detail = probe(engine, action.container, action.check)
            a.probe = Probe(action.container, now, ok, detail)
            self.crash("during-health")
        else:  # pragma: no cover - the core returns nothing else
            raise AssertionError(action)

    # ------------------------------------------------------------------ the image

    def _local_layers(self, app: str, manifest: ReleaseManifest) -> dict[str, Path]:
        """Verified layer files usable for `manifest`: its own layers and its deltas' bases,
        exported from the images of this device's releases (cached under .layers/)."""
        wanted = {layer.diff_id for layer in manifest.layers} | {
            d.source_diff_id for layer in manifest.layers for d in layer.deltas}
        self.layer_dir.mkdir(parents=True, exist_ok=True)

        def cached(diff_id: str) -> Path:
            return self.layer_dir / f"{diff_id.removeprefix('sha256:')}.tar"

        sources = [image_tag(other, version) for other in sorted(self._apps)
                   for version in sorted(self.engine.app_images(other), reverse=True)]
        if self._own_image_layers() & wanted and self._own_image:
            sources.append(self._own_image)  # inspected once, with its layers
        for tag in sources:
            layers = set(self.engine.image_layers(tag))
            useful = layers & wanted
            if useful and not all(cached(d).exists() for d in useful):
                self.engine.save_layers(tag, self.layer_dir)
        # A base the engine lacks but whose chunks the store holds (an earlier release that was
        # downloaded, never run: the gossip node counts those as delta bases too).
        store = self.store
        for d in sorted(wanted):
            if store is None:
                break
            ids = store.layer_chunks(d)
            if ids is None or cached(d).exists():
                continue
            try:
                layer = b"".join(open_stored_chunk(i, store.get(i)) for i in ids)
            except (KeyError, ChunkError) as exc:
                self.log(f"{app}: layer {d[7:19]} from stored chunks: {exc}")
                continue
            if diff_id(layer) == d:
                atomic_write(cached(d), layer)
        return {d: cached(d) for d in wanted if cached(d).exists()}

    def _prune_layer_cache(self) -> None:
        keep: set[str] = set()
        for other in self._apps:
            for version in self.engine.app_images(other):
                keep.update(self.engine.image_layers(image_tag(other, version)))
        for p in self.layer_dir.glob("*.tar"):
            if "sha256:" + p.name.removesuffix(".tar") not in keep:
                p.unlink(missing_ok=True)

    def _load(self, a: _App, version: int) -> None:
        release = (a.releases or {}).get(version) or self._release(a.name, version)
        if release is None:
            a.state = fail_load(a.state, version, "its manifest is missing")
            a.journal.save(a.state)
            return
        self.crash("before-load")
        if self.store is None:
            raise EngineError(f"{a.name}: no blob store to rebuild release {version} from")
        tag = image_tag(a.name, version)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        manifest = release.manifest
        local = self._local_layers(a.name, manifest)
        if self.store is not None:
            # materialize takes the smallest delta over any local base; offer only the bases
            # whose delta the gossip node fetched, so it never picks one we do not hold
            store = self.store
            usable = {layer.diff_id for layer in manifest.layers} | {
                d.source_diff_id for layer in manifest.layers for d in layer.deltas
                if store.has(d.blob_id)}
            local = {k: v for k, v in local.items() if k in usable}
        fetch = functools.partial(_fetch_blob, self.store)
        self.log(f"{a.name}: rebuilding release {version} from verified blobs")
        try:
            try:
                built = materialize_release(release, fetch, local, self.work_dir, tag)
            except KeyError:
                # A delta whose blob we lack (the gossip node took chunks): chunks alone.
                own = {layer.diff_id for layer in manifest.layers}
                built = materialize_release(release, fetch,
                                            {d: p for d, p in local.items() if d in own},
                                            self.work_dir, tag)
        except KeyError as exc:
            a.missing_blob = MissingBlob(version, self.clock())
            self.log(f"{a.name}: release {version}: blob {str(exc)[:18]} not in the store yet")
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return
        except (MaterializeError, ReleaseError) as exc:
            self.log(f"{a.name}: release {version} cannot be rebuilt: {exc}")
            a.state = fail_load(a.state, version, str(exc))
            a.journal.save(a.state)
            shutil.rmtree(self.work_dir, ignore_errors=True)
            if a.state.phase == "rolling-back":
                self.crash("before-rollback")
            return
        self.crash("after-materialize")
        try:
            self.engine.load(built.image_tar)
        finally:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        loaded = self.engine.image_id(tag)
        if loaded != image_id(built.manifest):
            a.state = fail_load(a.state, version, f"docker loaded {loaded}, expected "
                                                  f"{image_id(built.manifest)}")
            a.journal.save(a.state)
            return
        self.log(f"{a.name}: release {version} loaded as {tag} ("
                 + ", ".join(f"{s.method}" for s in built.layers) + ")")
        self.crash("after-load")
        self._prune_layer_cache()

    # ------------------------------------------------------------------ status

    def _status(self, a: _App) -> AppStatus:
        by_source = a.by_source or {}
        return AppStatus(
            app=a.name, state=a.status_state, running=a.running,
            target=None if a.target is None else a.target.version,
            bytes_done=a.bytes_done, bytes_total=a.bytes_total,
            by_source=SourceBytes(by_source.get("lan", 0), by_source.get("wan_peer", 0),
                                  by_source.get("coordinator", 0)),
            lock_since=a.lock_since,
            error=a.engine_error or (a.target.platform_error if a.target is not None
                                     and a.status_state == "no-platform" else None)
            or a.state.error,
            failed=a.state.failed, retry_seen=a.state.retry_seen,
            updated_at=a.updated_at or self._started_at)

    def _announce(self, a: _App) -> None:
        """Fire changed() if `a`'s status moved (not its byte counts or time); called from
        the worker thread, so the event is set in trio's thread (TrioToken.run_sync_soon)."""
        shape = replace(self._status(a), bytes_done=0, bytes_total=0, by_source=SourceBytes(),
                        updated_at=0.0)
        if self._reported.get(a.name) == shape:
            return
        self._reported[a.name] = shape
        if self._token is not None:
            try:
                self._token.run_sync_soon(self._fire)
            except trio.RunFinishedError:
                pass  # the agent is exiting: nobody waits any more

    def _fire(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _refuse(self, app: str, version: int, message: str) -> None:
        if (app, version) not in self._refused:
            self._refused.add((app, version))
            self.log(message)


def _pins(pin: bytes | None) -> tuple[SignedPin, ...]:
    """The operator's pin, decoded; one that does not decode is no pin (admit_release then
    refuses the rollback)."""
    if pin is None:
        return ()
    try:
        return (decode_signed_pin(pin),)
    except (ValueError, ReleaseError):
        return ()


def _fetch_blob(store: BlobStore, blob_hex: str) -> bytes:
    return store.get(blob_hex)  # KeyError if absent: the release is not complete yet


__all__ = ["ENGINE_RETRY_S", "LOCK_POLL_S", "RECONCILE_PERIOD_S", "Applier", "local_utc_offset",
           "stderr_log"]
