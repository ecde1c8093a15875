"""Joins what the agent knows about releases into the applier's inputs, without I/O.

Three parties meet here: the coordinator's targets (which version of each app this device
should run, with the operator's force and retry), the gossip node (the signed manifests it
holds and how far each release's blobs have come) and the applier (agent/_applier.py), which
turns a ready release into the running app. `sync` is called about once a second; it pushes the
current target, readiness and byte progress into the applier and says whether what the device
reports about its apps changed enough to report it now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

from mesh.control import AppStatus, ControlError
from mesh.release import ReleaseError, decode_signed_pin, verify_pin

# While bytes arrive, a progress report at most this often: each is a TLS request over the
# same metered link the release is crossing (docs/gossip.md "Idle cost").
PROGRESS_REPORT_SPACING: Final = 2.0


class NodeView(Protocol):
    """What AppSync reads from the gossip node (agent/_gossip.py GossipNode)."""

    def progress(self, fleet: str, app: str) -> tuple[int, int, int, dict[str, int]] | None: ...

    def complete(self, fleet: str, app: str) -> bool: ...


class ApplierView(Protocol):
    def set_target(self, app: str, signed: bytes, *, ready: bool, force: bool = False,
                   retry: int = 0) -> bool: ...

    def clear_target(self, app: str) -> None: ...

    def set_progress(self, app: str, bytes_done: int, bytes_total: int,
                     by_source: dict[str, int]) -> None: ...

    def statuses(self) -> list[dict[str, Any]]: ...


def _shape(status: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a status worth reporting at once: everything but the byte counts and time."""
    return tuple((k, repr(v)) for k, v in sorted(status.items())
                 if k not in ("bytes_done", "by_source", "updated_at"))


def pin_checker(release_key_hex: str, fleet: str, device: str
                ) -> Callable[[str, int, object], bool]:
    """(app, version, pin hex) -> True if the pin is signed with the device's pinned release
    key and names that release for this fleet and for this device or every device."""
    key = bytes.fromhex(release_key_hex)

    def ok(app: str, version: int, pin_hex: object) -> bool:
        if not isinstance(pin_hex, str):
            return False
        try:
            pin = verify_pin(decode_signed_pin(bytes.fromhex(pin_hex)), key)
        except (ValueError, ReleaseError):
            return False
        return (pin.fleet, pin.app, pin.version) == (fleet, app, version) and \
            pin.device in (None, device)

    return ok


class AppSync:
    def __init__(self, applier: ApplierView, fleet: str,
                 newest_manifest: Callable[[str], tuple[int, bytes] | None],
                 log: Callable[[str], None],
                 pin_ok: Callable[[str, int, object], bool] = lambda app, version, pin: False
                 ) -> None:
        self.applier = applier
        self.fleet = fleet
        self.pin_ok = pin_ok  # a rollback needs a pin the operator signed (pin_checker)
        self.newest_manifest = newest_manifest  # app -> the gossip node's (version, signed)
        self.log = log
        self.targets: dict[str, dict[str, Any]] = {}  # app -> the coordinator's target entry
        self._manifests: dict[tuple[str, int], bytes] = {}  # fetched from the coordinator
        self._refused: set[tuple[str, int]] = set()
        self._shapes: dict[str, tuple[Any, ...]] = {}
        self._bytes: dict[str, int] = {}
        self._last_progress_report = float("-inf")

    # -- inputs ------------------------------------------------------------------------------

    def set_targets(self, targets: Iterable[dict[str, Any]]) -> None:
        """The coordinator's answer; entries that are not well formed are skipped."""
        fresh: dict[str, dict[str, Any]] = {}
        for t in targets:
            app, version = t.get("app"), t.get("version")
            if isinstance(app, str) and type(version) is int and version > 0:
                fresh[app] = t
        for app in set(self.targets) - set(fresh):
            self.applier.clear_target(app)
        self.targets = fresh
        self._manifests = {k: v for k, v in self._manifests.items()
                           if k[0] in fresh and fresh[k[0]]["version"] == k[1]}

    def needs_manifest(self, app: str) -> int | None:
        """The target version of `app` if neither the node nor we hold its manifest (a pin
        back to an older release: the node only keeps the newest)."""
        t = self.targets.get(app)
        if t is None:
            return None
        version = int(t["version"])
        newest = self.newest_manifest(app)
        if newest is not None and newest[0] == version or (app, version) in self._manifests:
            return None
        if newest is None or newest[0] < version:
            return None  # newer than what gossip holds: it arrives by offer_manifest
        return version

    def add_manifest(self, app: str, version: int, signed: bytes) -> None:
        self._manifests[(app, version)] = signed

    # -- the periodic step -------------------------------------------------------------------

    def sync(self, node: NodeView | None, now: float) -> bool:
        """Push targets and progress into the applier; True if the apps' report changed enough
        to send it now (a state change at once, byte progress at most every 2 s)."""
        running = {s.get("app"): s.get("running") for s in self.applier.statuses()}
        for app, t in self.targets.items():
            version = int(t["version"])
            now_running = running.get(app)
            if isinstance(now_running, int) and version < now_running \
                    and not self.pin_ok(app, version, t.get("pin")):
                # never back without a pin the operator signed: not on the coordinator's word
                # alone, nor when the newest release was deleted and an older one is newest
                if (app, version) not in self._refused:
                    self._refused.add((app, version))
                    self.log(f"release {self.fleet}/{app} v{version}: older than the running "
                             f"v{now_running} and no valid signed pin; staying")
                continue
            newest = self.newest_manifest(app)
            signed = newest[1] if newest is not None and newest[0] == version else \
                self._manifests.get((app, version))
            if signed is None:
                continue  # the manifest is still on its way
            progress = node.progress(self.fleet, app) if node is not None else None
            if progress is not None and progress[0] == version:
                ready = node is not None and node.complete(self.fleet, app)
                self.applier.set_progress(app, progress[1], progress[2], progress[3])
            elif node is None:
                ready = False  # the mesh node is (re)starting: nothing to judge by yet
            else:
                # an older release (a pin back): its blobs are most likely held; the applier
                # says "downloading" if one is not, and the node does not fetch old releases
                ready = True
            force = t.get("force") is True
            raw = t.get("retry")
            retry = raw if isinstance(raw, int) and not isinstance(raw, bool) else 0
            if not self.applier.set_target(app, signed, ready=ready, force=force,
                                           retry=retry):
                if (app, version) not in self._refused:
                    self._refused.add((app, version))
                    self.log(f"release {self.fleet}/{app} v{version}: manifest refused")
        return self._changed(now)

    def _changed(self, now: float) -> bool:
        urgent = progressed = False
        for s in self.applier.statuses():
            app = s.get("app")
            if not isinstance(app, str):
                continue
            shape = _shape(s)
            if self._shapes.get(app) != shape:
                self._shapes[app] = shape
                urgent = True
            raw = s.get("bytes_done")
            done = raw if isinstance(raw, int) else 0
            if self._bytes.get(app) != done:
                self._bytes[app] = done
                progressed = True
        if urgent or (progressed and now - self._last_progress_report >= PROGRESS_REPORT_SPACING):
            self._last_progress_report = now
            return True
        return False

    def app_statuses(self) -> tuple[AppStatus, ...]:
        """The applier's statuses as report entries (one that does not validate is left out
        and logged: a bug, never a reason to stop reporting the rest)."""
        out = []
        for s in self.applier.statuses():
            try:
                out.append(AppStatus.from_json(s))
            except ControlError as exc:
                self.log(f"app status not reported: {exc}")
        return tuple(out)
