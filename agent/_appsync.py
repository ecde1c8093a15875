"""Joins what the agent knows about releases into the applier's inputs, without I/O.

Three parties meet here: the coordinator's targets (`mesh.control.DeviceTarget`: which version of
each app this device should run, with the operator's pin, force and retry, and a rollout's hold
and maintenance window), the gossip node (the verified releases it holds and how far each
release's blobs have come) and the applier (agent/_apply_driver.py), which turns a ready
release into the running app and decides, with `admit_release`, whether an older target may
replace the running one. `sync` runs whenever one
of them changes (agent/_release_sync.py); it pushes the current target, readiness and byte
progress into the applier and says whether what the device reports about its apps changed
enough to report it now.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Final, Protocol

from mesh.control import AppStatus, DeviceTarget, SourceBytes
from mesh.release import VerifiedRelease
from mesh.rollout import Window

# While bytes arrive, a progress report at most this often: each is a TLS request over the
# same metered link the release is crossing (docs/gossip.md "Idle cost").
PROGRESS_REPORT_SPACING: Final = 2.0


class NodeView(Protocol):
    """What AppSync reads from the gossip node (agent/_gossip.py GossipNode)."""

    def newest(self, fleet: str, app: str) -> VerifiedRelease | None: ...

    def progress(self, fleet: str, app: str) -> tuple[int, int, int, dict[str, int]] | None: ...

    def complete(self, fleet: str, app: str) -> bool: ...


class ApplierView(Protocol):
    """What AppSync drives (agent/_apply_driver.py Applier)."""

    def set_target(self, release: VerifiedRelease, *, ready: bool, force: bool = False,
                   retry: int = 0, pin: bytes | None = None, hold: bool = False,
                   window: Window | None = None) -> bool: ...

    def clear_target(self, app: str) -> None: ...

    def set_progress(self, app: str, bytes_done: int, bytes_total: int,
                     by_source: Mapping[str, int] | None = None) -> None: ...

    def statuses(self) -> list[AppStatus]: ...


def _window(target: DeviceTarget) -> Window | None:
    """The target's maintenance window (its text was checked where it arrived:
    DeviceTarget.from_json parses it with the same Window.parse)."""
    return None if target.window is None else Window.parse(target.window)


def _shape(status: AppStatus) -> AppStatus:
    """What makes a status worth reporting at once: everything but the byte counts and time."""
    return replace(status, bytes_done=0, by_source=SourceBytes(), updated_at=0.0)


class AppSync:
    def __init__(self, applier: ApplierView, fleet: str) -> None:
        self.applier = applier
        self.fleet = fleet
        self.targets: dict[str, DeviceTarget] = {}  # app -> the coordinator's target
        # releases older than the node's newest (a pin back), verified where they arrived
        self._releases: dict[tuple[str, int], VerifiedRelease] = {}
        self._shapes: dict[str, AppStatus] = {}
        self._bytes: dict[str, int] = {}
        self._last_progress_report = float("-inf")

    # -- inputs ------------------------------------------------------------------------------

    def set_targets(self, targets: Iterable[DeviceTarget]) -> None:
        """The coordinator's answer (validated where it arrived)."""
        fresh = {t.app: t for t in targets}
        for app in set(self.targets) - set(fresh):
            self.applier.clear_target(app)
        self.targets = fresh
        self._releases = {k: v for k, v in self._releases.items()
                          if k[0] in fresh and fresh[k[0]].version == k[1]}

    def release(self, app: str, version: int) -> VerifiedRelease | None:
        """A release older than the node's newest, verified earlier (`add_release`)."""
        return self._releases.get((app, version))

    def add_release(self, release: VerifiedRelease) -> None:
        m = release.manifest
        self._releases[(m.app, m.version)] = release

    # -- the step ----------------------------------------------------------------------------

    def sync(self, node: NodeView | None, now: float) -> bool:
        """Push targets and progress into the applier; True if the apps' report changed enough
        to send it now (a state change at once, byte progress at most every 2 s)."""
        for app, t in self.targets.items():
            newest = node.newest(self.fleet, app) if node is not None else None
            release = newest if newest is not None and newest.manifest.version == t.version \
                else self._releases.get((app, t.version))
            if release is None:
                continue  # the manifest is still on its way
            progress = node.progress(self.fleet, app) if node is not None else None
            if progress is not None and progress[0] == t.version:
                ready = node is not None and node.complete(self.fleet, app)
                self.applier.set_progress(app, progress[1], progress[2], progress[3])
            else:
                # the node is (re)starting, or still fetching another version: ReleaseSync
                # hands it this target (`set_target`), then its progress tells
                ready = False
            # refused (logged once by the applier): another key, or older than the running
            # release without a pin the operator signed
            self.applier.set_target(release, ready=ready, force=t.force, retry=t.retry,
                                    pin=t.pin, hold=t.hold, window=_window(t))
        return self._changed(now)

    def _changed(self, now: float) -> bool:
        urgent = progressed = False
        for s in self.applier.statuses():
            shape = _shape(s)
            if self._shapes.get(s.app) != shape:
                self._shapes[s.app] = shape
                urgent = True
            if self._bytes.get(s.app) != s.bytes_done:
                self._bytes[s.app] = s.bytes_done
                progressed = True
        if urgent or (progressed and now - self._last_progress_report >= PROGRESS_REPORT_SPACING):
            self._last_progress_report = now
            return True
        return False

    def app_statuses(self) -> tuple[AppStatus, ...]:
        """The applier's statuses, as the report carries them."""
        return tuple(self.applier.statuses())
