"""Rollouts in the coordinator: the API's operations on them and the driver that moves them.

The decisions are the pure core's (coordinator/_rollout.py); this module feeds it what the
store and the peer-map core know (devices, their tags, sites and reports, the clock), keeps
what it returns in the store (so a restarted coordinator goes on where it stopped), and tells
agents when their targets change (`targets_changed`, the peer map's targets revision). The
core is stepped when a device of the rollout's fleet reports (synchronously, in the report's
request) and at its `next_deadline` (the driver task, `RolloutService.run`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import trio

from mesh.control import ControlError
from mesh.release import ManifestError, decode_signed_pin
from mesh.rollout import RolloutSpec

from . import _rollout as core
from ._model import (
    ROLLOUT_ACTIVE,
    ROLLOUT_BAD,
    Conflict,
    Device,
    DeviceState,
    NotFound,
    RolloutRecord,
)
from ._peermap import endpoint_ip
from ._releases import ReleaseRegistry, checked_pin, stored_rollout
from ._store import Store

log = logging.getLogger("fleetmesh.coordinator")

ACTIONS: Final = ("pause", "resume", "abort", "promote")
# The driver sleeps at most this long between looks at the deadlines: a bound on how late a
# deadline is met when the coordinator's clock jumps, never a poll of the devices (reports
# step rollouts at once).
MAX_DRIVER_SLEEP: Final = 30.0
MIN_DRIVER_SLEEP: Final = 0.05
MAX_PIN_HEX: Final = 2 * 8192  # an encoded SignedPin, hex (as PUT .../target takes)


class RolloutService:
    """The rollouts of every fleet. `site_of(name)`: a device's public IP as the coordinator
    sees it (None: unknown), which phase selection spreads canaries over."""

    def __init__(self, store: Store, releases: ReleaseRegistry,
                 site_of: Callable[[str], str | None]) -> None:
        self.store = store
        self.releases = releases
        self.site_of = site_of
        self._wake = trio.Event()
        # Whether this process steps rollouts (reports, the driver): always on one database of
        # its own; of replicas on one PostgreSQL, only the one that holds the leader lock
        # (coordinator/_changes.py), so that two never step the same rollout at once.
        self.leader = True

    def wake(self) -> None:
        """Make the driver step now (a rollout changed, or this replica began to lead)."""
        self._wake.set()

    @property
    def clock(self) -> Callable[[], float]:
        return self.releases.clock

    # ------------------------------------------------------------------ reading

    def _record(self, fleet: str, app: str, version: int) -> RolloutRecord:
        record = self.store.get_rollout(fleet, app, version)
        if record is None:
            self.releases.release_detail(fleet, app, version)  # 404 for an unknown release
            raise NotFound(f"{app} version {version} in fleet {fleet} has no rollout")
        return record

    @staticmethod
    def _json(record: RolloutRecord) -> dict[str, Any]:
        """The API's Rollout: the core's JSON, with the state the store keeps."""
        return {**_rollout_of(record).to_json(), "state": record.state}

    def get(self, fleet: str, app: str, version: int) -> dict[str, Any]:
        return self._json(self._record(fleet, app, version))

    def all(self, fleet: str | None) -> list[dict[str, Any]]:
        return [self._json(r) for r in self.store.rollouts(fleet)]

    # ------------------------------------------------------------------ the devices

    def _active(self, fleet: str) -> list[Device]:
        return [d for d in self.store.list_devices(fleet) if d.state is DeviceState.ACTIVE]

    def _members(self, devices: list[Device]) -> list[core.Member]:
        return [core.Member(d.name, d.tags, self._site(d), None, d.enrolled_at or d.created_at)
                for d in devices]

    def _site(self, device: Device) -> str | None:
        site = self.site_of(device.name)
        if site is None and device.public_endpoint:
            site = endpoint_ip(device.public_endpoint)
        return site

    def _views(self, fleet: str, app: str, devices: list[Device] | None = None
               ) -> dict[str, core.DeviceView]:
        statuses = self.store.app_statuses(fleet)
        views = {}
        for d in self._active(fleet) if devices is None else devices:
            status = next((s for s in statuses.get(d.id, ()) if s.app == app), None)
            views[d.name] = core.DeviceView.of(d.name, status)
        return views

    # ------------------------------------------------------------------ starting

    def _check_pin(self, fleet: str, app: str, previous: int | None, pin_hex: Any
                   ) -> bytes | None:
        """The rollback pin of the body, verified as PUT .../target verifies pins: for
        (fleet, app, previous, every device), signed with the fleet's release key."""
        if pin_hex is None:
            return None
        if not isinstance(pin_hex, str) or len(pin_hex) > MAX_PIN_HEX:
            raise ControlError(f"rollback_pin: must be a hex encoded signed pin of at most "
                               f"{MAX_PIN_HEX} digits")
        if previous is None:
            raise ControlError(f"rollback_pin: {app} has no earlier release in fleet {fleet} "
                               "to go back to")
        try:
            raw = bytes.fromhex(pin_hex)
            signed = decode_signed_pin(raw)
        except (ValueError, ManifestError) as exc:
            raise ControlError(f"rollback_pin: not a hex encoded signed pin: {exc}") from None
        key = self.store.release_key(fleet)
        if key is None:
            raise Conflict(f"fleet {fleet} has no release key: set it before a rollback pin "
                           "can be checked")
        pin = checked_pin(signed, key, fleet, self.clock(), "rollback_pin")
        if (pin.fleet, pin.app, pin.version, pin.device) != (fleet, app, previous, None):
            raise ControlError(
                f"rollback_pin names {pin.app} version {pin.version} in fleet {pin.fleet}"
                f"{'' if pin.device is None else ' for device ' + pin.device}, not {app} "
                f"version {previous} (the previous release) for every device")
        return raw

    def start(self, fleet: str, app: str, version: int, body: Any) -> dict[str, Any]:
        """Start (or restart, after held/halted/aborted) the release's rollout."""
        self.releases.release_detail(fleet, app, version)  # 404 for an unknown release
        spec = RolloutSpec.from_json(body)
        existing = self.store.get_rollout(fleet, app, version)
        if existing is not None and existing.state not in ("held", *ROLLOUT_BAD):
            raise Conflict(f"the rollout of {app} version {version} in fleet {fleet} is "
                           f"{existing.state}: it cannot start again")
        previous = self.releases.previous_version(fleet, app, version)
        pin = self._check_pin(fleet, app, previous, body.get("rollback_pin"))
        now = self.clock()
        # a device whose reports still name this version failed (it halted before) is
        # retrying, not failed, until its agent acts on the retry counter bumped below
        devices = self._active(fleet)
        rollout = core.start(fleet, app, version, previous, spec, self._members(devices), now,
                             self._views(fleet, app, devices))
        record = _record_of(rollout, pin)
        self.store.put_rollout(record, exclusive=True)
        if existing is not None and existing.state in ROLLOUT_BAD:
            # the devices that failed it try it again (the agent retries a failed version
            # only when its retry counter grows)
            failed = [d for d in self.store.list_devices(fleet) if d.state is
                      DeviceState.ACTIVE and d.name in _failed_names(existing)]
            self.store.add_retry([d.id for d in failed], app)
        self.releases.targets_changed(fleet, None)
        self._wake.set()
        return self._json(record)

    # ------------------------------------------------------------------ actions

    def action(self, fleet: str, app: str, version: int, action: str) -> dict[str, Any]:
        if action not in ACTIONS:
            raise NotFound(f"no rollout action {action!r} ({', '.join(ACTIONS)})")
        record = self._record(fleet, app, version)
        now = self.clock()
        rollout = self._stepped(record, now)
        act = {"pause": core.pause, "resume": core.resume, "abort": core.abort,
               "promote": core.promote}[action]
        try:
            changed = act(rollout, now)
        except core.RolloutConflict as exc:
            raise Conflict(str(exc)) from None
        if action in ("resume", "promote"):
            changed = core.step(changed, _spec(changed), self._views(fleet, app), now)
        return self._json(self._save(record, changed))

    # ------------------------------------------------------------------ stepping

    def _stepped(self, record: RolloutRecord, now: float) -> core.Rollout:
        """The stored rollout brought up to `now` (devices enrolled since it started
        admitted, the devices' reports observed), saved if that changed it."""
        rollout = _rollout_of(record)
        if rollout.state not in ROLLOUT_ACTIVE:
            return rollout
        spec = _spec(rollout)
        devices = self._active(record.fleet)  # one read for both
        moved = core.admit(rollout, spec, self._members(devices), now)
        moved = core.step(moved, spec, self._views(record.fleet, record.app, devices), now)
        # a step that only observed stamps updated_at: not worth a write per report
        if replace(moved, updated_at=rollout.updated_at) != rollout:
            self._save(record, moved)
        return moved

    def _save(self, record: RolloutRecord, rollout: core.Rollout) -> RolloutRecord:
        """Store the rollout as the core returned it; every device of the fleet re-reads
        its targets when a phase started, ended or the state changed (a device's target
        changes only then)."""
        new = _record_of(rollout, record.rollback_pin)
        if new == record:
            return record
        self.store.put_rollout(new)
        old = _rollout_of(record)
        if (old.state, [p.started_at for p in old.phases], sorted(old.devices)) != (
                rollout.state, [p.started_at for p in rollout.phases], sorted(rollout.devices)):
            self.releases.targets_changed(record.fleet, None)
            if rollout.state != old.state:
                log.info("rollout of %s v%d in fleet %s: %s%s", record.app, record.version,
                         record.fleet, rollout.state,
                         f" ({rollout.reason})" if rollout.reason else "")
        self._wake.set()
        return new

    def device_reported(self, device: Device) -> None:
        """A device reported: step the active rollouts of its fleet now. The report is kept
        whatever happens here; a failure is logged and the driver tries again. Not the
        leader: the leader hears of the report (the change feed) and steps."""
        self.step_reported(device.fleet)

    def step_reported(self, fleet: str) -> None:
        """A device of `fleet` reported (here or on another replica): the leader steps."""
        if not self.leader:
            return
        try:
            self.step_fleet(fleet)
        except Exception:  # noqa: BLE001 - a rollout must not cost the fleet its reports
            log.exception("stepping the rollouts of fleet %s failed", fleet)

    def step_fleet(self, fleet: str | None) -> float | None:
        """Step every active rollout (of `fleet`) → the earliest next deadline (None: none)."""
        now = self.clock()
        due: list[float] = []
        for record in self.store.rollouts(fleet, ROLLOUT_ACTIVE):
            try:
                rollout = self._stepped(record, now)
            except ValueError as exc:  # a damaged row: say so, never stop the others
                log.warning("rollout of %s v%d in fleet %s unreadable: %s", record.app,
                            record.version, record.fleet, exc)
                continue
            if rollout.state in ROLLOUT_ACTIVE:
                deadline = core.next_deadline(rollout, _spec(rollout), now)
                if deadline is not None:
                    due.append(deadline)
        return min(due, default=None)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The driver: step every active rollout at its next deadline (and whenever a start,
        an action or a report changed one, since that may move the deadline); runs until
        cancelled. The state is the store's, so a restarted coordinator goes on."""
        task_status.started()
        while True:
            self._wake = trio.Event()
            try:
                deadline = self.step_fleet(None) if self.leader else None
            except OSError as exc:  # the database did not answer: try again later
                log.warning("rollout driver: %s", exc)
                deadline = self.clock() + MAX_DRIVER_SLEEP
            except Exception:  # noqa: BLE001 - a rollout must not stop the coordinator
                log.exception("rollout driver: stepping the rollouts failed")
                deadline = self.clock() + MAX_DRIVER_SLEEP
            # at least MIN_DRIVER_SLEEP: a deadline the step left in the past (it should not)
            # must not make this a busy loop
            wait = MAX_DRIVER_SLEEP if deadline is None else min(
                MAX_DRIVER_SLEEP, max(MIN_DRIVER_SLEEP, deadline - self.clock()))
            with trio.move_on_after(wait):
                await self._wake.wait()


def _rollout_of(record: RolloutRecord) -> core.Rollout:
    return stored_rollout(record)


def _record_of(rollout: core.Rollout, pin: bytes | None) -> RolloutRecord:
    return RolloutRecord(
        rollout.fleet, rollout.app, rollout.version, rollout.state, rollout.previous,
        rollout.created_at, rollout.updated_at,
        None if rollout.spec is None else rollout.spec.to_json(), rollout.to_json(), pin)


def _spec(rollout: core.Rollout) -> RolloutSpec:
    assert rollout.spec is not None  # only a held rollout has none, and it never steps
    return rollout.spec


def _failed_names(record: RolloutRecord) -> set[str]:
    devices = (record.data or {}).get("devices") or {}
    return {name for name, d in devices.items()
            if isinstance(d, dict) and d.get("state") == core.FAILED}
